"""One epoch of one head: the epoch order, each rank's share of it, the steps, the mean loss."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from wat.data.clikit.progress import progress

from . import augment
from .distributed import World, all_reduce_grads, local_share
from .inputs import COMPUTE, Setup, batches, epoch_order, unlabeled_batches
from .options import TrainOptions
from .state import Fit
from .step import Shares, amp, train_step


def side_run(fit: Fit, s: Setup, opts: TrainOptions, weights, world: World, device, autocast, seed: int, title: str,
             after_epoch=None) -> None:
    """`fit` trained for `opts.epochs` epochs beside the run (--lr auto's candidates, the probe
    start's trial): with its own generator (seeded with `seed`, the same on every rank) and its own
    GradScaler, so the run's draws and scaler state stay the run's, and the run that follows is the
    run it would be without it. `after_epoch(e)` (e from 0) is called after each epoch."""
    gen = torch.Generator().manual_seed(seed)
    scaler = amp(device)[1]
    for e in range(opts.epochs):
        train_epoch(fit, s, opts, weights, gen, gen, world, scaler, autocast, f"{title} {e + 1}/{opts.epochs}")
        if after_epoch is not None:
            after_epoch(e)


def train_epoch(fit: Fit, s: Setup, opts: TrainOptions, weights, gen, aug, world: World, scaler, autocast,
                 title: str) -> float:
    """One epoch of one head. `gen` (the same on every rank) draws the epoch order; `aug` draws the
    augmentations (`gen` itself for the run: the same state on every rank, which draws for the whole
    global batch, so N processes train as one; see `distributed`). Returns the mean train loss per step."""
    data, n_classes = s.data, s.info.n_classes
    order = epoch_order(fit.train_idx, weights, gen)
    B = opts.batch_size
    n_steps = math.ceil(len(order) / B)
    bs = B // world.size  # per-rank share of the global batch
    ubatches = unlabeled_batches(s.unlabeled, opts.unlabeled_ratio * B, aug, world) if s.unlabeled else None
    reduce = None
    if world.parallel:
        params = [p for p in fit.head.parameters() if p.requires_grad]
        reduce = lambda n: all_reduce_grads(params, n)  # noqa: E731

    def targets(i: torch.Tensor) -> torch.Tensor:
        return data.targets[i] if s.cfg.multilabel else F.one_hot(data.classes[i], n_classes).float()

    total = torch.zeros((), device=data.targets.device)
    it = _padded(batches(data.store, local_share(order, world), bs, gen), n_steps, data.store)
    bar = progress(it, total=n_steps, desc=title, leave=False,
               disable=not world.main or (None if opts.progress is None else not opts.progress))
    for step, (idx, x) in enumerate(bar):
        i = torch.from_numpy(idx).to(data.targets.device)
        u = next(ubatches) if ubatches is not None else None
        shares = None
        if world.parallel:
            shares = _shares(order[step * B:(step + 1) * B], world, data, targets, s.cfg, u)
            assert len(shares.labeled.rows) == len(idx), (step, len(idx))
            u = u[1] if u is not None else None
        total += train_step(fit.head, fit.opt, x, targets(i), s.cfg, aug, scaler=scaler, autocast=autocast,
                            unlabeled=u, reduce=reduce, shares=shares)
    fit.sched.step()
    if world.parallel:  # each rank holds its shares of the global-batch losses: add them up
        dist.all_reduce(total)
    return float(total) / max(n_steps, 1)  # one host sync per epoch


def _shares(batch: np.ndarray, world: World, data, targets, cfg, u) -> Shares:
    """This rank's part of a global batch (`batch`: its clips, as one process takes them): every
    N-th position from the rank's (`local_share`), and for mixup partners on other ranks their rows
    read from the store, as the rank holding them has them (a resident store: the same tensor on
    every rank). A streamed store shuffles each rank's share on its own, so its batches are not one
    process's anyway: partners then come from the rank's own rows."""
    rows = torch.arange(world.rank, len(batch), world.size)
    partners = None
    if data.store.in_memory:
        def partners(pos: torch.Tensor):
            clips = batch[pos.numpy()]
            y = augment.smooth_targets(targets(torch.from_numpy(clips).to(data.targets.device)),
                                       cfg.label_smoothing, cfg.multilabel)
            return data.store.get(clips, COMPUTE), y
    return Shares(augment.Share(rows, len(batch)), u[0] if u is not None else None, partners)


def _padded(it, n_steps: int, store):
    """`it`'s batches, then empty ones up to `n_steps`: every rank takes part in every step's
    all-reduce, also when its share of the last global batch is empty."""
    k = 0
    for k, item in enumerate(it, 1):
        yield item
    empty = torch.empty((0,) + tuple(store.shape), dtype=COMPUTE, device=store.device)
    for _ in range(k, n_steps):
        yield np.empty(0, np.int64), empty
