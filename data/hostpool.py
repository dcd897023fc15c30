"""Reusable host buffers: `HostPool`, the one pool of the project's large host arrays (the cache
reader's batches, wat-extract's shard arrays and its pinned staging for device -> host copies).

Why reuse: a fresh array costs a page fault (the kernel zeroes the page) per 4 KiB on its first
write; at these sizes (batches of 10-200 MB, shards of GBs) that cost more than the copies that
fill them (BENCHMARKS.md), and page-locking (pinning) memory for a GPU is a costly system call.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import contextmanager
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class CopyEvent(Protocol):
    """The end of an asynchronous copy that reads a pool buffer, as `HostPool.hold` waits for it:
    `torch.cuda.Event` is one (recorded after the copy); tests pass their own."""

    def query(self) -> bool:  # has the copy finished? (never waits)
        ...

    def synchronize(self) -> None:  # wait until it has
        ...


class HostPool:
    """Host arrays of one `shape` and `dtype`, handed out again once nothing uses them.

    THE release rule (there is no other): a buffer is free again when the last array or tensor
    made from what `take` returned is gone - numpy views, `torch.from_numpy` tensors, views of
    those, a thread's local - and a copy to a device that `to_device` started has finished (the
    pool keeps its source until then). Nothing is given back by hand: a holder keeps a buffer by
    keeping a reference and returns it by dropping the last one (`del x`). So a buffer is never
    refilled while anything can still see it, and a caller may keep what it was handed as long as
    it likes (the pool then makes new ones). The pool learns of the last reference going away from
    the buffer's lease (`_Lease.__del__`, CPython's deallocation: immediate, in whatever thread).
    A reader settles (`settling`) when its epoch ends (or it is closed, or fails), so that the
    sources of its last copies are let go then, not at the next `take`.

    Threads: `take`, `hold`, `settle` and letting go may happen in any threads at once. No wait for
    a copy happens under the pool's lock (a thread waiting for one never stalls another thread's
    `take` of a free buffer, nor a lease coming back).

    keep: at most `keep` buffers are kept (free and handed out together, `capacity()` bytes);
    while that many are handed out, `take` returns new arrays that are freed as usual.
    pinned: page-locked memory (`torch.empty(..., pin_memory=True)`: asynchronous copies to and
    from a CUDA device) when CUDA is available; without CUDA ordinary memory, the same pool with
    the same rule (`self.pinned` says which it got).
    """

    def __init__(self, shape: tuple, dtype, keep: int, *, pinned: bool = False):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.keep = max(0, int(keep))
        self.pinned = bool(pinned) and _cuda_available()
        self._free: deque[np.ndarray] = deque()  # kept buffers nothing refers to; leases append from any thread
        self._count = 0  # kept buffers: free + handed out
        self._copies: deque = deque()  # (CopyEvent, source) of running copies (`hold`), oldest first
        self._lock = threading.Lock()

    def capacity(self) -> int:
        """Bytes this pool may keep."""
        return self.keep * self.dtype.itemsize * int(np.prod(self.shape))

    def resize(self, keep: int) -> None:
        """Keep at most `keep` buffers from now on (free ones beyond it are dropped; handed-out ones
        beyond it are dropped when they come back)."""
        with self._lock:
            self.keep = max(0, int(keep))
            self._trim()

    def take(self, rows: int | None = None) -> np.ndarray:
        """A buffer's first `rows` rows (all `shape[0]` by default), contents undefined: a free
        kept buffer, else a new one (kept when fewer than `keep` are). When every kept buffer is
        out and copies from them still run, waits for the oldest (which frees its buffer unless the
        caller kept it too): that beats pinning new memory."""
        rows = self.shape[0] if rows is None else int(rows)
        if not 0 <= rows <= self.shape[0]:
            raise ValueError(f"{rows} rows asked of a pool of {self.shape[0]}-row buffers")
        while True:
            with self._lock:
                self._drop_finished()
                self._trim()
                if self._free:  # the most recently used: likeliest still in the CPU cache
                    return np.asarray(_Lease(self, self._free.pop()))[:rows]
                keep = self._count < self.keep
                if keep:
                    self._count += 1  # the new buffer's place, taken before leaving the lock
                if keep or not self._copies:
                    break
                event = self._copies[0][0]  # the oldest copy: its source is likeliest a kept buffer
            # outside the lock (other threads take and let go meanwhile), then look again: the
            # buffer may have gone to another thread, or the caller still holds it
            event.synchronize()
        # allocated outside the lock: pinning is a costly system call
        try:
            buf = self._new()
        except BaseException:
            if keep:
                with self._lock:
                    self._count -= 1
            raise
        if not keep:  # `keep` handed out: an ordinary array, freed when its holders let go
            return buf[:rows]
        # a view of the lease, not of `buf`: every array and tensor made from it keeps the lease alive
        return np.asarray(_Lease(self, buf))[:rows]

    def to_device(self, x, device):
        """Tensor `x` (made from one of this pool's buffers) on `device`. From pinned memory to a
        CUDA device the copy is asynchronous and the pool keeps `x` until the device has read it
        (`hold`); otherwise `x.to(device)` (`x` itself when it is there already)."""
        import torch

        device = torch.device(device)
        if not (self.pinned and device.type == "cuda"):
            return x.to(device)
        y = x.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(y.device))
        self.hold(x, event)
        return y

    def hold(self, x, event: CopyEvent) -> None:
        """Keep `x` (made from one of this pool's buffers) alive until `event` has finished: an
        asynchronous copy reads it (the release rule). Let go of at a later `take` or `settle`."""
        with self._lock:
            self._copies.append((event, x))

    def settle(self) -> None:
        """Wait for the copies `hold` keeps sources for, and let go of those sources (their buffers
        come back unless something else holds them). For the end of a reader's epoch: otherwise
        the pool would hold its last batches' sources until its next `take`. The wait is for
        copies already queued, outside the lock."""
        while True:
            with self._lock:
                self._drop_finished()
                if not self._copies:
                    return
                event = self._copies[0][0]
            event.synchronize()

    @contextmanager
    def settling(self):
        """`settle` once the block ends, however it ends (a reader's epoch: finished, closed early or
        failed). An error of `settle` surfaces, except while the block's own error propagates: then it
        is logged and the block's error goes on. A CUDA error in the block leaves CUDA in an error state
        in which waiting for a copy raises too, and that second error would replace the first one, the
        one that says what went wrong. A generator closed early (GeneratorExit) is no error: a settle
        error surfaces then, from its `close`."""
        try:
            yield
        except GeneratorExit:
            self.settle()
            raise
        except BaseException:
            try:
                self.settle()
            except Exception:
                log.warning("waiting for the device copies of a pool's buffers failed too", exc_info=True)
            raise
        self.settle()

    def _drop_finished(self) -> None:
        """Let go of the sources of finished copies, oldest first (under the lock; dropping one may
        drop a lease: its buffer lands in _free). `query` does not wait."""
        while self._copies and self._copies[0][0].query():
            self._copies.popleft()

    def _trim(self) -> None:
        while self._count > self.keep and self._free:
            self._free.popleft()
            self._count -= 1

    def _new(self) -> np.ndarray:
        if not self.pinned:
            return np.empty(self.shape, self.dtype)
        import torch

        dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype
        return torch.empty(self.shape, dtype=dtype, pin_memory=True).numpy()  # its base keeps the memory

    def _back(self, buf: np.ndarray) -> None:
        self._free.append(buf)  # deque.append is atomic: no lock (a lease may die while it is held)


class _Lease:
    """What a kept buffer is handed out as (through the numpy array interface): every array and
    tensor made from it refers to it, so it is deallocated when the last of them is, and then
    returns the buffer to its pool."""

    def __init__(self, pool: HostPool, buf: np.ndarray):
        self.pool, self.buf = pool, buf
        self.__array_interface__ = buf.__array_interface__

    def __del__(self):
        self.pool._back(self.buf)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
