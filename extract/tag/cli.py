"""wat-tag: transcribe audio files and tag their sounds in the same encoder passes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tqdm
from whisper.utils import format_timestamp

from wat.data.audio import AudioError
from wat.extract.cli import MODEL_HELP
from wat.extract.load import WhisperLoadError, load_whisper
from wat.data.cliargs import add_device, positive_int, parse_args
from wat.data.heads import HeadError, load_head

from .grid import MIN_RES
from .tagging import TagError, check_head, head_vocabulary, resolve_classes, transcribe_and_tag

FORMATS = ("json", "text", "srt")


def _tag_line(tags) -> str:
    return ", ".join(f"{name} {p:.2f}" for name, p in tags)


def format_json(path, result) -> str:
    """One line per file: {"file", "text", "segments", "language", "audio_tags"}."""
    return json.dumps({"file": str(path), **result}, ensure_ascii=False)


def format_text(path, result) -> str:
    lines = [f"== {path} ({result['language']})"]
    for s in result["segments"]:
        lines.append(f"[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text'].strip()}")
    lines.append("-- audio tags")
    for w in result["audio_tags"]:
        lines.append(f"[{format_timestamp(w['start'])} --> {format_timestamp(w['end'])}] "
                     f"{_tag_line(w['tags']) or '-'}")
    return "\n".join(lines) + "\n"


def format_srt(path, result) -> str:
    """Transcript cues and one `[tags]` cue per window with tags, in time order."""
    cues = [(s["start"], 0, s["end"], s["text"].strip()) for s in result["segments"] if s["text"].strip()]
    cues += [(w["start"], 1, w["end"], f"[{_tag_line(w['tags'])}]") for w in result["audio_tags"] if w["tags"]]
    blocks = []
    for i, (start, _, end, text) in enumerate(sorted(cues), 1):
        stamp = f"{format_timestamp(start, True, ',')} --> {format_timestamp(end, True, ',')}"
        blocks.append(f"{i}\n{stamp}\n{text}\n")
    return "\n".join(blocks)


WRITERS = {"json": format_json, "text": format_text, "srt": format_srt}


def _resolution(text: str) -> float:
    value = float(text)
    if not value >= MIN_RES:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_RES} seconds")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be a probability in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wat-tag",
        description="Whisper transcript plus audio-event tags per time window, from the same encoder "
                    "passes (tags add only the head's cost). Undecodable files are reported and skipped.")
    p.add_argument("audio", nargs="+",
                   help="audio files: wav, flac, ogg, mp3, m4a, ... (libsndfile, else PyAV; no ffmpeg binary needed)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--head", required=True, help="head checkpoint: wat-train output or an official Whisper-AT head")
    p.add_argument("--time-res", type=_resolution, default=10.0, help="tag window length in seconds (default 10)")
    p.add_argument("--top-k", type=positive_int, default=5, help="tags per window (default 5)")
    p.add_argument("--threshold", type=_probability, help="keep tags with probability >= P")
    p.add_argument("--classes", help="comma-separated class names or keys to report, e.g. Laughter,Music")
    p.add_argument("--language", help="spoken language code; default: detected (multilingual models)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="json: one JSON object per file per line; text: readable; srt: subtitles with tag cues")
    p.add_argument("--output-dir", type=Path, help="write FILE_STEM.{json,txt,srt} there instead of stdout")
    add_device(p)
    p.add_argument("--allow-policy-mismatch", action="store_true",
                   help="use a head trained on features of another input policy (e.g. trim)")
    return p


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        model = load_whisper(args.model, device=args.device)
        head = load_head(args.head)
        check_head(model, head[1], allow_policy_mismatch=args.allow_policy_mismatch)
        if args.classes is not None:  # unknown names fail here, before any file
            vocab = head_vocabulary(head[1])
            args.classes = [vocab.keys[i] for i in resolve_classes(vocab, args.classes)]
    except (WhisperLoadError, HeadError, TagError) as e:
        print(f"wat-tag: {e}", file=sys.stderr)
        return 2
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    options = dict(fp16=args.device.startswith("cuda"), language=args.language)
    extension = {"json": "json", "text": "txt", "srt": "srt"}[args.format]
    failed = 0
    for path in tqdm.tqdm(args.audio, unit="file", disable=None):
        try:
            result = transcribe_and_tag(model, head, path, time_res=args.time_res, top_k=args.top_k,
                                        threshold=args.threshold, classes=args.classes,
                                        allow_policy_mismatch=args.allow_policy_mismatch, **options)
        except (AudioError, TagError) as e:
            print(f"wat-tag: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        text = WRITERS[args.format](path, result)
        if args.output_dir is None:
            print(text.rstrip("\n") + ("\n" if args.format == "json" else "\n\n"), end="", flush=True)
        else:
            (args.output_dir / f"{Path(path).stem}.{extension}").write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    if failed:
        print(f"wat-tag: {failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
