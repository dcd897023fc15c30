"""int8 vs fp16 storage, side by side on the same clips: probe and TL-Tr accuracy, bytes on disk,
streaming reader throughput.

    python bench/storage_quality.py                   # demo set through base (trim) + synthetic graded set

Two sets, each stored both ways through the real writer:
  demo       the synthetic ESC-50-layout demo set (11 classes x --demo-clips), Whisper --model,
             extracted twice by `extract_dataset` (--storage fp16 and --storage int8)
  graded     a synthetic cache (--synth-clips clips, 10 classes, 8 layers x 25 x 256) whose class
             signal grows with depth and whose channels differ in scale by up to ~50x (as Whisper's
             do), so accuracies are far from 100% and per-channel scales matter
Per set and storage: wat-probe accuracy per layer (5 folds, logistic regression, no fusion),
TL-Tr (dim 64) 5-fold accuracy of the weight-averaged heads, bytes on disk, and the streaming
reader (FeatureStore, warm page cache, no compute, the second epoch of a store, as in training)
in samples/s, best of --rounds interleaved rounds: batches as stored (int8 stays int8: what a GPU
store copies to the device) and as the trainer takes them (f32 on this CPU store, converted and
for int8 dequantised by the reader threads).
Targets: accuracy within 0.5 points, bytes <= 0.5x (plus the scales), reader throughput not lower.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def graded_cache(folder: Path, storage: str, n: int, seed: int = 0) -> Path:
    from wat.data.labels import Vocabulary
    from common import synthetic_meta, write_synthetic_cache

    L, T, D, C = 8, 25, 256, 10
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    centers = rng.normal(size=(C, D)).astype(np.float32)
    chan = np.exp(rng.normal(0, 1.0, size=D)).astype(np.float32)  # per-channel scale, ~0.1x..~20x
    gain = np.linspace(0.001, 0.009, L, dtype=np.float32)          # class signal grows with depth
    x = rng.normal(size=(n, L, T, D)).astype(np.float32)
    x += gain[None, :, None, None] * centers[y][:, None, None, :] * np.sqrt(T)
    x *= chan
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"class {i}" for i in range(C)]), multilabel=False,
                          n_layers=L, n_frames=T, dim=D, model="synthetic-graded", dataset="graded", storage=storage)
    write_synthetic_cache(folder / "feats.h5", meta, x, [(int(c),) for c in y], ids=[f"g{i:05d}" for i in range(n)],
                          folds=(np.arange(n) // C) % 5 + 1, shards=-(-n // 250), shard_dir=folder / "feats.shards")
    return folder / "feats.h5"


def demo_cache(folder: Path, root: Path, storage: str, model) -> Path:
    from wat.data.datasets import load_dataset
    from wat.extract.pipeline import ExtractOptions, extract_dataset

    out = folder / "feats.h5"
    extract_dataset(load_dataset("esc50", root), ExtractOptions(model="?", policy="trim", storage=storage,
                                                                progress=False), out, model=model)
    return out


def probe_scores(path) -> list[float]:
    from wat.eval.probe import ProbeOptions, probe
    return [r.score for r in probe([str(path)], None, ProbeOptions(fusion=(), jobs=1)).layer_results()]


def tltr_score(path, out: Path, epochs: int) -> float:
    from wat.train.loop import TrainOptions, train
    final = train(TrainOptions(features=str(path), out=str(out), folds=5, head="tl-tr", proj_dim=64, epochs=epochs,
                               lr=1e-3, batch_size=32, seed=0, progress=False))
    return float(np.mean([f["wa"] for f in final["folds"].values()]))


def stream_rate(path, dtype) -> float:
    """Samples/s of a streaming store's second epoch in `dtype` (None: as stored)."""
    from wat.data.cache import open_cache
    from wat.data.cache.store import FeatureStore

    cache = open_cache(path)
    size = sum(p.stat().st_size for p, _, _ in cache.shards)
    store = FeatureStore(cache, "features", memory_budget=size // 2)
    assert not store.in_memory
    for _ in store.iter_batches(np.arange(len(cache)), 48, seed=0, dtype=dtype):  # page cache, buffers
        pass
    t = time.perf_counter()
    n = 0
    for i, x in store.iter_batches(np.arange(len(cache)), 48, seed=1, dtype=dtype):
        n += len(i)
    return n / (time.perf_counter() - t)


def main() -> int:
    from wat.data.clikit.args import positive_int  # bad values: one error line
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--demo-clips", type=positive_int, default=10, help="clips per demo class")
    ap.add_argument("--synth-clips", type=positive_int, default=1000)
    ap.add_argument("--epochs", type=positive_int, default=15, help="TL-Tr epochs")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--sets", default="demo,graded")
    a = ap.parse_args()
    if min(a.demo_clips, a.synth_clips, a.epochs, a.rounds) < 1:
        ap.error("counts must be >= 1")
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from wat.data.cache import info

    with tempfile.TemporaryDirectory(prefix="wat-storage-") as tmp:
        tmp = Path(tmp)
        caches = {}
        if "demo" in a.sets:
            from wat.data.demo import make_demo
            from wat.extract.load import load_whisper
            root = make_demo(tmp / "demo-data", clips_per_class=a.demo_clips, seed=0)
            model = load_whisper(a.model)
            for st in ("fp16", "int8"):
                caches[("demo", st)] = demo_cache(tmp / f"demo-{st}", root, st, model)
        if "graded" in a.sets:
            for st in ("fp16", "int8"):
                caches[("graded", st)] = graded_cache(tmp / f"graded-{st}", st, a.synth_clips)
        rows = {}
        for (name, st), path in caches.items():
            t = time.perf_counter()
            probe = probe_scores(path)
            tl = tltr_score(path, tmp / f"run-{name}-{st}", a.epochs)
            rows[(name, st)] = {"probe": probe, "tltr": tl, "bytes": info(path)["bytes_on_disk"], "rate": [],
                                "rate32": []}
            print(f"{name} {st}: probe per layer {' '.join(f'{p:.3f}' for p in probe)}; TL-Tr {tl:.4f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        for r in range(a.rounds):  # interleaved: load hits both storages alike
            for key, path in caches.items():
                rows[key]["rate"].append(stream_rate(path, None))
                rows[key]["rate32"].append(stream_rate(path, torch.float32))
        print("\n| set | storage | bytes on disk | best-layer probe | mean probe over layers | max layer diff | "
              "TL-Tr 5-fold (WA) | stream samples/s, as stored (best of rounds) | stream as f32 samples/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (name, st), d in rows.items():
            ref = rows[(name, "fp16")]
            diff = max(abs(p - q) for p, q in zip(d["probe"], ref["probe"]))
            print(f"| {name} | {st} | {d['bytes'] / 1e6:.1f} MB ({d['bytes'] / ref['bytes']:.3f}x) | "
                  f"{max(d['probe']) * 100:.2f} | {np.mean(d['probe']) * 100:.2f} | {diff * 100:.2f} pt | "
                  f"{d['tltr'] * 100:.2f} ({(d['tltr'] - ref['tltr']) * 100:+.2f} pt) | "
                  f"{max(d['rate']):.0f} ({max(d['rate']) / max(ref['rate']):.2f}x) | "
                  f"{max(d['rate32']):.0f} ({max(d['rate32']) / max(ref['rate32']):.2f}x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
