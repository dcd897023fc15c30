"""A small synthetic dataset in the ESC-50 layout: the embedded default of `make demo`.

Eleven procedurally synthesised sound classes, different enough that a probe on Whisper features
separates them, with per-clip randomness (pitch, timing, level, background noise) so that it is a
real classification task. Every clip comes from its own `numpy` Generator seeded by
(seed, class, clip), so the output is byte-identical for a seed and does not depend on anything
installed (no TTS).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .files import write_csv

RATE = 44_100
SECONDS = 5.0
N = int(RATE * SECONDS)
FOLDS = 5


def _t() -> np.ndarray:
    return np.arange(N) / RATE


def _colored(rng, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit peak."""
    # white Gaussian noise has i.i.d. complex Gaussian Fourier coefficients: shape them directly
    m = N // 2 + 1
    spec = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    f = np.arange(m, dtype=np.float64)
    f[0] = 1
    x = np.fft.irfft(spec * f ** (-exponent / 2), N)
    return x / np.abs(x).max()


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    n = 1 << (len(x) + len(kernel)).bit_length()  # power of two: arbitrary FFT sizes can be very slow
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(kernel, n), n)[: len(x)]


def _envelope(rng, fade: float = 0.05) -> np.ndarray:
    """A random active span (onset, length) with short fades, so events do not all fill the clip."""
    start = rng.uniform(0, 1.5)
    stop = rng.uniform(max(start + 2.0, 3.5), SECONDS)
    t = _t()
    return np.clip(np.minimum((t - start) / fade, (stop - t) / fade), 0, 1)


def tone(rng):
    f = rng.uniform(200, 2000)
    return np.sin(2 * np.pi * f * _t() + rng.uniform(0, 2 * np.pi)) * _envelope(rng)


def chirp(rng):
    f0, f1 = sorted(rng.uniform([150, 1500], [600, 6000]))[:: rng.choice([-1, 1])]
    period = rng.uniform(0.5, 2.0)  # repeated sweeps
    frac = (_t() % period) / period
    freq = f0 * (f1 / f0) ** frac
    return np.sin(2 * np.pi * np.cumsum(freq) / RATE) * _envelope(rng)


def white_noise(rng):
    return rng.uniform(-1, 1, N) * _envelope(rng)


def pink_noise(rng):
    return _colored(rng, 1.0) * _envelope(rng)


def brown_noise(rng):
    return _colored(rng, 2.0) * _envelope(rng)


def click_train(rng):
    rate = rng.uniform(4, 40)
    x = np.zeros(N)
    times = np.arange(rng.uniform(0, 0.2), SECONDS, 1 / rate)
    times = times + rng.normal(0, 0.05 / rate, len(times))  # slight jitter, never reordering clicks
    x[np.clip((times * RATE).astype(int), 0, N - 1)] = 1.0
    t = np.arange(int(0.003 * RATE)) / RATE
    click = (np.sin(2 * np.pi * rng.uniform(1000, 4000) * t) + 0.5 * rng.standard_normal(len(t))) * np.exp(-t / 5e-4)
    return _convolve(x, click) * _envelope(rng)


def siren(rng):
    low = rng.uniform(350, 800)
    high = low * rng.uniform(1.25, 1.5)
    half = rng.uniform(0.25, 0.8)
    freq = np.where((_t() // half) % 2 == 0, low, high)
    phase = 2 * np.pi * np.cumsum(freq) / RATE
    return (np.sin(phase) + 0.4 * np.sin(3 * phase) + 0.2 * np.sin(5 * phase)) * _envelope(rng)


def engine(rng):
    f0 = rng.uniform(25, 90)
    t = _t()
    wobble = 1 + 0.02 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t)
    phase = 2 * np.pi * f0 * np.cumsum(wobble) / RATE
    hum = sum(np.sin(k * phase + rng.uniform(0, 6.3)) / k ** 0.7 for k in range(1, 16))
    am = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 10) * t)
    return (hum * am + 0.3 * _colored(rng, 2.0)) * _envelope(rng)


