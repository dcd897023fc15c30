"""Probe kinds: what `wat-probe --probe` fits on one feature matrix (a layer's time means, or a fusion).

Each kind is one `ProbeKind` subclass with a `name`; defining it registers it (`KINDS`). Its fields
are its hyper-parameters, with the defaults of the benchmark whose protocol it follows:

- `linear`: wat's (and the Whisper-AT paper's) layer probe: standardised features, L2 logistic
  regression (`wat.eval.logistic.fit_linear`, shared with wat-train's probe start: sklearn
  multinomial on single-label caches; one-vs-rest, batched in torch, on multi-label ones). Its C /
  max_iter / tol stay `ProbeOptions`' for compatibility.
- `mlp`: X-ARES's "MLP" probe (xares 0.1.3, `xares.models.simple.Mlp` + `xares.trainer.Trainer`):
  LayerNorm + Linear on the mean-pooled frames, Adam at lr 1e-3 annealed by a cosine to lr/10 over 10
  epochs, batch 32, cross-entropy (single-label) or BCE-with-logits (multi-label). No standardisation
  (the LayerNorm is the normalisation).
- `knn`: X-ARES's kNN probe (`xares.trainer.KNN`): L2-normalised features, the k = 10 most
  cosine-similar training clips, weights softmax(similarity / 0.07) over those k, class score = the
  weighted sum of the neighbours' one-hot labels. Multi-label (X-ARES has no kNN there): the same
  weights over the neighbours' many-hot label vectors, i.e. the similarity-weighted label average.

Deviation from X-ARES, on purpose: its MLP keeps the epoch that scores best on the validation split,
which in its k-fold tasks is the evaluation fold itself (`XaresTask.run_mlp` trains on the other folds
and validates on fold k); here the model after the last epoch is scored, so nothing is chosen on the
evaluation data (the cosine schedule ends at lr/10, where the last epoch changes little).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:   # ProbeOptions (`wat.eval.probe`, which imports this module) is named only in annotations
    import torch

KINDS: dict[str, type["ProbeKind"]] = {}


class ProbeKindError(ValueError):
    """An unknown probe kind or a hyper-parameter out of range."""


def _device(opts: "ProbeOptions") -> "torch.device":
    import torch
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class ProbeKind:
    """Base of the probe kinds. A subclass sets `name` and implements `fit_predict`."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            KINDS[cls.name] = cls

    def uses_device(self, multilabel: bool) -> bool:
        """Whether the fit runs on `ProbeOptions.device` (then a CUDA run fits in one process)."""
        return True

    def advice(self, n_train: int) -> str | None:
        """A warning worth logging once for fits on `n_train` training clips (None: nothing to say)."""
        return None

    def fit_predict(self, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, *, n_classes: int,
                    multilabel: bool, opts: "ProbeOptions") -> np.ndarray:
        """Fit on xtr [N, D] float32 with ytr ([N] class indices, or [N, C] bool) and return scores
        [len(xte), n_classes] float32 for xte: class probabilities (single-label), per-class scores
        in [0, 1] (multi-label)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LinearProbe(ProbeKind):
    """Standardised features, L2 logistic regression (C, max_iter, tol from `ProbeOptions`)."""

    name: ClassVar[str] = "linear"

    def uses_device(self, multilabel: bool) -> bool:
        return multilabel   # the single-label fit is sklearn's, on the CPU

    def fit_predict(self, xtr, ytr, xte, *, n_classes, multilabel, opts):
        import torch
        from sklearn.preprocessing import StandardScaler

        from wat.data.heads import probabilities

        from .logistic import fit_linear

        scaler = StandardScaler().fit(xtr)
        xtr, xte = scaler.transform(xtr).astype(np.float32), scaler.transform(xte).astype(np.float32)
        y = ytr if multilabel else np.eye(n_classes, dtype=bool)[ytr]
        device = _device(opts) if multilabel else torch.device("cpu")
        w, b = fit_linear(torch.from_numpy(xtr).to(device), y, multilabel, C=opts.C, max_iter=opts.max_iter,
                          tol=opts.tol)
        return probabilities(torch.from_numpy(xte).to(device) @ w.T + b, multilabel).cpu().numpy()


@dataclass(frozen=True)
class MLPProbe(ProbeKind):
    """X-ARES's MLP probe: LayerNorm + Linear, Adam, cosine-annealed lr, the last epoch's model."""

    name: ClassVar[str] = "mlp"
    lr: float = 1e-3              # Adam's learning rate at the first epoch (X-ARES TaskConfig.learning_rate)
    epochs: int = 10              # passes over the training rows (TaskConfig.epochs)
    batch_size: int = 32          # rows per step, the last step of an epoch takes the rest (TaskConfig.batch_size_train)
    final_lr_fraction: float = 0.1  # the cosine ends at lr x this at the last epoch (Trainer.decay_fraction)

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ProbeKindError(f"mlp: lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ProbeKindError(f"mlp: epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ProbeKindError(f"mlp: batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ProbeKindError(f"mlp: final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}")

    def advice(self, n_train: int) -> str | None:
        # the protocol counts epochs, not steps: a small set gets few optimiser steps and underfits
        # (an ESC-50 fold, 1600 clips, gets 500); say so rather than change the protocol
        steps = self.epochs * -(-n_train // self.batch_size)
        if steps < 300:
            return (f"mlp probe: {steps} optimiser steps per fit ({n_train} training clips, {self.epochs} epochs of "
                    f"batch {self.batch_size}, X-ARES's protocol) may underfit; --mlp-epochs raises them")
        return None

    def lr_at(self, epoch: int) -> float:
        """ignite's CosineAnnealingScheduler as X-ARES attaches it (EPOCH_STARTED, cycle = epochs):
        lr + (lr * f - lr) * (1 - cos(pi * epoch / epochs)) / 2 for epoch 0, 1, ..."""
        if self.epochs == 1:
            return self.lr     # X-ARES attaches no scheduler for a single epoch
        end = self.lr * self.final_lr_fraction
        return self.lr + (end - self.lr) * (1 - math.cos(math.pi * epoch / self.epochs)) / 2

    def fit_predict(self, xtr, ytr, xte, *, n_classes, multilabel, opts):
        import torch
        from torch import nn

        from wat.data.heads import probabilities

        device = _device(opts)
        torch.manual_seed(opts.seed)
        gen = torch.Generator().manual_seed(opts.seed)
        x = torch.from_numpy(np.ascontiguousarray(xtr, np.float32)).to(device)
        y = torch.from_numpy(np.asarray(ytr, np.float32 if multilabel else np.int64)).to(device)
        model = nn.Sequential(nn.LayerNorm(x.shape[1]), nn.Linear(x.shape[1], n_classes)).to(device)
        loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        n = len(x)
        with torch.enable_grad():
            for epoch in range(self.epochs):
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(epoch)
                order = torch.randperm(n, generator=gen).to(device)
                for a in range(0, n, self.batch_size):
                    rows = order[a:a + self.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x[rows]), y[rows]).backward()
                    opt.step()
        del x
        model.eval()
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.ascontiguousarray(xte, np.float32)).to(device))
            return probabilities(logits, multilabel).cpu().numpy()


@dataclass(frozen=True)
class KNNProbe(ProbeKind):
    """X-ARES's kNN probe: cosine similarity, k neighbours, softmax(similarity / temperature)
    weights, class score = the weighted sum of the neighbours' labels. Blocked matrix products on
    `ProbeOptions.device`, never a loop over clips."""

    name: ClassVar[str] = "knn"
    k: int = 10                   # neighbours per test clip (X-ARES KNNTrainer.nb_knn); all training clips if fewer
    temperature: float = 0.07     # softmax temperature on the cosine similarities (KNNTrainer.temperature)
    block_bytes: int = 256 << 20  # memory of one block of the [test, train] similarity matrix

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ProbeKindError(f"knn: k must be an integer >= 1, got {self.k!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ProbeKindError(f"knn: temperature must be a positive number, got {self.temperature!r}")

    def fit_predict(self, xtr, ytr, xte, *, n_classes, multilabel, opts):
        import torch
        import torch.nn.functional as F

        device = _device(opts)
        train = F.normalize(torch.from_numpy(np.ascontiguousarray(xtr, np.float32)).to(device), dim=1)
        test = torch.from_numpy(np.ascontiguousarray(xte, np.float32))
        if multilabel:
            labels = torch.from_numpy(np.asarray(ytr, np.float32)).to(device)          # [N, C] many-hot
        else:
            labels = torch.from_numpy(np.asarray(ytr, np.int64)).to(device)            # [N]
        k = min(self.k, len(train))
        rows = max(1, self.block_bytes // (4 * max(1, len(train))))
        out = torch.empty((len(test), n_classes), dtype=torch.float32)
        with torch.inference_mode():
            for a in range(0, len(test), rows):
                q = F.normalize(test[a:a + rows].to(device), dim=1)
                sims, idx = (q @ train.T).topk(k, dim=1)                               # [b, k], sorted
                # shifted by each row's top similarity, in float64: a tiny temperature (1e-300 passes
                # the CLI's range) is 0 in float32 or overflows sims / T, and softmax(inf, ...) is NaN
                w = torch.softmax((sims - sims[:, :1]).double() / self.temperature, dim=1).float()
                if multilabel:
                    scores = torch.einsum("bk,bkc->bc", w, labels[idx])
                else:
                    scores = torch.zeros((len(q), n_classes), device=device).scatter_add_(1, labels[idx], w)
                out[a:a + len(q)] = scores.cpu()
        return out.numpy()


def resolve(kinds) -> tuple[ProbeKind, ...]:
    """Names ("linear", "mlp", "knn") and/or `ProbeKind` instances -> instances (a name gets its
    kind's defaults); each kind at most once."""
    out = []
    for k in kinds:
        if isinstance(k, str):
            if k not in KINDS:
                raise ProbeKindError(f"unknown probe kind {k!r}; choose from {', '.join(KINDS)}")
            k = KINDS[k]()
        elif not isinstance(k, ProbeKind):
            raise ProbeKindError(f"a probe kind is a name or a ProbeKind, not {k!r}")
        out.append(k)
    names = [k.name for k in out]
    if not out:
        raise ProbeKindError(f"no probe kind given; choose from {', '.join(KINDS)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProbeKindError(f"probe kind(s) {twice} given more than once")
    return tuple(out)


__all__ = ["KINDS", "ProbeKind", "ProbeKindError", "LinearProbe", "MLPProbe", "KNNProbe", "resolve"]
