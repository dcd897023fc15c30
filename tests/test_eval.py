"""wat-eval: a head trained here on synthetic caches, scored, thresholds tuned off the eval set."""
import csv
import json

import numpy as np
import pytest
import torch

from test_probe import write_synthetic_cache
from wat.data.cache import open_cache
from wat.eval import metrics
from wat.eval.cli import eval_main
from wat.eval.evaluate import EvalError, EvalOptions, evaluate, predict
from wat.data.heads import HeadInfo, build_head, load_head, save_head


def fit_head(feats, path, epochs=150, **info_changes):
    """A WA-MLP fitted full-batch on the cache's `mean` field."""
    cache = open_cache(feats)
    m = cache.meta
    torch.manual_seed(0)
    head = build_head("wa-mlp", m.n_layers, m.dim, len(m.vocab))
    x = torch.from_numpy(cache.read("mean", np.arange(len(cache)))).float()
    y = torch.from_numpy(cache.label_matrix()).float()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        z = head(x)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, y) if m.multilabel
                else torch.nn.functional.cross_entropy(z, y.argmax(1)))
        loss.backward()
        opt.step()
    fields = dict(kind="wa-mlp", n_layers=m.n_layers, dim_in=m.dim, n_classes=len(m.vocab), n_frames=m.n_frames,
                  vocab_json=m.vocab.to_json(), model=m.model, fingerprint=m.fingerprint, policy=m.policy,
                  multilabel=m.multilabel)
    fields.update(info_changes)
    save_head(path, head, HeadInfo(**fields))
    return path


def test_single_label_outputs(tmp_path):
    kw = dict(n_classes=4, centers_seed=2, scale=0.6)   # overlapping classes: some errors
    train = write_synthetic_cache(tmp_path / "tr", seed=2, **kw)
    test = write_synthetic_cache(tmp_path / "te", seed=3, n=80, ids=[f"t{i:03d}" for i in range(80)], **kw)
    head = fit_head(train, tmp_path / "wa.pt")
    out = tmp_path / "ev"
    r = evaluate(test, head, out, EvalOptions(top_k=2, device="cpu"))
    assert r["metric"] == "accuracy" and 0.5 < r["accuracy"] < 1 and r["top_k_accuracy"] > r["accuracy"]

    pred = np.load(out / "predictions.npz")
    assert pred["probs"].dtype == np.float16 and pred["probs"].shape == (80, 4)
    assert list(pred["ids"]) == [f"t{i:03d}" for i in range(80)] and pred["top_k"].shape == (80, 2)
    y = open_cache(test).label_matrix().argmax(1)
    assert metrics.accuracy(y, pred["probs"].astype(np.float32).argmax(1)) == pytest.approx(r["accuracy"])
    np.testing.assert_allclose(pred["probs"].astype(np.float32).sum(1), 1, atol=5e-3)   # softmax

    rows = list(csv.DictReader(open(out / "per_class.csv")))
    ap = [float(row["AP"]) for row in rows]
    assert ap == sorted(ap, reverse=True) and {row["name"] for row in rows} == {f"class {i}" for i in range(4)}
    assert sum(int(row["support"]) for row in rows) == 80
    cm = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(open(out / "confusion.csv")))[1:]])
    assert cm.sum() == 80 and np.trace(cm) == round(r["accuracy"] * 80)
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(r["accuracy"]) and saved["skipped_classes"] == []


