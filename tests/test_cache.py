"""The HDF5 feature cache: shards, index, validation, verify/info and the wat-cache CLI."""
import dataclasses
import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest

from wat.data.cache import (CacheError, CacheMeta, build_index, dequantize, info, open_cache, shard_path,
                            verify, write_shard)
from wat.data.cache_cli import main as cache_main
from wat.data.labels import Vocabulary
from synthetic_cache import write_synthetic_cache

N, L, T, D, C = 50, 4, 25, 16, 6
VOCAB = Vocabulary(tuple(f"/m/{i}" for i in range(C)), tuple(f"class {i}" for i in range(C)))
# every test of this module runs on each stored layout: fp16, int8, and a layer subset (blocks 2..5)
LAYOUTS = {"fp16": {}, "int8": {"storage": "int8"}, "subset": {"layers": (2, 3, 4, 5)}}
_LAYOUT = {"kw": {}}


@pytest.fixture(autouse=True, params=list(LAYOUTS))
def layout(request, monkeypatch):
    monkeypatch.setitem(_LAYOUT, "kw", LAYOUTS[request.param])
    return request.param


def make_meta(**kw):
    base = dict(model="tiny.en", fingerprint="abc123", n_layers=L, n_frames=T, dim=D, policy="pad30",
                pooling="mean:25", sample_rate=16000, clip_seconds=10.0, vocab=VOCAB, multilabel=True,
                dataset="test", versions={"wat": "0.1.0"}, **_LAYOUT["kw"])
    base.update(kw)
    return CacheMeta(**base)


def int8() -> bool:
    return _LAYOUT["kw"].get("storage") == "int8"


