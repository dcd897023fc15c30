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
from wat.data.clikit.args import (MAX_CLASSES, MODEL_HELP, add_device, add_model, float_range, int_range, nonempty,
                                  parse_args)
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
BACKENDS = ("openai-whisper", "faster-whisper")
TAG_FORMATS = ("json", "all")  # --task tag: no transcript to write
COMPUTE_TYPES = ("auto", "float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16",
                 "int8_bfloat16")  # CTranslate2's (faster-whisper); auto: float32 on the CPU, float16 on CUDA


def _tag_line(tags) -> str:
    return ", ".join(f"{name} {p:.2f}" for name, p in tags)


def format_json(path, result) -> str:
    """One line per file: {"file", "text", "segments", "language", "audio_tags", ...}."""
    return json.dumps({"file": str(path), **result}, ensure_ascii=False)


def format_text(path, result) -> str:
    from whisper.utils import format_timestamp

    lines = [f"== {path}" + (f" ({result['language']})" if "language" in result else "")]
    for s in result.get("segments", ()):
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


def output_files(fmt: str, transcript: bool = True) -> tuple[str, ...]:
    """The files written per input with --output_dir: whisper's transcript(s) and the tags TSV
    (tags only: FILE.json for json/all, and the tags TSV)."""
    if not transcript:
        return (".json", ".tags.tsv") if fmt in TAG_FORMATS else (".tags.tsv",)
    return tuple(f".{e}" for e in (TRANSCRIPTS if fmt == "all" else (fmt,))) + (".tags.tsv",)


def write_outputs(folder: Path, stem: str, fmt: str, result: dict, transcript: bool = True) -> None:
    """Write one input's outputs (`output_files`) under `folder` as `stem.*`, each atomically
    (`files.atomic_write`: whisper's own writers write straight into the final file, which a full
    disk leaves half-written). A failed write removes this input's files written so far and any
    sub-folder made for them, then raises the OSError: an input has all its outputs or none."""
    from whisper.utils import get_writer

    written, made = [], []
    try:
        made = make_folder((folder / stem).parent)
        for suffix in output_files(fmt, transcript):
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
    p.add_argument("audio", nargs="+", type=nonempty("audio path"),
                   help="audio files (wav, flac, ogg, mp3, m4a, ...: libsndfile, else PyAV; no ffmpeg binary "
                        "needed) or folders (their audio files, sub-folders included); not - (stdin)")
    add_model(p, MODEL_HELP + f" (default {DEFAULT_MODEL}: whisper-at's default, and the whisper command's "
                 "before turbo, which has no official head); with --task tag also another encoder family "
                 "(a Hugging Face speech model, crepe-*) whose cache trained the --head", default=DEFAULT_MODEL)
    p.add_argument("--head", metavar="HEAD|whisper-at|whisper-at-low", type=nonempty("head"),
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
    out.add_argument("--output_dir", "-o", "--output-dir", dest="output_dir", type=nonempty("folder"),
                     help="write FILE.{txt,vtt,srt,tsv,json} and FILE.tags.tsv there (default with "
                          "--output_format: the current folder; without either: stdout). FILE: the input's "
                          "path below the folder all inputs share, without its extension (kept where two "
                          "names would clash)")
    dec = p.add_argument_group("decoding (passed to whisper's transcribe, same defaults as the whisper command)")
    dec.add_argument("--task", choices=("transcribe", "translate", "tag"), default="transcribe",
                     help="transcribe (default) or translate, with tags; tag: tags only, the encoder alone, "
                          "batched across files (no decoder: for sound, music, or when the words do not matter)")
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
    fast = p.add_argument_group("speed")
    fast.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int_range(1, 1024), default=16,
                      help="files of up to 30 s transcribed together: one encoder pass and one decode per batch, "
                           "each file's result (text, timed segments, tags) as whisper's transcribe gives it alone; "
                           "with --task tag: windows per encoder call (default 16; 1: file by file; "
                           "--word_timestamps True and --backend faster-whisper go file by file)")
    fast.add_argument("--backend", choices=BACKENDS, default="openai-whisper",
                      help="decoder: openai-whisper (default) or faster-whisper (CTranslate2; extra `faster`; "
                           "its encoder calls are served by wat's encoder, so tags are unchanged)")
    fast.add_argument("--compute_type", "--compute-type", dest="compute_type", choices=COMPUTE_TYPES,
                      default="auto", help="faster-whisper's precision (default auto: float32 on the CPU, "
                                           "float16 on CUDA)")
    fast.add_argument("--vad_filter", "--vad-filter", dest="vad_filter", type=_bool, default=False,
                      metavar="True|False", help="faster-whisper: transcribe only the speech Silero VAD finds "
                                                 "(tags then take a second encoder pass over the whole file)")
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
    if args.task == "tag":
        if fmt not in (None,) + TAG_FORMATS:
            parser.error(f"--output_format {args.output_format}: --task tag writes tags only (json or all: "
                         "FILE.json and FILE.tags.tsv)")
        if args.backend != "openai-whisper" or args.vad_filter:
            parser.error("--task tag runs no decoder: --backend and --vad_filter do not apply")
    elif args.backend != "faster-whisper" and (args.vad_filter or args.compute_type != "auto"):
        parser.error(f"--{'vad_filter' if args.vad_filter else 'compute_type'} needs --backend faster-whisper")
    if args.backend == "faster-whisper":  # not installed: say so before a model loads
        from .faster import installed_faster_whisper

        try:
            installed_faster_whisper()
        except TagError as e:
            parser.error(str(e))
    try:
        args.audio = expand_inputs(args.audio)
    except TagError as e:
        parser.error(str(e))
    made = []
    if args.output_dir is not None or fmt == "all":
        args.output_dir = Path(args.output_dir or ".")
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
                       f"score clips with wat-eval on a cache made by wat-extract --model {spec}, or tag files with "
                       f"--task tag: tags only, no transcript)")


