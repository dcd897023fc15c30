"""Compact storage: int8 caches (per-shard, per-(layer, channel) scales) and layer subsets
(`wat-extract --layers`), read transparently by every reader, carried into heads, checked by
train/eval/tag/probe. The cache and reader tests of test_cache/test_readers run on both layouts too."""
import dataclasses

import h5py
import numpy as np
import pytest
import torch

from test_cache import make_meta
from wat.data.cache import CacheError, CacheMeta, build_index, open_cache, shard_path, write_shard


def relayout(src, folder, *, storage="fp16", blocks=None):
    """The cache at `src` rewritten shard by shard through the real writer with another storage
    and/or only the encoder `blocks` (what wat-extract --storage/--layers writes, without re-encoding)."""
    cache = open_cache(src)
    m = cache.meta
    pos = list(range(m.n_layers)) if blocks is None else [m.layers.index(b) for b in blocks]
    meta = dataclasses.replace(m, storage=storage, n_layers=len(pos), layers=tuple(m.layers[p] for p in pos))
    paths = []
    for s, (_, a, b) in enumerate(cache.shards):
        rows = np.arange(a, b)
        x = cache.read("features", rows)[:, pos].astype(np.float32)
        paths.append(shard_path(folder / "feats.shards", s))
        write_shard(paths[-1], meta, cache.ids[a:b], x, [cache.labels[i] for i in rows], cache.folds[a:b],
                    cache.durations[a:b])
    build_index(folder / "feats.h5", paths)
    return folder / "feats.h5"


def test_int8_error_bound_and_scales(tmp_path):
    rng = np.random.default_rng(0)
    n, L, T, D = 30, 3, 25, 8
    x = rng.standard_normal((n, L, T, D)).astype(np.float32)
    x[:, :, :, 1] *= 300     # an outlier channel does not cost the others their resolution
    x[:, 1, :, 2] = 0        # an all-zero channel stays exactly zero
    x[:, :, :, 3] += 5       # an offset channel
    meta = make_meta(n_layers=L, n_frames=T, dim=D, storage="int8")
    p = tmp_path / "s.h5"
    write_shard(p, meta, [f"c{i}" for i in range(n)], x, [()] * n)
    cache = open_cache(p)
    with h5py.File(p, "r") as f:
        q, scale = f["features"][:], f["features_scale"][:]
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() == 127 and q.min() >= -127
    amax = np.abs(x).max(axis=(0, 2))
    assert np.allclose(scale, amax / 127, rtol=1e-6)
    got = cache.read("features", np.arange(n)).astype(np.float32)
    err = np.abs(got - x)
    # half a step, plus the f16 rounding of the scale and of the result
    assert (err <= scale[:, None, :] / 2 + np.abs(x) * 2 ** -10 + amax[:, None, :] * 2 ** -11).all()
    assert (got[:, 1, :, 2] == 0).all()
    assert err[..., 0].max() < 0.05 < err[..., 1].max()  # per channel: the outlier's step is its own
    mean = x.mean(axis=2)
    m_scale = np.abs(mean).max(axis=0) / 127
    assert (np.abs(cache.read("mean", np.arange(n)) - mean) <= m_scale / 2 + np.abs(mean) * 2 ** -10 + 1e-6).all()
    assert cache.scales("features").shape == (1, L, D) and open_cache(p).scales("mean").shape == (1, L, D)


