"""wat-tag: transcribe audio files and tag their sounds in the same encoder passes."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

# torch, whisper and the tagger load in the functions that need them: `wat-tag --help` imports neither
from wat.data.audio import AudioError
from wat.data.datasets import AUDIO_EXTS
from wat.data.clikit.args import MAX_CLASSES, MODEL_HELP, add_device, float_range, int_range, parse_args
from wat.data.clikit.main import run_command
from wat.data.files import atomic_write, make_folder, one_line, remove_bare, write_tsv
from wat.data.naming import output_stems
from wat.data.clikit.progress import progress

from . import MIN_RES

# whisper's --output_format values; `all` writes every one of them
log = logging.getLogger("wat.tag")

FORMATS = ("txt", "vtt", "srt", "tsv", "json", "all")
# The whisper command defaults to turbo (large-v3-turbo), for which Whisper-AT released no head; small
# was its default before turbo and is whisper-at's own: the default among models with an official head.
DEFAULT_MODEL = "small"
DEFAULT_HEAD = "whisper-at"


def _tag_line(tags) -> str:
    return ", ".join(f"{name} {p:.2f}" for name, p in tags)


def format_json(path, result) -> str:
    """One line per file: {"file", "text", "segments", "language", "audio_tags", ...}."""
    return json.dumps({"file": str(path), **result}, ensure_ascii=False)


def format_text(path, result) -> str:
    from whisper.utils import format_timestamp

    lines = [f"== {path} ({result['language']})"]
    for s in result["segments"]:
        lines.append(f"[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text'].strip()}")
    lines.append("-- audio tags")
    for w in result["audio_tags"]:
        lines.append(f"[{format_timestamp(w['start'])} --> {format_timestamp(w['end'])}] "
                     f"{_tag_line(w['tags']) or '-'}")
    return "\n".join(lines) + "\n"


def tag_rows(result) -> list[tuple]:
    """The tags TSV: one row per (window, tag), windows in time order."""
    return [(f"{w['start']:.3f}", f"{w['end']:.3f}", rank, name, f"{p:.6f}")
            for w in result["audio_tags"] for rank, (name, p) in enumerate(w["tags"], 1)]


TAG_COLUMNS = ("start", "end", "rank", "tag", "probability")


TRANSCRIPTS = ("txt", "vtt", "srt", "tsv", "json")  # whisper's writers, what `all` writes


def expand_inputs(items) -> list[str]:
    """The audio files to tag: files as given (a missing one is reported and skipped later, like an
    undecodable one); a folder: its audio files (`AUDIO_EXTS`, sub-folders included, hidden entries
    skipped), sorted. Raises TagError for `-` (standard input is not read: a pipe cannot be seeked
    and decoded by PyAV and libsndfile alike; save it to a file) and for a folder without audio."""
    from .tagging import TagError

    out = []
    for item in items:
        if item == "-":
            raise TagError("-: reading audio from standard input is not supported; save it to a file "
                           "(e.g. ffmpeg ... out.wav) and pass that")
        if not os.path.isdir(item):
            out.append(item)
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in AUDIO_EXTS]
        if not found:
            raise TagError(f"{item}: a folder without audio files ({', '.join(sorted(AUDIO_EXTS))})")
        out += found
    return out


def output_files(fmt: str) -> tuple[str, ...]:
    """The files written per input with --output_dir: whisper's transcript(s) and the tags TSV."""
    return tuple(f".{e}" for e in (TRANSCRIPTS if fmt == "all" else (fmt,))) + (".tags.tsv",)


def write_outputs(folder: Path, stem: str, fmt: str, result: dict) -> None:
    """Write one input's outputs (`output_files`) under `folder` as `stem.*`, each atomically
    (`files.atomic_write`: whisper's own writers write straight into the final file, which a full
    disk leaves half-written). A failed write removes this input's files written so far and any
    sub-folder made for them, then raises the OSError: an input has all its outputs or none."""
    from whisper.utils import get_writer

    written, made = [], []
    try:
        made = make_folder((folder / stem).parent)
        for suffix in output_files(fmt):
            path = folder / f"{stem}{suffix}"
            if suffix == ".tags.tsv":
                write_tsv(path, TAG_COLUMNS, tag_rows(result))
            else:
                buf = io.StringIO()
                get_writer(suffix[1:], ".").write_result(result, file=buf, options={})
                atomic_write(path, buf.getvalue())
            written.append(path)
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        remove_bare(made)
        raise


