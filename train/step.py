"""One training step: label smoothing, mixup, K masked views, supervised + consistency loss, and the
optimiser and mixed-precision set-up it runs with."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import augment


@dataclass
class StepConfig:
    multilabel: bool
    time_mask: int                  # up to this many frames masked (0 for heads on the time mean)
    feature_mask: int               # up to this many feature dims masked
    mixup: float                    # probability per clip
    label_smoothing: float
    cr_views: int = 1               # masked views per clip (>1: consistency regularisation)
    cr_weight: float = 1.0          # weight of the labeled views' consistency loss
    cr_unlabeled_weight: float = 1.0  # weight of the unlabeled views' consistency loss


def amp(device: torch.device):
    """(autocast context, GradScaler or None) for the device: bf16 (or fp16 with a scaler) on CUDA,
    plain fp32 elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _mask_(x: torch.Tensor, cfg: StepConfig, gen: torch.Generator, share: augment.Share | None = None) -> torch.Tensor:
    """x with its time (features only) and feature masks applied, in place."""
    if x.dim() == 4:
        augment.time_mask_(x, cfg.time_mask, gen, share)
    return augment.feature_mask_(x, cfg.feature_mask, gen, share)


def _views(parts: list[tuple], cfg: StepConfig, gen: torch.Generator) -> torch.Tensor:
    """The forward pass's input: for each (x, k, share) of `parts`, k independently masked copies of
    x, concatenated on the batch axis (one forward pass), masks drawn in that order (for the whole
    global batch when x is a `share` of one). One view of one batch is that batch masked in place
    (train_step owns its batch); several are copies written straight into the result (no masked
    copy per view and a concatenation of them)."""
    if len(parts) == 1 and parts[0][1] == 1:
        return _mask_(parts[0][0], cfg, gen, parts[0][2])
    first = parts[0][0]
    dtype = functools.reduce(torch.promote_types, [x.dtype for x, _, _ in parts])
    out = torch.empty((sum(len(x) * k for x, k, _ in parts),) + tuple(first.shape[1:]), dtype=dtype,
                      device=first.device)
    at = 0
    for x, k, share in parts:
        for _ in range(k):
            _mask_(out[at:at + len(x)].copy_(x), cfg, gen, share)
            at += len(x)
    return out


def supervised_loss(logits, targets, multilabel: bool):
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    return F.cross_entropy(logits.float(), targets)


@dataclass(frozen=True)
class Shares:
    """A data-parallel step (`distributed`): which clips of the global batch this process holds, of
    the labeled batch and of the unlabeled one, and where the rows of mixup partners it does not
    hold come from (`augment.mixup_`; None: partners among its own rows)."""
    labeled: augment.Share
    unlabeled: augment.Share | None = None
    partners: object = None


def train_step(head, opt, x, targets, cfg: StepConfig, gen: torch.Generator, *, scaler=None,
               autocast=None, unlabeled: torch.Tensor | None = None, reduce=None,
               shares: Shares | None = None) -> torch.Tensor:
    """One optimiser step on a batch: smoothing, mixup (shared by the views), K masked views,
    supervised loss averaged over views + CR on the labeled and the unlabeled views.
    The step owns `x`: augmentation writes into it (mixup into an f32 copy when x is not f32),
    so a caller must not reuse a batch after its step. The trainer's batches are fresh tensors or
    reader buffers that the reader refills only once nothing references them (wat.data.cache.store).
    Data-parallel runs pass `reduce(n) -> global count` and `shares`: the augmentation draws are
    made for the whole global batch (every process draws the same) and the loss backpropagated is
    this process's share of the global-batch means, labeled and unlabeled parts weighted by their
    clip counts; `reduce` turns the gradients into those of the global-batch mean (n may be 0).
    Returns the (detached) loss without a host sync: the batch mean, or with `reduce` this rank's
    share of the global-batch mean (the shares of all ranks add up to it)."""
    opt.zero_grad(set_to_none=True)
    n = x.shape[0]
    u = 0 if unlabeled is None else unlabeled.shape[0]
    loss = torch.zeros((), device=x.device)
    if n or u or shares is not None:  # a process with no clip still makes the step's draws
        lab, unl = _loss(head, x, targets, cfg, gen, autocast, unlabeled, shares)
        if shares is None:
            loss = lab + unl
        else:  # sum of this process's clip losses, in units of the global labeled count
            uw = shares.labeled.n * u / shares.unlabeled.n if u else 0.0
            loss = lab * n + unl * uw
        if n or u:
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None and not (n or u):
        scaler.scale(loss)  # initialises the scaler on a rank that had no clip for this step
    if reduce is not None:
        loss = loss / reduce(n)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.detach()


def _loss(head, x, targets, cfg: StepConfig, gen, autocast, unlabeled, shares: Shares | None = None):
    """(labeled part, unlabeled part) of the step's loss, each a mean over its clips (0 without clips)."""
    share = shares.labeled if shares is not None else None
    y = augment.smooth_targets(targets, cfg.label_smoothing, cfg.multilabel)
    if cfg.mixup > 0:
        x, y, _, _ = augment.mixup_(x, y, cfg.mixup, gen, share=share,
                                    partners=shares.partners if shares is not None else None)
    k = max(1, cfg.cr_views)
    n = x.shape[0]
    parts = [(x, k, share)]
    if unlabeled is not None:  # no mixup on the unlabeled part; its views differ by their masks
        parts.append((unlabeled, max(2, k), shares.unlabeled if shares is not None else None))
    xv = _views(parts, cfg, gen)
    zero = torch.zeros((), device=x.device)
    if not len(xv):
        return zero, zero
    with autocast or contextlib.nullcontext():
        logits = head(xv).float()
    loss = zero
    if n:
        lab = logits[: n * k]
        loss = supervised_loss(lab, y.repeat(k, 1), cfg.multilabel)
        if k > 1:
            loss = loss + cfg.cr_weight * augment.consistency_loss(list(lab.split(n)), cfg.multilabel)
    unl = zero
    if unlabeled is not None and len(unlabeled):
        views_u = list(logits[n * k:].split(unlabeled.shape[0]))
        unl = cfg.cr_unlabeled_weight * augment.consistency_loss(views_u, cfg.multilabel)
    return loss, unl


def make_optimizer(head, lr: float) -> torch.optim.Adam:
    fused = next(head.parameters()).is_cuda  # one kernel for all parameters: small heads are launch-bound
    return torch.optim.Adam(head.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=5e-7, fused=fused or None)
