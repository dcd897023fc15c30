"""`--lr auto`: pick the learning rate by a short search on the TRAINING clips only.

For each head being trained (one per fold with `--folds`), its own training clips are split into a
search-train part and a search-held-out part (every 5th clip of each class, seeded); a short run per
candidate learning rate, all from the same initial weights, trains on the first and is scored on the
second by the held-out log-loss (smoother than accuracy on a few clips), averaged over the second
half of the short run; the lowest wins. The evaluation fold and the evaluation cache are never read.
The search draws from its own generators, so the full run that follows is exactly the run
`--lr CHOSEN` would make.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .distributed import World, from_main
from .epoch import side_run
from .evaluation import predict
from .inputs import Setup
from .options import TrainError, TrainOptions
from .state import Fit

CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # spans the per-kind defaults (BENCHMARKS.md)
HELD_OUT_EVERY = 5                      # every 5th clip of a class is held out (20%)


def search_epochs(epochs: int) -> int:
    """A third of the run (at least 3, at most the run)."""
    return min(epochs, max(3, epochs // 3))


def split(train_idx: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search-train, search-held-out) clips of `train_idx`: every HELD_OUT_EVERY-th clip of each
    class (by the clip's first label) in a seeded order, so every class is on both sides."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(train_idx)
    first = y[idx].argmax(1)
    held = np.zeros(len(idx), bool)
    for c in np.unique(first):
        held[np.flatnonzero(first == c)[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]] = True
    return np.sort(idx[~held]), np.sort(idx[held])


def check_searchable(splits: list, y: np.ndarray, seed: int) -> None:
    """Raise TrainError, before the run makes RUN_DIR, when a head's training clips are too few to
    search on: the split would hold out no clip (every 5th of each class), or keep none to train on."""
    for name, tr, _ in splits:
        s_tr, s_ho = split(tr, y, seed)
        if not len(s_ho) or not len(s_tr):
            where = "the training clips" if name == "main" else f"{name}'s training clips (the other folds)"
            raise TrainError(f"--lr auto: {where} ({len(tr)}) are too few to search a learning rate on (every "
                             f"{HELD_OUT_EVERY}th clip of each class is held out: none would be, or none would be "
                             "left to train on); give --lr")


def search_lr(name: str, train_idx: np.ndarray, s: Setup, opts: TrainOptions, build, weights, world: World,
              device, autocast) -> dict:
    """{"chosen": lr, "scores": {lr: score}, "epochs": E, "clips": [n train, n held out]} for the head
    that will train on `train_idx`. `build()` makes a fresh head like the run's."""
    tr, ho = split(train_idx, s.y, opts.seed)
    n_ep = search_epochs(opts.epochs)
    init = build()
    scores = {}
    for lr in CANDIDATES:
        o = dataclasses.replace(opts, lr=lr, epochs=n_ep, weight_average=None)
        f = Fit(f"{name} lr {lr:g}", copy.deepcopy(init), o, tr, ho, device)
        late = []

        def held_out_loss(e: int, f: Fit = f, late: list = late) -> None:
            if e >= n_ep // 2:
                p = predict(f.head, s.data.store, ho, s.cfg.multilabel, autocast=autocast)
                late.append(log_loss(s.y[ho], p[:, :s.y.shape[1]], s.cfg.multilabel))
        # not the run's generator (see module doc)
        side_run(f, s, o, weights, world, device, autocast, opts.seed + 7919, f"lr search {name} {lr:g}", held_out_loss)
        scores[f"{lr:g}"] = float(np.mean(late))
    best = min(CANDIDATES, key=lambda lr: scores[f"{lr:g}"])
    return from_main({"chosen": best, "held_out_log_loss": scores, "epochs": n_ep, "clips": [len(tr), len(ho)]},
                     world)


def log_loss(y: np.ndarray, p: np.ndarray, multilabel: bool) -> float:
    """Mean held-out log-loss: binary cross-entropy per class (multi-label) or -log p(true class)."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    if multilabel:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y.argmax(1)])))
