"""Cache integrity cost: `wat-cache verify` (every byte of features and mean against the per-clip
CRC-32s) and the first-open check of the training reader, as ratios to a plain read of the same data.

A synthetic cache of base-sized clips (6 layers x 25 frames x 512 dims, 160 KB per clip) is written
once; it is then in the page cache, so the reads run at memory speed: the worst case for the
checksum overhead (from a disk the read dominates more). Rounds interleave the variants, best of N.

    plain file read     every byte of every shard file, 16 MiB Python reads (the physical limit)
    h5py read           features + mean datasets read block by block (what any reader must do)
    verify              wat.data.cache.verify: h5py read + CRC-32 of every row + structure checks
    store load          FeatureStore(features) in memory with the first-open check / with it skipped

Usage: python bench/verify_speed.py [--clips 2000] [--rounds 3]
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from wat.data.cache import open_cache, row_crc32, verify
from wat.data.cache.integrity import corrupt_rows
from wat.data.labels import Vocabulary
from wat.data.cache.store import FeatureStore
from common import synthetic_meta, write_synthetic_cache


def synthetic_cache(root: Path, n: int, shard: int = 500, L: int = 6, T: int = 25, D: int = 512) -> Path:
    meta = synthetic_meta(vocab=Vocabulary.from_names(["a", "b"]), multilabel=False, n_layers=L, n_frames=T, dim=D)
    rng = np.random.default_rng(0)
    write_synthetic_cache(root / "feats.h5", meta,
                          lambda a, b: rng.standard_normal((b - a, L, T, D), np.float32).astype(np.float16),
                          [(i % 2,) for i in range(n)], shards=[min(shard, n - a) for a in range(0, n, shard)],
                          shard_dir=root / "shards")
    return root / "feats.h5"


def plain_read(paths) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                n += len(chunk)
    return n


def h5py_read(index) -> int:
    cache = open_cache(index)
    n = 0
    for s, (_, start, stop) in enumerate(cache.shards):
        for field in ("features", "mean"):
            d = cache.dataset(s, field)
            step = max(1, (64 << 20) // (2 * int(np.prod(d.shape[1:]))))
            for a in range(0, stop - start, step):
                n += d[a:a + step].nbytes
    cache.close()
    return n


def store_load(index, check: bool) -> int:
    cache = open_cache(index)
    if not check:  # as if this process had already checked every shard
        for s in range(len(cache.shards)):
            cache.mark_verified(s, "features")
    store = FeatureStore(cache, "features", memory_budget=1 << 40)
    n = store._data.numel() * 2
    from wat.data.cache import handles
    handles.VERIFIED.clear()
    cache.close()
    return n


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    from wat.data.clikit.args import positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=positive_int, default=2000)
    p.add_argument("--rounds", type=positive_int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        index = synthetic_cache(Path(d), args.clips)
        shards = sorted((Path(d) / "shards").glob("shard-*.h5"))
        size = sum(s.stat().st_size for s in shards)
        variants = {"plain file read": lambda: plain_read(shards), "h5py read": lambda: h5py_read(index),
                    "verify": lambda: verify(index, progress=False),
                    "store load, checked": lambda: store_load(index, True),
                    "store load, unchecked": lambda: store_load(index, False)}
        best = {k: float("inf") for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        assert verify(index, progress=False) == []
        print(f"{args.clips} clips, {len(shards)} shards, {size / 1e6:.0f} MB (page cache), best of {args.rounds}")
        for name, t in best.items():
            print(f"  {name:24s} {t:7.3f} s  {size / t / 1e9:6.2f} GB/s of shard files")
        block = open_cache(index).dataset(0, "features")[:]
        crc = row_crc32(block)
        checks = {"CRC-32 per row": lambda: corrupt_rows(block, crc), "zero/non-finite scan": lambda: corrupt_rows(block, None)}
        for name, fn in checks.items():
            t = min(_timed(fn) for _ in range(args.rounds))
            print(f"  {name:24s} {block.nbytes / t / 1e9:6.2f} GB/s on one {block.nbytes / 1e6:.0f} MB shard in memory")
        print(f"verify / plain file read:              {best['verify'] / best['plain file read']:.2f}x")
        print(f"verify / h5py read:                    {best['verify'] / best['h5py read']:.2f}x")
        print(f"store load checked / unchecked:        {best['store load, checked'] / best['store load, unchecked']:.2f}x")


if __name__ == "__main__":
    main()
