"""The trainer behind `wat-train`: the epoch driver that ties the pieces together.

A run reads one module at a time: `options` (what is asked), `inputs` (caches checked and loaded,
batches), `step` (one optimiser step), `evaluation` (held-out scores), `state` (fits, RNG,
`last.pt`), `resume` (what a last.pt must hold to be resumed), `outputs` (metrics.json, per_class.csv, curves.png) and this driver.

Protocols: one split (train cache, optional eval cache), or `folds=K` (ESC-50: K heads trained in
lockstep, each on K-1 folds and scored on the held-out one; one epoch is chosen by the
fold-averaged score, never per fold). Every random draw comes from one seeded torch.Generator
whose state is checkpointed with everything else in `last.pt`, so `resume` reproduces an
uninterrupted run bit for bit. Under torchrun (`distributed`) every rank holds the same generator
state and draws for whole global batches, so one last.pt resumes on any number of processes.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from wat.data.report import figures
from wat.data.cache import Cache
from wat.data.files import LockedError, json_safe, locked_folder, one_line
from wat.data.heads import build_head, head_class, save_head

from wat.eval import metrics

from . import board as tb
from .distributed import World, from_main, join, leave, world_from_env
from .epoch import train_epoch
from .evaluation import predict, score
from .init import Init
from .inputs import Checked, Setup, balanced_weights, check_inputs, load_inputs, prepare
from .lrsearch import CANDIDATES, check_searchable, search_lr
from .options import Interrupted, TrainError, TrainOptions, milestones, wa_range
from .outputs import plot_curves, write_metrics, write_per_class, write_report
from .resume import check_resume, resumed_lr, resumed_trials
from .state import Fit, data_differences, data_identity, load_checkpoint, option_differences, resume_key, rng_state, save_checkpoint, seed_all, set_rng_state
from .step import StepConfig, amp, make_optimizer, train_step
from .warmstart import Start, default_probe_start, trial

__all__ = ["train", "prepare", "TrainOptions", "TrainError", "Interrupted", "milestones", "wa_range",
           "StepConfig", "train_step", "make_optimizer", "predict", "score", "balanced_weights"]


def _build(opts: TrainOptions, cache: Cache, n_classes: int, init: Init | None):
    m = cache.meta
    head = build_head(opts.head, m.n_layers, m.dim, n_classes, opts.proj_dim)
    return head if init is None else init.apply(head)


log = logging.getLogger("wat.train")

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
        # every input is checked before RUN_DIR is made: a refused run leaves no folder behind
        checked = check_inputs(opts, world.size)
        opts = checked.opts  # the batch size resolved: metrics.json and last.pt record the one used
        if opts.lr == "auto" or (opts.lr is None and head_class(opts.head).lr is None):
            check_searchable(checked.splits, checked.y, opts.seed)
        if opts.batch_size % world.size:
            raise TrainError(f"--batch-size {opts.batch_size} is the global batch: it must be a multiple of "
                             f"the {world.size} processes")
        init = checked.init
        with contextlib.ExitStack() as held:
            refused = None
            if world.main:
                try:
                    held.enter_context(locked_folder(out, LOCK, f"RUN_DIR {out}"))
                except LockedError as e:
                    refused = str(e)
            refused = from_main(refused, world)  # every rank stops when rank 0 could not lock
            if refused:
                raise LockedError(refused)
            return _train(opts, checked, init, out, world, device)
    finally:
        leave(world)


def _train(opts: TrainOptions, checked: Checked, init: Init | None, out: Path, world: World, device) -> dict:
    last = out / "last.pt"
    ck = load_checkpoint(last) if opts.resume and last.exists() else None
    # what --resume must find again, checked before the stores load (minutes on a large cache)
    if ck is not None and (changed := option_differences(ck["options"], resume_key(opts))):
        raise TrainError(f"--resume: {last} was written with other options ({'; '.join(changed)}); rerun with "
                         "those, or delete it to start afresh")
    data = data_identity({"features": checked.cache, "eval_features": checked.ecache,
                          "unlabeled_features": checked.ucache})
    if ck is not None and isinstance(ck.get("data"), dict) and (changed := data_differences(ck["data"], data)):
        raise TrainError(f"--resume: {last} was trained on other data at these paths ({'; '.join(changed)}); "
                         "point the options at that data, or delete it to start afresh")
    if ck is not None and not isinstance(ck.get("data"), dict):
        log.warning("--resume: %s predates data checks; the caches it was trained on cannot be compared", last)
    s = load_inputs(checked, opts, device)
    gen = seed_all(opts.seed)
    aug = gen  # one stream on every rank: draws are made for whole global batches (`distributed`)
    heads = [_build(opts, s.cache, s.info.n_classes, init) for _ in s.splits]  # the run's inits first
    starts = _probe_starts(opts, s, heads, init, device)
    weights = balanced_weights(s.y) if opts.balanced else None
    autocast, scaler = amp(device)
    history: list[dict] = []
    best = {"epoch": 0, "score": None}
    start = 0

    lr = _learning_rates(opts, s, init, weights, world, device, autocast, ck)
    trials = _trials(opts, s, starts, lr, weights, world, device, autocast, ck)
    fits = [Fit(name, head, opts, tr, te, device, lr=lr["per_head"][name]) for head, (name, tr, te) in zip(heads, s.splits)]
    if ck is not None:
        check_resume(last, ck, fits, opts, s.info.n_classes)
        try:  # what the checks above do not cover (RNG and scaler states) fails here, before any epoch
            for f, state in zip(fits, ck["fits"]):
                f.restore(state)
            if scaler is not None and ck["scaler"]:
                scaler.load_state_dict(ck["scaler"])
            set_rng_state(gen, ck["rng"])  # every draw, on any number of processes
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
            raise TrainError(f"--resume: {last} does not fit this run ({type(e).__name__}: {one_line(e)}); "
                             "delete it to start afresh") from None
        history, best, start = ck["history"], ck["best"], ck["epoch"]

    board = None
    if opts.tensorboard is not None and world.main:
        board = tb.Board(opts.tensorboard, [f.name for f in fits], start)
    try:
        best = _epochs(out, opts, s, fits, gen, aug, world, scaler, autocast, weights, history, best, start, board, lr,
                       data, trials)
    finally:
        if board is not None:
            board.close()
    kept = {name: {**starts[name].info, **trials[name]} for name in trials}
    final = _finish(out, opts, s, fits, history, best, autocast, lr, world.size, starts, kept) if world.main else None
    return from_main(final, world)


def _probe_starts(opts: TrainOptions, s: Setup, heads: list, init: Init | None, device) -> dict[str, Start]:
    """{fit name: Start} for the heads with a probe start (`warmstart`), moved to `device`: with
    --probe-start on every head trains from it; by default `warmstart.default_probe_start` says
    whether and from what; else {}."""
    train_from = "start" if opts.probe_start else None
    if opts.probe_start is None:
        train_from = default_probe_start(heads[0], s.cache.meta.n_layers, len(s.cache.meta.vocab),
                                         [tr for _, tr, _ in s.splits], init is not None)
    if train_from is None:
        return {}
    y = s.data.targets.cpu().numpy() > 0.5  # the head's outputs: the vocabulary (+ parent labels)
    starts = {}
    for head, (name, tr, _) in zip(heads, s.splits):
        starts[name] = Start(head.to(device), s.data.store, tr, s.cache.folds, y, s.cfg.multilabel, opts.seed,
                             train_from)
        log.info("probe start %s: %s", name, starts[name].info)
    return starts


def _trials(opts: TrainOptions, s: Setup, starts: dict[str, Start], lr: dict, weights, world: World, device, autocast,
            ck) -> dict[str, dict]:
    """{fit name: the trial's record} for the heads with a probe start (`warmstart.trial`: is the
    start kept instead of the trained head?); a resumed run takes them from last.pt."""
    if not starts:
        return {}
    if ck is not None:
        for st in starts.values():
            st.initial = None   # the trial ran before last.pt: its random weights are not needed
        return resumed_trials(Path(opts.out) / "last.pt", ck.get("trials"), list(starts))
    out = {}
    for name, st in starts.items():
        out[name] = trial(st, name, s, opts, lr["per_head"][name], weights, world, device, autocast)
        log.info("start trial %s: %s", name, out[name])
    return out


def _learning_rates(opts: TrainOptions, s: Setup, init: Init | None, weights, world: World, device, autocast, ck) -> dict:
    """{"source", "per_head": {fit name: lr}, "search"?}: --lr as given, the head kind's measured
    default, or (--lr auto, or a kind without a default) a search per head on its training clips.
    A resumed run reuses the checkpoint's choice instead of searching again."""
    names = [name for name, _, _ in s.splits]
    if isinstance(opts.lr, (int, float)):
        return {"source": "--lr", "per_head": {n: float(opts.lr) for n in names}}
    if opts.lr is None and head_class(opts.head).lr is not None:
        return {"source": f"default for {opts.head}", "per_head": {n: head_class(opts.head).lr for n in names}}
    if ck is not None and ck.get("lr"):
        return resumed_lr(Path(opts.out) / "last.pt", ck["lr"], names)
    build = lambda: _build(opts, s.cache, s.info.n_classes, init)  # noqa: E731
    found = {name: search_lr(name, tr, s, opts, build, weights, world, device, autocast) for name, tr, _ in s.splits}
    return {"source": "search (--lr auto)", "per_head": {n: f["chosen"] for n, f in found.items()},
            "search": {"candidates": list(CANDIDATES), "folds" if len(found) > 1 else "main": found}}