def test_thresholds_tuned_on_tuning_set_only(tmp_path):
    kw = dict(multilabel=True, n_classes=4, centers_seed=5, scale=1.0)
    train = write_synthetic_cache(tmp_path / "tr", n=200, seed=5, **kw)
    val = write_synthetic_cache(tmp_path / "va", n=100, seed=6, ids=[f"v{i:03d}" for i in range(100)], **kw)
    test = write_synthetic_cache(tmp_path / "te", n=100, seed=7, ids=[f"e{i:03d}" for i in range(100)], **kw)
    head_path = fit_head(train, tmp_path / "wa.pt")
    out = tmp_path / "ev"
    r = evaluate(test, head_path, out, EvalOptions(tune_on=str(val), device="cpu"))
    assert r["metric"] == "mAP" and r["mAP"] > 0.7 and r["d_prime"] > 0 and r["accuracy"] is None
    assert r["tuning"]["n_clips"] == 100 and r["decisions"]["thresholds"].startswith("tuned on 100 clips")

    # the exported thresholds are exactly the max-F1 thresholds of the tuning-set predictions
    head, info = load_head(out / "head_thresholds.pt")
    vcache = open_cache(val)
    pv = predict(head, info, vcache)
    want = [metrics.best_f1_threshold(vcache.label_matrix()[:, c], pv[:, c])[0] for c in range(4)]
    np.testing.assert_allclose(info.thresholds, want)
    tcache = open_cache(test)
    pt = predict(head, info, tcache)
    on_eval = [metrics.best_f1_threshold(tcache.label_matrix()[:, c], pt[:, c])[0] for c in range(4)]
    assert not np.allclose(want, on_eval)    # tuning on the eval set would have given other values
    assert len(list(csv.DictReader(open(out / "thresholds.csv")))) == 4
    # a later run picks the stored thresholds up
    r2 = evaluate(test, out / "head_thresholds.pt", tmp_path / "ev2", EvalOptions(device="cpu"))
    assert r2["decisions"]["thresholds"] == "stored in the head"
    assert r2["decisions"]["macro_f1"] == pytest.approx(r["decisions"]["macro_f1"])

    # one threshold for all classes
    r4 = evaluate(test, head_path, tmp_path / "ev4", EvalOptions(threshold=0.5, device="cpu"))
    p = np.load(tmp_path / "ev4" / "predictions.npz")["probs"].astype(np.float32)
    y = tcache.label_matrix()
    tp, called = (y & (p >= 0.5)).sum(0), (p >= 0.5).sum(0)
    assert r4["decisions"]["macro_f1"] == pytest.approx(np.mean(2 * tp / (y.sum(0) + called)), abs=1e-3)

    # tuning clips that are also evaluated are refused, also through a fold subset
    with pytest.raises(EvalError, match="must not be tuned on evaluated clips"):
        evaluate(test, head_path, tmp_path / "x", EvalOptions(tune_on=str(test), device="cpu"))
    r3 = evaluate(test, head_path, tmp_path / "ev3", EvalOptions(tune_on=str(train), tune_folds=(5,), device="cpu"))
    assert r3["tuning"]["n_clips"] == 40 and r3["tuning"]["folds"] == [5]


def test_head_cache_mismatch_errors(tmp_path, capsys):
    feats = write_synthetic_cache(tmp_path / "c", n_classes=4)
    other_weights = fit_head(feats, tmp_path / "a.pt", epochs=1, fingerprint="0" * 16, model="base")
    with pytest.raises(EvalError, match="Whisper weights: head trained on base"):
        evaluate(feats, other_weights, tmp_path / "o", EvalOptions(device="cpu"))
    policy = fit_head(feats, tmp_path / "b.pt", epochs=1, policy="pad30")
    with pytest.raises(EvalError, match="input policy: head pad30, cache trim"):
        evaluate(feats, policy, tmp_path / "o", EvalOptions(device="cpu"))
    other = write_synthetic_cache(tmp_path / "d", n_classes=5)
    assert eval_main(["--features", str(other), "--head", str(tmp_path / "a.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "classes: head has 4 classes, cache 5" in err and "Traceback" not in err
    good = fit_head(feats, tmp_path / "g.pt", epochs=1)
    assert eval_main(["--features", str(feats), "--head", str(good), "--tune-thresholds-on", str(feats),
                      "--out", str(tmp_path / "o")]) == 2
    assert "multi-label" in capsys.readouterr().err
    assert eval_main(["--features", str(feats), "--head", str(good), "--out", str(tmp_path / "o")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_real_trainer_head_on_demo_cache(demo_cache_pad30, demo_head_pad30, demo_cache_trim, tmp_path):
    """A TL-Tr head from wat-train on tiny.en features: its HeadInfo passes the checks, outputs parse."""
    r = evaluate(demo_cache_pad30, demo_head_pad30, tmp_path / "ev", EvalOptions(device="cpu"))
    assert r["kind"] == "tl-tr" and r["n_clips"] == 22 and r["accuracy"] > 0.5   # the clips it trained on
    assert np.load(tmp_path / "ev" / "predictions.npz")["probs"].shape == (22, 11)
    # same model and classes, other input policy: refused
    with pytest.raises(EvalError, match="input policy: head pad30, cache trim"):
        evaluate(demo_cache_trim, demo_head_pad30, tmp_path / "x", EvalOptions(device="cpu"))
