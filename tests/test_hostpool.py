"""HostPool's one release rule: a buffer is handed out again only once nothing refers to what was
made from it (and a device copy from it has finished); `keep` bounds what is kept; pinned is a
property of the pool that falls back to ordinary memory without CUDA."""
import threading

import numpy as np
import pytest
import torch

from wat.data.hostpool import HostPool


def _addr(a) -> int:
    return a.__array_interface__["data"][0]


class FakeCopy:
    """An asynchronous copy's end as `HostPool.hold` sees it (what a CUDA event is to `to_device`),
    finished when the test says so (`done.set()`), or when first waited for (`on_wait=True`: a
    device that is done by the time anyone looks). `waiting` is set once a thread waits for it.
    `error` (set any time): the wait raises it, as a CUDA event's does once CUDA is in an error state."""

    def __init__(self, on_wait: bool = False, error: Exception | None = None):
        self.done, self.waiting, self.on_wait, self.error = threading.Event(), threading.Event(), on_wait, error

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.waiting.set()
        if self.error is not None:
            raise self.error
        if self.on_wait:
            self.done.set()
        self.done.wait()


def test_a_buffer_is_reused_once_let_go():
    pool = HostPool((4, 3), np.float16, keep=2)
    a = pool.take()
    assert a.shape == (4, 3) and a.dtype == np.float16
    where = _addr(a)
    del a
    b = pool.take()
    assert _addr(b) == where  # the same memory, not a new array
    part = pool.take(2)  # fewer rows: the first rows of another kept buffer
    assert part.shape == (2, 3) and _addr(part) != where
    with pytest.raises(ValueError, match="5 rows"):
        pool.take(5)


@pytest.mark.parametrize("hold", ["array", "numpy view", "tensor", "tensor view", "tensor's numpy"])
def test_no_reuse_while_anything_made_from_it_is_alive(hold):
    pool = HostPool((4, 3), np.float32, keep=4)
    a = pool.take()
    a[:] = 7
    kept = {"array": lambda: a, "numpy view": lambda: a[1:3], "tensor": lambda: torch.from_numpy(a),
            "tensor view": lambda: torch.from_numpy(a)[2:].t(), "tensor's numpy": lambda: torch.from_numpy(a)[1].numpy()}[hold]()
    where = _addr(a)
    del a
    for _ in range(2):  # the other kept buffers (new ones, then the same ones back), never the held one
        others = [pool.take() for _ in range(3)]
        assert where not in {_addr(o) for o in others}
        for o in others:
            o[:] = -1  # what a refill would do
        del others, o
    assert (np.asarray(kept) == 7).all()  # untouched
    del kept
    assert where in {_addr(b) for b in [pool.take() for _ in range(4)]}  # back in the pool


def test_a_buffer_let_go_in_another_thread_comes_back():
    pool = HostPool((8,), np.int8, keep=1)
    a = pool.take()
    where = _addr(a)
    box = [a]
    del a
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert _addr(pool.take()) == where


def test_a_copy_keeps_its_source_until_it_has_finished():
    """`hold`: a buffer a copy still reads is not handed out, even once its holders let go; a take
    with every kept buffer out waits for the oldest copy and gets its buffer; `settle` waits for the
    rest and lets their sources go (the end of a reader's epoch)."""
    pool = HostPool((4, 2), np.float32, keep=2)
    a = pool.take()
    where, first = _addr(a), FakeCopy()
    pool.hold(torch.from_numpy(a)[1:], first)  # what to_device keeps: the tensor the copy reads
    del a
    b = pool.take()
    where_b = _addr(b)
    assert where_b != where and not first.waiting.is_set()  # a new kept buffer, no wait
    second = FakeCopy(on_wait=True)
    pool.hold(torch.from_numpy(b), second)
    del b
    first.done.set()
    c = pool.take()  # the first copy has finished: its buffer, without waiting for the second
    assert _addr(c) == where and not second.waiting.is_set() and len(pool._copies) == 1
    d = pool.take()  # every kept buffer out: waits for the second copy, then gets its buffer
    assert second.waiting.is_set() and _addr(d) == where_b
    pool.hold(d, third := FakeCopy(on_wait=True))
    del c, d
    pool.settle()
    assert third.waiting.is_set() and not pool._copies and len(pool._free) == pool._count == 2


