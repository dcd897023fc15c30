"""Transcript and audio tags from the encoder passes `whisper.transcribe` already makes.

For the duration of one transcription `model.encoder` is replaced by `SharedEncoder`, a thin module
that calls the real encoder (with forward hooks on its blocks keeping each block's output for the
audio frames: the outputs before `ln_post`, as in training) and:

- finds where in the file each call's 30 s mel segment starts (`seek`) and how much of it is audio
  (`segment_size`, the rest is padding and is never used for tags): read from `transcribe`'s own
  frame, checked against the mel values, or found by searching the mel when that check fails;
- gives the previous output back when called again with the very same input tensor, unchanged
  (temperature fall-backs re-decode the same segment; word timestamps re-run the model on it), so
  those repeats cost no encoder pass and add no frames;
- places the block outputs of the audio frames on the absolute time grid (`grid.WindowPool`).
  Where two calls overlap, a frame is taken from the later call, where it sits near the start of
  the 30 s window as the head's pad30 training clips did (and has real audio after it); windows
  whose audio is complete are pooled and tagged while transcription goes on.

What the encoder sees is transcribe's window: the file's log-mel (computed once over the whole
file, max - 8 clamp included), a 30 s segment of it, padded with zero log-mel frames when shorter
(`pad_or_trim`). For a file of up to 30 s that one window is exactly the `pad30` cache input
(`wat.extract.layers.pad30_input`), and a tag window spanning the file pools the same encoder
frames into the same parts as the cache row: a pad30 head is applied to what it was trained on.
(Caches written before schema 4 padded zero samples instead; `check_head` refuses their heads.)
Longer files: later windows start where transcription seeks, and their mel is normalised over the
whole file, as in transcribe.

Whisper's code is not modified or copied: `model.transcribe` runs as is, with the same options.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram

from wat.data.audio import load_audio
from wat.data.labels import Vocabulary
from wat.data.heads import Features, HeadInfo, head_problems, probabilities
from wat.data.heads.official import load_named_head
from wat.extract.layers import mel_encoder_frames
from wat.extract.load import fingerprint, model_name

from .grid import WindowPool
from wat.data.errors import WatError

POLICY = "pad30"  # what the encoder sees during transcription
_TRANSCRIBE = importlib.import_module("whisper.transcribe").transcribe.__code__


class TagError(WatError, ValueError):
    """A head that does not fit the model, a class name the head does not know, or an encoder call
    that cannot be placed in the file."""


def check_head(model, info: HeadInfo, *, allow_policy_mismatch: bool = False) -> None:
    """Refuse a head whose input is not what this model's transcription produces (the one rule of
    `wat.data.heads.head_problems`; the head's own classes are reported, at its own frame count)."""
    dims = model.dims
    feats = Features(dims.n_audio_layer, dims.n_audio_state, model_name(model), fingerprint(model), POLICY)
    bad = head_problems(info, feats)
    if allow_policy_mismatch:
        bad = [b for b in bad if not b.startswith("input policy")]
    if bad:
        hint = ""
        if any(b.startswith("input policy") for b in bad):
            hint = (f". Transcription produces '{POLICY}' features (its 30 s windows, padded with zero log-mel "
                    f"frames); tags would be off. Use a head trained on a pad30 cache extracted by this wat "
                    f"(cache schema 4+), or allow_policy_mismatch=True (--allow-policy-mismatch)")
        raise TagError("head does not fit the model: " + "; ".join(bad) + hint)


def head_vocabulary(info: HeadInfo) -> Vocabulary:
    """The classes tags are reported for: the head's vocabulary, without the parent labels that a
    `--parent-labels` head also outputs after its `primary_classes`."""
    if info.vocab_json:
        vocab = Vocabulary.from_json(info.vocab_json)
    else:
        vocab = Vocabulary.from_names(f"class {i}" for i in range(info.n_classes))
    n = info.primary_classes or len(vocab)
    return Vocabulary(vocab.keys[:n], vocab.names[:n])


def _norm(name: str) -> str:
    return ",".join(p.strip() for p in name.lower().split(","))


