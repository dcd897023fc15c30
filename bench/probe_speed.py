"""Probe speed: all layers x 5 folds on a 2000-clip, 50-class cache of base-sized features (6 x 512),
one row per probe kind (linear, X-ARES's mlp and knn, their default settings); and the knn probe at
AudioSet shape: 20000 clips split 16000 train / 4000 eval (as bench/probe_audioset.py), 1280 wide,
527 classes multi-label, per layer.

Synthetic features (one informative layer); only the probe is timed, not writing the cache. The
AudioSet-shape rows time `KNNProbe.fit_predict` on in-memory layers (a 20000 x 32 x 1280 cache is
3 GB to write first; reading one layer's `mean` is the same for every kind and timed by
bench/probe_audioset.py), one torch thread as wat-probe runs each fit.
Targets: the 2000-clip linear row under 60 s on 2 CPU cores; knn at AudioSet shape <= 5 s per layer.
Usage: python bench/probe_speed.py [--jobs 2] [--clips 2000] [--probe linear,mlp,knn] [--audioset-layers 3]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from common import synthetic_meta, write_synthetic_cache
from wat.data.labels import Vocabulary
from wat.eval.probe import ProbeOptions, probe
from wat.eval.probe_kinds import KNNProbe


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


def audioset_knn(layers: int, device: str, seed: int = 0) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds per layer of the knn probe at AudioSet shape (16000 train, 4000 eval, 1280
    wide, 527 classes, ~2 labels per clip), one layer's fresh features at a time. On a shared machine
    the CPU seconds of the one thread are the figure to compare (wall time depends on the load)."""
    rng = np.random.default_rng(seed)
    n_train, n_eval, dim, n_classes = 16000, 4000, 1280, 527
    prevalence = 0.127 * (np.arange(n_classes) + 1.0) ** -0.75          # AudioSet-like fall-off
    y = rng.random((n_train, n_classes)) < prevalence
    opts = ProbeOptions(device=device)
    wall, cpu = [], []
    for _ in range(layers):
        x = rng.standard_normal((n_train + n_eval, dim), dtype=np.float32)
        t, c = time.perf_counter(), time.process_time()
        KNNProbe().fit_predict(x[:n_train], y, x[n_train:], n_classes=n_classes, multilabel=True, opts=opts)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def _children_cpu() -> float:
    """CPU seconds of the worker processes finished so far (the pool's forked fitters), cumulative."""
    r = os.times()
    return r.children_user + r.children_system


def main():
    from wat.data.clikit.args import int_range, positive_int  # bad values: one error line
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=positive_int, default=2)
    ap.add_argument("--clips", type=positive_int, default=2000)
    ap.add_argument("--classes", type=positive_int, default=50)
    ap.add_argument("--probe", default="linear,mlp,knn", help="kinds timed on the 2000-clip cache, one row each")
    ap.add_argument("--audioset-layers", type=int_range(0), default=3, help="layers timed for knn at AudioSet shape (0: none)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        path = synthetic_cache(root, args.clips, args.classes)
        for kind in args.probe.split(","):
            t, c, k = time.perf_counter(), time.process_time(), _children_cpu()
            report = probe([path], None, ProbeOptions(jobs=args.jobs, fusion=(), probes=(kind,), device=args.device))
            dt = time.perf_counter() - t
            busy = time.process_time() - c + _children_cpu() - k
            n_fits = len(report.results) * report.n_folds
            print(f"probe {kind}: {len(report.results)} layers x {report.n_folds} folds = {n_fits} fits on "
                  f"{args.clips} clips x {args.classes} classes, jobs={args.jobs} (cpus: {os.cpu_count()}, load "
                  f"{load:.1f}): {dt:.1f} s wall ({dt / n_fits:.2f} s/fit), {busy:.1f} CPU s; best layer "
                  f"{report.best().feature.layers[0][0]} accuracy {report.best().score:.3f}"
                  + (f"; target < 60 s: {'ok' if dt < 60 else 'MISSED'}" if kind == "linear" else ""))
            print(f"  accuracy per layer ({kind}):", " ".join(f"{r.score:.3f}" for r in report.layer_results()))
    if args.audioset_layers:
        torch.set_num_threads(1)   # as wat-probe runs each fit
        wall, cpu = audioset_knn(args.audioset_layers, args.device)
        print(f"knn at AudioSet shape (16000 train x 4000 eval x 1280, 527 classes, 1 thread, {args.device}, load "
              f"{os.getloadavg()[0]:.1f}): CPU s per layer " + " ".join(f"{t:.2f}" for t in cpu)
              + f" (mean {np.mean(cpu):.2f}; target <= 5 s: {'ok' if np.mean(cpu) <= 5 else 'MISSED'}), wall "
              + " ".join(f"{t:.2f}" for t in wall))


if __name__ == "__main__":
    main()
