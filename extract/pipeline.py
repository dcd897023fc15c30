"""The batched extractor: a dataset in, a cache out (`feats.h5` over the shard folder `feats.shards/`,
whose layout, lock, manifest check and resume are `wat.data.cache.shardrun.ShardRun`'s).

What this module puts in that folder: shard i holds clips[i*S:(i+1)*S] of the sorted clip list minus
the clips that failed (so every run cuts the same shards and a rerun redoes only the unfinished
ones), its record is a `ShardResult` (rows written, (id, path, reason) of each failure), the manifest
is `run_manifest`, `errors.tsv` merges every failed clip and `problems.tsv` lists the dataset rows
that never became clips (no audio file, bad label...).

Data path: DataLoader worker processes decode, resample and fit each clip to `clip_seconds`
(returning the error instead of raising); the main process runs the encoder with pooling inside the
forward hooks (`Encoder.pooled`; Whisper computes the log-mel per clip on the device), on the
zero-padded window for Whisper (`Encoder.pad_to_clip_length`, as always) and on each clip's real
samples for the other families (padding would change their per-clip normalisation), collecting
batch k only after batches k+1 and k+2 are queued; two writer threads turn the completed shards into
files. Host memory: ~3 shard buffers (filling, queued, writing) of S x L x T x D f16 each, one more
while batches of two shards are in flight. `Summary.stalls` says which stage the others waited for.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from wat.data import cache as wcache
from wat.data.clikit.progress import progress as progress_bar
from wat.data.audio import MIN_SECONDS, SAMPLE_RATE, clip_window, load_audio
from wat.data.datasets import Clip, Dataset
from wat.data.spec import WHISPER
# the shard folder (ShardRun) moved to wat.data.cache.shardrun; its names stay importable from here
from wat.data.cache.shardrun import (ERRORS, LOCK, MANIFEST, PROBLEMS, ShardRun, ShardRunError,  # noqa: F401
                                     finished, record_path, shard_dir_for, write_record)
from wat.data.files import LockedError, write_tsv
from wat.data.hostpool import HostPool

from .encoders import Encoder, as_encoder, encoder_class, family_of, load_encoder
from .pooling import layer_subset
from wat.data.errors import WatError



class ExtractError(WatError):
    """The run cannot start or finish: mismatched output, bad options, failed shards."""


class RunnerConflict(ExtractError):
    """A loaded `model` was passed together with a `runner`: the runner's workers load their own
    model from `options.model`, so the loaded one would be silently ignored."""


class ShardRunner(Protocol):
    """Runs shards elsewhere (e.g. `wat.extract.cluster.DaskRunner`): handed to `extract_dataset`,
    so this module never imports a scheduler."""

    def cache_meta(self, dataset: Dataset, options: "ExtractOptions", clip_seconds: float) -> wcache.CacheMeta:
        """The cache meta of `options.model` (`cache_meta`), computed where the model is loaded."""

    def run_shards(self, todo: list, options: "ExtractOptions", shard_dir: Path, meta: wcache.CacheMeta) -> list:
        """Extract every (index, clips) shard of `todo` into `shard_dir`; raise ExtractError on failure."""


@dataclass
class ExtractOptions:
    model: str = "tiny.en"            # anything load_encoder accepts (Whisper, HF speech model, crepe-*)
    policy: str | None = None         # "pad30" | "trim"; None = the encoder's default (Whisper pad30, others trim)
    frames: int = 25                  # pooled frames per clip
    device: str = "cpu"
    batch_size: int = 16
    num_workers: int | None = None    # decode processes; None = up to 8 on CUDA, 0-1 on CPU
    shard_size: int = 1000
    limit: int | None = None          # only the first N clips (sorted by id)
    overwrite: bool = False
    clip_seconds: float | None = None  # None = the dataset's nominal length
    progress: bool | None = None      # None: as wat.data.clikit.progress is set (bar on a TTY, else log lines); False: none
    storage: str = "fp16"             # stored precision: "fp16" | "int8" (half the bytes, scaled per shard)
    layers: tuple | None = None       # (start, stop) slice of encoder blocks to keep; None = all

    @property
    def store(self) -> str:
        """The old name of `storage` (deprecated): "store" names the reader (`FeatureStore`); the
        stored precision is `storage` everywhere (the cache attribute, CacheMeta, FeatureSpec)."""
        return self.storage

    def check(self) -> None:
        if self.policy is not None and self.policy not in wcache.POLICIES:
            raise ExtractError(f"unknown policy {self.policy!r} ({' or '.join(wcache.POLICIES)})")
        if self.storage not in wcache.STORAGES:
            raise ExtractError(f"unknown storage {self.storage!r} ({' or '.join(wcache.STORAGES)})")
        for name in ("frames", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ExtractError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ExtractError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit < 0:
            raise ExtractError(f"limit must be >= 0, got {self.limit}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExtractError(f"device {self.device!r} requested but CUDA is not available")


def _old_store_keyword(init):
    """ExtractOptions(store=...) (the old name of storage=) keeps working, with a DeprecationWarning;
    not a field, so `dataclasses.replace` and `asdict` see `storage` only."""
    @functools.wraps(init)
    def __init__(self, *args, store: str | None = None, **kw):
        if store is not None:
            if "storage" in kw:
                raise TypeError("ExtractOptions: give storage= only (store= is its old name)")
            warnings.warn("ExtractOptions(store=...) is deprecated: use storage=", DeprecationWarning, stacklevel=2)
            kw["storage"] = store
        init(self, *args, **kw)
    return __init__


ExtractOptions.__init__ = _old_store_keyword(ExtractOptions.__init__)

@dataclass
class ShardResult:
    index: int
    path: str | None                  # None when every clip of the shard failed
    n_clips: int
    n_written: int
    errors: list[tuple[str, str, str]]  # (id, path, reason)
    seconds: float = 0.0


_STALLS_LOCK = threading.Lock()


@dataclass
class Stalls:
    """Where this run's extraction time went, in seconds (cheap: a clock read per batch and per shard).
    The main loop's share (audio + device + writer + copies <= the wall time) says which stage the
    others waited for; the writer threads' busy time (checksum + write, summed over the threads) says
    what a writer stall cost."""
    audio: float = 0.0     # main loop waiting for the next decoded batch (the loader's workers)
    device: float = 0.0    # main loop in the encoder call and waiting for its results (CUDA: the event sync)
    writer: float = 0.0    # main loop waiting to hand a full shard to the writer threads (both still busy)
    copies: float = 0.0    # main loop copying results into the shard buffer
    checksum: float = 0.0  # writer threads: finite check and waiting for the rows' CRC-32s (`wcache.write_shard`)
    write: float = 0.0     # writer threads: the rest of the HDF5 file (create, write, fsync, rename) and the record

    def __str__(self) -> str:
        return (f"waits: audio {self.audio:.1f} s, device {self.device:.1f} s, writer {self.writer:.1f} s "
                f"(copies {self.copies:.1f} s); writer busy: checksum {self.checksum:.1f} s, write {self.write:.1f} s")


@dataclass
class Summary:
    index: str
    shard_dir: str
    n_clips: int                      # clips in the (limited) dataset
    written: int                      # rows in the cache, all shards
    processed: int                    # clips encoded or attempted in this run
    resumed_shards: int               # finished shards found and kept
    shards: int
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    problems: int = 0                 # dataset rows skipped before extraction (no audio, bad label)
    damaged: list[str] = field(default_factory=list)  # finished shards that failed their check: redone
    wall_s: float = 0.0
    bytes: int = 0
    stalls: Stalls | None = None      # None when the shards ran elsewhere (a runner) or nothing was to do

    @property
    def clips_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.written} clips in {self.index} ({self.shards} shards, {self.resumed_shards} resumed), "
            f"{len(self.errors)} skipped, {self.problems} dataset rows without usable audio",
            f"{self.processed} clips processed in {self.wall_s:.1f} s ({self.clips_per_s:.1f} clips/s), "
            f"{self.bytes / 1e6:.1f} MB on disk",
        ]
        if self.stalls is not None:
            lines.append(str(self.stalls))
        if self.damaged:
            lines.append(f"{len(self.damaged)} damaged shard(s) found and extracted again:")
            lines += [f"  {d}" for d in self.damaged[:5]]
        if self.errors:
            lines.append(f"skipped clips are listed in {Path(self.shard_dir) / ERRORS}:")
            for reason, n in _reason_counts(self.errors).most_common(5):
                lines.append(f"  {n:6d}  {reason}")
        return "\n".join(lines)


def _reason_counts(errors) -> Counter:
    # reasons often start with the file name; count the part that says what went wrong
    return Counter(r.split(": ")[-1][:100] for _, _, r in errors)


def resolve_clip_seconds(dataset: Dataset, options: ExtractOptions) -> float:
    """The clip length of the run (`options.clip_seconds` or the dataset's); what the encoder can
    take of it is checked where the encoder is loaded (`cache_meta`)."""
    seconds = float(options.clip_seconds or dataset.clip_seconds)
    if not 0 < seconds < float("inf"):
        raise ExtractError(f"clip length must be a number of seconds > 0, got {seconds:g}")
    return seconds


def plan_shards(clips: list[Clip], shard_size: int) -> list[list[Clip]]:
    return [clips[i:i + shard_size] for i in range(0, len(clips), shard_size)]


def _ids_digest(clips: list[Clip]) -> str:
    h = hashlib.sha256()
    for c in clips:
        h.update(c.id.encode() + b"\0" + str(c.path).encode() + b"\0")
    return h.hexdigest()[:16]


def run_manifest(dataset: Dataset, clips: list[Clip], meta: wcache.CacheMeta, options: ExtractOptions) -> dict:
    """What a rerun must agree on to reuse the shards already written."""
    return {
        "model": meta.model, "fingerprint": meta.fingerprint, "policy": meta.policy,
        "pad30_padding": meta.pad30_padding, "frames": meta.n_frames, "pooling": meta.pooling,
        "clip_seconds": meta.clip_seconds,
        "shard_size": options.shard_size, "dataset": dataset.name, "n_clips": len(clips),
        "clips_sha256": _ids_digest(clips), "storage": meta.storage, "layers": _show_layers(meta, options),
        # the encoder family: absent for Whisper (its run folders stay as they were)
        **({"encoder": meta.encoder} if meta.encoder != WHISPER else {}),
    }


def _show_layers(meta: wcache.CacheMeta, options: ExtractOptions) -> str:
    return "all" if options.layers is None else f"{meta.layers[0]}:{meta.layers[-1] + 1}"


def prepare_output(index_path, manifest: dict, overwrite: bool) -> Path:
    """Create the shard folder, or check that the one there was made the same way (`ShardRun.prepare`)."""
    try:
        return ShardRun(index_path).prepare(manifest, overwrite)
    except ShardRunError as e:
        raise ExtractError(str(e)) from None


def cache_meta(encoder, dataset: Dataset, options: ExtractOptions, clip_seconds: float) -> wcache.CacheMeta:
    """The metadata of `dataset`'s features by `encoder` (an `Encoder`, or a loaded Whisper) under
    `options`; ExtractError when the encoder cannot give them (a policy it does not take, clips
    longer than it encodes, more frames than its longest clip has). `options.policy` None = the
    encoder's default policy."""
    encoder = as_encoder(encoder)
    try:
        policy = encoder.policy_for(options.policy)
    except ValueError as e:
        raise ExtractError(str(e)) from None
    if encoder.sample_rate != SAMPLE_RATE:  # the decoders resample every clip to wat's one rate
        raise ExtractError(f"the {encoder.family} encoder {encoder.name!r} takes {encoder.sample_rate} Hz audio; "
                           f"wat decodes audio at {SAMPLE_RATE} Hz")
    if encoder.max_seconds is not None:
        if clip_seconds > encoder.max_seconds:
            raise ExtractError(f"clip length must be at most {encoder.max_seconds:g} s for the {encoder.family} "
                               f"encoder {encoder.name!r} (what it encodes of a clip), got {clip_seconds:g}")
        most = encoder.native_frames(round(encoder.max_seconds * SAMPLE_RATE), policy)
        if options.frames > most:
            raise ExtractError(f"frames must be <= {most} (the encoder frames of {encoder.max_seconds:g} s), "
                               f"got {options.frames}")
    # the clip length against what a clip of it can give: at least one analysis window and the
    # encoder's fewest samples (shorter windows failed every clip, or raised mid-run), and at least
    # `options.frames` encoder frames (more pooled frames than encoder frames would repeat frames:
    # refused, not stored)
    n = round(clip_seconds * SAMPLE_RATE)
    need = max(math.ceil(MIN_SECONDS * SAMPLE_RATE), encoder.min_samples(policy))
    if n < need:
        raise ExtractError(f"--clip-seconds {clip_seconds:g}: {n} samples, fewer than the {need} "
                           f"({need / SAMPLE_RATE * 1000:g} ms) a clip needs for policy {policy!r}")
    have = encoder.native_frames(n, policy)
    if options.frames > have:
        raise ExtractError(f"--frames {options.frames}: a clip of {clip_seconds:g} s has {have} encoder frames; ask "
                           f"for at most {have} (more would repeat frames), or a longer --clip-seconds")
    versions = {"torch": torch.__version__, "numpy": np.__version__, **encoder.library_versions()}
    spec = encoder.spec(policy=policy, frames=options.frames, layers=_layers(options, encoder.n_layers),
                        storage=options.storage)
    return wcache.CacheMeta.of(spec, clip_seconds=clip_seconds, vocab=dataset.vocab, multilabel=dataset.multilabel,
                               dataset=dataset.name, versions=versions)


def _layers(options: ExtractOptions, n_blocks: int) -> tuple[int, ...]:
    try:
        return layer_subset(options.layers, n_blocks)
    except ValueError as e:
        raise ExtractError(f"--layers: {e}") from None


# ---------------------------------------------------------------- decoding (worker processes)

class _ClipAudio(torch.utils.data.Dataset):
    """Item k: (k, float32 audio of exactly n_samples | None, reason, seconds of real audio)."""

    def __init__(self, clips: list[Clip], n_samples: int):
        self.clips, self.n_samples = clips, n_samples

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, k):
        clip = self.clips[k]
        try:
            audio = load_audio(clip.path, offset=clip.offset, duration=clip.duration)
            window, seconds = clip_window(audio, self.n_samples, clip.path)  # checked after the cut
        except Exception as e:  # any decoder failure is this clip's problem, not the run's
            return k, None, _reason(e), 0.0
        return k, window, "", seconds


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    return " ".join(str(reason).split())  # one line, no tabs


