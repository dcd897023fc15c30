"""Cache integrity: per-clip checksums catch any zeroed or flipped byte range in features or mean, in
`wat-cache verify` and in every reader (training, probing, evaluation refuse a corrupt clip)."""
from pathlib import Path

import h5py
import numpy as np
import pytest

from wat.data.cache.integrity import FIELD_CRC, SHARD_CHECKS
from wat.data.cache import CHECKSUMS, MEAN_LAYER_CRC, CorruptCacheError, info, open_cache, shard_path, verify
from wat.data.cache_cli import main as cache_main
from wat.data.labels import Vocabulary
from wat.data.cache import dask_view
from wat.data.cache.store import FeatureStore
from synthetic_cache import synthetic_meta, write_synthetic_cache

N, L, T, D, C = 24, 3, 5, 32, 4
SIZES = (12, 12)


def _cache(folder, seed=0, storage="fp16"):
    """Two shards of single-label clips whose class shows in the features (a probe/head can learn it)."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % C
    feats = rng.standard_normal((N, L, T, D)).astype(np.float32)
    feats[np.arange(N), :, :, y] += 3.0
    ids = [f"clip{i:03d}" for i in range(N)]
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"c{i}" for i in range(C)]), multilabel=False,
                          n_layers=L, n_frames=T, dim=D, storage=storage)
    paths = write_synthetic_cache(folder / "feats.h5", meta, feats, [(int(c),) for c in y], ids=ids,
                                  folds=np.arange(N) % 4 + 1, shards=list(SIZES), shard_dir=folder / "shards")
    return folder / "feats.h5", paths, ids


def _row_span(path, field: str, row: int) -> list[tuple[int, int]]:
    """File byte ranges (offset, length) holding row `row` of `field` in a shard (chunked, no filters)."""
    with h5py.File(path, "r") as f:
        d = f[field]
        k = d.chunks[0]
        item = d.dtype.itemsize
        spans = []
        for chunk in range(d.id.get_num_chunks()):
            info_ = d.id.get_chunk_info(chunk)
            if info_.chunk_offset[0] != row - row % k:
                continue
            per_row = int(np.prod(d.chunks[1:])) * item
            spans.append((info_.byte_offset + (row % k) * per_row, per_row))
        return spans


def _corrupt(path, field: str, row: int, rng, mode: str) -> None:
    """Zero or bit-flip a random byte range inside one clip's row of `field` (the raw file bytes)."""
    spans = _row_span(path, field, row)
    offset, length = spans[rng.integers(len(spans))]
    start = int(rng.integers(0, length - 1))
    n = int(rng.integers(2, length - start + 1))
    with open(path, "r+b") as f:
        f.seek(offset + start)
        old = np.frombuffer(f.read(n), np.uint8)
        new = np.zeros(n, np.uint8) if mode == "zero" else old ^ rng.integers(1, 256, n, dtype=np.uint8)
        if mode == "zero" and not old.any():  # already zero there: zeroing would change nothing
            new = old ^ np.uint8(1)
        f.seek(offset + start)
        f.write(new.tobytes())


# int8 shards: the checksums are over the stored int8 rows, checked before dequantising
@pytest.mark.parametrize("seed,storage", [(s, "fp16") for s in range(8)] + [(s, "int8") for s in range(4)])
def test_verify_and_readers_catch_random_corruptions(tmp_path, seed, storage):
    rng = np.random.default_rng(seed)
    index, paths, ids = _cache(tmp_path, storage=storage)
    assert verify(index) == []
    hits = {}  # id -> field
    for _ in range(int(rng.integers(1, 4))):
        s, field, mode = int(rng.integers(len(paths))), str(rng.choice(["features", "mean"])), str(rng.choice(["zero", "flip"]))
        row = int(rng.integers(SIZES[s]))
        _corrupt(paths[s], field, row, rng, mode)
        hits[ids[sum(SIZES[:s]) + row]] = field
    problems = verify(index)
    for clip, field in hits.items():
        assert any(clip in p and f"checksum in {field}" in p for p in problems), (clip, field, problems)
    assert cache_main(["verify", str(index)]) == 1
    # readers: whichever field got hit is refused by every way of reading it
    for field in set(hits.values()):
        with pytest.raises(CorruptCacheError, match="fail their checksum"):
            FeatureStore(open_cache(index), field, memory_budget=1 << 30)
        stream = FeatureStore(open_cache(index), field, memory_budget=0, block_bytes=4096)
        with pytest.raises(CorruptCacheError, match="fail their checksum"):
            list(stream.iter_batches(np.arange(N), 5))
        clip = next(c for c, f in hits.items() if f == field)
        with pytest.raises(CorruptCacheError, match=clip):
            open_cache(index).read(field, [ids.index(clip)])
        with pytest.raises(CorruptCacheError):   # features: before the view; mean: reading the hit layer
            dask_view(open_cache(index), field).compute(scheduler="synchronous")


