"""Readers over a feature cache: random access for training (`FeatureStore`) and a dask view.

`FeatureStore` keeps the whole field in one f16 tensor when it fits the memory budget (loaded once,
shard by shard, sequential reads) and otherwise streams: requested rows grouped by shard, shards and
blocks visited in a seeded random order, one h5py read per block, a background thread reading the
next block while the caller computes, and a shuffle buffer of several blocks. h5py serialises calls
behind one lock, so one reader thread is all that helps; parallel reads need processes (dask).
"""
from __future__ import annotations

import os
import queue
import threading

import numpy as np
import torch

from .cache import Cache, _handle, open_cache


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), without psutil."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FeatureStore:
    """Random access to `features` or `mean` as f16 torch tensors on `device`."""

    def __init__(self, cache, field: str = "features", *, memory_budget: int | None = None, device="cpu",
                 block_bytes: int = 64 << 20, buffer_blocks: int = 8):
        self.cache: Cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.field = field
        self.device = torch.device(device)
        full = self.cache.shape(field)
        self.shape = tuple(full[1:])
        row_bytes = 2 * int(np.prod(self.shape))
        if memory_budget is None:
            if self.device.type == "cuda":
                memory_budget = torch.cuda.mem_get_info(self.device)[0] // 2
            else:
                memory_budget = available_memory() // 2
        self.in_memory = row_bytes * len(self.cache) <= memory_budget
        self.block_rows = max(1, block_bytes // row_bytes)
        self.buffer_blocks = max(1, buffer_blocks)
        # integrity: each shard's rows are checked against their checksums the first time this
        # process reads them (`Cache.check_rows`); a corrupt clip raises CorruptCacheError
        self._verified = {s for s in range(len(self.cache.shards)) if self.cache.is_verified(s, field)}
        self._checked: dict[int, np.ndarray] = {}  # shard -> rows checked so far (streaming)
        self._data = self._load() if self.in_memory else None

    def __len__(self) -> int:
        return len(self.cache)

    def _check(self, s: int, a: int, block: np.ndarray) -> None:
        """Check rows a..a+len(block) of shard s unless this process has checked the whole shard."""
        if s in self._verified:
            return
        self.cache.check_rows(s, self.field, a, block)
        _, start, stop = self.cache.shards[s]
        seen = self._checked.setdefault(s, np.zeros(stop - start, bool))
        seen[a:a + len(block)] = True
        if seen.all():
            self._verified.add(s)
            self.cache.mark_verified(s, self.field)
            del self._checked[s]

    def _load(self) -> torch.Tensor:
        on_cpu = self.device.type == "cpu"
        shape = (len(self.cache),) + self.shape
        if on_cpu:  # pinned when a GPU may consume it: faster, async host-to-device copies
            out = torch.empty(shape, dtype=torch.float16, pin_memory=torch.cuda.is_available())
        else:  # stage block by block: the host never holds the whole field
            out = torch.empty(shape, dtype=torch.float16, device=self.device)
            stage = torch.empty((self.block_rows,) + self.shape, dtype=torch.float16, pin_memory=True)
        for s, (_, start, stop) in enumerate(self.cache.shards):
            dset = self.cache.dataset(s, self.field)
            for a in range(0, stop - start, self.block_rows):
                b = min(a + self.block_rows, stop - start)
                if on_cpu:
                    dset.read_direct(out.numpy(), np.s_[a:b], np.s_[start + a:start + b])
                    self._check(s, a, out[start + a:start + b].numpy())
                else:
                    dset.read_direct(stage.numpy(), np.s_[a:b], np.s_[:b - a])
                    self._check(s, a, stage[:b - a].numpy())
                    out[start + a:start + b].copy_(stage[:b - a])
        return out

    def get(self, indices) -> torch.Tensor:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if self.in_memory:
            # index_select: several times faster than advanced indexing for f16 rows on CPU
            return self._data.index_select(0, torch.from_numpy(idx).to(self._data.device)).to(self.device)
        return torch.from_numpy(self.cache.read(self.field, idx)).to(self.device)

    def iter_batches(self, indices, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        """Yield (idx, tensor) batches covering `indices` exactly (repeats kept as repeats)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a cache of {len(self)} clips")
        rng = np.random.default_rng(seed)
        if self.in_memory:
            order = rng.permutation(idx) if shuffle else idx
            for a in range(0, len(order), batch_size):
                b = order[a:a + batch_size]
                yield b, self.get(b)
            return
        yield from self._stream(idx, batch_size, shuffle, rng)

    def _plan(self, idx: np.ndarray, shuffle: bool, rng) -> list[tuple[int, np.ndarray]]:
        """(shard, sorted global indices) per block, in visiting order."""
        shard = self.cache.shard_of(idx)
        shards = np.unique(shard)
        if shuffle:
            shards = rng.permutation(shards)
        plan = []
        for s in shards:
            start = self.cache.shards[s][1]
            rows = np.sort(idx[shard == s])
            block_of = (rows - start) // self.block_rows
            blocks = [rows[block_of == k] for k in np.unique(block_of)]
            if shuffle:
                blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            plan += [(int(s), b) for b in blocks]
        return plan

    def _read_block(self, s: int, rows: np.ndarray) -> np.ndarray:
        start = self.cache.shards[s][1]
        a, b = int(rows[0]) - start, int(rows[-1]) - start + 1
        block = self.cache.dataset(s, self.field)[a:b]  # one read per block
        self._check(s, a, block)
        return block if b - a == len(rows) else block[rows - start - a]

    def _stream(self, idx, batch_size, shuffle, rng):
        plan = self._plan(idx, shuffle, rng)
        blocks: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():  # never block forever: the consumer may have stopped early
                try:
                    blocks.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def reader():
            try:
                for s, rows in plan:
                    if not put((rows, self._read_block(s, rows))):
                        return
                put(None)
            except BaseException as e:  # surfaced in the consumer
                put(e)

        thread = threading.Thread(target=reader, daemon=True, name="wat-block-reader")
        thread.start()
        pool_idx, pool_x, pooled, done = [], [], 0, False
        try:
            while not done:
                item = blocks.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    done = True
                else:
                    pool_idx.append(item[0]), pool_x.append(item[1])
                    pooled += len(item[0])
                if not done and len(pool_idx) < self.buffer_blocks:
                    continue
                if not pool_idx:
                    break
                # gather each batch straight from the pooled blocks: one copy per row
                i = np.concatenate(pool_idx)
                src = np.concatenate([np.full(len(b), k) for k, b in enumerate(pool_idx)])
                pos = np.concatenate([np.arange(len(b)) for b in pool_idx])
                order = rng.permutation(len(i)) if shuffle else np.arange(len(i))
                cut = len(i) if done else len(i) - len(i) % batch_size
                for a in range(0, cut, batch_size):
                    take = order[a:a + batch_size]
                    yield i[take], torch.from_numpy(_gather(pool_x, src[take], pos[take])).to(self.device)
                rest = order[cut:]
                pool_idx = [i[rest]] if len(rest) else []
                pool_x = [_gather(pool_x, src[rest], pos[rest])] if len(rest) else []
        finally:
            stop.set()
            thread.join()


def _gather(blocks: list[np.ndarray], src: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = np.empty((len(src),) + blocks[0].shape[1:], blocks[0].dtype)
    for k in np.unique(src):
        sel = np.flatnonzero(src == k)
        out[sel] = blocks[k][pos[sel]]
    return out


class _ShardField:
    """Array-like over one shard's dataset for dask: pickles as a path, opens lazily per process."""

    def __init__(self, path, field, shape):
        self.path, self.field, self.shape = str(path), field, tuple(shape)
        self.dtype, self.ndim = np.dtype(np.float16), len(shape)

    def __getitem__(self, key):
        return _handle(self.path)[self.field][key]

    def __dask_tokenize__(self):
        return (self.path, self.field, self.shape, os.stat(self.path).st_mtime_ns)


def dask_view(cache_or_path, field: str = "mean"):
    """The field as one dask array (f16), chunks aligned with shards and HDF5 chunks."""
    import dask.array as da

    cache = cache_or_path if isinstance(cache_or_path, Cache) else open_cache(cache_or_path)
    # chunks may read one layer of a row, which its checksum cannot vouch for: check every row of
    # the field once per process (a no-op when this process has already read it all)
    cache.verify_field(field)
    per_row = cache.shape(field)[1:]
    parts = []
    for s, (path, start, stop) in enumerate(cache.shards):
        n = stop - start
        hdf5 = cache.dataset(s, field).chunks or (n,) + per_row
        hdf5_rows = hdf5[0]
        # the HDF5 chunk's layer extent (1 for `mean`): slicing one layer then reads only that layer
        block = (hdf5[1],) + per_row[1:]
        # ~128 MiB per task, a whole number of HDF5 chunks
        rows = max(hdf5_rows, ((128 << 20) // (2 * int(np.prod(block)))) // hdf5_rows * hdf5_rows)
        src = _ShardField(path, field, (n,) + per_row)
        parts.append(da.from_array(src, chunks=(min(rows, n),) + block, lock=False, asarray=True,
                                   meta=np.empty((0,) * len(src.shape), np.float16)))
    return da.concatenate(parts, axis=0)
