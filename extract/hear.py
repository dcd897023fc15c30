"""HEAR 2021 API over Whisper's encoder layers (check with `hear-validator wat.extract.hear -m tiny.en`).

Timestamp embeddings are the encoder frames themselves (one per 20 ms, centred at 10, 30, 50 ms ...;
as many as cover the audio, `encoder_frames`), each the mean (or concatenation) of the chosen
layers' outputs before `ln_post`; the scene embedding is their mean over time. Audio longer than
30 s is encoded in consecutive 30 s windows. Lives in `wat.extract` because `wat.eval` never
imports the encoder.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from whisper.audio import HOP_LENGTH, N_SAMPLES

from wat.data.cache import POLICIES

from .layers import MIN_SAMPLES, encode_layers, encoder_frames, integer
from .load import fingerprint, load_whisper, model_name

DEFAULT_MODEL = "base"
# HEAR clips are short and only the embeddings are used: feeding only the clip ("trim", as in the
# Whisper-AT research features) costs 1/15 of padding 2 s to 30 s ("pad30", what wat-tag sees)
DEFAULT_POLICY = "trim"
SAMPLES_PER_FRAME = 320   # one encoder frame: 2 mel hops of 160 samples = 20 ms


class WhisperHEAR(nn.Module):
    """The object `load_model` returns: Whisper's encoder plus the HEAR attributes.

    It carries `dims` and `encoder` like a Whisper model (the decoder is dropped), so
    `encode_layers` runs on it directly."""

    sample_rate = 16000

    def __init__(self, whisper_model, layers="all", reduce: str = "mean", policy: str = DEFAULT_POLICY,
                 batch_size: int = 16):
        super().__init__()
        n = whisper_model.dims.n_audio_layer
        self.layers = tuple(range(n)) if layers == "all" else tuple(integer(l) for l in layers)
        if not self.layers or any(l is None or not 0 <= l < n for l in self.layers):
            raise ValueError(f"layers must be 'all' or integer indices in 0..{n - 1}, got {layers!r}")
        if integer(batch_size) is None or integer(batch_size) < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if reduce not in ("mean", "concat"):
            raise ValueError(f"reduce must be 'mean' or 'concat', got {reduce!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.reduce, self.policy, self.batch_size = reduce, policy, integer(batch_size)
        self.dims = whisper_model.dims
        self.encoder = whisper_model.encoder
        self.name, self.fingerprint = model_name(whisper_model), fingerprint(whisper_model)
        width = self.dims.n_audio_state
        self.scene_embedding_size = width * (len(self.layers) if reduce == "concat" else 1)
        self.timestamp_embedding_size = self.scene_embedding_size

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """[n, samples] -> [n, T, size] float32: the T encoder frames covering each 30 s window
        (`encoder_frames`: a window ending 1..159 samples into a 320-sample step adds no frame), so
        the pooling into T parts keeps each frame once.

        A last window too short to encode on its own (`MIN_SAMPLES`) is the tail of longer audio:
        under 160 samples it reaches no log-mel frame, so it adds no encoder frame, as the same
        samples add none inside a window; 160..200 samples (trim: whisper's STFT needs 201) are
        encoded with the previous encoder frame's 320 samples in front, and only the tail's frame
        is kept: its log-mel frames are centred where the tail's own are, so its timestamp is true.
        A whole clip that short raises `ShortClipError`."""
        n, samples = audio.shape
        outs = []
        for a in range(0, samples, N_SAMPLES):       # 30 s windows; the last may be shorter
            end = min(a + N_SAMPLES, samples)
            if a and end - a < HOP_LENGTH:
                break
            start = a - SAMPLES_PER_FRAME if a and end - a < MIN_SAMPLES[self.policy] else a
            window = audio[:, start:end]
            k, t = encoder_frames(end - start), encoder_frames(end - a)   # frames encoded, frames kept
            parts = [encode_layers(self, window[b:b + self.batch_size], frames=k, policy=self.policy)
                     for b in range(0, n, self.batch_size)]
            x = torch.cat(parts)[:, list(self.layers), k - t:]        # [n, L', T, D]
            outs.append(x.mean(1) if self.reduce == "mean" else x.permute(0, 2, 1, 3).reshape(n, t, -1))
        return torch.cat(outs, dim=1)


def load_model(model_file_path: str = "", *, layers="all", reduce: str = "mean", policy: str = DEFAULT_POLICY,
               device: str = "cpu", batch_size: int = 16, fusion: str = "cat", groups: int = 0,
               match_width: bool = False):
    """`model_file_path`: anything `wat.extract.load_whisper` accepts (a name such as tiny.en, a .pt file,
    a CTranslate2 or Hugging Face folder, a Hugging Face id); empty = the offline `base` model.
    Several joined with "+" ("a+b+c") are the HEAR seed's ensemble (`wat.extract.hear_ensemble`: each
    model's layer mean, aligned in time to the first model's frames; `fusion` "cat" or "avg",
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
    return WhisperHEAR(load_whisper(model_file_path or DEFAULT_MODEL, device=device), layers, reduce, policy,
                       batch_size).eval()


def _audio(audio, model: WhisperHEAR) -> torch.Tensor:
    audio = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio)
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must be [n_sounds, n_samples] at {model.sample_rate} Hz, got {tuple(audio.shape)}")
    return audio.float()


def get_timestamp_embeddings(audio, model: WhisperHEAR) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, T, timestamp_embedding_size] float32, centre of each frame in ms [n, T])."""
    audio = _audio(audio, model)
    if hasattr(model, "timestamp_embeddings"):   # an ensemble (hear_ensemble.EnsembleHEAR)
        return model.timestamp_embeddings(audio)
    emb = model.frames(audio)
    step_ms = 1000.0 * SAMPLES_PER_FRAME / model.sample_rate
    ts = (torch.arange(emb.shape[1], dtype=torch.float32, device=emb.device) + 0.5) * step_ms
    return emb, ts.expand(emb.shape[0], -1).contiguous()


def get_scene_embeddings(audio, model: WhisperHEAR) -> torch.Tensor:
    """[n, scene_embedding_size] float32: the time mean of the timestamp embeddings (ensembles: or
    their `_g` group means)."""
    if hasattr(model, "scene_embeddings"):
        return model.scene_embeddings(_audio(audio, model))
    return model.frames(_audio(audio, model)).mean(1)
