"""Where the time of wat-tag's batched transcript + tags goes, against one by one: encoder calls and
items (file windows), decode calls by kind (temperature, from the batch's features or from a mel
window = with its own encoder pass, rows), seconds in the encoder, in decoding (its own encoder
passes excluded) and elsewhere; and the seeks of each file's segments (a later window = transcribe
seeking on inside the file). Files as bench/tag_speed.py's `batch` pair makes them.

    cd bench && python tag_profile.py --files 8 --batch-size 8 --beam-size 1
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch
import whisper.decoding

import tag_speed as ts
from wat.data.clikit.args import positive_int  # bad values: one error line, as tag_speed
from wat.data.heads import HeadInfo, build_head
from wat.data.labels import audioset_vocabulary
from wat.tag.batch import transcribe_batch
from wat.tag.tagging import Tagger, transcribe_and_tag


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--files", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--beam-size", type=positive_int, default=1)
    args = p.parse_args(argv)

    model, _ = ts.whisper_model(args.model, "cpu")
    d = model.dims
    torch.manual_seed(0)
    head = build_head("tl-tr", d.n_audio_layer, d.n_audio_state, 527, proj_dim=d.n_audio_state).eval()
    info = HeadInfo("tl-tr", d.n_audio_layer, d.n_audio_state, 527, proj_dim=d.n_audio_state,
                    vocab_json=audioset_vocabulary().to_json(), model=args.model)
    tagger = Tagger(model, (head, info), keep_scores=None)
    utterances, rng = ts.speech(), np.random.default_rng(1)
    files = [ts.with_speech(float(rng.uniform(5, 15)), utterances, 100 + i) for i in range(args.files)]
    opts = {**ts.OPTS, "beam_size": args.beam_size, "fp16": False}

    stats: collections.Counter = collections.Counter()
    started = {}
    model.encoder.register_forward_pre_hook(lambda *_: started.update(t=time.perf_counter()))

    def encoded(_m, _args, out):
        stats["encoder_calls"] += 1
        stats["encoder_items"] += out.shape[0]
        stats["encoder_s"] += time.perf_counter() - started["t"]

    model.encoder.register_forward_hook(encoded)
    run_task = whisper.decoding.DecodingTask.run  # every decode: whisper.decode's and wat's beam batch

    def timed_run(task, mel):
        enc, t = stats["encoder_s"], time.perf_counter()
        out = run_task(task, mel)
        dt = time.perf_counter() - t - (stats["encoder_s"] - enc)
        feats = mel.shape[-1] == d.n_audio_state
        kind = f"T{task.options.temperature}_{'features' if feats else 'mel'}_rows{mel.shape[0]}"
        stats[f"decode_calls_{kind}"] += 1
        stats[f"decode_s_{kind}"] += dt
        stats["decode_s"] += dt
        return out

    whisper.decoding.DecodingTask.run = timed_run  # this process only
    paths = {"one_by_one": lambda fs: [transcribe_and_tag(model, tagger, f, **opts) for f in fs],
             "batched": lambda fs: [r for i in range(0, len(fs), args.batch_size)
                                    for r in transcribe_batch(model, tagger, fs[i:i + args.batch_size], **opts)]}
    for name, run in paths.items():
        run(files[:2])  # warm-up
        stats.clear()
        t = time.perf_counter()
        out = run(files)
        total = time.perf_counter() - t
        rec = {k: round(v, 2) if isinstance(v, float) else v for k, v in sorted(stats.items())}
        rec.update(total_s=round(total, 2), other_s=round(total - stats["encoder_s"] - stats["decode_s"], 2),
                   seeks=[sorted({s["seek"] for s in r["segments"]}) for r in out])
        print(name, json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
