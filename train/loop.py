"""The trainer behind `wat-train`: the epoch driver that ties the pieces together.

A run reads one module at a time: `options` (what is asked), `inputs` (caches checked and loaded,
batches), `step` (one optimiser step), `evaluation` (held-out scores), `state` (fits, RNG,
`last.pt`), `outputs` (metrics.json, per_class.csv, curves.png) and this driver.

Protocols: one split (train cache, optional eval cache), or `folds=K` (ESC-50: K heads trained in
lockstep, each on K-1 folds and scored on the held-out one; one epoch is chosen by the
fold-averaged score, never per fold). Every random draw comes from one seeded torch.Generator
whose state is checkpointed with everything else in `last.pt`, so `resume` reproduces an
uninterrupted run bit for bit.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wat.data import figures
from wat.data.cache import Cache
from wat.data.files import json_safe
from wat.data.heads import Features, build_head, head_problems, load_head, save_head

from wat.eval import metrics

from . import board as tb
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
        feats = Features(m.n_layers, m.dim, m.model, m.fingerprint, m.policy, m.n_frames)
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


def _train_epoch(fit: Fit, s: Setup, opts: TrainOptions, weights, gen, scaler, autocast, title: str) -> float:
    data, n_classes = s.data, s.info.n_classes
    order = epoch_order(fit.train_idx, weights, gen)
    ubatches = unlabeled_batches(s.unlabeled, opts.unlabeled_ratio * opts.batch_size, gen) if s.unlabeled else None
    total, steps = torch.zeros((), device=data.targets.device), 0
    bar = tqdm(batches(data.store, order, opts.batch_size, gen), total=math.ceil(len(order) / opts.batch_size),
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
    if opts.tensorboard is not None:
        tb.check(opts.tensorboard)   # before loading the stores, which can take minutes
    s = prepare(opts, device)
    out.mkdir(parents=True, exist_ok=True)
    a_wa, b_wa = wa_range(opts)
    n_primary = len(s.cache.meta.vocab)
    gen = seed_all(opts.seed)
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

    board = tb.Board(opts.tensorboard, [f.name for f in fits], start) if opts.tensorboard is not None else None
    try:
        best = _epochs(out, opts, s, fits, gen, scaler, autocast, weights, history, best, start, board)
    finally:
        if board is not None:
            board.close()
    return _finish(out, opts, s, fits, history, best, autocast)


def _epochs(out: Path, opts: TrainOptions, s: Setup, fits: list[Fit], gen, scaler, autocast, weights,
            history: list[dict], best: dict, start: int, board) -> dict:
    """Epochs start+1..opts.epochs: train, score, choose, checkpoint; returns the chosen epoch."""
    a_wa, b_wa = wa_range(opts)
    n_primary = len(s.cache.meta.vocab)
    metric = "mAP" if s.cfg.multilabel else "accuracy"
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
                if board is not None and fit.wa_n:   # the live view also shows the averaged head so far
                    p = predict(fit.averaged_head(), s.ev.store, fit.eval_idx, s.cfg.multilabel, autocast=autocast)
                    r["score_wa"] = score(s.ev_y[fit.eval_idx], p[:, :n_primary], s.cfg.multilabel)["score"]
            rec["folds"][fit.name] = r
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
                               "history": history, "best": best})
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
