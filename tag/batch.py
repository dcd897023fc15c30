"""Many files at once: transcript + tags of short files batched across files, and tags only.

**Transcript + tags, files of up to 30 s** (`transcribe_batch`): the batch's pad30 windows (each
file's own window, `wat.extract.decode.encode_pad30`, the pass wat-robust decodes too) go through
the encoder in ONE call, with `FrameTaps` keeping each file's block outputs for its tags; then each
file goes through `model.transcribe(audio, ...)` itself, unchanged, with `model.decode` answered
from the batch: the first file's request decodes the whole batch at once (`whisper.decode` on the
encoder output: no second encoder pass), later files get their row when they ask for the same
options on their own pad30 window. Anything else transcribe asks is decoded for that file alone: a
temperature fall-back from the batch's encoder output, another window (transcribe seeking to the
last timestamp of a window whose last segment is unfinished) as `model.decode` decodes it, with an
encoder pass of its own. So each result is exactly what transcribe gives for the file alone
(timestamps, segments, fall-backs and the no-speech skip included), up to the float rounding of a
batched matrix product, and the tags are the file's pad30 window's, as when it is transcribed alone.
Multilingual models without `language`: the language of every file is detected first, batched, on
the window transcribe detects it on, and files are decoded in groups of one language.

**Tags only** (`tag_only`): no decoder. Whisper: every 30 s window of each file (seek 0, 3000, ...
mel frames: the windows transcription encodes when it moves a whole window at a time; for a file of
up to 30 s its one pad30 window, so the tags equal those of transcript + tags), batched across files.
Other encoder families (`tag_only_encoder`): each tag window is a clip of its own, encoded as the
family encodes cache clips (policy trim), so a head trained on that encoder's cache sees what it
was trained on.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim

from wat.extract.decode import decode_features, encode_pad30
from wat.extract.layers import mel_encoder_frames

from .tagging import FrameTaps, ResentInput, Tagger, TagError

MAX_SAMPLES = N_SAMPLES  # files up to this long are decoded in batches (one 30 s window each)


def batchable(audio: np.ndarray) -> bool:
    """Can this file be transcribed in a batch: one window of real audio (10 ms .. 30 s)."""
    return HOP_LENGTH <= len(audio) <= MAX_SAMPLES


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _content_frames(audio) -> int:
    return min(len(audio) // HOP_LENGTH, N_FRAMES)


class _BatchDecode:
    """`model.decode` for the files of one batch: the batch's result for a file that asks the
    batch's options for its own pad30 window, that file alone from the batch's encoder output for
    other options on that window, and any other window as whisper decodes it (its own encoder pass)."""

    def __init__(self, model, mel: torch.Tensor, features: torch.Tensor):
        self.model, self.mel, self.features = model, mel, features
        self.options: whisper.DecodingOptions | None = None
        self.results = None
        self._later = ResentInput()  # a later window's features

    def decode(self, i: int, segment: torch.Tensor, options: whisper.DecodingOptions):
        if segment.ndim != 2 or not torch.equal(segment.to(self.mel.device, self.mel.dtype), self.mel[i]):
            return self._decode_later(segment, options)
        if self.options is None:  # the first request decodes every file of the batch at once
            self.options, self.results = options, decode_features(self.model, self.features, options)
        if options == self.options:
            return self.results[i]
        return whisper.decode(self.model, self.features[i], options)

    def _decode_later(self, segment: torch.Tensor, options: whisper.DecodingOptions):
        """A later window of a file, as whisper decodes it; its temperature fall-backs send the very
        same tensor again and reuse its encoder output, as `SharedEncoder` does for a file alone."""
        if segment.ndim != 2:
            return whisper.decode(self.model, segment, options)

        def encode(s: torch.Tensor) -> torch.Tensor:   # as decode's own encoder call would (fp16: half)
            return self.model.encoder((s.half() if options.fp16 else s).unsqueeze(0))[0]

        return whisper.decode(self.model, self._later(segment, encode), options)


def _languages(model, audios, fp16: bool) -> list[str]:
    """The language transcribe detects for each file: on `pad_or_trim(mel, N_FRAMES)` of the file's
    log-mel with 30 s of zero samples appended (transcribe's detection window), batched."""
    device = _device(model)
    mel = torch.stack([pad_or_trim(log_mel_spectrogram(torch.as_tensor(a).to(device), model.dims.n_mels,
                                                       padding=N_SAMPLES), N_FRAMES) for a in audios])
    _, probs = model.detect_language(mel.to(torch.float16 if fp16 else torch.float32))
    return [max(p, key=p.get) for p in probs]


@torch.inference_mode()
def transcribe_batch(model, tagger: Tagger, audios: list[np.ndarray], **whisper_options) -> list[dict]:
    """`transcribe_and_tag(model, tagger, audio, **whisper_options)` for each of `audios` (float32
    16 kHz, each `batchable`), from one encoder pass for the batch's tags and first windows and one
    decode per batch (see the module docstring). `word_timestamps` is not batched (callers send
    those files one by one)."""
    if whisper_options.get("word_timestamps"):
        raise ValueError("transcribe_batch: word timestamps are computed file by file (transcribe_and_tag)")
    if not audios or not all(batchable(a) for a in audios):
        raise ValueError("transcribe_batch takes 1 or more files of 10 ms .. 30 s")
    fp16 = bool(whisper_options.get("fp16", True)) and _device(model).type == "cuda"
    whisper_options = {**whisper_options, "fp16": fp16}
    language = whisper_options.pop("language", None)
    if language is None:
        langs = _languages(model, audios, fp16) if model.is_multilingual else ["en"] * len(audios)
    else:
        langs = [language] * len(audios)
    results: list[dict | None] = [None] * len(audios)
    for lang in dict.fromkeys(langs):
        group = [i for i, x in enumerate(langs) if x == lang]
        for i, result in zip(group, _transcribe_group(model, tagger, [audios[i] for i in group],
                                                       language=lang, **whisper_options)):
            results[i] = result
    return results


def _transcribe_group(model, tagger: Tagger, audios, **whisper_options) -> list[dict]:
    device = _device(model)
    clips = [torch.as_tensor(a, dtype=torch.float32).to(device) for a in audios]
    with FrameTaps(model.encoder, tagger.layers) as taps:
        taps.n_valid = [mel_encoder_frames(_content_frames(a)) for a in audios]
        mel, features = encode_pad30(model, clips, fp16=whisper_options["fp16"])
        frames = taps.take()
    server = _BatchDecode(model, mel, features)
    out = []
    for i, audio in enumerate(audios):
        pool = tagger.pool(len(audio))
        tagger.score(pool, pool.add_call(0, _content_frames(audio), frames[i]))
        tagger.score(pool, pool.close())
        model.decode = lambda segment, options, i=i: server.decode(i, segment, options)
        try:
            result = model.transcribe(audio, **whisper_options)
        finally:
            del model.decode  # the class's decode again
        result.update(tagger.output(pool))
        out.append(result)
    return out


def _windows(model, audio) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(seek, size, encoder input [n_mels, 3000]) of each 30 s window of `audio`, as transcribe
    cuts them when it moves a whole window at a time: the file's log-mel (30 s of zero samples
    appended, one max - 8 clamp over all of it), frames [seek, seek + size), padded with zero
    log-mel frames. For a file of up to 30 s: its `pad30_input` window."""
    mel = log_mel_spectrogram(torch.as_tensor(audio).to(_device(model)), model.dims.n_mels, padding=N_SAMPLES)
    content = mel.shape[-1] - N_FRAMES
    for seek in range(0, content, N_FRAMES):
        size = min(N_FRAMES, content - seek)
        yield seek, size, pad_or_trim(mel[:, seek:seek + size], N_FRAMES)


@torch.inference_mode()
def tag_only(model, tagger: Tagger, audios: list[np.ndarray], *, batch_size: int = 16,
             fp16: bool = False) -> Iterator[dict]:
    """Tags of each of `audios` (float32 16 kHz, any length) from the Whisper encoder alone, no
    decoder: every 30 s window of every file (`_windows`), `batch_size` windows per encoder call
    across files. Yields `Tagger.output` per file, in order, as soon as its last window is done."""
    fp16 = fp16 and _device(model).type == "cuda"
    dtype = torch.float16 if fp16 else next(model.encoder.parameters()).dtype
    pools = [tagger.pool(len(a)) for a in audios]
    items = ((f, *w) for f, a in enumerate(audios) for w in _windows(model, a))
    done = 0  # files whose windows are all placed

    def finish(upto: int):
        nonlocal done
        while done < upto:
            tagger.score(pools[done], pools[done].close())
            yield tagger.output(pools[done])
            done += 1

    with FrameTaps(model.encoder, tagger.layers) as taps:
        while batch := [x for _, x in zip(range(batch_size), items)]:
            taps.n_valid = [mel_encoder_frames(size) for _, _, size, _ in batch]
            model.encoder(torch.stack([x for *_, x in batch]).to(dtype))
            for (f, seek, size, _), frames in zip(batch, taps.take()):
                tagger.score(pools[f], pools[f].add_call(seek, size, frames))
            yield from finish(batch[-1][0])  # files before the last one of the batch are complete
    yield from finish(len(audios))


@torch.inference_mode()
def tag_only_encoder(encoder, tagger: Tagger, audios: list[np.ndarray], *, batch_size: int = 16,
                     policy: str | None = None) -> Iterator[dict]:
    """Tags from any `wat.extract.encoders.Encoder`: each tag window of each file is one clip,
    `encoder.pooled(..., frames=head's, policy=policy or the encoder's default)` as a cache row of
    that clip, `batch_size` windows per call. A window shorter than the encoder's `min_samples`
    (the end of a file) gets no tags. Yields `Tagger.output` per file, in order."""
    policy = encoder.policy_for(policy)
    need = encoder.min_samples(policy)
    sr = encoder.sample_rate
    pools = [tagger.pool(len(a)) for a in audios]

    def clips():
        for f, (a, pool) in enumerate(zip(audios, pools)):
            for k in range(pool.n_windows):
                start, end = (int(round(t * sr)) for t in pool.bounds(k))
                if end - start >= need:
                    yield f, k, a[start:end]

    items, done = clips(), 0
    while True:
        batch = [x for _, x in zip(range(batch_size), items)]
        upto = batch[-1][0] if batch else len(audios)
        if batch:
            feats = encoder.pooled([c for *_, c in batch], frames=tagger.info.n_frames, policy=policy,
                                   layers=tagger.layers)
            for f in dict.fromkeys(f for f, *_ in batch):
                sel = [j for j, (g, *_) in enumerate(batch) if g == f]
                tagger.score_pooled(pools[f], [batch[j][1] for j in sel], feats[sel])
        while done < upto:
            yield tagger.output(pools[done])
            done += 1
        if not batch:
            return
