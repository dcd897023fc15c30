"""Dataset adapters: ESC-50, AudioSet segment CSVs, AST-style JSON, class folders, generic CSV.

Each adapter turns a manifest plus audio on disk into a `Dataset`: clips sorted by id with label
indices into one `Vocabulary`. Rows that cannot be used (no audio, unknown label, malformed line,
duplicate id) are skipped and listed in `Dataset.problems`; only a dataset with no usable clip at
all, or a manifest that cannot be read, raises `DatasetError`. Audio is not decoded here.

Invariant: when `multilabel` is False every clip has exactly one label.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .labels import LabelError, Vocabulary, audioset_vocabulary
from .naming import output_stems
from .errors import WatError

AUDIO_EXTS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".webm",
              ".aif", ".aiff", ".au", ".wma", ".mka"}
AUDIOSET_SPLITS = {
    "as20k": ("balanced_train_segments.csv",),
    "as2m": ("balanced_train_segments.csv", "unbalanced_train_segments.csv"),
    "aseval": ("eval_segments.csv",),
}
DATASET_KINDS = ("esc50", *AUDIOSET_SPLITS, "json", "folder", "csv")
MID = re.compile(r"^/[a-z]/[0-9a-z_]+$")
ESC50_FOLDS = 5


class DatasetError(WatError, ValueError):
    """A dataset that cannot be loaded at all (missing manifest, nothing usable)."""


@dataclass(frozen=True)
class Clip:
    id: str
    path: str
    labels: tuple[int, ...] = ()
    fold: int = -1
    offset: float = 0.0  # seconds within the file
    duration: float | None = None  # None = to the end of the file


@dataclass
class Dataset:
    name: str
    clips: list[Clip]  # sorted by id, ids unique
    vocab: Vocabulary
    multilabel: bool
    clip_seconds: float  # nominal length the extractor pads/trims to
    problems: list[tuple[str, str]] = field(default_factory=list)  # (row or id, reason)

    def __len__(self) -> int:
        return len(self.clips)


def problem_counts(problems) -> Counter:
    """Problems grouped by the part of the reason before its first ':' ("no audio", "unknown label"...)."""
    return Counter(reason.split(":")[0] for _, reason in problems)


def load_dataset(kind: str, root, manifest=None, *, clip_seconds: float | None = None,
                 encoding: str | None = None) -> Dataset:
    """Load a dataset of `kind` (one of `DATASET_KINDS`) from `root`; `manifest` overrides where its list lives.

    esc50: root/meta/esc50.csv (or `manifest`) and root/audio/. as20k/as2m/aseval: the official segment
    CSVs in `manifest` (a file or a folder; default root), audio found anywhere under root by YTID.
    json: an AST-style manifest (`manifest`, or root when it is a file). folder: root/CLASS/*.wav.
    csv: a `path,labels[,fold]` file (`manifest`, or root when it is a file).
    Manifests are read as UTF-8 (`read_text`), or as `encoding` when given.
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{kind}: {root} does not exist")
    if kind == "esc50":
        ds = _esc50(root, Path(manifest) if manifest else root / "meta" / "esc50.csv", encoding)
    elif kind in AUDIOSET_SPLITS:
        ds = _audioset(kind, root, Path(manifest) if manifest else root, encoding)
    elif kind == "folder":
        if manifest:
            raise DatasetError("folder: takes no manifest (classes are the sub-folders of root)")
        ds = _folder(root)
    else:
        path = Path(manifest) if manifest else root
        if not path.is_file():
            raise DatasetError(f"{kind}: manifest {path} is not a file")
        ds = _json(path, encoding) if kind == "json" else _csv(path, encoding)
    if clip_seconds is not None:
        ds.clip_seconds = float(clip_seconds)
    if not ds.clips:
        counts = ", ".join(f"{n} {r}" for r, n in problem_counts(ds.problems).most_common()) or "no rows"
        raise DatasetError(f"{kind}: no usable clips under {root} ({counts})")
    return ds


def _finish(name, rows, vocab, multilabel, clip_seconds, problems) -> Dataset:
    """Drop duplicate ids (first one wins), sort by id."""
    clips, seen = [], set()
    for clip in rows:
        if clip.id in seen:
            problems.append((clip.id, f"duplicate id: {clip.path}"))
            continue
        seen.add(clip.id)
        clips.append(clip)
    clips.sort(key=lambda c: c.id)
    return Dataset(name, clips, vocab, multilabel, clip_seconds, problems)


def _esc50(root: Path, meta: Path, encoding: str | None = None) -> Dataset:
    rows, problems = read_csv_rows(meta, required=("filename", "fold", "target", "category"), encoding=encoding)
    categories: dict[int, str] = {}
    parsed = []
    for where, row in rows:
        try:
            target, fold = int(row["target"]), int(row["fold"])
            name, category = row["filename"].strip(), row["category"].strip()
            if not name or not category or target < 0:
                raise ValueError("empty filename/category or negative target")
            if not 1 <= fold <= ESC50_FOLDS:  # the protocol's 5 folds; anything else is a broken row
                raise ValueError(f"fold {fold} outside 1..{ESC50_FOLDS}")
        except ValueError as e:
            problems.append((where, f"malformed: {e}"))
            continue
        if categories.setdefault(target, category) != category:
            problems.append((where, f"malformed: target {target} is {categories[target]!r}, not {category!r}"))
            continue
        parsed.append((where, name, target, fold))
    vocab = Vocabulary.from_names(categories[t] for t in sorted(categories))
    index = {t: vocab.index(categories[t]) for t in categories}
    clips = []
    for where, name, target, fold in parsed:
        path = root / "audio" / name
        if not path.is_file():
            problems.append((where, f"no audio: {path}"))
            continue
        clips.append(Clip(Path(name).stem, str(path), (index[target],), fold))
    return _finish("esc50", clips, vocab, False, 5.0, problems)


def _audioset(kind: str, root: Path, manifest: Path, encoding: str | None = None) -> Dataset:
    if manifest.is_dir():
        files = [manifest / name for name in AUDIOSET_SPLITS[kind]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"{kind}: segment CSV not found: {', '.join(missing)}")
    elif manifest.is_file():
        files = [manifest]
    else:
        raise DatasetError(f"{kind}: manifest {manifest} does not exist")
    vocab = audioset_vocabulary()
    audio = index_audio(root)
    problems, clips = [], []
    for file in files:
        for lineno, line in enumerate(text_lines(read_text(file, encoding)), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{file.name}:{lineno}"
            try:
                ytid, start, end, labels = parse_segment_row(line)
                labels = vocab.parse(labels)
            except (ValueError, LabelError) as e:
                kind_of = "unknown label" if isinstance(e, LabelError) else "malformed"
                problems.append((where, f"{kind_of}: {e}"))
                continue
            path = match_audio(audio, ytid, start)
            if path is None:
                problems.append((ytid, "no audio"))
                continue
            clips.append(Clip(ytid, path, labels))
    return _finish(kind, clips, vocab, True, 10.0, problems)


def parse_segment_row(line: str) -> tuple[str, float, float, str]:
    """`YTID, start, end, "mid,mid"` -> (ytid, start, end, "mid,mid"); ValueError when malformed."""
    parts = line.split(",", 3)
    if len(parts) != 4:
        raise ValueError(f"expected 4 fields, got {len(parts)}")
    ytid, labels = parts[0].strip(), parts[3].strip()
    if not ytid or any(c in ytid for c in ' "'):
        raise ValueError(f"bad YTID {ytid!r}")
    start, end = float(parts[1]), float(parts[2])
    if not 0 <= start < end:
        raise ValueError(f"bad segment {start}..{end}")
    if labels.startswith('"'):
        if len(labels) < 2 or not labels.endswith('"'):
            raise ValueError("unterminated quote")
        labels = labels[1:-1]
    if '"' in labels:
        raise ValueError("stray quote in labels")
    return ytid, start, end, labels


_NUM = r"\d+(?:\.\d+)?"
_SEGMENT_NAME = re.compile(rf"^(.{{11}})_({_NUM})(?:_({_NUM}))?$")


def index_audio(root: Path) -> dict[str, list[tuple[str, float | None]]]:
    """One walk of `root`: key -> [(path, start seconds or None)] for every audio file.

    A file named `X.ext` is indexed as X (and X[1:] when X starts with the `Y` some downloaders add);
    `YTID_start[_end].ext` (optionally `Y`-prefixed; start in seconds or milliseconds) as YTID with start.
    """
    index: dict[str, list[tuple[str, float | None]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in AUDIO_EXTS or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            index.setdefault(stem, []).append((path, None))
            if stem.startswith("Y") and len(stem) == 12:
                index.setdefault(stem[1:], []).append((path, None))
            for candidate in (stem, stem[1:]) if stem.startswith("Y") else (stem,):
                m = _SEGMENT_NAME.match(candidate)
                if m:
                    index.setdefault(m.group(1), []).append((path, float(m.group(2))))
    return index


def match_audio(index, ytid: str, start: float) -> str | None:
    """The file for segment (ytid, start): a name carrying this start, else a name carrying none."""
    found = index.get(ytid, ())
    for path, s in found:
        if s is not None and (abs(s - start) < 1e-3 or abs(s / 1000 - start) < 1e-3):
            return path
    for path, s in found:
        if s is None:
            return path
    return None


MAX_FOLD = 32767  # folds are stored as int16 in the cache (-1 = none)


def parse_fold(value) -> int:
    """A manifest's fold: an integer in 0..MAX_FOLD, or -1 for none; ValueError otherwise (the row
    is skipped as malformed, named: a fold past int16 used to fail at the end of extraction)."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"fold {value!r} is not an integer")
    fold = int(str(value).strip()) if isinstance(value, str) else int(value)
    if not -1 <= fold <= MAX_FOLD:
        raise ValueError(f"fold {fold} outside 0..{MAX_FOLD} (or -1: none)")
    return fold


def _labels_vocab(label_lists) -> Vocabulary:
    """AudioSet when at least half of the distinct labels are MIDs (the others then become "unknown
    label" problem rows: one stray "Dog" must not turn an AudioSet manifest into a custom vocabulary),
    else the sorted set of names found."""
    names = {label for labels in label_lists for label in labels}
    if names and 2 * sum(bool(MID.match(n)) for n in names) >= len(names):
        return audioset_vocabulary()
    return Vocabulary.from_names(sorted(names))


def _labelled_clips(name, entries, problems, base: Path, clip_seconds=10.0) -> Dataset:
    """entries: (where, path text, [label keys], fold) -> Dataset with a vocabulary inferred from the labels."""
    vocab = _labels_vocab(labels for _, _, labels, _ in entries)
    multilabel = vocab is audioset_vocabulary() or any(len(labels) > 1 for _, _, labels, _ in entries)
    # ids: each file's path relative to the folder all listed files share, so that a/clip0.wav and
    # b/clip0.wav are two clips by construction (a file stem would make them one)
    paths = [_manifest_path(text, base) for _, text, _, _ in entries]
    top = os.path.commonpath([os.path.abspath(p.parent) for p in paths]) if paths else ""
    clips = []
    for (where, text, labels, fold), path in zip(entries, paths):
        try:
            indices = tuple(sorted({vocab.index(label) for label in labels}))
        except LabelError as e:
            problems.append((where, f"unknown label: {e}"))
            continue
        if not multilabel and len(indices) != 1:
            problems.append((where, "no label"))
            continue
        if not path.is_file():
            problems.append((where, f"no audio: {path}"))
            continue
        clips.append(Clip(Path(os.path.relpath(os.path.abspath(path), top)).as_posix(), str(path), indices, fold))
    return _finish(name, clips, vocab, multilabel, clip_seconds, problems)


def _manifest_path(text: str, base: Path) -> Path:
    """A manifest's audio path: absolute as written, else relative to the manifest's folder."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _json(manifest: Path, encoding: str | None = None) -> Dataset:
    text = read_text(manifest, encoding)
    try:
        data = json.loads(text)["data"]
        if not isinstance(data, list):
            raise TypeError("'data' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"json: cannot read {manifest}: {type(e).__name__}: {e}") from None
    entries, problems = [], []
    for i, item in enumerate(data):
        where = f"{manifest.name}[{i}]"
        try:
            wav, labels = item["wav"], item.get("labels", "")
            if not isinstance(wav, str) or not wav.strip():
                raise ValueError("'wav' is not a path")
            labels = labels.split(",") if isinstance(labels, str) else [str(x) for x in labels]
            fold = parse_fold(item.get("fold", -1))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            problems.append((where, f"malformed: {type(e).__name__}: {e}"))
            continue
        entries.append((where, wav.strip(), [x.strip() for x in labels if x.strip()], fold))
    return _labelled_clips("json", entries, problems, manifest.parent)


def _csv(manifest: Path, encoding: str | None = None) -> Dataset:
    rows, problems = read_csv_rows(manifest, required=("path", "labels"), encoding=encoding)
    entries = []
    for where, row in rows:
        try:
            text = row["path"].strip()
            if not text:
                raise ValueError("empty path")
            fold = parse_fold(row["fold"]) if (row.get("fold") or "").strip() else -1
        except ValueError as e:
            problems.append((where, f"malformed: {e}"))
            continue
        labels = [x.strip() for x in re.split(r"[;,]", row["labels"] or "") if x.strip()]
        entries.append((where, text, labels, fold))
    return _labelled_clips("csv", entries, problems, manifest.parent)


ENCODING_FIX = ("give the file's encoding with --encoding (e.g. latin-1, cp1252, utf-16) or convert it "
                "to UTF-8")


def read_text(path, encoding: str | None = None) -> str:
    """A manifest's or transcript's text: strict UTF-8 (a leading byte-order mark is dropped), or
    `encoding` when given. Bytes that do not decode raise DatasetError naming the file, line and
    column: replacing them (errors="replace") merged labels such as `café` and `cafè` of a latin-1
    file into one class `caf\ufffd` without a word."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    name = encoding or "utf-8"
    try:
        return data.decode(encoding or "utf-8-sig")
    except LookupError:
        raise DatasetError(f"--encoding {encoding!r}: not an encoding Python knows") from None
    except UnicodeError as e:
        start = getattr(e, "start", 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise DatasetError(f"{path}:{line}: not valid {name} (byte 0x{data[start]:02x} at column {column}); "
                           f"{ENCODING_FIX}") from None


def text_lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only (str.splitlines also splits at form feeds, U+2028 and
    other characters a CSV field may hold)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_csv_rows(path: Path, required, encoding: str | None = None) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """A headed CSV, line by line so that one bad quote cannot swallow the rest of the file; the
    text as `read_text` decodes it."""
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found")
    lines = text_lines(read_text(path, encoding))
    if not lines:
        raise DatasetError(f"{path}: empty file")
    try:
        header = [h.strip() for h in next(csv.reader([lines[0]], strict=True))]
    except csv.Error as e:  # e.g. a field over csv.field_size_limit() (131072 characters)
        raise DatasetError(f"{path}: unreadable header line ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    rows, problems = [], []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            values = next(csv.reader([line], strict=True))
        except csv.Error as e:
            problems.append((where, f"malformed: {e}"))
            continue
        row = dict(zip(header, values))
        if len(values) > len(header) or any(c not in row for c in required):
            problems.append((where, f"malformed: {len(values)} fields for {len(header)} columns"))
            continue
        rows.append((where, row))
    return rows, problems


def _folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"folder: {root} has no class sub-folders")
    vocab = Vocabulary.from_names(classes)
    found = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for file in sorted(filenames):
                path = Path(dirpath) / file
                if path.suffix.lower() in AUDIO_EXTS and not file.startswith("."):
                    found.append((path, label))
    # ids: the path below root without its extension, kept where two files would share an id
    # (`dog/a.wav`, `dog/a.flac` -> `dog/a.wav`, `dog/a.flac`: two clips, not one dropped as a duplicate)
    ids = output_stems([p for p, _ in found], root=root, exact=True)
    clips = [Clip(clip_id, str(path), (label,)) for clip_id, (path, label) in zip(ids, found)]
    return _finish("folder", clips, vocab, False, 10.0, [])
