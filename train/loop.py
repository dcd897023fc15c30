"""The trainer behind `wat-train`: the epoch driver that ties the pieces together.

A run reads one module at a time: `options` (what is asked), `inputs` (caches checked and loaded,
batches), `step` (one optimiser step), `evaluation` (held-out scores), `state` (fits, RNG,
`last.pt`), `outputs` (metrics.json, per_class.csv, curves.png) and this driver.

Protocols: one split (train cache, optional eval cache), or `folds=K` (ESC-50: K heads trained in
lockstep, each on K-1 folds and scored on the held-out one; one epoch is chosen by the
fold-averaged score, never per fold). Every random draw comes from one seeded torch.Generator
whose state is checkpointed with everything else in `last.pt`, so `resume` reproduces an
uninterrupted run bit for bit. Under torchrun (`distributed`) the ranks share that generator for
the epoch order and each has its own for augmentation, all checkpointed by rank 0.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from wat.data import figures
from wat.data.cache import Cache
from wat.data.files import LockedError, json_safe, output_lock
from wat.data.heads import Features, build_head, head_problems, load_head, save_head

from wat.eval import metrics

from . import board as tb
from .distributed import World, all_reduce_grads, from_main, gather, join, leave, local_share, world_from_env
from .evaluation import predict, score
from .inputs import Setup, balanced_weights, batches, epoch_order, prepare, unlabeled_batches
from .options import Interrupted, TrainError, TrainOptions, milestones, wa_range
from .outputs import plot_curves, write_metrics, write_per_class, write_report
from .state import Fit, load_checkpoint, resume_key, rng_state, save_checkpoint, seed_all, set_rng_state
from .step import StepConfig, amp, make_optimizer, train_step

__all__ = ["train", "prepare", "TrainOptions", "TrainError", "Interrupted", "milestones", "wa_range",
           "StepConfig", "train_step", "make_optimizer", "predict", "score", "balanced_weights"]


def _build(opts: TrainOptions, cache: Cache, n_classes: int, device):
    m = cache.meta
    head = build_head(opts.head, m.n_layers, m.dim, n_classes, opts.proj_dim)
    if opts.init:
        src, info = load_head(opts.init, n_layers=m.n_layers)
        # transfer to other classes is allowed: the classes and label type are not compared
        feats = Features(m.n_layers, m.dim, m.model, m.fingerprint, m.policy, m.n_frames, layers=m.layers)
        bad = head_problems(info, feats)
        if bad:
            raise TrainError(f"--init {opts.init} does not fit {opts.features}: {'; '.join(bad)}")
        if (info.kind, info.dim_in, info.proj_dim) != (opts.head, m.dim, opts.proj_dim):
            raise TrainError(f"--init {opts.init} is a {info.kind} head (width {info.dim_in}, projection "
                             f"{info.proj_dim}); this run trains {opts.head} (width {m.dim}, projection {opts.proj_dim})")
        state = src.state_dict()
        if info.n_classes != n_classes:  # transfer: keep everything but the classifier
            state = {k: v for k, v in state.items() if not k.startswith("mlp_layer.1.")}
        head.load_state_dict(state, strict=False)
    return head


def _train_epoch(fit: Fit, s: Setup, opts: TrainOptions, weights, gen, aug, world: World, scaler, autocast,
                 title: str) -> float:
    """One epoch of one head. `gen` (the same on every rank) draws the epoch order; `aug` draws the
    augmentations (it is `gen` itself in a single process). Returns the mean train loss per step."""
    data, n_classes = s.data, s.info.n_classes
    order = epoch_order(fit.train_idx, weights, gen)
    n_steps = math.ceil(len(order) / opts.batch_size)
    bs = opts.batch_size // world.size  # per-rank share of the global batch
    ubatches = unlabeled_batches(s.unlabeled, opts.unlabeled_ratio * bs, aug) if s.unlabeled else None
    reduce = None
    if world.parallel:
        params = [p for p in fit.head.parameters() if p.requires_grad]
        reduce = lambda n: all_reduce_grads(params, n)  # noqa: E731
    total = torch.zeros((), device=data.targets.device)
    it = _padded(batches(data.store, local_share(order, world), bs, gen), n_steps, data.store)
    bar = tqdm(it, total=n_steps, desc=title, leave=False,
               disable=not world.main or (None if opts.progress is None else not opts.progress))
    for idx, x in bar:
        i = torch.from_numpy(idx).to(data.targets.device)
        tgt = data.targets[i] if s.cfg.multilabel else F.one_hot(data.classes[i], n_classes).float()
        u = next(ubatches) if ubatches is not None else None
        total += train_step(fit.head, fit.opt, x, tgt, s.cfg, aug, scaler=scaler, autocast=autocast,
                            unlabeled=u, reduce=reduce)
    fit.sched.step()
    if world.parallel:  # each rank holds its shares of the global-batch losses: add them up
        dist.all_reduce(total)
    return float(total) / max(n_steps, 1)  # one host sync per epoch


def _padded(it, n_steps: int, store):
    """`it`'s batches, then empty ones up to `n_steps`: every rank takes part in every step's
    all-reduce, also when its share of the last global batch is empty."""
    k = 0
    for k, item in enumerate(it, 1):
        yield item
    empty = torch.empty((0,) + tuple(store.shape), dtype=torch.float16, device=store.device)
    for _ in range(k, n_steps):
        yield np.empty(0, np.int64), empty


LOCK = "wat-train.lock"  # in RUN_DIR: one writer per run folder (a stale one after kill -9 is harmless)


def train(opts: TrainOptions) -> dict:
    """Run the whole recipe; writes RUN_DIR outputs and returns the final metrics dict.
    RUN_DIR is locked for the whole run: a second concurrent run on it is refused (LockedError).
    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 holds the lock and writes."""
    out = Path(opts.out)
    if opts.tensorboard is not None:
        tb.check(opts.tensorboard)   # before RUN_DIR is made and the stores loaded (minutes)
    world = world_from_env()
    device = join(world, opts.device)
    try:
        with contextlib.ExitStack() as held:
            refused = None
            if world.main:
                out.mkdir(parents=True, exist_ok=True)
                try:
                    held.enter_context(output_lock(out / LOCK, f"RUN_DIR {out}"))
                except LockedError as e:
                    refused = str(e)
            refused = from_main(refused, world)  # every rank stops when rank 0 could not lock
            if refused:
                raise LockedError(refused)
            return _train(opts, out, world, device)
    finally:
        leave(world)


def _aug_generator(seed: int, world: World, gen: torch.Generator) -> torch.Generator:
    """One process: `gen` itself. Ranks: an own stream per (seed, rank)."""
    if not world.parallel:
        return gen
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0]))


def _train(opts: TrainOptions, out: Path, world: World, device) -> dict:
    s = prepare(opts, device)
    if opts.batch_size % world.size:
        raise TrainError(f"--batch-size {opts.batch_size} is the global batch: it must be a multiple of "
                         f"the {world.size} processes")
    gen = seed_all(opts.seed)
    aug = _aug_generator(opts.seed, world, gen)
    fits = [Fit(name, _build(opts, s.cache, s.info.n_classes, device), opts, tr, te, device)
            for name, tr, te in s.splits]
    weights = balanced_weights(s.y) if opts.balanced else None
    autocast, scaler = amp(device)
    history: list[dict] = []
    best = {"epoch": 0, "score": None}
    start = 0

    last = out / "last.pt"
    if opts.resume and last.exists():
        ck = load_checkpoint(last)
        if ck["options"] != resume_key(opts):
            raise TrainError(f"--resume: {last} was written with different options")
        for f, state in zip(fits, ck["fits"]):
            f.restore(state)
        if scaler is not None and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(gen, ck["rng"])
        history, best, start = ck["history"], ck["best"], ck["epoch"]
        if world.parallel:
            # the same number of processes continues every rank's augmentation stream; another
            # number (a job restarted on fewer GPUs) draws fresh streams for the epochs to come
            augs = ck.get("aug") or []
            aug.set_state(augs[world.rank]) if len(augs) == world.size else aug.manual_seed(
                int(np.random.SeedSequence([opts.seed, world.rank, start]).generate_state(1)[0]))

    board = None
    if opts.tensorboard is not None and world.main:
        board = tb.Board(opts.tensorboard, [f.name for f in fits], start)
    try:
        best = _epochs(out, opts, s, fits, gen, aug, world, scaler, autocast, weights, history, best, start, board)
    finally:
        if board is not None:
            board.close()
    final = _finish(out, opts, s, fits, history, best, autocast) if world.main else None
    return from_main(final, world)


def _epochs(out: Path, opts: TrainOptions, s: Setup, fits: list[Fit], gen, aug, world: World, scaler, autocast,
            weights, history: list[dict], best: dict, start: int, board) -> dict:
    """Epochs start+1..opts.epochs: train, score, choose, checkpoint; returns the chosen epoch.
    Every rank trains; rank 0 alone scores, chooses and writes."""
    a_wa, b_wa = wa_range(opts)
    n_primary = len(s.cache.meta.vocab)
    metric = "mAP" if s.cfg.multilabel else "accuracy"
    for epoch in range(start, opts.epochs):
        if opts.max_epochs_this_run is not None and epoch - start >= opts.max_epochs_this_run:
            raise Interrupted(f"stopped after epoch {epoch} of {opts.epochs}; continue with --resume")
        rec = {"epoch": epoch + 1, "lr": fits[0].opt.param_groups[0]["lr"], "folds": {}}
        probs = {}
        for fit in fits:
            r = {"train_loss": _train_epoch(fit, s, opts, weights, gen, aug, world, scaler, autocast,
                                            f"epoch {epoch + 1}/{opts.epochs} {fit.name}")}
            if a_wa <= epoch + 1 <= b_wa:
                fit.accumulate()
            if fit.eval_idx is not None and world.main:  # evaluated once, by rank 0
                probs[fit.name] = predict(fit.head, s.ev.store, fit.eval_idx, s.cfg.multilabel, autocast=autocast)
                r["score"] = score(s.ev_y[fit.eval_idx], probs[fit.name][:, :n_primary], s.cfg.multilabel)["score"]
                if board is not None and fit.wa_n:   # the live view also shows the averaged head so far
                    p = predict(fit.averaged_head(), s.ev.store, fit.eval_idx, s.cfg.multilabel, autocast=autocast)
                    r["score_wa"] = score(s.ev_y[fit.eval_idx], p[:, :n_primary], s.cfg.multilabel)["score"]
            rec["folds"][fit.name] = r
        augs = gather(aug.get_state(), world) if world.parallel else None
        if not world.main:
            continue  # the weights are the same on every rank: rank 0 keeps the record
        folds = rec["folds"].values()
        rec["train_loss"] = float(np.mean([r["train_loss"] for r in folds]))
        if probs:
            rec["score"] = float(np.mean([r["score"] for r in folds]))  # folds: one epoch for all
        if all("score_wa" in r for r in folds) and folds:
            rec["score_wa"] = float(np.mean([r["score_wa"] for r in folds]))
        # without an eval set the last epoch is the best one
        if not probs or best["score"] is None or rec["score"] > best["score"]:
            best = {"epoch": epoch + 1, "score": rec.get("score")}
            for fit in fits:
                fit.best_probs = probs.get(fit.name)
                save_head(_fit_dir(out, fit, fits) / "best.pt", fit.head, s.info)
        if len(fits) == 1:  # one split: no per-fold level
            rec.update(rec.pop("folds")["main"])
        history.append(rec)
        save_checkpoint(out / "last.pt", {"epoch": epoch + 1, "options": resume_key(opts), "fits": [f.state() for f in fits],
                               "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(gen),
                               "aug": augs, "history": history, "best": best})
        write_metrics(out, opts, s.info, fits[0].head, history, best, None)
        if board is not None:
            board.epoch(rec, metric)
    return best


def _fit_dir(out: Path, fit: Fit, fits: list) -> Path:
    d = out if len(fits) == 1 else out / fit.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _finish(out, opts, s: Setup, fits, history, best, autocast) -> dict:
    vocab, info, multilabel = s.cache.meta.vocab, s.info, s.cfg.multilabel
    wa_scores = {}
    for fit in fits:
        wa = fit.averaged_head()
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
        write_per_class(out / "per_class.csv", vocab, sc["scores"], s.ev_y[idx].sum(0))
    final = json_safe(final)
    record = write_metrics(out, opts, info, fits[0].head, history, best, final)
    meta, n_clips = s.cache.meta, len(s.cache)
    ev_cache = s.ev.cache if s.ev is not None and s.ev is not s.data else None
    if s.ev is None:
        protocol = "no held-out clips: nothing scored"
    elif len(fits) > 1:
        protocol = f"{len(fits)}-fold cross-validation"
    else:
        protocol = f"held out: {ev_cache.meta.dataset} eval cache, {len(ev_cache)} clips"
    kind = info.kind + (f" (projection {info.proj_dim})" if info.proj_dim else "")
    chance = None if s.ev is None else metrics.chance(s.ev_y[idx] if multilabel else s.ev_y[idx].argmax(1))
    plot_curves(out, history, len(fits) > 1, final.get("metric", "score"),
                title=(f"{kind} head on {figures.cache_label(meta, n_clips)}", protocol), chance=chance,
                wa=final.get("wa"), wa_epochs=wa_range(opts), best_epoch=best["epoch"] if s.ev is not None else None)
    write_report(out, record, meta, n_clips, protocol=protocol, chance=chance,
                 per_class=(vocab.names, sc["per_class"], s.ev_y[idx].sum(0)) if s.ev is not None else None,
                 eval_meta=ev_cache.meta if ev_cache is not None else None,
                 eval_clips=len(ev_cache) if ev_cache is not None else None)
    return final