def _collate(items):
    ok = [it for it in items if it[1] is not None]
    return {
        "index": torch.tensor([it[0] for it in ok], dtype=torch.long),
        "audio": torch.from_numpy(np.stack([it[1] for it in ok])) if ok else torch.empty(0),
        "seconds": [it[3] for it in ok],
        "errors": [(it[0], it[2]) for it in items if it[1] is None],
    }


def _worker_init(_):
    # decode workers must not fight the encoder for cores
    torch.set_num_threads(1)


def _can_fork_workers() -> bool:
    import multiprocessing

    return not multiprocessing.current_process().daemon  # dask workers are daemonic


def default_workers(options: ExtractOptions) -> int:
    if options.num_workers is not None:
        return options.num_workers
    cores = os.cpu_count() or 1
    if options.device.startswith("cuda"):
        return min(8, max(1, cores - 1))
    # on CPU the encoder's threads take every core and decoding is ~2% of the work: a decode
    # process only helps when a core is left over, otherwise it preempts a spinning OpenMP thread
    return 1 if cores > torch.get_num_threads() else 0


def _mp_context():
    # processes started by spawn (dask workers) make spawn the default: every DataLoader would then
    # re-import torch and whisper in its workers (seconds per shard). Decode workers only need numpy
    # and soundfile, so forking is safe even after CUDA is initialised in the parent.
    import multiprocessing

    return multiprocessing.get_context("fork") if sys.platform == "linux" else None


