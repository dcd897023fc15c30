"""One epoch of one head: the epoch order, each rank's share of it, the steps, the mean loss."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from wat.data.progress import progress

from .distributed import World, all_reduce_grads, local_share
from .inputs import COMPUTE, Setup, batches, epoch_order, unlabeled_batches
from .options import TrainOptions
from .state import Fit
from .step import train_step


def train_epoch(fit: Fit, s: Setup, opts: TrainOptions, weights, gen, aug, world: World, scaler, autocast,
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
    bar = progress(it, total=n_steps, desc=title, leave=False,
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
    empty = torch.empty((0,) + tuple(store.shape), dtype=COMPUTE, device=store.device)
    for _ in range(k, n_steps):
        yield np.empty(0, np.int64), empty
