"""Audio-tagging heads on pooled Whisper layer features, and their checkpoints.

Input per clip is `[L, T, D]` (layers x pooled frames x width); heads return logits `[B, C]`.
Blocks are openai-whisper's own `ResidualAttentionBlock` (pre-LN attention + 4x GELU MLP).
Attribute names (`down_layer`, `time_tr`, `layer_tr`, `mlp_layer`, `layer_weight`) are those of
the official Whisper-AT code, so an official `at_model.*` state dict maps onto ours by dropping the
prefix.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from whisper.model import ResidualAttentionBlock

KINDS = ("last-mlp", "wa-mlp", "wa-tr", "tl-tr")
TIME_HEADS, LAYER_HEADS = 1, 8
# encoder width -> (layers, size name): official heads carry no per-layer parameter, so an
# official checkpoint's layer count is known only through its width
WHISPER_WIDTHS = {384: (4, "tiny"), 512: (6, "base"), 768: (12, "small"), 1024: (24, "medium"), 1280: (32, "large")}
FORMAT = "wat-head"


class HeadError(ValueError):
    """A checkpoint or head configuration that cannot be used."""


def _classifier(dim: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_classes))


def _projection(dim_in: int, dim: int | None) -> nn.Sequential | None:
    return None if dim is None else nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, dim))


class _Head(nn.Module):
    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers

    def _check(self, x: Tensor, need_time: bool) -> Tensor:
        if x.dim() not in ((4,) if need_time else (3, 4)) or x.shape[1] != self.n_layers:
            want = "[B, L, T, D]" if need_time else "[B, L, T, D] or [B, L, D]"
            raise HeadError(f"{type(self).__name__} expects {want} with L={self.n_layers}, got {list(x.shape)}")
        return x.float()


class LastMLP(_Head):
    """Last layer -> time mean -> LN -> Linear."""

    def __init__(self, n_layers: int, dim_in: int, n_classes: int):
        super().__init__(n_layers)
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)[:, -1]
        return self.mlp_layer(x.mean(1) if x.dim() == 3 else x)


class WAMLP(_Head):
    """Time mean -> learnable weighted average of the layers -> LN -> Linear."""

    def __init__(self, n_layers: int, dim_in: int, n_classes: int):
        super().__init__(n_layers)
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)
        if x.dim() == 4:
            x = x.mean(2)
        x = torch.einsum("bld,l->bd", x, self.layer_weight) / self.layer_weight.sum()
        return self.mlp_layer(x)


class WATr(_Head):
    """Weighted layer average -> [optional LN+Linear to `dim`] -> time block (1 head) -> time mean -> LN -> Linear."""

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, dim: int | None = None):
        super().__init__(n_layers)
        width = dim or dim_in
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.down_layer = _projection(dim_in, dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        x = torch.einsum("bltd,l->btd", x, self.layer_weight) / self.layer_weight.sum()
        if self.down_layer is not None:
            x = self.down_layer(x)
        return self.mlp_layer(self.time_tr(x).mean(1))


class TLTr(_Head):
    """Time-and-layer-wise transformer: [LN+Linear to `dim`] -> time block (1 head) on every
    layer -> time mean -> layer block (8 heads) -> layer mean -> LN -> Linear.
    `dim=None` keeps the encoder width (official mode `tl_tr_1_8`; else `tl_down_tr_{dim}_1_8`)."""

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, dim: int | None = None):
        super().__init__(n_layers)
        width = dim or dim_in
        self.down_layer = _projection(dim_in, dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_HEADS)
        self.layer_tr = ResidualAttentionBlock(width, LAYER_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        if self.down_layer is not None:
            x = self.down_layer(x)
        b, l, t, d = x.shape
        x = self.time_tr(x.reshape(b * l, t, d)).mean(1).reshape(b, l, d)
        return self.mlp_layer(self.layer_tr(x).mean(1))


def build_head(kind: str, n_layers: int, dim_in: int, n_classes: int, dim: int | None = None) -> nn.Module:
    if kind in ("last-mlp", "wa-mlp"):
        if dim is not None:
            raise HeadError(f"{kind} has no projection; --dim applies to wa-tr and tl-tr")
        return (LastMLP if kind == "last-mlp" else WAMLP)(n_layers, dim_in, n_classes)
    if kind in ("wa-tr", "tl-tr"):
        if dim is not None and (dim <= 0 or dim % LAYER_HEADS):
            raise HeadError(f"dim must be a positive multiple of {LAYER_HEADS}, got {dim}")
        return (WATr if kind == "wa-tr" else TLTr)(n_layers, dim_in, n_classes, dim)
    raise HeadError(f"unknown head kind {kind!r}; choose from {', '.join(KINDS)}")


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class HeadInfo:
    """Everything needed to rebuild a head and to check it is fed the features it was trained on."""

    kind: str
    n_layers: int
    dim_in: int
    n_classes: int
    dim: int | None = None
    n_frames: int = 25
    vocab_json: str = ""        # wat.data.labels.Vocabulary.to_json() of the head's outputs
    model: str = ""             # Whisper model the cache came from, e.g. "tiny.en"
    fingerprint: str = ""       # that model's encoder-weights fingerprint ("" = unknown)
    policy: str = "pad30"       # input policy of the features ("pad30" | "trim")
    multilabel: bool = True     # sigmoid outputs (True) or softmax over classes (False)
    primary_classes: int | None = None  # --parent-labels: the first N outputs are the real vocabulary
    thresholds: list[float] | None = None  # optional per-class decision thresholds (set by eval)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def head_from_info(info: HeadInfo) -> nn.Module:
    return build_head(info.kind, info.n_layers, info.dim_in, info.n_classes, info.dim)


def save_head(path, head: nn.Module, info: HeadInfo) -> None:
    """Atomic write of `{format, info (plain dict), state_dict}`; loads with weights_only=True."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    torch.save({"format": FORMAT, "version": 1, "info": info.to_dict(), "state_dict": state}, tmp)
    os.replace(tmp, path)


