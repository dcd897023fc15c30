"""Encoder frames pooled onto absolute time windows `[k*res, (k+1)*res)`.

Whisper's transcription seeks by decoded timestamps, so its 30 s encoder windows start at arbitrary
offsets and overlap. Here every encoder frame is placed by its absolute position in the file, so a
tag window covers the same stretch of audio whatever the transcription did. A window holds the
encoder frames of its stretch as a clip of that length holds them in the cache (frame j of the
window starts at mel frame 2j after the window start; a frame of an odd-seek call counts as the
frame slot it starts in), and is pooled into `n_frames` parts by the same partition as extraction
(`wat.extract.layers.time_parts`: 25 parts of 0.4 s for a 10 s window, as in the training cache).
So a head applied here sees what it was trained on, also for windows whose frame count `n_frames`
does not divide (a 7.3 s file, the last partial window, `res != 10`). When some parts have no
frame (a window that `clip_timestamps` only partly covers), the non-empty parts are stretched over
the `n_frames` (nearest neighbour): the window is tagged from the frames it has.
"""
from __future__ import annotations

import math

import torch
from whisper.audio import FRAMES_PER_SECOND

from wat.extract.layers import time_parts

from . import MIN_RES  # noqa: F401  (defined without torch, for wat-tag --help)



class WindowPool:
    """Running sums of encoder frames per (window, part), fed one encoder call at a time.

    `content_frames` is the audio length in mel frames (10 ms); `duration` (seconds) is where the
    last window ends. Where two successive calls overlap, the frames of the later call are used.
    A window is handed out once, when no later call can reach it (whisper seeks forward); frames
    that arrive for a window already handed out are ignored."""

    def __init__(self, content_frames: int, duration: float, res: float, n_frames: int = 25):
        if not res >= MIN_RES:
            raise ValueError(f"time resolution must be at least {MIN_RES} s, got {res}")
        self.content_frames, self.duration, self.n_frames = content_frames, duration, n_frames
        self.res = res
        self.res_mel = round(res * FRAMES_PER_SECOND, 6)  # 0.3 s -> 30.0, not 30.000000000000004
        self.n_windows = max(1, math.ceil(content_frames / self.res_mel - 1e-9))
        self._sums: dict[int, torch.Tensor] = {}    # k -> [n_frames, L, D] float32, on the features' device
        self._counts: dict[int, torch.Tensor] = {}  # k -> [n_frames] int64, CPU
        self._done: set[int] = set()
        self._pending: tuple[int, torch.Tensor] | None = None

    def bounds(self, k: int) -> tuple[float, float]:
        """Window k in seconds; the last one ends at `duration`."""
        start = round(k * self.res, 6)
        end = self.duration if k == self.n_windows - 1 else round((k + 1) * self.res, 6)
        return float(start), float(end)

    def add_call(self, seek: int, size: int, feats: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """One encoder call on mel frames [seek, seek + size): `feats` [ceil(size/2), L, D] are its
        block outputs for those frames (frame j starts at mel frame seek + 2j). Returns the windows
        finished so far, as `finish` does."""
        self._commit(seek, size)
        self._pending = (seek, feats)
        return self._finish(before=seek)

    def close(self) -> list[tuple[int, torch.Tensor]]:
        """After the last call: every window that has frames and was not handed out yet."""
        self._commit()
        return self._finish()

    def slots(self, k: int) -> tuple[int, int]:
        """(first frame slot, number of slots) of window k: the encoder frames a clip of the
        window's length has (slot s starts at mel frame 2s)."""
        first = math.ceil(k * self.res_mel / 2 - 1e-9)
        end = math.ceil(min((k + 1) * self.res_mel, self.content_frames) / 2 - 1e-9)
        return first, max(1, end - first)

    def place(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute frame starts (mel frames) -> (window, frame slot within the window)."""
        k = torch.floor(starts.double() / self.res_mel).long().clamp_(0, self.n_windows - 1)
        j = torch.div(starts, 2, rounding_mode="floor").long()
        for w in k.unique().tolist():
            first, n = self.slots(w)
            sel = k == w
            j[sel] = (j[sel] - first).clamp_(0, n - 1)
        return k, j

    def _commit(self, next_seek: int | None = None, next_size: int = 0) -> None:
        # add the previous call's frames, except those the next call covers again
        if self._pending is None:
            return
        seek, feats = self._pending
        self._pending = None
        starts = seek + 2 * torch.arange(len(feats))
        if next_seek is not None:
            keep = (starts < next_seek) | (starts >= next_seek + next_size)
            starts, feats = starts[keep], feats[keep.to(feats.device)]
        k, j = self.place(starts)
        for w in k.unique().tolist():
            if w in self._done:
                continue
            sel = (k == w).nonzero().squeeze(1)
            start, end = (torch.from_numpy(b) for b in time_parts(self.slots(w)[1], self.n_frames))
            member = (start[:, None] <= j[sel][None]) & (j[sel][None] < end[:, None])  # [parts, frames]
            if w not in self._sums:
                self._sums[w] = feats.new_zeros((self.n_frames, *feats.shape[1:]), dtype=torch.float32)
                self._counts[w] = torch.zeros(self.n_frames, dtype=torch.long)
            x = feats[sel.to(feats.device)].float()
            self._sums[w] += torch.einsum("pn,nld->pld", member.to(x.device, x.dtype), x)
            self._counts[w] += member.sum(1)

    def _finish(self, before: float = math.inf) -> list[tuple[int, torch.Tensor]]:
        """Hand out the windows with frames that end at or before mel frame `before`, as
        (k, [L, n_frames, D] float32) in time order."""
        out = []
        for w in sorted(self._sums):
            if min((w + 1) * self.res_mel, self.content_frames) > before:
                break
            sums, counts = self._sums.pop(w), self._counts.pop(w)
            self._done.add(w)
            filled = counts.nonzero().squeeze(1)
            # all parts filled: identity; else stretch the filled ones over the n_frames
            pick = filled[torch.linspace(0, len(filled) - 1, self.n_frames).round().long()]
            mean = sums / counts.clamp(min=1).to(sums.device)[:, None, None]
            out.append((w, mean[pick.to(sums.device)].transpose(0, 1)))
        return out
