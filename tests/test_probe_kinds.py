"""Probe kinds (`wat.eval.probe_kinds`): linear, X-ARES's MLP and kNN; wat-probe --probe."""
import csv
import json

import numpy as np
import pytest

from wat.eval import probe as P
from wat.eval import probe_kinds as K
from wat.eval.cli import probe_main

from test_probe import write_synthetic_cache

KINDS = ("linear", "mlp", "knn")


def toy(n=2000, d=16, n_classes=4, multilabel=False, seed=0):
    """Separable clusters around far-apart centres in 16 dimensions, plus 48 dimensions of one
    constant pattern shared by every clip (real embeddings have a large common component; it also
    keeps a clip's LayerNorm statistics steady, which multi-label sums of centres alone would not).
    2000 clips: 1600 to train on, as in an ESC-50 fold, so the MLP gets its protocol's ~500 steps."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, d)) * 4
    if multilabel:
        y = rng.random((n, n_classes)) < 0.3
        x = y.astype(float) @ centers
    else:
        y = rng.permutation(np.arange(n) % n_classes)
        x = centers[y]
    x = x + rng.normal(size=(n, d)) * 0.5
    return np.concatenate([x, np.tile(rng.normal(size=48) * 8, (n, 1))], 1).astype(np.float32), y


def score(kind, x, y, multilabel, n_classes=4):
    import torch

    from wat.eval import metrics

    torch.set_num_threads(1)   # as wat-probe fits (two threads on a shared box are many times slower)

    opts = P.ProbeOptions(device="cpu", seed=0)
    cut = len(x) * 4 // 5
    probs = K.KINDS[kind]().fit_predict(x[:cut], y[:cut], x[cut:], n_classes=n_classes, multilabel=multilabel,
                                        opts=opts)
    assert probs.shape == (len(x) - cut, n_classes) and probs.dtype == np.float32
    if multilabel:
        ap, _ = metrics.per_class_ap(y[cut:], probs)
        return float(np.mean([v for v in ap if v is not None]))
    return float((probs.argmax(1) == y[cut:]).mean())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("multilabel", [False, True])
def test_each_kind_separates_a_separable_problem_and_not_shuffled_labels(kind, multilabel):
    x, y = toy(multilabel=multilabel)
    assert score(kind, x, y, multilabel) > 0.97
    shuffled = np.random.default_rng(1).permutation(y)
    chance = y[len(y) * 4 // 5:].mean() if multilabel else 0.25   # mAP of random scores ~ prevalence
    assert abs(score(kind, x, shuffled, multilabel) - chance) < 0.15


def _cosine_reference(xtr, ytr, xte, n_classes, k, T, multilabel):
    """sklearn's brute-force cosine neighbours, then X-ARES's weighting written out per clip."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(xtr)
    dist, idx = nn.kneighbors(xte)
    out = np.zeros((len(xte), n_classes))
    for i in range(len(xte)):
        w = np.exp((1 - dist[i]) / T)
        w /= w.sum()
        for wj, j in zip(w, idx[i]):
            if multilabel:
                out[i] += wj * ytr[j]
            else:
                out[i, ytr[j]] += wj
    return out


@pytest.mark.parametrize("multilabel", [False, True])
def test_knn_equals_brute_force_sklearn_cosine_neighbours_on_a_cache(tmp_path, multilabel):
    feats = write_synthetic_cache(tmp_path / "c", n=120, n_layers=3, dim=10, n_classes=5, informative=1,
                                  multilabel=multilabel, scale=1.0)
    caches = P._open([feats])
    y = P.targets(caches[0])
    folds = np.asarray(caches[0].folds)
    x = P.load_matrix(caches, P.Feature("layer", (0,), ((1,),)))
    knn = K.KNNProbe(block_bytes=4 * 96 * 7)    # 7 test rows per block: several blocks
    opts = P.ProbeOptions(device="cpu")
    accs = []
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        got = knn.fit_predict(x[tr], y[tr], x[te], n_classes=5, multilabel=multilabel, opts=opts)
        want = _cosine_reference(x[tr], y[tr], x[te], 5, 10, 0.07, multilabel)
        np.testing.assert_allclose(got, want, atol=2e-5)
        accs.append((got.argmax(1) == y[te]).mean() if not multilabel else None)
    rep = P.probe([feats], None, P.ProbeOptions(jobs=1, fusion=(), probes=("knn",), layers=[1], device="cpu"))
    assert rep.probes == ("knn",) and rep.layer_results()[0].probe == "knn"
    if not multilabel:
        assert rep.layer_results()[0].fold_scores == pytest.approx(accs)


def test_knn_with_fewer_training_clips_than_k_uses_them_all():
    x, y = toy(n=30)
    probs = K.KNNProbe(k=50).fit_predict(x[:6], y[:6], x[6:], n_classes=4, multilabel=False,
                                          opts=P.ProbeOptions(device="cpu"))
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("T", [1e-30, 1e-300])
def test_knn_with_a_tiny_temperature_is_the_nearest_neighbour_not_nan(T):
    x, y = toy(n=60)
    probs = K.KNNProbe(temperature=T).fit_predict(x[:40], y[:40], x[40:], n_classes=4, multilabel=False,
                                                   opts=P.ProbeOptions(device="cpu"))
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1)
    nearest = K.KNNProbe(k=1).fit_predict(x[:40], y[:40], x[40:], n_classes=4, multilabel=False,
                                          opts=P.ProbeOptions(device="cpu"))
    np.testing.assert_array_equal(probs.argmax(1), nearest.argmax(1))


