"""The trainer behind `wat-train`: heads on a feature cache, at the speed of the head itself.

Data path: the cache is opened once; `FeatureStore` holds the field in one tensor (on the device
when it fits) and batches are tensor indexing, or it streams shard-ordered blocks through a
shuffle buffer. Targets live in one tensor indexed by the same indices. No per-step file opens,
no per-sample Python.

Protocols: one split (train cache, optional eval cache), or `folds=K` (ESC-50: K heads trained in
lockstep, each on K-1 folds and scored on the held-out one; one epoch is chosen by the
fold-averaged score, never per fold). Every random draw comes from one seeded torch.Generator
whose state is checkpointed with everything else in `last.pt`, so `resume` reproduces an
uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wat.data.cache import Cache, CacheError, open_cache
from wat.data.labels import Vocabulary, parent_labels
from wat.data.readers import FeatureStore
from wat.eval.metrics import json_safe
from wat.eval.report import pyplot, save_figure, write_json

from . import augment
from .heads import HeadInfo, build_head, load_head, n_parameters, save_head


class TrainError(ValueError):
    """Input the trainer cannot use (labels, vocabularies, folds, options)."""


class Interrupted(Exception):
    """Raised by `train` when `max_epochs_this_run` stops a run early (last.pt is written)."""


@dataclass
class TrainOptions:
    features: str
    out: str
    head: str = "tl-tr"
    eval_features: str | None = None
    folds: int = 0                      # >0: cross-validation over the cache's folds
    dim: int | None = None              # TL-Tr / WA-Tr projection width (None = encoder width)
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 48
    mixup: float = 0.5                  # probability per clip; lambda ~ Beta(10, 10)
    time_mask: int = 10                 # up to this many frames, same on all layers (not for MLP heads)
    feature_mask: int | None = None     # up to this many feature dims; None = 0, or dim//10 with CR views
    label_smoothing: float = 0.1
    balanced: bool = False
    cr_views: int = 1
    cr_weight: float = 1.0
    unlabeled_features: str | None = None
    cr_unlabeled_weight: float = 1.0
    unlabeled_ratio: int = 4            # unlabeled clips per labeled clip in each step
    parent_labels: bool = False
    weight_average: tuple[int, int] | None = None  # 1-based inclusive epochs; None = second half
    init: str | None = None             # start from a head checkpoint (ours or official Whisper-AT)
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    memory_budget: int | None = None    # bytes for the in-memory store; None = half of free memory
    max_epochs_this_run: int | None = None  # stop (Interrupted) after this many epochs: tests, time limits
    progress: bool | None = None        # tqdm bars; None = only on a terminal


def milestones(epochs: int) -> list[int]:
    """MultiStepLR milestones: official recipe (from epoch 15 every 5, x0.75) for runs of 30+
    epochs; shorter runs scale both to the run (start at half, step a sixth), so decay still happens."""
    start, step = (15, 5) if epochs >= 30 else (max(1, round(epochs / 2)), max(1, round(epochs / 6)))
    return list(range(start, epochs, step))


def wa_range(opts: TrainOptions) -> tuple[int, int]:
    a, b = opts.weight_average or (opts.epochs // 2 + 1, opts.epochs)
    if not 1 <= a <= b <= opts.epochs:
        raise TrainError(f"--weight-average {a}:{b} must lie within epochs 1..{opts.epochs}")
    return a, b


# ---------------------------------------------------------------- data

@dataclass
class Data:
    cache: Cache
    store: FeatureStore
    targets: torch.Tensor      # [N, C] float (multi-label) on the device
    classes: torch.Tensor      # [N] long class index (single-label; -1 when multi-label)
    vocab: Vocabulary          # training vocabulary (extended with --parent-labels)


def _field(kind: str) -> str:
    # MLP heads only see the time mean: train them from the cache's `mean` field (T x smaller)
    return "mean" if kind in ("last-mlp", "wa-mlp") else "features"


def _check_labels(cache: Cache, what: str) -> np.ndarray:
    y = cache.label_matrix()
    n = y.sum(1)
    if not n.any():
        raise TrainError(f"{what} {cache.path} has no labels (a cache of unlabeled clips can only "
                         "be used with --unlabeled-features)")
    if not cache.meta.multilabel and (n != 1).any():
        raise TrainError(f"{what} {cache.path} is single-label but {int((n != 1).sum())} clips "
                         "do not have exactly one label")
    return y


def _open(path, what: str) -> Cache:
    try:
        return open_cache(path)
    except (CacheError, OSError) as e:
        raise TrainError(f"{what}: {e}") from None


def _load_data(cache: Cache, y: np.ndarray, ext: tuple[Vocabulary, np.ndarray] | None,
               field: str, opts: TrainOptions, device) -> Data:
    vocab = cache.meta.vocab
    if ext is not None:  # parent labels: a clip also carries all ancestors of its classes
        vocab, a = ext
        y = (y.astype(np.float32) @ a) > 0
    store = FeatureStore(cache, field, memory_budget=opts.memory_budget, device=device)
    classes = torch.from_numpy(y.argmax(1) if not cache.meta.multilabel else np.full(len(y), -1)).to(device)
    return Data(cache, store, torch.from_numpy(y.astype(np.float32)).to(device), classes, vocab)


def _ancestor_matrix(vocab: Vocabulary) -> tuple[Vocabulary, np.ndarray]:
    ext, ancestors = parent_labels(vocab)
    a = np.zeros((len(vocab), len(ext)), np.float32)
    a[np.arange(len(vocab)), np.arange(len(vocab))] = 1
    for c, anc in enumerate(ancestors):
        a[c, list(anc)] = 1
    return ext, a


# ---------------------------------------------------------------- one training step

@dataclass
class StepConfig:
    multilabel: bool
    time_mask: int
    feature_mask: int
    mixup: float
    label_smoothing: float
    cr_views: int = 1
    cr_weight: float = 1.0
    cr_unlabeled_weight: float = 1.0


def _amp(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _views(x: torch.Tensor, k: int, cfg: StepConfig, gen: torch.Generator) -> torch.Tensor:
    """K independently masked copies of x, concatenated on the batch axis (one forward pass)."""
    out = []
    for _ in range(k):
        v = augment.time_mask(x, cfg.time_mask, gen) if x.dim() == 4 else x
        out.append(augment.feature_mask(v, cfg.feature_mask, gen))
    return torch.cat(out) if k > 1 else out[0]


def supervised_loss(logits, targets, multilabel: bool):
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    return F.cross_entropy(logits.float(), targets)


def train_step(head, opt, x, targets, cfg: StepConfig, gen: torch.Generator, *, scaler=None,
               autocast=None, unlabeled: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step on a batch: smoothing, mixup (shared by the views), K masked views,
    supervised loss averaged over views + CR on the labeled and the unlabeled views.
    Returns the (detached) loss without a host sync."""
    y = augment.smooth_targets(targets, cfg.label_smoothing, cfg.multilabel)
    if cfg.mixup > 0:
        x, y, _, _ = augment.mixup(x, y, cfg.mixup, gen)
    k = max(1, cfg.cr_views)
    xv = _views(x, k, cfg, gen)
    n = x.shape[0]
    if unlabeled is not None:  # no mixup on the unlabeled part; its views differ by their masks
        xv = torch.cat([xv, _views(unlabeled, max(2, k), cfg, gen)])
    with autocast or contextlib.nullcontext():
        logits = head(xv).float()
    lab = logits[: n * k]
    loss = supervised_loss(lab, y.repeat(k, 1), cfg.multilabel)
    if k > 1:
        loss = loss + cfg.cr_weight * augment.consistency_loss(list(lab.split(n)), cfg.multilabel)
    if unlabeled is not None:
        views_u = list(logits[n * k:].split(unlabeled.shape[0]))
        loss = loss + cfg.cr_unlabeled_weight * augment.consistency_loss(views_u, cfg.multilabel)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach()


