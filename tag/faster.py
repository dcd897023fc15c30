"""faster-whisper decoding plus tags, from one encoder pass (`wat-tag --backend faster-whisper`).

faster-whisper's transcription loop (`WhisperModel.transcribe`: its seeking, temperature fall-backs,
word timestamps, VAD) runs as it is, with CTranslate2's decoder. The one place that loop calls the
encoder, `WhisperModel.encode(features)`, is answered by wat's torch encoder with the tag taps
(`FasterWhisper.encode`, a subclass's method; nothing of faster-whisper is modified or copied):
for a 30 s segment of the file at mel frame `seek` (read from the calling `generate_segments`
frame, checked against its features) the encoder gets what openai-whisper's transcribe feeds it
there (the file's whisper log-mel, frames [seek, seek + size), zero log-mel padding), its block
outputs go to the tag grid, and its output, as float32, to `ctranslate2.models.Whisper.generate`,
which takes encoder output in place of features. So the tags equal the openai-whisper backend's for
every window both backends encode (all of a file up to 30 s; longer files where they seek alike),
and the decoder sees wat's encoder output. Other encoder calls (language detection) are served by
wat's encoder on faster-whisper's own features, without tags.

With VAD (`vad_filter=True`) faster-whisper encodes only the speech it keeps, joined: no good for
tags, which are about the rest. Then faster-whisper transcribes as it does on its own (its own
encoder) and the tags come from wat's encoder over the whole file (`batch.tag_only`): two passes.

The CTranslate2 model is the `--model` folder, or for a name the offline copy (`offline_ct2_files`:
tiny.en, base; SHA-256 checked) when installed, else faster-whisper's own download of the name.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

from wat.data import DIST
from wat.extract.load import hub_offline, offline_ct2_files

from .tagging import SharedEncoder, Tagger, TagError, as_audio

log = logging.getLogger("wat.tag")


def installed_faster_whisper():
    """The faster_whisper module, or TagError naming the extra that installs it."""
    try:
        import faster_whisper
    except ImportError:
        raise TagError(f"--backend faster-whisper needs faster-whisper: pip install '{DIST}[faster]'") from None
    return faster_whisper


@functools.cache
def _model_class():
    faster_whisper = installed_faster_whisper()
    from faster_whisper.transcribe import get_ctranslate2_storage

    class FasterWhisper(faster_whisper.WhisperModel):
        """faster-whisper's WhisperModel whose `encode` is served by `wat_encode` when set."""

        wat_encode = None

        def encode(self, features: np.ndarray):
            if self.wat_encode is None:
                return super().encode(features)
            out = self.wat_encode(features)
            # StorageView.from_array does not copy: keep the arrays of the last two calls alive
            self._wat_keep = [*getattr(self, "_wat_keep", [])[-1:], out]
            return get_ctranslate2_storage(out)

    return FasterWhisper