def test_mlp_learning_rate_follows_xares_cosine_schedule():
    m = K.MLPProbe()
    assert (m.lr, m.epochs, m.batch_size) == (1e-3, 10, 32)
    assert m.lr_at(0) == pytest.approx(1e-3)
    assert m.lr_at(5) == pytest.approx(0.55e-3)          # half way between lr and lr / 10
    assert m.lr_at(10) == pytest.approx(1e-4)
    assert all(m.lr_at(e) > m.lr_at(e + 1) for e in range(9))
    assert K.MLPProbe(epochs=1).lr_at(0) == 1e-3


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=float("nan")), dict(epochs=0), dict(batch_size=-1)])
def test_mlp_refuses_bad_settings(bad):
    with pytest.raises(K.ProbeKindError):
        K.MLPProbe(**bad)


@pytest.mark.parametrize("bad", [dict(k=0), dict(temperature=0.0), dict(temperature=float("inf"))])
def test_knn_refuses_bad_settings(bad):
    with pytest.raises(K.ProbeKindError):
        K.KNNProbe(**bad)


def test_resolve_names_and_instances():
    got = K.resolve(["knn", K.MLPProbe(epochs=3)])
    assert [k.name for k in got] == ["knn", "mlp"] and got[1].epochs == 3
    for bad in (["nope"], [], ["knn", "knn"]):
        with pytest.raises(K.ProbeKindError):
            K.resolve(bad)


def test_a_new_kind_is_one_class():
    class Constant(K.ProbeKind):
        name = "constant-test"

        def fit_predict(self, xtr, ytr, xte, *, n_classes, multilabel, opts):
            return np.full((len(xte), n_classes), 1.0 / n_classes, np.float32)

    try:
        assert K.resolve(["constant-test"])[0].name == "constant-test"
    finally:
        del K.KINDS["constant-test"]


def test_wat_probe_runs_every_kind_into_one_report(tmp_path, capsys):
    feats = write_synthetic_cache(tmp_path / "c", n=100, n_layers=3, dim=8, informative=1)
    out = tmp_path / "out"
    assert probe_main(["--features", str(feats), "--probe", "linear,mlp,knn", "--out", str(out), "--jobs", "1",
                       "--mlp-epochs", "200", "--device", "cpu"]) == 0   # 600 steps: 80 clips
    text = capsys.readouterr().out
    for kind in KINDS:
        assert f"{kind} probe: best layer 1" in text
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert [r["probe"] for r in rows] == [k for k in KINDS for _ in range(3)]
    assert {r["probe"] for r in csv.DictReader(open(out / "fusion.csv"))} == set(KINDS)
    s = json.loads((out / "summary.json").read_text())
    assert s["probes"] == list(KINDS) and s["best_layer"] == s["best_layer_by_probe"]["linear"]
    assert all(s["best_layer_by_probe"][k]["layer"] == 1 for k in KINDS)
    assert all(s["best_layer_by_probe"][k]["score"] > 0.6 for k in KINDS)   # 80 training clips
    header = next(csv.reader(open(out / "classwise_f1.csv")))
    assert "mlp_layer_1" in header and "knn_layer_2" in header
    html = (out / "report.html").read_text()
    assert "knn probe" in html and "mlp probe" in html
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args", [["--probe", "bogus"], ["--probe", ""], ["--probe", "knn,knn"],
                                  ["--mlp-epochs", "0"], ["--mlp-lr", "nan"], ["--mlp-lr", "-1"],
                                  ["--mlp-batch-size", "0"], ["--knn-k", "0"], ["--knn-k", "-3"],
                                  ["--knn-temperature", "0"], ["--knn-temperature", "inf"],
                                  ["--knn-k", "1e100"]])
def test_wat_probe_refuses_bad_probe_options(tmp_path, capsys, args):
    feats = write_synthetic_cache(tmp_path / "c", n=50, n_layers=2, dim=4, informative=1)
    with pytest.raises(SystemExit) as e:
        rc = probe_main(["--features", str(feats), "--out", str(tmp_path / "o"), *args])
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("wat-probe: error:") and "Traceback" not in "".join(err)


def test_several_caches_and_kinds_in_one_report(tmp_path):
    from wat.eval.report import write_probe

    a = write_synthetic_cache(tmp_path / "a", n=60, n_layers=2, dim=6, informative=1)
    b = write_synthetic_cache(tmp_path / "b", n=60, n_layers=3, dim=5, informative=1, model="other", fingerprint="e" * 16)
    rep = P.probe([a, b], None, P.ProbeOptions(jobs=1, fusion=("mean",), probes=("knn", "linear"), device="cpu"))
    assert rep.probes == ("knn", "linear") and rep.best().probe == "knn"
    assert {r.probe for r in rep.fusion_results("linear")} == {"linear"}
    s = write_probe(rep, tmp_path / "out")
    assert [r["probe"] for r in s["layers"]] == ["knn"] * 5 + ["linear"] * 5
    assert s["best_layer"] == s["best_layer_by_probe"]["knn"]
