"""Audio decoding: any common file -> float32 mono at 16 kHz, or a typed `AudioError`.

soundfile (libsndfile) reads wav/flac/ogg and can read just the frames a segment needs; PyAV
(ffmpeg's libraries, in-process) reads everything else (mp3, m4a, opus, webm...) and is the
fallback when libsndfile refuses a file. Resampling is soxr's high-quality mode.

Every way a file can be unusable (missing, empty, truncated, corrupt, no channels, NaN/inf samples,
absurdly long, too short once resampled, silent, offset past the end) raises `AudioError`, so a run over a whole dataset
records the clip and goes on.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from .errors import WatError

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.025  # one Whisper STFT window (400 samples at 16 kHz): shorter audio is an error
# libsndfile handles these natively (and can seek to a segment without decoding what precedes it)
SEEK_PREROLL = 0.5  # seconds decoded and dropped before a PyAV segment
SOUNDFILE_EXTS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".au", ".w64", ".rf64", ".caf"}


class AudioError(WatError):
    """A file that cannot give usable audio; `reason` is short and stable enough to count by."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_audio(path, *, sample_rate: int = SAMPLE_RATE, offset: float = 0.0, duration: float | None = None,
               max_seconds: float = 4 * 3600) -> np.ndarray:
    """Decode `duration` seconds (None = to the end) from `offset` of `path` as float32 mono at `sample_rate`.

    `max_seconds` bounds the span to decode; it is checked against the file header before decoding
    so a corrupt or enormous file cannot exhaust memory.
    """
    path = str(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioError(path, f"bad segment: offset={offset} duration={duration}")
    if not os.path.isfile(path):
        raise AudioError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")

    if Path(path).suffix.lower() in SOUNDFILE_EXTS:
        try:
            audio, rate = _read_soundfile(path, offset, duration, max_seconds)
        except sf.LibsndfileError as e:
            sf_reason = _sf_reason(e)
            if sf_reason.startswith("no audio channels"):
                raise AudioError(path, sf_reason) from None
            # libsndfile refused the container; ffmpeg knows more formats (e.g. a wav holding mp3)
            try:
                audio, rate = _read_av(path, offset, duration, max_seconds)
            except AudioError as av_err:
                raise AudioError(path, f"{sf_reason}; {av_err.reason}") from None
    else:
        audio, rate = _read_av(path, offset, duration, max_seconds)

    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise AudioError(path, "no samples decoded" if audio.shape[1] else "no audio channels")
    if not np.isfinite(audio).all():  # before resampling, which would spread a NaN over its neighbours
        raise AudioError(path, "non-finite samples (NaN or inf)")
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    # decided on what the caller gets: 1 sample at 44.1 kHz resamples to none, which padding would
    # have turned into seconds of silence carrying the clip's label
    check_clip(mono, path, sample_rate=sample_rate,
               source=f"{audio.shape[0]} sample(s) at {rate} Hz give {len(mono)} at {sample_rate} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_clip(audio: np.ndarray, path, *, sample_rate: int = SAMPLE_RATE, where: str = "",
               source: str = "") -> None:
    """THE clip-validity rule, applied to the audio a caller will use: raise AudioError when it holds
    a NaN or inf, is shorter than one analysis window (`MIN_SECONDS`), or is silent (all zero).
    `load_audio` applies it to the decoded file, `clip_window` to the clip window cut from it (a file
    silent for the window's length and loud after it is a silent clip); `where` names that window in
    the reason, `source` says where a too-short length came from."""
    tail = f" {where}" if where else ""
    if not np.isfinite(audio).all():
        raise AudioError(path, f"non-finite samples (NaN or inf){tail}")
    need = math.ceil(MIN_SECONDS * sample_rate)
    if len(audio) < need:
        got = source or f"{len(audio)} sample(s) at {sample_rate} Hz"
        raise AudioError(path, f"too short{tail}: {got}, fewer than one {MIN_SECONDS * 1000:g} ms analysis "
                               f"window ({need})")
    if not np.any(audio):
        raise AudioError(path, f"silent (all samples are zero){tail}")


def clip_window(audio: np.ndarray, n_samples: int, path, *, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, float]:
    """The clip as the encoder gets it: the first `n_samples` of `audio`, zero-padded to that length
    (`fit_length`), as float32, and the seconds of real audio in it. The audio inside the window must
    pass `check_clip` (raises AudioError): the extractor used to check only the whole file, so 6 s
    of silence followed by sound, cut to a 5 s window, was stored as a labelled silent clip."""
    real = audio[:n_samples]
    check_clip(real, path, sample_rate=sample_rate,
               where=f"in the clip window (its first {n_samples / sample_rate:g} s)" if len(audio) > n_samples else "")
    return fit_length(audio, n_samples).astype(np.float32, copy=False), len(real) / sample_rate


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Zero-pad or trim the end so that `len(audio) == n_samples`."""
    if len(audio) >= n_samples:
        return audio[:n_samples]
    return np.pad(audio, (0, n_samples - len(audio)))


def _span(path, rate: float, total: int | None, offset: float, duration: float | None, max_seconds: float):
    """(first frame, frame count or None) of the requested segment, checked against the file length."""
    start = int(round(offset * rate))
    if total is not None:
        if total == 0:
            raise AudioError(path, "empty (0 samples)")
        if start >= total:
            raise AudioError(path, f"offset {offset:g}s is past the end ({total / rate:.3f}s)")
        avail = total - start
        count = avail if duration is None else min(avail, int(round(duration * rate)))
    else:
        count = None if duration is None else int(round(duration * rate))
    if count is not None and count > max_seconds * rate:
        raise AudioError(path, f"too long: {count / rate:.0f}s to decode exceeds max_seconds={max_seconds:g}")
    return start, count


def _read_soundfile(path, offset, duration, max_seconds):
    with sf.SoundFile(path) as f:
        if f.channels <= 0:
            raise AudioError(path, "no audio channels")
        if f.format in ("WAV", "WAVEX"):
            _check_wav_length(path)
        start, count = _span(path, f.samplerate, f.frames, offset, duration, max_seconds)
        if start:
            f.seek(start)
        audio = f.read(count, dtype="float32", always_2d=True)
        if len(audio) < count:
            raise AudioError(path, f"truncated: read {len(audio)} of {count} frames")
        return audio, f.samplerate


def _check_wav_length(path) -> None:
    """libsndfile silently shortens a WAV whose data chunk runs past the end of the file: refuse it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or (f.seek(8), f.read(4))[1] != b"WAVE":
            return  # RF64 and friends: leave to libsndfile
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            tag, length = struct.unpack("<4sI", f.read(8))
            if tag == b"data":
                # 0 and 0xFFFFFFFF mean "unknown" (streamed output): not a truncation
                if length not in (0, 0xFFFFFFFF) and pos + 8 + length > size:
                    raise AudioError(path, f"truncated: data chunk declares {length} bytes, file holds {size - pos - 8}")
                return
            pos += 8 + length + (length & 1)


def _sf_reason(err: sf.LibsndfileError) -> str:
    text = str(err.error_string if hasattr(err, "error_string") else err).strip()
    if "Channel count is zero" in text:
        return "no audio channels"
    if "not a regular file" in text or "Format not recognised" in text:
        return "not a recognised audio file"
    return f"corrupt or unsupported ({text})"


def _read_av(path, offset, duration, max_seconds):
    import av  # imported on demand: most datasets are wav/flac

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(path, "no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            channels = stream.codec_context.channels
            if not rate:
                raise AudioError(path, "no sample rate in header")
            if channels == 0:
                raise AudioError(path, "no audio channels")
            total = None
            if stream.duration is not None and stream.time_base is not None:
                total = int(stream.duration * stream.time_base * rate)
            elif container.duration is not None:
                total = int(container.duration / av.time_base * rate)
            start, count = _span(path, rate, total or None, offset, duration, max_seconds)
            limit = count if count is not None else int(max_seconds * rate) + 1
            if offset > SEEK_PREROLL:
                # lands on a packet at or before the target; the pre-roll lets decoders that carry state
                # across frames (mp3 bit reservoir, AAC overlap) settle; the exact sample is cut below
                container.seek(int((offset - SEEK_PREROLL) / stream.time_base), stream=stream, backward=True)
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            to_float = av.AudioResampler(format="fltp")  # keeps rate and layout; gives [channels, n] float32
            chunks, have, pos = [], 0, None
            for frame in container.decode(stream):
                if pos is None:
                    pos = max(0, int(round(((t0 if frame.time is None else frame.time) - t0) * rate)))
                converted = [f.to_ndarray() for f in to_float.resample(frame)]
                if not converted:
                    continue
                data = np.concatenate(converted, axis=1)
                skip = max(0, start - pos)
                pos += data.shape[1]
                if skip >= data.shape[1]:
                    continue
                data = data[:, skip:]
                chunks.append(np.asarray(data, dtype=np.float32))
                have += data.shape[1]
                if have >= limit:
                    break
    except AudioError:
        raise
    except Exception as e:  # PyAV raises many types (FFmpegError, ValueError, OSError...): all mean "unreadable"
        raise AudioError(path, f"cannot decode ({type(e).__name__}: {e})") from None
    if count is not None and have < 0.9 * count and count - have > 0.5 * rate:
        # the header (e.g. an mp3 Xing frame, an mp4 moov atom) promised much more than the stream holds;
        # the tolerance covers encoder padding and bitrate-estimated durations
        raise AudioError(path, f"truncated: decoded {have / rate:.2f}s of {count / rate:.2f}s in the header")
    if count is None and have > max_seconds * rate:
        raise AudioError(path, f"too long: more than max_seconds={max_seconds:g} decoded")
    if not chunks:
        if total is None and offset > 0:
            raise AudioError(path, f"offset {offset:g}s is past the end")
        raise AudioError(path, "empty (0 samples)")
    audio = np.concatenate(chunks, axis=1)
    if count is not None:
        audio = audio[:, :count]
    return audio.T, rate
