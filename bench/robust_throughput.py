"""Mixtures per second (transcript + pooled layer features) of wat-robust's one-pass batched path
against the paper's way, side by side on the same mixtures, for a Whisper model and a CTC model (the
two kinds of recognizer wat-robust compares in one run).

Whisper:
- wat-robust: `decode_batch` (per-clip pad30 windows = transcribe's, one `whisper.decode` call per batch,
  features pooled by the taps during its single encoder call), features copied to the host.
- paper's way: per mixture, `model.transcribe` (temperature 0, one segment) and then a separate
  encoder pass for the features (`encode_layers`, pad30).
- bare encoder: `encode_layers` on the same batches, i.e. the encoder work any method must do once
  per mixture, without any decoding (an upper bound for wat-robust's rate).
CTC (`*ForCTC`, random weights of a real shape unless a folder is given):
- wat-robust: `decode_ctc`, batches of mixtures, one forward gives the pooled layers and the logits
  (greedy CTC through the checkpoint's tokenizer).
- paper's way: per mixture, transformers' forward -> logits.argmax -> tokenizer.batch_decode, then a
  separate encoder pass for the features (`pooled`).
- bare encoder: `pooled` on the same batches.
The two-model run: mixtures/s when every mixture goes through both models (1 / the sum of the times
per mixture), wat-robust against the paper's way.

Mixtures: the committed espeak-ng utterances (3-4 s) with demo noise at 0 dB. Modes alternate in
rounds after a warm-up; the best round of each is reported.

    python bench/robust_throughput.py --model tiny.en --ctc wav2vec2-base --mixtures 16 --rounds 3     # CPU
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
from wat.robust.asr import AsrOptions, decode_batch, decode_ctc
from wat.robust.mix import mix
from wat.robust.speech import load_speech
from wat.robust.wer import corpus, normalize

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 25


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


def one_pass(decode, batches) -> list[str]:
    """wat-robust's way: per batch one call giving the transcripts and the features (copied to the host)."""
    texts = []
    for b in batches:
        t, f = decode(b)
        f.cpu().numpy()
        texts += t
    return texts


def whisper_modes(model, xs, batches, asr, fp16, sample_len):
    def ours():
        return one_pass(lambda b: decode_batch(model, b, asr), batches)

    def paper():
        texts = []
        for x in xs:
            r = model.transcribe(x, temperature=0.0, without_timestamps=True, condition_on_previous_text=True,
                                 no_speech_threshold=None, language="en", fp16=fp16,
                                 **({"sample_len": sample_len} if sample_len else {}))
            encode_layers(model, x[None], policy="pad30").cpu().numpy()
            texts.append(r["text"].strip())
        return texts

    def bare():
        for b in batches:  # padded to 30 s of samples only to stack different lengths: same encoder work
            encode_layers(model, np.stack([np.pad(x, (0, 480000 - len(x))) for x in b]), policy="pad30").cpu()
        return None

    return {"wat-robust": ours, "paper": paper, "bare encoder": bare}


def ctc_modes(enc, xs, batches):
    from wat.extract.encoders.hf_speech import normalized

    def ours():
        return one_pass(lambda b: decode_ctc(enc, b, FRAMES), batches)

    @torch.inference_mode()
    def paper():
        texts = []
        for x in xs:   # transformers' own way, one utterance at a time; then the features in a second pass
            clip = torch.as_tensor(x, dtype=torch.float32, device=enc.device)
            clip = normalized(clip) if enc.normalize else clip
            with torch.autocast(enc.device.type, dtype=torch.float16, enabled=enc.device.type == "cuda"):
                ids = enc.model(clip[None]).logits.argmax(-1)
            texts += enc.ctc.tokenizer.batch_decode(ids.cpu())
            enc.pooled([x], frames=FRAMES, policy="trim").cpu().numpy()
        return texts

    def bare():
        for b in batches:
            enc.pooled(b, frames=FRAMES, policy="trim").cpu()
        return None

    return {"wat-robust": ours, "paper": paper, "bare encoder": bare}


def measure(modes: dict, rounds: int, device: str, passes_of) -> tuple[dict, dict, dict]:
    """Best time per mode over `rounds` (after one warm-up round), encoder passes, outputs."""
    best = {k: float("inf") for k in modes}
    passes, out = {}, {}
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in modes.items():
            _sync(device)
            with passes_of() as c:
                t0 = time.perf_counter()
                out[name] = fn()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
            passes[name] = c.n
    return best, passes, out


