"""A small synthetic dataset in the ESC-50 layout: the embedded default of `make demo`.

Eleven procedurally synthesised sound classes, made hard in the ways real recordings are hard, so
that layers, heads and fusions give different answers (a demo where everything scores 100% shows
nothing):
- confusable classes: neighbours share parameter ranges (a tone with vibrato vs a siren with a small
  step, slow chirps vs sirens, fast click trains vs a low engine buzz, dense rain vs noise, the three
  noise colours with jittered slopes);
- a background scene under every clip (coloured noise, speech-like babble or a hum, with a slow level
  drift) at a signal-to-noise ratio drawn from 10..30 dB (`SNR_DB`), sometimes plus a quieter event of another
  class;
- loudness drawn from -30..-3 dB full scale (`LEVEL_DBFS`).
Every clip comes from its own `numpy` Generator seeded by (seed, class, clip), so the output is
byte-identical for a seed and does not depend on anything installed (no TTS).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from .files import atomic_write, make_folder, remove_bare, write_csv

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


def _fm(rng, f: float, depth: float) -> np.ndarray:
    """Instantaneous frequency f with a slow vibrato of relative `depth`."""
    return f * (1 + depth * np.sin(2 * np.pi * rng.uniform(3, 7) * _t() + rng.uniform(0, 6.3)))


def tone(rng):
    # sometimes with vibrato and a few harmonics: close to a siren with a small step
    freq = _fm(rng, rng.uniform(200, 2000), rng.choice([0.0, rng.uniform(0.005, 0.04)]))
    phase = 2 * np.pi * np.cumsum(freq) / RATE
    h = rng.uniform(0, 0.3)
    return (np.sin(phase) + h * np.sin(2 * phase) + h / 2 * np.sin(3 * phase)) * _envelope(rng)


def chirp(rng):
    f0, f1 = sorted(rng.uniform([150, 900], [800, 6000]))[:: rng.choice([-1, 1])]
    period = rng.uniform(0.3, 2.0)  # repeated sweeps; slow narrow ones sound like a wailing siren
    frac = (_t() % period) / period
    freq = f0 * (f1 / f0) ** frac
    return np.sin(2 * np.pi * np.cumsum(freq) / RATE) * _envelope(rng)


def white_noise(rng):
    return _colored(rng, rng.uniform(0.0, 0.4)) * _envelope(rng)


def pink_noise(rng):
    return _colored(rng, rng.uniform(0.7, 1.3)) * _envelope(rng)


def brown_noise(rng):
    return _colored(rng, rng.uniform(1.6, 2.2)) * _envelope(rng)


def click_train(rng):
    rate = np.exp(rng.uniform(np.log(4), np.log(60)))  # fast trains buzz like a low engine
    x = np.zeros(N)
    times = np.arange(rng.uniform(0, 0.2), SECONDS, 1 / rate)
    times = times + rng.normal(0, 0.05 / rate, len(times))  # slight jitter, never reordering clicks
    x[np.clip((times * RATE).astype(int), 0, N - 1)] = 1.0
    t = np.arange(int(0.003 * RATE)) / RATE
    click = (np.sin(2 * np.pi * rng.uniform(500, 4000) * t) + 0.5 * rng.standard_normal(len(t))) * np.exp(-t / 5e-4)
    return _convolve(x, click) * _envelope(rng)


def siren(rng):
    low = rng.uniform(350, 1200)
    high = low * rng.uniform(1.08, 1.5)   # small steps are close to a tone with vibrato
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
    return (hum * am + rng.uniform(0.3, 1.0) * _colored(rng, 2.0)) * _envelope(rng)


def rain(rng):
    # many short damped resonances (drops) at random times and pitches, over a wash of noise; dense
    # rain with a loud wash is close to the noise classes
    n, length = int(rng.uniform(200, 1500) * SECONDS), int(0.006 * RATE)
    t = np.arange(length) / RATE
    drops = np.sin(2 * np.pi * rng.uniform(700, 5000, (n, 1)) * t) * np.exp(-t / rng.uniform(0.0005, 0.002, (n, 1)))
    x = np.zeros(N + length)
    np.add.at(x, rng.integers(0, N, n)[:, None] + np.arange(length), drops * rng.uniform(0.2, 1.0, (n, 1)))
    x = x[:N] / np.abs(x).max()
    return (x + rng.uniform(0.05, 0.5) * _colored(rng, 1.0)) * _envelope(rng)


def birds(rng):
    x = np.zeros(N)
    for start in np.sort(rng.uniform(0, SECONDS - 0.2, rng.integers(5, 16))):
        length = rng.uniform(0.05, 0.15)
        t = np.arange(int(length * RATE)) / RATE
        f0, f1 = rng.uniform(1500, 6000, 2)
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
SNR_DB = (10.0, 30.0)       # event vs background scene, uniform
LEVEL_DBFS = (-30.0, -3.0)  # peak level of the mix, uniform
DISTRACTOR = 0.3            # chance of a second, quieter event of another class in the background
DISTRACTOR_DB = (6.0, 15.0)  # how much quieter than the labelled event
EVENTS_DB = (0.0, 6.0)       # synth_clip(events=...): how much quieter each further event than the first


def _babble(rng) -> np.ndarray:
    """Speech-like background: a few harmonic voices with a wandering pitch, syllable-rate bursts."""
    t = _t()
    out = np.zeros(N)
    for _ in range(rng.integers(2, 6)):
        f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.3, 2) * t + rng.uniform(0, 6.3)))
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        voice = sum(np.sin(k * phase) * np.exp(-((k * 150 - rng.uniform(300, 900)) / 400) ** 2) for k in range(1, 9))
        syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6.3)), 0, 1) ** 2
        out += voice * syllables
    return out


def _hum(rng) -> np.ndarray:
    """Mains or machinery hum: a low harmonic stack over brown noise."""
    phase = 2 * np.pi * rng.choice([50.0, 60.0, rng.uniform(80, 160)]) * _t()
    return sum(np.sin(k * phase) / k for k in range(1, 6)) + rng.uniform(0.2, 1) * _colored(rng, 2.0)


def _background(rng) -> np.ndarray:
    kind = rng.integers(3)
    x = _colored(rng, rng.uniform(0, 2)) if kind == 0 else _babble(rng) if kind == 1 else _hum(rng)
    drift = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.5) * _t() + rng.uniform(0, 6.3))  # slow level change
    return x * drift


def _power(x: np.ndarray) -> float:
    """Mean power over the part where the signal is active (events do not fill the clip)."""
    active = np.abs(x) > 1e-3 * np.abs(x).max()
    return float(np.mean(x[active] ** 2)) if active.any() else 0.0


def synth_clip(target: int, seed: int, index: int, *, events: tuple[int, ...] = (),
               snr_db: tuple[float, float] = SNR_DB) -> np.ndarray:
    """Clip `index` of class `target` as float32 in [-1, 1]: the event over a background scene at a
    random SNR (sometimes with a quieter event of another class), at a random loudness.
    `events`: classes sounding together with `target`, each 0..EVENTS_DB below it (a class that is
    a combination of sounds, or a multi-label clip); `snr_db`: the range the SNR is drawn from (of
    the sum of the events against the scene). The defaults give the demo's clips, byte for byte."""
    rng = np.random.default_rng([seed, target, *events, index])
    x = CLASSES[target](rng)
    x = x / np.sqrt(_power(x))
    for e in events:
        other = CLASSES[e](rng)
        x = x + other * 10 ** (-rng.uniform(*EVENTS_DB) / 20) / np.sqrt(_power(other))
    if events:
        x = x / np.sqrt(_power(x))
    scene = _background(rng)
    scene *= 10 ** (-rng.uniform(*snr_db) / 20) / np.sqrt(np.mean(scene ** 2))
    if rng.uniform() < DISTRACTOR:
        other = (target + rng.integers(1, len(CLASSES))) % len(CLASSES)
        d = CLASSES[other](rng)
        scene += d * 10 ** (-rng.uniform(*DISTRACTOR_DB) / 20) / np.sqrt(_power(d))
    mix = x + scene
    return (mix * 10 ** (rng.uniform(*LEVEL_DBFS) / 20) / np.abs(mix).max()).astype(np.float32)


