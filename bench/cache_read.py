"""Cache reading at large width against the machine's limit, side by side in one run.

    python bench/cache_read.py                          # 4000 clips x 32 x 25 x 1280 fp16 (~8 GB)
    python bench/cache_read.py --storage fp16,int8       # the same clips stored both ways
    python bench/cache_read.py --rss-budget 900         # + RSS of streaming training, by part

A synthetic cache is written through the real writer (`write_shard` + `build_index`) into --dir,
then per round, for cold (page cache dropped per file with POSIX_FADV_DONTNEED, which needs no
privileges for clean pages) and warm (files read once before) reads:

    (a) raw: the shard files read with plain preadv, 8 MiB a call, by --threads threads (the
        same number as the reader's) taking the pieces in turn, each into its own buffer of one
        batch's size (numpy arrays, as the reader's), reused: the limit (cold: the disk; warm:
        copying out of the page cache into memory, i.e. memory bandwidth, the copy the reader must do)
    (a0) the same into one 8 MiB buffer per thread, which stays in the CPU cache: no memory
        writes, faster than any reader that fills batches can be (for reference)
        (cold: the first --cold-clips clips' shards; warm: the first --warm-clips', which must fit
        the page cache beside whatever else runs, else "warm" reads come from the disk)
    (b) stream: `FeatureStore` streaming (memory budget below the cache), one shuffled epoch of
        batches as stored (int8 stays int8), no compute: the reader. As in a training run, one
        store per cache and mode lives through all rounds (round r = its epoch r)
    (b') +f32: the same batches as the trainer takes them, converted to f32 on the device (here
        the CPU: the conversion the step would otherwise do first; int8 dequantised in that pass)
    (c) dask: the dask view of `mean`, one layer, computed (what wat-probe reads per layer)

Rounds interleave the modes, so machine load hits them alike; the best round of each is printed
with the median beside it, and the load average (os.getloadavg) with every round. The reader's
columns count its stores' later epochs (rounds 2..; a training run's steady state) and show the
first epoch (round 1: buffers allocated, the process's first reads) in a column of its own. A shard's
CRC-32s are checked the first time a process reads it: that is done (and timed) before the rounds.

--rss-budget runs three child processes on the first shards that hold more bytes than the
budget and prints the parts of a streaming training process's peak RSS: the baseline (torch,
wat, the store opened), the reader (one epoch of the trainer's f32 batches, no step: bounded by
the budget), the step (head + Adam + TL-Tr steps on a random f32 batch of the trainer's shape,
beyond that batch, no reader; by phase: augmentation, forward, backward + Adam) and the whole (`wat.train.loop.train`, one epoch), against baseline + budget + step.
The cache is removed at the end unless --keep.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import drop


def make_cache(folder: Path, n: int, n_layers: int, dim: int, storage: str, shard_clips: int) -> Path:
    from wat.data.labels import Vocabulary
    from common import synthetic_meta, write_synthetic_cache

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


def raw_read(paths, threads: int, buffer: int, piece: int = 8 << 20) -> tuple[int, float]:
    """Every byte of `paths` read with plain preadv, `piece` bytes a call, `threads` threads taking
    the pieces in turn, each into its own `buffer`-byte buffer (filled piece after piece, then
    again from its start)."""
    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), piece)]
    buffer = max(buffer, piece)
    ready = threading.Barrier(threads + 1)  # buffers allocated and touched before the clock starts

    def part(k: int) -> int:
        # a numpy array, touched, like the reader's batch buffers: numpy asks for transparent huge
        # pages for large arrays, a bytearray does not (copies into one ran ~12% slower here)
        arr = np.empty(buffer, np.uint8)
        arr.fill(0)
        buf, n, at, fds = memoryview(arr), 0, 0, {}
        ready.wait()
        for p, off in jobs[k::threads]:
            fd = fds.get(p) or fds.setdefault(p, os.open(p, os.O_RDONLY))
            at = 0 if at + piece > buffer else at
            n += os.preadv(fd, [buf[at:at + piece]], off)
            at += piece
        for fd in fds.values():
            os.close(fd)
        return n

    with ThreadPoolExecutor(threads) as ex:
        parts = [ex.submit(part, k) for k in range(threads)]
        ready.wait()
        t = time.perf_counter()
        n = sum(f.result() for f in parts)
        return n, time.perf_counter() - t


def stream(store, batch: int, seed: int, dtype) -> tuple[int, float]:
    """One shuffled epoch of `store` (a streaming FeatureStore), no compute."""
    n = 0
    t = time.perf_counter()
    for idx, x in store.iter_batches(np.arange(len(store)), batch, shuffle=True, seed=seed, dtype=dtype):
        n += len(idx)
    return n, time.perf_counter() - t


def dask_layer(cache, layer: int) -> tuple[int, float]:
    from wat.data.cache import dask_view

    t = time.perf_counter()
    x = dask_view(cache, "mean")[:, layer, :].astype(np.float32).compute(scheduler="synchronous")
    return x.shape[0], time.perf_counter() - t


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _rss_now() -> int:
    return _status("VmRSS")


def _peak() -> int:
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's over exec)
    return _status("VmHWM")


def _clear_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: "5" into clear_refs; the process's own, no privileges)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_child(part: str, index: str, budget: int, out: str, batch: int) -> None:
    """Runs in a child process (peak RSS only grows): the baseline, then one part alone."""
    import torch
    from wat.data.cache import open_cache
    from wat.data.cache.store import FeatureStore
    from wat.train.loop import TrainOptions, train
    torch.set_num_threads(2)

    cache = open_cache(index)
    store = FeatureStore(cache, "features", memory_budget=budget)
    assert not store.in_memory
    before = _rss_now()  # torch + wat imported, the cache and the store opened
    t = time.perf_counter()
    opts = TrainOptions(features=index, out=out, head="tl-tr", proj_dim=64, epochs=1, memory_budget=budget,
                        batch_size=batch, progress=False)
    if part == "reader":  # the reader alone: one shuffled epoch of the trainer's f32 batches, no step
        for _ in store.iter_batches(np.arange(len(cache)), batch, seed=0, dtype=torch.float32):
            pass
    elif part == "step":  # the step alone on a random batch of the trainer's shape, no reader
        from wat.data.heads import build_head
        from wat.train.step import StepConfig, make_optimizer, train_step
        m = cache.meta
        head = build_head("tl-tr", m.n_layers, m.dim, len(m.vocab), 64)
        opt = make_optimizer(head, 1e-4)
        gen = torch.Generator().manual_seed(0)
        cfg = StepConfig(m.multilabel, opts.time_mask, 0, opts.mixup, opts.label_smoothing)
        y = torch.nn.functional.one_hot(torch.arange(batch) % len(m.vocab), len(m.vocab)).float()
        x = torch.randn((batch,) + store.shape)  # the f32 batch: the reader's (within its budget)
        before = _rss_now()
        phases = {"augmentation": 0, "forward": 0, "backward + Adam": 0}

        def mark(name: str) -> None:  # the peak since the last mark, beyond the batch
            phases[name] = max(phases[name], _peak() - before)
            _clear_peak()

        try:
            _clear_peak()
        except OSError:  # no per-phase figures without clear_refs; the whole peak still counts
            phases = None
        if phases is not None:
            head.register_forward_pre_hook(lambda *_: mark("augmentation"))  # the step's input is ready
            head.register_forward_hook(lambda *_: mark("forward"))
        for _ in range(3):
            train_step(head, opt, x, y, cfg, gen)
            if phases is not None:
                mark("backward + Adam")
        if phases is not None:  # VmHWM was reset at each mark: the step's peak is the phases' largest
            print(json.dumps({"before": before, "peak": before + max(phases.values()),
                              "phases": phases, "seconds": time.perf_counter() - t}))
            return
    else:
        train(opts)
    print(json.dumps({"before": before, "peak": _peak(), "seconds": time.perf_counter() - t}))


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _meminfo() -> str:
    """Available memory and page cache (GiB), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        m = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}
    return (f"MemTotal {m['MemTotal'] / 2**20:.1f} GiB, MemAvailable {m['MemAvailable'] / 2**20:.1f} GiB, "
            f"page cache {m['Cached'] / 2**20:.1f} GiB")