def _loader(clips, batches, n_samples, options):
    workers = default_workers(options) if _can_fork_workers() else 0
    return torch.utils.data.DataLoader(
        _ClipAudio(clips, n_samples), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, pin_memory=options.device.startswith("cuda"),
        worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
        multiprocessing_context=_mp_context() if workers else None,
    )


# ---------------------------------------------------------------- encoding (main process)

def shard_pools(meta: wcache.CacheMeta, shard_size: int, keep: int = 4) -> tuple[HostPool, HostPool]:
    """The host arrays of the shard buffers (features, mean), reused by later shards: a new array
    costs a page fault per 4 KiB page (the kernel zeroes each) on its first write, in the main
    loop: ~2 GB per 1000 large-v1 clips, more than the copies themselves (bench/extract_throughput.py
    --null-encoder). `keep`: the shards alive at once when each takes at least `_IN_FLIGHT` batches:
    the one being filled, the one whose last batches are still in flight, and those handed to the
    writer (`_Writer`'s `pending`, 2); a shard's arrays come back when its writer thread lets go of it."""
    return (HostPool((shard_size, meta.n_layers, meta.n_frames, meta.dim), np.float16, keep),
            HostPool((shard_size, meta.n_layers, meta.dim), np.float16, keep))


class _ShardBuffer:
    """A shard's rows, filled in clip order into one preallocated host array per field (from
    `pools`, `shard_pools`, when given)."""

    def __init__(self, index: int, clips: list[Clip], meta: wcache.CacheMeta,
                 pools: tuple[HostPool, HostPool] | None = None):
        self.index, self.clips = index, clips
        if pools is None:
            pools = shard_pools(meta, len(clips), keep=0)  # nothing kept: plain arrays
        self.features, self.mean = (p.take(len(clips)) for p in pools)
        self.rows: list[int] = []       # clip positions written, in order
        self.seconds: list[float] = []
        self.errors: dict[int, str] = {}
        self.done = 0
        self.t0 = time.perf_counter()

    def add(self, ks: list[int], features: np.ndarray, mean: np.ndarray, seconds: list[float]):
        """Append the rows of clip positions `ks` (ascending): one copy per array, not one per row."""
        a, b = len(self.rows), len(self.rows) + len(ks)
        self.features[a:b] = features
        self.mean[a:b] = mean
        self.rows += ks
        self.seconds += seconds

    def write(self, shard_dir, meta, stalls: Stalls | None = None) -> ShardResult:
        t0, timing = time.perf_counter(), {}
        n, path = len(self.rows), wcache.shard_path(shard_dir, self.index)
        if n:
            clips = [self.clips[k] for k in self.rows]
            wcache.write_shard(path, meta, [c.id for c in clips], self.features[:n], [c.labels for c in clips],
                               folds=[c.fold for c in clips], durations=self.seconds, mean=self.mean[:n],
                               timing=timing)
        elif path.exists():
            path.unlink()  # left by an earlier run of a different dataset version; the record says empty
        errors = [(self.clips[k].id, str(self.clips[k].path), r) for k, r in sorted(self.errors.items())]
        result = ShardResult(self.index, str(path) if n else None, len(self.clips), n, errors,
                             time.perf_counter() - self.t0)
        write_record(shard_dir, self.index, asdict(result))
        if stalls is not None:
            checksum = timing.get("checksum", 0.0)
            with _STALLS_LOCK:  # several writer threads add to the same account
                stalls.checksum += checksum
                stalls.write += time.perf_counter() - t0 - checksum
        return result


