"""Wall time of `transcribe_and_tag` over plain `model.transcribe` on the same file.

The file: `--seconds` (default 60) of a continuous background sound from the demo synthesiser
(rain, engine, siren, switching every 5 s) with the committed espeak-ng sentence every 15 s. Same
model and transcription options for both; runs alternate (plain, tagged) after one warm-up of
each, and the ratio is median(tagged) / median(plain). Target: <= 1.03 on CPU with base.

With `--temperature 0` the ratio is the pure cost of tagging (taps, pooling, head). With whisper's
default temperature fall-backs, plain transcription re-runs the encoder for every fall-back
decode and `transcribe_and_tag` does not, so the ratio can drop below 1 (passes are printed).

    python bench/tag_overhead.py --model base --runs 5 --temperature 0
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import soxr
import torch

from wat.data import demo
from wat.data.audio import load_audio
from wat.extract import EncoderPasses
from wat.tag import transcribe_and_tag
from wat.data.heads import HeadInfo, build_head, load_head

from common import device_name, whisper_model, write_json

SR = 16_000
SPEECH = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "speech_en.wav"


def make_audio(seconds: float, seed: int = 0) -> np.ndarray:
    speech = load_audio(SPEECH)
    kinds = [demo.CLASSES.index(f) for f in (demo.rain, demo.engine, demo.siren)]
    background = np.concatenate([soxr.resample(demo.synth_clip(kinds[i % 3], seed, i), demo.RATE, SR)
                                 for i in range(int(np.ceil(seconds / demo.SECONDS)))])
    audio = 0.3 * background[: int(seconds * SR)] / np.abs(background).max()
    start = SR // 2
    while start + len(speech) <= len(audio):
        audio[start:start + len(speech)] += speech
        start += 15 * SR
    return audio.astype(np.float32)


def main(argv=None) -> int:
    from wat.data.clikit.args import float_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--head", help="head checkpoint (default: an untrained TL-Tr of the model's size, 527 classes)")
    p.add_argument("--proj-dim", "--dim", dest="proj_dim", type=positive_int,
                   help="projection width of that untrained TL-Tr (default: the encoder width)")
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--seconds", type=float_range(0, 86400, lo_open=True), default=60.0)
    p.add_argument("--time-res", type=float_range(0, 86400, lo_open=True), default=10.0)
    p.add_argument("--temperature", type=float_range(0, 1), nargs="+",
                   help="decoding temperature(s); default whisper's fall-back sequence 0.0 ... 1.0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--random-weights", choices=("never", "fallback", "always"), default="never",
                   help="random weights with --model's dims ('fallback': when the weights cannot be loaded); "
                        "the decoder is then capped at --sample-len tokens per window")
    p.add_argument("--sample-len", type=positive_int, default=100,
                   help="tokens per 30 s window with random weights (a random decoder never stops by itself; "
                        "~100 is dense English speech)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON (bench/gpu_check.sh)")
    args = p.parse_args(argv)
    if args.runs < 1 or not 0 < args.seconds <= 3600 or not args.time_res > 0 or args.sample_len < 1:
        p.error("--runs and --sample-len must be at least 1, --seconds in (0, 3600], --time-res > 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, random = whisper_model(args.model, args.device, args.random_weights)
    if args.head:
        head = load_head(args.head)
    else:  # the cost does not depend on the weights
        d = model.dims
        head = (build_head("tl-tr", d.n_audio_layer, d.n_audio_state, 527, args.proj_dim),
                HeadInfo("tl-tr", d.n_audio_layer, d.n_audio_state, 527, args.proj_dim, model=args.model))
    audio = make_audio(args.seconds)
    options = dict(fp16=args.device.startswith("cuda"), language="en")
    if random:
        options.update(sample_len=args.sample_len, condition_on_previous_text=False)
    if args.temperature:
        options["temperature"] = tuple(args.temperature)

    def plain():
        return model.transcribe(audio, **options)

    def tagged():
        return transcribe_and_tag(model, head, audio, time_res=args.time_res, **options)

    times = {"plain": [], "tagged": []}
    passes = {}
    for i in range(args.runs + 1):
        for name, fn in (("plain", plain), ("tagged", tagged)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            with EncoderPasses(model) as count:
                start = time.perf_counter()
                result = fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            passes[name] = count.n
            if i > 0:  # the first round is a warm-up
                times[name].append(elapsed)
            if i == 0 and name == "tagged":
                print(f"transcript: {result['text'][:100]!r}...")
                print("tags:", [(w["start"], [t for t, _ in w["tags"][:2]]) for w in result["audio_tags"]])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model} on {args.device}, {args.seconds:.0f} s file, {args.runs} runs "
          f"({torch.get_num_threads()} threads), temperature {options.get('temperature', 'default')}")
    print(f"encoder passes: plain {passes['plain']}, tagged {passes['tagged']}")
    for k in ("plain", "tagged"):
        print(f"{k:>7}: median {med[k]:.2f} s  ({', '.join(f'{t:.2f}' for t in times[k])})")
    print(f"ratio tagged/plain: {med['tagged'] / med['plain']:.3f}")
    if args.json:
        write_json(args.json, {"bench": "tag", "device": device_name(args.device), "model": model._wat_name,
                               "random_weights": random, "runs": args.runs, "seconds": args.seconds,
                               "plain_s": med["plain"], "tagged_s": med["tagged"],
                               "ratio": med["tagged"] / med["plain"], "passes": passes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
