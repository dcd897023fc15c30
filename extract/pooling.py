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


class LayerTaps:
    """Forward hooks on an encoder's blocks that keep each block's output of the latest encoder call,
    pooled to `frames` windows over its first `n_valid` frames (None = all; a per-clip list for a
    padded batch); `layers`: only these blocks. `blocks`: the encoder's list of blocks (default
    `encoder.blocks`, openai-whisper's; transformers' speech encoders: `encoder.layers`); a block
    that returns a tuple (WavLM: output, position bias) is tapped at its first element.

        with LayerTaps(model.encoder, 25, n_valid=250) as taps:
            model.encoder(mel)
        taps.pooled                      # [B, L, frames, D] float32, of the latest call

    Pooling inside the hooks means full-resolution activations never outlive their block.
    `n_valid` may be changed between calls. The result stays on the encoder's device. The hooks are
    removed on exit; a model with taps attached should not be used from several threads at once.
    """

    def __init__(self, encoder, frames: int = 25, n_valid: int | Sequence[int] | None = None, layers=None,
                 blocks=None):
        self.encoder, self.frames, self.n_valid = encoder, frames, n_valid
        self.blocks = encoder.blocks if blocks is None else blocks
        self._pooled: torch.Tensor | None = None
        self.layers = range(len(self.blocks)) if layers is None else layers  # blocks tapped, in order
        self._current: list[torch.Tensor] = []
        self._handles = []

    def _start(self, module, args):
        self._current = []

    def _tap(self, module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        self._current.append(pool_frames(output, self.frames, self.n_valid))

    def _finish(self, module, args, output):
        self._pooled = torch.stack(self._current, dim=1)
        self._current = []

    def __enter__(self) -> "LayerTaps":
        self._handles = [self.encoder.register_forward_pre_hook(self._start)]
        self._handles += [self.blocks[i].register_forward_hook(self._tap) for i in self.layers]
        self._handles.append(self.encoder.register_forward_hook(self._finish))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def pooled(self) -> torch.Tensor:
        if self._pooled is None:
            raise RuntimeError("LayerTaps: the encoder has not been called inside the block")
        return self._pooled