def _epochs(out: Path, opts: TrainOptions, s: Setup, fits: list[Fit], gen, aug, world: World, scaler, autocast,
            weights, history: list[dict], best: dict, start: int, board, lr: dict, data: dict, trials: dict) -> dict:
    """Epochs start+1..opts.epochs: train, score, choose, checkpoint; returns the chosen epoch.
    Every rank trains; rank 0 alone scores, chooses and writes. `data`: the caches' identities,
    kept in last.pt for --resume."""
    a_wa, b_wa = wa_range(opts)
    n_primary = len(s.cache.meta.vocab)
    metric = "mAP" if s.cfg.multilabel else "accuracy"
    for epoch in range(start, opts.epochs):
        if opts.max_epochs_this_run is not None and epoch - start >= opts.max_epochs_this_run:
            raise Interrupted(f"stopped after epoch {epoch} of {opts.epochs}; continue with --resume")
        rec = {"epoch": epoch + 1, "lr": fits[0].opt.param_groups[0]["lr"], "folds": {}}
        probs = {}
        for fit in fits:
            r = {"lr": fit.opt.param_groups[0]["lr"], "train_loss": train_epoch(fit, s, opts, weights, gen, aug, world, scaler, autocast,
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
        save_checkpoint(out / "last.pt", {"epoch": epoch + 1, "options": resume_key(opts), "data": data,
                                          "fits": [f.state() for f in fits],
                               "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(gen),
                               "processes": world.size, "history": history, "best": best, "lr": json_safe(lr),
                               "trials": trials})
        write_metrics(out, opts, s.info, fits[0].head, history, best, None, lr, world.size)
        if board is not None:
            board.epoch(rec, metric)
    return best


def _fit_dir(out: Path, fit: Fit, fits: list) -> Path:
    d = out if len(fits) == 1 else out / fit.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _finish(out, opts, s: Setup, fits, history, best, autocast, lr: dict, processes: int = 1,
            starts: dict | None = None, kept: dict | None = None) -> dict:
    """`kept`: {fit name: its probe start and trial's record}; where the trial kept the start, wa.pt is it."""
    vocab, info, multilabel = s.cache.meta.vocab, s.info, s.cfg.multilabel
    wa_scores, kept = {}, kept or {}
    for fit in fits:
        wa = fit.averaged_head()
        if kept.get(fit.name, {}).get("kept") == "start":
            wa = starts[fit.name].start
        save_head(_fit_dir(out, fit, fits) / "wa.pt", wa, info)
        if fit.eval_idx is not None:
            p = predict(wa, s.ev.store, fit.eval_idx, multilabel, autocast=autocast)
            wa_scores[fit.name] = score(s.ev_y[fit.eval_idx], p[:, :len(vocab)], multilabel)["score"]
    final = {"best_epoch": best["epoch"]}
    if kept:
        final["probe_start"] = kept
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
    record = write_metrics(out, opts, info, fits[0].head, history, best, final, lr, processes)
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