def table(res, storages, temps, modes, row, caches, full, dim) -> None:
    """The markdown table: best round and median per mode; the reader's columns from its stores'
    later epochs (rounds 2..), as in training, and their first epochs (round 1) beside them.
    (b)/(a) pairs each round's (b) with the same round's (a), read seconds apart, so that load
    moving between rounds cancels: the median of those ratios and their range."""
    print("\n| reads | storage | (a) raw MB/s | (a0) raw, 8 MiB buffer | (b) stream MB/s | (b) samples/s "
          "| (b)/(a) per round: median (range) | (b') +f32 samples/s | (c) dask 1 layer of mean "
          "| (b), (b') first epoch samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for temp in temps:
        for st in storages:
            ra, r0, rb, rf, rc = (res[(temp, st, m)] for m in modes)
            first = f"{rb[0] * 1e6 / row[st]:.0f}, {rf[0] * 1e6 / row[st]:.0f}"
            ratio = [b / a for a, b in zip(ra, rb)][1:] or [rb[0] / ra[0]]
            rb, rf = (v[1:] or v for v in (rb, rf))
            md = statistics.median
            print(f"| {temp} | {st} | {max(ra):.0f} (median {md(ra):.0f}) | {max(r0):.0f} (median {md(r0):.0f}) "
                  f"| {max(rb):.0f} (median {md(rb):.0f}) "
                  f"| {max(rb) * 1e6 / row[st]:.0f} (median {md(rb) * 1e6 / row[st]:.0f}) "
                  f"| {md(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) "
                  f"| {max(rf) * 1e6 / row[st]:.0f} (median {md(rf) * 1e6 / row[st]:.0f}) | "
                  f"{len(caches[temp, st]) / (max(rc) * 1e6 / (dim * full[st].stored_dtype.itemsize)):.2f} s "
                  f"| {first} |")


def main() -> int:
    from wat.data.clikit.args import int_range, positive_int  # bad values: one error line
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=positive_int, default=4000)
    ap.add_argument("--layers", type=positive_int, default=32)
    ap.add_argument("--dim", type=positive_int, default=1280)
    ap.add_argument("--shard-clips", type=positive_int, default=500)
    ap.add_argument("--storage", default="fp16", help="comma-separated storages to compare: fp16,int8")
    ap.add_argument("--store", dest="storage", help=argparse.SUPPRESS)  # the old spelling (BENCHMARKS.md commands)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "wat-bench-cache"),
                    help="where the caches are written (removed at the end unless --keep)")
    ap.add_argument("--rounds", type=int_range(0), default=3, help="0: only the RSS runs")
    ap.add_argument("--cold-clips", type=positive_int, default=2000, help="clips read cold (page cache dropped)")
    ap.add_argument("--warm-clips", type=positive_int, default=1000,
                    help="clips read warm: must fit the page cache beside everything else running")
    ap.add_argument("--batch", type=positive_int, default=48)
    ap.add_argument("--threads", type=positive_int, default=2, help="FeatureStore reader threads")
    ap.add_argument("--no-cold", action="store_true", help="warm reads only")
    ap.add_argument("--rss-budget", type=positive_int, metavar="MB", help="also measure streaming training RSS")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    a = ap.parse_args()
    if min(a.clips, a.layers, a.dim, a.shard_clips, a.rounds + 1, a.batch, a.threads, a.cold_clips, a.warm_clips) < 1 or (a.rss_budget is not None and a.rss_budget < 1):
        ap.error("sizes, batch, threads and the RSS budget must be >= 1, rounds >= 0")
    storages = a.storage.split(",")
    if set(storages) - {"fp16", "int8"}:
        ap.error("--storage: fp16 and/or int8")

    from wat.data.cache import open_cache
    root = Path(a.dir)
    full, caches, files, size = {}, {}, {}, {}
    t = time.perf_counter()
    for st in storages:
        full[st] = open_cache(make_cache(root / st, a.clips, a.layers, a.dim, st, a.shard_clips))
        # RSS runs: the first shards holding more bytes than the budget (a streaming store)
        row_b = full[st].stored_dtype.itemsize * a.layers * 25 * a.dim
        rss_n = next((stop for _, _, stop in full[st].shards if stop * row_b > (a.rss_budget or 0) << 20), a.clips)
        for temp, n in (("cold", a.cold_clips), ("warm", a.warm_clips), ("rss", rss_n)):
            caches[temp, st] = first_shards(full[st], n, root / st)
            files[temp, st] = [str(p) for p, _, _ in caches[temp, st].shards]
            size[temp, st] = sum(os.path.getsize(p) for p in files[temp, st])
    row = {st: full[st].stored_dtype.itemsize * a.layers * 25 * a.dim for st in storages}
    print(f"cache: {a.clips} clips x {a.layers} x 25 x {a.dim}; "
          + ", ".join(f"{st} {sum(os.path.getsize(p) for p, _, _ in full[st].shards) / 1e9:.2f} GB in "
                      f"{len(full[st].shards)} shards" for st in storages)
          + f" ({time.perf_counter() - t:.0f} s to make/open); read cold: "
          + ", ".join(f"{len(caches['cold', st])} clips = {size['cold', st] / 1e9:.2f} GB {st}" for st in storages)
          + "; warm: " + ", ".join(f"{len(caches['warm', st])} clips = {size['warm', st] / 1e9:.2f} GB {st}"
                                  for st in storages)
          + f"; {os.cpu_count()} CPUs, reader threads {a.threads}, batch {a.batch}", flush=True)

    for st in storages:  # each shard's CRC-32s, checked once per process: here, not in round 1's reads
        t = time.perf_counter()
        caches["cold", st].verify_field("features")
        caches["warm", st].verify_field("features")
        print(f"{st}: first-read checksum check of {size['cold', st] / 1e9:.2f} GB: {time.perf_counter() - t:.1f} s "
              f"(once per process; the first epoch of a run pays it)", flush=True)
    print(f"memory: {_meminfo()}; load average {_load()}", flush=True)
    res: dict[tuple, list[float]] = {}  # (temp, storage, mode) -> MB/s per round
    readers = {}  # (temp, storage, mode) -> its FeatureStore
    temps = ["warm"] if a.no_cold else ["cold", "warm"]
    modes = {"raw": None, "raw8": None, "stream": None, "+f32": "float32", "dask": None}
    for r in range(a.rounds):
        for temp in temps:
            for st in storages:
                c, fs = caches[temp, st], files[temp, st]
                for mode, dtype in modes.items():
                    if temp == "cold":
                        drop(fs)
                    else:
                        raw_read(fs, a.threads, 8 << 20)  # make sure every page is resident
                    if mode.startswith("raw"):
                        n, dt = raw_read(fs, a.threads, 8 << 20 if mode == "raw8" else a.batch * row[st])
                        mbs = n / dt / 1e6
                    elif mode == "dask":
                        n, dt = dask_layer(c, a.layers // 2)
                        mbs = n * a.dim * c.stored_dtype.itemsize / dt / 1e6
                    else:
                        import torch
                        from wat.data.cache.store import FeatureStore
                        if (temp, st, mode) not in readers:  # kept between rounds, as between epochs
                            readers[temp, st, mode] = FeatureStore(c, "features", read_threads=a.threads,
                                                                   memory_budget=min(1 << 30, size[temp, st] // 2))
                            assert not readers[temp, st, mode].in_memory
                        n, dt = stream(readers[temp, st, mode], a.batch, r, dtype and getattr(torch, dtype))
                        mbs = n * row[st] / dt / 1e6
                    res.setdefault((temp, st, mode), []).append(mbs)
                    extra = f" = {mbs * 1e6 / row[st]:.0f} samples/s" if mode in ("stream", "+f32") else ""
                    print(f"round {r + 1} {temp:4s} {st} {mode:6s} {mbs:9.1f} MB/s{extra}  (load {_load()})",
                          flush=True)
    print(f"memory after: {_meminfo()}; load average {_load()}")

    if a.rounds:
        table(res, storages, temps, modes, row, caches, full, a.dim)

    if a.rss_budget:
        budget = a.rss_budget << 20
        for st in storages:
            c = caches["rss", st]
            got = {}
            for part in ("reader", "step", "train"):
                out = root / f"rss-run-{st}"
                shutil.rmtree(out, ignore_errors=True)
                code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cache_read; "
                        f"cache_read.rss_child({part!r}, {str(c.path)!r}, {budget}, {str(out)!r}, {a.batch})")
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if p.returncode:
                    print(p.stderr[-3000:])
                    return 1
                got[part] = d = json.loads(p.stdout.strip().splitlines()[-1])
                by = "".join(f", {k} +{v / 2**20:.0f} MB" for k, v in d.get("phases", {}).items())
                print(f"RSS {st} {part}: before {d['before'] / 2**20:.0f} MB, peak {d['peak'] / 2**20:.0f} MB "
                      f"({d['seconds']:.0f} s, load {_load()}){' (beyond the batch' + by + ')' if by else ''}",
                      flush=True)
            mb = lambda v: f"{v / 2**20:.0f} MB"  # noqa: E731
            base = got["train"]["before"]
            reader = got["reader"]["peak"] - got["reader"]["before"]
            step = got["step"]["peak"] - got["step"]["before"]
            print(f"\nRSS, streaming training ({st}, TL-Tr dim 64, batch {a.batch}, 1 epoch over {len(c)} clips "
                  f"= {size['rss', st] / 2**20:.0f} MB, budget {a.rss_budget} MB): baseline {mb(base)} "
                  f"(torch, wat, store opened); reader alone +{mb(reader)} (bounded by the budget: "
                  f"{'yes' if reader <= budget else 'NO'}); step alone +{mb(step)}; whole run peak "
                  f"{mb(got['train']['peak'])} = baseline +{mb(got['train']['peak'] - base)} vs baseline + "
                  f"budget + step = {mb(base + budget + step)}")
    if not a.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
