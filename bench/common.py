"""Helpers shared by the bench scripts (not part of the wat package): random-weight Whisper models
of the real sizes, the demo cache, the GPU's dense matrix peak, the JSON results the GPU check
collects, and argparse types of their options (seeds, path_arg, head_kinds, train_overrides; the
rest come from wat.data.clikit.args)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

# the tests' factory of synthetic caches (tests/synthetic_cache.py) serves the bench scripts too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_cache import synthetic_meta, write_subset, write_synthetic_cache  # noqa: E402  (re-exported)
# and its official Whisper-AT head mirror (tests/official_mirror.py)
from official_mirror import Server, init_vs_scratch, serve_standin  # noqa: E402  (re-exported)
from wat.data.clikit.args import comma_list, comma_list_of, nonempty, seed_int  # noqa: E402

# argparse types of the bench scripts' options, built on the commands' own (wat.data.clikit.args): a bad
# value is one `SCRIPT: error: ...` line and exit 2 at once, not a traceback after minutes of work
seeds = comma_list_of(seed_int, what="seed")   # --seeds 0,1,2


def path_arg(what: str = "path"):
    """argparse type: a path, empty refused (`nonempty`: `--out ''` was the current folder), as a Path."""
    check = nonempty(what)

    def parse(text: str) -> Path:
        return Path(check(text))

    parse.__name__ = what
    return parse


def _head_kind(text: str) -> str:
    from wat.data.heads.names import BUILTIN_KINDS
    if text not in BUILTIN_KINDS:
        raise ValueError(text)
    return text


head_kinds = comma_list_of(_head_kind, what="head kind (last-mlp, wa-mlp, wa-tr, tl-tr)")   # --heads wa-tr,tl-tr


def _override(item: str) -> tuple:
    """One `name=value` of `train_overrides`: a TrainOptions field; an int, a finite float, none, true,
    false, or the text (lr=auto)."""
    from wat.train.options import TrainOptions
    name, eq, text = item.partition("=")
    fields = [f.name for f in dataclasses.fields(TrainOptions)]
    if not eq or name.strip() not in fields:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of TrainOptions' fields ({', '.join(fields)})")
    text = text.strip()
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name}: a finite number, or none/true/false/text")
        return name.strip(), value
    return name.strip(), {"none": None, "true": True, "false": False}.get(text.lower(), text)


def train_overrides(text: str) -> dict:
    """argparse type of --set `name=value,...` (TrainOptions overrides: batch_size=16,mixup=0,lr=auto) -> dict;
    a name given twice is refused. The values reach TrainOptions unchecked beyond their form."""
    if not text.strip():
        return {}
    pairs = comma_list(text, _override, what="TrainOptions override")
    names = [k for k, _ in pairs]
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice")
    return dict(pairs)

# openai-whisper's ModelDimensions per size (encoder and decoder alike), for random-weight models when
# the real weights cannot be had (a box without network): throughput depends on the shapes only.
# "micro" is no Whisper: a 2-layer, 64-wide stand-in that keeps the CPU test of the GPU check fast.
_SIZES = {"micro": (64, 2, 2), "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12), "medium": (1024, 16, 24),
          "large-v1": (1280, 20, 32), "large-v2": (1280, 20, 32), "large-v3": (1280, 20, 32)}

# Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s from the vendor datasheets, matched against
# torch.cuda.get_device_name() in order (first match wins). H200 is the H100's chip: same peak (a
# bf16 8192^3 matmul measured ~790 TFLOP/s on an H200 here, 80% of it).
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
         ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
         ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
         ("V100", 125.0), ("T4", 65.0))


def whisper_dims(name: str):
    import whisper

    base = name.removesuffix(".en")
    if base not in _SIZES:
        raise SystemExit(f"random weights: unknown Whisper size {name!r}; one of {', '.join(_SIZES)}")
    d, h, l = _SIZES[base]
    vocab = 51864 if name.endswith(".en") else 51866 if base == "large-v3" else 51865
    return whisper.model.ModelDimensions(n_mels=128 if base == "large-v3" else 80, n_audio_ctx=1500,
                                         n_audio_state=d, n_audio_head=h, n_audio_layer=l, n_vocab=vocab,
                                         n_text_ctx=448, n_text_state=d, n_text_head=h, n_text_layer=l)


def random_whisper(name: str, device: str):
    """A Whisper with random weights and the real dims of `name`: for throughput only."""
    import torch
    import whisper

    torch.manual_seed(0)
    with torch.device(device):   # initialised on the device: seconds, not a minute, for large on a CPU
        model = whisper.model.Whisper(whisper_dims(name))
    model = model.to(device).eval()
    model._wat_name = f"random-{name}"
    return model


def whisper_model(name: str, device: str, random: str = "never"):
    """`random`: 'never' (load the weights), 'always', or 'fallback' (random when loading fails,
    e.g. no network for a size that needs a download). Returns (model, weights is random)."""
    from wat.extract.pipeline import get_model

    if random == "always":
        return random_whisper(name, device), True
    try:
        return get_model(name, device).model, False  # the whisper.Whisper of the WhisperEncoder
    except Exception as e:   # any load failure: network, missing file, corrupt cache
        if random != "fallback":
            raise
        print(f"weights of {name} not available ({type(e).__name__}: {str(e)[:120]}): random weights")
        return random_whisper(name, device), True


def demo_cache(out: Path, root: Path | None = None, clips_per_class: int = 8) -> Path:
    """OUT/feats.h5, made once and kept: the demo set (`make_demo`, seed 0, 8 clips per class like the
    tests' demo; or the ESC-50-layout folder `root`) through tiny.en, policy trim."""
    feats = out / "feats.h5"
    if feats.exists():
        return feats
    from wat.data import load_dataset, make_demo
    from wat.extract import load_whisper
    from wat.extract.pipeline import ExtractOptions, extract_dataset
    root = root or make_demo(out / "esc50-demo", clips_per_class=clips_per_class, seed=0)
    extract_dataset(load_dataset("esc50", root), ExtractOptions(model="tiny.en", policy="trim", shard_size=32,
                                                                num_workers=0, progress=False),
                    feats, model=load_whisper("tiny.en"))
    return feats


def dense_peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_name(device: str) -> str:
    import platform
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()}"


