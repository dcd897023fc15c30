"""FeatureStore (in-memory and streaming) and the dask view of a cache."""
from collections import Counter

import dask
import numpy as np
import pytest
import torch

from wat.data.cache import open_cache
from wat.data.readers import FeatureStore, available_memory, dask_view

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
    import wat.data.cache as cache_mod

    c, _ = cache
    c.close()
    opened = []
    real = cache_mod._open_h5
    monkeypatch.setattr(cache_mod, "_open_h5", lambda p: opened.append(str(p)) or real(p))
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


def test_streaming_reuses_buffers_only_when_released(cache):
    """A caller that keeps every batch gets distinct, intact batches; one that lets each go gets
    the same few buffers back (a fresh large buffer per batch costs a page fault per page)."""
    c, f16 = cache
    store = _stores(c)[1]
    kept = list(store.iter_batches(np.arange(N), 4, dtype=None))
    assert len({x.data_ptr() for _, x in kept}) == len(kept)
    for idx, x in kept:
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])
    ptrs = set()
    for idx, x in store.iter_batches(np.arange(N).repeat(2), 4, dtype=None):
        ptrs.add(x.data_ptr())
        assert np.array_equal(store.values(x, idx).numpy(), f16[idx])
    assert len(ptrs) <= 2 * store.read_threads + 2 < 2 * N // 4


def test_dask_view_sizes_tasks_by_stored_bytes(cache, monkeypatch):
    """A task reads ~_DASK_TASK_BYTES of stored bytes: twice the rows for int8 (1 byte a value)."""
    import wat.data.readers as readers

    c, _ = cache
    per_row = int(np.prod(c.shape("features")[1:]))
    hdf5_rows = c.dataset(0, "features").chunks[0]
    task = 2 * hdf5_rows * per_row * 2  # two HDF5 chunks of f16 rows
    monkeypatch.setattr(readers, "_DASK_TASK_BYTES", task)
    arr = dask_view(c, "features")
    assert arr.chunks[0][0] * per_row * c.stored_dtype.itemsize == task
    assert np.array_equal(arr[:9].compute(), c.read("features", np.arange(9)))
