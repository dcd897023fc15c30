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
    one call for the batch. Greedy decoding (one token row per audio) is whisper's own batched call.
    Beam search (`beam_size` rows per audio) goes through `_beam_batch`: openai-whisper cannot decode
    several audios with n_group > 1 token rows each since 2023 (it no longer repeats the audio
    features per row and fails with a size mismatch: openai/whisper#2197, #2389, unmerged).
    Best-of-n sampling (temperature > 0) stays one audio at a time: a batch would draw each audio's
    samples from another point of the random stream than decoding it alone does."""
    import whisper

    n_group = options.beam_size or options.best_of or 1
    if features.ndim == 2 or features.shape[0] == 1 or n_group == 1:
        return whisper.decode(model, features, options)
    if options.beam_size and options.beam_size > 1:
        return _beam_batch(model, features, options)
    return [whisper.decode(model, f, options) for f in features]


def _beam_batch(model, features: torch.Tensor, options):
    """Beam search over several audios in one `DecodingTask.run`: whisper's beam decoder, logit
    filters and ranking already work per audio on [n_audio * n_group] token rows; only the audio
    features are not repeated per row. Three thin wrappers on the task and forward hooks on the
    decoder's cross-attention key/value projections supply that: each audio's keys and values are
    computed once and repeated for its rows (repeating the features instead would compute them
    n_group times), and `run`'s own `audio_features[::n_group]` gets one row per token row. Each
    audio's result is the one it gets decoded alone (its finished beams are fixed when its candidate
    list fills; later steps of the batch do not touch them), up to the rounding of batched products."""
    from whisper.decoding import DecodingTask

    task = DecodingTask(model, options)
    n = task.n_group
    n_audio = features.shape[0]
    get_features, detect, loop = task._get_audio_features, task._detect_language, task._main_loop

    def main_loop(audio_features, tokens):
        if tokens.shape[0] != n_audio * n:  # a whisper that repeats per row itself: not this wrapper's
            raise RuntimeError(f"beam batch: {tokens.shape[0]} token rows for {n_audio} audios x {n}")
        # registered before whisper's kv-cache hooks (installed at the loop's first step): the cache
        # keeps the repeated keys/values; its beam rearrangement only touches the self-attention ones
        hooks = [m.register_forward_hook(lambda _m, _args, out: out.repeat_interleave(n, 0))
                 for block in model.decoder.blocks if block.cross_attn is not None
                 for m in (block.cross_attn.key, block.cross_attn.value)]
        try:
            return loop(audio_features[::n], tokens)
        finally:
            for h in hooks:
                h.remove()

    task._get_audio_features = lambda mel: get_features(mel).repeat_interleave(n, 0)
    task._detect_language = lambda audio_features, tokens: detect(audio_features[::n], tokens)
    task._main_loop = main_loop
    return task.run(features)
