"""Head kinds: the `Head` base class and its registry (defining a subclass with a `kind` registers
it), the four Whisper-AT heads, `build_head` and the one logits -> probabilities function.

Input per clip is `[L, T, D]` (layers x pooled frames x width); heads return logits `[B, C]`.
Attribute names (`down_layer`, `time_tr`, `layer_tr`, `mlp_layer`, `layer_weight`) are those of
the official Whisper-AT code, so an official `at_model.*` state dict maps onto ours by dropping the
prefix."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import WatError
from .names import LAYER_ATTN_HEADS, TIME_ATTN_HEADS
from .blocks import ResidualAttentionBlock

TIME_HEADS, LAYER_HEADS = TIME_ATTN_HEADS, LAYER_ATTN_HEADS  # the old names of these attention-head counts


class HeadError(WatError, ValueError):
    """A checkpoint or head configuration that cannot be used."""


HEADS: dict[str, type["Head"]] = {}  # kind name -> class, filled by defining a Head subclass


def _classifier(width: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_classes))


def _projection(dim_in: int, proj_dim: int | None) -> nn.Sequential | None:
    return None if proj_dim is None else nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, proj_dim))


class Head(nn.Module):
    """Base of every head kind. A subclass sets `kind` (its name in checkpoints and on the command
    line) and `field` (the cache dataset it is trained and evaluated on), and takes
    `(n_layers, dim_in, n_classes, proj_dim=None)`; `proj_dim`, the projection width, is refused
    unless the class sets `projects`."""

    kind: str = ""
    field: str = "features"     # "features" ([B, L, T, D]) or "mean" ([B, L, D], T times smaller)
    projects: bool = False      # accepts a projection width `proj_dim`
    # the kind's default learning rate in wat-train with every other option at its default (the default
    # batch included), chosen by measurement: bench/head_defaults.py on the demo set, table in
    # BENCHMARKS.md ("Default training recipe"); TL-Tr keeps the paper's 1e-4 (it measured best there
    # too). None (a kind registered elsewhere without one): wat-train searches it (--lr auto)
    lr: float | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.field not in ("features", "mean"):
                raise HeadError(f"{cls.__name__}.field must be 'features' or 'mean', not {cls.field!r}")
            HEADS[cls.kind] = cls

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers

    @classmethod
    def check_dim(cls, proj_dim: int | None, what: str = "--proj-dim") -> None:
        """`what` names where the width came from: the option, or a head file's info."""
        if proj_dim is not None and not cls.projects:
            raise HeadError(f"{what} {proj_dim}: {cls.kind} has no projection (only "
                            + " and ".join(k for k, c in HEADS.items() if c.projects) + " have one)")

    def _check(self, x: Tensor, need_time: bool) -> Tensor:
        if x.dim() not in ((4,) if need_time else (3, 4)) or x.shape[1] != self.n_layers:
            want = "[B, L, T, D]" if need_time else "[B, L, T, D] or [B, L, D]"
            raise HeadError(f"{type(self).__name__} expects {want} with L={self.n_layers}, got {list(x.shape)}")
        return x.float()


class _TransformerHead(Head):
    projects = True

    @classmethod
    def check_dim(cls, proj_dim: int | None, what: str = "--proj-dim") -> None:
        if proj_dim is not None and (proj_dim <= 0 or proj_dim % LAYER_ATTN_HEADS):
            raise HeadError(f"{what} {proj_dim}: the projection width must be a positive multiple of {LAYER_ATTN_HEADS}")


class LastMLP(Head):
    """Last layer -> time mean -> LN -> Linear."""

    kind, field = "last-mlp", "mean"
    lr = 1e-2

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)[:, -1]
        return self.mlp_layer(x.mean(1) if x.dim() == 3 else x)


class WAMLP(Head):
    """Time mean -> learnable weighted average of the layers -> LN -> Linear."""

    kind, field = "wa-mlp", "mean"
    lr = 1e-2

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)
        if x.dim() == 4:
            x = x.mean(2)
        x = torch.einsum("bld,l->bd", x, self.layer_weight) / self.layer_weight.sum()
        return self.mlp_layer(x)


class WATr(_TransformerHead):
    """Weighted layer average -> [optional LN+Linear to `proj_dim`] -> time block (1 head) -> time mean -> LN -> Linear."""

    kind = "wa-tr"
    lr = 3e-4

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        width = proj_dim or dim_in
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.down_layer = _projection(dim_in, proj_dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_ATTN_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        x = torch.einsum("bltd,l->btd", x, self.layer_weight) / self.layer_weight.sum()
        if self.down_layer is not None:
            x = self.down_layer(x)
        return self.mlp_layer(self.time_tr(x).mean(1))


class TLTr(_TransformerHead):
    """Time-and-layer-wise transformer: [LN+Linear to `proj_dim`] -> time block (1 head) on every
    layer -> time mean -> layer block (8 heads) -> layer mean -> LN -> Linear.
    `proj_dim=None` keeps the encoder width (official mode `tl_tr_1_8`; else `tl_down_tr_{proj_dim}_1_8`)."""

    kind = "tl-tr"
    lr = 1e-4

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        width = proj_dim or dim_in
        if width % LAYER_ATTN_HEADS:  # every Whisper width is a multiple; other encoders' need not be (CREPE, ...)
            raise HeadError(f"{self.kind} on features {dim_in} wide: its layer block has {LAYER_ATTN_HEADS} attention "
                            f"heads, so the width must be a multiple of {LAYER_ATTN_HEADS}; project the features "
                            f"with --proj-dim (a multiple of {LAYER_ATTN_HEADS})")
        self.down_layer = _projection(dim_in, proj_dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_ATTN_HEADS)
        self.layer_tr = ResidualAttentionBlock(width, LAYER_ATTN_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        if self.down_layer is not None:
            x = self.down_layer(x)
        b, l, t, d = x.shape
        x = self.time_tr(x.reshape(b * l, t, d)).mean(1).reshape(b, l, d)
        return self.mlp_layer(self.layer_tr(x).mean(1))


def head_class(kind: str) -> type[Head]:
    try:
        return HEADS[kind]
    except KeyError:
        raise HeadError(f"unknown head kind {kind!r}; choose from {', '.join(HEADS)}") from None


def head_field(kind: str) -> str:
    """The cache dataset (`features` or `mean`) a head of this kind reads."""
    return head_class(kind).field


def build_head(kind: str, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None,
               what: str = "--proj-dim") -> nn.Module:
    """`what`: where `proj_dim` came from, for the error message (the option, or a head file's info)."""
    cls = head_class(kind)
    cls.check_dim(proj_dim, what)
    return cls(n_layers, dim_in, n_classes, proj_dim)


def probabilities(logits: Tensor, multilabel: bool, n: int | None = None) -> Tensor:
    """Logits [B, C] -> probabilities [B, n] (fp32): sigmoid per class for multi-label heads,
    softmax over all C outputs for single-label ones; `n` keeps the first n outputs (a
    --parent-labels head's vocabulary comes first, its parent labels after)."""
    z = logits.float()
    p = torch.sigmoid(z) if multilabel else torch.softmax(z, -1)
    return p if n is None else p[:, :n]


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
