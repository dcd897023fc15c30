"""Speech with reference transcripts: the LibriSpeech layout or a `path,text` CSV.

LibriSpeech: `ROOT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` with lines `SPEAKER-CHAPTER-UTT TEXT`
next to `SPEAKER-CHAPTER-UTT.flac` (any folder depth works: every `*.trans.txt` under ROOT is read;
two audio files of one utterance, `X.wav` and `X.flac`, are refused).
CSV: a headed file with columns `path` (relative to the CSV's folder, or absolute) and `text`.

Rows that cannot be used (a transcript line without audio, audio without a transcript line, an
empty transcript, a malformed line, a duplicate id) are listed in `Speech.problems` with the reason;
only input with no usable utterance at all raises `SpeechError`. Audio is not decoded here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wat.data.datasets import AUDIO_EXTS, DatasetError, read_csv_rows, read_text, text_lines
from wat.data.errors import WatError


class SpeechError(WatError, ValueError):
    """Speech input that cannot be read at all (missing folder or CSV, nothing usable)."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str
    text: str  # the reference transcript, as written in the input


@dataclass
class Speech:
    name: str                        # "librispeech" | "csv"
    utterances: list[Utterance]      # sorted by id, ids unique
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (id or row, path, reason)


def load_speech(source, encoding: str | None = None) -> Speech:
    """A LibriSpeech-layout folder or a `path,text` CSV file. Transcripts and the CSV are read as
    UTF-8, or `encoding` (`wat.data.datasets.read_text`: invalid bytes are an error naming the line)."""
    source = Path(source)
    if source.is_dir():
        speech = _librispeech(source, encoding)
    elif source.is_file():
        speech = _csv(source, encoding)
    else:
        raise SpeechError(f"speech input {source} does not exist")
    if not speech.utterances:
        reasons = sorted({r.split(":")[0] for _, _, r in speech.problems})
        raise SpeechError(f"no usable utterance in {source}"
                          + (f" ({len(speech.problems)} rows skipped: {', '.join(reasons)})" if reasons
                             else " (no *.trans.txt transcripts found)" if source.is_dir() else ""))
    return speech


def _finish(name: str, rows: list[Utterance], problems) -> Speech:
    seen, out = set(), []
    for u in rows:
        if u.id in seen:
            problems.append((u.id, u.path, "duplicate id"))
            continue
        seen.add(u.id)
        out.append(u)
    out.sort(key=lambda u: u.id)
    return Speech(name, out, problems)


def _librispeech(root: Path, encoding: str | None = None) -> Speech:
    rows, problems, transcribed = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        transcripts = sorted(n for n in filenames if n.endswith(".trans.txt"))
        audio: dict[str, Path] = {}
        for n in sorted(filenames):
            uid, ext = os.path.splitext(n)
            if ext.lower() not in AUDIO_EXTS or n.startswith("."):
                continue
            if uid in audio and transcripts:  # which file the transcript line means would be a guess
                raise SpeechError(f"two audio files for utterance {uid}: {audio[uid]} and {folder / n} (keep one)")
            audio[uid] = folder / n
        for name in transcripts:
            tpath = folder / name
            try:
                lines = text_lines(read_text(tpath, encoding))
            except DatasetError as e:
                raise SpeechError(str(e)) from None
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{tpath.name}:{lineno}"
                uid, _, text = line.strip().partition(" ")
                text = text.strip()
                transcribed.add((folder, uid))
                if uid not in audio:
                    problems.append((uid, str(folder / f"{uid}.flac"), f"no audio: for {where}"))
                elif not text:
                    problems.append((uid, str(audio[uid]), f"empty transcript: {where}"))
                else:
                    rows.append(Utterance(uid, str(audio[uid]), text))
        if transcripts:
            for uid, path in audio.items():
                if (folder, uid) not in transcribed:
                    problems.append((uid, str(path), "no transcript: not in the folder's *.trans.txt"))
    return _finish("librispeech", rows, problems)


def _csv(path: Path, encoding: str | None = None) -> Speech:
    try:
        rows, bad = read_csv_rows(path, required=("path", "text"), encoding=encoding)
    except DatasetError as e:
        raise SpeechError(str(e)) from None
    out, problems = [], [(where, "", reason) for where, reason in bad]
    for where, row in rows:
        text, rel = (row.get("text") or "").strip(), (row.get("path") or "").strip()
        audio = Path(rel).expanduser()
        audio = audio if audio.is_absolute() else path.parent / audio
        if not rel:
            problems.append((where, "", "malformed: empty path"))
        elif not audio.is_file():
            problems.append((where, str(audio), "no audio: file not found"))
        elif not text:
            problems.append((where, str(audio), "empty transcript"))
        else:
            out.append(Utterance(audio.stem, str(audio), text))
    return _finish("csv", out, problems)
