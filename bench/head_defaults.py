"""The default training recipe per head kind, chosen by measurement: every head kind x a grid of
learning rates with all other options at their defaults (the batch included: 48, or fewer on a small
set, options.default_batch), 5-fold ESC-50 protocol on the demo set's tiny.en features, next to the
best single-layer linear probe on the same cache and folds (the bar: within 5 points of it, issue 11
D; tests/test_train.py checks it on a cheaper split). Optionally consistency regularisation on vs off.

    python bench/head_defaults.py --out /tmp/hd                        # demo set made here (wat.data.make_demo)
    python bench/head_defaults.py --root esc50-demo --out /tmp/hd --lrs 1e-4,1e-3 --heads tl-tr
    python bench/head_defaults.py --out /tmp/hd --cr --heads wa-mlp --lrs 1e-2 --seeds 0,1   # CR off vs on
    python bench/head_defaults.py --out /tmp/hd --heads wa-mlp --lrs 1e-2 --set batch_size=48   # the old batch

Prints one row per (head, lr): the batch used, accuracy of the best epoch and of the weight-averaged
head (mean of the 5 held-out folds, as wat-probe's score is the mean of the same 5 folds), the fold
accuracies, and the run's minutes. The cache (tiny.en, policy
trim, 8 clips per class like the test fixtures) is extracted once into --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import demo_cache, head_kinds, path_arg, seeds, train_overrides
from wat.data.clikit.args import comma_list_of, float_range, int_range
from wat.eval.probe import ProbeOptions, probe
from wat.train.loop import TrainOptions, train


def run(feats: Path, out: Path, **kw) -> tuple[int, float, float, float, list]:
    t = time.perf_counter()
    run_dir = out / "runs" / "_".join(f"{k}{v}" for k, v in kw.items())
    final = train(TrainOptions(features=str(feats), out=str(run_dir), folds=5, progress=False, **kw))
    folds = [f["wa"] for f in final["folds"].values()]
    batch = json.loads((run_dir / "metrics.json").read_text())["options"]["batch_size"]
    return batch, final["best"], final["wa"], (time.perf_counter() - t) / 60, folds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=path_arg("folder"))
    p.add_argument("--root", type=path_arg("folder"), help="an ESC-50-layout demo folder (default: make one here)")
    p.add_argument("--clips-per-class", type=int_range(1, 10_000), default=8)
    p.add_argument("--heads", type=head_kinds, default="last-mlp,wa-mlp,wa-tr,tl-tr")
    p.add_argument("--lrs", type=comma_list_of(float_range(0, 10, lo_open=True), what="learning rate in (0, 10]"),
                   default="1e-4,3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--seeds", type=seeds, default="0")
    p.add_argument("--set", type=train_overrides, default="", help="other TrainOptions, e.g. batch_size=16,mixup=0")
    p.add_argument("--cr", action="store_true", help="each run twice: --cr-views 1 and 2 (consistency regularisation off and on)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    feats = demo_cache(a.out, a.root, a.clips_per_class)
    rep = probe([str(feats)], None, ProbeOptions(fusion=(), jobs=1))
    best = max(rep.results, key=lambda r: r.score)
    print(f"cache {feats}: best single-layer linear probe {best.feature.name} accuracy {best.score:.4f} "
          f"(layers: {' '.join(f'{r.score:.3f}' for r in rep.results)})", flush=True)
    extra = a.set
    if extra:
        print(f"other options: {extra}")
    print(f"{'head':9} {'lr':>7} {'seed':>4} {'cr':>3} {'batch':>5} {'best':>7} {'wa':>7} {'wa-probe':>8} {'wa folds':>28} {'min':>5}")
    for head in a.heads:
        for lr in a.lrs:
            for cr in ((1, 2) if a.cr else (1,)):
                for seed in a.seeds:
                    bs, b, w, m, folds = run(feats, a.out, head=head, lr=lr, seed=seed, cr_views=cr, **extra)
                    print(f"{head:9} {lr:7.0e} {seed:4d} {cr:3d} {bs:5d} {b:7.4f} {w:7.4f} {w - best.score:+8.4f} "
                          f"{' '.join(f'{f:.2f}' for f in folds):>28} {m:5.1f}", flush=True)


if __name__ == "__main__":
    main()
