"""Extraction throughput on one machine, model, device, batch and policy:

  (a) pipeline: `extract_dataset` from audio files on disk to finished shards + index
  (b) bare: the encoder alone on mel batches already in device memory (no decode, no mel, no hooks;
      also timed with the pooling hooks, which the pipeline needs)
  (c) official-style: one clip at a time: decode, encode with full-resolution layer outputs copied
      to the host, numpy pooling, `np.savez_compressed` per clip (the Whisper-AT research data path)

and prints `pipeline/bare` and `pipeline/official`. On CUDA it also prints the encoder's achieved
TFLOP/s (analytic FLOP count of the convs, projections, MLPs and attention). The pipeline's stall
account (`Summary.stalls`: what its main loop waited for, what its writer thread was busy with) is
printed with it. `--null-encoder` adds the host side's ceiling:

  (d) null-encoder pipeline: `extract_dataset` with its encoder call replaced, in this process only,
      by precomputed f16 results of the model's shape on the device: decoding, copies, checksums and
      HDF5 writes at full width, no encoder compute ("only": no weights needed, not even loaded)
  (e) disk write: the same number of bytes written to a plain file in --workdir and fsynced, the
      physical limit of any cache writer on this disk

    python bench/extract_throughput.py --model large-v1 --null-encoder only --batch-size 32 --clips 512

    python bench/extract_throughput.py                                  # CPU: base, trim, 5 s clips
    python bench/extract_throughput.py --device cuda --model large-v1 --batch-size 32 --clips 2000
    python bench/extract_throughput.py --device cuda --model large-v1 --random-weights fallback  # no network
    python bench/extract_throughput.py --rss 1000 5000 --model tiny.en  # peak RSS vs dataset size (Linux)
    python bench/extract_throughput.py --hf-random wav2vec2-base        # a wav2vec2-shaped random model

`--hf-random SHAPE` measures a Hugging Face speech encoder (random weights of a real shape, saved and
loaded through `load_encoder`) instead of Whisper: (a) the pipeline as above and (b) the transformers
model alone on normalised batches already in device memory (also timed as `pooled` does it: input
normalisation and the pooling hooks); no (c), the official Whisper-AT path is Whisper's.

Audio: `make_demo` clips (ESC-50 layout, 5 s, 44.1 kHz wav, decoded and resampled for real); a run
over more clips than were generated cycles over the files under distinct ids (the OS page cache then
holds them: this measures the pipeline, not the disk). Model load time is excluded everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from wat.data.audio import fit_length, load_audio
from wat.data.cache import POLICIES
from wat.data.datasets import load_dataset
from wat.data.demo import CLASSES, make_demo
from wat.extract.layers import LayerTaps, log_mel, pad30_input, short_input
from wat.extract.pooling import layer_subset
from wat.extract import pipeline
from wat.extract.encoders import hf_speech
from wat.extract.pipeline import ExtractOptions, extract_dataset, get_model

from common import (HF_SHAPES, dense_peak_tflops, device_name, random_hf_speech, whisper_dims, whisper_model,
                    write_json)


def dataset(workdir: Path, n: int, seconds: float, pool: int):
    """`n` clips over at most `pool` generated files (ids stay unique)."""
    root = workdir / "audio"
    if not (root / "meta" / "esc50.csv").exists():
        make_demo(root, clips_per_class=max(1, math.ceil(min(n, pool) / len(CLASSES))), seed=0)
    ds = load_dataset("esc50", root, clip_seconds=seconds)
    files = ds.clips
    clips = [replace(files[k % len(files)], id=f"{k:07d}") for k in range(n)]
    return replace(ds, clips=clips, problems=[])


def encoder_flops(dims, mel_frames: int) -> float:
    """Forward FLOPs of the encoder for one clip of `mel_frames` mel frames (2 per multiply-add)."""
    n, d, m = (mel_frames + 1) // 2, dims.n_audio_state, dims.n_mels
    convs = 2 * m * 3 * d * mel_frames + 2 * d * 3 * d * n
    block = 24 * n * d * d + 4 * n * n * d  # q,k,v,out + 4x MLP; scores + weighted sum
    return convs + dims.n_audio_layer * block


def mel_frames(options, n_samples: int) -> int:
    return 3000 if options.policy == "pad30" else n_samples // 160


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_pipeline(model, ds, options, workdir):
    """The extraction `Summary` of a run over `ds` (after a short warm-up run)."""
    warm = replace(ds, clips=ds.clips[: options.batch_size * 2])
    extract_dataset(warm, replace(options, overwrite=True, progress=False), workdir / "warm.h5", model=model)
    s = extract_dataset(ds, replace(options, overwrite=True), workdir / "feats.h5", model=model)
    print(s)
    return s


def null_model(name: str):
    """`name`'s dims, a name and a fingerprint, no weights: all the pipeline reads of the model when
    `null_encoder` stands in for the encoder."""
    return SimpleNamespace(dims=whisper_dims(name), _wat_name=f"null-{name}", _wat_fingerprint="null-encoder")


@contextmanager
def null_encoder(device: str):
    """Replace `wat.extract.pipeline.encode_batch` (this process only) by a function that returns
    precomputed f16 features, means and finite flags of the right shapes on `device`: what remains of
    the pipeline is its host side (decode, copies, checksums, HDF5 writes) at full width."""
    real, made = pipeline.encode_batch, {}

    def encode(encoder, audio, options, lengths=None):
        n = len(audio)
        if made.get("rows", 0) < n:
            g = torch.Generator().manual_seed(0)
            shape = (max(n, options.batch_size), len(layer_subset(options.layers, encoder.n_layers)),
                     options.frames, encoder.dim)
            feats = torch.randn(shape, generator=g).to(torch.float16)
            made.update(rows=shape[0], out=(feats.to(device), feats.float().mean(2).half().to(device),
                                            torch.ones(shape[0], dtype=torch.bool, device=device)))
        return tuple(t[:n] for t in made["out"])

    pipeline.encode_batch = encode
    try:
        yield
    finally:
        pipeline.encode_batch = real


def _cpu_seconds() -> tuple[float, float]:
    """user+sys CPU seconds of this process (all threads) and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def disk_write_rate(workdir: Path, nbytes: int, piece: int = 64 << 20) -> float:
    """Bytes/s of writing `nbytes` (random bytes) to a plain file in `workdir` and fsyncing it."""
    block = np.random.default_rng(0).integers(0, 256, piece, np.uint8).tobytes()
    path = workdir / "disk-rate.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for a in range(0, nbytes, piece):
            f.write(block[: min(piece, nbytes - a)])
        os.fsync(f.fileno())
    rate = nbytes / (time.perf_counter() - t0)
    path.unlink()
    return rate


