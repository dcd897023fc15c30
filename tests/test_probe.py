"""wat-probe on synthetic caches: one informative layer among noise layers."""
import csv
import json
import os

import numpy as np
import pytest

from wat.data.labels import Vocabulary
import synthetic_cache as synthetic
from wat.eval import probe as P
from wat.eval.cli import probe_main
from wat.eval.report import write_probe


def write_synthetic_cache(root, *, n=150, n_layers=4, dim=12, n_classes=5, informative=2, multilabel=False,
                          folds=True, seed=0, ids=None, n_frames=1, model="synthetic", fingerprint="f" * 16,
                          shards=2, scale=2.0, centers_seed=None):
    """Class-dependent means on layer `informative` only, unit noise everywhere. Returns feats.h5."""
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(tuple(f"k{i}" for i in range(n_classes)), tuple(f"class {i}" for i in range(n_classes)))
    meta = synthetic.synthetic_meta(model=model, fingerprint=fingerprint, n_layers=n_layers, n_frames=n_frames, dim=dim,
                          vocab=vocab, multilabel=multilabel)
    # caches with the same seed share labels (whatever their shape) and class centres (whatever n);
    # centers_seed: the same classes with other clips
    if multilabel:
        y = rng.random((n, n_classes)) < 0.3
        labels = [tuple(int(c) for c in np.flatnonzero(r)) for r in y]
    else:
        y = rng.permutation(np.arange(n) % n_classes)
        labels = [(int(c),) for c in y]
    centers = np.random.default_rng([seed if centers_seed is None else centers_seed, 1]).normal(size=(n_classes, dim)) * scale
    signal = y.astype(float) @ centers if multilabel else centers[y]
    x = rng.normal(size=(n, n_layers, n_frames, dim))
    x[:, informative] += signal[:, None, :]
    ids = ids or [f"clip{i:05d}" for i in range(n)]
    fold = np.arange(n) % 5 + 1 if folds else None
    synthetic.write_synthetic_cache(root / "feats.h5", meta, x, labels, ids=ids, folds=fold, shards=shards,
                                    shard_dir=root / "shards")
    return root / "feats.h5"