def _load(args):
    """(Whisper model or None, tagger, encoder of another family or None) for the run."""
    from wat.data.heads import official

    from .tagging import Tagger, TagError, head_vocabulary, resolve_classes

    family = "whisper"
    if args.task == "tag":
        from wat.extract.encoders import family_of

        family = family_of(args.model)
    else:
        whisper_only(args.model)
    if family != "whisper" and (args.head is None or official.is_official(args.head)):
        raise TagError(f"--model {args.model}: Whisper-AT released heads for Whisper only; a {family} encoder "
                       f"needs --head, a head trained on its features (wat-train on a cache of wat-extract "
                       f"--model {args.model})")
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
    encoder = model = None
    if family != "whisper":
        from wat.extract.encoders import load_encoder

        encoder = load_encoder(args.model, device=args.device)
        check_encoder_head(encoder, head[1])
    else:
        from wat.extract.load import load_whisper

        model = load_whisper(args.model, device=args.device)
    if args.classes is not None:  # unknown names fail here, before any file
        vocab = head_vocabulary(head[1])
        args.classes = [vocab.keys[i] for i in resolve_classes(vocab, args.classes)]
    tagger = Tagger(model, head, time_res=args.time_res, top_k=args.top_k, threshold=args.threshold,
                    classes=args.classes, keep_scores=args.keep_scores,
                    allow_policy_mismatch=args.allow_policy_mismatch,
                    device=None if encoder is None else encoder.device)
    return model, tagger, encoder


def check_encoder_head(encoder, info) -> None:
    """A head for tags from another encoder family must be trained on that encoder's cache (the one
    head rule, at the encoder's default policy: the clip as it is)."""
    from wat.data.heads import Features, head_problems

    from .tagging import TagError

    bad = head_problems(info, Features(encoder.n_layers, encoder.dim, encoder.name, encoder.fingerprint,
                                       encoder.default_policy, encoder=encoder.family))
    if bad:
        raise TagError("head does not fit the model: " + "; ".join(bad))


