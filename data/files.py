"""Generic durable file writers: one atomic write, and JSON / CSV / TSV / PNG writers built on it;
and the lock a run holds on its output folder (`output_lock`).

Every output a run leaves (head checkpoints, metrics, tables, plots, shard records, manifests) is
written through `atomic_write`: the bytes go to a temporary file in the same folder, which is
fsynced, renamed onto the target (`os.replace`, atomic on POSIX), and then the folder is fsynced so
the rename itself survives a crash. A reader therefore sees the old file or the whole new one,
never a torn one, and an interrupted run leaves no half-written output behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from .errors import WatError

PARTIAL = ".partial"  # temporary files carry this in their name (cleaners and listings skip them)


def fsync_path(path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path in PATH's folder for a writer that needs a file name (torch.save,
    h5py, savefig); on success it is fsynced and renamed onto PATH and the folder is fsynced; on
    any error it is removed. `suffix` keeps an extension some writers infer the format from."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=PARTIAL + suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are ordinary files
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to PATH durably and atomically (see the module docstring)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_torch(path, obj) -> None:
    """`torch.save(obj)` to PATH atomically. A failed write (full disk, file-size limit) raises an
    OSError naming PATH: torch's zip writer turns it into a RuntimeError with no errno ("unexpected
    pos ..."), which callers that report write errors as one line would take for a bug. Writing
    through a Python file keeps the OSError, as the RuntimeError's context."""
    import torch

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__)
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None


class UnreadableFile(ValueError):
    """A file that cannot be read as what it should be: missing, truncated, foreign or refused."""


def one_line(e: BaseException) -> str:
    """An exception as one line for an `error:` message: its text with the line breaks collapsed
    (torch and h5py write paragraphs), at most 300 characters; the type name when it has no text."""
    return " ".join(str(e).split())[:300] or type(e).__name__


def load_torch(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`: a pickle that would call anything is refused, never run.
    Any failure (torch raises many types for a bad file) is an UnreadableFile with a one-line reason;
    torch's warnings about a foreign pickle are not printed (the error says it)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "WeightsUnpickler error:" in text:  # the reason sits between two paragraphs of advice
            reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
            raise UnreadableFile(f"weights_only=True cannot load it: {' '.join(reason.split())}") from None
        raise UnreadableFile(f"{type(e).__name__}: {one_line(e)}") from None


def load_torch_dict(path, error: type[Exception], what: str, map_location="cpu") -> dict:
    """`load_torch` of a file that must hold a dict (a state dict or a checkpoint): a file torch cannot
    read or that holds something else raises `error` (the caller's typed error) naming the file and `what`
    was expected, e.g. `x.pt: cannot read a head checkpoint (...)` / `x.pt: not a head checkpoint (a list)`."""
    try:
        obj = load_torch(path, map_location)
    except UnreadableFile as e:
        raise error(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: not {what} (a {type(obj).__name__})")
    return obj


def json_safe(x):
    """Strict-JSON copy of nested dicts/lists: numpy scalars become Python numbers, non-finite floats None."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path, obj, *, indent: int | None = 2) -> None:
    """Atomic strict JSON (NaN/inf written as null, numpy scalars as numbers)."""
    atomic_write(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v)


def _table(header, rows, dialect: str, **fmt) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, dialect=dialect, **fmt)
    out.writerow(header)
    out.writerows([_fmt(v) for v in r] for r in rows)
    return buf.getvalue()


def write_csv(path, header, rows, *, lineterminator: str = "\r\n") -> None:
    """Atomic CSV (csv module quoting: commas, quotes and newlines in fields round-trip).
    Floats as %.6g, None and non-finite floats as empty cells."""
    atomic_write(path, _table(header, rows, "excel", lineterminator=lineterminator))


def write_tsv(path, header, rows) -> None:
    """Atomic tab-separated table, quoted by the csv module where a field holds a tab, quote or
    newline (read it back with `csv.reader(f, dialect="excel-tab")`)."""
    atomic_write(path, _table(header, rows, "excel-tab", lineterminator="\n"))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (works without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, metadata: dict | None = None) -> None:
    """Write a PNG atomically and free the figure (resolution: rcParams savefig.dpi, which the
    figure style in wat.data.report.figures sets to 300; `metadata`: PNG text chunks)."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, bbox_inches="tight", metadata=metadata)
    finally:
        pyplot().close(fig)


class LockedError(WatError):
    """Another run holds the lock on this output."""


@contextmanager
def output_lock(path, what: str):
    """Hold an exclusive OS lock (flock, via `filelock`) on the file PATH while the block runs.

    A second holder, in another process or this one, gets `LockedError` at once (no waiting): two
    runs writing one output would both do all the work and race on every file. The OS drops the
    lock when its holder dies, even by kill -9, so a crashed run never blocks the rerun that
    resumes it; the empty lock file stays behind and is harmless. `what` names the output in the
    message (e.g. "feature cache feats.h5")."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockedError(f"{what} is being written by another run (lock {path} is held); wait for it "
                          f"to finish or write somewhere else") from None
    try:
        yield
    finally:
        lock.release()


def make_folder(folder) -> list[Path]:
    """Create FOLDER and missing parents; returns the folders this call created, innermost first
    (for `remove_bare`)."""
    folder = Path(folder)
    made = []
    p = folder
    while not p.exists():  # the folders mkdir will create, innermost first
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_bare(made: list[Path], keep: tuple[str, ...] = ()) -> None:
    """Remove the folders `make_folder` created (`made`, innermost first) if the innermost holds
    nothing but files named in `keep` (then removed too): a run that wrote nothing leaves no folder.
    A folder that existed before, or one that received any other file, is never removed."""
    if not made:
        return
    try:
        if {q.name for q in made[0].iterdir()} <= set(keep):
            for name in keep:
                (made[0] / name).unlink(missing_ok=True)
            for q in made:
                q.rmdir()  # only ever an empty folder: stops at the first that is not
    except OSError:
        pass


@contextmanager
def locked_folder(folder, lock_name: str, what: str):
    """Create the output folder FOLDER (and missing parents) and hold `output_lock` on FOLDER/lock_name
    while the block runs. If the block fails while the folder holds nothing but the lock file, the
    folders this call created are removed again: a run refused after this point (a model that does
    not load, an unreadable input) leaves no empty folder behind. A folder that existed before, or
    one that received any other file, is never removed."""
    folder = Path(folder)
    made = make_folder(folder)
    try:
        with output_lock(folder / lock_name, what):
            yield folder
    except BaseException:
        remove_bare(made, (lock_name,))
        raise
