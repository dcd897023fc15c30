"""Probing at AudioSet shape: wat's multi-label probe vs sklearn one-vs-rest logistic regression.

A synthetic AudioSet-shaped cache pair is written through the real cache writer (`write_shard` +
`build_index`): 527 classes (the AudioSet vocabulary), `--clips` clips (default 20000, split into a
train cache and an eval cache, `--eval-fraction`), `--layers` x `--dim` (default 32 x 1280, large).
Only the `mean` dataset matters for probing, so clips are stored with ONE pooled frame (`n_frames=1`:
features == mean): 20000 large clips at 25 frames would be ~41 GB of `features` the probe never reads.

Label structure (graded, learnable, so mAP means something): class prevalences fall off like AudioSet's
(pi_c ~ 0.127 * (c+1)^-0.75: ~13% for the commonest class, ~0.1% = ~20 train clips for the rarest,
~2 labels per clip); each clip's layer-l mean is the sum over its labels of g_c * s_l * r * mu_c (unit
class directions mu_c, class strength g_c uniform in [0.3, 1], layer strength s_l peaking at 70% depth)
plus isotropic noise plus a shared 64-dimensional low-rank component (real features are anisotropic).

Per layer, interleaved: `wat.eval.probe.probe` on that layer (train cache -> eval cache, the cache
read, standardisation and scoring included in its time; its multi-label fit is sklearn's lbfgs path
batched over classes, `wat.eval.logistic`) and, on the `--sklearn-layers`, `OneVsRestClassifier(LogisticRegression)`
on `--sklearn-classes` classes (a spread over the frequency ranks, standardised features, time of the
fit only) whose time is extrapolated linearly to 527 classes (one-vs-rest fits are independent).
mAP is compared on the classes sklearn fitted (wat's per-class AP on the same classes). Both run
with one thread; CPU seconds are compared on a CPU (the machine may be shared: the load average is
printed with every layer). Target: wat >= 5x faster at equal mAP (within 0.005).

    python bench/probe_audioset.py --workdir /tmp/as-probe            # reuses the caches there
    python bench/probe_audioset.py --clips 2000 --layers 4 --dim 64 --sklearn-layers 1,3   # small
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wat.data.cache import build_index, open_cache, shard_path, write_shard
from wat.data.labels import audioset_vocabulary
from common import synthetic_meta
from wat.eval.probe import Feature, ProbeOptions, load_matrix, probe

from common import device_name, write_json


def prevalences(n_classes: int) -> np.ndarray:
    return 0.127 * (np.arange(n_classes) + 1.0) ** -0.75


def layer_strength(n_layers: int) -> np.ndarray:
    l = np.arange(n_layers) / max(1, n_layers - 1)
    return 0.2 + 0.8 * np.exp(-(((l - 0.7) / 0.3) ** 2))


def write_caches(root: Path, n: int, eval_fraction: float, n_layers: int, dim: int, r: float = 5.0,
                 shard_clips: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """(train index, eval index); reused when both exist with the same shape."""
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "train.h5", root / "eval.h5"
    want = dict(n=n, eval_fraction=eval_fraction, n_layers=n_layers, dim=dim, r=r, seed=seed)
    stamp = root / "params.json"
    if all(p.exists() for p in paths) and stamp.exists() and json.loads(stamp.read_text()) == want:
        return paths
    vocab = audioset_vocabulary()
    C = len(vocab)
    meta = synthetic_meta(vocab=vocab, multilabel=True, n_layers=n_layers, n_frames=1, dim=dim,
                          model="synthetic-large", clip_seconds=10.0, dataset="synthetic-audioset")
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((C, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    g = rng.uniform(0.3, 1.0, C).astype(np.float32)
    signal = (g[:, None] * r) * mu                               # [C, D]
    s = layer_strength(n_layers).astype(np.float32)
    lowrank = rng.standard_normal((64, dim)).astype(np.float32) / np.sqrt(64)   # as much variance as the noise
    pi = prevalences(C)
    n_eval = int(round(n * eval_fraction))
    for split, path, count in (("train", paths[0], n - n_eval), ("eval", paths[1], n_eval)):
        shards = []
        for k, a in enumerate(range(0, count, shard_clips)):
            b = min(count, a + shard_clips)
            m = b - a
            y = rng.random((m, C)) < pi
            empty = ~y.any(1)                                    # every AudioSet clip has a label
            y[np.flatnonzero(empty), rng.choice(C, int(empty.sum()), p=pi / pi.sum())] = True
            x = rng.standard_normal((m, n_layers, dim), dtype=np.float32)
            x += (rng.standard_normal((m, n_layers, 64), dtype=np.float32) @ lowrank)
            x += s[None, :, None] * (y.astype(np.float32) @ signal)[:, None, :]
            labels = [tuple(np.flatnonzero(row).tolist()) for row in y]
            shards.append(shard_path(root / f"{split}.shards", k))
            write_shard(shards[-1], meta, [f"{split}{i:06d}" for i in range(a, b)], x[:, :, None, :], labels)
        build_index(path, shards)
    stamp.write_text(json.dumps(want))
    return paths


def sklearn_classes(y: np.ndarray, k: int) -> np.ndarray:
    """k classes spread over the frequency ranks, each with positives in train and eval."""
    order = np.argsort(-y.sum(0), kind="stable")
    order = order[y.sum(0)[order] > 0]
    return np.sort(order[np.linspace(0, len(order) - 1, k).round().astype(int)])


def sklearn_fit(xtr, ytr, xte, max_iter: int, C: float, tol: float) -> tuple[np.ndarray, float, float]:
    """Probabilities, wall and CPU seconds of the fit (standardisation included)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    import warnings

    t, cpu = time.perf_counter(), time.process_time()
    scaler = StandardScaler().fit(xtr)
    clf = OneVsRestClassifier(LogisticRegression(C=C, max_iter=max_iter, tol=tol))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(xtr), ytr)
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    return clf.predict_proba(scaler.transform(xte)), dt, dcpu