def make_demo(out, clips_per_class: int = 8, seed: int = 0) -> Path:
    """Write `out`/audio/*.wav (44.1 kHz 16-bit, 5 s) and `out`/meta/esc50.csv; returns `out`.
    Every file is written atomically (`files.atomic_write`); when a write fails (a full disk) the
    files and folders this call created are removed again and the OSError is raised: no
    half-written clip and no dataset without its manifest is left behind."""
    if clips_per_class < 1:
        raise ValueError("clips_per_class must be at least 1")
    out = Path(out)
    made = make_folder(out / "audio") + make_folder(out / "meta")
    new: list[Path] = []
    rows = []
    try:
        for target, fn in enumerate(CLASSES):
            for j in range(clips_per_class):
                fold = j % FOLDS + 1  # balanced folds per class
                src = f"{target:02d}{j:04d}"
                name = f"{fold}-{src}-A-{target}.wav"
                buf = io.BytesIO()
                sf.write(buf, synth_clip(target, seed, j), RATE, subtype="PCM_16", format="WAV")
                path = out / "audio" / name
                if not path.exists():
                    new.append(path)
                atomic_write(path, buf.getvalue())
                rows.append((name, fold, target, fn.__name__, "False", src, "A"))
        rows.sort()
        write_csv(out / "meta" / "esc50.csv", ("filename", "fold", "target", "category", "esc10", "src_file", "take"),
                  rows, lineterminator="\n")
    except OSError:
        for path in new:
            path.unlink(missing_ok=True)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # innermost first
            remove_bare([folder])
        raise
    return out