def official_to_state_dict(state: dict) -> dict:
    """Official Whisper-AT names -> ours: drop `at_model.` (inference package) or `module.`
    (DataParallel training checkpoints); the submodule names are identical."""
    out = {}
    for k, v in state.items():
        for prefix in ("at_model.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def _official_info(state: dict) -> HeadInfo:
    if "layer_tr.attn.query.weight" not in state or "mlp_layer.1.weight" not in state:
        raise HeadError("not a wat head nor an official Whisper-AT TL-Tr head "
                        "(expected at_model.time_tr/layer_tr/mlp_layer keys)")
    n_classes, width = state["mlp_layer.1.weight"].shape
    if "down_layer.1.weight" in state:
        dim, dim_in = state["down_layer.1.weight"].shape
    else:
        dim, dim_in = None, width
    if dim_in not in WHISPER_WIDTHS:
        raise HeadError(f"official head with width {dim_in} matches no Whisper size")
    n_layers, size = WHISPER_WIDTHS[dim_in]
    from wat.data.labels import audioset_vocabulary
    vocab = audioset_vocabulary()
    if n_classes != len(vocab):
        raise HeadError(f"official head has {n_classes} outputs, expected the {len(vocab)} AudioSet classes")
    return HeadInfo("tl-tr", n_layers, dim_in, n_classes, dim, 25, vocab.to_json(),
                    model=f"whisper-at:{size}", fingerprint="", policy="pad30", multilabel=True)


def load_head(path, n_layers: int | None = None, map_location="cpu") -> tuple[nn.Module, HeadInfo]:
    """Load one of our heads or an official Whisper-AT head (`at_model.*`, modes `tl_tr_1_8` and
    `tl_down_tr_512_1_8`; logits over the 527 AudioSet classes). `n_layers`: the layer count of
    the features it will see; a different one is a HeadError."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise HeadError(f"{path}: cannot read head checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise HeadError(f"{path}: not a head checkpoint")
    if obj.get("format") == FORMAT:
        info, state = HeadInfo.from_dict(obj["info"]), obj["state_dict"]
    else:
        state = official_to_state_dict(obj)
        try:
            info = _official_info(state)
        except HeadError as e:
            raise HeadError(f"{path}: {e}") from None
    if n_layers is not None and n_layers != info.n_layers:
        raise HeadError(f"{path}: head expects {info.n_layers}-layer features "
                        f"(width {info.dim_in}), the features have {n_layers} layers")
    head = head_from_info(info)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HeadError(f"{path}: weights do not fit a {info.kind} head: {e}") from None
    return head.eval(), info