def test_schema_version_says_who_can_read_the_file(tmp_path):
    ids, x = ["a", "b"], np.ones((2, 4, 25, 16), np.float32)
    # 2: fp16, every layer, with checksums (1 = the same without checksums); 3: int8 or a layer subset;
    # 4: pad30 with log-mel padding (transcribe's window), whatever the storage. Trim caches and the
    # sample-padded pad30 caches of older wat keep the versions they were written with.
    for padding in ("samples", "trim"):
        for kw, version in (({}, 2), ({"storage": "int8"}, 3), ({"layers": (1, 2, 3, 4)}, 3)):
            kw = {**kw, **({"policy": "trim"} if padding == "trim" else {"pad30_padding": padding})}
            p = tmp_path / f"{padding}-{version}-{len(kw) > 1 and next(iter(kw))}.h5"
            write_shard(p, make_meta(**kw), ids, x, [(), ()])
            with h5py.File(p, "r") as f:
                assert int(f.attrs["schema_version"]) == version and "pad30_padding" not in f.attrs
    for kw in ({}, {"storage": "int8"}):
        p = tmp_path / f"mel-{len(kw)}.h5"
        write_shard(p, make_meta(**kw), ids, x, [(), ()])
        with h5py.File(p, "r") as f:
            assert int(f.attrs["schema_version"]) == 4 and f.attrs["pad30_padding"] == "mel"
        assert open_cache(p).meta.pad30_padding == "mel"
    # a shard written before storage/layers existed (no such attributes, nor field checksums) still
    # opens, as sample-padded pad30
    old = tmp_path / "samples-2-False.h5"
    with h5py.File(old, "r+") as f:
        del f.attrs["storage"], f.attrs["layers"], f.attrs["field_crc32"]
    meta = open_cache(old).meta
    assert meta.storage == "fp16" and meta.layers == (0, 1, 2, 3) and meta == make_meta(pad30_padding="samples")
    assert make_meta(storage="int8").digest() != make_meta().digest() != make_meta(layers=(1, 2, 3, 4)).digest()


def test_one_cache_holds_one_precision_and_one_layer_set(tmp_path):
    x = np.ones((2, 4, 25, 16), np.float32)
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    write_shard(a, make_meta(), ["a1", "a2"], x, [(), ()])
    write_shard(b, make_meta(storage="int8"), ["b1", "b2"], x, [(), ()])
    write_shard(c, make_meta(layers=(2, 3, 4, 5)), ["c1", "c2"], x, [(), ()])
    with pytest.raises(CacheError, match="storage: 'fp16' != 'int8'"):
        build_index(tmp_path / "ab.h5", [a, b])
    with pytest.raises(CacheError, match="layers: 0:4 != 2:6"):
        build_index(tmp_path / "ac.h5", [a, c])
    # two caches may differ in precision (readers make it transparent), never in layers
    assert make_meta().incompatibilities(make_meta(storage="int8")) == []
    assert make_meta().incompatibilities(make_meta(layers=(2, 3, 4, 5))) == ["layers: 0:4 != 2:6"]
    with pytest.raises(CacheError, match="layers"):
        make_meta(layers=(0, 1, 2))      # not n_layers of them
    with pytest.raises(CacheError, match="layers"):
        make_meta(layers=(3, 2, 1, 0))   # not increasing
    with pytest.raises(CacheError, match="storage"):
        make_meta(storage="fp8")


# ---------------------------------------------------------------- extraction

OPTS = dict(model="tiny.en", policy="trim", clip_seconds=2.0, shard_size=4, batch_size=4, num_workers=0,
            progress=False, limit=6)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from wat.data.demo import make_demo
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, clips_per_class=1, seed=0)
    return root


