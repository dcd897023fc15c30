"""Checksums: CRC-32 per clip row (and per clip and layer of `mean`), computed by a few threads,
the non-finite check of a block being written, and the one-layer check of a `mean` read; and the
CRC-32 of every other field and of the attributes (`seal` when a file is written, `check_field`
when a reader reads a field, `field_problems` for verify)."""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import handles
from .handles import handle, verify_key
from .meta import MEAN_LAYER_CRC, CorruptCacheError


def row_crc32(block: np.ndarray) -> np.ndarray:
    """CRC-32 (zlib) of each row of `block`, over its bytes as stored (f16 or int8, C order): uint32 [n].
    Any other dtype is taken as values to be stored as f16."""
    return gather_crc32(row_crc32_async(block))


_PIECE = 16 << 20  # bytes of rows per task of the checksum threads
_threads: ThreadPoolExecutor | None = None


def _forget_threads() -> None:
    # a forked child (decode workers, multiprocessing) has none of its parent's threads: a pool
    # copied from the parent would take tasks and never run them
    global _threads
    _threads = None


os.register_at_fork(after_in_child=_forget_threads)


def _row_tasks(fn, rows: np.ndarray) -> list[tuple[int, object]]:
    """(first row, future of fn(those rows)) per piece of `rows` [n, row bytes...], run by a few
    threads: zlib and numpy release the GIL on large buffers, so the pieces run beside each other
    and beside the caller (e.g. its HDF5 write)."""
    global _threads
    if _threads is None:
        _threads = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="wat-rows")
    step = max(1, _PIECE // max(1, rows.itemsize * rows[0].size)) if len(rows) else 1
    return [(a, _threads.submit(fn, rows[a:a + step])) for a in range(0, len(rows), step)]


def row_crc32_async(block: np.ndarray) -> list:
    """`row_crc32` as futures (see `_row_tasks`)."""
    block = np.ascontiguousarray(block, dtype=np.int8 if block.dtype == np.int8 else "<f2")
    return _row_tasks(lambda part: [zlib.crc32(r) for r in part], block.reshape(len(block), -1))


def gather_crc32(tasks: list) -> np.ndarray:
    return np.array([c for _, f in tasks for c in f.result()], np.uint32)


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the rows of `x` that hold a NaN or an inf. f16 rows (what the extractor writes) are
    checked on their bits by the row threads (`_nonfinite_bits`); other types with numpy."""
    n, bad = len(x), []
    if x.dtype != np.float16:
        for a in range(0, n, 256):
            part = x[a:a + 256]
            bad.extend(a + np.flatnonzero(~np.isfinite(part).reshape(len(part), -1).all(axis=1)))
        return np.asarray(bad, np.int64)
    bits = np.ascontiguousarray(x).view(np.uint16).reshape(n, -1)
    return np.asarray([a + i for a, f in _row_tasks(_nonfinite_bits, bits) for i in f.result()], np.int64)


def _nonfinite_bits(bits: np.ndarray, piece: int = 1 << 20) -> list[int]:
    """Rows of f16 bit patterns [n, m] with an exponent of all ones (inf or NaN), ~`piece` bytes at a
    time through a small buffer: ~10x numpy's f16 isfinite, which converts every value to f32 first."""
    step = max(1, piece // max(1, bits.itemsize * bits.shape[1]))
    tmp = np.empty((min(step, len(bits)), bits.shape[1]), np.uint16)
    bad = []
    for a in range(0, len(bits), step):
        part = tmp[:len(bits[a:a + step])]
        np.bitwise_and(bits[a:a + step], 0x7FFF, out=part)
        bad.extend((a + np.flatnonzero(part.max(axis=1) >= 0x7C00)).tolist())
    return bad


def layer_crc32(block: np.ndarray) -> np.ndarray:
    """uint32 [n, L]: `row_crc32` of each clip's layers of a `mean` block [n, L, D]."""
    n, L = block.shape[:2]
    return row_crc32(block.reshape(n * L, -1)).reshape(n, L)


def check_layer_block(path, rows: slice, layers: slice, block: np.ndarray) -> None:
    """Raise CorruptCacheError when stored `mean` rows `rows`, layers `layers` (every channel) of
    shard `path`, read as `block` [rows, layers, D], differ from their per-layer checksums. A layer
    whose every row this process has checked is not checked again (`handles.VERIFIED`, as `verify_field`)."""
    where, _, mtime, size = verify_key(path, "")
    keys = [(where, f"mean:{l}", mtime, size) for l in range(layers.start, layers.stop)]
    if all(k in handles.VERIFIED for k in keys):
        return
    f = handle(str(path))
    crc = f[MEAN_LAYER_CRC]
    whole = (where, f"field:{MEAN_LAYER_CRC}", mtime, size)
    if whole not in handles.VERIFIED:  # the checksums themselves, once per process (N x L uint32)
        check_field(path, f, MEAN_LAYER_CRC)
        handles.VERIFIED.add(whole)
    bad = np.flatnonzero((layer_crc32(block) != crc[rows, layers]).any(axis=1))
    if len(bad):
        try:
            ids = f["ids"].asstr()[rows][bad]
        except (OSError, ValueError, UnicodeDecodeError):  # the ids are damaged too: name rows
            ids = [f"row {rows.start + int(i)}" for i in bad]
        raise CorruptCacheError(corrupt_message(path, "mean", ids, True))
    if rows.start == 0 and rows.stop >= crc.shape[0]:
        handles.VERIFIED.update(keys)


def corrupt_message(path, field: str, ids, checksummed: bool) -> str:
    shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
    how = "fail their checksum" if checksummed else "are all zero or non-finite (a shard without checksums)"
    return (f"{path}: {len(ids)} clip(s) {how} in {field} ({shown}): the cache is corrupt; `wat-cache verify` "
            f"lists every problem, and rerunning the wat-extract command that made it rebuilds the bad shards")


def corrupt_rows(block: np.ndarray, crc: np.ndarray | None) -> np.ndarray:
    """Rows of `block` that are not what extraction wrote: CRC-32 differs from `crc`, or, for a
    shard without checksums (crc None), rows that are all zero or non-finite."""
    if crc is None:
        flat = block.reshape(len(block), -1)
        return np.flatnonzero(~np.isfinite(flat).all(1) | ~flat.any(1))
    return np.flatnonzero(row_crc32(block) != crc)


# ---------------------------------------------------------------- every other field (see the package doc)

FIELD_CRC = "field_crc32"          # attribute: JSON {dataset: CRC-32 of its bytes, ATTRS: of the other attributes}
ATTRS = "@attrs"                   # FIELD_CRC's key for the file's attributes
SHARD_CHECKS = "shard_field_crc32"  # index dataset: each shard's FIELD_CRC attribute as built ("" = none)
SEALED_SKIP = ("features", "mean")  # their rows carry their own CRC-32s (read in part, never whole)
FIX = ("the file changed since it was written (bit rot, a bad copy, an edit): `wat-cache verify` lists every "
       "problem, and rerunning the wat-extract command that made the cache rebuilds damaged shards and the index")


def field_bytes(values) -> bytes:
    """The bytes a field's CRC-32 covers: numbers as stored (C order), strings (variable-length
    utf-8, read undecoded as bytes) each followed by a NUL. A reader hashes what it read, so a flipped
    byte in a string is a checksum failure, never a decode error."""
    a = np.asarray(values)
    if a.dtype == object:
        return b"".join((v if isinstance(v, bytes) else str(v).encode("utf-8")) + b"\0" for v in a.reshape(-1))
    return np.ascontiguousarray(a).tobytes()


def raw(dset) -> np.ndarray:
    """All of a dataset as stored (variable-length strings as bytes, not decoded)."""
    return dset[()] if dset.shape == () else dset[...]


def _attr_bytes(attrs) -> bytes:
    out = []
    for k in sorted(attrs.keys()):
        if k == FIELD_CRC:
            continue
        v = attrs[k]
        if isinstance(v, str):
            b = b"s" + v.encode("utf-8")
        elif isinstance(v, bytes):
            b = b"b" + v
        else:
            a = np.asarray(v)
            b = b"n" + a.dtype.str.encode() + str(a.shape).encode() + field_bytes(a)
        out.append(k.encode("utf-8") + b"\0" + b + b"\0")
    return b"".join(out)


def seal(f) -> str:
    """Record the CRC-32 of every dataset of an open file being written (but `SEALED_SKIP` and
    virtual datasets) and of its attributes, as the FIELD_CRC attribute (written last: it covers the
    others). The bytes are read back from the file, as readers will see them. Returns the JSON."""
    import h5py

    crc = {}
    for name, dset in f.items():
        if name in SEALED_SKIP or not isinstance(dset, h5py.Dataset) or dset.is_virtual:
            continue
        crc[name] = zlib.crc32(field_bytes(raw(dset)))
    crc[ATTRS] = zlib.crc32(_attr_bytes(f.attrs))
    text = json.dumps(crc, sort_keys=True)
    f.attrs[FIELD_CRC] = text
    return text


def recorded(f) -> dict | None:
    """The file's FIELD_CRC record, or None for a file written before field checksums (or whose
    record is unreadable: then every field is reported, `field_problems`)."""
    text = f.attrs.get(FIELD_CRC)
    if text is None:
        return None
    try:
        crc = json.loads(text.decode() if isinstance(text, bytes) else str(text))
        return crc if isinstance(crc, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def field_problem(path, f, name: str, values=None) -> str | None:
    """Why field `name` of the open file `f` (at `path`) is not what was written, or None: its bytes
    (`values` as read, else read here) against the file's FIELD_CRC; ATTRS: the attributes. Files
    without the record: None (nothing to check against)."""
    crc = recorded(f)
    if crc is None:
        return None
    if name not in crc:
        return f"{path}: {name}: its checksum is missing from the file's record ({FIELD_CRC}): {FIX}"
    got = zlib.crc32(_attr_bytes(f.attrs) if name == ATTRS else field_bytes(raw(f[name]) if values is None else values))
    if got != crc[name]:
        return f"{path}: its attributes fail their checksum: {FIX}" if name == ATTRS else \
            f"{path}: {name} fails its checksum: {FIX}"
    return None


def check_field(path, f, name: str, values=None) -> None:
    """`field_problem` as a CorruptCacheError (what readers call on each small field they read)."""
    problem = field_problem(path, f, name, values)
    if problem:
        raise CorruptCacheError(problem)


def field_problems(path, f) -> dict[str, str]:
    """{field: why} for every field of the open file `f` whose bytes (or attributes: ATTRS) differ
    from its FIELD_CRC record, and datasets the record lacks or lists but the file does not (verify)."""
    import h5py

    crc = recorded(f)
    if crc is None:
        return {}
    names = set(crc) | {n for n, d in f.items() if n not in SEALED_SKIP and isinstance(d, h5py.Dataset)
                        and not d.is_virtual}
    out = {}
    for name in sorted(names):
        if name != ATTRS and name not in f:
            out[name] = f"{path}: {name}: recorded in {FIELD_CRC} but missing from the file: {FIX}"
            continue
        try:
            problem = field_problem(path, f, name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # the bytes cannot even be read
            problem = f"{path}: {name}: unreadable ({' '.join(str(e).split())[:200]}): {FIX}"
        if problem:
            out[name] = problem
    return out
