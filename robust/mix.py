"""Noisy speech: which noise clip goes with which utterance, and the mixture at a target SNR.

Assignment (deterministic for a seed and the sorted utterance / noise lists): the classes are put
in a seeded random order and utterance k gets `per_utterance` consecutive classes of that cycle,
starting at class k * per_utterance, so every class is used as evenly as the utterance count
allows; within a class the clip is drawn by a generator seeded by (seed, utterance index, slot).
The same noise clip is used for an utterance at every SNR, so the WER change between two SNRs is
measured on the same speech with the same noise.

SNR: measured over the whole utterance, `10 log10(mean(speech^2) / mean(noise^2))`, with the noise
looped (or cropped) to exactly the utterance's length, starting at its first sample. The whole
utterance rather than only its active samples: it needs no voice-activity threshold, and the
paper's LibriSpeech utterances are trimmed read speech with little silence. The mixture is
`speech + g * noise` in float32, never clipped or renormalised (Whisper takes float input), so a
-10 dB mixture may exceed 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from wat.data.errors import WatError


class MixError(WatError, ValueError):
    """Speech and noise that cannot be mixed at the asked SNR (silent speech, silent noise)."""


@dataclass(frozen=True)
class Assignment:
    utterance: int   # index into the sorted utterance list
    slot: int        # 0..per_utterance-1
    noise: int       # index into the noise dataset's clips


def assign_noise(n_utterances: int, noise_labels: list[int], n_classes: int, *, per_utterance: int = 1,
                 seed: int = 0) -> list[Assignment]:
    """Noise clip per (utterance, slot), class-balanced; `noise_labels[j]` is clip j's class."""
    by_class = [[j for j, c in enumerate(noise_labels) if c == k] for k in range(n_classes)]
    classes = [k for k in range(n_classes) if by_class[k]]
    if not classes:
        raise MixError("no noise clips to assign")
    order = np.random.default_rng([seed, 0]).permutation(classes).tolist()
    per_utterance = min(per_utterance, len(order))  # never the same class twice for one utterance
    out = []
    for u in range(n_utterances):
        for s in range(per_utterance):
            clips = by_class[order[(u * per_utterance + s) % len(order)]]
            pick = np.random.default_rng([seed, 1, u, s]).integers(len(clips))
            out.append(Assignment(u, s, clips[int(pick)]))
    return out


def fit_noise(noise: np.ndarray, n: int) -> np.ndarray:
    """The noise looped (np.resize tiles from the start) or cropped to exactly n samples."""
    if len(noise) == 0:
        raise MixError("empty noise clip")
    return np.resize(noise, n)


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def snr_db(speech: np.ndarray, noise: np.ndarray) -> float:
    """10 log10 of the speech power over the noise power, both over their whole length."""
    return 10.0 * np.log10(power(speech) / power(noise))


def mix(speech: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """speech + noise (looped/cropped to the speech, scaled so that the SNR is `snr` dB), float32."""
    speech = np.asarray(speech, np.float32)
    if speech.ndim != 1 or len(speech) == 0:
        raise MixError("empty utterance")
    if not np.isfinite(snr):
        raise MixError(f"SNR must be finite, got {snr}")
    noise = fit_noise(np.asarray(noise, np.float32), len(speech))
    ps, pn = power(speech), power(noise)
    if ps == 0:
        raise MixError("silent utterance: its SNR is undefined")
    if pn == 0:
        raise MixError("the noise is silent over the utterance's length: its SNR is undefined")
    gain = np.sqrt(ps / (pn * 10.0 ** (snr / 10.0)))
    return (speech.astype(np.float64) + gain * noise.astype(np.float64)).astype(np.float32)
