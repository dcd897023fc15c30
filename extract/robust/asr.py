"""Transcripts and pooled layer features of the same encoder pass.

Up to 30 s: a batch of utterances becomes mel windows [B, n_mels, 3000], each computed on its own
clip padded to 30 s (exactly `encode_layers`' pad30 input: never a batched log-mel, which would
couple clips through its max-8 clamp), and `whisper.decode` transcribes the batch at temperature 0.
Its single encoder call runs with `ClipTaps` attached, which pool every block's output over the
frames covering each clip, as wat-extract's pad30 policy does: the cache rows equal
`encode_layers(model, clip)` and the transcript comes from the very same activations.

Longer than 30 s: `model.transcribe` (temperature 0, so no fall-back re-runs a window) with taps
on every encoder call: one pass per 30 s window, the features are those of the first window (the
first 30 s, which is what pad30 keeps of a longer clip). Its mel is normalised over the whole
utterance by `transcribe`, so these rows can differ slightly from `encode_layers` of the first 30 s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

from wat.extract.layers import LayerTaps, pool_frames, log_mel

MAX_SAMPLES = N_SAMPLES  # what one decode window holds


@dataclass(frozen=True)
class AsrOptions:
    language: str | None = "en"  # None: detected per utterance (multilingual models only)
    frames: int = 25             # pooled frames per clip, as in wat-extract
    beam_size: int | None = None  # None: greedy (the paper's temperature-0 decoding)


class CountingTaps(LayerTaps):
    """LayerTaps that also count the encoder calls and keep the first call's pooled output."""

    def __init__(self, encoder, frames: int = 25, n_valid: int | None = None):
        super().__init__(encoder, frames, n_valid)
        self.calls, self.first = 0, None

    def _finish(self, module, args, output):
        super()._finish(module, args, output)
        self.calls += 1
        if self.first is None:
            self.first = self.pooled


class ClipTaps(CountingTaps):
    """Taps whose time pooling covers a different number of valid frames per batch item."""

    def __init__(self, encoder, frames: int, n_valid: list[int]):
        super().__init__(encoder, frames, None)
        self.clip_valid = list(n_valid)

    def _tap(self, module, args, output):
        if output.shape[0] != len(self.clip_valid):
            raise RuntimeError(f"ClipTaps: encoder batch of {output.shape[0]}, expected {len(self.clip_valid)}")
        self._current.append(torch.cat([pool_frames(output[i:i + 1], self.frames, n)
                                        for i, n in enumerate(self.clip_valid)]))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _decoding(model, options: AsrOptions, **extra) -> dict:
    language = options.language if model.is_multilingual else "en"
    return dict(temperature=0.0, language=language, beam_size=options.beam_size,
                fp16=_device(model).type == "cuda", **extra)


def valid_frames(model, n_samples: int) -> int:
    """Encoder frames covering a clip of n_samples in its 30 s window (pad30)."""
    return min(math.ceil(min(n_samples, N_SAMPLES) / (2 * HOP_LENGTH)), model.dims.n_audio_ctx)


@torch.inference_mode()
def decode_batch(model, clips: list[np.ndarray], options: AsrOptions = AsrOptions()):
    """Clips of 1..480000 samples (16 kHz) -> (texts, float32 features [B, L, frames, D] on the
    model's device), from one encoder call on the batch."""
    if not clips or any(len(c) == 0 or len(c) > MAX_SAMPLES for c in clips):
        raise ValueError("decode_batch takes 1 or more clips of 1..30 s")
    device = _device(model)
    audio = torch.stack([whisper.pad_or_trim(torch.as_tensor(c, dtype=torch.float32), N_SAMPLES) for c in clips])
    mel = log_mel(audio.to(device), model.dims.n_mels)  # per clip
    mel = mel.to(next(model.encoder.parameters()).dtype)
    n_valid = [valid_frames(model, len(c)) for c in clips]
    with ClipTaps(model.encoder, options.frames, n_valid) as taps:
        results = whisper.decode(model, mel, whisper.DecodingOptions(
            without_timestamps=True, **_decoding(model, options)))
    if taps.calls != 1:  # the promise: one encoder pass gives both outputs
        raise RuntimeError(f"whisper.decode ran the encoder {taps.calls} times for one batch")
    return [r.text for r in results], taps.pooled.float()


@torch.inference_mode()
def transcribe_long(model, clip: np.ndarray, options: AsrOptions = AsrOptions()):
    """A clip longer than 30 s -> (text, float32 features [1, L, frames, D] of its first window,
    number of encoder passes = windows). Timestamps on, as long-form transcription needs them to
    cut windows between words."""
    with CountingTaps(model.encoder, options.frames, None) as taps:
        result = model.transcribe(np.asarray(clip, np.float32), condition_on_previous_text=True,
                                  no_speech_threshold=None, verbose=None, **_decoding(model, options))
    return result["text"].strip(), taps.first.float(), taps.calls


def seconds(clip: np.ndarray) -> float:
    return len(clip) / SAMPLE_RATE
