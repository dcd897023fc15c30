"""FeatureStore (in-memory and streaming) and the dask view of a cache."""
from collections import Counter

import dask
import numpy as np
import pytest
import torch

from wat.data.cache import open_cache
from wat.data.cache import dask_view
from wat.data.cache.store import FeatureStore, available_memory
from wat.data.hostpool import HostPool

from test_cache import D, L, LAYOUTS, N, T, make_meta, write_cache


@pytest.fixture(scope="module", params=list(LAYOUTS))
def cache(tmp_path_factory, request):
    """(cache, its features as every reader must return them) for each stored layout: the f16
    values, or for int8 what `Cache.read` dequantises (checked against the originals in test_cache)."""
    meta = make_meta(**LAYOUTS[request.param])
    index, _, data = write_cache(tmp_path_factory.mktemp("cache"), meta=meta, sizes=(20, 20, 10))
    c = open_cache(index)
    expect = c.read("features", np.arange(N)) if meta.storage == "int8" else data[1].astype(np.float16)
    return c, expect


def _stores(cache, field="features"):
    mem = FeatureStore(cache, field, memory_budget=1 << 30)
    # a budget below one clip forces streaming; tiny blocks give many blocks per shard
    stream = FeatureStore(cache, field, memory_budget=100, block_bytes=5 * L * T * D * 2, buffer_blocks=3)
    assert mem.in_memory and not stream.in_memory
    return mem, stream


def test_in_memory_and_streaming_agree(cache):
    c, f16 = cache
    mem, stream = _stores(c)
    assert mem.shape == stream.shape == (L, T, D) and len(mem) == len(stream) == N
    idx = [49, 0, 0, 21, 19, 20, 33]
    a, b = mem.get(idx), stream.get(idx)
    assert a.dtype == b.dtype == torch.float16
    assert torch.equal(a, b) and np.array_equal(a.numpy(), f16[idx])
    mm, ms = _stores(c, "mean")
    assert torch.equal(mm.get(idx), ms.get(idx)) and mm.shape == (L, D)


@pytest.mark.parametrize("mode", [0, 1])
def test_iter_batches_yields_each_request_exactly(cache, mode):
    c, f16 = cache
    store = _stores(c)[mode]
    rng = np.random.default_rng(1)
    requested = rng.choice(N, size=137, replace=True, p=np.linspace(1, 3, N) / np.linspace(1, 3, N).sum())
    got_idx, sizes = [], []
    for idx, x in store.iter_batches(requested, 16, shuffle=True, seed=3):
        assert isinstance(idx, np.ndarray) and x.shape == (len(idx), L, T, D)
        assert np.array_equal(x.numpy(), f16[idx])  # rows travel with their indices
        got_idx += idx.tolist()
        sizes.append(len(idx))
    assert Counter(got_idx) == Counter(requested.tolist())
    assert all(s == 16 for s in sizes[:-1]) and sum(sizes) == 137
    assert got_idx != sorted(got_idx)  # shuffled


@pytest.mark.parametrize("mode", [0, 1])
def test_iter_batches_deterministic(cache, mode):
    store = _stores(cache[0])[mode]
    req = np.arange(N).repeat(2)

    def run(seed):
        return np.concatenate([i for i, _ in store.iter_batches(req, 7, seed=seed)])
    assert np.array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))
    plain = np.concatenate([i for i, _ in store.iter_batches(np.arange(N), 7, shuffle=False)])
    assert np.array_equal(plain, np.arange(N))


def test_streaming_stops_cleanly_early(cache):
    store = _stores(cache[0])[1]
    it = store.iter_batches(np.arange(N), 4)
    next(it)
    it.close()  # the reader thread must not hang on a full queue
    assert sum(len(i) for i, _ in store.iter_batches(np.arange(N), 4)) == N


def test_default_budget_uses_available_memory(cache):
    assert available_memory() > 0
    assert FeatureStore(cache[0], "mean").in_memory  # a few KB always fits half of free RAM


