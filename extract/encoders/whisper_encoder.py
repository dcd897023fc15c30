"""Whisper as an `Encoder`: a thin wrapper over `wat.extract.load.load_whisper` and
`wat.extract.layers.encode_layers`, so its features are bit for bit those of the Whisper path."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from whisper.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

from ..layers import MIN_SAMPLES, encode_layers, encoder_frames
from ..load import WHISPER_CHOICES, fingerprint, load_whisper, model_name
from .base import Encoder, equal_length_groups, register_encoder

SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # one encoder frame: conv2's stride 2 over 10 ms log-mel hops = 20 ms


@register_encoder
class WhisperEncoder(Encoder):
    """Whisper's audio encoder. `model` is the whole `whisper.Whisper` (transcription uses it too).

    Policies: "pad30" (default; the 30 s log-mel window `whisper.transcribe` feeds the encoder, then
    the frames of the clip) and "trim" (only the clip). Only the first 30 s of a clip are encoded."""

    family = "whisper"
    policies = ("pad30", "trim")
    fallback = True        # names, .pt files, CTranslate2 and HF Whisper folders, HF ids: the rest
    max_seconds = 30.0     # 1500 encoder positions
    pad_to_clip_length = True  # a short clip is encoded zero-padded to the run's clip length, as always
    sample_rate = SAMPLE_RATE
    frame_rate = SAMPLE_RATE / SAMPLES_PER_FRAME

    def __init__(self, model):
        self.model = model
        self.n_layers = model.dims.n_audio_layer
        self.dim = model.dims.n_audio_state

    @property
    def name(self) -> str:
        return model_name(self.model)

    @property
    def fingerprint(self) -> str:  # a hash of every encoder weight: computed once, on first use
        return fingerprint(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def library_versions(self) -> dict[str, str]:
        import whisper

        return {"openai-whisper": getattr(whisper, "__version__", "?")}

    def min_samples(self, policy: str) -> int:
        return MIN_SAMPLES[policy]

    def native_frames(self, samples: int, policy: str) -> int:
        return encoder_frames(samples)  # the same under both policies

    def pooled(self, clips, *, frames: int, policy: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        if (torch.is_tensor(clips) or hasattr(clips, "shape")) and len(getattr(clips, "shape", ())) == 2:
            # one batch of equal lengths: exactly the Whisper path (wat-extract's batches)
            self.check(clips[:1], frames=frames, policy=policy, layers=layers)
            return encode_layers(self.model, clips, frames=frames, policy=policy, layers=layers)
        clips, layers = self.check(clips, frames=frames, policy=policy, layers=layers)
        out = torch.empty((len(clips), len(layers), frames, self.dim), dtype=torch.float32, device=self.device)
        for group in equal_length_groups([c.shape[0] for c in clips]):
            batch = torch.stack([clips[i] for i in group])
            out[group] = encode_layers(self.model, batch, frames=frames, policy=policy, layers=layers)
        return out

    def all_frames(self, audio: torch.Tensor, *, policy: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """[n, S] -> [n, L, T, D] float32: the encoder frames covering the audio (`encoder_frames` per 30 s
        window: a window ending 1..159 samples into a 320-sample step adds no frame), audio longer than
        30 s encoded in consecutive 30 s windows, each frame kept once.

        A last window too short to encode on its own (`MIN_SAMPLES`) is the tail of longer audio:
        under 160 samples it reaches no log-mel frame, so it adds no encoder frame, as the same
        samples add none inside a window; 160..200 samples (trim: whisper's STFT needs 201) are
        encoded with the previous encoder frame's 320 samples in front, and only the tail's frame
        is kept: its log-mel frames are centred where the tail's own are, so its timestamp is true.
        A whole clip that short raises `ShortClipError`."""
        samples = audio.shape[-1]
        outs = []
        for a in range(0, samples, N_SAMPLES):       # 30 s windows; the last may be shorter
            end = min(a + N_SAMPLES, samples)
            if a and end - a < HOP_LENGTH:
                break
            start = a - SAMPLES_PER_FRAME if a and end - a < MIN_SAMPLES[policy] else a
            k, t = encoder_frames(end - start), encoder_frames(end - a)   # frames encoded, frames kept
            x = encode_layers(self.model, audio[:, start:end], frames=k, policy=policy, layers=layers)
            outs.append(x[:, :, k - t:])
        return torch.cat(outs, dim=2)

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return True  # the catch-all: load_whisper says why when it is not a Whisper model either

    @classmethod
    def choices(cls) -> str:
        return f"a Whisper model: {WHISPER_CHOICES}"

    @classmethod
    def load(cls, spec: str, device="cpu") -> "WhisperEncoder":
        return cls(load_whisper(spec, device=device))
