"""Where values lie in a shard file: shard names, the ids digest, chunking, int8 quantisation (the
stored form of a value) and the byte offsets of raw rows and chunks for readers that bypass HDF5."""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

from .meta import CacheMeta


def shard_path(shard_dir, i: int) -> Path:
    return Path(shard_dir) / f"shard-{i:05d}.h5"


def shard_digest(ids, meta: CacheMeta) -> str:
    h = hashlib.sha256(meta.digest().encode())
    for s in ids:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()


def features_chunks(shape) -> tuple:
    n, l, t, d = shape
    k = max(1, min(4, (1 << 20) // max(1, l * t * d * 2)))  # ~<=1 MiB chunks: one record for large
    return (max(1, min(k, n)), l, t, d)


def int8_scale(x: np.ndarray, axes: tuple, block: int = 64) -> np.ndarray:
    """max |x| / 127 over `axes` (rows first), per remaining (layer, channel), in row blocks."""
    amax = None
    for a in range(0, len(x), block):
        m = np.abs(np.asarray(x[a:a + block], np.float32)).max(axis=axes)
        amax = m if amax is None else np.maximum(amax, m)
    return (amax / 127).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, block: int = 64) -> np.ndarray:
    """round(x / scale) clipped to +-127 as int8; `scale` broadcasts against one row of x."""
    inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)  # an all-zero channel stays 0
    q = np.empty(x.shape, np.int8)
    for a in range(0, len(x), block):
        v = np.asarray(x[a:a + block], np.float32) * inv
        q[a:a + block] = np.clip(np.rint(v, out=v), -127, 127, out=v)
    return q


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 rows -> f16 values f16(q) * f16(scale), rounded once (`scale` broadcasts against a row).
    The product of two f16 values is exact in f32, so this equals torch's f16 multiply that the
    readers run on the device: every reader returns the same bits."""
    return (q.astype(np.float32) * scale.astype(np.float16).astype(np.float32)).astype(np.float16)


def row_scale(field: str, scale: np.ndarray) -> np.ndarray:
    # [L, D] -> broadcastable against one row: features rows are [L, T, D], mean rows [L, D]
    return scale[:, None, :] if field == "features" else scale


def _chunk_grid(dset: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in its file of each chunk of `dset`, as an array over the chunk grid, when every
    chunk lies raw there (no filter, little-endian, all allocated, full size: HDF5 stores edge
    chunks whole when unfiltered); else None."""
    if dset.chunks is None or dset.dtype.byteorder == ">" or dset.id.get_create_plist().get_nfilters():
        return None
    chunks = dset.chunks
    grid = np.full([-(-n // k) for n, k in zip(dset.shape, chunks)], -1, np.int64)
    size = dset.dtype.itemsize * int(np.prod(chunks))
    if hasattr(dset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
        def visit(info):
            if info.byte_offset is not None and info.size == size:
                grid[tuple(o // k for o, k in zip(info.chunk_offset, chunks))] = info.byte_offset
        dset.id.chunk_iter(visit)
    else:
        for at in np.ndindex(*grid.shape):
            info = dset.id.get_chunk_info_by_coord(tuple(i * k for i, k in zip(at, chunks)))
            if info.byte_offset is not None and info.size == size:
                grid[at] = info.byte_offset
    return None if (grid < 0).any() else grid


def row_offsets(dset: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in its file of each row of `dset` when every row lies whole and raw in the file
    (no filter, little-endian, chunks spanning whole rows, all allocated); else None. Readers then
    copy rows with plain file reads straight into their batch buffers, one copy per row."""
    shape, chunks = dset.shape, dset.chunks
    if dset.dtype.byteorder == ">" or dset.id.get_create_plist().get_nfilters():
        return None
    row_bytes = dset.dtype.itemsize * int(np.prod(shape[1:]))
    if chunks is None:
        start = dset.id.get_offset()
        return None if start is None else start + np.arange(shape[0], dtype=np.int64) * row_bytes
    if tuple(chunks[1:]) != tuple(shape[1:]):
        return None
    grid = _chunk_grid(dset)
    if grid is None:
        return None
    k = chunks[0]
    return (grid.reshape(-1)[:, None] + np.arange(k, dtype=np.int64) * row_bytes).reshape(-1)[:shape[0]]


def layer_chunk_offsets(dset: h5py.Dataset) -> np.ndarray | None:
    """[row chunks, layers] byte offsets in its file of the chunks of a dataset chunked one layer
    at a time (`mean`: chunks (k, 1, D)), each holding k rows of one layer, when all lie raw in the
    file (`_chunk_grid`); else None. Readers of whole blocks of rows then copy whole chunks with
    plain file reads instead of going through the HDF5 library."""
    chunks = dset.chunks
    if chunks is None or len(chunks) < 2 or chunks[1] != 1 or tuple(chunks[2:]) != tuple(dset.shape[2:]):
        return None
    grid = _chunk_grid(dset)
    return None if grid is None else grid.reshape(grid.shape[:2])
