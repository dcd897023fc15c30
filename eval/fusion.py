"""The probe's fusion baselines: of one encoder's layers, and of several encoders (the HEAR seed's
ensembles, "The Efficacy of Self-Supervised Speech Models as Audio Representations", HEAR 2021).

Kinds (`wat-probe --fusion`):
  mean     one cache: the mean over its layers (the seed's "fusion" of one model's hidden states);
           several caches: each cache's layer mean, concatenated (the seed's `fusion_cat_...`)
  concat   every layer of every cache, concatenated
  avg      several caches: their layer means averaged (`fusion_avg_...`; equal widths, or --match-width)
  mean_g   `mean` on frames: layer means per frame (caches aligned in time), cut into k groups in time,
           each group's mean concatenated (the seed's `_g` scene embedding, k = 5)
  avg_g    likewise for `avg`

Time: the time-mean fusions use each cache's own time mean (`mean` dataset), which every frame grid
of the same clip averages alike; the `_g` fusions read the frames (`features`) and linearly
interpolate each cache's frames to the reference cache's frame count, as the seed aligns its models.
Width: with `match_width` every cache's layer mean is first linearly interpolated to the reference
cache's width (the seed's optional step); without it `avg` needs equal widths and is skipped with a
note otherwise.

Names: the seed's (`wat.data.fusion.fusion_name`), one letter per model (x HuBERT X-Large, h HuBERT, w wav2vec 2.0,
m WavLM, d data2vec, c CREPE, W Whisper; else the model's first letter; a letter shared by two caches
is numbered among them: W1, W2): `fusion_cat_xwc`, `fusion_avg_xw`, `fusion_cat_xwc_g` (k = 5; `_g3` for k = 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wat.data import fusion as F

if TYPE_CHECKING:
    from wat.data.cache import Cache, CacheMeta

KINDS = ("mean", "concat", "avg", "mean_g", "avg_g")
CROSS_ONLY = ("avg", "avg_g")        # need two caches or more


@dataclass(frozen=True)
class Fused:
    """How a fusion combines its caches (besides which layers): the `Feature.fusion` of fusions."""
    groups: int = 0        # k time groups (the `_g` kinds), 0 = time mean
    frames: int = 0        # `_g`: the frame count every cache is interpolated to
    width: int = 0         # every cache's layer mean interpolated to this width first; 0 = own widths


def model_codes(metas) -> list[str]:
    """One letter per cache for the seed's names (`wat.data.fusion.model_code`), numbered when shared."""
    return F.model_codes([m.model for m in metas], [getattr(m, "encoder", "whisper") for m in metas])


def fusion_name(kind: str, caches: tuple[int, ...], how: Fused, metas) -> str:
    """The seed's name of a fusion, e.g. fusion_cat_xwc_g (letters in the order of the caches)."""
    codes = model_codes(metas)
    base = kind.removesuffix("_g")
    seed = "concat" if base == "concat" else "mean" if len(caches) == 1 else "cat" if base == "mean" else "avg"
    return F.fusion_name(seed, [codes[c] for c in caches], width=how.width, groups=how.groups)


def describe(kind: str, caches: tuple[int, ...], how: Fused, labels: list[str]) -> str:
    """What a fusion is, in words (legend, report, CSV)."""
    who = " + ".join(labels[c] for c in caches)
    base = kind.removesuffix("_g")
    what = {"mean": "layer mean" if len(caches) == 1 else "layer means concatenated",
            "concat": "layer concat" if len(caches) == 1 else "all layers concatenated",
            "avg": "layer means averaged"}[base]
    if how.width:
        what += f", width interpolated to {how.width}"
    if how.groups:
        what += f", {how.groups} time groups of {how.frames}{' aligned' if len(caches) > 1 else ''} frames"
    return what if len(caches) == 1 and len(labels) == 1 else f"{what}, {who}"


