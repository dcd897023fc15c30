"""The noise-robustness experiment (Whisper-AT paper, section 3): mix, transcribe + encode once,
score, probe. Everything it writes lives under one output folder:

    OUT/
      MODEL/feats.h5            standard wat cache of the mixtures (labels = noise class, folds = the
                                noise clip's fold, optional columns `snr` and `utterance`); wat-probe
                                reads it unchanged
      MODEL/feats_snr+20.h5     the same shards indexed per SNR (one index per SNR)
      MODEL/feats.shards/       shard-NNNNN.h5 + shard-NNNNN.json: the chunk's transcripts and failures
      MODEL/noise.h5            the noise clips alone (wat-extract), for the last-layer class-wise probe
      wer.csv, wer_vs_snr.png, classwise.png, layers.png, summary.json, problems.tsv, and
      report.html               all of the above on one self-contained page (report.py)

Work is cut into chunks of mixtures that never straddle two SNRs; a chunk is finished when its
record (written atomically after its shard) exists, so a rerun after a crash or kill -9 redoes
only the unfinished chunks. A row that cannot be used (missing transcript, unreadable or empty
audio, silent noise) is recorded in problems.tsv with its reason and skipped.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from wat.data.clikit.progress import progress

from wat.data import cache as wcache
from wat.data.audio import SAMPLE_RATE, AudioError, load_audio
from wat.data.datasets import Dataset, load_dataset
from wat.extract.encoders import Encoder, as_encoder, load_encoder
from wat.data.files import LockedError, locked_folder, write_tsv
from wat.data.naming import distinct_name, folder_name
from wat.data.cache.shardrun import ShardRun, ShardRunError, write_record
from wat.extract.pipeline import ExtractOptions, cache_meta, extract_dataset

from . import wer as wer_mod
from .asr import MAX_SAMPLES, AsrOptions, decode_batch, decode_ctc, transcribe_long
from .mix import MixError, assign_noise, mix
from .speech import Speech, Utterance, load_speech
from wat.data.errors import WatError

COLUMNS = ("snr", "utterance")
LOCK = ".wat-robust.lock"  # in --out: held (an OS lock) by the run writing it; a killed run's file is harmless


class RobustError(WatError):
    """The experiment cannot run as asked (bad options, unusable inputs, a changed output folder)."""


@dataclass
class RobustOptions:
    models: tuple[str, ...] = ("tiny.en",)  # Whisper models, CTC fine-tuned HF checkpoints (load_encoder); one run each
    snrs: tuple[float, ...] = (20.0, 10.0, 5.0, 0.0, -5.0, -10.0)  # dB; the paper's grid
    noise_per_utterance: int = 1      # noise clips (of different classes) mixed with each utterance
    seed: int = 0                     # noise assignment
    device: str = "cpu"
    batch_size: int = 16              # utterances per whisper.decode call
    chunk_size: int = 64              # mixtures per shard + record: the unit a rerun resumes from
    limit: int | None = None          # only the first N utterances (sorted by id)
    language: str | None = "en"       # None: detected per utterance (multilingual models)
    noise_policy: str = "trim"        # noise-alone features: trim = the paper's research features
    jobs: int = 1                     # probe worker processes
    progress: bool | None = None      # None: as wat.data.clikit.progress is set (bar on a TTY, else log lines); False: none
    overwrite: bool = False
    encoding: str | None = None       # of transcripts, the speech CSV and the noise manifest (None: strict UTF-8)

    def check(self) -> None:
        if not self.models:
            raise RobustError("give at least one --model")
        twice = sorted({m for m in self.models if self.models.count(m) > 1})
        if twice:
            raise RobustError(f"--model {twice[0]} is given more than once")
        if len(set(self.snrs)) < 2 or not all(math.isfinite(s) and -60 <= s <= 100 for s in self.snrs):
            raise RobustError(f"--snr needs at least two distinct finite values in [-60, 100] dB, got {list(self.snrs)}")
        for name, low, high in (("noise_per_utterance", 1, 1000), ("batch_size", 1, 4096),
                                ("chunk_size", 1, 1_000_000), ("jobs", 1, 1024)):
            v = getattr(self, name)
            if not low <= v <= high:
                flag = "--workers" if name == "jobs" else f"--{name.replace('_', '-')}"  # the CLI's spelling
                raise RobustError(f"{flag} must be in {low}..{high}, got {v}")
        if self.limit is not None and self.limit < 1:
            raise RobustError(f"--limit must be >= 1, got {self.limit}")
        if self.seed < 0:
            raise RobustError(f"--seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Mixture:
    id: str
    utterance: int   # index into the utterance list
    noise: int       # index into the noise dataset's clips
    snr: float


@dataclass
class Plan:
    speech: Speech
    noise: Dataset
    mixtures: list[Mixture]
    chunks: list[list[Mixture]]          # SNR-major, never straddling two SNRs
    problems: list[tuple[str, str, str, str]] = field(default_factory=list)  # (model, id, path, reason)


def slug(name: str) -> str:
    """A folder name for a model spec ("tiny.en", "/models/large-v1.pt" -> "large-v1.pt")."""
    return folder_name(name)


def make_plan(speech_path, noise_kind: str, noise_root, noise_manifest, options: RobustOptions) -> Plan:
    """Utterances, noise clips and the deterministic mixture list (nothing decoded yet)."""
    speech = load_speech(speech_path, options.encoding)
    problems = [("", i, p, r) for i, p, r in speech.problems]
    usable = []
    for u in speech.utterances:  # a reference with no words after normalisation cannot be scored
        if wer_mod.normalize(u.text).split():
            usable.append(u)
        else:
            problems.append(("", u.id, u.path, "empty transcript after normalisation"))
    if options.limit is not None:
        usable = usable[: options.limit]
    if not usable:
        raise RobustError(f"no utterance with a scorable transcript in {speech_path}")
    speech = replace(speech, utterances=usable)
    noise = load_dataset(noise_kind, noise_root, noise_manifest, encoding=options.encoding)
    if noise.multilabel:
        raise RobustError(f"--noise-dataset {noise_kind}: needs single-label clips (one noise class per mixture); "
                          f"{noise.name} is multi-label")
    problems += [("", row, "", f"noise: {reason}") for row, reason in noise.problems]
    labels = [c.labels[0] for c in noise.clips]
    n_classes = len(set(labels))
    if options.noise_per_utterance > n_classes:  # each utterance gets clips of different classes
        raise RobustError(f"--noise-per-utterance {options.noise_per_utterance}: the noise dataset has clips of only "
                          f"{n_classes} classes, and an utterance's noise clips are of different classes")
    assigned = assign_noise(len(usable), labels, len(noise.vocab), per_utterance=options.noise_per_utterance,
                            seed=options.seed)
    mixtures, chunks = [], []
    for snr in sorted(set(options.snrs), reverse=True):
        block = [Mixture(f"{usable[a.utterance].id}+{noise.clips[a.noise].id}@{snr:+g}dB", a.utterance, a.noise,
                         float(snr)) for a in assigned]
        mixtures += block
        chunks += [block[i:i + options.chunk_size] for i in range(0, len(block), options.chunk_size)]
    return Plan(speech, noise, mixtures, chunks, problems)


def _manifest(plan: Plan, meta: wcache.CacheMeta, options: RobustOptions) -> dict:
    """What a rerun must agree on to keep the chunks already written."""
    import hashlib

    h = hashlib.sha256()
    for m in plan.mixtures:
        h.update(f"{m.id}\0{plan.speech.utterances[m.utterance].path}\0{plan.noise.clips[m.noise].path}\0".encode())
    return {"model": meta.model, "fingerprint": meta.fingerprint, "policy": meta.policy,
            "pad30_padding": meta.pad30_padding, "pooling": meta.pooling,
            "chunk_size": options.chunk_size, "language": options.language, "n_mixtures": len(plan.mixtures),
            "mixtures_sha256": h.hexdigest()[:16], "kind": "wat-robust"}


def recognizer(encoder: Encoder, spec: str) -> str:
    """How `encoder` transcribes: "whisper" (its decoder) or "ctc" (a `*ForCTC` head and its tokenizer);
    RobustError for an encoder without a speech recognizer."""
    if encoder.family == "whisper":
        return "whisper"
    ctc = getattr(encoder, "ctc", None)
    if ctc is None:
        raise RobustError(f"--model {spec}: the {encoder.family} encoder {encoder.name!r} has no speech recognizer; "
                          "wat-robust transcribes with Whisper models and CTC fine-tuned (*ForCTC) checkpoints")
    if ctc.tokenizer is None:
        raise RobustError(f"--model {spec}: cannot decode its CTC output: {ctc.problem}")
    return "ctc"


def _meta(encoder: Encoder, plan: Plan, options: RobustOptions) -> wcache.CacheMeta:
    """Whisper: transcribe's pad30 window; CTC models: the mixture as it is (trim). `clip_seconds` is
    Whisper's window either way: a CTC model decodes and pools a longer utterance whole."""
    ds = replace(plan.noise, name=f"robust:{plan.speech.name}+{plan.noise.name}")
    policy = "pad30" if encoder.family == "whisper" else "trim"
    meta = cache_meta(encoder, ds, ExtractOptions(policy=policy), MAX_SAMPLES / SAMPLE_RATE)
    return replace(meta, columns=COLUMNS)