@torch.inference_mode()
def encode_batch(encoder: Encoder, audio: torch.Tensor, options: ExtractOptions, lengths: list[int] | None = None):
    """audio [B, S] on the device -> (features f16 [B, L, T, D], time mean f16 [B, L, D], finite [B]),
    still on the device. `encoder.pooled` computes its input per clip (Whisper: the log-mel) and runs
    the encoder (under fp16 autocast on CUDA). The mean is taken here in fp32 (not by the host from
    the f16 rows). `options.policy` is the run's, resolved (`cache_meta`). `lengths`: encode only
    each clip's first lengths[i] samples (its real audio), not the zero-padded window."""
    clips = audio if lengths is None else [a[:n] for a, n in zip(audio, lengths)]
    feats = encoder.pooled(clips, frames=options.frames, policy=options.policy,
                           layers=_layers(options, encoder.n_layers))
    mean = feats.mean(2).to(torch.float16)
    feats = feats.to(torch.float16)  # the stored type: a value that overflows f16 is non-finite too
    return feats, mean, torch.isfinite(feats).flatten(1).all(1)


def _real_lengths(batch: dict, encoder: Encoder, policy: str, frames: int) -> dict:
    """`batch` with "lengths", each clip's real samples (the rest of its window is zero padding), for
    an encoder that takes clips as they are. A clip shorter than the encoder's `min_samples`, or with
    fewer native frames than the `frames` it is pooled to (pooling would repeat frames: `cache_meta`
    checks only the nominal clip length), becomes that clip's error instead of a row."""
    need = encoder.min_samples(policy)
    lengths = [round(s * SAMPLE_RATE) for s in batch["seconds"]]
    errors, keep = list(batch["errors"]), []
    for j, n in enumerate(lengths):
        if n < need:
            reason = f"{n} samples of audio, fewer than the {need} the {encoder.family} encoder {encoder.name!r} needs"
        elif (have := encoder.native_frames(n, policy)) < frames:
            reason = (f"{n} samples of audio give {have} encoder frames, fewer than --frames {frames} "
                      "(pooling would repeat frames)")
        else:
            keep.append(j)
            continue
        errors.append((int(batch["index"][j]), reason))
    if len(keep) == len(lengths):
        return {**batch, "lengths": lengths}
    return {"index": batch["index"][keep], "audio": batch["audio"][keep], "seconds": [batch["seconds"][j] for j in keep],
            "errors": errors, "lengths": [lengths[j] for j in keep]}


