"""The HEAR seed's ensemble as a HEAR 2021 model: several encoders, each the mean of its layers per
frame (what `wat.extract.hear` serves for one encoder), aligned in time and fused.

    model = wat.extract.hear.load_model("facebook/hubert-xlarge-ll60k+facebook/wav2vec2-large-lv60+crepe-full")

Timestamp embeddings: every member's frames are linearly interpolated in time to the first member's
frame count (`wat.data.fusion.interp_time`, the seed's alignment: each sequence spans the same clip),
optionally each to the first member's width (`match_width`, the seed's optional step), then
concatenated ("cat", the seed's `fusion_cat_...`) or averaged ("avg"); the timestamps are the first
member's. Scene embeddings: the time mean of those, or with `groups=k` the `_g` variant (k groups in
time, each group's mean, concatenated). Put the model whose frame grid you want first (the seed
aligns to wav2vec 2.0; the wav2vec2 family and Whisper all have 20 ms frames).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wat.data import fusion as F

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
        each = [self.width or w for w in widths]
        self.timestamp_embedding_size = sum(each) if fusion == "cat" else each[0]
        self.scene_embedding_size = self.timestamp_embedding_size * (groups or 1)
        codes = F.model_codes([getattr(m, "name", "") for m in members],
                              [getattr(m, "family", "whisper") for m in members])
        self.name = F.fusion_name(fusion, codes, width=self.width, groups=groups)   # the seed's, e.g. fusion_cat_xwc

    def timestamp_embeddings(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [self.embed(audio, m) for m in self.members]
        frames, timestamps = outs[0][0].shape[1], outs[0][1]
        parts = []
        for emb, _ in outs:
            emb = F.interp_time(emb.float(), frames)
            parts.append(F.interp_width(emb, self.width) if self.width else emb)
        fused = torch.cat(parts, dim=-1) if self.fusion == "cat" else torch.stack(parts).mean(0)
        return fused, timestamps

    def scene_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        emb, _ = self.timestamp_embeddings(audio)
        return F.group_means(emb, self.groups) if self.groups else emb.mean(1)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.fusion}, groups={self.groups}, width={self.width or 'own'}"


def load(spec: str, load_member: Callable[[str], nn.Module], embed: Embed, *, fusion: str = "cat", groups: int = 0,
         match_width: bool = False) -> EnsembleHEAR:
    """"a+b+c" -> EnsembleHEAR of load_member("a"), load_member("b"), ... (`wat.extract.hear` passes its
    own load_model and get_timestamp_embeddings)."""
    names = [s.strip() for s in str(spec).split(SEPARATOR)]
    if any(not n for n in names):
        raise ValueError(f"empty model name in ensemble {spec!r}")
    return EnsembleHEAR([load_member(n) for n in names], embed, fusion=fusion, groups=groups,
                        match_width=match_width).eval()