class _Audio:
    """Decoded speech and noise, kept while they are reused (an utterance recurs at every SNR)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.speech = lru_cache(maxsize=256)(lambda i: load_audio(plan.speech.utterances[i].path))
        self.noise = lru_cache(maxsize=256)(lambda j: load_audio(plan.noise.clips[j].path,
                                                                 offset=plan.noise.clips[j].offset,
                                                                 duration=plan.noise.clips[j].duration))

    def mixture(self, m: Mixture) -> np.ndarray:
        return mix(self.speech(m.utterance), self.noise(m.noise), m.snr)


def _reason(e: Exception) -> str:
    return " ".join(str(getattr(e, "reason", None) or e or type(e).__name__).split())


def run_chunk(model, plan: Plan, index: int, chunk: list[Mixture], shard_dir: Path, meta: wcache.CacheMeta,
              audio: _Audio, options: RobustOptions, bar=None) -> dict:
    """Mix, decode + encode (one pass), write the chunk's shard, then its record (the commit point).
    `model`: a Whisper model or an `Encoder` (Whisper, or CTC fine-tuned: `recognizer`)."""
    encoder = as_encoder(model)
    ctc = encoder.family != "whisper"
    model = None if ctc else encoder.model
    asr = AsrOptions(language=options.language, frames=meta.n_frames)
    ok, errors = [], []
    for m in chunk:
        utt = plan.speech.utterances[m.utterance]
        try:
            ok.append((m, audio.mixture(m)))
        except (AudioError, MixError) as e:
            errors.append((m.id, utt.path if not isinstance(e, AudioError) else e.path, _reason(e)))
            if bar is not None:
                bar.update()
    # (mixture, text, features [L, T, D] f32 numpy, seconds, encoder passes over this mixture:
    # 1 in a decode batch, one per 30 s window through transcribe)
    rows = []
    short = [(m, x) for m, x in ok if ctc or len(x) <= MAX_SAMPLES]
    for b in range(0, len(short), options.batch_size):
        batch = short[b:b + options.batch_size]
        if ctc:
            texts, feats = decode_ctc(encoder, [x for _, x in batch], meta.n_frames)
        else:
            texts, feats = decode_batch(model, [x for _, x in batch], asr)
        feats = feats.cpu().numpy()
        rows += [(m, t, f, len(x) / SAMPLE_RATE, 1) for (m, x), t, f in zip(batch, texts, feats)]
        if bar is not None:
            bar.update(len(batch))
    for m, x in ((m, x) for m, x in ok if not ctc and len(x) > MAX_SAMPLES):
        text, feats, passes = transcribe_long(model, x, asr)
        rows.append((m, text, feats.cpu().numpy()[0], MAX_SAMPLES / SAMPLE_RATE, passes))
        if bar is not None:
            bar.update()
    good = []
    for row in rows:
        if np.isfinite(row[2]).all() and np.isfinite(row[2].astype(np.float16)).all():
            good.append(row)
        else:
            errors.append((row[0].id, plan.speech.utterances[row[0].utterance].path, "non-finite encoder output"))
    path = wcache.shard_path(shard_dir, index)
    if good:
        feats = np.stack([r[2] for r in good])
        clips = [plan.noise.clips[r[0].noise] for r in good]
        wcache.write_shard(path, meta, [r[0].id for r in good], feats.astype(np.float16), [c.labels for c in clips],
                           folds=[c.fold for c in clips], durations=[min(r[3], MAX_SAMPLES / SAMPLE_RATE) for r in good],
                           mean=feats.mean(axis=2).astype(np.float16),
                           columns={"snr": [r[0].snr for r in good],
                                    "utterance": [plan.speech.utterances[r[0].utterance].id for r in good]})
    elif path.exists():
        path.unlink()
    record = {"index": index, "n_clips": len(chunk), "n_written": len(good), "errors": errors,
              "rows": [{"id": m.id, "utterance": plan.speech.utterances[m.utterance].id,
                        "noise": plan.noise.clips[m.noise].id, "noise_class": int(plan.noise.clips[m.noise].labels[0]),
                        "snr": m.snr, "text": text, "encoder_passes": passes}
                       for m, text, _, _, passes in good]}
    write_record(shard_dir, index, record)
    return record


def run_model(spec: str, plan: Plan, options: RobustOptions, out: Path, bar=None, model=None,
              audio: _Audio | None = None, taken: tuple = (), position: int = 1) -> dict:
    """One model: the mixture cache (resumed), its per-SNR indexes and the noise-alone cache.
    `model`: already loaded (a Whisper model or an Encoder); `audio`: the decoded speech and noise
    shared by every model of the run (the same mixtures for each). `taken`: the folders of the run's
    models before this one (at `position`, 1-based): a model whose folder name clashes with one of
    them gets `NAME~position` (`wat.data.naming.distinct_name`), never another model's folder."""
    encoder = as_encoder(model) if model is not None else load_encoder(spec, device=options.device)
    asr = recognizer(encoder, spec)
    try:
        noise_policy = encoder.policy_for(options.noise_policy)
    except ValueError as e:
        raise RobustError(f"--noise-policy: {e}") from None
    name = encoder.name
    mdir = out / distinct_name(slug(name), taken, position)
    index = mdir / "feats.h5"
    meta = _meta(encoder, plan, options)
    run = ShardRun(index, tool="wat-robust")
    try:  # the shard folder as wat-extract keeps it: one run at a time, damaged shards made again
        with run.locked(f"the mixture cache {index}"):
            records, written = _mixture_shards(run, encoder, plan, meta, audio or _Audio(plan), options, bar)
    except (LockedError, ShardRunError) as e:
        raise RobustError(str(e)) from None
    if not written:
        raise RobustError(f"{name}: no mixture could be transcribed (see {out / 'problems.tsv'})")
    per_snr = {}
    for snr in sorted({s for s, _ in written}, reverse=True):
        per_snr[snr] = mdir / f"feats_snr{snr:+g}.h5"
        wcache.build_index(per_snr[snr], [p for s, p in written if s == snr])
    noise_index = mdir / "noise.h5"
    extract_dataset(plan.noise, ExtractOptions(model=spec, policy=noise_policy, device=options.device,
                                               batch_size=options.batch_size, num_workers=0,
                                               progress=options.progress, overwrite=options.overwrite),
                    noise_index, model=encoder)
    return {"name": name, "dir": mdir, "index": index, "per_snr": per_snr, "noise_index": noise_index,
            "n_layers": encoder.n_layers, "records": records, "asr": asr}