def _ct2_source(spec: str) -> tuple[str, dict | None]:
    """(model_size_or_path, files) for faster-whisper's WhisperModel."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise TagError(f"--backend faster-whisper: {spec} is not a CTranslate2 model folder (no model.bin); "
                           "faster-whisper decodes with a CTranslate2 copy of the model (ct2-transformers-converter)")
        return str(path), None
    files = offline_ct2_files(spec)
    if files is not None:
        log.info("faster-whisper: %s from its offline CTranslate2 copy", spec)
        return spec, files
    from faster_whisper.utils import available_models

    if spec in available_models():
        return spec, None
    raise TagError(f"--backend faster-whisper: --model {spec} has no CTranslate2 copy; give a name faster-whisper "
                   f"knows ({', '.join(available_models())}) or a CTranslate2 model folder")


def load_faster(spec: str, model, *, device: str = "cpu", compute_type: str = "auto"):
    """faster-whisper's model for `--model spec`, its encoder calls served by `model` (the torch
    Whisper `load_whisper(spec)` gave: the same weights). CPU threads: torch's. TagError with the fix
    when it cannot be had."""
    installed_faster_whisper()
    name, files = _ct2_source(str(spec))
    dev = torch.device(device)
    if compute_type == "auto":  # the openai backend's precision: fp32 on the CPU, fp16 on CUDA
        compute_type = "float16" if dev.type == "cuda" else "float32"
    try:
        fw = _model_class()(name, device=dev.type, device_index=dev.index or 0, compute_type=compute_type,
                            cpu_threads=torch.get_num_threads(), files=files, local_files_only=hub_offline())
    except (OSError, ValueError, RuntimeError) as e:  # hub errors, unsupported compute types, bad folders
        raise TagError(f"--backend faster-whisper: cannot load {spec} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if fw.model.is_multilingual != model.is_multilingual or fw.model.n_mels != model.dims.n_mels:
        raise TagError(f"--backend faster-whisper: the CTranslate2 copy of {spec} is not the model wat loaded "
                       f"(multilingual {fw.model.is_multilingual} vs {model.is_multilingual}, "
                       f"mel bins {fw.model.n_mels} vs {model.dims.n_mels})")
    return fw


class _Encode:
    """`FasterWhisper.wat_encode` for one file: wat's encoder on openai-whisper's window at the seek
    faster-whisper's loop is at, through `shared` (which places the frames for the tags)."""

    def __init__(self, fw, shared: SharedEncoder, audio: np.ndarray, n_mels: int, device: torch.device):
        self.shared, self.device = shared, device
        self.mel = log_mel_spectrogram(torch.as_tensor(audio).to(device), n_mels, padding=N_SAMPLES)
        self.dtype = next(shared.encoder.parameters()).dtype
        self.loop = type(fw).__mro__[1].generate_segments.__code__

    def __call__(self, features: np.ndarray) -> np.ndarray:
        features = features if features.ndim == 3 else features[None]
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not self.loop:
            frame = frame.f_back
        with torch.inference_mode():
            if frame is None:  # language detection: faster-whisper's own window, no tags
                x = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, self.dtype)
                out = self.shared.encode_at(x, 0, 0)
            else:
                local = frame.f_locals
                seek, size, feats = local.get("seek"), local.get("segment_size"), local.get("features")
                if not (isinstance(seek, Integral) and isinstance(size, Integral) and 0 < size <= N_FRAMES
                        and isinstance(feats, np.ndarray) and features.shape[0] == 1
                        and np.array_equal(feats[:, seek:seek + size], features[0, :, :size])):
                    raise TagError("faster-whisper called its encoder where wat cannot place the segment in the "
                                   "file (a faster-whisper release whose transcription loop differs?)")
                x = pad_or_trim(self.mel[:, seek:seek + size], N_FRAMES)[None].to(self.dtype)
                out = self.shared.encode_at(x, int(seek), int(size))
        return np.ascontiguousarray(out.float().cpu().numpy())


def _as_whisper_result(segments, info) -> dict:
    """faster-whisper's (segments, info) as openai-whisper's transcribe result (whisper's writers)."""
    out = []
    for s in segments:
        seg = dataclasses.asdict(s)
        if seg.get("words") is None:
            seg.pop("words", None)
        out.append(seg)
    return {"text": "".join(s["text"] for s in out), "segments": out, "language": info.language}


def faster_options(whisper_options: dict) -> dict:
    """wat-tag's transcribe options (the whisper command's) as faster-whisper's transcribe takes them."""
    opts = dict(whisper_options)
    opts.pop("fp16", None)  # faster-whisper: the compute type
    opts.pop("verbose", None)
    if "temperature" in opts:
        t = opts["temperature"]
        opts["temperature"] = [float(x) for x in t] if isinstance(t, (list, tuple)) else float(t)
    return opts


@torch.inference_mode()
def transcribe_and_tag_faster(fw, model, tagger: Tagger, audio_or_path, **whisper_options) -> dict:
    """`transcribe_and_tag` with faster-whisper's decoding: `fw` from `load_faster`, `model` the
    torch Whisper serving its encoder calls, `tagger` the head. The result is openai-whisper's shape
    (text, segments, language) plus audio_tags; `vad_filter=True`: see the module docstring."""
    from .batch import tag_only

    audio = as_audio(audio_or_path)
    opts = faster_options(whisper_options)
    if opts.get("vad_filter"):
        segments, info = fw.transcribe(audio, **opts)
        result = _as_whisper_result(list(segments), info)
        tags, = tag_only(model, tagger, [audio], fp16=bool(whisper_options.get("fp16")))
        result.update(tags)
        return result
    pool = tagger.pool(len(audio))
    shared = SharedEncoder(model.encoder, audio, lambda *call: tagger.score(pool, pool.add_call(*call)),
                           tagger.layers)
    device = next(model.parameters()).device
    with shared:
        fw.wat_encode = _Encode(fw, shared, audio, model.dims.n_mels, device)
        try:
            segments, info = fw.transcribe(audio, **opts)
            result = _as_whisper_result(list(segments), info)  # the loop runs (and encodes) here
        finally:
            fw.wat_encode = None
            fw._wat_keep = []
    tagger.score(pool, pool.close())
    result.update(tagger.output(pool))
    return result