def make_optimizer(head, lr: float) -> torch.optim.Adam:
    fused = next(head.parameters()).is_cuda  # one kernel for all parameters: small heads are launch-bound
    return torch.optim.Adam(head.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=5e-7, fused=fused or None)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(head, store: FeatureStore, indices: np.ndarray, multilabel: bool, batch_size: int = 256,
            autocast=None) -> np.ndarray:
    """Probabilities [len(indices), C] (sigmoid or softmax), rows in the order of `indices`."""
    head.eval()
    indices = np.asarray(indices)
    row = np.empty(int(indices.max()) + 1, np.int64)  # eval indices are unique: invert once
    row[indices] = np.arange(len(indices))
    out = None
    try:
        for idx, x in store.iter_batches(indices, batch_size, shuffle=False):
            with autocast or contextlib.nullcontext():
                z = head(x).float()
            p = (torch.sigmoid(z) if multilabel else torch.softmax(z, -1)).cpu().numpy()
            if out is None:
                out = np.empty((len(indices), p.shape[1]), np.float32)
            out[row[idx]] = p
    finally:
        head.train()
    return out


def score(targets: np.ndarray, probs: np.ndarray, multilabel: bool) -> dict:
    """Headline score + per-class values (AP or F1) via the one metrics module."""
    from wat.eval import metrics
    if multilabel:
        s = metrics.multilabel_scores(targets, probs)
        return {"metric": "mAP", "score": s.mAP, "mAUC": s.mAUC, "d_prime": s.d_prime,
                "per_class": s.per_class, "skipped_classes": s.skipped_classes}
    s = metrics.singlelabel_scores(targets.argmax(1), probs)
    return {"metric": "accuracy", "score": s.accuracy, "per_class": s.per_class_f1}