def _language(text: str) -> str:
    """--language: a whisper language code or name (case-insensitive) -> the code."""
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    key = text.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise argparse.ArgumentTypeError(f"unknown language {text!r}: expected a code such as en, de, zh, "
                                     "or a name such as English")


def _bool(text: str) -> bool:
    """whisper's True/False option values (also accepts lower case, 1/0, yes/no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def _keep_scores(text: str) -> int | None:
    return None if text.strip().lower() == "all" else int_range(0, MAX_CLASSES)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wat-tag",
        description="Whisper transcript plus audio-event tags per time window, from the same encoder "
                    "passes (tags add only the head's cost). Options follow the whisper command; "
                    "undecodable files are reported and skipped.")
    p.add_argument("audio", nargs="+",
                   help="audio files (wav, flac, ogg, mp3, m4a, ...: libsndfile, else PyAV; no ffmpeg binary "
                        "needed) or folders (their audio files, sub-folders included); not - (stdin)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=MODEL_HELP + f" (default {DEFAULT_MODEL}: whisper-at's default, and the whisper command's "
                        "before turbo, which has no official head)")
    p.add_argument("--head", metavar="HEAD|whisper-at|whisper-at-low",
                   help="head file (wat-train output or an official at_model.* file), or whisper-at / whisper-at-low: "
                        "the official Whisper-AT AudioSet head of --model, downloaded once into the user cache "
                        "(default: whisper-at)")
    p.add_argument("--time-res", "--at_time_res", type=float_range(MIN_RES, 86400.0), default=10.0,
                   help=f"tag window length in seconds, {MIN_RES:g} to 86400 (default 10)")
    p.add_argument("--top-k", type=int_range(1, MAX_CLASSES), default=5, help="tags per window (default 5)")
    p.add_argument("--threshold", type=float_range(0.0, 1.0), help="keep tags with probability >= P")
    p.add_argument("--classes", help="comma-separated class names or keys to report, e.g. Laughter,Music")
    p.add_argument("--keep-scores", type=_keep_scores, default=None, metavar="K|all",
                   help="JSON output keeps each window's K highest class probabilities, or all (default), "
                        "so tags can be re-thresholded without the encoder (0: none)")
    out = p.add_argument_group("output (as the whisper command)")
    out.add_argument("--output_format", "-f", "--format", dest="output_format", type=str.lower,
                     choices=FORMATS + ("text",), default=None,
                     help="txt, vtt, srt, tsv (transcript, through whisper's writers), json (transcript + tags "
                          "+ scores) or all; with --output_dir every file also gets FILE.tags.tsv. Without "
                          "--output_dir and --output_format: one JSON object per file per line on stdout")
    out.add_argument("--output_dir", "-o", "--output-dir", dest="output_dir", type=Path,
                     help="write FILE.{txt,vtt,srt,tsv,json} and FILE.tags.tsv there (default with "
                          "--output_format: the current folder; without either: stdout). FILE: the input's "
                          "path below the folder all inputs share, without its extension (kept where two "
                          "names would clash)")
    dec = p.add_argument_group("decoding (passed to whisper's transcribe, same defaults as the whisper command)")
    dec.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    dec.add_argument("--language", type=_language, help="spoken language code or name; default: detected "
                                                         "(multilingual models), en for .en models")
    dec.add_argument("--temperature", type=float_range(0.0, 1.0), default=0.0, help="sampling temperature")
    dec.add_argument("--temperature_increment_on_fallback", type=float_range(0.0, 1.0, lo_open=True), default=0.2,
                     help="temperature step when a decoding fails the thresholds")
    dec.add_argument("--best_of", type=int_range(1, 100), default=5, help="candidates when sampling")
    dec.add_argument("--beam_size", type=int_range(1, 100), default=5, help="beams at temperature 0")
    dec.add_argument("--word_timestamps", type=_bool, default=False, metavar="True|False")
    dec.add_argument("--initial_prompt", help="text to prompt the first window with")
    dec.add_argument("--condition_on_previous_text", type=_bool, default=True, metavar="True|False")
    dec.add_argument("--fp16", type=_bool, default=True, metavar="True|False",
                     help="fp16 inference on CUDA (always fp32 on the CPU)")
    add_device(p)
    p.add_argument("--allow-policy-mismatch", action="store_true",
                   help="use a head trained on features of another input policy (e.g. trim)")
    return p


def _writable_dir(parser, folder: Path) -> list[Path]:
    """Create the output folder now, so a bad one is an error before any model loads; returns the
    folders created (`main` removes them again if the run writes nothing into them)."""
    made = []
    try:
        made = make_folder(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        remove_bare(made)
        parser.error(f"--output_dir {folder}: {e.strerror or e}")
    return made


def main(argv=None) -> int:
    return run_command("wat-tag", lambda: _main(argv))


def _main(argv) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    from .tagging import TagError

    fmt = {"text": "txt"}.get(args.output_format, args.output_format)
    try:
        args.audio = expand_inputs(args.audio)
    except TagError as e:
        parser.error(str(e))
    made = []
    if args.output_dir is not None or fmt == "all":
        args.output_dir = args.output_dir or Path(".")
        made = _writable_dir(parser, args.output_dir)
    try:
        return _tag(args, fmt or "json", to_files=args.output_dir is not None)
    finally:  # a run that wrote nothing (refused, interrupted, every file failed) leaves no folder it made
        remove_bare(made)


def whisper_only(spec: str) -> None:
    """Refuse, before loading anything, a `--model` that another encoder family loads: tags come from
    the encoder pass of Whisper's own transcription, which only a Whisper model makes."""
    from wat.extract.encoders import family_of

    from .tagging import TagError

    family = family_of(spec)
    if family != "whisper":
        raise TagError(f"--model {spec}: a {family} encoder, not Whisper; wat-tag tags audio from the encoder pass "
                       f"of Whisper's transcription, so it needs a Whisper model (heads trained on {family} features "
                       f"score clips with wat-eval on a cache made by wat-extract --model {spec})")