def test_settling_never_replaces_the_error_in_flight_but_its_own_error_surfaces(caplog):
    """`settling` settles however its block ends. A wait that raises (CUDA in an error state) while the
    block's own error propagates is logged, and the block's error goes on (it used to replace it); with
    no error in flight - the block done, or a generator in it closed early - the wait's error surfaces."""
    pool = HostPool((2,), np.float32, keep=1)
    broken = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(KeyError, match="the first error"):
        with pool.settling():
            pool.hold(pool.take(), FakeCopy(error=broken))
            raise KeyError("the first error")
    assert "waiting for the device copies" in caplog.text and "illegal memory access" in caplog.text
    pool._copies.clear()

    with pytest.raises(RuntimeError, match="illegal memory access"):
        with pool.settling():
            pool.hold(pool.take(), FakeCopy(error=broken))
    pool._copies.clear()

    def reader():
        with pool.settling():
            while True:
                x = pool.take()
                pool.hold(x, FakeCopy(error=broken))
                yield x

    it = reader()
    next(it)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        it.close()


def test_waiting_for_a_copy_does_not_stall_other_threads():
    """A take waiting for a copy waits outside the pool's lock: meanwhile another thread takes a
    buffer let go of, and once the copy finishes the waiting take gets the copied buffer."""
    pool = HostPool((3,), np.int16, keep=2)
    a, b = pool.take(), pool.take()
    where_a, where_b = _addr(a), _addr(b)
    copy, got = FakeCopy(), []
    pool.hold(a, copy)
    del a
    waiter = threading.Thread(target=lambda: got.append(_addr(pool.take())))
    waiter.start()
    try:
        assert copy.waiting.wait(timeout=600)  # a hang guard, not a timing: set as soon as the take waits
        assert pool._lock.acquire(blocking=False), "a take holds the pool's lock while it waits for a copy"
        pool._lock.release()
        del b
        mine = pool.take()  # this thread's take of the free buffer goes ahead of the wait
        assert _addr(mine) == where_b and waiter.is_alive()
    finally:
        copy.done.set()
        waiter.join()
    assert got == [where_a]


def test_keep_bounds_what_is_kept():
    pool = HostPool((2, 2), np.float64, keep=2)
    held = [pool.take() for _ in range(3)]  # the third is an ordinary array: two are kept
    assert pool.capacity() == 2 * 2 * 2 * 8 and pool._count == 2
    kept_addrs = {_addr(h) for h in held[:2]}
    del held
    again = [pool.take() for _ in range(3)]
    assert {_addr(a) for a in again[:2]} == kept_addrs and _addr(again[2]) not in kept_addrs
    del again
    pool.resize(1)  # free ones beyond the new bound are dropped
    assert pool._count == 1 and len(pool._free) == 1
    pool.resize(0)
    a = pool.take()
    del a
    assert pool._count == 0 and not pool._free  # nothing kept: a plain array, freed as usual


def test_pinned_falls_back_to_ordinary_memory_without_cuda(monkeypatch):
    """The CUDA path's fallback: pinned=True on a machine without CUDA is the same pool in ordinary
    memory, its `to_device` a plain `.to` (no event, no copy kept), the same release rule."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pool = HostPool((3, 5), np.float16, keep=2, pinned=True)
    assert pool.pinned is False
    x = torch.from_numpy(pool.take())
    assert not x.is_pinned() and x.dtype == torch.float16
    assert pool.to_device(x, "cpu") is x and not pool._copies
    where = x.data_ptr()
    del x
    assert torch.from_numpy(pool.take()).data_ptr() == where


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_buffers_are_page_locked_and_kept_while_copied():
    pool = HostPool((64, 1024), np.float16, keep=1, pinned=True)
    assert pool.pinned
    x = torch.from_numpy(pool.take())
    assert x.is_pinned()
    x.fill_(3)
    where = x.data_ptr()
    y = pool.to_device(x, "cuda")
    del x  # the copy may still run: the pool holds its source until it has finished
    z = torch.from_numpy(pool.take())
    z.fill_(0)  # waited for the copy, then refilled (or a new buffer while the copy ran)
    assert (y == 3).all().item()
    del z
    torch.cuda.synchronize()
    assert torch.from_numpy(pool.take()).data_ptr() == where