def main(argv=None) -> int:
    from wat.data.clikit.args import float_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=positive_int, default=20000)
    p.add_argument("--eval-fraction", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.2)
    p.add_argument("--layers", type=positive_int, default=32)
    p.add_argument("--dim", type=positive_int, default=1280)
    p.add_argument("--probe-layers", help="comma-separated layers to probe (default: all)")
    p.add_argument("--sklearn-layers", default="4,16,24", help="layers also fitted with sklearn ('' = none)")
    p.add_argument("--sklearn-classes", type=positive_int, default=16, help="classes sklearn fits per layer")
    p.add_argument("--max-iter", type=positive_int, default=100,
                   help="LBFGS iterations, both methods (sklearn's default; wat-probe's is 200)")
    p.add_argument("--C", type=float_range(0, 1e12, lo_open=True), default=1.0, help="inverse L2 strength, both methods")
    p.add_argument("--tol", type=float_range(0, 1, lo_open=True), default=1e-4, help="gradient tolerance per class, both methods (sklearn's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", help="keep the caches here (reused when present)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    for name in ("clips", "layers", "dim", "sklearn_classes", "max_iter"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < a.eval_fraction < 1:
        p.error("--eval-fraction must be between 0 and 1")
    if not 0 < a.C < float("inf") or not 0 < a.tol < float("inf"):   # before minutes of cache writing
        p.error("--C and --tol must be positive and finite")
    try:
        sk_layers = [int(t) for t in a.sklearn_layers.split(",") if t.strip()]
        layers = [int(t) for t in a.probe_layers.split(",")] if a.probe_layers else list(range(a.layers))
    except ValueError:
        p.error("--probe-layers/--sklearn-layers: comma-separated integers")
    if any(not 0 <= l < a.layers for l in layers + sk_layers):
        p.error(f"layers must lie in 0..{a.layers - 1}")
    from threadpoolctl import threadpool_limits
    import torch

    torch.set_num_threads(1)
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="wat-probe-as-")
    root = Path(a.workdir or tmp.name)
    t = time.perf_counter()
    train_path, eval_path = write_caches(root, a.clips, a.eval_fraction, a.layers, a.dim)
    train, test = open_cache(train_path), open_cache(eval_path)
    ytr, yte = train.label_matrix(), test.label_matrix()
    print(f"caches: {len(train)} train + {len(test)} eval clips, {a.layers} x {a.dim}, {ytr.shape[1]} classes, "
          f"{ytr.sum(1).mean():.2f} labels/clip, rarest class {ytr.sum(0).min()} train / {yte.sum(0).min()} eval "
          f"clips ({time.perf_counter() - t:.0f} s to write/open); cpus {os.cpu_count()}, load "
          f"{os.getloadavg()[0]:.1f}; one thread per method", flush=True)
    cls = sklearn_classes(ytr, a.sklearn_classes)
    rows = []
    opts = ProbeOptions(fusion=(), jobs=1, device=a.device, max_iter=a.max_iter, C=a.C, tol=a.tol)
    for layer in layers:
        t, cpu = time.perf_counter(), time.process_time()
        rep = probe([train], [test], ProbeOptions(**{**opts.__dict__, "layers": [layer]}))
        wat_s, wat_cpu = time.perf_counter() - t, time.process_time() - cpu
        r = rep.results[0]
        row = {"layer": layer, "wat_s": wat_s, "wat_cpu_s": wat_cpu, "wat_mAP": r.score,
               "wat_mAP_subset": float(np.nanmean(r.classwise_ap[cls]))}
        if layer in sk_layers:
            with threadpool_limits(1):
                f = Feature("layer", (0,), ((layer,),))
                probs, sk_s, sk_cpu = sklearn_fit(load_matrix([train], f), ytr[:, cls], load_matrix([test], f),
                                          a.max_iter, opts.C, opts.tol)
            from wat.eval.metrics import multilabel_scores
            scale = ytr.shape[1] / len(cls)
            row.update(sklearn_s_subset=sk_s, sklearn_s=sk_s * scale, sklearn_cpu_s=sk_cpu * scale,
                       sklearn_mAP_subset=multilabel_scores(yte[:, cls], probs).mAP)
            # CPU seconds on a CPU (both one thread; wall time on a shared machine depends on the others' load)
            row["speedup"] = row["sklearn_cpu_s"] / wat_cpu if a.device == "cpu" else row["sklearn_s"] / wat_s
            row["dmAP"] = row["wat_mAP_subset"] - row["sklearn_mAP_subset"]
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        print(f"layer {layer:2d}: wat {wat_s:6.1f} s ({wat_cpu:.1f} s CPU) mAP {r.score:.4f} (on the {len(cls)} "
              f"sklearn classes {row['wat_mAP_subset']:.4f})" + (
                  f" | sklearn {row['sklearn_s_subset']:6.1f} s for {len(cls)} classes -> {row['sklearn_s']:7.0f} s "
                  f"({row['sklearn_cpu_s']:.0f} s CPU) for {ytr.shape[1]}, mAP {row['sklearn_mAP_subset']:.4f} | speed-up {row['speedup']:.1f}x, "
                  f"dmAP {row['dmAP']:+.4f}" if "speedup" in row else "") + " | load %.1f %.1f %.1f" % row["loadavg"], flush=True)
    both = [r for r in rows if "speedup" in r]
    best = max(rows, key=lambda r: r["wat_mAP"])
    summary = {"bench": "probe", "device": device_name(a.device), "loadavg": os.getloadavg(), "clips": a.clips, "layers": a.layers,
               "dim": a.dim, "max_iter": a.max_iter, "C": a.C, "tol": a.tol, "sklearn_classes": len(cls), "rows": rows,
               "wat_s_per_layer": float(np.mean([r["wat_s"] for r in rows])), "best_layer": best["layer"],
               "best_mAP": best["wat_mAP"]}
    if both:
        summary["speedup_min"] = min(r["speedup"] for r in both)
        summary["dmAP_max_abs"] = max(abs(r["dmAP"]) for r in both)
        ok = summary["speedup_min"] >= 5 and summary["dmAP_max_abs"] <= 0.005
        print(f"wat {summary['wat_s_per_layer']:.1f} s/layer ({np.mean([r['wat_cpu_s'] for r in rows]):.1f} s CPU); speed-up over sklearn (extrapolated to "
              f"{ytr.shape[1]} classes) >= {summary['speedup_min']:.1f}x (median {np.median([r['speedup'] for r in both]):.1f}x), "
              f"|dmAP| <= {summary['dmAP_max_abs']:.4f}; "
              f"target >= 5x at |dmAP| <= 0.005: {'ok' if ok else 'MISSED'}")
    print(f"device {summary['device']}; load average at the end %.1f %.1f %.1f (1/5/15 min)" % os.getloadavg())
    if a.json:
        write_json(a.json, summary)
    train.close(), test.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