# Batches queued on the device before the oldest one is collected: the host copies batch k while the
# device computes k+1 and k+2, so a slow copy or a late decoded batch does not leave the device idle.
_IN_FLIGHT = 2


def staging_pools(meta: wcache.CacheMeta, batch_size: int) -> list[HostPool]:
    """Pinned host buffers for a batch's device -> host copies (features, mean, finite): pinning
    is a costly system call, so a run pins `_IN_FLIGHT` + 1 batches once (the pending ones and the
    one being queued) and reuses them. Allocated only when an encoder's output is on a CUDA
    device (nothing is pinned without CUDA: `HostPool.pinned`)."""
    shapes = ((meta.n_layers, meta.n_frames, meta.dim), np.float16), ((meta.n_layers, meta.dim), np.float16), ((), bool)
    return [HostPool((batch_size, *shape), dtype, _IN_FLIGHT + 1, pinned=True) for shape, dtype in shapes]


class _InFlight:
    """One batch whose features are being computed / copied to the host. On CUDA the copy goes into
    pinned memory (`staging`, kept until `settle`) behind an event, so later batches are queued on
    the GPU before we wait for this one."""

    def __init__(self, buf, start: int, batch, encoder: Encoder, options: ExtractOptions, staging: list[HostPool],
                 stalls: Stalls):
        self.buf, self.start, self.batch, self.event = buf, start, batch, None
        self.host = None
        t0 = time.perf_counter()
        lengths = None
        if not encoder.pad_to_clip_length:
            self.batch = batch = _real_lengths(batch, encoder, options.policy, options.frames)
            lengths = batch["lengths"]
        if len(batch["index"]):
            out = encode_batch(encoder, batch["audio"].to(options.device, non_blocking=True), options, lengths)
            if out[0].is_cuda:
                self.host = [torch.from_numpy(p.take(len(t))) for p, t in zip(staging, out)]
                for h, t in zip(self.host, out):
                    h.copy_(t, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(out[0].device))  # cuda:N, not the current device
            else:
                self.host = out
        stalls.device += time.perf_counter() - t0

    def settle(self, stalls: Stalls) -> int:
        """Move the results into the shard buffer; returns the number of clips done."""
        t0 = time.perf_counter()
        if self.event is not None:
            self.event.synchronize()
        t1 = time.perf_counter()
        buf, start, batch = self.buf, self.start, self.batch
        for k, reason in batch["errors"]:
            buf.errors[k - start] = reason
        if self.host is not None:
            feats, mean, ok = (t.numpy() for t in self.host)
            ks = batch["index"].numpy() - start
            for j in np.flatnonzero(~ok):
                buf.errors[int(ks[j])] = "non-finite encoder output"
            if ok.all():
                buf.add(ks.tolist(), feats, mean, batch["seconds"])
            else:
                good = np.flatnonzero(ok)
                buf.add(ks[good].tolist(), feats[good], mean[good], [batch["seconds"][j] for j in good])
        n = len(batch["index"]) + len(batch["errors"])
        buf.done += n
        stalls.device += t1 - t0
        stalls.copies += time.perf_counter() - t1
        return n