def _tag(args, fmt: str, to_files: bool) -> int:
    import numpy as np
    from whisper.utils import get_writer

    from wat.data.heads import official
    from wat.extract.load import load_whisper

    from .tagging import TagError, check_head, head_vocabulary, resolve_classes, transcribe_and_tag

    whisper_only(args.model)
    # the head first: a head that cannot be had is refused before a model is downloaded or loaded
    try:
        head = official.load_named_head(DEFAULT_HEAD if args.head is None else args.head, args.model)
    except official.OfficialHeadError as e:
        if args.head is not None:
            raise
        raise official.OfficialHeadError(f"no --head: {e}") from None
    if args.head is None:
        where = official.folder() / official.file_name(DEFAULT_HEAD, args.model)
        log.warning("no --head: tags from the official Whisper-AT head of %s (%s)", args.model, where)
    model = load_whisper(args.model, device=args.device)
    check_head(model, head[1], allow_policy_mismatch=args.allow_policy_mismatch)
    if args.classes is not None:  # unknown names fail here, before any file
        vocab = head_vocabulary(head[1])
        args.classes = [vocab.keys[i] for i in resolve_classes(vocab, args.classes)]
    language = args.language
    if language not in (None, "en") and not model.is_multilingual:
        log.warning("%s is an English-only model; transcribing in English, not %r", args.model, language)
        language = "en"
    increment = args.temperature_increment_on_fallback
    options = dict(
        task=args.task, language=language, initial_prompt=args.initial_prompt,
        temperature=tuple(np.arange(args.temperature, 1.0 + 1e-6, increment)),
        best_of=args.best_of, beam_size=args.beam_size, word_timestamps=args.word_timestamps,
        condition_on_previous_text=args.condition_on_previous_text,
        fp16=args.fp16 and str(args.device).startswith("cuda"))
    names = output_stems(args.audio, output_files(fmt))
    failed = 0
    for path, name in zip(progress(args.audio, desc="wat-tag", unit="file"), names):
        try:
            result = transcribe_and_tag(model, head, path, time_res=args.time_res, top_k=args.top_k,
                                        threshold=args.threshold, classes=args.classes, keep_scores=args.keep_scores,
                                        allow_policy_mismatch=args.allow_policy_mismatch, **options)
        except (AudioError, TagError) as e:
            print(f"wat-tag: error: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        if to_files:
            try:
                write_outputs(args.output_dir, name, fmt, result)
            except OSError as e:  # a full disk fails every file after it too: stop here
                print(f"wat-tag: error: cannot write the outputs of {path} in {args.output_dir} "
                      f"({e.strerror or one_line(e)}); the files before it are complete", file=sys.stderr)
                return 2
        elif fmt == "json":
            print(format_json(path, result), flush=True)
        elif fmt == "txt":
            print(format_text(path, result), flush=True)
        else:  # srt, vtt, tsv on stdout: the transcript, as whisper writes it
            get_writer(fmt, ".").write_result(result, file=sys.stdout, options={})
            sys.stdout.flush()
    if failed:
        print(f"wat-tag: error: {failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
