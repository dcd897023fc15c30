"""Peak host memory of a Hugging Face speech encoder's `pooled` on a CPU, by the number of clips its
convolutional feature encoder takes per call (`hf_speech.FRONT_END_SAMPLES`): the front end's
activations (512 channels at 1/5 of the sample rate, several copies alive) are what a batch of
long clips costs beyond the weights, the same for every model size. Each case runs in a child
process (ru_maxrss is a lifetime peak); the model is HuBERT X-Large's shape with ONE block (the
blocks' activations are small beside the front end's; the weights of 48 blocks would only add a
constant).

    python bench/hf_memory.py                        # 4 and 16 clips of 30 s
    python bench/hf_memory.py --clips 4 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def child(clips: int, seconds: float, budget: int | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

    from wat.extract.encoders import hf_speech, load_encoder

    if budget:
        hf_speech.FRONT_END_SAMPLES = budget
    cfg = AutoConfig.for_model("hubert", hidden_size=1280, num_hidden_layers=1, num_attention_heads=16,
                               intermediate_size=5120, feat_extract_norm="layer", do_stable_layer_norm=True)
    folder = tempfile.mkdtemp(prefix="wat-hf-memory-")
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    enc = load_encoder(folder)
    torch.set_num_threads(1)
    x = torch.randn(clips, round(seconds * 16000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    enc.pooled(x, frames=25, policy="trim")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_call = max(1, hf_speech.FRONT_END_SAMPLES // x.shape[1])
    print(json.dumps({"clips": clips, "seconds": seconds, "front_end_clips_per_call": min(per_call, clips),
                      "before_mb": before, "peak_mb": peak}))


def main(argv=None) -> int:
    from wat.data.clikit.args import float_range, positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=positive_int, nargs="+", default=[4, 16])
    p.add_argument("--seconds", type=float_range(0, 86400, lo_open=True), default=30.0)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(int(a.child[0]), float(a.child[1]), int(a.child[2]))
        return 0
    samples = round(a.seconds * 16000)
    print(f"HuBERT X-Large shape (1 block), {a.seconds:g} s clips, CPU float32; peak RSS of one `pooled` call:")
    for n in a.clips:
        for budget in sorted({samples, 0}):  # one clip per front-end call; the default budget
            cmd = [sys.executable, __file__, "--child", str(n), str(a.seconds), str(budget)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            label = "default FRONT_END_SAMPLES" if budget == 0 else "1 clip per call"
            print(f"  {n:3d} clips, front end {r['front_end_clips_per_call']:2d} clips per call ({label}): "
                  f"peak {r['peak_mb']:.0f} MB (before the call {r['before_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