def test_dask_view_matches_read(cache):
    c, _ = cache
    arr = dask_view(c, "mean")
    assert arr.shape == (N, L, D) and arr.dtype == np.float16
    assert arr.chunks[0] == (20, 20, 10)  # aligned with the shards
    assert np.array_equal(arr.compute(), c.read("mean", np.arange(N)))
    feats = dask_view(c.path, "features")
    assert np.array_equal(feats[15:25].compute(), c.read("features", np.arange(15, 25)))


def test_dask_view_with_processes(cache):
    c, _ = cache
    c.close()
    arr = dask_view(c.path, "mean")
    with dask.config.set(scheduler="processes", num_workers=2):
        total = arr.astype(np.float32).sum(axis=(1, 2)).compute()
    expect = c.read("mean", np.arange(N)).astype(np.float32).sum(axis=(1, 2))
    assert np.allclose(total, expect, rtol=1e-5)


def test_streaming_opens_each_shard_once(cache, monkeypatch):
    import wat.data.cache.handles as cache_mod

    c, _ = cache
    c.close()
    opened = []
    real = cache_mod.open_h5
    monkeypatch.setattr(cache_mod, "open_h5", lambda p: opened.append(str(p)) or real(p))
    store = _stores(c)[1]
    for _ in range(2):
        assert sum(len(i) for i, _ in store.iter_batches(np.arange(N).repeat(3), 5)) == 3 * N
    assert sorted(opened) == sorted(str(p) for p, _, _ in c.shards)  # no per-step file opens


def test_values_in_the_compute_dtype(cache):
    """Batches leave the reader as stored (int8 stays int8) and become numbers on the device: f32
    for the trainer is the dequantised product unrounded, so it rounds to `Cache.read`'s f16."""
    c, f16 = cache
    idx = np.array([3, 41, 3, 17])
    for store in _stores(c):
        stored = store.get(idx, None)
        assert stored.dtype == (torch.int8 if c.meta.storage == "int8" else torch.float16)
        x32 = store.get(idx, torch.float32)
        assert x32.dtype == torch.float32 and np.array_equal(x32.half().numpy(), f16[idx])
        for got, x in store.iter_batches(idx, 3, shuffle=False, dtype=torch.float32):
            assert x.dtype == torch.float32 and np.array_equal(x.half().numpy(), f16[got])
        if c.meta.storage == "fp16":
            assert torch.equal(x32, stored.float())


@pytest.mark.parametrize("mode", [0, 1])
def test_batches_reuse_buffers_only_when_released(cache, mode):
    """Resident or streamed: a caller that keeps every batch gets distinct, intact batches; one
    that lets each go gets the same few buffers back (a fresh large buffer per batch costs a page
    fault per page), also in the next epoch."""
    c, f16 = cache
    store = _stores(c)[mode]
    kept = list(store.iter_batches(np.arange(N), 4, dtype=None))
    assert len({x.data_ptr() for _, x in kept}) == len(kept)
    for idx, x in kept:
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])
    del kept, x  # let go: the store's buffers are free again
    ptrs = set()
    for idx, x in store.iter_batches(np.arange(N).repeat(2), 4, dtype=None):
        ptrs.add(x.data_ptr())
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])
    assert len(ptrs) <= 2 * store.read_threads + 2 < 2 * N // 4
    del x
    # the next epoch gets the same buffers back; batches a caller kept from the last one stay intact
    assert {x.data_ptr() for _, x in store.iter_batches(np.arange(N), 4, dtype=None)} <= ptrs
    held = list(store.iter_batches(np.arange(8), 4, dtype=None))
    for idx, x in store.iter_batches(np.arange(N), 4, dtype=None):
        assert x.data_ptr() not in {h.data_ptr() for _, h in held}
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])
    for idx, x in held:
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])


