"""The HEAR seed's ensemble arithmetic ("The Efficacy of Self-Supervised Speech Models as Audio
Representations", HEAR 2021), shared by the probe's cross-encoder fusions (wat.eval.fusion) and the
HEAR ensemble module (wat.extract.hear): linear interpolation of a sequence of frames to another
frame count or onto other frame times, of a feature vector to another width, and the `_g` scene
embedding (k groups in time, each group's mean, concatenated).

Arrays or tensors in, the same kind out (numpy arrays are computed in torch, float32).
"""
from __future__ import annotations

import numpy as np

GROUPS = 5   # the paper's k for the `_g` variant


def model_code(model: str, family: str = "whisper") -> str:
    """One letter for an encoder in the seed's fusion names, the seed's where it has one: x HuBERT
    X-Large, h other HuBERT, w wav2vec 2.0, m WavLM, d data2vec, c CREPE, W Whisper; else the model's
    first letter or digit."""
    name = model.lower()
    for code, test in (("c", "crepe" in name), ("x", "hubert" in name and "xlarge" in name), ("h", "hubert" in name),
                       ("m", "wavlm" in name), ("d", "data2vec" in name), ("w", "wav2vec2" in name),
                       ("W", family == "whisper")):
        if test:
            return code
    base = "".join(ch for ch in name.rsplit("/", 1)[-1] if ch.isalnum())
    return base[:1] or "e"


def model_codes(models, families=None) -> list[str]:
    """model_code per model; a letter shared by several is numbered among them (W1, W2)."""
    codes = [model_code(m, f) for m, f in zip(models, families or ["whisper"] * len(models))]
    return [f"{c}{codes[:i].count(c) + 1}" if codes.count(c) > 1 else c for i, c in enumerate(codes)]


def fusion_name(kind: str, codes, *, width: int = 0, groups: int = 0) -> str:
    """The seed's name of a fusion of the models with these codes: kind "cat" (layer means
    concatenated), "avg" (averaged), "concat" (every layer; not one of the seed's) or "mean" (one
    model's layer mean); `width`: matched width (`_d1024`), `groups`: the `_g` variant (`_g` for the
    seed's k = 5, else `_g3` ...). E.g. fusion_cat_xwc, fusion_cat_xwc_g, fusion_avg_xw_d1024."""
    letters = "".join(codes)
    name = {"concat": f"concat_{letters}", "mean": f"fusion_{letters}"}.get(kind, f"fusion_{kind}_{letters}")
    if width:
        name += f"_d{width}"
    if groups:
        name += "_g" if groups == GROUPS else f"_g{groups}"
    return name


def _torch(x):
    import torch

    return (torch.from_numpy(np.ascontiguousarray(x, np.float32)), True) if isinstance(x, np.ndarray) \
        else (x.float(), False)


def _back(t, was_numpy: bool):
    return t.numpy() if was_numpy else t


def interp_time(x, frames: int):
    """[..., T, D] -> [..., frames, D]: each feature linearly interpolated along time (torch's
    `interpolate(mode="linear", align_corners=False)`, the seed's call: both grids span the same
    clip, frame centres at (j + 0.5) / T of it). T == frames returns the input unchanged."""
    import torch.nn.functional as F

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if x.shape[-2] == frames:
        return x
    t, was_numpy = _torch(x)
    *lead, n, d = t.shape
    flat = t.reshape(-1, n, d).transpose(1, 2)                       # [B, D, T]
    out = F.interpolate(flat, size=frames, mode="linear", align_corners=False)
    return _back(out.transpose(1, 2).reshape(*lead, frames, d), was_numpy)


def interp_at(x, times, at):
    """[..., T, D] frames centred at `times` [T] (ascending) -> [..., len(at), D]: each feature
    linearly interpolated at the times `at` (any unit, the same for both), held at the first / last
    frame outside [times[0], times[-1]] (numpy's `interp`). Frames whose centres are known put another
    model's frames on one model's timestamps (the HEAR ensemble): `interp_time` assumes both grids
    span the clip alike, which frame centres such as 12.5 + 20 j ms vs 10 j ms do not. A time equal to
    a frame's centre returns that frame exactly."""
    import torch

    t, was_numpy = _torch(x)
    times, at = (torch.as_tensor(np.array(v, np.float32) if isinstance(v, np.ndarray) else v, dtype=torch.float32,
                                 device=t.device).reshape(-1) for v in (times, at))
    if times.numel() != t.shape[-2] or times.numel() == 0:
        raise ValueError(f"{t.shape[-2]} frames need as many times, got {times.numel()}")
    if times.numel() == 1:
        return _back(t[..., :1, :].expand(*t.shape[:-2], at.numel(), t.shape[-1]).contiguous(), was_numpy)
    if bool((times.diff() <= 0).any()):
        raise ValueError("frame times must be strictly ascending")
    hi = torch.searchsorted(times, at, right=True).clamp(1, times.numel() - 1)
    lo = hi - 1
    w = ((at - times[lo]) / (times[hi] - times[lo])).clamp(0, 1)[:, None]     # [len(at), 1]
    out = t[..., lo, :] * (1 - w) + t[..., hi, :] * w
    return _back(out, was_numpy)


def interp_width(x, width: int):
    """[..., D] -> [..., width]: the feature axis linearly interpolated (the seed's optional step that
    brings every model to one model's width). D == width returns the input unchanged."""
    import torch.nn.functional as F

    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if x.shape[-1] == width:
        return x
    t, was_numpy = _torch(x)
    *lead, d = t.shape
    out = F.interpolate(t.reshape(-1, 1, d), size=width, mode="linear", align_corners=False)
    return _back(out.reshape(*lead, width), was_numpy)


def group_bounds(frames: int, k: int) -> list[tuple[int, int]]:
    """k contiguous [start, stop) groups covering all `frames` (sizes differ by at most one, the
    longer ones first). The seed's code drops the last frames % k frames instead; here every frame
    counts once."""
    if k < 1 or frames < k:
        raise ValueError(f"cannot split {frames} frames into {k} groups")
    edges = [0]
    for g in range(k):
        edges.append(edges[-1] + frames // k + (g < frames % k))
    return list(zip(edges[:-1], edges[1:]))


def group_means(x, k: int = GROUPS):
    """[N, T, D] -> [N, k * D]: the `_g` scene embedding, the means of k groups of frames in time order,
    concatenated (group 0's D values first). Fewer than k frames are first interpolated to k."""
    if x.shape[-2] < k:
        x = interp_time(x, k)
    t, was_numpy = _torch(x)
    import torch

    out = torch.cat([t[..., a:b, :].mean(-2) for a, b in group_bounds(t.shape[-2], k)], dim=-1)
    return _back(out, was_numpy)


__all__ = ["GROUPS", "model_code", "model_codes", "fusion_name", "interp_time", "interp_at", "interp_width", "group_bounds",
           "group_means"]
