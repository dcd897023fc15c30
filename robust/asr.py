"""Transcripts and pooled layer features of the same encoder pass.

Up to 30 s: a batch of utterances becomes the log-mel windows [B, n_mels, 3000] that
`whisper.transcribe` would feed the encoder for each utterance alone (`layers.pad30_input`, the one
pad30 definition: each clip's own log-mel, padded with zero log-mel frames to 30 s; never a batched
log-mel, which would couple clips through its max-8 clamp), and `whisper.decode` transcribes the
batch at temperature 0 without timestamp tokens. Its single encoder call runs with `ClipTaps`
attached, which pool every block's output over each clip's content frames, as wat-extract's pad30
policy does: the cache rows equal `encode_layers(model, clip)`, the transcript comes from the very
same activations, and it equals `model.transcribe(clip, temperature=0, without_timestamps=True,
condition_on_previous_text=False, no_speech_threshold=None)` (same encoder input, same decoding
options; `transcribe`'s defaults add timestamp tokens, which can change the greedy path (on the
committed fixture utterances they do not), and may skip a window they judge silent).

Longer than 30 s: `model.transcribe` (temperature 0, so no fall-back re-runs a window) with taps
on every encoder call: one pass per 30 s window, the features are those of the first window, which
is the pad30 input of the utterance (`encode_layers` of the whole utterance gives the same rows).

CTC fine-tuned encoders (`*ForCTC` checkpoints of the Hugging Face family): `decode_ctc`, one forward of
the batch gives the pooled layers and the CTC logits, decoded greedily with the checkpoint's tokenizer;
no 30 s window (the whole utterance in one pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import whisper
from whisper.audio import N_SAMPLES, SAMPLE_RATE

from wat.extract.decode import decode_features, encode_pad30
from wat.extract.layers import LayerTaps, encoder_frames, pool_frames

MAX_SAMPLES = N_SAMPLES  # what one decode window holds


@dataclass(frozen=True)
class AsrOptions:
    language: str | None = "en"  # None: detected per utterance (multilingual models only)
    frames: int = 25             # pooled frames per clip, as in wat-extract
    beam_size: int | None = None  # None: greedy (the paper's temperature-0 decoding)
    sample_len: int | None = None  # most tokens per utterance; None: whisper's (224, half the text context)


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
    if options.sample_len is not None:  # else whisper's own default stays in charge
        extra["sample_len"] = options.sample_len
    return dict(temperature=0.0, language=language, beam_size=options.beam_size,
                fp16=_device(model).type == "cuda", **extra)


@torch.inference_mode()
def decode_batch(model, clips: list[np.ndarray], options: AsrOptions = AsrOptions()):
    """Clips of 1..480000 samples (16 kHz) -> (texts, float32 features [B, L, frames, D] on the
    model's device), from one encoder call on the batch."""
    if not clips or any(len(c) == 0 or len(c) > MAX_SAMPLES for c in clips):
        raise ValueError("decode_batch takes 1 or more clips of 1..30 s")
    device = _device(model)
    decoding = whisper.DecodingOptions(without_timestamps=True, **_decoding(model, options))
    with ClipTaps(model.encoder, options.frames, [encoder_frames(len(c)) for c in clips]) as taps:
        _, features = encode_pad30(model, [torch.as_tensor(c, dtype=torch.float32).to(device) for c in clips],
                                   fp16=decoding.fp16)
    results = decode_features(model, features, decoding)
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


@torch.inference_mode()
def decode_ctc(encoder, clips: list[np.ndarray], frames: int = 25):
    """A CTC fine-tuned encoder (`*ForCTC`, `encoder.ctc`): clips of any length -> (greedy transcripts
    through the checkpoint's own tokenizer, float32 features [B, L, frames, D] on the encoder's
    device), both from one forward of the batch (`pooled_and_logits`: the pooled layers are
    `encoder.pooled` of the same clips, the logits those of transformers' own forward)."""
    if not clips or any(len(c) == 0 for c in clips):
        raise ValueError("decode_ctc takes 1 or more non-empty clips")
    pooled, logits, valid = encoder.pooled_and_logits([torch.as_tensor(c, dtype=torch.float32) for c in clips],
                                                      frames=frames)
    return encoder.ctc_decode(logits, valid), pooled


def seconds(clip: np.ndarray) -> float:
    return len(clip) / SAMPLE_RATE