def _timed(batches, stalls: Stalls):
    """The loader's batches, adding the time spent waiting for each to `stalls.audio`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        stalls.audio += time.perf_counter() - t0
        yield batch


def encode_shards(encoder: Encoder, shards: list[tuple[int, list[Clip]]], options: ExtractOptions, meta: wcache.CacheMeta,
                  n_samples: int, bar=None, stalls: Stalls | None = None,
                  pools: tuple[HostPool, HostPool] | None = None):
    """Yield a filled `_ShardBuffer` per shard, in order. Decoding runs ahead in the loader workers;
    batch k's results are collected after batches k+1..k+`_IN_FLIGHT` have been queued on the device.
    The main loop's waits are added to `stalls`; shard arrays come from `pools` (`shard_pools`) when given."""
    stalls = stalls if stalls is not None else Stalls()
    flat: list[Clip] = []
    batches, owner = [], []
    for i, clips in shards:
        start = len(flat)
        flat.extend(clips)
        for b in range(start, len(flat), options.batch_size):  # batches never straddle two shards
            batches.append(list(range(b, min(b + options.batch_size, len(flat)))))
            owner.append((i, start))
    by_index = dict(shards)
    buffers: dict[int, _ShardBuffer] = {}
    pending: deque[_InFlight] = deque()
    staging = staging_pools(meta, options.batch_size)

    def settle(job: _InFlight):
        n = job.settle(stalls)
        if bar is not None:
            bar.update(n)
        if job.buf.done == len(job.buf.clips):
            return buffers.pop(job.buf.index)

    for (i, start), batch in zip(owner, _timed(_loader(flat, batches, n_samples, options), stalls)):
        if i not in buffers:  # allocated lazily: a shard's buffer exists from its first batch to its last
            buffers[i] = _ShardBuffer(i, by_index[i], meta, pools)
        pending.append(_InFlight(buffers[i], start, batch, encoder, options, staging, stalls))
        if len(pending) > _IN_FLIGHT and (full := settle(pending.popleft())) is not None:
            yield full
    while pending:
        if (full := settle(pending.popleft())) is not None:
            yield full


