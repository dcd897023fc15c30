"""Checksums: CRC-32 per clip row (and per clip and layer of `mean`), computed by a few threads,
the non-finite check of a block being written, and the one-layer check of a `mean` read."""
from __future__ import annotations

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
    bad = np.flatnonzero((layer_crc32(block) != crc[rows, layers]).any(axis=1))
    if len(bad):
        ids = f["ids"].asstr()[rows][bad]
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
