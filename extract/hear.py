"""HEAR 2021 API over any encoder's layers (check with `hear-validator wat.extract.hear -m tiny.en`).

Timestamp embeddings are the encoder's native frames themselves (`Encoder.all_frames`: Whisper and
the wav2vec2 family one per 20 ms, CREPE one per hop), each the mean (or concatenation) of the chosen
layers' outputs (Whisper: before `ln_post`); timestamps are the frames' centres
(`Encoder.timestamps`: Whisper 10, 30, 50 ms ...); the scene embedding is their mean over time.
Whisper encodes audio longer than 30 s in consecutive 30 s windows; the other encoders take the
clip whole. Lives in `wat.extract` because `wat.eval` never imports the encoder.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from .encoders import Encoder, as_encoder, load_encoder
from .pooling import integer

DEFAULT_MODEL = "base"
# HEAR clips are short and only the embeddings are used: feeding only the clip ("trim", as in the
# Whisper-AT research features) costs 1/15 of padding 2 s to 30 s ("pad30", what wat-tag sees);
# every encoder family takes trim
DEFAULT_POLICY = "trim"


class HEARModel(nn.Module):
    """The object `load_model` returns: an encoder (`wat.extract.encoders.Encoder`, or a loaded
    Whisper) plus the HEAR attributes. `encoder.model`, where it is a torch module, is registered as
    a sub-module (so `.eval()` reaches it)."""

    def __init__(self, encoder, layers="all", reduce: str = "mean", policy: str = DEFAULT_POLICY,
                 batch_size: int = 16):
        super().__init__()
        encoder = as_encoder(encoder)
        n = encoder.n_layers
        self.layers = tuple(range(n)) if layers == "all" else tuple(integer(l) for l in layers)
        if not self.layers or any(l is None or not 0 <= l < n for l in self.layers):
            raise ValueError(f"layers must be 'all' or integer indices in 0..{n - 1}, got {layers!r}")
        if integer(batch_size) is None or integer(batch_size) < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if reduce not in ("mean", "concat"):
            raise ValueError(f"reduce must be 'mean' or 'concat', got {reduce!r}")
        self.policy = encoder.policy_for(policy)
        self.min_samples = encoder.min_samples(self.policy)   # shorter clips raise ShortClipError
        self.reduce, self.batch_size = reduce, integer(batch_size)
        self.wrapped = encoder
        if isinstance(getattr(encoder, "model", None), nn.Module):
            self.model = encoder.model
        self.sample_rate = encoder.sample_rate
        self.name, self.family, self.fingerprint = encoder.name, encoder.family, encoder.fingerprint
        self.scene_embedding_size = encoder.dim * (len(self.layers) if reduce == "concat" else 1)
        self.timestamp_embedding_size = self.scene_embedding_size

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """[n, samples] -> [n, T, size] float32: the T native frames covering each clip
        (`Encoder.all_frames`), the chosen layers averaged or concatenated. A clip shorter than the
        encoder's `min_samples(policy)` raises `ShortClipError`; no clips give [0, T, size]."""
        n = audio.shape[0]
        if n == 0:
            return _no_clips(self.frames, audio)
        tapped = sorted(set(self.layers))      # the encoder returns layers in ascending order
        pick = [tapped.index(l) for l in self.layers]
        x = torch.cat([self.wrapped.all_frames(audio[b:b + self.batch_size], policy=self.policy, layers=tapped)
                       for b in range(0, n, self.batch_size)])[:, pick]     # [n, L', T, D]
        return x.mean(1) if self.reduce == "mean" else x.permute(0, 2, 1, 3).reshape(n, x.shape[2], -1)

    def timestamps(self, n_frames: int) -> torch.Tensor:
        """Centre of each native frame in ms, [n_frames] float32 (`Encoder.timestamps`)."""
        return self.wrapped.timestamps(n_frames)


WhisperHEAR = HEARModel  # its name when it served Whisper only