def test_kept_buffers_of_other_batch_sizes_stay_within_the_budget(cache):
    """Pools of other batch sizes are kept between epochs only while all fit the memory budget."""
    c, _ = cache
    row = c.stored_dtype.itemsize * L * T * D
    store = FeatureStore(c, memory_budget=32 * row, block_bytes=5 * row)
    assert not store.in_memory

    def epoch(bs):
        for _ in store.iter_batches(np.arange(N), bs, dtype=None):
            pass
        return {k[0][0]: p.capacity() // row for k, p in store._pools.items()}

    assert epoch(2) == {2: 12}  # 4 being read + 2 held: 6 batches of 2 rows
    assert epoch(3) == {2: 12, 3: 18}  # 30 rows <= 32: both kept
    assert epoch(8) == {8: 32}  # 2 being read + 2 held fill the budget alone
    assert epoch(2) == {2: 12}
    # an epoch's stored and converted (f32) buffers are kept together, beyond the budget if need be
    for _ in store.iter_batches(np.arange(N), 8, dtype=torch.float32):
        pass
    assert {(k[0][0], k[1]) for k in store._pools} == {(8, c.stored_dtype), (8, np.dtype(np.float32))}


def test_dask_view_sizes_tasks_by_stored_bytes(cache, monkeypatch):
    """A task reads ~_DASK_TASK_BYTES of stored bytes: twice the rows for int8 (1 byte a value)."""
    import wat.data.cache.view as readers

    c, _ = cache
    per_row = int(np.prod(c.shape("features")[1:]))
    hdf5_rows = c.dataset(0, "features").chunks[0]
    task = 2 * hdf5_rows * per_row * 2  # two HDF5 chunks of f16 rows
    monkeypatch.setattr(readers, "_DASK_TASK_BYTES", task)
    arr = dask_view(c, "features")
    assert arr.chunks[0][0] * per_row * c.stored_dtype.itemsize == task
    assert np.array_equal(arr[:9].compute(), c.read("features", np.arange(9)))


# ------------------------------------------------ streaming `mean` (rows not stored whole)

ML, MD = 4, 256  # mean rows of 2 KB (f16): a block of 256 rows dwarfs the epoch's index arrays
MEAN_SHARDS = [300, 1200, 45, 600]  # HDF5 chunks of min(256, n) rows of one layer: edge chunks, a small shard


@pytest.fixture(scope="module", params=["fp16", "int8"])
def means(tmp_path_factory, request):
    """(cache, in-memory mean store) of a cache whose shards span several chunk rows."""
    from wat.data.labels import Vocabulary
    from synthetic_cache import synthetic_meta, write_synthetic_cache

    n = sum(MEAN_SHARDS)
    vocab = Vocabulary.from_names(["a", "b"])
    meta = synthetic_meta(vocab=vocab, multilabel=True, n_layers=ML, n_frames=1, dim=MD, storage=request.param)
    x = np.random.default_rng(0).standard_normal((n, ML, 1, MD), dtype=np.float32).astype(np.float16)
    index = tmp_path_factory.mktemp("means") / "feats.h5"
    write_synthetic_cache(index, meta, x, [(i % 2,) for i in range(n)], shards=MEAN_SHARDS)
    c = open_cache(index)
    assert c.dataset(1, "mean").chunks == (256, 1, MD)
    return c, FeatureStore(c, "mean", memory_budget=1 << 30)


def _mean_stream(c, budget_blocks: float, **kw):
    """A streaming mean store with blocks of 256 rows and a budget of that many blocks."""
    row = c.stored_dtype.itemsize * ML * MD
    store = FeatureStore(c, "mean", memory_budget=int(budget_blocks * 256 * row), block_bytes=256 * row, **kw)
    assert not store.in_memory
    return store


def _epoch(store, req, bs, seed=0, shuffle=True, dtype=None):
    return [(i, x) for i, x in store.iter_batches(req, bs, shuffle=shuffle, seed=seed, dtype=dtype)]


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32])
def test_streaming_mean_returns_each_request_exactly_as_in_memory(means, dtype):
    """Every requested row (repeats as repeats) once per epoch, bit-identical to the in-memory
    store's rows (int8: as stored, and dequantised the same way), through raw chunk reads and
    through h5py (a layout without raw chunks) alike."""
    c, mem = means
    n = len(c)
    rng = np.random.default_rng(2)
    req = np.concatenate([np.arange(n), rng.choice(n, 300)])  # all, then repeats
    got = {}
    for raw in (True, False):
        store = _mean_stream(c, 0)
        if not raw:
            store._chunk_layouts = {s: None for s in range(len(c.shards))}
        batches = _epoch(store, req, 48, dtype=dtype)
        idx = np.concatenate([i for i, _ in batches])
        assert Counter(idx.tolist()) == Counter(req.tolist())
        assert [len(i) for i, _ in batches] == [48] * (len(req) // 48) + [len(req) % 48]
        for i, x in batches:
            assert x.dtype == (dtype or mem.get([0], None).dtype)
            assert torch.equal(x, mem.get(i, dtype))
        got[raw] = idx
    assert np.array_equal(got[True], got[False])  # the order does not depend on how rows are read


def test_streaming_mean_is_deterministic_and_shuffles_within_windows(means):
    c, _ = means
    store = _mean_stream(c, 0)
    req = np.arange(len(c))

    def order(seed, shuffle=True):
        return np.concatenate([i for i, _ in _epoch(store, req, 32, seed, shuffle)])
    a = order(5)
    assert np.array_equal(a, order(5)) and not np.array_equal(a, order(6))
    assert np.array_equal(order(5, shuffle=False), req)
    # the randomness given up: rows are shuffled within windows of `window_blocks` blocks (here the
    # floor of 2 blocks of 256 rows), blocks and shards visited in a random order
    w = store.window_blocks(256)
    assert w == 2
    starts = np.array([s for _, s, _ in c.shards])
    block = [(int(s), int(r - starts[s]) // 256) for s, r in zip(c.shard_of(a), a)]
    first = list(dict.fromkeys(block))  # blocks in order of first appearance
    assert len(first) == 11  # 300 -> 2 blocks, 1200 -> 5, 45 -> 1, 600 -> 3
    at = 0
    for k in range(0, len(first), w):
        members = set(first[k:k + w])
        size = sum(1 for b in block if b in members)
        segment = block[at:at + size]
        assert set(segment) == members  # a window holds exactly its blocks' rows ...
        assert not np.array_equal(a[at:at + size], np.sort(a[at:at + size]))  # ... shuffled among them
        at += size
    assert at == len(a)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_streaming_mean_batches_reuse_kept_buffers_only_when_released(means, dtype):
    """Window streaming cuts its batches (as stored, or converted on this CPU store) into the store's
    kept buffers (`HostPool`): a caller that lets each batch go gets the same few back (at most 3),
    this epoch and the next; batches a caller keeps are never refilled."""
    c, mem = means
    store = _mean_stream(c, 0)
    req = np.arange(len(c))
    ptrs = []
    for epoch in range(2):
        ptrs.append(set())
        for i, x in store.iter_batches(req, 64, seed=epoch, dtype=dtype):
            ptrs[-1].add(x.data_ptr())
            assert torch.equal(x, mem.get(i, dtype))
        del x
    assert len(ptrs[0]) <= 3 and ptrs[1] <= ptrs[0]  # of 27 batches an epoch
    assert ((64, ML, MD), c.stored_dtype) in store._pools  # the store's, kept between epochs
    kept = _epoch(store, req, 64, seed=2, dtype=dtype)
    assert len({x.data_ptr() for _, x in kept}) == len(kept) > 3
    for i, x in kept:
        assert torch.equal(x, mem.get(i, dtype))


@pytest.mark.parametrize("field", ["features", "mean"])
def test_an_epochs_end_lets_go_of_the_sources_of_its_device_copies(means, field, monkeypatch):
    """On a GPU store a batch goes to the device by an asynchronous copy, whose source the pool
    holds until the copy has finished (`HostPool.hold`). When an epoch ends (or its iterator is
    closed early) the reader waits for its last copies and lets go of their sources: with the
    batches let go, every kept buffer is free, none held until the next epoch's first take.
    Here the copy is a clone behind a fake event that finishes when waited for."""
    from test_hostpool import FakeCopy

    copies = []

    def to_device(pool, x, device):
        copies.append(FakeCopy(on_wait=True))
        pool.hold(x, copies[-1])
        return x.clone()

    monkeypatch.setattr(HostPool, "to_device", to_device)
    c, mem = means
    store = _mean_stream(c, 0) if field == "mean" else FeatureStore(c, field, memory_budget=0)
    req = np.arange(len(c))
    for stop in (None, 5):  # the whole epoch; closed after 5 batches
        it = store.iter_batches(req, 64, seed=1, dtype=None)
        for k, (i, x) in enumerate(it):
            if field == "mean":
                assert torch.equal(x, mem.get(i, None))
            if k == stop:
                break
        it.close()
        del it, x
        assert copies and all(copy.query() for copy in copies)
        pools = list(store._pools.values())
        assert pools and not any(p._copies for p in pools)
        assert all(len(p._free) == p._count > 0 for p in pools)  # no kept buffer is out


@pytest.mark.parametrize("field", ["features", "mean"])
def test_a_failing_wait_for_the_last_copies_never_replaces_the_readers_own_error(means, field, monkeypatch):
    """CUDA in an error state: a copy to the device fails, and the epoch's closing wait for the copies
    still held (`HostPool.settling`) raises too. The reader's own error is the one that comes out (the
    wait's used to replace it); with no error in flight, the wait's error still surfaces at the epoch's end."""
    from test_hostpool import FakeCopy

    broken = RuntimeError("CUDA error: an illegal memory access was encountered")
    copies = []

    def to_device(pool, x, device):
        copies.append(FakeCopy(on_wait=True))
        pool.hold(x, copies[-1])
        if len(copies) == 3 and fail:   # the device breaks while this copy is launched
            for copy in copies:
                copy.error = broken
            raise RuntimeError("CUDA error: device-side assert triggered")
        return x.clone()

    monkeypatch.setattr(HostPool, "to_device", to_device)
    c, _ = means
    def store():   # a new one each time: its pools still hold the copies a failed wait left
        return _mean_stream(c, 0) if field == "mean" else FeatureStore(c, field, memory_budget=0)

    fail = True
    with pytest.raises(RuntimeError, match="device-side assert"):
        _epoch(store(), np.arange(len(c)), 64)
    copies.clear()
    fail, last = False, -(-len(c) // 64) - 1
    with pytest.raises(RuntimeError, match="illegal memory access"):
        for k, _ in enumerate(store().iter_batches(np.arange(len(c)), 64, seed=1, dtype=None)):
            if k == last:   # every copy held: only the wait at the epoch's end can raise
                for copy in copies:
                    copy.error = broken
    assert k == last


@pytest.mark.parametrize("budget, buffer_blocks, w", [(0, 8, 2), (8, 8, 3), (8, 2, 2)])
def test_streaming_mean_holds_at_most_the_budget(means, budget, buffer_blocks, w):
    """The cache data an epoch holds (two windows, the staging block) stays within the memory
    budget; below 5 blocks (2 windows of 2 blocks, 1 staging) the window stays 2 blocks. Besides:
    the epoch's index arrays (plan, order, window positions: a few int64 per requested row).
    Measured with tracemalloc (it sees numpy's allocations) over a second epoch."""
    import tracemalloc

    c, mem = means
    store = _mean_stream(c, budget, buffer_blocks=buffer_blocks)
    assert store.window_blocks(256) == w
    block = 256 * store.row_bytes
    req = np.arange(len(c))
    _epoch(store, req, 64)  # first-use costs (lazy imports, file handles) are not the epoch's
    tracemalloc.start()
    try:
        for i, x in store.iter_batches(req, 64, seed=1, dtype=None):
            assert torch.equal(x, mem.get(i, None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= max(store.memory_budget, 5 * block) + 64 * len(req)
    assert peak >= 3 * block  # the measurement sees the windows (two of at least 2 blocks' span)
