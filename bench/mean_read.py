"""Bytes a one-layer read of the `mean` dataset takes from the disk, against one layer's bytes.

A synthetic cache (`--clips` clips x `--layers` x `--dim`, fp16, one pooled frame so that the file
holds little besides `mean`; shards of `--shard-clips`) is written through the real writer into
`--dir` (a disk, not tmpfs: tmpfs reads count no disk bytes). Then, each from a cold page cache
(every shard dropped with POSIX_FADV_DONTNEED), the bytes this process read from the block layer
(`read_bytes` of /proc/self/io) for:

    verify   Cache.verify_field("mean"): the check of every row that a one-layer read of shards
             without per-layer checksums (written before them) needs first, once per process
    dask     dask_view(cache, "mean")[:, L, :] computed: a probe's read of one layer, checked against
             the per-layer checksums (`mean_layer_crc32`) as it is read
    h5py     each shard's dataset read as [:, L, :] with h5py directly
    chunks   the HDF5 chunks that [:, L, :] intersects (h5py's chunk API), their stored bytes

next to one layer's bytes (clips x dim x 2) and the whole `mean` (x layers).

    python bench/mean_read.py --dir /tmp/wat-mean-read           # 4000 x 32 x 1280 (large), 328 MB of mean
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from wat.data import cache as C
from wat.data.cache import handles
from wat.data.labels import Vocabulary
from wat.data.cache import dask_view
from common import synthetic_meta, write_synthetic_cache

from common import drop


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def cold(cache: C.Cache, what, fn) -> None:
    files = [cache.path] + [p for p, _, _ in cache.shards]
    cache.close()
    drop(files)
    b, t = read_bytes(), time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    got = read_bytes() - b
    layer = len(cache) * cache.meta.dim * cache.stored_dtype.itemsize
    print(f"{what:8s} {got / 2**20:9.1f} MiB from disk = {got / layer:6.2f} x one layer ({dt:.2f} s)", flush=True)


def main(argv=None) -> int:
    from wat.data.clikit.args import int_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder on a disk for the cache (removed at the end unless --keep)")
    p.add_argument("--clips", type=positive_int, default=4000)
    p.add_argument("--layers", type=positive_int, default=32)
    p.add_argument("--dim", type=positive_int, default=1280)
    p.add_argument("--shard-clips", type=positive_int, default=1000)
    p.add_argument("--layer", type=int_range(0), default=16, help="the layer read")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    if min(a.clips, a.layers, a.dim, a.shard_clips) < 1 or not 0 <= a.layer < a.layers:
        p.error("--clips, --layers, --dim, --shard-clips must be >= 1 and --layer in 0..LAYERS-1")
    root = Path(a.dir)
    index = root / "feats.h5"
    if not index.exists():
        vocab = Vocabulary(("a", "b"), ("a", "b"))
        meta = synthetic_meta(vocab=vocab, multilabel=False, n_layers=a.layers, n_frames=1, dim=a.dim)
        rng = np.random.default_rng(0)
        write_synthetic_cache(index, meta, lambda s, e: rng.standard_normal((e - s, a.layers, 1, a.dim), np.float32),
                              [(i % 2,) for i in range(a.clips)],
                              shards=[a.shard_clips] * (a.clips // a.shard_clips) + ([a.clips % a.shard_clips] if a.clips % a.shard_clips else []),
                              shard_dir=root / "feats.shards")
    cache = C.open_cache(index)
    d = cache.dataset(0, "mean")
    layer = len(cache) * cache.meta.dim * 2
    print(f"{len(cache)} clips x {cache.meta.n_layers} layers x {cache.meta.dim} fp16 in {len(cache.shards)} shards; "
          f"mean chunks {d.chunks} ({np.prod(d.chunks) * 2 / 2**10:.0f} KiB); one layer {layer / 2**20:.1f} MiB, "
          f"the whole mean {layer * cache.meta.n_layers / 2**20:.1f} MiB; load {os.getloadavg()[0]:.1f}", flush=True)

    def verify():
        handles.VERIFIED.clear()
        cache.verify_field("mean")

    def via_dask():
        handles.VERIFIED.clear()
        assert cache.layer_checkable("mean")
        dask_view(cache, "mean")[:, a.layer, :].compute(scheduler="synchronous")

    via_dask()   # imports (their files count as disk reads too) before the cold rounds

    def via_h5py():
        for s in range(len(cache.shards)):
            cache.dataset(s, "mean")[:, a.layer, :]

    cold(cache, "verify", verify)
    cold(cache, "dask", via_dask)
    cold(cache, "h5py", via_h5py)
    touched = 0
    for s in range(len(cache.shards)):
        dset = cache.dataset(s, "mean")
        k = dset.chunks[0]
        for r in range(0, dset.shape[0], k):
            info = dset.id.get_chunk_info_by_coord((r, a.layer, 0))
            touched += info.size
    print(f"chunks   {touched / 2**20:9.1f} MiB stored in the chunks [:, {a.layer}, :] touches = "
          f"{touched / layer:6.2f} x one layer")
    cache.close()
    if not a.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
