"""wat-tag's fast paths against the paths they replace, side by side in one run (ratios):

1. `backend`: faster-whisper backend vs openai-whisper backend, transcript + tags of one file
   (`--seconds`, default 60: the committed LibriSpeech-layout utterances and speech_en.wav over the
   demo's background sounds), the whisper command's defaults (beam 5, best of 5, temperature
   fall-backs), `--compute-types` (auto = float32 on the CPU); tags compared (max |dp|) and the
   transcripts' WER (openai as reference, Whisper's English normaliser).
2. `batch`: `--files` (default 64) files of 5-15 s (utterances over background) transcribed + tagged
   in batches of `--batch-size` vs one by one (`transcribe_and_tag`, what a batch equals), at
   `--beam-size` (default 5 as the whisper command; 1 = greedy, where the decoder batches too: openai-whisper decodes several audios with beam search only one at a time).
3. `tags_only`: `--sounds` (default 64) demo sound clips (5 s, no speech): tags only (batched) vs
   transcript + tags with the whisper command's defaults (one by one; only `--slow-sounds` of them
   are timed, the ratio is per clip), and tags only vs the bare batched encoder on the same windows.

Each pair runs alternately after a warm-up (batch: on the first two files only; tags only: the
 transcript side on two clips); times are
medians of `--runs`. Prints one JSON record.

    python bench/tag_speed.py --model base --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch

from wat.data import demo
from wat.data.audio import load_audio
from wat.data.heads import HeadInfo, build_head
from wat.data.labels import audioset_vocabulary
from wat.extract.decode import encode_pad30
from wat.robust.wer import corpus
from wat.tag.batch import tag_only, transcribe_batch
from wat.tag.tagging import Tagger, transcribe_and_tag

from common import device_name, whisper_model

SR = 16_000
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
OPTS = dict(temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), beam_size=5, best_of=5, language="en")


def speech() -> list[np.ndarray]:
    return [load_audio(p) for p in sorted((FIXTURES / "librispeech").rglob("*.flac"))] + [
        load_audio(FIXTURES / "speech_en.wav")]


def background(seconds: float, seed: int) -> np.ndarray:
    kinds = [demo.CLASSES.index(f) for f in (demo.rain, demo.engine, demo.siren)]
    clips = [soxr.resample(demo.synth_clip(kinds[(seed + i) % 3], seed, i), demo.RATE, SR)
             for i in range(int(np.ceil(seconds / demo.SECONDS)))]
    x = np.concatenate(clips)[: int(seconds * SR)]
    return (0.05 * x / np.abs(x).max()).astype(np.float32)


def with_speech(seconds: float, utterances, seed: int) -> np.ndarray:
    audio = background(seconds, seed)
    rng, at = np.random.default_rng(seed), int(0.5 * SR)
    while True:
        u = utterances[rng.integers(len(utterances))]
        if at + len(u) > len(audio):
            return audio
        audio[at:at + len(u)] += u
        at += len(u) + int(rng.uniform(0.3, 1.5) * SR)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def pair(runs: int, a, b, warm=None):
    """Median seconds of a and b, run alternately after one warm-up each (`warm`: (a', b') to warm
    up with instead); and their last outputs."""
    ta, tb = [], []
    for f in warm or (a, b):
        f()
    out_a = out_b = None
    for _ in range(runs):
        t, out_a = timed(a)
        ta.append(t)
        t, out_b = timed(b)
        tb.append(t)
    return statistics.median(ta), statistics.median(tb), out_a, out_b


def max_dp(x, y) -> float:
    return max((abs(p - q) for wx, wy in zip(x["audio_tags"], y["audio_tags"])
                for p, q in zip(wx["scores"].values(), wy["scores"].values())), default=0.0)


def main(argv=None) -> int:
    from wat.data.clikit.args import float_range, int_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--only", nargs="+", default=["backend", "batch", "tags_only"])
    p.add_argument("--seconds", type=float_range(0, 86400, lo_open=True), default=60.0)
    p.add_argument("--compute-types", nargs="+", default=["auto", "int8"])
    p.add_argument("--files", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--beam-size", type=positive_int, nargs="+", default=[5, 1])
    p.add_argument("--sounds", type=positive_int, default=64)
    p.add_argument("--slow-sounds", type=int_range(0), default=0,
                   help="transcribe only the first N sound clips (0: all; the ratio is per clip)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, _ = whisper_model(args.model, "cpu")
    d = model.dims
    head = build_head("tl-tr", d.n_audio_layer, d.n_audio_state, 527, proj_dim=d.n_audio_state).eval()
    info = HeadInfo("tl-tr", d.n_audio_layer, d.n_audio_state, 527, proj_dim=d.n_audio_state,
                    vocab_json=audioset_vocabulary().to_json(), model=args.model)
    tagger = Tagger(model, (head, info), keep_scores=None)
    utterances = speech()
    rec = {"model": args.model, "device": device_name("cpu"), "threads": torch.get_num_threads(),
           "load_before": os.getloadavg()[0], "runs": args.runs}

    if "backend" in args.only:
        from wat.tag.faster import load_faster, transcribe_and_tag_faster

        audio = with_speech(args.seconds, utterances, 0)
        for ct in args.compute_types:
            fw = load_faster(args.model, model, compute_type=ct)
            t_open, t_fast, slow, fast = pair(
                args.runs, lambda: transcribe_and_tag(model, tagger, audio, fp16=False, **OPTS),
                lambda: transcribe_and_tag_faster(fw, model, tagger, audio, **OPTS))
            rec[f"backend_{ct}"] = {
                "openai_s": t_open, "faster_s": t_fast, "speedup": t_open / t_fast,
                "tags_max_abs_diff": max_dp(slow, fast),
                "same_windows": [s["seek"] for s in slow["segments"]] == [s["seek"] for s in fast["segments"]],
                "wer_faster_vs_openai": corpus([(slow["text"], fast["text"])]).wer}
        rec["backend_wer_utterances"] = {}
        for ct in args.compute_types:
            fw = load_faster(args.model, model, compute_type=ct)
            pairs = [(transcribe_and_tag(model, tagger, u, fp16=False, **OPTS)["text"],
                      transcribe_and_tag_faster(fw, model, tagger, u, **OPTS)["text"]) for u in utterances]
            rec["backend_wer_utterances"][ct] = corpus(pairs).wer
        print(json.dumps(rec), file=sys.stderr, flush=True)  # so far

    if "batch" in args.only:
        rng = np.random.default_rng(1)
        files = [with_speech(float(rng.uniform(5, 15)), utterances, 100 + i) for i in range(args.files)]
        rec["batch"] = {"files": len(files), "batch_size": args.batch_size,
                        "seconds": float(sum(map(len, files)) / SR)}
        for beam in args.beam_size:
            opts = {**OPTS, "beam_size": beam, "fp16": False}

            def one_by_one(files=files):
                return [transcribe_and_tag(model, tagger, f, **opts) for f in files]

            def batched(files=files):
                return [r for i in range(0, len(files), args.batch_size)
                        for r in transcribe_batch(model, tagger, files[i:i + args.batch_size], **opts)]

            first = files[:2]  # warm-up: both paths on two files (a whole first batch cost minutes per side)
            t_one, t_batch, one, bat = pair(args.runs, one_by_one, batched,
                                            warm=(lambda: one_by_one(first), lambda: batched(first)))
            rec["batch"][f"beam{beam}"] = {
                "one_by_one_s": t_one, "batched_s": t_batch, "speedup": t_one / t_batch,
                "same_text": sum(a["text"] == b["text"] for a, b in zip(one, bat)),
                "tags_max_abs_diff": max(max_dp(a, b) for a, b in zip(one, bat))}
            print(json.dumps(rec), file=sys.stderr, flush=True)  # so far (a long run cut short keeps these)

    if "tags_only" in args.only:
        kinds = [i % len(demo.CLASSES) for i in range(args.sounds)]
        sounds = [soxr.resample(demo.synth_clip(k, 7, i), demo.RATE, SR).astype(np.float32)
                  for i, k in enumerate(kinds)]
        slow = sounds[: args.slow_sounds or None]
        per_clip: list[float] = []

        def full(clips=slow, times=per_clip):
            times.clear()
            out = []
            for s in clips:
                t, r = timed(lambda: transcribe_and_tag(model, tagger, s, fp16=False, **OPTS))
                times.append(t)
                out.append(r)
            return out

        def only():
            return list(tag_only(model, tagger, sounds, batch_size=args.batch_size))

        # warm-up on two clips: a second pass over every clip of the slow side would double the run
        t_full, t_only, full_out, only_out = pair(args.runs, full, only,
                                                  warm=(lambda: full(slow[:2], []), only))
        names = [demo.CLASSES[k].__name__ for k in kinds]
        by_kind = {}
        for name, t in zip(names, per_clip):
            by_kind.setdefault(name, []).append(t)

        def bare():
            with torch.inference_mode():
                for i in range(0, len(sounds), args.batch_size):
                    encode_pad30(model, [torch.from_numpy(s) for s in sounds[i:i + args.batch_size]])

        t_bare, t_only2, _, _ = pair(args.runs, bare, only)
        # the case: a pure 5 s tone (440 Hz), transcript + tags with the same defaults
        tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(demo.SECONDS * SR)) / SR)).astype(np.float32)
        t_tone, r_tone = timed(lambda: transcribe_and_tag(model, tagger, tone, fp16=False, **OPTS))
        rec["tone_440hz_5s"] = {"full_s": t_tone, "text": r_tone["text"],
                                "temperatures": sorted({s["temperature"] for s in r_tone["segments"]})}
        rec["tags_only"] = {
            "sounds": len(sounds), "seconds_each": demo.SECONDS, "timed_full": len(slow),
            "full_s_per_clip": t_full / len(slow), "tags_only_s_per_clip": t_only / len(sounds),
            "speedup_vs_transcript": (t_full / len(slow)) / (t_only / len(sounds)),
            "full_s_per_clip_by_kind": {k: statistics.median(v) for k, v in by_kind.items()},
            "full_s_slowest_clip": max(per_clip), "full_s_fastest_clip": min(per_clip),
            "tags_max_abs_diff": max(max_dp(a, b) for a, b in zip(full_out, only_out)),
            "bare_encoder_s": t_bare, "tags_only_s": t_only2, "throughput_vs_bare": t_bare / t_only2}
    rec["load_after"] = os.getloadavg()[0]
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
