"""The layer choice of an X-ARES encoder or export: one encoder block, the mean over the blocks, or
every block concatenated along features."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:   # only tensors' own methods are used: parsing a --layer never imports torch
    import torch

LayerChoice = Union[int, str]   # a block (negative: from the last), "mean" or "concat"
CHOICES = ("mean", "concat")


def parse_layer(text) -> LayerChoice:
    """"5", "-1", "mean", "concat" -> the choice; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in CHOICES:
        return s
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"a layer is a block number (negative: from the last), 'mean' or 'concat', not {text!r}") from None


def resolve_layer(layer: LayerChoice, n_layers: int, have: Sequence[int] | None = None) -> tuple[int, ...]:
    """The encoder blocks a choice reads, among `have` (the blocks available, default all
    `n_layers`): one block for an int (-1: the last available), every available block otherwise."""
    have = tuple(range(n_layers)) if have is None else tuple(have)
    layer = parse_layer(layer)
    if isinstance(layer, str):
        return have
    block = have[layer] if -len(have) <= layer < 0 else layer
    if block not in have:
        raise ValueError(f"layer {layer} is not one of the blocks {have[0]}..{have[-1]} available")
    return (block,)


def output_dim(layer: LayerChoice, n_blocks: int, dim: int) -> int:
    return dim * n_blocks if parse_layer(layer) == "concat" else dim


def reduce_layers(x: "torch.Tensor", layer: LayerChoice) -> "torch.Tensor":
    """[B, L, T, D] (the chosen blocks) -> [B, T, D'] (D' = L x D for concat, block by block)."""
    layer = parse_layer(layer)
    if layer == "mean":
        return x.mean(dim=1)
    if layer == "concat":
        return x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return x[:, 0]


def layer_name(layer: LayerChoice) -> str:
    """For class and folder names: 5 -> L5, -1 -> Last, -3 -> Last2Back, "mean" -> LayerMean."""
    layer = parse_layer(layer)
    if isinstance(layer, str):
        return f"Layer{layer.capitalize()}"
    return f"L{layer}" if layer >= 0 else ("Last" if layer == -1 else f"Last{-layer - 1}Back")
