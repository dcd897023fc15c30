"""Batched Whisper decoding of clips up to 30 s: one encoder pass for the batch, whose output
`whisper.decode` takes as it is (it skips the encoder when given [B, 1500, D] features).
wat-robust and wat-tag decode batches through these two functions."""
from __future__ import annotations

import torch

from .layers import pad30_input


@torch.inference_mode()
def encode_pad30(model, clips, *, fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of 1..480000 16 kHz samples (1-D float32 tensors on the model's device) -> (their
    `pad30_input` windows [B, n_mels, 3000] as the encoder took them, audio features [B, 1500, D])
    from ONE encoder call on the batch: the encoder input `whisper.decode` makes of each window
    (`fp16`: half precision, as decode's option; else the encoder's dtype). Hooks the caller attached
    to the encoder see that call; `decode_features` decodes the features."""
    mel, _ = pad30_input(clips, model.dims.n_mels)
    mel = mel.to(torch.float16 if fp16 else next(model.encoder.parameters()).dtype)
    return mel, model.encoder(mel)


def decode_features(model, features: torch.Tensor, options):
    """`whisper.decode(model, features, options)` for audio features [B, 1500, D] (or one [1500, D]):
    one call for the batch when each audio decodes one token row (greedy), else one call per audio.
    openai-whisper cannot decode several audios with beam search or best-of-n (n_group > 1 token rows
    per audio): since 2023 it no longer repeats the audio features per row and fails with a size
    mismatch (openai/whisper#2197, #2389, unmerged); one audio at a time is what it decodes right."""
    import whisper

    if features.ndim == 2 or features.shape[0] == 1 or (options.beam_size or options.best_of or 1) == 1:
        return whisper.decode(model, features, options)
    return [whisper.decode(model, f, options) for f in features]