WRITER_THREADS = 2  # shards written at once: one thread's fsync waits for the disk while another writes


class _Writer:
    """Writes finished shard buffers on `threads` threads: while one waits for its fsync (the disk),
    another checksums and writes the next shard. At most `pending` buffers are handed over and not yet
    written (writing or waiting), which with the one being filled caps host memory at ~3 shards."""

    def __init__(self, shard_dir, meta, pending: int = 2, stalls: Stalls | None = None,
                 threads: int = WRITER_THREADS):
        self.shard_dir, self.meta = shard_dir, meta
        self.stalls = stalls if stalls is not None else Stalls()
        self.queue: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(pending)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name=f"wat-shard-writer-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self):
        while (buf := self.queue.get()) is not None:
            if self.error is None:
                try:
                    buf.write(self.shard_dir, self.meta, self.stalls)  # its record on disk is what finish() reads
                except BaseException as e:  # surfaced in the main thread
                    self.error = e
            del buf  # the last reference: its arrays go back to their pools (`shard_pools`)
            self.slots.release()

    def put(self, buf):
        self._raise()
        t0 = time.perf_counter()
        self.slots.acquire()
        self.stalls.writer += time.perf_counter() - t0
        self.queue.put(buf)

    def close(self):
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise ExtractError(f"writing a shard failed: {self.error}") from self.error


# ---------------------------------------------------------------- entry points

def extract_shard(encoder, clips: list[Clip], options: ExtractOptions, path, meta: wcache.CacheMeta,
                  n_samples: int | None = None) -> ShardResult:
    """Encode one shard's clips with `encoder` (an `Encoder` or a loaded Whisper) and write shard
    `path` (`.../shard-NNNNN.h5`) plus its record.

    The unit of work for the dask driver; `path` fixes the shard folder and the shard number.
    `options.policy` None means `meta.policy`."""
    path = Path(path)
    index = int(path.stem.split("-")[-1])
    if not clips:
        raise ExtractError(f"{path}: a shard needs at least one clip")
    n_samples = n_samples or round(meta.clip_seconds * SAMPLE_RATE)
    options = replace(options, policy=meta.policy)
    buf = next(encode_shards(as_encoder(encoder), [(index, clips)], options, meta, n_samples))
    return buf.write(path.parent, meta)


_MODELS: dict = {}
_MODEL_LOCK = threading.Lock()


def get_model(spec: str, device: str) -> Encoder:
    """The encoder `spec` names (`load_encoder`), loaded once per process (the last one used stays loaded)."""
    key = (spec, device)
    with _MODEL_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = load_encoder(spec, device=device)
        return _MODELS[key]