def test_clean_cache_reads_and_checks_once(tmp_path, monkeypatch):
    index, _, _ = _cache(tmp_path)
    cache = open_cache(index)
    with h5py.File(shard_path(tmp_path / "shards", 0), "r") as f:
        assert set(CHECKSUMS.values()) <= set(f) and int(f.attrs["schema_version"]) == 2
    a = FeatureStore(cache, "features", memory_budget=1 << 30).get(np.arange(N))
    calls = []
    monkeypatch.setattr(type(cache), "check_rows", lambda *args: calls.append(args))
    b = FeatureStore(cache, "features", memory_budget=1 << 30).get(np.arange(N))  # checked already this run
    assert calls == [] and np.array_equal(a.numpy(), b.numpy())
    assert info(index)["checksums"] == 2


def test_training_and_probing_refuse_a_corrupt_clip(tmp_path, capsys):
    """The issue's case: zeroed rows used to pass verify and be trained on (exit 0)."""
    from wat.eval.cli import probe_main
    from wat.train.cli import main as train_main

    index, paths, ids = _cache(tmp_path)
    with h5py.File(paths[1], "r+") as f:  # zero one clip in features and another in mean (not via the writer)
        f["features"][3] = 0
        f["mean"][7] = 0
    out = tmp_path / "run"
    assert train_main(["--features", str(index), "--head", "tl-tr", "--dim", "16", "--folds", "4", "--epochs", "1",
                       "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-train: error:") and "\n" not in err and ids[12 + 3] in err and "checksum" in err
    assert probe_main(["--features", str(index), "--out", str(tmp_path / "probe")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-probe: error:") and "\n" not in err and ids[12 + 7] in err
    assert not (tmp_path / "probe" / "layers.csv").exists()


def _strip_checksums(path) -> None:
    """Make a shard look like one written by schema 1 (before checksums)."""
    _strip_layer_checksums(path)
    with h5py.File(path, "r+") as f:
        for name in CHECKSUMS.values():
            del f[name]
        f.attrs["schema_version"] = 1


def _strip_layer_checksums(path) -> None:
    """Make a shard look like one written before per-layer checksums of `mean` (schema 2-4 alike),
    so also before field checksums, and its index (`_cache`'s feats.h5) one built before them."""
    with h5py.File(path, "r+") as f:
        del f[MEAN_LAYER_CRC]
        del f.attrs[FIELD_CRC]
    with h5py.File(Path(path).parent.parent / "feats.h5", "r+") as f:
        if SHARD_CHECKS in f:
            del f[SHARD_CHECKS]
        f.attrs.pop(FIELD_CRC, None)


def test_schema_1_cache_opens_with_a_note_and_zero_rows_are_refused(tmp_path, capsys):
    index, paths, ids = _cache(tmp_path)
    for p in paths:
        _strip_checksums(p)
    cache = open_cache(index)
    assert cache.checksummed == [False, False] and info(index)["checksums"] == 0
    assert FeatureStore(cache, "mean", memory_budget=1 << 30).get([0]).shape == (1, L, D)
    assert cache_main(["verify", str(index)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {N} clips") and "note: 2 of 2 shard(s) were written before per-clip checksums" in out
    with h5py.File(paths[0], "r+") as f:
        f["features"][5] = 0
    assert any(ids[5] + " (all zero)" in p and "all zero or non-finite in features" in p for p in verify(index))
    with pytest.raises(CorruptCacheError, match=f"all zero or non-finite.*{ids[5]}"):
        FeatureStore(open_cache(index), "features", memory_budget=1 << 30)


def _corrupt_layer(path, row: int, layer: int) -> None:
    """Flip bytes of one clip's one layer of `mean` in the file (not through the writer)."""
    with h5py.File(path, "r+") as f:
        f["mean"][row, layer, :4] = -f["mean"][row, layer, :4] - 1


@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_one_layer_read_is_checked_on_its_own(tmp_path, monkeypatch, storage):
    """Per-layer checksums: a one-layer read of `mean` checks that layer's bytes (no pass over every
    layer first); a corrupt layer is refused by name when read, caught by verify, and the layers
    around it read as they are."""
    from wat.data.cache import handles
    index, paths, ids = _cache(tmp_path, storage=storage)
    monkeypatch.setattr(handles, "VERIFIED", set())
    _corrupt_layer(paths[1], 4, 1)
    cache = open_cache(index)
    assert cache.layer_checkable("mean") and not cache.layer_checkable("features")
    monkeypatch.setattr(type(cache), "verify_field", lambda *a: pytest.fail("whole-field check of a checkable cache"))
    view = dask_view(cache, "mean")
    for layer in (0, 2):
        got = view[:, layer, :].compute(scheduler="synchronous")
        clean = np.delete(np.arange(N), 12 + 4)   # Cache.read refuses the corrupt row (it checks whole rows)
        np.testing.assert_array_equal(got[clean], cache.read("mean", clean)[:, layer])
    with pytest.raises(CorruptCacheError, match=f"1 clip\\(s\\) fail their checksum in mean \\({ids[12 + 4]}\\)"):
        view[:, 1, :].compute(scheduler="synchronous")
    with pytest.raises(CorruptCacheError, match=ids[12 + 4]):
        view[12:16, 1:3, 5:9].compute(scheduler="synchronous")   # a part of the channels: still checked
    assert any(ids[12 + 4] in p and "checksum in mean" in p for p in verify(index))


def test_older_shards_without_layer_checksums_check_the_whole_field(tmp_path):
    """Shards written before per-layer checksums read as before: every row of `mean` is checked
    against its row checksum before a one-layer view, so a corrupt other layer is still refused."""
    index, paths, ids = _cache(tmp_path)
    _strip_layer_checksums(paths[1])
    _corrupt_layer(paths[1], 4, 1)
    cache = open_cache(index)
    assert not cache.layer_checkable("mean") and verify(index) and cache_main(["verify", str(index)]) == 1
    with pytest.raises(CorruptCacheError, match=ids[12 + 4]):
        dask_view(cache, "mean")


@pytest.mark.parametrize("layer_checksums", [True, False], ids=["per-layer", "older shards"])
def test_probe_over_every_layer_checks_each_shard_once(tmp_path, monkeypatch, layer_checksums):
    """A probe of every layer (several folds: each layer read once per fold) and a second probe in
    the same process check each shard's `mean` once per process: per layer with per-layer
    checksums, the whole field before the first task without."""
    from wat.data.cache import handles, integrity
    from wat.eval.probe import ProbeOptions, probe
    index, paths, _ = _cache(tmp_path)
    if not layer_checksums:
        for p in paths:
            _strip_layer_checksums(p)
    monkeypatch.setattr(handles, "VERIFIED", set())
    crcs = []
    real = integrity.row_crc32
    monkeypatch.setattr(integrity, "row_crc32", lambda block: crcs.append(block.shape) or real(block))
    for _ in range(2):
        rep = probe([index], None, ProbeOptions(fusion=("mean", "concat"), jobs=1))
        assert rep.n_folds == 4 and len(rep.layer_results()) == L
    # one CRC pass per shard and layer ([rows x 1 layer, D]) or per shard ([rows, L, D]); nothing more
    want = [(n, D) for n in SIZES for _ in range(L)] if layer_checksums else [(n, L, D) for n in SIZES]
    assert sorted(crcs) == sorted(want), crcs