def write_json(path, record: dict) -> None:
    """The result record a bench script hands to bench/gpu_table.py (`--json FILE`)."""
    from wat.data.files import write_json as write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write(path, record, indent=1)


def drop(paths) -> None:
    """Drop the files' pages from the page cache (POSIX_FADV_DONTNEED: no privileges needed for
    clean pages, hence the fsync first): the next read of them comes from the disk."""
    import os

    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# transformers speech-encoder shapes for random-weight models (throughput depends on the shapes only):
# name -> (model_type, hidden, blocks, heads, ffn, feat_extract_norm, do_stable_layer_norm). "micro" keeps
# the CPU test of the GPU check fast. The conv feature encoder is the models' own (512 x 7, 20 ms).
HF_SHAPES = {"micro": ("wav2vec2", 32, 2, 2, 64, "group", False),
             "wav2vec2-base": ("wav2vec2", 768, 12, 12, 3072, "group", False),
             "wav2vec2-large": ("wav2vec2", 1024, 24, 16, 4096, "layer", True),
             "hubert-xlarge": ("hubert", 1280, 48, 16, 5120, "layer", True)}


# the character vocabulary of the English CTC checkpoints (facebook/wav2vec2-base-960h, hubert-large-ls960-ft)
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


def random_hf_speech(shape: str, folder, device: str, ctc: bool = False):
    """A random-weight transformers model of `shape` written with save_pretrained (+ its feature
    extractor) into `folder` and loaded through `load_encoder`, the real path: an HFSpeechEncoder.
    `ctc`: a *ForCTC model with the English character vocabulary (CTC_VOCAB) and its tokenizer files."""
    import json

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    from wat.extract.encoders import load_encoder

    if shape not in HF_SHAPES:
        raise SystemExit(f"unknown HF speech shape {shape!r}; one of {', '.join(HF_SHAPES)}")
    kind, hidden, blocks, heads, ffn, norm, stable = HF_SHAPES[shape]
    small = dict(conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2) if shape == "micro" else {}
    if ctc:
        small.update(vocab_size=len(CTC_VOCAB), pad_token_id=0)
    config = AutoConfig.for_model(kind, hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                                  intermediate_size=ffn, feat_extract_norm=norm, do_stable_layer_norm=stable, **small)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1 B-parameter init is slow on a few CPU cores
        (AutoModelForCTC if ctc else AutoModel).from_config(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=norm == "layer").save_pretrained(folder)
    if ctc:
        vocab = Path(folder) / "vocab.json"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(CTC_VOCAB)}))
        Wav2Vec2CTCTokenizer(str(vocab)).save_pretrained(folder)
    return load_encoder(str(folder), device=device)