def extract_dataset(dataset: Dataset, options: ExtractOptions, out_index, *, model=None,
                    runner: ShardRunner | None = None) -> Summary:
    """Extract `dataset` into shards beside `out_index` and build the index. Resumes by default.

    `model`: an already loaded `Encoder` or Whisper (else `options.model` is loaded once, by
    `load_encoder`); `options.policy` None = the encoder's default policy. `runner`: runs the
    shards elsewhere instead (`wat.extract.cluster.DaskRunner(client)`); its workers load
    `options.model`, so passing a `model` too is a RunnerConflict. The run holds a lock on the
    shard folder: a second run on the same output is refused before any model is loaded."""
    t0 = time.perf_counter()
    if model is not None and runner is not None:
        raise RunnerConflict("extract_dataset got both a loaded model and a runner: the runner's workers load "
                             f"options.model ({options.model!r}) themselves; pass one or the other")
    options.check()
    clip_seconds = resolve_clip_seconds(dataset, options)
    run = ShardRun(out_index)
    try:  # a run refused before it wrote anything (e.g. a model that does not load) leaves no folder
        with run.locked(f"the feature cache {out_index}"):
            return _extract(dataset, options, run, clip_seconds, model, runner, t0)
    except (LockedError, ShardRunError) as e:
        raise ExtractError(str(e)) from None


def _extract(dataset, options, run: ShardRun, clip_seconds, model, runner, t0) -> Summary:
    clips = dataset.clips[: options.limit] if options.limit is not None else list(dataset.clips)
    shards = plan_shards(clips, options.shard_size)
    if runner is not None:
        meta = runner.cache_meta(dataset, options, clip_seconds)
    else:
        if model is None:  # a policy the family does not take: refused before its weights load
            try:
                encoder_class(family_of(options.model)).check_policy(options.policy, options.model)
            except ValueError as e:
                raise ExtractError(str(e)) from None
        model = as_encoder(model) if model is not None else get_model(options.model, options.device)
        meta = cache_meta(model, dataset, options, clip_seconds)
    options = replace(options, policy=meta.policy)  # None (the encoder's default) resolved
    shard_dir = run.prepare(run_manifest(dataset, clips, meta, options), options.overwrite)

    damaged = run.drop_damaged(len(shards), meta, options.progress)
    todo = [(i, c) for i, c in enumerate(shards) if run.finished(i) is None]
    n_todo = sum(len(c) for _, c in todo)
    stalls = None
    if runner is not None:
        runner.run_shards(todo, options, shard_dir, meta)
    elif todo:
        n_samples = round(clip_seconds * SAMPLE_RATE)
        stalls, pools = Stalls(), shard_pools(meta, options.shard_size)
        writer = _Writer(shard_dir, meta, stalls=stalls)
        with progress_bar(total=n_todo, unit="clip", desc="extract", disable=None if options.progress is None
                  else not options.progress, smoothing=0.1) as bar:
            try:
                for buf in encode_shards(model, todo, options, meta, n_samples, bar, stalls, pools):
                    writer.put(buf)
                    del buf  # with the writer only: its thread returns the arrays to `pools`
            finally:
                writer.close()
    summary = finish(run, len(shards), len(shards) - len(todo), n_todo, clips, dataset, t0)
    summary.damaged = damaged
    summary.stalls = stalls
    return summary


def finish(run: ShardRun, n_shards: int, resumed: int, processed: int, clips, dataset, t0) -> Summary:
    """Merge the shard records into errors.tsv and build the index over the non-empty shards."""
    out_index, shard_dir = run.index, run.dir
    records = run.records(n_shards)
    errors = sorted((tuple(e) for r in records for e in r["errors"]), key=lambda e: e[0])
    write_tsv(shard_dir / ERRORS, ["id", "path", "reason"], errors)
    # dataset rows that never became clips (no audio file, bad label...)
    write_tsv(shard_dir / PROBLEMS, ["row", "reason"], dataset.problems)
    written = run.written(records)
    if not written:
        raise ExtractError(f"no clip could be extracted (all {len(clips)} failed; see {shard_dir / ERRORS})")
    run.build_index(written)
    size = Path(out_index).stat().st_size + sum(p.stat().st_size for p in written)
    return Summary(index=str(out_index), shard_dir=str(shard_dir), n_clips=len(clips),
                   written=sum(r["n_written"] for r in records), processed=processed, resumed_shards=resumed,
                   shards=n_shards, errors=[tuple(e) for e in errors], problems=len(dataset.problems),
                   wall_s=time.perf_counter() - t0, bytes=size)