def _decoding_options(args, model) -> dict:
    import numpy as np

    language = args.language
    if language not in (None, "en") and not model.is_multilingual:
        log.warning("%s is an English-only model; transcribing in English, not %r", args.model, language)
        language = "en"
    increment = args.temperature_increment_on_fallback
    return dict(
        task=args.task, language=language, initial_prompt=args.initial_prompt,
        temperature=tuple(np.arange(args.temperature, 1.0 + 1e-6, increment)),
        best_of=args.best_of, beam_size=args.beam_size, word_timestamps=args.word_timestamps,
        condition_on_previous_text=args.condition_on_previous_text,
        fp16=args.fp16 and str(args.device).startswith("cuda"))


def _audio(path):
    """The file's samples, or the AudioError that says why not."""
    from wat.data.audio import load_audio

    try:
        return load_audio(path)
    except AudioError as e:
        return e


def _results(args, model, tagger, encoder):
    """(path, result or the error that skipped it) per input, in input order: files go in chunks of
    --batch-size (tags only: every window batched; transcripts: files of up to 30 s batched, others
    one by one, as --backend faster-whisper and word timestamps go)."""
    from .batch import batchable, tag_only, tag_only_encoder, transcribe_batch
    from .tagging import TagError, transcribe_and_tag

    tags_only = args.task == "tag"
    fw, options = None, {}
    if not tags_only:
        options = _decoding_options(args, model)
        if args.backend == "faster-whisper":
            from .faster import load_faster, transcribe_and_tag_faster

            fw = load_faster(args.model, model, device=str(args.device), compute_type=args.compute_type)
            options["vad_filter"] = args.vad_filter
    batched = tags_only or (args.batch_size > 1 and fw is None and not args.word_timestamps)
    step = args.batch_size if batched else 1
    for at in range(0, len(args.audio), step):
        paths = args.audio[at:at + step]
        audios = [_audio(p) for p in paths]
        done: dict[int, object] = {}
        ok = [i for i, a in enumerate(audios) if not isinstance(a, Exception)]
        try:
            if tags_only and encoder is not None:
                done = dict(zip(ok, tag_only_encoder(encoder, tagger, [audios[i] for i in ok],
                                                     batch_size=args.batch_size)))
            elif tags_only:
                done = dict(zip(ok, tag_only(model, tagger, [audios[i] for i in ok], batch_size=args.batch_size,
                                             fp16=args.fp16 and str(args.device).startswith("cuda"))))
            elif batched and (short := [i for i in ok if batchable(audios[i])]):
                done = dict(zip(short, transcribe_batch(model, tagger, [audios[i] for i in short], **options)))
        except TagError as e:
            done = dict.fromkeys(ok, e)
        for i, (path, audio) in enumerate(zip(paths, audios)):
            if i not in done and not isinstance(audio, Exception):
                try:
                    done[i] = (transcribe_and_tag_faster(fw, model, tagger, audio, **options) if fw is not None
                               else transcribe_and_tag(model, tagger, audio, **options))
                except TagError as e:
                    done[i] = e
            yield path, done.get(i, audio)


def _tag(args, fmt: str, to_files: bool) -> int:
    from whisper.utils import get_writer

    model, tagger, encoder = _load(args)
    transcript = args.task != "tag"
    names = output_stems(args.audio, output_files(fmt, transcript))
    failed = 0
    bar = progress(total=len(args.audio), desc="wat-tag", unit="file")
    for (path, result), name in zip(_results(args, model, tagger, encoder), names):
        bar.update(1)
        if isinstance(result, Exception):
            print(f"wat-tag: error: skipped {result}", file=sys.stderr)
            failed += 1
            continue
        if to_files:
            try:
                write_outputs(args.output_dir, name, fmt, result, transcript)
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
    bar.close()
    if failed:
        print(f"wat-tag: error: {failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