def same(got, x, ref) -> bool:
    """`got` (a reader's f16 rows) holds the values `x` (f32): exactly their f16 values for fp16
    storage; for int8, within the quantisation bound max|ref| / 254 per (layer, channel), `ref`
    being all rows written (each shard's scale is at most the global one), plus f16 rounding."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if got.dtype != np.float16 or got.shape != x.shape:
        return False
    if not int8():
        return np.array_equal(got, x.astype(np.float16))
    amax = np.abs(ref).max(axis=(0, 2) if ref.ndim == 4 else 0)
    bound = amax[:, None, :] if ref.ndim == 4 else amax
    return bool((np.abs(got.astype(np.float32) - x) <= bound * (1 / 254 + 2 ** -10)).all())


def make_data(n=N, seed=0, prefix="clip"):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i:03d}-é音" for i in range(n)]  # unicode ids
    feats = rng.standard_normal((n, L, T, D)).astype(np.float32)
    labels = [tuple(sorted(rng.choice(C, size=i % 3, replace=False).tolist())) for i in range(n)]
    folds = np.arange(n) % 5
    durations = rng.uniform(1, 10, n)
    return ids, feats, labels, folds, durations


def write_cache(folder, meta=None, sizes=(20, 20, 10), seed=0):
    """Shards of the given sizes under folder/shards, index folder/feats.h5; returns the data."""
    meta = meta or make_meta()
    ids, feats, labels, folds, durs = make_data(sum(sizes), seed)
    paths = write_synthetic_cache(folder / "feats.h5", meta, feats, labels, ids=ids, folds=folds, durations=durs,
                                  shards=list(sizes), shard_dir=folder / "shards")
    return folder / "feats.h5", paths, (ids, feats, labels, folds, durs)


def test_round_trip(tmp_path):
    index, paths, (ids, feats, labels, folds, durs) = write_cache(tmp_path)
    cache = open_cache(index)
    assert len(cache) == N and list(cache.ids) == ids
    assert cache.labels == labels
    y = cache.label_matrix()
    assert y.shape == (N, C) and y.dtype == bool
    assert all(set(np.flatnonzero(y[i])) == set(labels[i]) for i in range(N))
    assert np.array_equal(cache.folds, folds)
    assert np.allclose(cache.durations, durs.astype(np.float32))
    assert cache.meta == make_meta()
    assert [(s[1], s[2]) for s in cache.shards] == [(0, 20), (20, 40), (40, 50)]
    order = [49, 3, 3, 21, 0, 40, 19, 20, 49]  # any order, duplicates, across shards
    got = cache.read("features", order)
    assert same(got, feats[order], feats)
    mean = feats.mean(axis=2)
    assert same(cache.read("mean", order), mean[order], mean)
    assert same(cache.read("features", np.arange(N)), feats, feats)
    assert np.array_equal(cache.read("features", order[:3]), got[:3])  # the same bits every time
    with pytest.raises(IndexError):
        cache.read("mean", [N])


def test_single_label_and_single_shard(tmp_path):
    meta = make_meta(multilabel=False)
    ids, feats, _, _, _ = make_data(7)
    labels = [(i % C,) for i in range(7)]
    p = tmp_path / "one.h5"
    write_shard(p, meta, ids, feats, labels)
    cache = open_cache(p)  # a shard opens on its own too
    assert cache.labels == labels and not cache.meta.multilabel
    assert np.array_equal(cache.label_matrix().sum(axis=1), np.ones(7))
    assert np.array_equal(cache.folds, -np.ones(7)) and np.allclose(cache.durations, 10.0)
    assert same(cache.read("features", [6, 0]), feats[[6, 0]], feats)


def test_shard_layout(tmp_path):
    _, paths, _ = write_cache(tmp_path)
    with h5py.File(paths[0], "r") as f:
        stored = np.int8 if int8() else np.float16
        assert f["features"].dtype == stored and f["mean"].dtype == stored
        assert ("features_scale" in f) == ("mean_scale" in f) == int8()
        assert f["features"].chunks[1:] == (L, T, D)
        assert 1 <= f["features"].chunks[0] <= 4 and f["features"].compression is None
        assert f["mean"].chunks == (20, 1, D)
        assert f["label_indptr"].dtype == np.int32 and f["fold"].dtype == np.int16
        assert f["duration"].dtype == np.float32 and f.attrs["kind"] == "shard"
        assert CacheMeta.from_attrs(f.attrs) == make_meta()


def test_write_shard_rejects_bad_input(tmp_path):
    ids, feats, labels, _, _ = make_data(5)
    with pytest.raises(CacheError, match="shape"):
        write_shard(tmp_path / "a.h5", make_meta(), ids, feats[:, :2], labels)
    with pytest.raises(CacheError, match="label out of range"):
        write_shard(tmp_path / "a.h5", make_meta(), ids, feats, [(C,)] * 5)
    with pytest.raises(CacheError, match="duplicate"):
        write_shard(tmp_path / "a.h5", make_meta(), ["x"] * 5, feats, labels)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_a_folder_given_for_a_cache_is_named_a_folder(tmp_path):
    # wat-probe --features DATASET_DIR said "file missing" of a folder that is there
    with pytest.raises(CacheError, match="a folder, not a cache file"):
        open_cache(tmp_path)
    with pytest.raises(CacheError, match="file missing"):
        open_cache(tmp_path / "none.h5")


def test_partial_is_never_a_shard(tmp_path):
    index, paths, (ids, feats, labels, *_) = write_cache(tmp_path, sizes=(20, 30))
    # a crash mid-write leaves only a .partial: simulate by writing one and never renaming it
    partial = paths[1].with_name(paths[1].name + ".partial")
    os.replace(paths[1], partial)
    with pytest.raises(CacheError, match="shard-00001.h5"):
        open_cache(index)
    with pytest.raises(CacheError, match=r"\.partial"):
        open_cache(partial)
    with pytest.raises(CacheError, match=r"\.partial"):
        build_index(tmp_path / "other.h5", [paths[0], partial])
    assert not (tmp_path / "other.h5").exists()
    # a failing write removes its .partial and never creates the final name
    bad = shard_path(tmp_path / "shards", 7)
    with pytest.raises(CacheError):
        write_shard(bad, make_meta(), ids[:3], feats[:3], [(C + 1,)] * 3)
    assert not bad.exists() and not bad.with_name(bad.name + ".partial").exists()


@pytest.mark.parametrize("change", [dict(fingerprint="other"), dict(policy="trim"), dict(pooling="mean:10"),
                                    dict(vocab=Vocabulary.from_names(["a", "b"]))])
def test_mismatched_shard_named(tmp_path, change):
    index, paths, (ids, feats, labels, folds, durs) = write_cache(tmp_path)
    write_shard(paths[1], make_meta(**change), ids[20:40], feats[20:40],
                [() for _ in range(20)], folds[20:40], durs[20:40])
    with pytest.raises(CacheError, match="shard-00001.h5") as e:
        open_cache(index)
    assert next(iter(change)) in str(e.value)
    with pytest.raises(CacheError, match="shard-00001.h5"):
        build_index(tmp_path / "again.h5", paths)


def test_model_name_and_versions_are_informative(tmp_path):
    a, b = make_meta(), make_meta(model="/path/tiny.pt", versions={"torch": "9"})
    assert a.incompatibilities(b) == []
    assert len(a.incompatibilities(make_meta(fingerprint="x", dim=8))) == 2


def test_missing_replaced_truncated_shard(tmp_path):
    index, paths, (ids, feats, labels, folds, durs) = write_cache(tmp_path)
    backup = tmp_path / "backup.h5"
    shutil.copy(paths[2], backup)
    # replaced by a different shard with the same row count and meta
    write_shard(paths[2], make_meta(), [f"other-{i}" for i in range(10)], feats[40:], labels[40:])
    with pytest.raises(CacheError, match="shard-00002.h5.*digest"):
        open_cache(index)
    # truncated
    data = backup.read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="shard-00002.h5"):
        open_cache(index)
    # missing: VDS would fill it silently, open_cache refuses
    paths[2].unlink()
    with pytest.raises(CacheError, match="shard-00002.h5.*missing"):
        open_cache(index)
    if not int8():  # raw int8 values mean nothing without their scales; fp16 ones read NaN, not 0
        with h5py.File(index, "r") as f:
            assert np.isnan(f["mean"][45]).all()
    assert any("shard-00002.h5" in p for p in verify(index))
    shutil.copy(backup, paths[2])
    assert len(open_cache(index)) == N


def test_different_row_count_named(tmp_path):
    index, paths, (ids, feats, labels, folds, durs) = write_cache(tmp_path)
    write_shard(paths[0], make_meta(), ids[:19], feats[:19], labels[:19])
    with pytest.raises(CacheError, match="shard-00000.h5.*19 clips"):
        open_cache(index)


def test_vds_equals_shards_and_relocation(tmp_path):
    index, paths, (ids, feats, *_) = write_cache(tmp_path / "a")
    cache = open_cache(index)
    with h5py.File(index, "r") as f:
        assert f["features"].is_virtual and f["features"].shape == (N, L, T, D)
        assert np.array_equal(_vds(f, "features"), cache.read("features", np.arange(N)))
        assert np.array_equal(_vds(f, "mean"), cache.read("mean", np.arange(N)))
        assert all(not os.path.isabs(m.file_name) for m in f["features"].virtual_sources())
    cache.close()
    # move the whole folder and open from an unrelated working directory
    shutil.move(tmp_path / "a", tmp_path / "moved")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        os.mkdir("elsewhere")
        os.chdir("elsewhere")
        moved = open_cache(tmp_path / "moved" / "feats.h5")
        assert same(moved.read("features", [0, 49]), feats[[0, 49]], feats)
        with h5py.File(tmp_path / "moved" / "feats.h5", "r") as f:
            assert same(_vds(f, "features")[30:31], feats[30:31], feats)
    finally:
        os.chdir(cwd)
    assert verify(tmp_path / "moved" / "feats.h5") == []


def _vds(f, field):
    """The index file's virtual dataset as values (int8: each shard's rows times its scales)."""
    raw = f[field][:]
    if raw.dtype == np.float16:
        return raw
    rows = np.repeat(np.arange(len(f["shard_rows"])), f["shard_rows"][:])
    scale = f[field + "_scale"][:][rows]
    return dequantize(raw, scale[:, :, None, :] if field == "features" else scale)


def test_f16_rows_with_nan_or_inf_are_refused_and_extremes_kept(tmp_path):
    """write_shard checks f16 rows (the extractor's) on their bits: NaN and +-inf anywhere in a row are
    refused, naming the clips; the largest finite f16, -0 and subnormals are values like any other."""
    meta = make_meta()
    ids, feats, labels, *_ = make_data(6)
    x = feats.astype(np.float16)
    x[0, 0, 0, 0], x[1, -1, -1, -1], x[2, 1, 1, 1] = 65504, -0.0, np.float16(6e-8)
    write_shard(tmp_path / "ok.h5", meta, ids, x, labels)
    assert verify(tmp_path / "ok.h5") == []
    for k, v in ((4, np.inf), (5, -np.inf), (3, np.nan)):
        x[k].reshape(-1)[-1] = v
        with pytest.raises(CacheError, match=f"NaN/inf in features of clip\\(s\\) .*{ids[k]}"):
            write_shard(tmp_path / "bad.h5", meta, ids, x, labels)
    assert not (tmp_path / "bad.h5").exists()


def test_cache_pickles_and_reopens(tmp_path):
    index, _, (_, feats, *_) = write_cache(tmp_path)
    cache = open_cache(index)
    cache.read("mean", [0])  # opens a file handle in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert same(clone.read("features", [5, 25]), feats[[5, 25]], feats)


def test_verify_catches_nan_and_duplicates(tmp_path):
    meta = make_meta()
    ids, feats, labels, folds, durs = make_data(10)
    assert verify(_one(tmp_path / "ok.h5", meta, ids, feats, labels)) == []
    bad = feats.copy()
    bad[3, 1, 2, 0] = np.nan
    with pytest.raises(CacheError, match="NaN.*" + ids[3]):
        write_shard(tmp_path / "nan.h5", meta, ids, bad, labels)
    nan = _one(tmp_path / "nan.h5", meta, ids, feats, labels)
    with h5py.File(nan, "r+") as f:  # damage after writing (bit rot, another tool)
        if int8():  # int8 values are always finite: their scales are not
            f["features_scale"][1, 0] = np.nan
        else:
            f["features"][3, 1, 2, 0] = np.nan
    problems = verify(nan)
    if int8():
        assert any("NaN" in p and "features_scale" in p for p in problems)
    else:
        assert any("NaN" in p and "features" in p and ids[3] in p for p in problems)
    a = _one(tmp_path / "s0.h5", meta, ids[:5], feats[:5], labels[:5])
    b = _one(tmp_path / "s1.h5", meta, ids[4:9], feats[4:9], labels[4:9])  # ids[4] in both
    with pytest.raises(CacheError, match="repeat"):
        build_index(tmp_path / "dup.h5", [a, b])
    with pytest.raises(CacheError, match="mean shape"):
        write_shard(tmp_path / "m.h5", meta, ids, feats, labels, mean=feats[:, :, 0, :2])
    wrong_mean = _one(tmp_path / "mean.h5", meta, ids, feats, labels)
    with h5py.File(wrong_mean, "r+") as f:  # int8: 40 steps of the mean's scale
        m = f["mean"][...]
        f["mean"][...] = np.clip(m.astype(int) + 40, -127, 127) if int8() else m + np.float16(1)
    assert any("10 clip(s) fail their checksum in mean" in p for p in verify(wrong_mean))


def _one(path, meta, ids, feats, labels):
    write_shard(path, meta, ids, feats, labels)
    return path


def test_info_fields(tmp_path):
    index, paths, (ids, feats, labels, folds, durs) = write_cache(tmp_path)
    d = info(index)
    json.dumps(d)
    assert d["clips"] == N and d["shards"] == 3
    assert d["features"] == [N, L, T, D] and d["mean"] == [N, L, D]
    assert d["model"] == "tiny.en" and d["fingerprint"] == "abc123"
    assert d["policy"] == "pad30" and d["pooling"] == "mean:25"
    assert d["classes"] == C and d["multilabel"] is True
    assert d["labels"]["total"] == sum(len(x) for x in labels)
    assert d["labels"]["unlabeled_clips"] == sum(1 for x in labels if not x)
    assert d["folds"] == {k: 10 for k in range(5)}
    assert d["bytes_on_disk"] == sum(p.stat().st_size for p in [index, *paths])
    assert d["bytes_on_disk"] > N * L * T * D * (1 if int8() else 2)
    assert d["storage"] == ("int8" if int8() else "fp16") and d["layers"] == list(make_meta().layers)


def test_cli(tmp_path, capsys):
    index, paths, _ = write_cache(tmp_path)
    assert cache_main(["verify", str(index)]) == 0
    assert capsys.readouterr().out.strip() == f"OK: {N} clips, 3 shards"
    assert cache_main(["info", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == N
    assert cache_main(["info", str(index)]) == 0
    assert "50 clips in 3 shard(s)" in capsys.readouterr().out
    paths[1].unlink()
    assert cache_main(["verify", str(index)]) == 1
    err = capsys.readouterr().err
    assert "shard-00001.h5" in err and "missing" in err
    assert cache_main(["info", str(index)]) == 2
    assert "shard-00001.h5" in capsys.readouterr().err
    assert cache_main(["info", str(tmp_path / "nope.h5")]) == 2


def test_meta_attrs_round_trip():
    meta = make_meta()
    assert CacheMeta.from_attrs(meta.to_attrs()) == meta
    attrs = meta.to_attrs()
    attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        CacheMeta.from_attrs(attrs)
    assert dataclasses.replace(meta, model="x").digest() == meta.digest()
    assert dataclasses.replace(meta, policy="trim").digest() != meta.digest()


# ---------------------------------------------------------------- optional columns (snr, utterance)

def _columns_cache(folder, sizes=(6, 4)):
    meta = make_meta(columns=("utterance", "snr"))
    ids, feats, labels, folds, durs = make_data(sum(sizes))
    snr = np.linspace(-10, 20, sum(sizes)).astype(np.float32)
    utt = [f"spk-{i % 3}-é" for i in range(sum(sizes))]
    paths, a = [], 0
    for i, k in enumerate(sizes):
        p = shard_path(folder / "shards", i)
        write_shard(p, meta, ids[a:a + k], feats[a:a + k], labels[a:a + k], folds[a:a + k], durs[a:a + k],
                    columns={"snr": snr[a:a + k], "utterance": utt[a:a + k]})
        paths.append(p)
        a += k
    build_index(folder / "feats.h5", paths)
    return folder / "feats.h5", paths, snr, utt


def test_optional_columns_round_trip(tmp_path):
    index, paths, snr, utt = _columns_cache(tmp_path)
    cache = open_cache(index)
    assert cache.meta.columns == ("snr", "utterance")  # kept sorted
    np.testing.assert_array_equal(cache.columns["snr"], snr)
    assert list(cache.columns["utterance"]) == utt
    assert list(open_cache(paths[1]).columns["utterance"]) == utt[6:]
    assert verify(index) == []
    assert info(index)["columns"] == ["snr", "utterance"]


def test_caches_without_columns_keep_their_digest(tmp_path):
    # caches written before optional columns existed have no `columns` attribute: still valid
    index, paths, _ = write_cache(tmp_path, sizes=(5,))
    with h5py.File(paths[0], "r") as f:
        assert "columns" not in f.attrs
    assert open_cache(index).columns == {} and verify(index) == []
    assert make_meta().digest() == make_meta(columns=()).digest()
    assert make_meta().digest() != make_meta(columns=("snr",)).digest()


def test_optional_columns_are_checked(tmp_path):
    meta = make_meta(columns=("snr",))
    ids, feats, labels, folds, durs = make_data(4)
    with pytest.raises(CacheError, match="columns"):
        write_shard(tmp_path / "a.h5", meta, ids, feats, labels, folds, durs)  # column missing
    with pytest.raises(CacheError, match="shape"):
        write_shard(tmp_path / "a.h5", meta, ids, feats, labels, folds, durs, columns={"snr": [1.0, 2.0]})
    with pytest.raises(CacheError, match="unknown optional column"):
        make_meta(columns=("loudness",))
    # shards with and without the column cannot share an index
    write_shard(tmp_path / "s0.h5", meta, ids, feats, labels, folds, durs, columns={"snr": [0, 1, 2, 3]})
    write_shard(tmp_path / "s1.h5", make_meta(), [f"x{i}" for i in range(4)], feats, labels, folds, durs)
    with pytest.raises(CacheError, match="columns"):
        build_index(tmp_path / "feats.h5", [tmp_path / "s0.h5", tmp_path / "s1.h5"])


# ---------------------------------------------------------------- pad30 padding (schema 4)

OLD_PAD30 = os.path.join(os.path.dirname(__file__), "fixtures", "cache_v2_pad30", "feats.h5")


def test_old_pad30_cache_reads_as_sample_padded(capsys):
    """A real pad30 cache written by wat before schema 4 (schema 2, committed fixture): it opens,
    reads and verifies, and its features are marked as padded with zero samples."""
    with h5py.File(OLD_PAD30, "r") as f:
        assert int(f.attrs["schema_version"]) == 2 and "pad30_padding" not in f.attrs
    cache = open_cache(OLD_PAD30)
    assert cache.meta.policy == "pad30" and cache.meta.pad30_padding == "samples"
    x = cache.read("features", np.arange(4))
    assert x.shape == (4, 2, 3, 4) and np.isfinite(x).all()
    assert verify(OLD_PAD30) == [] and info(OLD_PAD30)["pad30_padding"] == "samples"
    assert cache_main(["info", OLD_PAD30]) == 0
    assert "policy pad30 (zero-sample padding, before cache schema 4" in capsys.readouterr().out


def test_sample_and_log_mel_padded_pad30_never_mix(tmp_path):
    old = open_cache(OLD_PAD30).meta
    new = dataclasses.replace(old, pad30_padding="mel")
    bad = new.incompatibilities(old)
    assert len(bad) == 1 and bad[0].startswith("pad30_padding: mel != samples") and "re-extract" in bad[0]
    assert new.digest() != old.digest()
    # one cache cannot hold both: a new shard beside the old one is refused by name
    shutil.copytree(os.path.dirname(OLD_PAD30), tmp_path / "c")
    shards = tmp_path / "c" / "feats.shards"
    write_shard(shards / "shard-00001.h5", new, ["e", "f"], np.ones((2, 2, 3, 4), np.float32), [(0,), (1,)])
    with pytest.raises(CacheError, match=r"shard-00001.h5.*pad30_padding: samples != mel.*re-extract"):
        build_index(tmp_path / "c" / "both.h5", [shards / "shard-00000.h5", shards / "shard-00001.h5"])
    # the new one alone is a schema-4 cache; trim caches have no padding to tell apart
    build_index(tmp_path / "c" / "new.h5", [shards / "shard-00001.h5"])
    assert open_cache(tmp_path / "c" / "new.h5").meta == new
    trim = dataclasses.replace(old, policy="trim")
    assert trim.pad30_padding == dataclasses.replace(new, policy="trim").pad30_padding == ""
    with pytest.raises(CacheError, match="unknown pad30 padding"):
        dataclasses.replace(new, pad30_padding="wav")
