"""The state of a run that `--resume` restores: each head's fit (weights, optimiser, schedule,
weight-average accumulator, best predictions), every RNG, and the atomic `last.pt` checkpoint."""
from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from wat.data.files import UnreadableFile, load_torch, save_torch

from .options import TrainError, TrainOptions, milestones
from .step import make_optimizer


class Fit:
    """A head with its optimiser, schedule, weight-average accumulator and best-so-far record."""

    def __init__(self, name: str, head, opts: TrainOptions, train_idx, eval_idx, device, lr: float | None = None):
        self.name, self.head = name, head.to(device)
        self.train_idx = np.asarray(train_idx)
        self.eval_idx = None if eval_idx is None else np.asarray(eval_idx)
        self.lr = lr if lr is not None else opts.lr  # a number: the run resolves defaults and "auto" first
        self.opt = make_optimizer(self.head, self.lr)
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

    def averaged_head(self):
        """A copy of the head (same device) holding the weight average so far: wa.pt at the end.
        A copy, not a fresh build_head: building would draw from the global RNG mid-run."""
        head = copy.deepcopy(self.head)
        head.load_state_dict(self.averaged())
        return head

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


def rng_state(gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *[float(v) for v in np_state[2:]]],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(gen: torch.Generator, s: dict):
    gen.set_state(s["gen"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], np.uint32), int(n[2]), int(n[3]), n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


PATH_OPTIONS = ("features", "eval_features", "unlabeled_features", "init")  # compared as resolved paths


def resume_key(opts: TrainOptions) -> dict:
    """The options a resumed run must share with the run that wrote last.pt; paths resolved (a
    cache given as `feats.h5` and as `/data/feats.h5` is one cache)."""
    d = dataclasses.asdict(opts)
    for k in ("resume", "max_epochs_this_run", "progress", "memory_budget", "device", "out", "tensorboard"):
        d.pop(k)
    d["weight_average"] = list(d["weight_average"]) if d["weight_average"] else None
    for k in PATH_OPTIONS:
        if d.get(k):
            d[k] = _resolved(d[k])
    return d


def data_identity(caches: dict) -> dict:
    """{option: `Cache.identity()` or None} of the caches a run reads (`--features`, ...): what a
    resumed run must find again (`data_differences`)."""
    return {k: (c.identity() if c is not None else None) for k, c in caches.items()}


def data_differences(old: dict, new: dict) -> list[str]:
    """What differs between the data a checkpoint was trained on and this run's, one
    `--option field: old -> new` each (e.g. a cache re-extracted with another policy at the same path)."""
    out = []
    for opt in sorted(set(old) | set(new)):
        a, b = old.get(opt) or {}, new.get(opt) or {}
        for k in list(b) + [k for k in a if k not in b]:  # as `Cache.identity` orders them: the digest last
            if a.get(k) != b.get(k):
                out.append(f"--{opt.replace('_', '-')} {k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}")
    return out


def _resolved(path) -> str:
    return str(Path(path).expanduser().resolve())


# options added after checkpoints were written without them: the value those runs had (an old run
# resumes with --probe-start off)
ABSENT = {"probe_start": False}


def option_differences(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's `resume_key` and this run's, one `--option: old -> new`
    each (paths of checkpoints written before paths were resolved are resolved here, as well as
    they still can be)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, ABSENT.get(k, "(absent)")), new.get(k, "(absent)")
        if k in PATH_OPTIONS and isinstance(a, str) and a:
            a = _resolved(a)
        if a != b:
            out.append(f"--{k.replace('_', '-')}: {a!r} -> {b!r}")
    return out


def save_checkpoint(path: Path, obj: dict) -> None:
    save_torch(path, obj)


# what a last.pt holds and the type of each: a truncated, foreign or hostile file is a TrainError
_CHECKPOINT = {"options": dict, "fits": list, "rng": dict, "history": list, "epoch": int}


def load_checkpoint(path: Path) -> dict:
    """last.pt for --resume. weights_only=True: a pickle that would call anything is refused, not run."""
    try:
        ck = load_torch(path, map_location="cpu")  # RNG states must stay on the CPU
    except UnreadableFile as e:
        raise TrainError(f"--resume: cannot read {path} ({e}); delete it to start afresh") from None
    bad = [k for k, t in _CHECKPOINT.items() if not isinstance(ck, dict) or not isinstance(ck.get(k), t)]
    if bad:
        raise TrainError(f"--resume: {path} is not a wat-train checkpoint (no valid {', '.join(bad)}); "
                         "delete it to start afresh")
    return ck