def load_model(model_file_path: str = "", *, layers="all", reduce: str = "mean", policy: str = DEFAULT_POLICY,
               device: str = "cpu", batch_size: int = 16, fusion: str = "cat", groups: int = 0,
               match_width: bool = False):
    """`model_file_path`: anything `wat.extract.encoders.load_encoder` accepts (a Whisper name such as
    tiny.en, a .pt file, a CTranslate2 or Hugging Face Whisper folder or id; a Hugging Face
    wav2vec2 / HuBERT / WavLM / data2vec-audio folder or id; crepe-full, crepe-tiny); empty = the
    offline `base` model. `policy`: "trim" (default, every encoder) or "pad30" (Whisper only).
    Several joined with "+" ("a+b+c") are the HEAR seed's ensemble (`wat.extract.hear_ensemble`: each
    model's layer mean, interpolated onto the first model's timestamps; `fusion` "cat" or "avg",
    `groups` k > 0 for the `_g` scene embedding, `match_width` to interpolate widths to the first's)."""
    from .hear_ensemble import is_ensemble, load

    if is_ensemble(model_file_path):
        if layers != "all" or reduce != "mean":
            raise ValueError("an ensemble fuses each model's mean over all its layers (layers='all', reduce='mean')")
        member = partial(load_model, policy=policy, device=device, batch_size=batch_size)
        return load(model_file_path, member, get_timestamp_embeddings, fusion=fusion, groups=groups,
                    match_width=match_width)
    if (fusion, groups, match_width) != ("cat", 0, False):
        raise ValueError("fusion, groups and match_width apply to ensembles ('a+b') only")
    encoder = load_encoder(model_file_path or DEFAULT_MODEL, device=device)
    if encoder.family == "whisper":
        encoder.model.decoder = None  # its text decoder: never used for embeddings, up to half the weights
    return HEARModel(encoder, layers, reduce, policy, batch_size).eval()


def _audio(audio, model: HEARModel) -> torch.Tensor:
    audio = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio)
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must be [n_sounds, n_samples] at {model.sample_rate} Hz, got {tuple(audio.shape)}")
    audio = audio.float()
    # a NaN or inf sample makes its clip's embeddings NaN (the encoder spreads it over the frames), which
    # the API handed back without a word; one elementwise pass over the batch, nothing beside the encoder
    bad = (~torch.isfinite(audio).all(1)).nonzero().flatten().tolist()
    if bad:
        rows = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise ValueError(f"audio rows [{rows}] of {audio.shape[0]} hold non-finite samples (NaN or inf)")
    return audio


def _no_clips(compute, audio: torch.Tensor):
    """`compute(audio)` for a batch of no clips, [0, S]: the HEAR API's shapes with n = 0 ([0, T, D]
    embeddings, [0, T] timestamps, [0, D] scene embeddings), T being what S samples give. It is the
    result for one silent clip of S samples, cut to none: T comes from the encoder itself (Whisper's
    30 s windows, a family's own frame count), at the cost of one encoder call."""
    out = compute(audio.new_zeros(1, audio.shape[1]))
    return tuple(x[:0] for x in out) if isinstance(out, tuple) else out[:0]


def get_timestamp_embeddings(audio, model: HEARModel) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, T, timestamp_embedding_size] float32, centre of each frame in ms [n, T]); n may be 0."""
    audio = _audio(audio, model)
    if audio.shape[0] == 0:   # an ensemble's timestamps are the first member's of the first clip
        return _no_clips(partial(get_timestamp_embeddings, model=model), audio)
    if hasattr(model, "timestamp_embeddings"):   # an ensemble (hear_ensemble.EnsembleHEAR)
        return model.timestamp_embeddings(audio)
    emb = model.frames(audio)
    ts = model.timestamps(emb.shape[1]).to(emb.device, torch.float32)
    return emb, ts.expand(emb.shape[0], -1).contiguous()


def get_scene_embeddings(audio, model: HEARModel) -> torch.Tensor:
    """[n, scene_embedding_size] float32: the time mean of the timestamp embeddings (ensembles: each
    member's own time mean, fused; or the `_g` group means of the fused timestamp embeddings); n may be 0."""
    audio = _audio(audio, model)
    if audio.shape[0] == 0:
        return _no_clips(partial(get_scene_embeddings, model=model), audio)
    if hasattr(model, "scene_embeddings"):
        return model.scene_embeddings(audio)
    return model.frames(audio).mean(1)