@torch.inference_mode()
def bench_bare(model, ds, options, n_samples) -> tuple[float, float]:
    """clips/s of the encoder on pre-computed mel batches: without and with the pooling hooks."""
    dev = options.device
    bs = options.batch_size
    audio = [fit_length(load_audio(c.path, offset=c.offset, duration=c.duration), n_samples)
             for c in ds.clips[: min(len(ds.clips), 8 * bs)]]
    mels, n_valid = [], None
    for i in range(0, len(audio), bs):
        a = torch.from_numpy(np.stack(audio[i:i + bs])).to(dev)
        if options.policy == "pad30":  # transcribe's windows, as the pipeline builds them
            mel, valid = pad30_input(a, model.dims.n_mels)
            n_valid = valid[0]
        else:
            mel = log_mel(a, model.dims.n_mels)
        mels.append(mel)
    n_enc = (mels[0].shape[-1] + 1) // 2
    rounds = max(1, math.ceil(len(ds.clips) / len(audio)))  # about as many clips as the pipeline run
    results = []
    for hooks in (False, True):
        with torch.autocast("cuda", dtype=torch.float16, enabled=dev.startswith("cuda")), \
                short_input(model.encoder, n_enc):
            taps = LayerTaps(model.encoder, options.frames, n_valid)
            if hooks:
                taps.__enter__()
            model.encoder(mels[0])  # warm-up
            sync(dev)
            t0, done = time.perf_counter(), 0
            for _ in range(rounds):
                for mel in mels:
                    model.encoder(mel)
                    done += mel.shape[0]
            sync(dev)
            taps.__exit__()
        results.append(done / (time.perf_counter() - t0))
    return results[0], results[1]


