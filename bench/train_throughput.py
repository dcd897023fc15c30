"""Training throughput: end to end (cache on disk, the trainer's data path, all augmentation)
versus compute only (the same batches already on the device, no augmentation).

    python bench/train_throughput.py                       # CPU, TL-Tr, base-sized 6x25x512 cache
    python bench/train_throughput.py --device cuda --size large --clips 2000 --steps 200 --per-round 20
    python bench/train_throughput.py --device cuda --size large --head wa-mlp --clips 20000 --steps 400 --per-round 50

Prints samples/s for compute only, compute + augmentation on resident batches, end to end with the
cache in memory (on the device) and end to end streaming from disk (memory budget 0), the
streaming reader alone (batches on the device, no step), and the ratios to compute only (target
for end to end >= 0.9). MLP heads read the cache's `mean` field, as the
trainer does. A synthetic cache is written to a temporary folder (or --cache-dir) once.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wat.data.cache import open_cache
from wat.data.labels import audioset_vocabulary
from wat.data.cache.store import FeatureStore
from common import synthetic_meta, write_synthetic_cache
from wat.data.heads import build_head, head_field
from wat.train.inputs import COMPUTE, batches
from wat.train.step import StepConfig, amp, make_optimizer, train_step

from common import device_name, write_json

SIZES = {"tiny": (4, 384), "base": (6, 512), "small": (12, 768), "medium": (24, 1024), "large": (32, 1280)}


def make_cache(folder: Path, n: int, n_layers: int, dim: int, shard_clips: int = 512, frames: int = 25) -> Path:
    """`frames` 1 for heads that read `mean` only: 20000 large clips at 25 frames are 41 GB."""
    index = folder / "feats.h5"
    if index.exists():
        return index
    vocab = audioset_vocabulary()
    meta = synthetic_meta(vocab=vocab, multilabel=True, n_layers=n_layers, n_frames=frames, dim=dim, clip_seconds=10.0,
                          dataset="bench")
    rng = np.random.default_rng(0)
    labels = [tuple(sorted(set(rng.integers(0, len(vocab), 2).tolist()))) for _ in range(n)]
    feats = np.random.default_rng(1)  # one shard at a time: a large cache never sits in memory

    def rows(a, b):
        return feats.standard_normal((b - a, n_layers, frames, dim), dtype=np.float32).astype(np.float16)

    write_synthetic_cache(index, meta, rows, labels, ids=[f"c{i:07d}" for i in range(n)],
                          shards=[min(shard_clips, n - a) for a in range(0, n, shard_clips)])
    return index


class Mode:
    """One way of feeding the trainer; `advance(k)` runs k steps (head None: takes k batches, no
    step: the reader alone) and adds their samples and seconds."""

    def __init__(self, head, batches, cfg, device, targets):
        self.head, self.batches, self.cfg, self.device, self.targets = head, batches, cfg, device, targets
        self.opt = make_optimizer(head, 1e-4) if head is not None else None
        self.autocast, self.scaler = amp(device)
        self.gen = torch.Generator().manual_seed(0)
        self.samples, self.seconds = 0, 0.0

    def advance(self, k: int, timed: bool = True):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0, n = time.perf_counter(), 0
        for _ in range(k):
            idx, x = next(self.batches)
            n += len(idx)
            if self.head is None:
                continue
            y = self.targets[torch.as_tensor(idx, device=self.device)]
            loss = train_step(self.head, self.opt, x, y, self.cfg, self.gen, scaler=self.scaler, autocast=self.autocast)
        float(loss) if self.head is not None else sync()  # waits for the device
        if timed:
            self.samples, self.seconds = self.samples + n, self.seconds + time.perf_counter() - t0

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def main(argv=None) -> int:
    from wat.data.clikit.args import positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="base")
    p.add_argument("--head", default="tl-tr")
    p.add_argument("--proj-dim", "--dim", dest="proj_dim", type=positive_int, help="TL-Tr/WA-Tr projection width")
    p.add_argument("--clips", type=positive_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=30, help="timed steps per mode")
    p.add_argument("--per-round", type=positive_int, default=3, help="steps per mode per interleaved round")
    p.add_argument("--batch-size", type=positive_int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--cache-dir", help="keep the synthetic cache here (reused when present)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON (bench/gpu_check.sh)")
    a = p.parse_args(argv)
    for name in ("clips", "steps", "per_round", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.proj_dim is not None and a.proj_dim < 1:
        p.error("--proj-dim must be at least 1")
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_layers, dim = SIZES[a.size]
    tmp = None if a.cache_dir else tempfile.TemporaryDirectory(prefix="wat-bench-")
    folder = Path(a.cache_dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    field = head_field(a.head)
    frames = 25 if field == "features" else 1
    cache = open_cache(make_cache(folder, a.clips, n_layers, dim, frames=frames))
    print(f"cache: {len(cache)} clips {n_layers}x{frames}x{dim} ({time.perf_counter() - t:.1f} s to make/open); "
          f"head {a.head} proj_dim {a.proj_dim}; batch {a.batch_size}; {a.steps} timed steps; device {device}; "
          f"torch threads {torch.get_num_threads()}")
    targets = torch.from_numpy(cache.label_matrix().astype(np.float32)).to(device)
    aug = StepConfig(True, 10 if field == "features" else 0, 0, 0.5, 0.1)
    none = StepConfig(True, 0, 0, 0.0, 0.0)
    n_batches = a.steps + 1
    order = np.random.default_rng(1).permutation(len(cache))
    if len(order) < n_batches * a.batch_size:  # more steps than clips: cycle through epochs
        order = np.concatenate([order] * (n_batches * a.batch_size // len(order) + 1))
    order = order[: n_batches * a.batch_size]

    def head():
        torch.manual_seed(0)
        return build_head(a.head, n_layers, dim, len(cache.meta.vocab), a.proj_dim).to(device)

    t = time.perf_counter()
    resident = FeatureStore(cache, field, device=device)
    print(f"in-memory store: {resident.in_memory} ({time.perf_counter() - t:.1f} s to load)")
    pre = [(b, resident.get(b, COMPUTE)) for b in np.array_split(order, n_batches)]  # as the trainer takes them
    streaming = FeatureStore(cache, field, memory_budget=0, device=device)
    gen = torch.Generator().manual_seed(0)
    # the step augments its batch in place: "compute + augmentation" takes each resident batch after
    # "compute only" (modes run in this order in every round), so each mode sees the batches as read
    modes = {
        "compute only": Mode(head(), iter(pre), none, device, targets),
        "compute + augmentation": Mode(head(), iter(pre), aug, device, targets),
        "end to end, in memory": Mode(head(), batches(resident, order, a.batch_size, gen), aug, device, targets),
        "end to end, streaming": Mode(head(), batches(streaming, order, a.batch_size, gen), aug, device, targets),
        # the streaming reader alone (its own store), batches on the device in f32 as the step takes them
        "streaming reader only": Mode(None, batches(FeatureStore(cache, field, memory_budget=0, device=device), order,
                                                    a.batch_size, torch.Generator().manual_seed(0)), aug, device, targets),
    }
    for m in modes.values():  # warm-up: first-call costs, the streaming reader's first fill
        m.advance(1, timed=False)
    # interleaved rounds, so a change in machine load hits every mode alike
    rounds = max(1, a.steps // a.per_round)
    for _ in range(rounds):
        for m in modes.values():
            m.advance(a.per_round)
    results = {k: m.rate for k, m in modes.items()}
    base = results["compute only"]
    for k, v in results.items():
        print(f"{k:28s} {v:10.1f} samples/s   ratio {v / base:.2f}")
    if a.json:
        write_json(a.json, {"bench": "train", "device": device_name(a.device), "size": a.size, "head": a.head,
                            "proj_dim": a.proj_dim, "batch_size": a.batch_size, "clips": a.clips, "samples_per_s": results,
                            "ratios": {k: v / base for k, v in results.items()}})
    if tmp is not None:
        cache.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