def test_extract_int8_layer_subset_and_refusals(small_demo, tiny_model, tmp_path):
    from wat.data.datasets import load_dataset
    from wat.extract.pipeline import ExtractError, ExtractOptions, extract_dataset

    ds = load_dataset("esc50", small_demo)
    full = extract_dataset(ds, ExtractOptions(**OPTS), tmp_path / "full.h5", model=tiny_model)
    out = tmp_path / "sub.h5"
    extract_dataset(ds, ExtractOptions(**OPTS, storage="int8", layers=(1, None)), out, model=tiny_model)
    sub, ref = open_cache(out), open_cache(full.index)
    assert sub.meta.storage == "int8" and sub.meta.layers == (1, 2, 3) and sub.meta.n_layers == 3
    assert sub.meta.incompatibilities(ref.meta) == ["n_layers: 3 != 4", "layers: 1:4 != 0:4"]
    with h5py.File(sub.shards[0][0], "r") as f:
        assert f["features"].dtype == np.int8 and f["features"].shape[1] == 3
    want = ref.read("features", np.arange(len(ref)))[:, 1:].astype(np.float32)
    got = sub.read("features", np.arange(len(sub))).astype(np.float32)
    amax = np.abs(want).max(axis=(0, 2))[:, None, :]
    assert (np.abs(got - want) <= amax / 254 + np.abs(want) * 2 ** -9 + 1e-3).all()
    # one output, one precision and one layer set: a different rerun is refused unless --overwrite
    for change in (dict(storage="fp16", layers=(1, None)), dict(storage="int8"), dict(storage="int8", layers=(0, 2))):
        with pytest.raises(ExtractError, match="extracted differently"):
            extract_dataset(ds, ExtractOptions(**{**OPTS, **change}), out, model=tiny_model)
    s = extract_dataset(ds, ExtractOptions(**OPTS, overwrite=True), out, model=tiny_model)
    assert open_cache(s.index).meta.storage == "fp16" and open_cache(s.index).meta.n_layers == 4
    with pytest.raises(ExtractError, match="--layers: layers 0:99 outside the encoder's 4 blocks"):
        extract_dataset(ds, ExtractOptions(**OPTS, layers=(0, 99)), tmp_path / "x.h5", model=tiny_model)


@pytest.mark.parametrize("args, message", [
    (["--layers", "5:2"], "START must be below STOP"),
    (["--layers", "2"], "expected START:STOP"),
    (["--layers", "a:b"], "expected START:STOP"),
    (["--layers", ":0"], "numbered from 0"),
    (["--storage", "fp8"], "invalid choice: 'fp8'"),
    (["--store", "fp8"], "invalid choice: 'fp8'"),  # the old spelling
])
def test_cli_rejects_bad_storage_and_layers(args, message, capsys, tmp_path):
    from wat.extract.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "esc50", "--root", str(tmp_path), "--model", "tiny.en", "--out", str(tmp_path / "f.h5"),
              *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and err[-1].startswith("wat-extract: error:")


def test_old_store_names_mean_storage():
    """`store` names the reader (FeatureStore); the stored precision is `storage`. The old spellings
    keep working: wat-extract --store (unlisted), ExtractOptions(store=) (deprecated), options.store."""
    import dataclasses

    from wat.extract.cli import parser
    from wat.extract.pipeline import ExtractOptions

    base = ["--dataset", "esc50", "--root", ".", "--model", "tiny.en", "--out", "f.h5"]
    assert parser().parse_args(base).storage == "fp16"
    assert parser().parse_args(base + ["--store", "int8"]).storage == "int8"
    assert parser().parse_args(base + ["--storage", "int8"]).storage == "int8"
    assert "--store " not in parser().format_help() and "--storage" in parser().format_help()
    with pytest.warns(DeprecationWarning, match="storage="):
        old = ExtractOptions(store="int8")
    assert old.storage == old.store == "int8" and old == ExtractOptions(storage="int8")
    with pytest.raises(TypeError, match="storage= only"):
        ExtractOptions(store="int8", storage="fp16")
    assert "store" not in {f.name for f in dataclasses.fields(ExtractOptions)}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(old, policy="trim").storage == "int8"  # no warning: store is no field

