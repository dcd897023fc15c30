"""Mixtures per second (transcript + pooled layer features) of wat-robust's one-pass batched path
against the paper's way, side by side on the same mixtures.

- wat-robust: `decode_batch` (per-clip pad30 windows = transcribe's, one `whisper.decode` call per batch,
  features pooled by the taps during its single encoder call), features copied to the host.
- paper's way: per mixture, `model.transcribe` (temperature 0, one segment) and then a separate
  encoder pass for the features (`encode_layers`, pad30).
- bare encoder: `encode_layers` on the same batches, i.e. the encoder work any method must do once
  per mixture, without any decoding (an upper bound for wat-robust's rate).

Mixtures: the committed espeak-ng utterances (3-4 s) with demo noise at 0 dB. Modes alternate in
rounds after a warm-up; the best round of each is reported. Encoder passes are counted.

    python bench/robust_throughput.py --model tiny.en --mixtures 16 --rounds 3          # CPU
    python bench/robust_throughput.py --device cuda --random-weights large-v1 --mixtures 64 --batch-size 32
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import whisper

from wat.data import load_dataset, make_demo
from wat.data.audio import load_audio
from wat.extract import EncoderPasses, encode_layers, load_whisper
from wat.robust.asr import AsrOptions, decode_batch
from wat.robust.mix import mix
from wat.robust.speech import load_speech
from wat.robust.wer import corpus, normalize

ROOT = Path(__file__).resolve().parents[1]


def mixtures(n: int, snr: float = 0.0) -> tuple[list[np.ndarray], list[str]]:
    """n mixtures of the committed utterances with demo noise, and their reference transcripts."""
    speech = load_speech(ROOT / "tests/fixtures/librispeech").utterances
    audio = [load_audio(u.path) for u in speech]
    with tempfile.TemporaryDirectory() as tmp:
        noise = load_dataset("esc50", make_demo(Path(tmp) / "noise", clips_per_class=1, seed=0))
        clips = [load_audio(c.path) for c in noise.clips]
    return ([mix(audio[k % len(audio)], clips[k % len(clips)], snr) for k in range(n)],
            [speech[k % len(speech)].text for k in range(n)])


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--random-weights", metavar="NAME", help="a random-weight model of these dims (large-v1): "
                   "throughput only, the transcripts are noise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixtures", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sample-len", type=int, help="most tokens per utterance, both ways (default whisper's 224; with "
                   "--random-weights the longest reference's token count: a random decoder never stops by itself)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON (bench/gpu_check.sh)")
    a = p.parse_args(argv)
    for name in ("mixtures", "batch_size", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.sample_len is not None and not 1 <= a.sample_len <= 224:
        p.error("--sample-len must be in 1..224 (half of Whisper's text context)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.random_weights:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import random_whisper
        model = random_whisper(a.random_weights, a.device)
    else:
        model = load_whisper(a.model, device=a.device)
    xs, refs = mixtures(a.mixtures)
    if a.sample_len is None and a.random_weights:  # the work a trained model does: each reference, then end-of-text
        tokenizer = whisper.tokenizer.get_tokenizer(multilingual=False)
        a.sample_len = max(len(tokenizer.encode(" " + r)) for r in refs) + 1
    asr = AsrOptions(sample_len=a.sample_len)
    fp16 = a.device.startswith("cuda")
    batches = [xs[i:i + a.batch_size] for i in range(0, len(xs), a.batch_size)]

    def ours():
        texts = []
        for b in batches:
            t, f = decode_batch(model, b, asr)
            f.cpu().numpy()
            texts += t
        return texts

    def paper():
        texts = []
        for x in xs:
            r = model.transcribe(x, temperature=0.0, without_timestamps=True, condition_on_previous_text=True,
                                 no_speech_threshold=None, language="en", fp16=fp16,
                                 **({"sample_len": a.sample_len} if a.sample_len else {}))
            encode_layers(model, x[None], policy="pad30").cpu().numpy()
            texts.append(r["text"].strip())
        return texts

    def bare():
        for b in batches:  # padded to 30 s of samples only to stack different lengths: same encoder work
            encode_layers(model, np.stack([np.pad(x, (0, 480000 - len(x))) for x in b]), policy="pad30").cpu()
        return None

    modes = {"wat-robust": ours, "paper": paper, "bare encoder": bare}
    best = {k: float("inf") for k in modes}
    passes, out = {}, {}
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for name, fn in modes.items():
            _sync(a.device)
            with EncoderPasses(model) as c:
                t0 = time.perf_counter()
                out[name] = fn()
                _sync(a.device)
                best[name] = min(best[name], time.perf_counter() - t0)
            passes[name] = c.n
    name = f"random-{a.random_weights}" if a.random_weights else a.model
    dev = torch.cuda.get_device_name(0) if fp16 else f"{platform.processor() or platform.machine()}, " \
          f"{len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"
    print(f"{name} on {a.device} ({dev}), {len(xs)} mixtures of 3-4 s at 0 dB, batch {a.batch_size}, "
          f"best of {a.rounds} rounds, at most {a.sample_len or 224} tokens per utterance; torch {torch.__version__}")
    for k in modes:
        print(f"  {k:13s} {len(xs) / best[k]:8.2f} mixtures/s  ({best[k]:.2f} s, {passes[k]} encoder calls)")
    same = sum(normalize(x) == normalize(y) for x, y in zip(out["wat-robust"], out["paper"]))
    print(f"  speed-up wat-robust / paper = {best['paper'] / best['wat-robust']:.2f}x; "
          f"wat-robust runs at {best['bare encoder'] / best['wat-robust']:.2f} of the encoder-only rate")
    # both decode transcribe's window (pad30 = log-mel padding) without timestamps: the texts should agree
    print(f"  identical normalised transcripts {same}/{len(xs)}; corpus WER wat-robust "
          f"{100 * corpus(zip(refs, out['wat-robust'])).wer:.1f}% vs transcribe {100 * corpus(zip(refs, out['paper'])).wer:.1f}%")
    if a.json:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_json
        write_json(a.json, {"bench": "robust", "device": dev, "model": name, "mixtures": len(xs),
                            "sample_len": a.sample_len,
                            "rates": {k: len(xs) / best[k] for k in modes}, "speedup": best["paper"] / best["wat-robust"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