def _mixture_shards(run: ShardRun, encoder, plan: Plan, meta: wcache.CacheMeta, audio: _Audio,
                    options: RobustOptions, bar=None) -> tuple[list[dict], list[tuple[float, Path]]]:
    """The mixture cache of one model, resumed: (every chunk's record, (snr, shard) of the chunks
    that hold rows); the index over them is built."""
    shard_dir = run.prepare(_manifest(plan, meta, options), options.overwrite)
    run.drop_damaged(len(plan.chunks), meta, options.progress)
    for i, chunk in enumerate(plan.chunks):
        if run.finished(i) is not None:  # kept from an earlier run
            if bar is not None:
                bar.update(len(chunk))
            continue
        run_chunk(encoder, plan, i, chunk, shard_dir, meta, audio, options, bar)
    records = run.records(len(plan.chunks))
    written = [(c[0].snr, wcache.shard_path(shard_dir, i)) for i, (c, r) in enumerate(zip(plan.chunks, records))
               if r["n_written"] > 0]
    if written:
        run.build_index([p for _, p in written])
    return records, written


def score(plan: Plan, runs: list[dict]) -> list[dict]:
    """wer.csv rows: per (model, snr, noise class) and per (model, snr) over all classes ("all")."""
    refs = {u.id: u.text for u in plan.speech.utterances}
    names = plan.noise.vocab.names
    out = []
    for run in runs:
        cells: dict = defaultdict(lambda: [0, wer_mod.Errors(0, 0)])
        for rec in run["records"]:
            for row in rec["rows"]:
                e = wer_mod.errors(refs[row["utterance"]], row["text"])
                for key in ((row["snr"], names[row["noise_class"]]), (row["snr"], "all")):
                    cells[key][0] += 1
                    cells[key][1] = cells[key][1] + e
        for (snr, cls), (n, e) in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][1] != "all", kv[0][1])):
            out.append({"model": run["name"], "snr": snr, "noise_class": cls, "utterances": n, "words": e.words,
                        "errors": e.errors, "wer": e.wer})
    return out


