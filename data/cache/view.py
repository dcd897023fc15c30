"""The dask view of a cache field (`dask_view`): one dask array over the shards, chunks aligned with
shards and HDF5 chunks, each read checked against the shard's checksums."""
from __future__ import annotations

import os

import numpy as np

from .handles import handle
from .integrity import check_layer_block
from .layout import row_scale
from .read import Cache, open_cache

_DASK_TASK_BYTES = 128 << 20  # stored bytes a dask_view task reads: big enough to amortise a task


class _ShardField:
    """Array-like over one shard's dataset for dask: pickles as a path, opens lazily per process.
    `check`: every read is checked against the shard's per-layer checksums (`check_layer_block`)."""

    def __init__(self, path, field, shape, dtype, check: bool = False):
        self.path, self.field, self.shape = str(path), field, tuple(shape)
        self.dtype, self.ndim = np.dtype(dtype), len(shape)
        self.check = check

    def __getitem__(self, key):
        dset = handle(self.path)[self.field]
        block = dset[key]
        if self.check:
            key = key if isinstance(key, tuple) else (key,)
            key += (slice(None),) * (len(self.shape) - len(key))
            if block.size:
                # the rows and layers read, as one span each (any index: their bounds), every channel
                # (what a checksum covers); re-read only when the key was not that block itself
                (r0, r1), (l0, l1) = (_bounds(k, n) for k, n in zip(key[:2], self.shape[:2]))
                plain = all(isinstance(k, slice) and k.indices(n)[2] == 1 for k, n in zip(key, self.shape))
                whole = block if plain and block.shape == (r1 - r0, l1 - l0, self.shape[2]) else dset[r0:r1, l0:l1]
                check_layer_block(self.path, slice(r0, r1), slice(l0, l1), whole)
        return block

    def __dask_tokenize__(self):
        return (self.path, self.field, self.shape, os.stat(self.path).st_mtime_ns, self.check)


def _bounds(key, n: int) -> tuple[int, int]:
    """(first, last + 1) of the positions a numpy index of one axis of length n selects."""
    idx = np.atleast_1d(np.arange(n)[key])
    return int(idx.min()), int(idx.max()) + 1


def dask_view(cache_or_path, field: str = "mean"):
    """The field as one dask array (f16; int8 storage dequantised per shard), chunks aligned with
    shards and HDF5 chunks."""
    import dask.array as da

    cache = cache_or_path if isinstance(cache_or_path, Cache) else open_cache(cache_or_path)
    # chunks may read one layer of a row, which its row checksum cannot vouch for: with per-layer
    # checksums each read is checked on its own (one layer's bytes), else every row of the field is
    # checked first, once per process (a no-op when this process has already read it all)
    check = cache.layer_checkable(field)
    if not check:
        cache.verify_field(field)
    per_row = cache.shape(field)[1:]
    parts = []
    for s, (path, start, stop) in enumerate(cache.shards):
        n = stop - start
        hdf5 = cache.dataset(s, field).chunks or (n,) + per_row
        hdf5_rows = hdf5[0]
        # the HDF5 chunk's layer extent (1 for `mean`): slicing one layer then reads only that layer
        block = (hdf5[1],) + per_row[1:]
        # ~_DASK_TASK_BYTES stored bytes per task (int8: 1 byte a value), a whole number of HDF5 chunks
        rows = max(hdf5_rows, (_DASK_TASK_BYTES // (cache.stored_dtype.itemsize * int(np.prod(block))))
                   // hdf5_rows * hdf5_rows)
        src = _ShardField(path, field, (n,) + per_row, cache.stored_dtype, check and not cache.is_verified(s, field))
        part = da.from_array(src, chunks=(min(rows, n),) + block, lock=False, asarray=True,
                             meta=np.empty((0,) * len(src.shape), src.dtype))
        if cache.meta.storage == "int8":  # elementwise: slicing a layer still reads only that layer
            # = cache.dequantize (f16(q) * f16(scale), one rounding), elementwise over dask chunks
            scale = row_scale(field, cache.scales(field)[s]).astype(np.float16).astype(np.float32)
            part = (part.astype(np.float32) * scale).astype(np.float16)
        parts.append(part)
    return da.concatenate(parts, axis=0)
