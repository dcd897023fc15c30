"""Cache reading at large width against the disk's limit, side by side in one run.

    python bench/cache_read.py                          # 4000 clips x 32 x 25 x 1280 fp16 (~8 GB)
    python bench/cache_read.py --store fp16,int8        # the same clips stored both ways
    python bench/cache_read.py --rss-budget 1024        # + peak RSS of streaming training

A synthetic cache is written through the real writer (`write_shard` + `build_index`) into --dir,
then per round, for cold (page cache dropped per file with POSIX_FADV_DONTNEED, which needs no
privileges for clean pages) and warm (files read once before) reads:

    (a) raw: every shard file read sequentially with plain reads into one buffer (the limit here)
        (cold: the first --cold-clips clips' shards; warm: the first --warm-clips', which must fit
        the page cache beside whatever else runs, else "warm" reads come from the disk)
    (b) stream: `FeatureStore` streaming (memory budget below the cache), one shuffled epoch of
        batches, no compute: the trainer's batch path
    (c) dask: the dask view of `mean`, one layer, computed (what wat-probe reads per layer)

Rounds interleave the modes, so machine load hits them alike; the best round of each is printed
with the median beside it. --rss-budget runs `wat.train.loop.train` (TL-Tr, --dim 64, one epoch,
streaming) in a child process with that budget (on the warm shards) and prints its peak RSS next
to the RSS it had before training started. The cache is removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cache(folder: Path, n: int, n_layers: int, dim: int, storage: str, shard_clips: int) -> Path:
    from wat.data.labels import Vocabulary
    from wat.data.synthetic import synthetic_meta, write_synthetic_cache

    index = folder / "feats.h5"
    if index.exists():
        return index
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"class {i}" for i in range(10)]), multilabel=False,
                          n_layers=n_layers, n_frames=25, dim=dim, clip_seconds=10.0, dataset="bench",
                          storage=storage)
    rng = np.random.default_rng(0)

    def rows(a, b):  # one shard at a time, f32 draws in small pieces: no f32 copy of a shard
        x = np.empty((b - a, n_layers, 25, dim), np.float16)
        for i in range(0, b - a, 32):
            x[i:i + 32] = rng.standard_normal((min(32, b - a - i), n_layers, 25, dim), dtype=np.float32)
        print(f"  {storage}: clips {a}..{b - 1} written", flush=True)
        return x

    sizes = [min(shard_clips, n - a) for a in range(0, n, shard_clips)]
    write_synthetic_cache(index, meta, rows, [(i % 10,) for i in range(n)], ids=[f"c{i:07d}" for i in range(n)],
                          shards=sizes, shard_dir=folder / "feats.shards")
    return index


def first_shards(cache, n: int, root: Path):
    """An index over the first shards holding >= n clips (a smaller cache on the same files)."""
    from wat.data.cache import build_index, open_cache

    paths = [p for p, a, _ in cache.shards if a < n]
    index = root / f"first-{len(paths)}-shards.h5"
    if not index.exists():
        build_index(index, paths)
    return open_cache(index)


def drop(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths, buf: bytearray) -> tuple[int, float]:
    view, n = memoryview(buf), 0
    t = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while (k := os.readv(fd, [view])) > 0:
                n += k
        finally:
            os.close(fd)
    return n, time.perf_counter() - t


def stream(cache, batch: int, threads: int, seed: int, budget: int) -> tuple[int, float]:
    from wat.data.readers import FeatureStore

    store = FeatureStore(cache, "features", memory_budget=budget, read_threads=threads)
    assert not store.in_memory
    n = 0
    t = time.perf_counter()
    for idx, x in store.iter_batches(np.arange(len(cache)), batch, shuffle=True, seed=seed):
        n += len(idx)
    return n, time.perf_counter() - t


def dask_layer(cache, layer: int) -> tuple[int, float]:
    from wat.data.readers import dask_view

    t = time.perf_counter()
    x = dask_view(cache, "mean")[:, layer, :].astype(np.float32).compute(scheduler="synchronous")
    return x.shape[0], time.perf_counter() - t


def rss_child(index: str, budget: int, out: str) -> None:
    """Runs in a child process: train streaming under `budget`, report RSS before and peak."""
    import resource

    import torch
    from wat.train.loop import TrainOptions, train
    torch.set_num_threads(2)

    def rss_now():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    from wat.data.cache import open_cache
    from wat.data.readers import FeatureStore
    FeatureStore(open_cache(index), "features", memory_budget=budget)  # imports + open: the baseline
    before = rss_now()
    t = time.perf_counter()
    train(TrainOptions(features=index, out=out, head="tl-tr", proj_dim=64, epochs=1, memory_budget=budget,
                       progress=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "seconds": time.perf_counter() - t}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard-clips", type=int, default=500)
    ap.add_argument("--store", default="fp16", help="comma-separated storages to compare: fp16,int8")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "wat-bench-cache"),
                    help="where the caches are written (removed at the end unless --keep)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold-clips", type=int, default=2000, help="clips read cold (page cache dropped)")
    ap.add_argument("--warm-clips", type=int, default=1000,
                    help="clips read warm: must fit the page cache beside everything else running")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="FeatureStore reader threads")
    ap.add_argument("--no-cold", action="store_true", help="warm reads only")
    ap.add_argument("--rss-budget", type=int, metavar="MB", help="also measure streaming training RSS")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    a = ap.parse_args()
    if min(a.clips, a.layers, a.dim, a.shard_clips, a.rounds, a.batch, a.threads, a.cold_clips, a.warm_clips) < 1:
        ap.error("sizes, rounds, batch and threads must be >= 1")
    stores = a.store.split(",")
    if set(stores) - {"fp16", "int8"}:
        ap.error("--store: fp16 and/or int8")

    from wat.data.cache import open_cache
    root = Path(a.dir)
    full, caches, files, size = {}, {}, {}, {}
    t = time.perf_counter()
    for st in stores:
        full[st] = open_cache(make_cache(root / st, a.clips, a.layers, a.dim, st, a.shard_clips))
        for temp, n in (("cold", a.cold_clips), ("warm", a.warm_clips)):
            caches[temp, st] = first_shards(full[st], n, root / st)
            files[temp, st] = [str(p) for p, _, _ in caches[temp, st].shards]
            size[temp, st] = sum(os.path.getsize(p) for p in files[temp, st])
    row = {st: full[st].stored_dtype.itemsize * a.layers * 25 * a.dim for st in stores}
    print(f"cache: {a.clips} clips x {a.layers} x 25 x {a.dim}; "
          + ", ".join(f"{st} {sum(os.path.getsize(p) for p, _, _ in full[st].shards) / 1e9:.2f} GB in "
                      f"{len(full[st].shards)} shards" for st in stores)
          + f" ({time.perf_counter() - t:.0f} s to make/open); read cold: "
          + ", ".join(f"{len(caches['cold', st])} clips = {size['cold', st] / 1e9:.2f} GB {st}" for st in stores)
          + "; warm: " + ", ".join(f"{len(caches['warm', st])} clips = {size['warm', st] / 1e9:.2f} GB {st}"
                                  for st in stores)
          + f"; {os.cpu_count()} CPUs, reader threads {a.threads}, batch {a.batch}", flush=True)

    buf = bytearray(8 << 20)
    res: dict[tuple, list[float]] = {}  # (temp, storage, mode) -> MB/s per round
    temps = ["warm"] if a.no_cold else ["cold", "warm"]
    for r in range(a.rounds):
        for temp in temps:
            for st in stores:
                c, fs = caches[temp, st], files[temp, st]
                for mode in ("raw", "stream", "dask"):
                    if temp == "cold":
                        drop(fs)
                    else:
                        raw_read(fs, buf)  # make sure every page is resident
                    if mode == "raw":
                        n, dt = raw_read(fs, buf)
                        mbs = n / dt / 1e6
                    elif mode == "stream":
                        n, dt = stream(c, a.batch, a.threads, r, min(1 << 30, size[temp, st] // 2))
                        mbs = n * row[st] / dt / 1e6
                    else:
                        n, dt = dask_layer(c, a.layers // 2)
                        mbs = n * a.dim * c.stored_dtype.itemsize / dt / 1e6
                    res.setdefault((temp, st, mode), []).append(mbs)
                    extra = f" = {n / dt:.0f} samples/s" if mode == "stream" else ""
                    print(f"round {r + 1} {temp:4s} {st} {mode:6s} {mbs:9.1f} MB/s{extra}", flush=True)

    print("\n| reads | storage | (a) raw MB/s | (b) stream MB/s | (b) samples/s | (b)/(a) | (c) dask 1 layer of mean |")
    print("|---|---|---|---|---|---|---|")
    for temp in temps:
        for st in stores:
            ra, rb, rc = (res[(temp, st, m)] for m in ("raw", "stream", "dask"))
            sps = max(rb) * 1e6 / row[st]
            print(f"| {temp} | {st} | {max(ra):.0f} (median {statistics.median(ra):.0f}) | {max(rb):.0f} "
                  f"(median {statistics.median(rb):.0f}) | {sps:.0f} | {max(rb) / max(ra):.2f} "
                  f"(medians {statistics.median(rb) / statistics.median(ra):.2f}) | "
                  f"{len(caches[temp, st]) / (max(rc) * 1e6 / (a.dim * full[st].stored_dtype.itemsize)):.2f} s |")

    if a.rss_budget:
        budget = a.rss_budget << 20
        for st in stores:
            out = root / f"rss-run-{st}"
            shutil.rmtree(out, ignore_errors=True)
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cache_read; "
                    f"cache_read.rss_child({str(caches['warm', st].path)!r}, {budget}, {str(out)!r})")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:])
                return 1
            d = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"\nRSS, streaming training (TL-Tr dim 64, 1 epoch, {st} cache {size['warm', st] / 1e9:.1f} GB, "
                  f"budget {a.rss_budget} MB): before training {d['before'] / 2**20:.0f} MB, peak "
                  f"{d['peak'] / 2**20:.0f} MB, growth {(d['peak'] - d['before']) / 2**20:.0f} MB "
                  f"({d['seconds']:.0f} s)")
    if not a.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