def run_robust(speech_path, noise_kind: str, noise_root, out, options: RobustOptions, *,
               noise_manifest=None, models: dict | None = None) -> dict:
    """The whole experiment; returns the summary (also written to OUT/summary.json). `models`: specs
    already loaded ({spec: model}), used instead of loading them."""
    from . import report

    options.check()
    out = Path(out)
    plan = make_plan(speech_path, noise_kind, noise_root, noise_manifest, options)
    try:  # after the inputs are checked; a second run on this --out is refused, and a run that fails
        # before any model wrote (e.g. a --model that does not load) leaves no empty --out behind
        with locked_folder(out, LOCK, f"the wat-robust output {out}"):
            return _run(plan, out, options, models, report)
    except LockedError as e:
        raise RobustError(str(e)) from None


def _run(plan: Plan, out: Path, options: RobustOptions, models: dict | None, report) -> dict:
    runs, problems = [], list(plan.problems)
    todo_total = len(plan.mixtures) * len(options.models)
    audio = _Audio(plan)   # one mixture set: every model hears the same mixtures
    with progress(total=todo_total, unit="mix", desc="wat-robust", disable=None if options.progress is None
                  else not options.progress, smoothing=0.1) as bar:
        for k, spec in enumerate(options.models, 1):
            run = run_model(spec, plan, options, out, bar, model=(models or {}).get(spec), audio=audio,
                            taken=tuple(r["dir"].name for r in runs), position=k)
            runs.append(run)
            problems += [(run["name"], *e) for r in run["records"] for e in r["errors"]]
    write_tsv(out / "problems.tsv", ("model", "id", "path", "reason"), problems)
    rows = score(plan, runs)
    return report.write_report(out, plan, runs, rows, problems, options)


__all__ = ["RobustOptions", "RobustError", "Mixture", "Plan", "make_plan", "run_robust", "run_chunk", "score",
           "Utterance"]