def plan(metas, layers: list[tuple[int, ...]], kinds, *, groups: int | None = None, reference: int = 0,
         match_width: bool = False) -> tuple[list[tuple[str, tuple[int, ...], tuple, Fused]], list[str]]:
    """The fusions to probe: (kind, caches, layers per cache, Fused) and notes on those skipped.
    `groups`: k of the `_g` kinds; None: the seed's k (F.GROUPS), the `_g` kinds skipped with a note
    where the reference cache has fewer frames; a k given is refused there (ValueError), since the
    fusion asked for would silently be missing. `reference`: the cache whose frame count (and width,
    with `match_width`) the others follow."""
    out, notes = [], []
    n = len(metas)
    if not 0 <= reference < n:
        raise ValueError(f"the reference cache must be 1..{n}, got {reference + 1}")
    ref = metas[reference]
    k = F.GROUPS if groups is None else groups
    if groups is not None and ref.n_frames < groups and any(kind.endswith("_g") for kind in kinds):
        which = f"the --align-to cache ({reference + 1})" if n > 1 else "the cache"
        raise ValueError(f"--groups {groups}: more time groups than the {ref.n_frames} frames per clip of {which}; "
                         f"give --groups {ref.n_frames} or fewer")
    width = ref.dim if match_width and n > 1 else 0
    for kind in kinds:
        how = Fused(groups=k if kind.endswith("_g") else 0,
                    frames=ref.n_frames if kind.endswith("_g") else 0,
                    width=width if kind != "concat" else 0)
        if how.groups and how.frames < k:
            notes.append(f"{kind} skipped: {k} time groups (the default --groups) need at least {k} frames; the "
                         f"reference cache has {how.frames}")
            continue
        if kind not in CROSS_ONLY:   # each cache's own layers (one layer alone is that layer's probe)
            out += [(kind, (c,), (ls,), Fused(how.groups, metas[c].n_frames if how.groups else 0, 0))
                    for c, ls in enumerate(layers) if len(ls) > 1 or how.groups]
        if n < 2:
            continue
        dims = {metas[c].dim for c in range(n)}
        if kind.startswith("avg") and not how.width and len(dims) > 1:
            notes.append(f"{kind} skipped: averaging needs equal widths and the caches have {sorted(dims)} "
                         "(--match-width interpolates them to the reference cache's)")
            continue
        out.append((kind, tuple(range(n)), tuple(layers), how))
    return out, notes


def time_note(metas, how: Fused, caches) -> str | None:
    """How a `_g` fusion aligned its caches in time (None when every cache already had the frames)."""
    other = sorted({metas[c].n_frames for c in caches} - {how.frames})
    if not how.groups or not other:
        return None
    return (f"frames linearly interpolated in time to {how.frames} per clip (from {', '.join(map(str, other))}), "
            "as the HEAR seed aligns its models")


# ---------------------------------------------------------------- matrices (run in probe workers)

def _layer_mean(cache: "Cache", layers, *, frames: bool) -> np.ndarray:
    """[N, D] (time mean) or [N, T, D] (frames) float32: the mean over `layers` of one cache."""
    from wat.data.cache import dask_view

    v = dask_view(cache, "features" if frames else "mean")
    pos = [cache.meta.layers.index(l) for l in layers]   # encoder block -> position in the cache
    return v[:, pos].astype(np.float32).mean(axis=1).compute(scheduler="synchronous")


def matrix(caches: list["Cache"], kind: str, members: tuple[int, ...], layers, how: Fused) -> np.ndarray:
    """[N, D'] float32 of a mean/avg fusion (and their `_g` variants) over `members`."""
    parts = []
    for c, ls in zip(members, layers):
        x = _layer_mean(caches[c], ls, frames=bool(how.groups))
        if how.groups:
            x = F.interp_time(x, how.frames)
        if how.width:
            x = F.interp_width(x, how.width)
        parts.append(np.asarray(x, np.float32))
    x = np.mean(parts, axis=0) if kind.startswith("avg") else np.concatenate(parts, axis=-1)
    return np.asarray(F.group_means(x, how.groups) if how.groups else x, np.float32)


__all__ = ["KINDS", "Fused", "model_codes", "fusion_name", "describe", "plan", "time_note", "matrix"]
