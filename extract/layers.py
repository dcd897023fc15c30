"""Layer taps: the outputs of the encoder's residual blocks (before `ln_post`), mean-pooled in time
inside forward hooks, so full-resolution activations never leave the device or outlive a block.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import whisper
from torch.overrides import TorchFunctionMode
from whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE

from wat.data.cache import POLICIES

from .encoders.base import ShortClipError
from .pooling import LayerTaps, integer, layer_subset, pool_frames, time_parts  # noqa: F401 (their old home)

# The fewest samples a clip needs to give an encoder frame of its own audio, per policy.
# trim: whisper's log-mel of the clip alone (`log_mel_spectrogram` without padding) reflect-pads it
# by N_FFT // 2 = 200 samples on each side, which torch refuses for clips of <= 200 samples
# (whisper never asks: transcribe always appends 30 s of zeros first). pad30: one 10 ms hop, the
# first log-mel frame transcribe counts as content (samples // 160); a shorter clip has none, so its
# window would be padding only and its features the same whatever the audio.
MIN_SAMPLES = {"trim": N_FFT // 2 + 1, "pad30": HOP_LENGTH}
MAX_FRAMES = N_FRAMES // 2  # pooled frames per clip: at most the encoder frames of a 30 s window


# why a clip under MIN_SAMPLES has no frame of its own, per policy (the ShortClipError message)
_SHORT_WHY = {
    "trim": "whisper's log-mel of the clip alone reflect-pads 200 samples on each side; policy "
            f"'pad30' takes clips from {MIN_SAMPLES['pad30']} samples",
    "pad30": "a shorter clip has no 10 ms log-mel frame, so its features would not depend on its audio",
}


class _ResidentWindow(TorchFunctionMode):
    """`whisper.log_mel_spectrogram` makes its STFT window on the CPU and copies it to the audio's
    device on every call (`torch.hann_window(N_FFT).to(audio.device)`): a blocking copy, which on
    CUDA first waits for all the work queued on the stream (the previous batch's encoder), so the
    host could never queue a batch ahead. Inside this mode `torch.hann_window(n)` returns that same
    window, made on the CPU as whisper makes it and copied to `device` once: the `.to` is a no-op and
    the values are bit for bit whisper's."""

    _windows: dict = {}

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.hann_window and len(args) == 1 and not kwargs:
            key = (args[0], str(self.device))
            if key not in self._windows:  # the mode is off inside its own handler: whisper's own window
                self._windows[key] = torch.hann_window(args[0]).to(self.device)
            return self._windows[key]
        return func(*args, **kwargs)


def _whisper_mel(device: torch.device):
    """The context for calling whisper's log-mel on `device` without a stream sync per call."""
    return _ResidentWindow(device) if device.type == "cuda" else nullcontext()


def log_mel(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[B, S] -> [B, n_mels, S // 160]. One `whisper.log_mel_spectrogram` call per clip: it clamps to
    (max - 8) over the whole tensor it gets, so a batched call would couple clips."""
    with _whisper_mel(audio.device):
        return torch.stack([whisper.log_mel_spectrogram(a, n_mels) for a in audio])


def mel_encoder_frames(mel_frames: int) -> int:
    """Encoder frames the conv stem makes of `mel_frames` log-mel frames: ceil(mel_frames / 2)
    (conv2 has stride 2 and padding 1: encoder frame j reads mel frames 2j and 2j + 1)."""
    return -(-mel_frames // 2)


def encoder_frames(samples: int) -> int:
    """THE number of encoder frames covering a clip of `samples` 16 kHz samples (its first 30 s):
    ceil(content / 2), content = min(samples // 160, 3000) mel frames as `whisper.transcribe` counts
    them, at least 1 (a clip under 10 ms has no content frame; `pad30_input` still keeps one, and
    `encode_layers` refuses such a clip: `MIN_SAMPLES`). Encoder frame j
    reads mel frames 2j and 2j + 1 (conv2 has stride 2), so a clip ending in the first 159 samples
    of a 320-sample step adds no frame. Both policies give exactly this many: pad30 keeps these
    frames of the 30 s window; trim's log-mel of the clip has samples // 160 frames (whisper drops
    the STFT's last one; it needs over 200 samples, its reflect padding) and conv2 turns them into
    ceil(frames / 2)."""
    return max(1, mel_encoder_frames(min(samples // HOP_LENGTH, N_FRAMES)))


def pad30_input(clips, n_mels: int = 80) -> tuple[torch.Tensor, list[int]]:
    """THE pad30 encoder input: 16 kHz mono clips (1-D float32 tensors, any lengths >= 1 sample;
    the log-mel is computed where each one lies) -> (log-mel windows [B, n_mels, 3000] float32,
    valid encoder frames per clip).

    Each window is exactly what `whisper.transcribe` feeds the encoder for the clip's first 30 s,
    built with whisper's own functions as transcribe builds it: the log-mel of the clip followed by
    30 s of zero samples (`log_mel_spectrogram(clip, padding=N_SAMPLES)`, so its max - 8 clamp is
    taken over that whole spectrogram, of this clip alone: never a batched call, which would couple
    clips), its first min(content_frames, 3000) frames (`content_frames` = samples // 160, as
    transcribe counts them), padded to 3000 frames with zeros of the *normalised log-mel*
    (`pad_or_trim`). A clip longer than 30 s is normalised over its whole length, as transcribe's
    first window is. Valid encoder frames: `encoder_frames(samples)`."""
    mels, valid = [], []
    for clip in clips:
        with _whisper_mel(clip.device):
            mel = whisper.log_mel_spectrogram(clip, n_mels, padding=N_SAMPLES)
        frames = min(mel.shape[-1] - N_FRAMES, N_FRAMES)  # transcribe's content_frames, first window
        mels.append(whisper.pad_or_trim(mel[:, :frames], N_FRAMES))
        valid.append(encoder_frames(clip.shape[-1]))
    return torch.stack(mels), valid


@contextmanager
def short_input(encoder, n_ctx: int):
    """Let openai-whisper's encoder take `n_ctx` < 1500 positions: its forward asserts the input
    matches the positional embedding, so present the first n_ctx rows for the duration."""
    full = encoder.positional_embedding
    encoder.positional_embedding = full[:n_ctx]
    try:
        yield encoder
    finally:
        encoder.positional_embedding = full


class EncoderPasses:
    """Counts real encoder passes of `model` inside the `with` block (the first block runs once per
    pass): `with EncoderPasses(model) as passes: ...; passes.n`."""

    def __init__(self, model):
        self.model, self.n = model, 0

    def __enter__(self) -> "EncoderPasses":
        self._handle = self.model.encoder.blocks[0].register_forward_hook(self._hit)
        return self

    def _hit(self, *args):
        self.n += 1

    def __exit__(self, *exc):
        self._handle.remove()


def encode_layers(model, audio, *, frames: int = 25, policy: str = "pad30", layers=None) -> torch.Tensor:
    """16 kHz mono waveforms [B, samples] (tensor or array, equal lengths) -> float32
    [B, L, frames, D] on the model's device: every encoder block's output, mean-pooled over `frames`
    equal windows of the encoder frames that cover the audio (one frame = 320 samples = 20 ms).
    Only the first 30 s are encoded.

    policy "pad30": the 30 s log-mel window `whisper.transcribe` feeds the encoder (`pad30_input`:
    the clip's log-mel padded with zero log-mel frames), then keep the encoder frames of the clip's
    content (`encoder_frames(samples)`): what `wat-tag` pools during transcription.
    "trim": encode only the clip (~3x cheaper for 10 s clips; numerically different because
    attention sees no padding). `layers`: block indices to keep (default all), giving
    [B, len(layers), frames, D]. Clips shorter than `MIN_SAMPLES[policy]` (trim: 201, pad30: 160)
    raise `ShortClipError`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: expected one of {POLICIES}")
    if integer(frames) is None or not 1 <= integer(frames) <= MAX_FRAMES:
        raise ValueError(f"frames must be an integer in 1..{MAX_FRAMES} (the encoder frames of 30 s), got {frames!r}")
    device = next(model.parameters()).device
    audio = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio)
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must be [batch, samples] with samples > 0, got {tuple(audio.shape)}")
    if audio.shape[1] < MIN_SAMPLES[policy]:
        raise ShortClipError(audio.shape[1], policy, MIN_SAMPLES[policy], _SHORT_WHY[policy])
    audio = audio.to(device, torch.float32)
    if policy == "pad30":
        mel, valid = pad30_input(audio, model.dims.n_mels)
        n_valid = valid[0]  # equal lengths: one count for the batch
    else:
        mel = log_mel(audio[:, :N_SAMPLES], model.dims.n_mels)
        n_valid = None  # the encoder sees only the clip
    n_enc = mel_encoder_frames(mel.shape[-1])
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                 enabled=device.type == "cuda"):
        mel = mel.to(next(model.encoder.parameters()).dtype)
        with LayerTaps(model.encoder, frames, n_valid, layers) as taps, short_input(model.encoder, n_enc):
            model.encoder(mel)
    return taps.pooled.float()