def resolve_classes(vocab: Vocabulary, classes) -> list[int]:
    """Class names or keys (case-insensitive), as a list or one comma-separated string, -> indices.
    Commas inside names ("Male speech, man speaking") are kept: the longest known run wins."""
    table = {}
    for i, (key, name) in enumerate(zip(vocab.keys, vocab.names)):
        table.setdefault(_norm(name), i)
        table.setdefault(_norm(key), i)
    items = classes.split(",") if isinstance(classes, str) else [p for c in classes for p in str(c).split(",")]
    items = [p.strip() for p in items]
    out, i = [], 0
    while i < len(items):
        for j in range(len(items), i, -1):
            hit = table.get(_norm(",".join(items[i:j])))
            if hit is not None:
                out.append(hit)
                i = j
                break
        else:
            if items[i]:
                close = difflib.get_close_matches(items[i].lower(), [n.lower() for n in vocab.names], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TagError(f"unknown class {items[i]!r}: not among the head's {len(vocab)} classes{hint}")
            i += 1
    if not out:  # "" or ",": no class at all would tag nothing and exit 0
        raise TagError(f"--classes {classes if isinstance(classes, str) else ','.join(map(str, classes))!r} "
                       "names no class: give class names or keys, e.g. Speech,Music")
    return sorted(set(out))


def select_tags(probs: np.ndarray, names, *, top_k: int | None = 5, threshold: float | None = None,
                classes=None) -> list[tuple[str, float]]:
    """Restrict to `classes` (indices), then keep probabilities >= `threshold`, then the `top_k`
    most probable, highest first."""
    idx = np.arange(len(probs)) if classes is None else np.asarray(sorted(classes), dtype=int)
    p = np.asarray(probs, dtype=np.float64)[idx]
    if threshold is not None:
        keep = p >= threshold
        idx, p = idx[keep], p[keep]
    order = np.argsort(-p, kind="stable")[: top_k if top_k is not None else None]
    return [(names[idx[i]], float(p[i])) for i in order]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # same memory, layout and in-place version: the caller re-sent the tensor it sent before
    return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride() and a._version == b._version)


class ResentInput:
    """A one-entry memo of an encoder pass: `memo(x, compute)` is `compute(x)`, or the result
    computed for the input sent last when `x` is that very tensor again, unchanged (`same_tensor`):
    whisper's temperature fall-backs (and word timestamps) re-send the segment they decoded, and
    each re-send would cost a whole encoder pass. A `compute` that raises stores nothing."""

    def __init__(self):
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its result)

    def __call__(self, x: torch.Tensor, compute) -> torch.Tensor:
        if self._last is None or not same_tensor(x, self._last[0]):
            self._last = (x, compute(x))
        return self._last[1]


