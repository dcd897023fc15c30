"""Random access to a cache as torch tensors, for training (`FeatureStore`); the dask view is `view.py`.

`FeatureStore` keeps the whole field in one tensor when it fits the memory budget (loaded once,
shard by shard, sequential reads) and otherwise streams. Streaming plans the epoch first: shards
and blocks of rows visited in a seeded random order, rows shuffled within a window of several
blocks (the shuffle buffer), batches cut from that order. Reader threads then copy each batch's
rows with plain `os.preadv` calls straight from the shard files into a batch buffer (one copy
per row, no HDF5 call per row, adjacent rows in one call; the GIL is released while they copy),
while a prefetch thread asks the kernel to read the current and the next window ahead, block by
block (`POSIX_FADV_WILLNEED`: sequential disk reads, no copy to user space). Batch buffers come
from `wat.data.hostpool.HostPool`s (a buffer is refilled once nothing refers to the batch made
from it; pinned for a GPU store), kept by the store from one epoch to the next: a fresh 100 MB
buffer costs a page fault per page, which from the page cache cost more than the copy itself
(BENCHMARKS.md).

Fields whose rows are not stored whole (`mean`: HDF5 chunks of 256 rows of one layer, so that
probing reads one layer) stream by window instead (`_stream_windows`): a row read alone there
costs every chunk it touches. Whole blocks (aligned to the chunks) are copied from the file and
transposed into rows, a window of `window_blocks` blocks is held in memory while its batches are
gathered from it, and a loader thread reads the next. The randomness given up, in both streaming
paths: rows are shuffled within a window (whole rows: `buffer_blocks` blocks of `block_bytes`;
`mean`: that many blocks, fewer when two windows do not fit the memory budget, at least 2), and
shards and the blocks within them come in a random order; not over the whole epoch. At large width
(32 x 1280 f16, 80 KB a row: blocks of up to 768 rows) a `mean` window is up to 6144 clips by
default, 1536 at the least (int8: twice). Random access (`get`) to such rows reads them through h5py.

The reader threads only copy stored bytes: int8 rows stay int8 (half the bytes of f16) until the
store's device, where `values` turns them into numbers in the dtype the caller computes in (f16 by
default, f32 for the trainer: one pass, no f16 intermediate). Every path checks a shard's rows, as
stored, against their checksums the first time this process reads them (`Cache.check_rows`).

Memory: `memory_budget` bounds the cache data the store holds: the resident field (in memory), or
in streaming the batch buffers, stored and (CPU store) converted: those being read, the one handed
to the caller and the one it held before, at least 3 batches whatever the budget; streaming by
window: two windows and one block of staging, at least 5 blocks whatever the budget, and 3
batches. Batch buffers are kept between epochs (those of other batch sizes too while all fit the
budget beside the resident field; windows are not kept); a resident CPU store's batches come from
such buffers too (3 batches, beyond the field when it fills the budget). It does not bound what
the caller computes from a batch (activations kept for autograd, the model and optimiser; the
trainer's step augments the batch it is handed in place, which is safe: a batch buffer is refilled
only once nothing references it, and a batch is a copy of its rows, never a view of the resident
field or of a window).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..hostpool import HostPool
from .handles import raw_fd
from .layout import layer_chunk_offsets, row_offsets
from .read import Cache, open_cache, read_rows

_IOV_MAX = 1024  # iovecs per preadv call (Linux UIO_MAXIOV)
# output bytes an int8 -> float conversion handles per call on a CPU (one thread, scratch timing):
# 4 MB rows (32x25x1280 f32) 36 ms a batch of 48 one by one vs 41-92 ms several per call; 200 KB
# rows (8x25x256) 0.34 ms 16 per call vs 0.71 ms one by one
_CONVERT_BYTES = 4 << 20
_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8}
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}  # poolable outputs


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
    """Random access to `features` or `mean` as torch tensors on `device`: f16 by default (int8
    storage is dequantised there, as `Cache.read` does), or any float dtype (`values`)."""

    def __init__(self, cache, field: str = "features", *, memory_budget: int | None = None, device="cpu",
                 block_bytes: int = 64 << 20, buffer_blocks: int = 8, read_threads: int = 2):
        self.cache: Cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.field = field
        self.device = torch.device(device)
        full = self.cache.shape(field)
        self.shape = tuple(full[1:])
        self.stored = self.cache.stored_dtype
        row_bytes = self.stored.itemsize * int(np.prod(self.shape))
        if memory_budget is None:
            if self.device.type == "cuda":
                memory_budget = torch.cuda.mem_get_info(self.device)[0] // 2
            else:
                memory_budget = available_memory() // 2
        self.memory_budget = memory_budget
        self.in_memory = row_bytes * len(self.cache) <= memory_budget
        self.row_bytes = row_bytes
        self.row_values = int(np.prod(self.shape))
        self.block_rows = max(1, block_bytes // row_bytes)
        self.buffer_blocks = max(1, buffer_blocks)
        self.read_threads = max(1, read_threads)
        self._layouts: dict[int, tuple[int, np.ndarray] | None] = {}
        self._chunk_layouts: dict[int, tuple[int, np.ndarray, int] | None] = {}
        self._pin = torch.cuda.is_available()  # a pinned resident field / `get` rows: async host-to-device copies
        # batch buffers, kept between epochs (`_pools_for`): (shape, dtype) -> HostPool
        self._pools: dict[tuple, HostPool] = {}
        self._pools_lock = threading.Lock()
        self._scale = self._row_shard = None
        if self.stored == np.int8:  # [S, L, D] scales and each row's shard, on the device
            self._scale = torch.from_numpy(self.cache.scales(field)).to(self.device, torch.float16)
            self._row_shard = torch.from_numpy(self.cache.shard_of(np.arange(len(self.cache)))).to(self.device)
        # integrity: each shard's rows are checked (as stored, before dequantising) against their
        # checksums the first time this process reads them (`Cache.check_rows`); a corrupt clip
        # raises CorruptCacheError. The reader threads share the bookkeeping: `_lock`.
        self._verified = {s for s in range(len(self.cache.shards)) if self.cache.is_verified(s, field)}
        self._checked: dict[int, np.ndarray] = {}  # shard -> rows checked so far (streaming)
        self._lock = threading.Lock()
        self._data = self._load() if self.in_memory else None

    def __len__(self) -> int:
        return len(self.cache)

    def _check(self, s: int, rows, block: np.ndarray) -> None:
        """Check stored rows `block` of shard s unless this process has checked the whole shard;
        `rows`: their local row numbers (an array, or the first of len(block) consecutive rows)."""
        if s in self._verified:
            return
        self.cache.check_rows(s, self.field, rows, block)
        _, start, stop = self.cache.shards[s]
        with self._lock:
            if s in self._verified:
                return
            seen = self._checked.setdefault(s, np.zeros(stop - start, bool))
            if isinstance(rows, np.ndarray):
                seen[rows] = True
            else:
                seen[rows:rows + len(block)] = True
            if seen.all():
                self._verified.add(s)
                self.cache.mark_verified(s, self.field)
                del self._checked[s]

    def _load(self) -> torch.Tensor:
        on_cpu = self.device.type == "cpu"
        shape = (len(self.cache),) + self.shape
        dtype = _TORCH[self.stored]
        if on_cpu:  # pinned when a GPU may consume it: faster, async host-to-device copies
            out = torch.empty(shape, dtype=dtype, pin_memory=self._pin)
        else:  # stage block by block: the host never holds the whole field
            out = torch.empty(shape, dtype=dtype, device=self.device)
            stage = torch.empty((self.block_rows,) + self.shape, dtype=dtype, pin_memory=True)
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

    def values(self, q: torch.Tensor, idx: np.ndarray, dtype: torch.dtype | None = torch.float16,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows `idx` (`q`, on the device) -> numbers in `dtype` there (into `out` if given);
        None: as stored. int8 -> f16 is `Cache.dequantize` (f16(q) * f16(scale), one rounding);
        int8 -> f32 is the same product unrounded (exact in f32: 8 x 11 significant bits), so it
        rounds to those f16 values. fp16 rows are converted (or passed through for f16)."""
        if dtype is None:
            return q
        if self._scale is None:
            return q.to(dtype) if out is None else out.copy_(q)
        scale = self._scale[self._row_shard[torch.from_numpy(idx).to(self.device)]]  # [B, L, D]
        if self.field == "features":
            scale = scale[:, :, None, :]
        scale = scale.to(dtype)  # the f16 scales' values; same-dtype mul_ is the fast kernel
        x = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out
        if x.device.type != "cpu":
            return x.copy_(q).mul_(scale)
        # on a CPU, ~_CONVERT_BYTES of output per call: still in the CPU cache for the multiply (one
        # row at large width), and few calls when rows are small
        k = max(1, _CONVERT_BYTES // max(1, x.element_size() * int(np.prod(x.shape[1:]))))
        for a in range(0, len(x), k):
            x[a:a + k].copy_(q[a:a + k]).mul_(scale[a:a + k])
        return x

    def get(self, indices, dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
        """Rows `indices` (any order, repeats allowed) in `dtype` on the device (`values`)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if self.in_memory:
            # index_select: several times faster than advanced indexing for f16 rows on CPU
            q = self._data.index_select(0, torch.from_numpy(idx).to(self._data.device))
        else:
            if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
                raise IndexError(f"index out of range for a cache of {len(self)} clips")
            q = self._fill(idx)
        return self.values(q.to(self.device, non_blocking=True), idx, dtype)

    def iter_batches(self, indices, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     dtype: torch.dtype | None = torch.float16):
        """Yield (idx, tensor) batches covering `indices` exactly (repeats kept as repeats), in
        `dtype` on the device (`values`; None: the stored rows as they are)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a cache of {len(self)} clips")
        rng = np.random.default_rng(seed)
        if self.in_memory:
            yield from self._resident(rng.permutation(idx) if shuffle else idx, batch_size, dtype)
            return
        if not all(self._layout(s) is not None for s in range(len(self.cache.shards))):
            yield from self._stream_windows(idx, batch_size, shuffle, rng, dtype)
            return
        yield from self._stream(idx, batch_size, shuffle, rng, dtype)

    def _converts(self, dtype) -> bool:
        """Whether batches in `dtype` are converted on the host, into kept buffers (a CPU store)."""
        return self.device.type == "cpu" and dtype in _NUMPY and dtype != _TORCH[self.stored]

    def _resident(self, order: np.ndarray, batch_size: int, dtype):
        """Batches of the resident field in `order`: what `get` returns, but on a CPU store
        gathered and converted into kept buffers (reused once the caller lets go, as streaming's):
        fresh ones cost a page fault per page, which made resident epochs several times slower
        than streamed ones at large width (BENCHMARKS.md)."""
        if self.device.type != "cpu":  # the device's caching allocator reuses memory already
            for a in range(0, len(order), batch_size):
                b = order[a:a + batch_size]
                yield b, self.get(b, dtype)
            return
        shape = (batch_size,) + self.shape
        convert = self._converts(dtype)
        # the batch being made, the one handed to the caller and the one it held before
        pools = self._pools_for(shape, 3, self.stored, *([_NUMPY[dtype]] if convert else []))
        rows, outs = pools[0], (pools[1] if convert else None)
        for a in range(0, len(order), batch_size):
            b = order[a:a + batch_size]
            q = torch.index_select(self._data, 0, torch.from_numpy(b), out=torch.from_numpy(rows.take(len(b))))
            x = self.values(q, b, dtype, torch.from_numpy(outs.take(len(b)))) if convert else self.values(q, b, dtype)
            del q
            yield b, x
            del x

    # ------------------------------------------------- streaming rows not stored whole (`mean`)

    def _chunk_layout(self, s: int) -> tuple[int, np.ndarray, int] | None:
        """(file descriptor, [row chunks, layers] chunk offsets, rows per chunk) of shard s when its
        field is stored in raw chunks of one layer (`layer_chunk_offsets`), or None: read via h5py."""
        if s not in self._chunk_layouts:
            dset = self.cache.dataset(s, self.field)
            grid = layer_chunk_offsets(dset)
            self._chunk_layouts[s] = None if grid is None else (raw_fd(str(self.cache.shards[s][0])), grid, dset.chunks[0])
        return self._chunk_layouts[s]

    def window_blocks(self, block_rows: int) -> int:
        """Blocks of `block_rows` rows per window when streaming rows not stored whole: two windows
        (the one batches are cut from, the next being read) and one block of staging within the
        memory budget, at most `buffer_blocks` (the shuffle window of whole-row streaming), and at
        least 2 whatever the budget: rows are shuffled within a window, so fewer mixes nothing."""
        blocks = self.memory_budget // max(1, block_rows * self.row_bytes)
        return int(max(2, min(self.buffer_blocks, (blocks - 1) // 2)))

    def _read_span(self, s: int, a: int, b: int, out: np.ndarray, stage: list) -> None:
        """Local rows [a, b) of shard s, whole, into `out` ([b - a, ...] as stored), then checked
        against their checksums. Raw chunks of one layer: the chunks covering the rows are copied
        with plain file reads into `stage` (one read per run of chunks adjacent in the file; the
        GIL is released), then transposed into rows. Otherwise one h5py read of the rows."""
        layout = self._chunk_layout(s)
        if layout is None:
            out[...] = self.cache.dataset(s, self.field)[a:b]
        else:
            fd, grid, c = layout
            k0, k1 = a // c, -(-b // c)
            n_layers = grid.shape[1]
            shape = (k1 - k0, n_layers, c) + self.shape[1:]  # [row chunks, layers, rows, ...]
            nbytes = self.stored.itemsize * int(np.prod(shape))
            if stage[0] is None or stage[0].nbytes < nbytes:
                stage[0] = np.empty(nbytes, np.uint8)
            raw = stage[0][:nbytes]
            chunk = nbytes // (shape[0] * n_layers)
            offsets = grid[k0:k1].reshape(-1)  # in `shape`'s order: chunk j at raw[j * chunk:]
            breaks = np.flatnonzero(np.diff(offsets) != chunk) + 1
            for run in np.split(np.arange(len(offsets)), breaks):
                _preadv_all(fd, [raw[run[0] * chunk:(run[-1] + 1) * chunk]], int(offsets[run[0]]))
            chunks = torch.from_numpy(raw.view(self.stored).reshape(shape))
            rows = torch.from_numpy(out)
            for k in range(k0, k1):
                lo, hi = max(a, k * c), min(b, (k + 1) * c)
                rows[lo - a:hi - a].copy_(chunks[k - k0, :, lo - k * c:hi - k * c].transpose(0, 1))
        self._check(s, a, out)

    def _stream_windows(self, idx, batch_size, shuffle, rng, dtype):
        """`_stream` for fields whose rows are not stored whole (`mean`: HDF5 chunks of 256 rows of
        one layer). A row read alone there costs every chunk it touches (32 chunks of 640 KB for
        one 80 KB row at large width), so whole blocks of rows are read instead, into a window
        held in memory while its batches are gathered from it (tensor indexing, as in memory); a
        loader thread reads the next window meanwhile. The order is planned as in `_stream`
        (shards, then blocks of each, in a seeded random order; rows shuffled within each window),
        with blocks aligned to the HDF5 chunks and `window_blocks` blocks per window: rows are
        shuffled within windows of that many blocks, not over the whole epoch."""
        c = (self.cache.dataset(0, self.field).chunks or (1,))[0]
        block_rows = max(c, self.block_rows // c * c)  # whole chunks: none read twice
        plan = self._plan(idx, shuffle, rng, block_rows)
        w = self.window_blocks(block_rows)
        windows, orders, places = [], [], []
        for a in range(0, len(plan), w):
            spans, pos, base = [], [], 0  # (shard, first local row, end, position in the window)
            for s, block in plan[a:a + w]:
                start = self.cache.shards[s][1]
                lo, hi = int(block[0]) - start, int(block[-1]) - start + 1
                spans.append((s, lo, hi, base))
                pos.append(block - start - lo + base)
                base += hi - lo
            part, pos = np.concatenate([r for _, r in plan[a:a + w]]), np.concatenate(pos)
            perm = rng.permutation(len(part)) if shuffle else np.arange(len(part))
            windows.append((spans, base))
            orders.append(part[perm])
            places.append(pos[perm])
        size = max((n for _, n in windows), default=0)
        buffers, stage = [None, None], [None]  # two windows, reused; the loader's staging block
        convert = self._converts(dtype)
        # batches: the one being gathered, the one handed to the caller and the one it held before
        pools = self._pools_for((batch_size,) + self.shape, 3, self.stored, *([_NUMPY[dtype]] if convert else []))
        stored, outs = pools[0], (pools[1] if convert else None)

        def load(k: int) -> torch.Tensor:
            if buffers[k % 2] is None:
                buffers[k % 2] = np.empty((size,) + self.shape, self.stored)
            win = buffers[k % 2]
            for s, a, b, base in windows[k][0]:
                self._read_span(s, a, b, win[base:base + b - a], stage)
            return torch.from_numpy(win)

        # settling: the epoch's last copies to the device waited for, their sources let go, however it ends
        with ThreadPoolExecutor(1, thread_name_prefix="wat-window") as pool, stored.settling():
            nxt = pool.submit(load, 0) if windows else None
            try:
                batch, rows, filled, done = None, None, 0, 0
                order = np.concatenate(orders) if orders else idx[:0]
                for k in range(len(windows)):
                    win = nxt.result()
                    nxt = pool.submit(load, k + 1) if k + 1 < len(windows) else None
                    place = torch.from_numpy(places[k])
                    i = 0
                    while i < len(place):
                        if batch is None:
                            rows = order[done:done + batch_size]
                            batch = torch.from_numpy(stored.take(len(rows)))
                        take = min(len(batch) - filled, len(place) - i)
                        torch.index_select(win, 0, place[i:i + take], out=batch[filled:filled + take])
                        filled, i = filled + take, i + take
                        if filled == len(batch):
                            x, batch, filled, done = batch, None, 0, done + len(rows)
                            if convert:
                                x = self.values(x, rows, dtype, torch.from_numpy(outs.take(len(rows))))
                            else:
                                x = self.values(stored.to_device(x, self.device), rows, dtype)
                            yield rows, x
                            del x
                    del win
            finally:
                if nxt is not None:
                    nxt.cancel()

    def _plan(self, idx: np.ndarray, shuffle: bool, rng, block_rows: int | None = None) -> list[tuple[int, np.ndarray]]:
        """(shard, sorted global indices) per block of `block_rows` (default `self.block_rows`)
        rows, in visiting order."""
        block_rows = block_rows or self.block_rows
        shard = self.cache.shard_of(idx)
        shards = np.unique(shard)
        if shuffle:
            shards = rng.permutation(shards)
        plan = []
        for s in shards:
            start = self.cache.shards[s][1]
            rows = np.sort(idx[shard == s])
            block_of = (rows - start) // block_rows
            blocks = [rows[block_of == k] for k in np.unique(block_of)]
            if shuffle:
                blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            plan += [(int(s), b) for b in blocks]
        return plan

    def _layout(self, s: int) -> tuple[int, np.ndarray] | None:
        """(file descriptor, byte offset of each row) of shard s, or None: read through h5py."""
        if s not in self._layouts:
            offsets = row_offsets(self.cache.dataset(s, self.field))  # opens (and checks) via the cache
            self._layouts[s] = None if offsets is None else (raw_fd(str(self.cache.shards[s][0])), offsets)
        return self._layouts[s]

    def _fill(self, idx: np.ndarray, rows_out: np.ndarray | None = None) -> torch.Tensor:
        """Stored rows `idx` (any order) into `rows_out` (a host array of len(idx) rows) or a new
        host tensor: one copy per row. Rows of shards not yet checked in this process are checked
        against their checksums here, as stored."""
        if rows_out is None:
            out = torch.empty((len(idx),) + self.shape, dtype=_TORCH[self.stored], pin_memory=self._pin)
            rows_out = out.numpy()
        else:
            out = torch.from_numpy(rows_out)
        dest = rows_out.reshape(len(idx), -1).view(np.uint8)
        shard = self.cache.shard_of(idx)
        for s in np.unique(shard):
            s = int(s)
            where = np.flatnonzero(shard == s)
            local = idx[where] - self.cache.shards[s][1]
            layout = self._layout(s)
            if layout is None:
                uniq, inverse = np.unique(local, return_inverse=True)
                dest[where] = read_rows(self.cache.dataset(s, self.field), uniq)[inverse] \
                    .reshape(len(where), -1).view(np.uint8)
            else:
                fd, offsets = layout
                order = np.argsort(local, kind="stable")
                pos = offsets[local[order]]
                # runs of rows that follow each other in the file: one preadv each
                breaks = np.flatnonzero(np.diff(pos) != self.row_bytes) + 1
                for run in np.split(np.arange(len(order)), breaks):
                    for a in range(0, len(run), _IOV_MAX):
                        part = run[a:a + _IOV_MAX]
                        _preadv_all(fd, [dest[j] for j in where[order[part]]], int(pos[part[0]]))
            if s not in self._verified:
                self._check(s, local, rows_out[where])
        return out

    def _advise(self, block: tuple[int, np.ndarray]) -> None:
        """Ask the kernel to start reading one block's rows into the page cache (readahead)."""
        s, rows = block
        layout = self._layout(s)
        if layout is not None:
            fd, offsets = layout
            pos = offsets[rows - self.cache.shards[s][1]]
            os.posix_fadvise(fd, int(pos.min()), int(pos.max() - pos.min()) + self.row_bytes, os.POSIX_FADV_WILLNEED)

    def _pools_for(self, shape: tuple, keep: int, *dtypes) -> list[HostPool]:
        """The batch buffers of `shape` in each of `dtypes` (an epoch's stored and converted
        batches; `HostPool`s of `keep` buffers, pinned when the store's device is a GPU: its batches
        are copied there), kept by the store from one epoch to the next: fresh ones every epoch cost
        a page fault (and zeroing) per page again, measured 1.3-1.5x slower warm epochs
        (BENCHMARKS.md). Pools of other shapes (another batch size) are dropped while all pools
        together would hold more than the memory budget beside the resident field (or than these alone)."""
        resident = self.row_bytes * len(self) if self.in_memory else 0
        pinned = self.device.type == "cuda"
        with self._pools_lock:
            keys = [(tuple(shape), np.dtype(d)) for d in dtypes]
            pools = [self._pools.pop(k, None) or HostPool(shape, d, keep, pinned=pinned) for k, d in zip(keys, dtypes)]
            for pool in pools:
                pool.resize(keep)
            need = sum(p.capacity() for p in pools)
            limit = max(self.memory_budget - resident, need)
            for other in list(self._pools):  # oldest first
                if need + sum(p.capacity() for p in self._pools.values()) <= limit:
                    break
                del self._pools[other]
            self._pools.update(zip(keys, pools))  # last: the most recently used
            return pools

    def _stream(self, idx, batch_size, shuffle, rng, dtype):
        plan = self._plan(idx, shuffle, rng)
        w = self.buffer_blocks
        windows = [plan[a:a + w] for a in range(0, len(plan), w)]
        parts = [np.concatenate([b for _, b in win]) for win in windows]
        order = np.concatenate([rng.permutation(p) if shuffle else p for p in parts]) if parts else idx[:0]
        # the batch holding a window's first row lets the prefetcher advise one more window
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        enters = {int(a) // batch_size for a in starts[1:]}
        # A CPU store converts in the reader threads, into reused buffers: in parallel, beside the
        # caller's step. Elsewhere the caller's thread converts on the device after the copy there.
        shape = (batch_size,) + self.shape
        convert = self._converts(dtype)
        # batches held at once: `depth` being read, the one handed to the caller and the one it
        # held before (still referenced while the next is asked for): depth + 2 within the budget
        batch_bytes = batch_size * self.row_bytes + (batch_size * self.row_values * dtype.itemsize if convert else 0)
        depth = int(max(1, min(2 * self.read_threads, self.memory_budget // max(1, batch_bytes) - 2)))
        pools = self._pools_for(shape, depth + 2, self.stored, *([_NUMPY[dtype]] if convert else []))
        buffers, outs = pools[0], (pools[1] if convert else None)
        ahead, stop = threading.Semaphore(2), threading.Event()  # windows advised, not yet entered

        def prefetch():
            # block by block, in file order within a block, at most the current and the next window:
            # the kernel reads them sequentially while the reader threads copy rows of the current one
            for win in windows:
                while not ahead.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                for block in win:
                    if stop.is_set():
                        return
                    self._advise(block)

        def read(k: int, buf, out):
            if k in enters:
                ahead.release()
            rows = order[k * batch_size:(k + 1) * batch_size]
            q = self._fill(rows, buf[:len(rows)])
            return rows, (self.values(q, rows, dtype, torch.from_numpy(out[:len(rows)])) if convert else q)

        n = -(-len(order) // batch_size)
        pending: deque = deque()
        advisor = threading.Thread(target=prefetch, daemon=True, name="wat-readahead")
        advisor.start()
        # settling: the epoch's last copies to the device waited for, their sources let go, however it ends
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="wat-reader") as pool, buffers.settling():
            try:
                for k in range(n):
                    while len(pending) < depth and k + len(pending) < n:
                        pending.append(pool.submit(read, k + len(pending), buffers.take(), outs and outs.take()))
                    rows, x = pending.popleft().result()
                    if not convert:
                        x = self.values(buffers.to_device(x, self.device), rows, dtype)
                    yield rows, x
                    del x
            finally:
                stop.set()
                for f in pending:  # the consumer stopped early: drop what was not started
                    f.cancel()
                advisor.join()


def _preadv_all(fd: int, buffers: list, offset: int) -> None:
    """os.preadv until every buffer is full (a read may return short)."""
    views = [memoryview(b) for b in buffers]
    while views:
        n = os.preadv(fd, views, offset)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {sum(v.nbytes for v in views)} bytes at {offset}")
        offset += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
