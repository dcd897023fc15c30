"""Training-time augmentation of pooled features, and the consistency-regularisation loss.

Pure torch on whole batches `x [B, L, T, D]` (or time-mean `[B, L, D]`); every random draw comes
from an explicit `torch.Generator` (a CPU one: draws are tiny and then moved to `x.device`), so a
run is reproducible and resumable from the generator's state.

Under torchrun every process holds every N-th clip of a global batch (`Share`): the draws are made
for the whole global batch from the generator all processes share (the same state everywhere) and
each process applies the draws of its own clips, so N processes augment exactly as one process does.

The feature augmentations work in place (`mixup_`, `time_mask_`, `feature_mask_`): at large
width a batch is ~200 MB of f32, and each out-of-place pass (mixup's gather and its result, the
masked copy) held one more batch beside it. The values are those of the out-of-place formulas
(tests/test_augment.py keeps them as the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Share:
    """The clips of a global batch that one process holds (`distributed`): draws are made for all
    `n` clips and this process applies those of `rows`."""
    rows: Tensor   # long [m]: positions in the global batch of this process's clips, ascending
    n: int         # clips in the global batch


def _mine(t: Tensor, share: Share | None) -> Tensor:
    """The draws of this process's clips (all of them without a share)."""
    return t if share is None else t[share.rows]


def smooth_targets(targets: Tensor, eps: float, multilabel: bool = True) -> Tensor:
    """Multi-label: positives 1-eps, negatives eps/C (official Whisper-AT). Single-label: the
    usual (1-eps)*onehot + eps/C, so rows still sum to 1 for cross-entropy."""
    targets = targets.float()
    if eps == 0:
        return targets
    c = targets.shape[-1]
    if multilabel:
        return targets * (1 - eps) + (1 - targets) * (eps / c)
    return targets * (1 - eps) + eps / c


MIX_CHUNK_BYTES = 64 << 20  # mixup reads the rows it mixes in chunks of about this size


def beta(n: int, a: float, b: float, generator: torch.Generator) -> Tensor:
    """n draws of Beta(a, b). torch's Beta takes no generator: seed numpy from ours."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(a, b, n).astype(np.float32))


def mixup_(x: Tensor, targets: Tensor, prob: float, generator: torch.Generator, alpha: float = 10.0, *,
           share: Share | None = None, partners: Callable | None = None):
    """With probability `prob` per clip, replace (x_i, y_i) by lam*(x_i, y_i) + (1-lam)*(x_j, y_j),
    j a random clip of the batch and lam ~ Beta(alpha, alpha); others keep lam = 1.
    Writes into x when it is float32 (heads compute in fp32 anyway; else into an f32 copy).
    `share`: x holds these clips of a larger global batch (draws are made for all of it);
    `partners(positions) -> (x_j f32, y_j)`: the rows of global-batch positions, for partners this
    process does not hold (without it, a partner outside `x` is taken as x's row `position % len(x)`).
    Returns (x as float32, targets, lam [B], partner [B])."""
    n_all = x.shape[0] if share is None else share.n
    lam = beta(n_all, alpha, alpha, generator)
    use = torch.rand(n_all, generator=generator) < prob
    partner = torch.randint(0, n_all, (n_all,), generator=generator)
    lam, use, partner = _mine(lam, share), _mine(use, share), _mine(partner, share)
    n = x.shape[0]
    lam = torch.where(use, lam, torch.ones_like(lam))
    ly = lam.to(targets.device).view(n, 1)
    x = x.float()
    mixed = torch.nonzero(use).flatten()  # rows with lam = 1 stay as they are (lerp(a, b, 1) == b, finite b)
    if partners is not None and len(mixed):
        # the partners' rows as one process has them in its batch, and their targets
        mix, y_partner = partners(partner[mixed])
        targets = targets.float().clone()
        targets[mixed.to(targets.device)] = ly[mixed.to(ly.device)] * targets[mixed.to(targets.device)] + \
            (1 - ly[mixed.to(ly.device)]) * y_partner.to(targets.device).float()
    else:
        if share is not None and n:
            partner = partner % n
        targets = ly * targets.float() + (1 - ly) * targets[partner.to(targets.device)].float()
        mix = x.index_select(0, partner[mixed].to(x.device)) if len(mixed) else None
    if len(mixed):
        rows = mixed.to(x.device)
        # x_i = lerp(x_j, x_i, lam_i), the batched formula's kernel, computed into a copy of the
        # partners x_j taken before any row changes (a row may be both), reading the mixed rows a
        # chunk at a time: the partners' copy + one chunk beside the batch, a few kernels per step
        w = lam[mixed].to(x.device).view((-1,) + (1,) * (x.dim() - 1))
        chunk = max(1, MIX_CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
        for a in range(0, len(rows), chunk):
            mix[a:a + chunk].lerp_(x.index_select(0, rows[a:a + chunk]), w[a:a + chunk])
        x.index_copy_(0, rows, mix)
    return x, targets, lam, partner


def _block_mask(n: int, size: int, max_width: int, generator: torch.Generator) -> Tensor:
    """[n, size] bool, True on one contiguous block per row of width uniform in 0..max_width."""
    max_width = min(max_width, size)
    width = torch.randint(0, max_width + 1, (n,), generator=generator)
    start = (torch.rand(n, generator=generator) * (size - width + 1)).long()
    pos = torch.arange(size)
    return (pos >= start[:, None]) & (pos < (start + width)[:, None])


def time_mask_(x: Tensor, max_width: int, generator: torch.Generator, share: Share | None = None) -> Tensor:
    """Zero up to `max_width` consecutive frames of each clip, in place; the same frames on every
    layer. x [B, L, T, D] (`share`: those clips of a larger global batch). Returns x."""
    if max_width <= 0:
        return x
    n_all = x.shape[0] if share is None else share.n
    m = _mine(_block_mask(n_all, x.shape[2], max_width, generator), share).to(x.device)
    return x.masked_fill_(m[:, None, :, None], 0)


def feature_mask_(x: Tensor, max_width: int, generator: torch.Generator, share: Share | None = None) -> Tensor:
    """Zero up to `max_width` consecutive feature dims of each clip, in place, on every layer and
    frame. x [B, L, T, D] or [B, L, D] (`share`: those clips of a larger global batch). Returns x."""
    if max_width <= 0:
        return x
    n_all = x.shape[0] if share is None else share.n
    m = _mine(_block_mask(n_all, x.shape[-1], max_width, generator), share).to(x.device)
    return x.masked_fill_(m.view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)), 0)


def consistency_loss(views: list[Tensor], multilabel: bool = True) -> Tensor:
    """Mean over ordered pairs (i, j), i != j, of the cross-entropy of view i's probabilities
    against view j's stop-gradient probabilities: sigmoid + BCE (multi-label, averaged over classes)
    or softmax + CE (single-label). Each unordered pair counts in both directions."""
    if len(views) < 2:
        raise ValueError("consistency regularisation needs at least 2 views")
    total, pairs = 0.0, 0
    for i, zi in enumerate(views):
        for j, zj in enumerate(views):
            if i == j:
                continue
            zi, zj = zi.float(), zj.float()
            if multilabel:
                total = total + F.binary_cross_entropy_with_logits(zi, torch.sigmoid(zj).detach())
            else:
                total = total + F.cross_entropy(zi, torch.softmax(zj, -1).detach())
            pairs += 1
    return total / pairs