class FrameTaps:
    """Forward hooks on the encoder blocks a head reads (`layers`, None = all) that keep, for each
    item of the next encoder call, every tapped block's output over its first `n_valid[i]` frames
    (the frames of its audio; the rest of the 1500 is padding). `take()` -> per item [n_i, L, D]."""

    def __init__(self, encoder, layers=None):
        self.blocks = encoder.blocks
        self.layers = range(len(self.blocks)) if layers is None else layers
        self.n_valid: list[int] = []
        self._outs: list[list[torch.Tensor]] = []
        self._hooks = []

    def __enter__(self) -> "FrameTaps":
        self._hooks = [self.blocks[i].register_forward_hook(self._tap) for i in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._outs = [], []

    def _tap(self, module, args, output):
        if output.shape[0] != len(self.n_valid):
            raise TagError(f"encoder batch of {output.shape[0]}, taps set for {len(self.n_valid)}")
        # copies of the audio frames only: the block's full [B, 1500, D] output is freed
        self._outs.append([output[i, :n].clone() if n < output.shape[1] else output[i]
                           for i, n in enumerate(self.n_valid)])

    def take(self) -> list[torch.Tensor]:
        """The latest call's frames, per item [n_valid[i], L, D] (on the encoder's device)."""
        outs, self._outs = self._outs, []
        return [torch.stack([o[i] for o in outs], 1) for i in range(len(self.n_valid))]


class SharedEncoder(nn.Module):
    """Stands in for `model.encoder` during one transcription (see the module docstring).
    `audio` is the float32 waveform transcription was given (used only for the fallback search)."""

    def __init__(self, encoder, audio: np.ndarray, on_frames, layers=None):
        super().__init__()
        self.encoder, self.on_frames = encoder, on_frames
        self.taps = FrameTaps(encoder, layers)  # the blocks the head reads
        self.audio, self._mel = audio, None
        self.content_frames = len(audio) // HOP_LENGTH
        self.last_seek = 0
        self._resent = ResentInput()

    def __enter__(self) -> "SharedEncoder":
        # per-frame outputs, not LayerTaps' pooled ones: where successive calls overlap is only
        # known at the next call, and pooling happens on the absolute grid after that
        self.taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.taps.__exit__(*exc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._resent(x, self._encode)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != 1:
            raise TagError(f"tagging follows one 30 s segment at a time; encoder got {tuple(x.shape)}")
        seek, size = self.locate(x[0])
        return self.encode_at(x, seek, size)

    def encode_at(self, x: torch.Tensor, seek: int, size: int) -> torch.Tensor:
        """The encoder's output for the [1, n_mels, 3000] input `x`, known to hold the file's mel
        frames [seek, seek + size) (then padding), whose audio frames go to `on_frames`."""
        self.taps.n_valid = [mel_encoder_frames(size)]
        out = self.encoder(x)
        feats, = self.taps.take()  # [n, L, D]
        if size == 0:  # no audio in this input (language detection on an empty file)
            return out
        self.last_seek = seek
        self.on_frames(seek, size, feats)
        return out

    def locate(self, x: torch.Tensor) -> tuple[int, int]:
        """(seek, segment_size) in mel frames of the [n_mels, 3000] encoder input `x`."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not _TRANSCRIBE:
            frame = frame.f_back
        if frame is not None:
            local = frame.f_locals
            if "segment_size" in local:  # inside the seek loop
                seek, size = local["seek"], local["segment_size"]
            else:  # language detection on the first 30 s, before the loop
                seek, size = 0, min(N_FRAMES, self.content_frames)
            mel = local.get("mel")
            if (isinstance(mel, torch.Tensor) and 0 <= size <= N_FRAMES
                    and torch.equal(mel[:, seek:seek + size].to(x.device, x.dtype), x[:, :size])):
                return seek, size
        return self._search(x)

    def _search(self, x: torch.Tensor) -> tuple[int, int]:
        # called outside whisper.transcribe (or a whisper whose locals differ): find the segment in
        # the file's mel. Zero columns at the end are pad_or_trim's padding; the earliest match at
        # or after the previous seek wins (whisper seeks forward).
        if self._mel is None:
            self._mel = log_mel_spectrogram(torch.from_numpy(self.audio), x.shape[0], padding=N_SAMPLES)
        mel = self._mel.to(x.dtype)
        xs = x.cpu()
        nonzero = xs.ne(0).any(0).nonzero()
        size = int(nonzero[-1]) + 1 if len(nonzero) else 0
        size = min(size, self.content_frames)
        if size > 0:
            hits = (mel[:, : self.content_frames].eq(xs[:, :1])).all(0).nonzero().squeeze(1).tolist()
            hits.sort(key=lambda p: (p < self.last_seek, p))
            for p in hits:
                n = min(size, self.content_frames - p)
                if torch.equal(mel[:, p:p + n], xs[:, :n]):
                    return p, n
        raise TagError("could not place an encoder input in the audio: tagging only follows "
                       "encoder calls on segments of the audio given to transcribe_and_tag")


def as_audio(audio_or_path) -> np.ndarray:
    if isinstance(audio_or_path, (str, Path)):
        return load_audio(audio_or_path)
    if torch.is_tensor(audio_or_path):
        audio_or_path = audio_or_path.detach().cpu().numpy()
    audio = np.ascontiguousarray(audio_or_path, dtype=np.float32)
    if audio.ndim != 1 or len(audio) == 0:
        raise ValueError(f"audio must be a non-empty 1-D 16 kHz waveform, got shape {audio.shape}")
    return audio


def _resolve_head(head, model):
    if isinstance(head, (str, Path)):  # a file, or "whisper-at": the official head of this model
        return load_named_head(head, "" if model is None else model_name(model))
    if isinstance(head, tuple) and len(head) == 2 and isinstance(head[1], HeadInfo):
        return head
    raise TypeError("head must be a checkpoint path or the (module, HeadInfo) pair load_head returns")


class Tagger:
    """A head applied to encoder frames placed on the absolute time grid: what tagging does whichever
    way the frames were made (the passes of `model.transcribe`, of faster-whisper, a batch of files).

        tagger = Tagger(model, head, time_res=10)
        pool = tagger.pool(n_samples)              # one per file
        tagger.score(pool.add_call(seek, size, frames)); ...; tagger.score(pool.close())
        tagger.output(pool)                        # {"audio_tags": [...], ("audio_classes": [...])}

    `model`: the Whisper model whose encoder makes the frames (the head is checked against it), or
    None when the caller checked the head itself (another encoder family)."""

    def __init__(self, model, head, *, time_res: float = 10.0, top_k: int | None = 5, threshold: float | None = None,
                 classes=None, allow_policy_mismatch: bool = False, keep_scores: int | None = 0, device=None):
        self.module, self.info = _resolve_head(head, model)
        if model is not None:
            check_head(model, self.info, allow_policy_mismatch=allow_policy_mismatch)
            device = next(model.parameters()).device
        self.vocab = head_vocabulary(self.info)
        self.wanted = None if classes is None else resolve_classes(self.vocab, classes)
        self.time_res, self.top_k, self.threshold, self.keep_scores = time_res, top_k, threshold, keep_scores
        self.device = torch.device(device or "cpu")
        self.module = self.module.to(self.device).eval()
        self.probs: dict[int, dict[int, np.ndarray]] = {}  # id(pool) -> window -> class probabilities

    @property
    def layers(self):
        """The encoder blocks the head reads (None: all)."""
        return self.info.blocks

    def pool(self, n_samples: int) -> WindowPool:
        """The time grid of a file of `n_samples` 16 kHz samples."""
        pool = WindowPool(n_samples // HOP_LENGTH, n_samples / SAMPLE_RATE, self.time_res, self.info.n_frames)
        self.probs[id(pool)] = {}
        return pool

    def score(self, pool: WindowPool, windows) -> None:
        """Apply the head to `windows` [(k, [L, n_frames, D])] of `pool` (as `WindowPool` hands them out)."""
        self.score_pooled(pool, [k for k, _ in windows], [x for _, x in windows])

    def score_pooled(self, pool: WindowPool, ks, feats) -> None:
        """Apply the head to windows `ks` of `pool` whose pooled features are `feats` ([L, n_frames, D] each)."""
        if not ks:
            return
        with torch.inference_mode():
            p = probabilities(self.module(torch.stack(list(feats)).to(self.device)), self.info.multilabel,
                              len(self.vocab))
        for k, row in zip(ks, p.cpu().numpy()):
            self.probs[id(pool)][k] = row

    def output(self, pool: WindowPool) -> dict:
        """{"audio_tags": one entry per window of the file, ("audio_classes": the class names when
        `keep_scores` keeps scores)}; forgets the pool."""
        probs = self.probs.pop(id(pool))
        names = self.vocab.names
        tags = []
        for k in range(pool.n_windows):
            start, end = pool.bounds(k)
            window = {"start": start, "end": end,
                      "tags": [] if k not in probs else select_tags(probs[k], names, top_k=self.top_k,
                                                                    threshold=self.threshold, classes=self.wanted)}
            if self.keep_scores != 0:
                window["scores"] = {} if k not in probs else dict(select_tags(probs[k], names, top_k=self.keep_scores))
            tags.append(window)
        out = {"audio_tags": tags}
        if self.keep_scores != 0:
            out["audio_classes"] = list(names)
        return out


def transcribe_and_tag(model, head, audio_or_path, *, time_res: float = 10.0, top_k: int | None = 5,
                       threshold: float | None = None, classes=None, allow_policy_mismatch: bool = False,
                       keep_scores: int | None = 0, **whisper_options) -> dict:
    """`model.transcribe(audio, **whisper_options)` plus `result["audio_tags"]`: one entry
    `{"start": s, "end": e, "tags": [(name, probability), ...]}` per window `[k*time_res,
    (k+1)*time_res)` of the file (the last one ends at the end of the audio), tags from the encoder
    passes the transcription makes. `head`: a checkpoint path, `load_head`'s (module, info), or
    "whisper-at" / "whisper-at-low": the official Whisper-AT head of this model (downloaded once;
    `wat.data.heads.official`).
    Tags: restricted to `classes` (names or keys), then probabilities (sigmoid for multi-label heads,
    softmax for single-label ones) >= `threshold`, then the `top_k` highest. A window no encoder
    pass covered (e.g. outside `clip_timestamps`) has no tags. The model must not be used from
    another thread meanwhile (its encoder is swapped for the duration).
    `keep_scores`: also keep each window's raw probabilities as `"scores": {name: p}` (highest
    first) for re-thresholding without the encoder: 0 none (default), K the K highest, None all;
    `result["audio_classes"]` then lists the head's class names in output order (for
    `parse_at_label`'s class indices)."""
    tagger = head if isinstance(head, Tagger) else Tagger(
        model, head, time_res=time_res, top_k=top_k, threshold=threshold, classes=classes,
        allow_policy_mismatch=allow_policy_mismatch, keep_scores=keep_scores)
    audio = as_audio(audio_or_path)
    pool = tagger.pool(len(audio))
    shared = SharedEncoder(model.encoder, audio, lambda *call: tagger.score(pool, pool.add_call(*call)),
                           tagger.layers)
    encoder = model.encoder
    model.encoder = shared
    try:
        with shared:
            result = model.transcribe(audio, **whisper_options)
    finally:
        model.encoder = encoder
    tagger.score(pool, pool.close())
    result.update(tagger.output(pool))
    return result