# ---------------------------------------------------------------- one head being trained

class Fit:
    """A head with its optimiser, schedule, weight-average accumulator and best-so-far record."""

    def __init__(self, name: str, head, opts: TrainOptions, train_idx, eval_idx, device):
        self.name, self.head = name, head.to(device)
        self.train_idx = np.asarray(train_idx)
        self.eval_idx = None if eval_idx is None else np.asarray(eval_idx)
        self.opt = make_optimizer(self.head, opts.lr)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones(opts.epochs), gamma=0.75)
        self.wa_sum: dict | None = None
        self.wa_n = 0
        self.best_probs: np.ndarray | None = None

    def accumulate(self):
        sd = self.head.state_dict()
        if self.wa_sum is None:
            self.wa_sum = {k: v.detach().double().clone() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                self.wa_sum[k] += v.double()
        self.wa_n += 1

    def averaged(self) -> dict:
        ref = self.head.state_dict()
        return {k: (v / self.wa_n).to(ref[k].dtype) for k, v in self.wa_sum.items()}

    def state(self) -> dict:
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "wa_sum": self.wa_sum, "wa_n": self.wa_n, "best_probs":
                None if self.best_probs is None else torch.from_numpy(self.best_probs)}

    def restore(self, s: dict):
        self.head.load_state_dict(s["head"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        dev = next(self.head.parameters()).device
        self.wa_sum = None if s["wa_sum"] is None else {k: v.to(dev) for k, v in s["wa_sum"].items()}
        self.wa_n = s["wa_n"]
        self.best_probs = None if s["best_probs"] is None else s["best_probs"].cpu().numpy()


# ---------------------------------------------------------------- RNG state for resume

def _rng_state(gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *[float(v) for v in np_state[2:]]],
            "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(gen: torch.Generator, s: dict):
    gen.set_state(s["gen"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], np.uint32), int(n[2]), int(n[3]), n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the run

def _balanced_weights(y: np.ndarray) -> torch.Tensor:
    """Per clip: sum over its labels of 1000 / (class count + 0.01) (official Whisper-AT)."""
    w_class = 1000.0 / (y.sum(0) + 0.01)
    return torch.from_numpy((y * w_class).sum(1)).double()


def _epoch_order(fit: Fit, weights: torch.Tensor | None, gen: torch.Generator) -> np.ndarray:
    n = len(fit.train_idx)
    if weights is not None:  # WeightedRandomSampler(replacement=True), drawn from our generator
        pick = torch.multinomial(weights[torch.from_numpy(fit.train_idx)], n, replacement=True, generator=gen)
    else:
        pick = torch.randperm(n, generator=gen)
    return fit.train_idx[pick.numpy()]


def _batches(store: FeatureStore, order: np.ndarray, bs: int, gen: torch.Generator):
    if store.in_memory:  # order is already random: index the resident tensor
        for a in range(0, len(order), bs):
            b = order[a:a + bs]
            yield b, store.get(b)
    else:  # shard-ordered blocks + shuffle buffer, seeded from our generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        yield from store.iter_batches(order, bs, shuffle=True, seed=seed)


def _unlabeled_batches(store: FeatureStore, n: int, gen: torch.Generator):
    while True:
        if store.in_memory:
            yield store.get(torch.randint(0, len(store), (n,), generator=gen).numpy())
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            for _, x in store.iter_batches(np.arange(len(store)), n, shuffle=True, seed=seed):
                if len(x) == n:
                    yield x


def _info(opts: TrainOptions, cache: Cache, vocab: Vocabulary, primary: int | None) -> HeadInfo:
    m = cache.meta
    return HeadInfo(opts.head, m.n_layers, m.dim, len(vocab), opts.dim, m.n_frames, vocab.to_json(),
                    m.model, m.fingerprint, m.policy, m.multilabel, primary)


def _build(opts: TrainOptions, cache: Cache, n_classes: int, device):
    m = cache.meta
    head = build_head(opts.head, m.n_layers, m.dim, n_classes, opts.dim)
    if opts.init:
        src, info = load_head(opts.init, n_layers=m.n_layers)
        if (info.kind, info.dim_in, info.dim) != (opts.head, m.dim, opts.dim):
            raise TrainError(f"--init {opts.init} is a {info.kind} head (width {info.dim_in}, dim {info.dim}); "
                             f"this run trains {opts.head} (width {m.dim}, dim {opts.dim})")
        state = src.state_dict()
        if info.n_classes != n_classes:  # transfer: keep everything but the classifier
            state = {k: v for k, v in state.items() if not k.startswith("mlp_layer.1.")}
        head.load_state_dict(state, strict=False)
    return head


@dataclass
class Setup:
    """Everything `train` needs, opened and checked before any training starts."""

    cache: Cache
    data: Data                     # training store and targets
    y: np.ndarray                  # [N, C] bool labels of the training cache (original vocabulary)
    ev: Data | None                # where held-out clips are scored (the training data for folds)
    ev_y: np.ndarray | None
    splits: list                   # (name, train indices, eval indices or None)
    unlabeled: FeatureStore | None
    cfg: StepConfig
    info: HeadInfo


def _compatible(meta, other: Cache, flag: str, path: str, ignore=()) -> None:
    bad = [b for b in meta.incompatibilities(other.meta) if not b.startswith(ignore)]
    if bad:
        raise TrainError(f"{flag} {other.path} does not match {path}: {'; '.join(bad)}")


def prepare(opts: TrainOptions, device) -> Setup:
    """Open and check every input, then load the stores (checks first: loading can take minutes)."""
    if opts.cr_views < 1 or opts.epochs < 1 or opts.batch_size < 1:
        raise TrainError("--epochs, --batch-size and --cr-views must be >= 1")
    if opts.folds and opts.eval_features:
        raise TrainError("use either --eval-features or --folds, not both")
    wa_range(opts)
    cache = _open(opts.features, "--features")
    meta = cache.meta
    y = _check_labels(cache, "--features")
    if opts.parent_labels and not meta.multilabel:
        raise TrainError("--parent-labels needs a multi-label cache")
    field = _field(opts.head)

    ecache = ucache = ev_y = None
    if opts.folds:
        folds = np.unique(cache.folds)
        if (folds < 0).any() or len(folds) != opts.folds:
            raise TrainError(f"--folds {opts.folds}: the cache's clips have folds {folds.tolist()}")
        splits = [(f"fold{f}", np.flatnonzero(cache.folds != f), np.flatnonzero(cache.folds == f)) for f in folds]
    elif opts.eval_features:
        ecache = _open(opts.eval_features, "--eval-features")
        if ecache.meta.vocab != meta.vocab:
            raise TrainError(f"vocabulary mismatch: {opts.features} has {len(meta.vocab)} classes, "
                             f"{opts.eval_features} has {len(ecache.meta.vocab)}"
                             + (" (different classes)" if len(ecache.meta.vocab) == len(meta.vocab) else ""))
        _compatible(meta, ecache, "--eval-features", opts.features)
        ev_y = _check_labels(ecache, "--eval-features")
        splits = [("main", np.arange(len(cache)), np.arange(len(ecache)))]
    else:
        splits = [("main", np.arange(len(cache)), None)]
    if opts.unlabeled_features:
        ucache = _open(opts.unlabeled_features, "--unlabeled-features")
        _compatible(meta, ucache, "--unlabeled-features", opts.features, ignore=("vocab", "multilabel"))
        if len(ucache) < opts.unlabeled_ratio * opts.batch_size:
            raise TrainError(f"--unlabeled-features has {len(ucache)} clips, fewer than one step's "
                             f"{opts.unlabeled_ratio} x {opts.batch_size}")

    cr = opts.cr_views > 1 or ucache is not None
    fmask = opts.feature_mask if opts.feature_mask is not None else (meta.dim // 10 if cr else 0)
    tmask = opts.time_mask if field == "features" else 0  # MLP heads see time means: nothing to mask
    if cr and fmask == 0 and tmask == 0:
        raise TrainError("consistency regularisation needs views that differ: set --time-mask or --feature-mask")
    cfg = StepConfig(meta.multilabel, tmask, fmask, opts.mixup, opts.label_smoothing, opts.cr_views,
                     opts.cr_weight, opts.cr_unlabeled_weight)

    ext = _ancestor_matrix(meta.vocab) if opts.parent_labels else None
    data = _load_data(cache, y, ext, field, opts, device)
    ev = None
    if opts.folds:  # held-out folds are scored from the training store
        ev, ev_y = data, y
    elif ecache is not None:
        ev = _load_data(ecache, ev_y, ext, field, opts, device)
    unl = FeatureStore(ucache, field, memory_budget=opts.memory_budget, device=device) if ucache else None
    info = _info(opts, cache, data.vocab, len(meta.vocab) if ext is not None else None)
    return Setup(cache, data, y, ev, ev_y, splits, unl, cfg, info)


def _train_epoch(fit: Fit, s: Setup, opts: TrainOptions, weights, gen, scaler, autocast, title: str) -> float:
    data, n_classes = s.data, s.info.n_classes
    order = _epoch_order(fit, weights, gen)
    ubatches = _unlabeled_batches(s.unlabeled, opts.unlabeled_ratio * opts.batch_size, gen) if s.unlabeled else None
    total, steps = torch.zeros((), device=data.targets.device), 0
    bar = tqdm(_batches(data.store, order, opts.batch_size, gen), total=math.ceil(len(order) / opts.batch_size),
               desc=title, leave=False, disable=None if opts.progress is None else not opts.progress)
    for idx, x in bar:
        it = torch.from_numpy(idx).to(data.targets.device)
        tgt = data.targets[it] if s.cfg.multilabel else F.one_hot(data.classes[it], n_classes).float()
        u = next(ubatches) if ubatches is not None else None
        total += train_step(fit.head, fit.opt, x, tgt, s.cfg, gen, scaler=scaler, autocast=autocast, unlabeled=u)
        steps += 1
    fit.sched.step()
    return float(total) / max(steps, 1)  # one host sync per epoch


def train(opts: TrainOptions) -> dict:
    """Run the whole recipe; writes RUN_DIR outputs and returns the final metrics dict."""
    out = Path(opts.out)
    device = torch.device(opts.device)
    s = prepare(opts, device)
    out.mkdir(parents=True, exist_ok=True)
    a_wa, b_wa = wa_range(opts)
    n_primary = len(s.cache.meta.vocab)
    gen = _seed_all(opts.seed)
    fits = [Fit(name, _build(opts, s.cache, s.info.n_classes, device), opts, tr, te, device)
            for name, tr, te in s.splits]
    weights = _balanced_weights(s.y) if opts.balanced else None
    autocast, scaler = _amp(device)
    history: list[dict] = []
    best = {"epoch": 0, "score": None}
    start = 0

    last = out / "last.pt"
    if opts.resume and last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        if ck["options"] != _resume_key(opts):
            raise TrainError(f"--resume: {last} was written with different options")
        for f, state in zip(fits, ck["fits"]):
            f.restore(state)
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        _set_rng_state(gen, ck["rng"])
        history, best, start = ck["history"], ck["best"], ck["epoch"]

    for epoch in range(start, opts.epochs):
        if opts.max_epochs_this_run is not None and epoch - start >= opts.max_epochs_this_run:
            raise Interrupted(f"stopped after epoch {epoch} of {opts.epochs}; continue with --resume")
        rec = {"epoch": epoch + 1, "lr": fits[0].opt.param_groups[0]["lr"], "folds": {}}
        probs = {}
        for fit in fits:
            r = {"train_loss": _train_epoch(fit, s, opts, weights, gen, scaler, autocast,
                                            f"epoch {epoch + 1}/{opts.epochs} {fit.name}")}
            if a_wa <= epoch + 1 <= b_wa:
                fit.accumulate()
            if fit.eval_idx is not None:
                probs[fit.name] = predict(fit.head, s.ev.store, fit.eval_idx, s.cfg.multilabel, autocast=autocast)
                r["score"] = score(s.ev_y[fit.eval_idx], probs[fit.name][:, :n_primary], s.cfg.multilabel)["score"]
            rec["folds"][fit.name] = r
        folds = rec["folds"].values()
        rec["train_loss"] = float(np.mean([r["train_loss"] for r in folds]))
        if probs:
            rec["score"] = float(np.mean([r["score"] for r in folds]))  # folds: one epoch for all
        # without an eval set the last epoch is the best one
        if not probs or best["score"] is None or rec["score"] > best["score"]:
            best = {"epoch": epoch + 1, "score": rec.get("score")}
            for fit in fits:
                fit.best_probs = probs.get(fit.name)
                save_head(_fit_dir(out, fit, fits) / "best.pt", fit.head, s.info)
        if len(fits) == 1:  # one split: no per-fold level
            rec.update(rec.pop("folds")["main"])
        history.append(rec)
        _atomic_save({"epoch": epoch + 1, "options": _resume_key(opts), "fits": [f.state() for f in fits],
                      "scaler": scaler.state_dict() if scaler is not None else {}, "rng": _rng_state(gen),
                      "history": history, "best": best}, last)
        _write_metrics(out, opts, s.info, fits, history, best, None)

    return _finish(out, opts, s, fits, history, best, autocast)


def _resume_key(opts: TrainOptions) -> dict:
    d = dataclasses.asdict(opts)
    for k in ("resume", "max_epochs_this_run", "progress", "memory_budget", "device", "out"):
        d.pop(k)
    d["weight_average"] = list(d["weight_average"]) if d["weight_average"] else None
    return d


def _fit_dir(out: Path, fit: Fit, fits: list) -> Path:
    d = out if len(fits) == 1 else out / fit.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _finish(out, opts, s: Setup, fits, history, best, autocast) -> dict:
    vocab, info, multilabel = s.cache.meta.vocab, s.info, s.cfg.multilabel
    wa_scores = {}
    for fit in fits:
        wa = build_head(info.kind, info.n_layers, info.dim_in, info.n_classes, info.dim)
        wa.to(next(fit.head.parameters()).device).load_state_dict(fit.averaged())
        save_head(_fit_dir(out, fit, fits) / "wa.pt", wa, info)
        if fit.eval_idx is not None:
            p = predict(wa, s.ev.store, fit.eval_idx, multilabel, autocast=autocast)
            wa_scores[fit.name] = score(s.ev_y[fit.eval_idx], p[:, :len(vocab)], multilabel)["score"]
    final = {"best_epoch": best["epoch"]}
    if s.ev is not None:
        # per-class values of the chosen epoch: over the eval set, or over all held-out folds pooled
        idx = np.concatenate([f.eval_idx for f in fits])
        probs = np.concatenate([f.best_probs for f in fits])
        sc = score(s.ev_y[idx], probs[:, :len(vocab)], multilabel)
        final.update(metric=sc["metric"], best=best["score"], wa=float(np.mean(list(wa_scores.values()))))
        if len(fits) > 1:
            chosen = history[best["epoch"] - 1]["folds"]
            final["folds"] = {f.name: {"best": chosen[f.name]["score"], "wa": wa_scores[f.name]} for f in fits}
            final["pooled_heldout"] = sc["score"]
        if multilabel:
            final.update(mAUC=sc["mAUC"], d_prime=sc["d_prime"], skipped_classes=sc["skipped_classes"])
        support = s.ev_y[idx].sum(0)
        with open(out / "per_class.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "AP" if multilabel else "F1", "support"])
            for name, v, n in zip(vocab.names, sc["per_class"], support):
                w.writerow([name, "" if v is None else f"{v:.6f}", int(n)])
    final = json_safe(final)
    _write_metrics(out, opts, info, fits, history, best, final)
    _plot(out, history, len(fits) > 1, final.get("metric", "score"))
    return final


def _write_metrics(out, opts, info, fits, history, best, final):
    d = {"options": {k: v for k, v in dataclasses.asdict(opts).items()},
         "head": {"kind": info.kind, "dim": info.dim, "n_parameters": n_parameters(fits[0].head),
                  "n_classes": info.n_classes, "primary_classes": info.primary_classes},
         "cache": {"model": info.model, "fingerprint": info.fingerprint, "policy": info.policy,
                   "n_layers": info.n_layers, "dim": info.dim_in},
         "lr_milestones": milestones(opts.epochs), "weight_average": list(wa_range(opts)),
         "epochs": history, "best": best, "final": final}
    write_json(out / "metrics.json", d)


def _plot(out: Path, history: list[dict], per_fold: bool, metric: str):
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], marker=".")
    a.set(xlabel="epoch", ylabel="train loss")
    if any("score" in h for h in history):
        b.plot(ep, [h.get("score", np.nan) for h in history], marker=".", label="mean" if per_fold else "eval")
        if per_fold:
            for name in history[0]["folds"]:
                b.plot(ep, [h["folds"][name].get("score", np.nan) for h in history], alpha=0.4, label=name)
        b.legend()
    b.set(xlabel="epoch", ylabel=f"held-out {metric}")
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