def test_cli_layers_beyond_the_model_is_one_error_line(small_demo, tmp_path, capsys):
    from wat.extract.cli import main
    code = main(["--dataset", "esc50", "--root", str(small_demo), "--model", "tiny.en", "--limit", "2",
                 "--out", str(tmp_path / "f.h5"), "--layers", "0:99"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["wat-extract: error: --layers: layers 0:99 outside the encoder's 4 blocks "
                                 "(0:4 is all of them)"]


# ---------------------------------------------------------------- heads on int8 / subset caches

def test_int8_trained_head_scores_fp16_features_alike(demo_cache_pad30, tmp_path):
    from wat.eval.evaluate import EvalOptions, evaluate
    from wat.train.loop import TrainOptions, train

    q = relayout(demo_cache_pad30, tmp_path / "q", storage="int8")
    run = tmp_path / "run"
    train(TrainOptions(features=str(q), out=str(run), head="tl-tr", proj_dim=64, epochs=20, lr=1e-3, batch_size=8,
                       mixup=0.0, seed=0, progress=False))
    on_int8 = evaluate(q, run / "wa.pt", tmp_path / "e8", EvalOptions(device="cpu"))
    on_fp16 = evaluate(demo_cache_pad30, run / "wa.pt", tmp_path / "e16", EvalOptions(device="cpu"))
    assert on_fp16["accuracy"] == on_int8["accuracy"] >= 0.9


def test_layer_subset_head_through_train_eval_tag_probe(demo_cache_pad30, tiny_model, demo_data, tmp_path):
    from wat.eval.evaluate import EvalError, EvalOptions, evaluate
    from wat.eval.probe import ProbeError, ProbeOptions, probe
    from wat.tag import transcribe_and_tag
    from wat.data.heads import load_head
    from wat.train.loop import TrainError, TrainOptions, train

    sub = relayout(demo_cache_pad30, tmp_path / "sub", blocks=(1, 2, 3))
    run = tmp_path / "run"
    train(TrainOptions(features=str(sub), out=str(run), head="tl-tr", proj_dim=64, epochs=20, lr=1e-3, batch_size=8,
                       mixup=0.0, seed=0, progress=False))
    head, info = load_head(run / "wa.pt")
    assert info.layers == [1, 2, 3] and info.n_layers == 3
    assert evaluate(sub, run / "wa.pt", tmp_path / "e", EvalOptions(device="cpu"))["accuracy"] >= 0.9
    other = relayout(demo_cache_pad30, tmp_path / "other", blocks=(0, 1, 2))  # same count, other blocks
    with pytest.raises(EvalError, match=r"encoder blocks: head reads \[1, 2, 3\], the features hold \[0, 1, 2\]"):
        evaluate(other, run / "wa.pt", tmp_path / "e2", EvalOptions(device="cpu"))
    with pytest.raises(EvalError, match="layers x width"):
        evaluate(demo_cache_pad30, run / "wa.pt", tmp_path / "e3", EvalOptions(device="cpu"))
    with pytest.raises(TrainError, match="encoder blocks"):
        train(TrainOptions(features=str(other), out=str(tmp_path / "r2"), head="tl-tr", proj_dim=64, epochs=1,
                           init=str(run / "wa.pt"), progress=False))
    # wat-tag feeds the head blocks 1..3 of the full encoder: a demo clip gets its own class on top
    import csv
    with open(demo_data / "meta" / "esc50.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["fold"] == "1")
    out = transcribe_and_tag(tiny_model, (head, info), demo_data / "audio" / row["filename"], time_res=5.0, top_k=1)
    assert out["audio_tags"][0]["tags"][0][0] == row["category"]
    # wat-probe names layers by encoder block
    report = probe([sub], None, ProbeOptions(fusion=(), jobs=1))
    assert [r.feature.layers[0][0] for r in report.layer_results()] == [1, 2, 3]
    with pytest.raises(ProbeError, match="out of range"):
        probe([sub], None, ProbeOptions(layers=[0], fusion=(), jobs=1))


def test_shared_encoder_taps_only_the_head_blocks(tiny_model, speech_audio):
    from wat.tag.tagging import SharedEncoder

    import whisper
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(speech_audio)))[None]
    got = {}
    for layers in (None, (1, 3)):
        calls = []
        enc = SharedEncoder(tiny_model.encoder, speech_audio, lambda *c: calls.append(c), layers)
        enc.locate = lambda x: (0, 400)  # a call outside transcribe: place it at the start
        with enc, torch.inference_mode():
            enc(mel)
        got[layers] = calls[0][2]
    assert got[(1, 3)].shape[1] == 2 and torch.equal(got[(1, 3)], got[None][:, [1, 3]])
