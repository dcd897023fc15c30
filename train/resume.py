"""What a `last.pt` must hold before `--resume` trusts it: the shapes of this run's heads and
optimisers, finite numbers, and an epoch count, schedule, history and choice that agree with each
other and with the options. `state.load_checkpoint` checks the file's top-level keys and types;
this checks the values against the live run, so that a foreign or hostile checkpoint is one
TrainError instead of a RuntimeError deep in load_state_dict, or an optimiser step that fails (or,
worse, trains on) epochs later."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .options import TrainError, TrainOptions, wa_range
from .state import Fit

_FIT_KEYS = {"head", "opt", "sched", "wa_sum", "wa_n", "best_probs"}


class _Bad(Exception):
    """One problem found in the checkpoint (becomes the TrainError's reason)."""


def _number(x, where: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
        raise _Bad(f"{where} is {x!r}, not a finite{' positive' if positive else ''} number")
    return x


def _int(x, where: str, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise _Bad(f"{where} is {x!r}, expected an integer in {lo}..{hi}")
    return x


def _tensor(x, where: str, shape=None, dtype=None) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise _Bad(f"{where} is a {type(x).__name__}, not a tensor")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise _Bad(f"{where} has shape {tuple(x.shape)}, this run's has {tuple(shape)}")
    if dtype is not None and x.dtype != dtype:
        raise _Bad(f"{where} is {x.dtype}, this run's is {dtype}")
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        raise _Bad(f"{where} holds NaN or infinite values")
    return x


def _state_dict(got, want: dict, where: str, dtype=None) -> None:
    """`got` has exactly `want`'s tensors, with their shapes (and dtypes, or `dtype`), all finite."""
    if not isinstance(got, dict) or set(got) != set(want):
        raise _Bad(f"{where} holds other tensors than this run's head (a different head kind or layout)")
    for k, v in want.items():
        _tensor(got[k], f"{where} {k}", v.shape, dtype or v.dtype)


def _optimizer(got, opt: torch.optim.Optimizer, where: str) -> None:
    fresh = opt.state_dict()
    if not isinstance(got, dict) or set(got) != {"state", "param_groups"}:
        raise _Bad(f"{where} is not an optimiser state")
    groups = got["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]) or \
            any(not isinstance(g, dict) or g.get("params") != f["params"] for g, f in zip(groups, fresh["param_groups"])):
        raise _Bad(f"{where} is for other parameters than this run's head")
    for g in groups:
        _number(g.get("lr"), f"{where} learning rate", positive=True)
    params = [p for g in opt.param_groups for p in g["params"]]  # state_dict numbers them in this order
    state = got["state"]
    if not isinstance(state, dict) or not all(isinstance(i, int) and 0 <= i < len(params) for i in state):
        raise _Bad(f"{where} holds state for parameters this run's head does not have")
    for i, st in state.items():
        if not isinstance(st, dict):
            raise _Bad(f"{where} state of parameter {i} is not a dict")
        for k, v in st.items():  # Adam: a scalar step, moments shaped like the parameter
            t = _tensor(v, f"{where} {k} of parameter {i}")
            if t.dim() > 0:
                _tensor(t, f"{where} {k} of parameter {i}", params[i].shape)
            elif t.is_floating_point() and float(t) < 0:
                raise _Bad(f"{where} {k} of parameter {i} is negative")


def _schedule(got, sched, epoch: int, where: str) -> None:
    fresh = sched.state_dict()
    if not isinstance(got, dict) or set(got) != set(fresh):
        raise _Bad(f"{where} is not this run's learning-rate schedule")
    for k in ("milestones", "gamma", "base_lrs"):  # fixed by the options
        if got[k] != fresh[k]:
            raise _Bad(f"{where} {k} is {got[k]!r}, this run's is {fresh[k]!r}")
    if got["last_epoch"] != epoch:
        raise _Bad(f"{where} stopped at epoch {got['last_epoch']!r}, the checkpoint at epoch {epoch}")
    last = got["_last_lr"]
    if not isinstance(last, list) or len(last) != len(fresh["base_lrs"]):
        raise _Bad(f"{where} last learning rates are {last!r}")
    for v in last:
        _number(v, f"{where} last learning rate", positive=True)


def _fit(got, fit: Fit, epoch: int, n_averaged: int, n_classes: int) -> None:
    where = f"fit {fit.name}:"
    if not isinstance(got, dict) or set(got) != _FIT_KEYS:
        raise _Bad(f"{where} expected the keys {sorted(_FIT_KEYS)}")
    want = fit.head.state_dict()
    _state_dict(got["head"], want, f"{where} head")
    _optimizer(got["opt"], fit.opt, f"{where} optimiser")
    _schedule(got["sched"], fit.sched, epoch, f"{where} schedule")
    # weight averaging: exactly the epochs of the averaging window done so far
    _int(got["wa_n"], f"{where} averaged epochs", n_averaged, n_averaged)
    if n_averaged:
        _state_dict(got["wa_sum"], want, f"{where} weight-average sum", dtype=torch.float64)
    elif got["wa_sum"] is not None:
        raise _Bad(f"{where} has a weight-average sum before its averaging window")
    probs = got["best_probs"]
    if fit.eval_idx is None:
        if probs is not None:
            raise _Bad(f"{where} has held-out predictions but this run holds no clips out")
    else:
        _tensor(probs, f"{where} best predictions", (len(fit.eval_idx), n_classes))


def _history(history: list, epoch: int, names: list[str], scored: bool) -> None:
    if len(history) != epoch:
        raise _Bad(f"history has {len(history)} epochs, the checkpoint says {epoch}")
    for i, h in enumerate(history, 1):
        if not isinstance(h, dict) or h.get("epoch") != i:
            raise _Bad(f"history entry {i} is not epoch {i}")
        _number(h.get("train_loss"), f"history epoch {i} training loss")
        _number(h.get("lr"), f"history epoch {i} learning rate", positive=True)
        if scored:
            _number(h.get("score"), f"history epoch {i} score")
        if len(names) > 1:
            folds = h.get("folds")
            if not isinstance(folds, dict) or set(folds) != set(names):
                raise _Bad(f"history epoch {i} has folds {sorted(folds) if isinstance(folds, dict) else folds!r}, "
                           f"this run {names}")
            for name in names:
                f = folds[name]
                _number(f.get("train_loss") if isinstance(f, dict) else None, f"history epoch {i} {name} training loss")
                if scored:
                    _number(f.get("score"), f"history epoch {i} {name} score")


def check_resume(path: Path, ck: dict, fits: list[Fit], opts: TrainOptions, n_classes: int) -> None:
    """Raise TrainError when checkpoint `ck` (from `load_checkpoint`) does not fit this run's `fits`."""
    try:
        epoch = _int(ck["epoch"], "the epoch", 1, opts.epochs)
        if len(ck["fits"]) != len(fits):
            raise _Bad(f"it holds {len(ck['fits'])} heads, this run trains {len(fits)}")
        a, b = wa_range(opts)
        n_averaged = max(0, min(epoch, b) - a + 1)
        for got, fit in zip(ck["fits"], fits):
            _fit(got, fit, epoch, n_averaged, n_classes)
        scored = fits[0].eval_idx is not None
        _history(ck["history"], epoch, [f.name for f in fits], scored)
        best = ck.get("best")
        if not isinstance(best, dict) or set(best) != {"epoch", "score"}:
            raise _Bad(f"the chosen epoch is {best!r}")
        # without held-out clips the last epoch is the chosen one; with them, the best-scored
        _int(best["epoch"], "the chosen epoch", 1 if scored else epoch, epoch)
        if scored and _number(best["score"], "the chosen score") != ck["history"][best["epoch"] - 1]["score"]:
            raise _Bad("the chosen score is not the score of the chosen epoch")
        if not scored and best["score"] is not None:
            raise _Bad("it has a chosen score but this run holds no clips out")
    except _Bad as e:
        raise TrainError(f"--resume: {path} does not fit this run: {e}; delete it to start afresh") from None


def resumed_lr(path: Path, lr, names: list[str]) -> dict:
    """The learning rates a checkpointed --lr auto search chose (`{"source", "per_head", ...}`), checked."""
    per_head = lr.get("per_head") if isinstance(lr, dict) else None
    if not isinstance(per_head, dict) or set(per_head) != set(names):
        raise TrainError(f"--resume: {path} does not fit this run: its learning rates are for heads "
                         f"{sorted(per_head) if isinstance(per_head, dict) else per_head!r}, this run trains {names}; "
                         "delete it to start afresh")
    for v in per_head.values():
        try:
            _number(v, "a learning rate", positive=True)
        except _Bad as e:
            raise TrainError(f"--resume: {path} does not fit this run: {e}; delete it to start afresh") from None
    return lr


def resumed_trials(path: Path, trials, names: list[str]) -> dict:
    """The probe start trials' records a checkpoint kept (`{fit name: {"kept", ...}}`), checked: one
    per head with a probe start, each keeping "start" or "trained"."""
    if not isinstance(trials, dict) or set(trials) != set(names) or \
            any(not isinstance(r, dict) or r.get("kept") not in ("start", "trained") for r in trials.values()):
        raise TrainError(f"--resume: {path} holds no start trial for this run's probe starts (written by an older "
                         "wat-train); delete it to start afresh")
    return trials
