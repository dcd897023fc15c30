"""The HEAR seed's ensemble as a HEAR 2021 model: several encoders, each the mean of its layers per
frame (what `wat.extract.hear` serves for one encoder), aligned in time and fused.

    model = wat.extract.hear.load_model("facebook/hubert-xlarge-ll60k+facebook/wav2vec2-large-lv60+crepe-full")

Timestamp embeddings live on the FIRST member's grid: its frames and timestamps as they are; every
other member's frames are linearly interpolated in time onto those timestamps from its own frame
centres (`wat.data.fusion.interp_at`; held at its first / last frame outside its own span), optionally
each brought to the first member's width (`match_width`, the seed's optional step), then
concatenated ("cat", the seed's `fusion_cat_...`) or averaged ("avg"). Frame centres differ by
family (`Encoder.timestamps`): the wav2vec2 family 12.5 + 20 j ms, Whisper 10 + 20 j ms, CREPE
10 j ms; for a 2 s clip that is 99, 100 and 201 frames. The seed's own code interpolates frame
counts instead (`interp_time`, as if every grid spanned the clip alike): on a 2 s clip it reads
CREPE 22 ms and Whisper 17 ms away from the last wav2vec2 frame it is fused with.
Scene embeddings: each member's own time mean (of its native frames, not interpolated),
concatenated or averaged - the seed's intra-model aggregation + inter-model concatenation, as
wat-probe's cross-cache `mean` fusion (the seed's code takes the time mean of its interpolated
frames instead); with `groups=k` the `_g` variant: the fused timestamp embeddings cut into k groups
in time, each group's mean, concatenated. Put the model whose frame grid you want first (the seed
aligns to wav2vec 2.0). The seed's submitted `fusion_cat_xwc` also interpolated every model's width
to wav2vec 2.0's (3 x 1024 wide): `match_width=True` with the wav2vec2 model first; without it the
widths add up. Its layer mean also counted transformers' `hidden_states[0]` (the input of the first
block); wat's layers are the blocks' outputs only, as everywhere in wat. A clip shorter than some member's
`min_samples` raises `ShortClipError` naming those members, before any member runs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wat.data import fusion as F

from .encoders import ShortClipError

SEPARATOR = "+"
FUSIONS = ("cat", "avg")


def is_ensemble(spec: str) -> bool:
    """"a+b": an ensemble (a file or folder whose own name holds a "+" is one model)."""
    from pathlib import Path

    return SEPARATOR in str(spec) and not Path(str(spec)).exists()


Embed = Callable[[torch.Tensor, nn.Module], tuple[torch.Tensor, torch.Tensor]]


class EnsembleHEAR(nn.Module):
    """HEAR models (`wat.extract.hear` models, one per encoder) fused as the seed does. `embed`: a
    member's (timestamp embeddings, timestamps) - `wat.extract.hear.get_timestamp_embeddings`, which
    hands it in (this module does not import it back)."""

    def __init__(self, members: list[nn.Module], embed: Embed, *, fusion: str = "cat", groups: int = 0,
                 match_width: bool = False):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two models (joined with '+')")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or not 0 <= groups <= 1000:
            raise ValueError(f"groups must be an integer in 0..1000 (0: the time mean), got {groups!r}")
        rates = {m.sample_rate for m in members}
        if len(rates) > 1:
            raise ValueError(f"the models take audio at different sample rates {sorted(rates)}")
        widths = [int(m.timestamp_embedding_size) for m in members]
        if fusion == "avg" and not match_width and len(set(widths)) > 1:
            raise ValueError(f"fusion 'avg' needs equal widths, the models have {widths}: pass match_width=True "
                             "to interpolate them to the first model's")
        self.members = nn.ModuleList(members)
        self.embed = embed
        self.fusion, self.groups = fusion, groups
        self.width = widths[0] if match_width else 0
        self.sample_rate = rates.pop()
        self.min_samples = max(_min_samples(m) for m in members)   # the fewest samples every member takes
        each = [self.width or w for w in widths]
        self.timestamp_embedding_size = sum(each) if fusion == "cat" else each[0]
        self.scene_embedding_size = self.timestamp_embedding_size * (groups or 1)
        codes = F.model_codes([getattr(m, "name", "") for m in members],
                              [getattr(m, "family", "whisper") for m in members])
        self.name = F.fusion_name(fusion, codes, width=self.width, groups=groups)   # the seed's, e.g. fusion_cat_xwc

    def _width(self, emb: torch.Tensor) -> torch.Tensor:
        return F.interp_width(emb.float(), self.width) if self.width else emb.float()

    def _fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=-1) if self.fusion == "cat" else torch.stack(parts).mean(0)

    def _members(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each member's (timestamp embeddings [n, T_m, D_m], timestamps [n, T_m]); a clip too short for
        any member is refused before the first one runs (HuBERT X-Large would run for nothing)."""
        if audio.shape[-1] < self.min_samples:
            short = [m for m in self.members if _min_samples(m) > audio.shape[-1]]
            names = ", ".join(repr(getattr(m, "name", type(m).__name__)) for m in short)
            raise ShortClipError(audio.shape[-1], getattr(short[0], "policy", "trim"), self.min_samples,
                                 sample_rate=self.sample_rate, why=f"ensemble member(s) {names} compute no frame "
                                 "of a shorter clip")
        return [self.embed(audio, m) for m in self.members]

    def timestamp_embeddings(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self._members(audio)
        first, timestamps = outs[0]
        grid = timestamps[0]                       # equal-length clips: one grid for the batch
        parts = [self._width(first)] + [self._width(F.interp_at(emb, ts[0], grid)) for emb, ts in outs[1:]]
        return self._fuse(parts), timestamps

    def scene_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        if self.groups:
            emb, _ = self.timestamp_embeddings(audio)
            return F.group_means(emb, self.groups)
        return self._fuse([self._width(emb.mean(1)) for emb, _ in self._members(audio)])

    def extra_repr(self) -> str:
        return f"{self.name}: {self.fusion}, groups={self.groups}, width={self.width or 'own'}"


def _min_samples(member: nn.Module) -> int:
    return int(getattr(member, "min_samples", 1))


def load(spec: str, load_member: Callable[[str], nn.Module], embed: Embed, *, fusion: str = "cat", groups: int = 0,
         match_width: bool = False) -> EnsembleHEAR:
    """"a+b+c" -> EnsembleHEAR of load_member("a"), load_member("b"), ... (`wat.extract.hear` passes its
    own load_model and get_timestamp_embeddings)."""
    names = [s.strip() for s in str(spec).split(SEPARATOR)]
    if any(not n for n in names):
        raise ValueError(f"empty model name in ensemble {spec!r}")
    return EnsembleHEAR([load_member(n) for n in names], embed, fusion=fusion, groups=groups,
                        match_width=match_width).eval()