class BlockCalls:
    """Counts forward calls of a module (a CTC model's first transformer block: one per forward)."""

    def __init__(self, module):
        self.module, self.n = module, 0

    def __enter__(self):
        self.hook = self.module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def main(argv=None) -> int:
    from wat.data.clikit.args import positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--random-weights", metavar="NAME", help="a random-weight model of these dims (large-v1): "
                   "throughput only, the transcripts are noise")
    p.add_argument("--ctc", default="wav2vec2-base", metavar="SHAPE|FOLDER|none",
                   help="the CTC model: a shape of bench/common.py HF_SHAPES (random weights, saved and loaded "
                        "through load_encoder), a *ForCTC folder, or none (default wav2vec2-base: "
                        "facebook/wav2vec2-base-960h's shape)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixtures", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--sample-len", type=positive_int, help="most tokens per utterance, both ways (default whisper's 224; with "
                   "--random-weights the longest reference's token count: a random decoder never stops by itself)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON (bench/gpu_check.sh)")
    a = p.parse_args(argv)
    for name in ("mixtures", "batch_size", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.sample_len is not None and not 1 <= a.sample_len <= 224:
        p.error("--sample-len must be in 1..224 (half of Whisper's text context)")
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    if a.random_weights:
        from common import random_whisper
        model = random_whisper(a.random_weights, a.device)
    else:
        model = load_whisper(a.model, device=a.device)
    xs, refs = mixtures(a.mixtures)
    if a.sample_len is None and a.random_weights:  # the work a trained model does: each reference, then end-of-text
        tokenizer = whisper.tokenizer.get_tokenizer(multilingual=False)
        a.sample_len = max(len(tokenizer.encode(" " + r)) for r in refs) + 1
    fp16 = a.device.startswith("cuda")
    batches = [xs[i:i + a.batch_size] for i in range(0, len(xs), a.batch_size)]
    name = f"random-{a.random_weights}" if a.random_weights else a.model
    dev = torch.cuda.get_device_name(0) if fp16 else f"{platform.processor() or platform.machine()}, " \
          f"{len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"
    print(f"on {a.device} ({dev}), {len(xs)} mixtures of 3-4 s at 0 dB, batch {a.batch_size}, best of {a.rounds} "
          f"rounds; torch {torch.__version__}")

    results = {}
    modes = whisper_modes(model, xs, batches, AsrOptions(sample_len=a.sample_len), fp16, a.sample_len)
    results[name] = measure(modes, a.rounds, a.device, lambda: EncoderPasses(model))
    best, _, out = results[name]
    same = sum(normalize(x) == normalize(y) for x, y in zip(out["wat-robust"], out["paper"]))
    report(name, f"Whisper, at most {a.sample_len or 224} tokens per utterance", results[name], len(xs))
    print(f"  identical normalised transcripts {same}/{len(xs)}; corpus WER wat-robust "
          f"{100 * corpus(zip(refs, out['wat-robust'])).wer:.1f}% vs transcribe {100 * corpus(zip(refs, out['paper'])).wer:.1f}%")

    if a.ctc != "none":
        with tempfile.TemporaryDirectory() as tmp:
            from common import HF_SHAPES, random_hf_speech
            if a.ctc in HF_SHAPES:
                enc, ctc_name = random_hf_speech(a.ctc, Path(tmp) / a.ctc, a.device, ctc=True), f"random-{a.ctc}-ctc"
            else:
                from wat.extract.encoders import load_encoder
                enc, ctc_name = load_encoder(a.ctc, device=a.device), a.ctc
        results[ctc_name] = measure(ctc_modes(enc, xs, batches), a.rounds, a.device,
                                    lambda: BlockCalls(enc.base.encoder.layers[0]))
        _, _, out = results[ctc_name]
        same = sum(x == y for x, y in zip(out["wat-robust"], out["paper"]))
        report(ctc_name, f"CTC, {'equal-length batches only' if not enc.pads_exactly else 'padded batches'}",
               results[ctc_name], len(xs))
        print(f"  identical transcripts {same}/{len(xs)} (random weights: the texts are noise, the work is real)"
              if a.ctc in HF_SHAPES else f"  identical transcripts {same}/{len(xs)}")

    total = {k: sum(r[0][k] for r in results.values()) for k in ("wat-robust", "paper", "bare encoder")}
    speedup = total["paper"] / total["wat-robust"]
    print(f"all {len(results)} models on every mixture: wat-robust {len(xs) / total['wat-robust']:.2f} mixtures/s, "
          f"paper {len(xs) / total['paper']:.2f}, bare encoders {len(xs) / total['bare encoder']:.2f}; "
          f"speed-up wat-robust / paper = {speedup:.2f}x")
    if a.json:
        from common import write_json
        write_json(a.json, {"bench": "robust", "device": dev, "model": name, "models": list(results),
                            "mixtures": len(xs), "sample_len": a.sample_len,
                            "rates": {m: {k: len(xs) / t for k, t in r[0].items()} for m, r in results.items()},
                            "speedups": {m: r[0]["paper"] / r[0]["wat-robust"] for m, r in results.items()},
                            "speedup": speedup})
    return 0


def report(name: str, what: str, result, n: int) -> None:
    best, passes, _ = result
    print(f"{name} ({what})")
    for k in best:
        print(f"  {k:13s} {n / best[k]:8.2f} mixtures/s  ({best[k]:.2f} s, {passes[k]} encoder calls)")
    print(f"  speed-up wat-robust / paper = {best['paper'] / best['wat-robust']:.2f}x; "
          f"wat-robust runs at {best['bare encoder'] / best['wat-robust']:.2f} of the encoder-only rate")


if __name__ == "__main__":
    raise SystemExit(main())
