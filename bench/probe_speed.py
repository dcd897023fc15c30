"""Probe speed: all layers x 5 folds on a 2000-clip, 50-class cache of base-sized features (6 x 512).

Synthetic features (one informative layer); only the probe is timed, not writing the cache.
Target: under 60 s on 2 CPU cores.  Usage: python bench/probe_speed.py [--jobs 2] [--clips 2000]
"""
import argparse
import os
import tempfile
import time

import numpy as np

from common import synthetic_meta, write_synthetic_cache
from wat.data.labels import Vocabulary
from wat.eval.probe import ProbeOptions, probe


def synthetic_cache(root, n, n_classes, n_layers=6, dim=512, seed=0) -> str:
    """ESC-50-like: balanced classes, folds 1-5, class signal growing with depth."""
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(tuple(f"c{i}" for i in range(n_classes)), tuple(f"class {i}" for i in range(n_classes)))
    # n_frames=1: the probe reads only the time mean, so the per-frame features need not be big
    meta = synthetic_meta(model="synthetic-base", n_layers=n_layers, n_frames=1, dim=dim, vocab=vocab,
                          multilabel=False, dataset="bench")
    y = np.arange(n) % n_classes
    centers = rng.normal(size=(n_classes, dim)).astype(np.float32)
    x = rng.normal(size=(n, n_layers, 1, dim)).astype(np.float32)
    x += (np.linspace(0.02, 0.2, n_layers)[None, :, None, None] * centers[y][:, None, None, :])
    folds = (np.arange(n) // n_classes) % 5 + 1
    write_synthetic_cache(f"{root}/feats.h5", meta, x, [(int(c),) for c in y], folds=folds,
                          shards=[n // 2, n - n // 2], shard_dir=f"{root}/shards")
    return f"{root}/feats.h5"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        path = synthetic_cache(root, args.clips, args.classes)
        t = time.perf_counter()
        report = probe([path], None, ProbeOptions(jobs=args.jobs, fusion=()))
        dt = time.perf_counter() - t
    n_fits = len(report.results) * report.n_folds
    print(f"probe: {len(report.results)} layers x {report.n_folds} folds = {n_fits} fits on "
          f"{args.clips} clips x {args.classes} classes, jobs={args.jobs} (cpus: {os.cpu_count()}): {dt:.1f} s "
          f"({dt / n_fits:.2f} s/fit); best layer {report.best().feature.layers[0][0]} "
          f"accuracy {report.best().score:.3f}; target < 60 s: {'ok' if dt < 60 else 'MISSED'}")
    print("accuracy per layer:", " ".join(f"{r.score:.3f}" for r in report.layer_results()))


if __name__ == "__main__":
    main()