def test_single_label_probe_finds_informative_layer(tmp_path):
    feats = write_synthetic_cache(tmp_path / "c", informative=2)
    rep = P.probe([feats], None, P.ProbeOptions(jobs=1))
    assert rep.metric == "accuracy" and rep.n_folds == 5 and "cache folds" in rep.protocol
    layers = rep.layer_results()
    assert [r.feature.layers[0][0] for r in layers] == [0, 1, 2, 3]
    assert rep.best().feature.layers[0][0] == 2
    assert layers[2].score > 0.9 and rep.chance == pytest.approx(0.2)
    assert all(r.score < 0.5 for i, r in enumerate(layers) if i != 2)   # noise layers near chance
    fusion = {r.feature.kind: r for r in rep.fusion_results()}
    assert set(fusion) == {"mean", "concat"} and fusion["concat"].score > 0.8

    s = write_probe(rep, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("layers.csv", "classwise_f1.csv", "fusion.csv", "best_layer_hist.png", "layers.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[2]["score"]) == pytest.approx(layers[2].score)
    cw = list(csv.DictReader(open(out / "classwise_f1.csv")))
    assert len(cw) == 5 and set(cw[0]) == {"class", "name", "layer_0", "layer_1", "layer_2", "layer_3"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_layer"]["layer"] == 2
    # every class peaks at the informative layer
    assert summary["best_layer_hist"][0]["classes_per_layer"] == [0, 0, 5, 0] == s["best_layer_hist"][0]["classes_per_layer"]


def test_parallel_jobs_match_serial_and_layer_subset(tmp_path):
    feats = write_synthetic_cache(tmp_path / "c", informative=1)
    opts = dict(layers=[1, 3], fusion=("mean",))  # the cache's own 5 folds
    a = P.probe([feats], None, P.ProbeOptions(jobs=1, **opts))
    b = P.probe([feats], None, P.ProbeOptions(jobs=2, **opts))
    assert [r.feature.name for r in a.results] == ["0:1", "0:3", "mean[0]"]
    np.testing.assert_allclose([r.fold_scores for r in a.results], [r.fold_scores for r in b.results])


def test_kfold_without_cache_folds_and_eval_cache(tmp_path):
    train = write_synthetic_cache(tmp_path / "tr", folds=False, informative=0, seed=1)
    rep = P.probe([train], None, P.ProbeOptions(folds=3, fusion=()))
    assert rep.n_folds == 3 and "seeded" in rep.protocol and rep.best().feature.layers[0][0] == 0
    # the same class centres (seed) with fresh noise: test on a separate eval cache
    test = write_synthetic_cache(tmp_path / "te", folds=False, informative=0, seed=1, n=60,
                                 ids=[f"eval{i}" for i in range(60)])
    rep = P.probe([train], [test], P.ProbeOptions(fusion=()))
    assert rep.protocol == "eval cache" and rep.n_folds == 1
    assert rep.layer_results()[0].score > 0.9


def test_multilabel_probe(tmp_path):
    feats = write_synthetic_cache(tmp_path / "m", multilabel=True, informative=3, n=200)
    rep = P.probe([feats], None, P.ProbeOptions(fusion=(), device="cpu", max_iter=50))
    assert rep.metric == "mAP"
    layers = rep.layer_results()
    assert rep.best().feature.layers[0][0] == 3
    assert layers[3].score > 0.9 and all(layers[i].score < 0.6 for i in (0, 1, 2))
    assert 0.2 < rep.chance < 0.4    # label prevalence: the AP of a random ranking
    write_probe(rep, tmp_path / "out")
    assert (tmp_path / "out" / "classwise_ap.csv").exists()


def test_several_caches_concat_and_id_mismatch(tmp_path):
    a = write_synthetic_cache(tmp_path / "a", informative=0, seed=3)
    b = write_synthetic_cache(tmp_path / "b", informative=2, seed=3, n_layers=3, dim=8, model="other",
                              fingerprint="e" * 16)
    rep = P.probe([a, b], None, P.ProbeOptions(fusion=("mean",)))
    names = [r.feature.name for r in rep.results]
    assert names[:7] == ["0:0", "0:1", "0:2", "0:3", "1:0", "1:1", "1:2"]
    assert "mean[0+1]" in names and rep.layer_results(1)[2].score > 0.9

    shuffled = [f"clip{i:05d}" for i in range(150)]
    shuffled[3], shuffled[4] = shuffled[4], shuffled[3]
    c = write_synthetic_cache(tmp_path / "c", seed=3, ids=shuffled)
    with pytest.raises(P.ProbeError, match="same clip ids in the same order"):
        P.probe([a, c], None, P.ProbeOptions())


def test_cli_outputs_and_errors(tmp_path, capsys):
    feats = write_synthetic_cache(tmp_path / "c", informative=1)
    assert probe_main(["--features", str(feats), "--layers", "0,1", "--fusion", "none", "--jobs", "1",
                       "--out", str(tmp_path / "p")]) == 0
    assert "best layer 1" in capsys.readouterr().out
    assert not (tmp_path / "p" / "fusion.csv").exists()
    assert probe_main(["--features", str(feats), "--layers", "0,1", "--fusion", "mean", "--jobs", "1",
                       "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out  # one cache: no "features 0" index in what a person reads
    assert "fusion mean of the layers: accuracy" in out and "features" not in out
    assert probe_main(["--features", str(feats), "--layers", "0,9", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "layer(s) [9] out of range" in err and "Traceback" not in err
    assert probe_main(["--features", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "q")]) == 2
    assert probe_main(["--features", str(feats), "--fusion", "max", "--out", str(tmp_path / "q")]) == 2


def test_layers_option_blocks_and_ranges(tmp_path, capsys):
    """--layers takes blocks and wat-extract's START:STOP slices (an open end: the cache's first or
    last block); blocks the cache lacks or names twice are one error line, exit 2, after the cache opens."""
    from wat.data.clikit.args import layer_list, layers_text
    feats = write_synthetic_cache(tmp_path / "c", n_layers=6, n=60)
    cache = P._open([feats])
    for text, want in [("all", (0, 1, 2, 3, 4, 5)), ("2", (2,)), ("1:3", (1, 2)), ("4:", (4, 5)), (":2", (0, 1)),
                       ("5,0:2, 3", (5, 0, 1, 3)), (" ALL ", (0, 1, 2, 3, 4, 5))]:
        spec = layer_list(text)
        assert P.select_layers(cache, spec) == [want], text
        assert P.select_layers(cache, layer_list(layers_text(spec))) == [want], text   # the text round-trips
    assert P.select_layers(cache, [3, 1]) == [(3, 1)]      # the API's plain list of blocks
    for text, match in [("1,1", r"layer\(s\) \[1\] more than once"), ("0:3,2", r"\[2\] more than once"),
                        ("6", r"\[6\] out of range"), ("4:7", r"\[4:7\] out of range"),
                        (f"0:{10**12}", r"out of range: .* holds layers 0\.\.5"), ("9:", r"\[9:\] out of range")]:
        with pytest.raises(P.ProbeError, match=match):
            P.select_layers(cache, layer_list(text))
        assert probe_main(["--features", str(feats), "--layers", text, "--jobs", "1", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wat-probe: error: "), err
    assert not (tmp_path / "o").exists()
    assert probe_main(["--features", str(feats), "--layers", "2:4", "--fusion", "none", "--jobs", "1",
                       "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [row["layer"] for row in summary["layers"]] == [2, 3]
    assert "2:4" in (tmp_path / "r" / "report.html").read_text()   # the options as typed


def test_layer_probe_reads_only_its_layer(tmp_path, monkeypatch):
    from wat.data.cache import view
    feats = write_synthetic_cache(tmp_path / "c", n_layers=5)
    seen = []
    real = view._ShardField.__getitem__

    def spy(self, key):
        out = real(self, key)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(view._ShardField, "__getitem__", spy)
    x = P.load_matrix(P._open([feats]), P.Feature("layer", (0,), ((3,),)))
    assert x.shape == (150, 12) and x.dtype == np.float32
    assert seen and all(s[1] == 1 for s in seen)          # one layer per read, never [rows, L, D]
    ref = P._open([feats])[0].read("mean", np.arange(150))[:, 3].astype(np.float32)
    np.testing.assert_array_equal(x, ref)


def test_dask_scheduler(tmp_path):
    from distributed import LocalCluster
    feats = write_synthetic_cache(tmp_path / "c", informative=1)
    opts = dict(layers=[0, 1], fusion=())
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        a = P.probe([feats], None, P.ProbeOptions(scheduler=cluster.scheduler_address, **opts))
    b = P.probe([feats], None, P.ProbeOptions(jobs=1, **opts))
    assert a.best().feature.layers[0][0] == 1
    np.testing.assert_allclose([r.fold_scores for r in a.results], [r.fold_scores for r in b.results])


def test_demo_cache_best_layer_far_above_chance(demo_cache_trim, tmp_path):
    """Real tiny.en features of the synthetic demo sounds (ESC-50 layout, 5 folds)."""
    rep = P.probe([demo_cache_trim], None, P.ProbeOptions(fusion=("mean",)))
    s = write_probe(rep, tmp_path / "p")
    assert rep.n_folds == 5 and rep.chance < 0.15
    best = rep.best()
    assert best.score > 0.5 and best.score > 5 * rep.chance
    assert s["best_layer"]["score"] == best.score and len(s["layers"]) == 4   # tiny: 4 layers
    # the demo is hard enough that the layers tell apart: the curve is not flat at the top
    scores = [r.score for r in rep.layer_results()]
    assert max(scores) - min(scores) >= 0.05 and min(scores) < 0.9, scores


def test_the_linear_fit_is_sklearns_logistic_regression():
    """`fit_linear` (wat-probe's linear kind and wat-train's probe start): multi-label, C independent
    L2 logistic regressions (sklearn's objective); single-label, sklearn's multinomial fit, also with
    two classes present (sklearn's one binary row) and a class absent (probability 0)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from wat.eval.logistic import fit_linear
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3)) + rng.normal(size=(120, 3))) > 0.5
    w, b = fit_linear(x[:80], y[:80], True, C=0.5, max_iter=500)
    got = torch.sigmoid(torch.from_numpy(x[80:]) @ w.T + b).numpy()
    for c in range(3):
        ref = LogisticRegression(C=0.5, max_iter=1000, tol=1e-8).fit(x[:80], y[:80, c]).predict_proba(x[80:])[:, 1]
        np.testing.assert_allclose(got[:, c], ref, atol=2e-3)
    t = y.argmax(1) * 2                                  # classes 0, 2, 4 of 5 (1 and 3 absent)
    for present in ([0, 2, 4], [0, 4]):
        rows = np.isin(t, present)
        w, b = fit_linear(x[rows], np.eye(5, dtype=bool)[t[rows]], False, C=0.5)
        p = torch.softmax(torch.from_numpy(x[:10]) @ w.T + b, 1).numpy()
        ref = LogisticRegression(C=0.5).fit(x[rows], t[rows])
        np.testing.assert_allclose(p[:, present], ref.predict_proba(x[:10]), atol=1e-5)
        assert (p[:, [c for c in range(5) if c not in present]] == 0).all()


@pytest.mark.parametrize("per_block", [None, 1, 4], ids=["one-block", "1-class-blocks", "4-class-blocks"])
def test_batched_logistic_follows_sklearns_lbfgs_path(per_block):
    """Correlated features, rare classes: each class follows sklearn's lbfgs path (the same start, memory,
    line search and stop), so an early stop lands where sklearn's does, not only the optimum: after 5
    iterations the coefficients agree to float32 rounding; at tol 1e-4 the iteration counts, scores
    and APs agree (a failed first line-search trial is interpolated differently: a few iterations)."""
    import warnings
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from wat.eval.logistic import WORK_ARRAYS, fit_logistic
    rng = np.random.default_rng(2)
    z = rng.normal(size=(800, 60))
    x = z @ (rng.normal(size=(60, 60)) * np.logspace(0, 1, 60)[:, None])
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = (z[:, :6] + 0.7 * rng.normal(size=(800, 6))) > np.linspace(0.8, 2.6, 6)   # 146 .. 8 positives
    # classes fitted in blocks (the memory bound) follow the same path: a block's width changes only
    # the float32 rounding of the shared products
    block_bytes = {} if per_block is None else {"block_bytes": per_block * WORK_ARRAYS * 4 * 600}
    # one class per block makes the products matrix-vector ones (another BLAS kernel, other float32
    # rounding): near the tolerance class 0 then stops at 69 iterations vs sklearn's 62 (65 unblocked)
    slack = 8 if per_block == 1 else 5
    for max_iter in (5, 100):
        w, b, its = fit_logistic(torch.from_numpy(x[:600]), torch.from_numpy(y[:600]), C=1.0, tol=1e-4,
                                 max_iter=max_iter, **block_bytes)
        got = torch.sigmoid(torch.from_numpy(x[600:]) @ w.T + b).numpy()
        for c in range(6):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                ref = LogisticRegression(C=1.0, max_iter=max_iter).fit(x[:600].astype(np.float64), y[:600, c])
            rel = np.linalg.norm(w[c].numpy() - ref.coef_[0]) / np.linalg.norm(ref.coef_[0])
            if max_iter == 5:
                assert its[c] == 5 and rel < 1e-4, (c, rel)
            else:
                assert abs(int(its[c]) - int(ref.n_iter_[0])) <= slack and rel < 0.03, (c, its[c], ref.n_iter_, rel)
                p_ref = ref.predict_proba(x[600:])[:, 1]
                assert np.abs(got[:, c] - p_ref).max() < 0.02
                assert abs(average_precision_score(y[600:, c], got[:, c])
                           - average_precision_score(y[600:, c], p_ref)) < 0.005



@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_multilabel_fit_memory_is_bounded_by_its_block():
    """The fit's peak memory beyond x and y stays within `block_bytes` (WORK_ARRAYS [K, N] float32
    arrays per block): bench/probe_memory.py measures the peak RSS of a fresh process (arrays > 32 MB,
    which malloc maps and unmaps, so RSS follows what is alive). 8 classes x 2.5M clips, blocks of 4."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    from wat.eval.logistic import WORK_ARRAYS
    script = Path(__file__).resolve().parents[1] / "bench" / "probe_memory.py"
    out = subprocess.run([sys.executable, str(script), "--clips", "2500000", "--classes", "8", "--block-classes", "4"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    arrays = float(re.search(r"= ([\d.]+) \[block, N\] float32 arrays", out).group(1))
    # within the bound, and not far below it: WORK_ARRAYS is what the fit holds, not a loose bound
    assert 0.6 * WORK_ARRAYS < arrays <= WORK_ARRAYS and "within" in out, out


def test_the_same_cache_twice_is_one_error_line(tmp_path, capsys, monkeypatch):
    # it was probed concatenated with itself, as a second encoder (fusion_cat of one cache twice)
    monkeypatch.chdir(tmp_path)
    assert probe_main(["--features", "a.h5", "--features", "./a.h5", "--out", "o"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0] == "wat-probe: error: --features a.h5: the same cache given twice", err
    assert not (tmp_path / "o").exists()
    # the library refuses it too (paths or open caches, --eval-features alike), before opening anything
    for feats, ev, what in ((["a.h5", "./a.h5"], None, "--features a.h5"), (["a.h5", "b.h5"], ["c.h5", "c.h5"],
                                                                        "--eval-features c.h5")):
        with pytest.raises(P.ProbeError, match=f"^{what}: the same cache given twice$"):
            P.probe(feats, ev)
