"""Time pooling and layer choice shared by every encoder family: the official Whisper-AT pooling
(`time_parts` windows = torch's `adaptive_avg_pool1d`), applied to any encoder's frames.

Torch and numpy only (no encoder library), so a family module imports it without pulling in another
family's dependencies. `wat.extract.layers` re-exports these names for older callers.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def integer(value) -> int | None:
    """An integer option given as an int, a numpy integer or a decimal string -> int; None for
    anything else (1.5, nan, inf, True), so a bad value is refused, never silently truncated."""
    if isinstance(value, bool):
        return None
    try:
        return int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        return None


def time_parts(n: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """THE time pooling partition: the frames `[start[i], end[i])` whose mean is pooled part i of
    `n` frames split into `parts`, `start = floor(i n / parts)`, `end = ceil((i + 1) n / parts)`.
    These are exactly torch's `adaptive_avg_pool1d` windows (official Whisper-AT pooling, used by
    extraction below); when `parts` does not divide `n`, neighbouring parts share a frame (frame j
    belongs to every part whose span [i n/parts, (i+1) n/parts) overlaps [j, j+1)). The tagger
    pools its windows with the same parts (`wat.tag.grid`)."""
    if n < 1 or parts < 1:
        raise ValueError(f"time_parts needs n >= 1 and parts >= 1, got {n}, {parts}")
    i = np.arange(parts)
    return (i * n) // parts, -((-(i + 1) * n) // parts)


def pool_frames(x: torch.Tensor, frames: int, n_valid: int | Sequence[int] | None) -> torch.Tensor:
    """Layer outputs [B, T, D] -> float32 [B, frames, D]: the means over the `time_parts` of the
    first `n_valid` frames (None = all; a sequence = one count per clip, for a batch padded to its
    longest clip), by the fused kernel whose windows `time_parts` spells out (same numbers as the
    official pooling)."""
    if n_valid is not None and not isinstance(n_valid, int):
        return torch.cat([pool_frames(x[i:i + 1], frames, int(n)) for i, n in enumerate(n_valid)])
    x = x[:, :n_valid].float().transpose(1, 2)
    return F.adaptive_avg_pool1d(x, frames).transpose(1, 2)


def layer_subset(spec, n_blocks: int) -> tuple[int, ...]:
    """`(start, stop)` (either may be None, as in a slice) -> the block indices it names, checked
    against the encoder's `n_blocks`; None -> every block."""
    if spec is None:
        return tuple(range(n_blocks))
    start, stop = spec
    start, stop = 0 if start is None else start, n_blocks if stop is None else stop
    if not 0 <= start < stop <= n_blocks:
        raise ValueError(f"layers {start}:{stop} outside the encoder's {n_blocks} blocks "
                         f"(0:{n_blocks} is all of them)")
    return tuple(range(start, stop))
