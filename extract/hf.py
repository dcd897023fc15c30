"""Hugging Face `transformers` Whisper folders converted to an openai-whisper checkpoint.

A folder written by `WhisperForConditionalGeneration.save_pretrained` (or downloaded from the hub:
openai/whisper-large-v3, -large-v3-turbo, distil-whisper, fine-tunes) holds `config.json`
(`"model_type": "whisper"`) and the weights as `model.safetensors`, `pytorch_model.bin`, or shards
listed by `model.safetensors.index.json` / `pytorch_model.bin.index.json`. Names map one to one
(HF keeps q/k/v unfused and, like openai-whisper, has no key bias):

    model.encoder.conv{1,2}                        -> encoder.conv{1,2}
    model.encoder.embed_positions.weight           -> encoder.positional_embedding
    model.{en,de}coder.layers.N.self_attn.{q,k,v,out}_proj -> {en,de}coder.blocks.N.attn.{query,key,value,out}
    ...self_attn_layer_norm / fc1 / fc2 / final_layer_norm -> attn_ln / mlp.0 / mlp.2 / mlp_ln
    model.decoder.layers.N.encoder_attn(_layer_norm)  -> decoder.blocks.N.cross_attn(_ln)
    model.encoder.layer_norm                       -> encoder.ln_post
    model.decoder.embed_tokens / embed_positions / layer_norm -> token_embedding / positional_embedding / ln

Dimensions come from config.json (mel bins, layer counts: distil-whisper has 2 decoder layers,
large-v3-turbo 4) and are checked against the weights. openai-whisper ties the output projection to
the token embedding, so a checkpoint with a different `proj_out` is refused rather than silently
changed. The word-timing heads come from generation_config.json (`alignment_heads`) when present.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from wat.data.files import load_torch_dict

CONFIG = "config.json"
# single-file weights, then the shard indexes that list several files
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_BLOCK = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
          "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
          "self_attn_layer_norm": "attn_ln",
          "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
          "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
          "encoder_attn_layer_norm": "cross_attn_ln",
          "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln"}
_TOP = {"encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
        "encoder.embed_positions": "encoder.positional_embedding",
        "encoder.layer_norm": "encoder.ln_post",
        "decoder.embed_tokens": "decoder.token_embedding",
        "decoder.embed_positions": "decoder.positional_embedding",
        "decoder.layer_norm": "decoder.ln"}


class HFError(ValueError):
    """A folder that is not a convertible Hugging Face Whisper model; the message says why."""


def read_config(model_dir) -> dict | None:
    """config.json of a Hugging Face Whisper folder, or None when the folder is not one."""
    path = Path(model_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") == "whisper" else None


def is_hf_dir(model_dir) -> bool:
    return read_config(model_dir) is not None


def weight_files(model_dir) -> list[Path]:
    """The weight files of the folder, in a stable order (shards sorted by name)."""
    model_dir = Path(model_dir)
    for name in WEIGHTS:
        if (model_dir / name).is_file():
            return [model_dir / name]
    for name in INDEXES:
        index = model_dir / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise HFError(f"{index}: shard {missing[0]} is missing from {model_dir}")
            return [model_dir / s for s in shards]
    raise HFError(f"{model_dir}: a Hugging Face Whisper config.json but no weights "
                  f"(expected one of {', '.join(WEIGHTS + INDEXES)})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise HFError(f"{path}: reading safetensors needs the `safetensors` package "
                          "(the `hf` extra: pip install safetensors)") from None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise HFError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return load_torch_dict(path, HFError, "a state dict")


def _rename(key: str) -> str | None:
    """openai-whisper name of an HF key ("model." prefix optional), None for keys it has no slot for."""
    key = key.removeprefix("model.")
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        side, i, part, kind = m.groups()
        return f"{side}.blocks.{i}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    stem, _, kind = key.rpartition(".")
    if stem in ("encoder.embed_positions", "decoder.embed_positions"):
        return _TOP[stem]  # a Parameter in HF, a tensor (buffer / parameter) in openai-whisper
    return f"{_TOP[stem]}.{kind}" if stem in _TOP else None


def _dims(config: dict, name: str) -> dict:
    def field(key):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HFError(f"{name}: config.json field {key!r} is {value!r}, expected a positive integer")
        return value

    d_model = field("d_model")
    for side in ("encoder", "decoder"):
        # openai-whisper's MLP is fixed at 4 x width; another width cannot be represented
        if config.get(f"{side}_ffn_dim", 4 * d_model) != 4 * d_model:
            raise HFError(f"{name}: {side}_ffn_dim {config[f'{side}_ffn_dim']} is not 4 x d_model "
                          f"({4 * d_model}); openai-whisper cannot represent it")
    if config.get("activation_function", "gelu") != "gelu":
        raise HFError(f"{name}: activation {config['activation_function']!r}; openai-whisper uses gelu")
    if config.get("scale_embedding"):
        raise HFError(f"{name}: scale_embedding is set; openai-whisper does not scale embeddings")
    return dict(n_mels=field("num_mel_bins"), n_audio_ctx=field("max_source_positions"),
                n_audio_state=d_model, n_audio_head=field("encoder_attention_heads"),
                n_audio_layer=field("encoder_layers"), n_vocab=field("vocab_size"),
                n_text_ctx=field("max_target_positions"), n_text_state=d_model,
                n_text_head=field("decoder_attention_heads"), n_text_layer=field("decoder_layers"))


def _alignment_heads(model_dir: Path) -> list[list[int]] | None:
    try:
        heads = json.loads((model_dir / "generation_config.json").read_text()).get("alignment_heads")
        return [[int(a), int(b)] for a, b in heads] if heads else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # word timestamps are optional; the weights are what matter


def hf_to_whisper(model_dir) -> dict:
    """An openai-whisper checkpoint {"dims", "model_state_dict"} (+ "alignment_heads" when
    generation_config.json lists them) from a Hugging Face Whisper folder. Tensors keep their
    stored dtype (fp16/bf16/fp32); loading into `Whisper` casts them."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if config is None:
        raise HFError(f"{model_dir}: no config.json with \"model_type\": \"whisper\"")
    name = str(model_dir)
    dims = _dims(config, name)
    sd, proj_out = {}, None
    for path in weight_files(model_dir):
        for key, value in _read_weights(path).items():
            if key.removeprefix("model.") == "proj_out.weight":
                proj_out = value
                continue
            new = _rename(key)
            if new is None:
                raise HFError(f"{path}: tensor {key!r} has no place in an openai-whisper model "
                              "(not a WhisperForConditionalGeneration checkpoint?)")
            if new.endswith("attn.key.bias"):
                if torch.any(value != 0):
                    raise HFError(f"{path}: {key} is non-zero; openai-whisper's key has no bias")
                continue
            sd[new] = value
    emb = sd.get("decoder.token_embedding.weight")
    if emb is None:
        raise HFError(f"{name}: no decoder token embedding (an encoder-only checkpoint?); "
                      "openai-whisper needs the whole model")
    if proj_out is not None and not torch.equal(proj_out.to(emb.dtype), emb):
        raise HFError(f"{name}: proj_out differs from the token embedding (untied output layer); "
                      "openai-whisper ties them and cannot represent this model")
    for side, n in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        found = {int(m.group(1)) for k in sd for m in [re.match(rf"{side}\.blocks\.(\d+)\.", k)] if m}
        if found != set(range(n)):
            raise HFError(f"{name}: config.json says {n} {side} layers, the weights have "
                          f"{len(found)} ({side}_layers)")
    expect = {"encoder.conv1.weight": (dims["n_audio_state"], dims["n_mels"], 3),
              "encoder.positional_embedding": (dims["n_audio_ctx"], dims["n_audio_state"]),
              "decoder.token_embedding.weight": (dims["n_vocab"], dims["n_text_state"]),
              "decoder.positional_embedding": (dims["n_text_ctx"], dims["n_text_state"])}
    for key, shape in expect.items():
        if key not in sd:
            raise HFError(f"{name}: incomplete Whisper model: {key} missing")
        if tuple(sd[key].shape) != shape:
            raise HFError(f"{name}: {key} has shape {tuple(sd[key].shape)}, config.json implies {shape}")
    ckpt = {"dims": dims, "model_state_dict": sd}
    heads = _alignment_heads(model_dir)
    if heads:
        ckpt["alignment_heads"] = heads
    return ckpt