def official_ffmpeg(workdir: Path) -> str | None:
    """Put an `ffmpeg` on PATH for `whisper.load_audio`: the system one, else imageio-ffmpeg's
    static build (`pip install imageio-ffmpeg`, the `bench` extra). None when there is neither."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    link = workdir / "bin" / "ffmpeg"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    os.environ["PATH"] = f"{link.parent}{os.pathsep}{os.environ['PATH']}"
    return str(link)


def bench_official(model, ds, options, n_samples, workdir, n: int, ffmpeg: str | None) -> float:
    """The official Whisper-AT extraction data path, one clip at a time: decode, mel, encoder with
    every block's full-resolution output copied to the host, numpy window means, one
    `np.savez_compressed` per clip. Decoding is the official one (`whisper.load_audio`: an ffmpeg
    subprocess per file) when an ffmpeg binary is found, else our in-process decoder (faster than
    ffmpeg, so the ratio is then conservative)."""
    import whisper.audio

    out = workdir / "npz"
    out.mkdir(exist_ok=True)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.float().cpu().numpy()))
             for b in model.encoder.blocks]
    n_valid = math.ceil(n_samples / 320)
    t0 = time.perf_counter()
    try:
        for c in ds.clips[:n]:
            if ffmpeg:
                audio = whisper.audio.load_audio(str(c.path))[int((c.offset or 0) * 16000):]
                audio = fit_length(audio[:n_samples], n_samples)
            else:
                audio = fit_length(load_audio(c.path, offset=c.offset, duration=c.duration), n_samples)
            audio = torch.from_numpy(audio)[None].to(options.device)
            if options.policy == "pad30":  # the official extraction runs whisper's transcribe windows
                mel, (n_valid,) = pad30_input(audio, model.dims.n_mels)
            else:
                mel = log_mel(audio, model.dims.n_mels)
            outputs.clear()
            with torch.inference_mode(), short_input(model.encoder, (mel.shape[-1] + 1) // 2), \
                    torch.autocast("cuda", dtype=torch.float16, enabled=options.device.startswith("cuda")):
                model.encoder(mel)
            reps = np.stack(outputs)[:, 0, :n_valid]  # [L, frames, D]
            edges = np.linspace(0, n_valid, options.frames + 1).round().astype(int)
            pooled = np.stack([reps[:, a:b].mean(1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
            np.savez_compressed(out / f"{c.id}.npz", pooled.astype(np.float16))
    finally:
        for h in hooks:
            h.remove()
    return min(n, len(ds.clips)) / (time.perf_counter() - t0)


def bench_real(model, args, options, n_samples, work: Path, gpu: str) -> dict:
    """(a), (b), (c) and their ratios, printed; their JSON fields."""
    ds = dataset(work, args.clips, args.clip_seconds, args.pool)
    ffmpeg = official_ffmpeg(work)
    print(f"official-style decoding: {'ffmpeg subprocess per clip (' + ffmpeg + ')' if ffmpeg else 'in-process (no ffmpeg found: conservative)'}")
    run, bare, hooked, official = None, 0.0, 0.0, 0.0
    for _ in range(args.repeat):  # interleaved; the best of each: other load on the machine only slows down
        s = bench_pipeline(model, ds, options, work)
        run = s if run is None or s.clips_per_s > run.clips_per_s else run
        b, h = bench_bare(model, ds, options, n_samples)
        bare, hooked = max(bare, b), max(hooked, h)
        official = max(official, bench_official(model, ds, options, n_samples, work, args.official_clips or args.clips,
                                                ffmpeg))
    pipe = run.clips_per_s
    print(f"(a) pipeline        {pipe:9.2f} clips/s   ({run.stalls})")
    print(f"(b) bare encoder    {bare:9.2f} clips/s   (with pooling hooks {hooked:.2f})")
    print(f"(c) official-style  {official:9.2f} clips/s")
    print(f"pipeline/bare      {pipe / bare:.3f}")
    print(f"pipeline/official  {pipe / official:.2f}")
    f = encoder_flops(model.dims, mel_frames(options, n_samples))
    peak = dense_peak_tflops(gpu) if args.device.startswith("cuda") else None
    print(f"encoder: {f / 1e9:.1f} GFLOP/clip; bare {bare * f / 1e12:.2f} TFLOP/s, pipeline {pipe * f / 1e12:.2f} TFLOP/s"
          + (f" = {100 * bare * f / 1e12 / peak:.0f}% / {100 * pipe * f / 1e12 / peak:.0f}% of {gpu}'s dense fp16 peak "
             f"{peak:.0f}" if peak else ""))
    return {"pipeline": pipe, "bare": bare, "bare_hooked": hooked, "official": official,
            "pipeline_bare": pipe / bare, "pipeline_official": pipe / official,
            "encoder_gflop_per_clip": f / 1e9, "bare_tflops": bare * f / 1e12,
            "pipeline_tflops": pipe * f / 1e12, "peak_tflops": peak, "stalls": asdict(run.stalls) if getattr(run, "stalls", None) else None}


@torch.inference_mode()
def bench_hf_bare(enc, ds, options, n_samples) -> tuple[float, float]:
    """clips/s of the transformers model on normalised batches in device memory, then of
    `enc.pooled` on the same audio (normalisation + the pooling hooks)."""
    dev, bs = options.device, options.batch_size
    audio = [torch.from_numpy(fit_length(load_audio(c.path, offset=c.offset, duration=c.duration), n_samples))
             for c in ds.clips[: min(len(ds.clips), 8 * bs)]]
    raw = [torch.stack(audio[i:i + bs]).to(dev) for i in range(0, len(audio), bs)]
    normed = [torch.stack([hf_speech.normalized(c) for c in b]) if enc.normalize else b for b in raw]
    rounds = max(1, math.ceil(len(ds.clips) / len(audio)))
    results = []
    for call in (lambda i: enc.model(normed[i]), lambda i: enc.pooled(raw[i], frames=options.frames, policy="trim")):
        with torch.autocast("cuda", dtype=torch.float16, enabled=dev.startswith("cuda")):
            call(0)  # warm-up
            sync(dev)
            t0, done = time.perf_counter(), 0
            for _ in range(rounds):
                for i in range(len(raw)):
                    call(i)
                    done += len(raw[i])
            sync(dev)
        results.append(done / (time.perf_counter() - t0))
    return results[0], results[1]


def bench_hf(enc, args, options, n_samples, work: Path) -> dict:
    """(a) and (b) for an HF speech encoder, printed; their JSON fields."""
    ds = dataset(work, args.clips, args.clip_seconds, args.pool)
    run, bare, hooked = None, 0.0, 0.0
    for _ in range(args.repeat):  # interleaved; the best of each: other load on the machine only slows down
        s = bench_pipeline(enc, ds, options, work)
        run = s if run is None or s.clips_per_s > run.clips_per_s else run
        b, h = bench_hf_bare(enc, ds, options, n_samples)
        bare, hooked = max(bare, b), max(hooked, h)
    pipe = run.clips_per_s
    print(f"(a) pipeline        {pipe:9.2f} clips/s   ({run.stalls})")
    print(f"(b) bare encoder    {bare:9.2f} clips/s   (as pooled: normalisation + pooling hooks {hooked:.2f})")
    print(f"pipeline/bare      {pipe / bare:.3f}")
    peak = total = None
    if args.device.startswith("cuda"):  # the batch rule: what the largest batch of the run held
        peak = torch.cuda.max_memory_allocated(args.device) / 1e9
        total = torch.cuda.get_device_properties(args.device).total_memory / 1e9
        print(f"peak GPU memory    {peak:.1f} GB of {total:.0f} GB")
    return {"pipeline": pipe, "bare": bare, "bare_hooked": hooked, "pipeline_bare": pipe / bare,
            "clip_seconds": args.clip_seconds, "peak_gpu_gb": peak, "gpu_total_gb": total,
            "stalls": asdict(run.stalls) if getattr(run, "stalls", None) else None}


def bench_null(args, options, work: Path, pipe: float | None) -> dict:
    """(d) and (e), printed; their JSON fields."""
    model = null_model(args.model)
    ds = dataset(work, args.null_clips or args.clips, args.clip_seconds, args.pool)
    run, disk, cpu = None, 0.0, None
    for _ in range(args.repeat):
        before = _cpu_seconds()
        with null_encoder(args.device):
            s = bench_pipeline(model, ds, options, work)
        used = [(b - a) / s.processed for a, b in zip(before, _cpu_seconds())]
        cpu = used if cpu is None else [min(x, y) for x, y in zip(cpu, used)]
        run = s if run is None or s.clips_per_s > run.clips_per_s else run
        disk = max(disk, disk_write_rate(work, s.bytes))
    per_clip = run.bytes / run.written
    rate, disk_clips = run.clips_per_s, disk / per_clip
    print(f"(d) null-encoder pipeline {rate:9.2f} clips/s = {rate * per_clip / 1e6:.0f} MB/s of cache "
          f"({per_clip / 1e6:.2f} MB/clip; {getattr(run, 'stalls', None)})")
    # CPU time hardly depends on what else runs on the machine (clock rates and caches aside)
    print(f"    host CPU per clip: {1e3 * cpu[0]:.1f} ms in this process (user+sys, all threads; with "
          f"the warm-up run) + {1e3 * cpu[1]:.1f} ms in the decode workers")
    print(f"(e) disk write            {disk_clips:9.2f} clips/s = {disk / 1e6:.0f} MB/s ({run.bytes / 1e9:.2f} GB, fsync)")
    print(f"null-encoder/disk  {rate / disk_clips:.3f}")
    if pipe:
        print(f"pipeline/null-encoder  {pipe / rate:.3f}")
    return {"null_cpu_ms_per_clip": 1e3 * cpu[0], "null_decode_cpu_ms_per_clip": 1e3 * cpu[1],
            "null_encoder": rate, "null_stalls": asdict(run.stalls) if getattr(run, "stalls", None) else None, "null_clips": run.processed,
            "disk_write_mb_s": disk / 1e6, "disk_clips": disk_clips, "null_disk": rate / disk_clips,
            "mb_per_clip": per_clip / 1e6}


def rss_child(args) -> None:
    """Run the pipeline over args.rss_child clips in this process; print peak RSS as JSON."""
    options = ExtractOptions(model=args.model, policy=args.policy, device=args.device, batch_size=args.batch_size,
                             num_workers=args.num_workers, shard_size=args.shard_size, overwrite=True,
                             clip_seconds=args.clip_seconds, progress=False)
    work = Path(args.workdir)
    ds = dataset(work, args.rss_child, args.clip_seconds, args.pool)
    model = get_model(args.model, args.device)
    before, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample():  # ru_maxrss is the lifetime peak (often the model load): sample during the run
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    s = extract_dataset(ds, options, work / f"rss{args.rss_child}.h5", model=model)
    stop.set()
    thread.join()
    print(json.dumps({"clips": args.rss_child, "before_mb": before, "peak_during_mb": peak[0],
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "clips_per_s": s.clips_per_s}))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main(argv=None) -> int:
    from wat.data.clikit.args import float_range, int_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument("--random-weights", choices=("never", "fallback", "always"), default="never",
                   help="random weights with --model's dims: 'fallback' when the weights cannot be loaded")
    p.add_argument("--hf-random", choices=tuple(HF_SHAPES), metavar="SHAPE",
                   help=f"a random-weight Hugging Face speech encoder of this shape instead of --model ({', '.join(HF_SHAPES)})")
    p.add_argument("--policy", default="trim", choices=POLICIES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--num-workers", type=int_range(0), default=None)
    p.add_argument("--shard-size", type=positive_int, default=256)
    p.add_argument("--frames", type=positive_int, default=25)
    p.add_argument("--clips", type=positive_int, default=96, help="clips for the pipeline and bare runs")
    p.add_argument("--official-clips", type=positive_int, default=None, help="clips for the per-clip loop (default: --clips)")
    p.add_argument("--clip-seconds", type=float_range(0, 600, lo_open=True), default=5.0)
    p.add_argument("--pool", type=positive_int, default=220, help="distinct audio files generated")
    p.add_argument("--repeat", type=positive_int, default=2, help="rounds of (a), (b), (c); the best of each is reported")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON (bench/gpu_check.sh)")
    p.add_argument("--rss", type=positive_int, nargs="+", metavar="N", help="peak RSS of the pipeline for N clips, each run in a child")
    p.add_argument("--rss-child", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--null-encoder", nargs="?", const="also", default="no", choices=("no", "also", "only"),
                   help="also (or only) (d) the pipeline with the encoder replaced by precomputed results and "
                        "(e) the disk's write rate for the same bytes: the host side's ceiling")
    p.add_argument("--null-clips", type=positive_int, default=None, help="clips for (d) (default: --clips)")
    args = p.parse_args(argv)
    for name in ("batch_size", "shard_size", "frames", "clips", "pool", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.clip_seconds <= 30:
        p.error("--clip-seconds must be in (0, 30]")
    for name in ("official_clips", "null_clips"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="wat-bench-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    args.workdir = str(work)

    if args.rss_child:
        rss_child(args)
        return 0
    if args.rss:
        print(f"peak RSS, model {args.model}, policy {args.policy}, shard size {args.shard_size}:")
        for n in args.rss:
            cmd = [sys.executable, __file__, "--rss-child", str(n), "--workdir", str(work), "--model", args.model,
                   "--policy", args.policy, "--device", args.device, "--batch-size", str(args.batch_size),
                   "--shard-size", str(args.shard_size), "--clip-seconds", str(args.clip_seconds),
                   "--pool", str(args.pool)] + (["--num-workers", str(args.num_workers)] if args.num_workers is not None else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"  {n:7d} clips: RSS {r['before_mb']:.0f} MB before, peak {r['peak_during_mb']:.0f} MB during "
                  f"extraction (process lifetime peak {r['maxrss_mb']:.0f} MB, child processes "
                  f"{r['children_maxrss_mb']:.0f} MB), {r['clips_per_s']:.1f} clips/s")
        return 0

    options = ExtractOptions(model=args.model, policy=args.policy, frames=args.frames, device=args.device,
                             batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
                             clip_seconds=args.clip_seconds)
    n_samples = round(args.clip_seconds * 16000)
    if args.hf_random:
        if args.null_encoder != "no" or args.rss:
            p.error("--hf-random measures (a) and (b) only")
        options.policy = "trim"  # the only policy of these encoders
        enc = random_hf_speech(args.hf_random, work / f"hf-{args.hf_random}", args.device)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
        print(f"model random {args.hf_random} ({enc.n_layers} x {enc.dim}, HF {enc.model.config.model_type}), policy trim, "
              f"{args.clip_seconds:g} s clips, batch {args.batch_size}, device {args.device}, {args.clips} clips "
              "(RANDOM WEIGHTS: throughput only)")
        record = {"bench": "extract_hf", "device": device_name(args.device), "model": f"random-{args.hf_random}",
                  "random_weights": True, "policy": "trim", "batch_size": args.batch_size, "clips": args.clips}
        record.update(bench_hf(enc, args, options, n_samples, work))
        if args.json:
            write_json(args.json, record)
        return 0
    real, null = args.null_encoder != "only", args.null_encoder != "no"
    model, random = whisper_model(args.model, args.device, args.random_weights) if real else (null_model(args.model), True)
    name = model._wat_name
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print(f"model {name}, policy {args.policy}, {args.clip_seconds:g} s clips, batch {args.batch_size}, "
          f"device {args.device}, {args.clips} clips" + (" (RANDOM WEIGHTS: throughput only)" if random and real else ""))
    gpu = device_name(args.device)
    record = {"bench": "extract", "device": gpu, "model": name, "random_weights": random, "policy": args.policy,
              "batch_size": args.batch_size, "clips": args.clips}
    if real:
        record.update(bench_real(model, args, options, n_samples, work, gpu))
    if null:
        record.update(bench_null(args, options, work, record.get("pipeline")))
    if args.json:
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
