"""Output names for commands that write files per input (wat-tag; wat-robust's folder per model):
one function, `output_stems`, that maps a list of inputs to distinct, readable output stems.

    output_stems(["a/x.wav", "b/x.wav"])            -> ["a/x", "b/x"]
    output_stems(["d/y.wav", "d/y.flac"])           -> ["y.wav", "y.flac"]
    output_stems(["A.wav", "a.wav"])                -> ["A.wav", "a.wav~2"]   (case-insensitive disks)

Rules, in order:
1. A stem is the input's path relative to the folder all inputs share (their common parent), without
   its extension: inputs in one folder give bare file stems, as whisper names its outputs; inputs
   in several folders keep their sub-folders (`a/x`, `b/x`), which a writer mirrors under its output
   folder. Sub-folders cannot collide the way flattened names do (`a/x.wav` and `a-x.wav` both
   flattened to `a-x`).
2. Where two outputs would clash, the inputs involved keep their extension (`y.wav`, `y.flac`).
3. Where they still clash (the same file given twice, `A.wav` and `a.wav`), every input involved but
   the first gets `~N`, N its position in the input list (1-based): unique by construction.

Two outputs clash when the file names they produce (stem + each of `suffixes`) are equal after
Unicode NFC normalisation and case folding: macOS and Windows disks treat `A.txt` and `a.txt`, or
a composed and a decomposed `é`, as one file. A file that would sit where another input's output
needs a folder (`x.tags` + `.tsv`... or stem `a` with suffix `` beside `a/y`) clashes too.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import PurePosixPath


def _key(name: str) -> str:
    """What a case-insensitive, normalising file system compares: NFC, case-folded."""
    return unicodedata.normalize("NFC", name).casefold()


def _relative(paths: list[str], root=None) -> list[PurePosixPath]:
    absolute = [os.path.abspath(p) for p in paths]
    if root is not None:
        top = os.path.abspath(root)
    else:
        top = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    return [PurePosixPath(*os.path.relpath(p, top).split(os.sep)) for p in absolute]


def output_stems(paths, suffixes=("",), *, root=None, exact: bool = False) -> list[str]:
    """A distinct output stem per input path (POSIX-style, may hold sub-folders; see the module
    doc). `suffixes`: what the writer appends to a stem (e.g. `(".txt", ".tags.tsv")`): names are
    distinct as the files they become. `root`: stems relative to this folder instead of the inputs'
    common parent. `exact`: names compare as strings (ids, not files: `A` and `a` differ)."""
    paths = [os.fspath(p) for p in paths]
    rel = _relative(paths, root)
    same = (lambda name: name) if exact else _key
    level = [0] * len(paths)

    def stem(i: int) -> str:
        r = rel[i]
        base = str(r.with_name(r.stem)) if level[i] == 0 and r.suffix else str(r)
        return base if level[i] < 2 else f"{base}~{i + 1}" + ("" if level[i] == 2 else f"-{level[i]}")

    for _ in range(8):  # each round moves clashing inputs up a level; level 2 clashes only with folders
        files: dict[str, list[int]] = {}
        folders: dict[str, set[int]] = {}
        for i in range(len(paths)):
            s = stem(i)
            for suffix in suffixes:
                files.setdefault(same(s + suffix), []).append(i)
            parts = s.split("/")
            for k in range(1, len(parts)):
                folders.setdefault(same("/".join(parts[:k])), set()).add(i)
        clash = set()
        for name, owners in files.items():
            owners = sorted(set(owners))
            if len(owners) > 1:  # the least renamed move up; at level >= 1 the first keeps its name
                low = min(level[j] for j in owners)
                lowest = [j for j in owners if level[j] == low]
                clash.update(lowest[1:] if low >= 1 and len(lowest) == len(owners) else lowest)
            if name in folders:
                clash.update(owners)  # a file where a folder must be: rename the file
        if not clash:
            return [stem(i) for i in range(len(paths))]
        for i in clash:
            level[i] += 1
    raise AssertionError(f"output_stems: names still clash: {[stem(i) for i in sorted(clash)]}")


def folder_name(name: str) -> str:
    """A folder name for a free-form label such as a model name (`/models/large-v1.pt` ->
    `large-v1.pt`, `org/model` -> `model`): its last path part with characters outside
    [A-Za-z0-9._+-] replaced by `_`."""
    import re

    return re.sub(r"[^A-Za-z0-9._+-]", "_", PurePosixPath(name.replace("\\", "/")).name) or "model"


def distinct_name(name: str, taken, position: int) -> str:
    """`name`, or `name~N` (N = `position`, 1-based) when a name already `taken` is the same file
    on a case-insensitive disk (rule 3 above, for outputs named one at a time, e.g. one folder per
    model as each model loads)."""
    keys = {_key(t) for t in taken}
    return name if _key(name) not in keys else f"{name}~{position}"