def rain(rng):
    # many short damped resonances (drops) at random times and pitches, over a soft wash of noise
    n, length = int(rng.uniform(200, 800) * SECONDS), int(0.006 * RATE)
    t = np.arange(length) / RATE
    drops = np.sin(2 * np.pi * rng.uniform(700, 5000, (n, 1)) * t) * np.exp(-t / rng.uniform(0.0005, 0.002, (n, 1)))
    x = np.zeros(N + length)
    np.add.at(x, rng.integers(0, N, n)[:, None] + np.arange(length), drops * rng.uniform(0.2, 1.0, (n, 1)))
    return (x[:N] + 0.1 * _colored(rng, 1.0)) * _envelope(rng)


def birds(rng):
    x = np.zeros(N)
    for start in np.sort(rng.uniform(0, SECONDS - 0.2, rng.integers(5, 16))):
        length = rng.uniform(0.05, 0.15)
        t = np.arange(int(length * RATE)) / RATE
        f0, f1 = rng.uniform(2000, 6000, 2)
        freq = f0 + (f1 - f0) * t / length + 300 * np.sin(2 * np.pi * rng.uniform(20, 60) * t)
        i = int(start * RATE)
        x[i : i + len(t)] += np.sin(2 * np.pi * np.cumsum(freq) / RATE) * np.sin(np.pi * t / length)
    return x


def knocking(rng):
    x = np.zeros(N)
    for start in np.sort(rng.uniform(0, SECONDS - 1.0, rng.integers(2, 5))):
        gap = rng.uniform(0.12, 0.3)
        for k in range(rng.integers(2, 5)):
            x[int((start + k * gap) * RATE)] += rng.uniform(0.6, 1.0)
    t = np.arange(int(0.12 * RATE)) / RATE
    f = rng.uniform(90, 300)
    body = np.sin(2 * np.pi * f * t) * np.exp(-t * rng.uniform(30, 60)) + 0.3 * rng.standard_normal(len(t)) * np.exp(-t * 400)
    return _convolve(x, body)


CLASSES = (tone, chirp, white_noise, pink_noise, brown_noise, click_train, siren, engine, rain, birds, knocking)


def synth_clip(target: int, seed: int, index: int) -> np.ndarray:
    """Clip `index` of class `target` as float32 in [-1, 1]: event at a random level plus background noise."""
    rng = np.random.default_rng([seed, target, index])
    x = CLASSES[target](rng)
    x = x / np.abs(x).max() * rng.uniform(0.1, 0.7)
    snr_db = rng.uniform(15, 35)
    background = _colored(rng, rng.uniform(0, 2)) * np.sqrt(np.mean(x**2)) * 10 ** (-snr_db / 20)
    return np.clip(x + background, -1, 1).astype(np.float32)


def make_demo(out, clips_per_class: int = 8, seed: int = 0) -> Path:
    """Write `out`/audio/*.wav (44.1 kHz 16-bit, 5 s) and `out`/meta/esc50.csv; returns `out`."""
    if clips_per_class < 1:
        raise ValueError("clips_per_class must be at least 1")
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    rows = []
    for target, fn in enumerate(CLASSES):
        for j in range(clips_per_class):
            fold = j % FOLDS + 1  # balanced folds per class
            src = f"{target:02d}{j:04d}"
            name = f"{fold}-{src}-A-{target}.wav"
            sf.write(out / "audio" / name, synth_clip(target, seed, j), RATE, subtype="PCM_16")
            rows.append((name, fold, target, fn.__name__, "False", src, "A"))
    rows.sort()
    write_csv(out / "meta" / "esc50.csv", ("filename", "fold", "target", "category", "esc10", "src_file", "take"),
              rows, lineterminator="\n")
    return out
