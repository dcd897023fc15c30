"""Hugging Face speech encoders as an `Encoder` (family "hf"): transformers' wav2vec2, HuBERT, WavLM
and data2vec-audio models (config.json `model_type` "wav2vec2", "hubert", "wavlm", "data2vec-audio"),
pretrained (`*Model`, `*ForPreTraining` checkpoints: the base model is loaded) or CTC fine-tuned
(`*ForCTC`: the encoder, plus its `lm_head` and the checkpoint's tokenizer as `ctc`).

`--model` / `load_encoder` take a folder written by `save_pretrained` (config.json, the weights,
preprocessor_config.json; for CTC also vocab.json + tokenizer_config.json) or a hub id
("facebook/hubert-xlarge-ll60k"), fetched through huggingface_hub's own cache with the hub helper of
`wat.extract.load` (HF_HUB_OFFLINE=1 or WAT_OFFLINE=1: the cache only). Loading goes through
transformers' own `from_pretrained` (weights_only=True), then float32, eval mode.

Semantics, checked in transformers' source for each family (5.25; the 4.x releases the same except
where noted):

- Layers. All four run a convolutional feature encoder (7 convs, 20 ms stride = 320 samples,
  receptive field 400 samples with the default conv_kernel/conv_stride), a feature projection, a
  positional convolution, then `num_hidden_layers` transformer blocks in `model.encoder.layers`.
  wat's layer l is the output of block l (a forward hook on `encoder.layers[l]`, pooled in the hook:
  `wat.extract.pooling.LayerTaps`); the conv feature encoder is not a layer, as for Whisper.
  `output_hidden_states` holds num_hidden_layers + 1 entries: [0] is the input of block 0 (after the
  positional convolution and, for post-LN models, the encoder's LayerNorm) and [l + 1] the output of
  block l. With `do_stable_layer_norm=True` (pre-LN blocks: wav2vec2/HuBERT large "lv60", "robust",
  xlarge; WavLM large) the encoder applies a final LayerNorm after the last block: in transformers
  4.x the last hidden_states entry is that LayerNorm's output; in 5.x (`capture_outputs(
  tie_last_hidden_states=False)`) it is the last block's own output and only `last_hidden_state` is
  normalised. wat's last layer is always the block output before that LayerNorm (Whisper's blocks
  are taken before `ln_post` too); CTC logits are computed from the normalised `last_hidden_state`,
  as transformers does. Post-LN models (`do_stable_layer_norm=False`: base models; data2vec-audio
  always) end every block with a LayerNorm and have no final one. WavLM blocks return (output,
  position bias): the output is tapped.
- Input normalisation. Per clip, as the checkpoint's feature extractor (`Wav2Vec2FeatureExtractor`,
  preprocessor_config.json) does when `do_normalize` is true: (x - mean) / sqrt(var + 1e-7) over the
  clip's own samples (population variance), before any padding; `do_normalize` false: the samples as
  they are. A folder without preprocessor_config.json gets the feature extractor's default
  (`do_normalize` true) with a warning. Its `sampling_rate` must be 16000.
- Batching clips of different lengths. `feat_extract_norm == "group"` (base models): the first conv
  layer's GroupNorm normalises each channel over the whole input, so zero padding changes every
  frame, and these models take no attention mask. data2vec-audio (LayerNorm convs, attention mask)
  is not padding-safe either: its positional embedding is a stack of 5 convolutions with a LayerNorm
  and GELU between them, so after the first one the padded frames are no longer zero and the next
  ones read them into the clip's last frames; HuBERT with `conv_pos_batch_norm` likewise (a BatchNorm
  before the positional convolution shifts the zeros). For these, clips are batched only with clips
  of the same length (`equal_length_groups`, no padding at all). The others (`feat_extract_norm ==
  "layer"`: per-frame LayerNorm convs, one positional convolution whose input is zeroed past each
  clip) are padded to the longest clip with an attention mask, which leaves each clip's frames as
  they are alone (tested, up to float rounding). Either way a clip's features never depend on its
  batch.
- Valid frames per clip: the conv stack's arithmetic, frames = floor((n - k) / s) + 1 per layer
  (`native_frames`; transformers' `_get_feat_extract_output_lengths`); clips shorter than the
  receptive field (400 samples by default) have no frame: ShortClipError. Time pooling: the shared
  `time_parts` windows over those frames (`wat.extract.pooling.pool_frames`), as for Whisper.
- Policy: "trim" only (the clip as it is; no 30 s window). "pad30" is refused by `Encoder.check`.
- Memory. On CUDA the forward runs under fp16 autocast (as Whisper's). The convolutional feature
  encoder's activations are the largest (512 channels at 1/5 of the sample rate, the same for every
  model size: ~3 GB float32 for 16 x 30 s in its first layer, several copies of it alive at once), so
  it runs on at most FRONT_END_SAMPLES samples at a time (whole clips; its output is small); the
  transformer blocks then take the whole batch: HuBERT X-Large (964 M parameters, 3.9 GB float32 +
  its fp16 autocast copies) at wat-extract's default batch of 16 clips of up to 30 s fits a 16 GB GPU.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pooling import LayerTaps
from .base import Encoder, EncoderError, encoder_device, equal_length_groups, register_encoder, weights_fingerprint

log = logging.getLogger(__name__)

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")  # config.json model_type
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
TORCH_BINS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
SAMPLE_RATE = 16000
# samples the convolutional feature encoder takes per call (whole clips, at least one): bounds its
# activations (~0.85 GB float32 per tensor of its first layer at this size) whatever the batch size
FRONT_END_SAMPLES = 1 << 21
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


class HFSpeechError(EncoderError):
    """A Hugging Face speech model that cannot be loaded or used; the message says why."""


@dataclass
class CTCHead:
    """A CTC fine-tuned checkpoint's output side: logits = lm_head(encoder output after the final
    LayerNorm of pre-LN models), greedy decoding with the checkpoint's own tokenizer."""
    lm_head: torch.nn.Module
    tokenizer: object | None   # transformers tokenizer from the checkpoint (vocab.json); None if it has none
    problem: str = ""          # why `tokenizer` is None


def read_config(folder) -> dict | None:
    """config.json of a folder holding one of MODEL_TYPES, else None."""
    try:
        config = json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") in MODEL_TYPES else None


def conv_frames(samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames a stack of unpadded 1-D convolutions makes of `samples` inputs (0 if too short)."""
    n = samples
    for k, s in zip(kernels, strides):
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """The fewest inputs giving one output frame of the conv stack (400 for wav2vec2's)."""
    r = 1
    for k, s in reversed(list(zip(kernels, strides))):
        r = (r - 1) * s + k
    return r


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith((".safetensors", ".bin")) for p in folder.iterdir()) if folder.is_dir() else False


def _normalize_setting(folder: Path) -> bool:
    path = folder / PREPROCESSOR
    if not path.is_file():
        log.warning("%s: no %s; normalising each clip as transformers' Wav2Vec2FeatureExtractor does by "
                    "default (do_normalize=True). Save the checkpoint's feature extractor beside it to be sure",
                    folder, PREPROCESSOR)
        return True
    try:
        pre = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFSpeechError(f"{path}: not a feature-extractor config ({type(e).__name__}: {e})") from None
    rate = pre.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise HFSpeechError(f"{path}: sampling_rate {rate}; wat feeds encoders {SAMPLE_RATE} Hz audio")
    if pre.get("feature_size", 1) != 1:
        raise HFSpeechError(f"{path}: feature_size {pre['feature_size']}; a raw-waveform model takes 1")
    return bool(pre.get("do_normalize", True))


def _tokenizer(folder: Path):
    if not (folder / "vocab.json").is_file():
        return None, f"{folder} has no vocab.json (the checkpoint's CTC tokenizer)"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder)), ""
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        log.warning("%s: the CTC tokenizer cannot be loaded (%s: %s)", folder, type(e).__name__, e)
        return None, f"its tokenizer cannot be loaded ({type(e).__name__}: {e})"


def _chunked_front_end(module: torch.nn.Module, budget: int) -> None:
    """Make `module` (the conv feature encoder: [B, S] -> [B, C, T], every clip on its own) run on at
    most `budget` samples' worth of whole clips per call, concatenating the results. An instance
    attribute over its forward: its weights, hooks and state dict are untouched."""
    forward = module.forward

    def chunked(input_values):
        rows = max(1, budget // max(1, input_values.shape[-1]))
        if input_values.shape[0] <= rows:
            return forward(input_values)
        return torch.cat([forward(input_values[i:i + rows]) for i in range(0, input_values.shape[0], rows)])

    module.forward = chunked


def normalized(clip: torch.Tensor) -> torch.Tensor:
    """`Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm` of one clip (its own samples only):
    (x - mean) / sqrt(var + 1e-7), population variance, computed in float64, returned as float32."""
    x = clip.double()
    return ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + NORM_EPS)).float()


@register_encoder
class HFSpeechEncoder(Encoder):
    """A transformers wav2vec2 / HuBERT / WavLM / data2vec-audio model (see the module docstring).
    `model` is the transformers model (`*Model` or `*ForCTC`); `ctc` its CTC head or None."""

    family = "hf"
    policies = ("trim",)
    sample_rate = SAMPLE_RATE

    def __init__(self, model, *, name: str, normalize: bool, tokenizer=None, tokenizer_problem: str = ""):
        config = model.config
        if config.model_type not in MODEL_TYPES:
            raise HFSpeechError(f"{name}: model_type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        self.model, self.name, self.normalize = model, name, normalize
        self.base = model.base_model                      # the *Model inside a *ForCTC (or the model)
        self.n_layers = int(config.num_hidden_layers)
        self.dim = int(config.hidden_size)
        self._kernels, self._strides = tuple(config.conv_kernel), tuple(config.conv_stride)
        self.frame_rate = SAMPLE_RATE / math.prod(self._strides)
        # see the module docstring: which models keep a clip's frames unchanged when padded + masked
        self.pads_exactly = (config.model_type != "data2vec-audio"
                             and getattr(config, "feat_extract_norm", "group") == "layer"
                             and not getattr(config, "conv_pos_batch_norm", False))
        self.ctc = CTCHead(model.lm_head, tokenizer, tokenizer_problem) if hasattr(model, "lm_head") else None
        self._fingerprint = None
        _chunked_front_end(self.base.feature_extractor, FRONT_END_SAMPLES)

    @property
    def fingerprint(self) -> str:
        """`weights_fingerprint` of the base model's weights (conv feature encoder, projection, blocks;
        not the CTC head, nor `masked_spec_embed`, which only training uses), computed on first use."""
        if self._fingerprint is None:
            state = {k: v for k, v in self.base.state_dict().items() if k != "masked_spec_embed"}
            self._fingerprint = weights_fingerprint(state)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def min_samples(self, policy: str) -> int:
        return receptive_field(self._kernels, self._strides)

    def native_frames(self, samples: int, policy: str = "trim") -> int:
        return conv_frames(samples, self._kernels, self._strides)

    def timestamps(self, n_frames: int) -> torch.Tensor:
        """Frame j reads samples [j s, j s + r) (s: the conv stack's total stride, r: its receptive
        field): centred at (j s + r / 2) / sample_rate, 12.5 + 20 j ms with the default convs."""
        stride, field = math.prod(self._strides), receptive_field(self._kernels, self._strides)
        return (torch.arange(n_frames, dtype=torch.float32) * stride + field / 2) * (1000.0 / SAMPLE_RATE)

    # ------------------------------------------------------------------ features

    def pooled(self, clips, *, frames: int, policy: str = "trim", layers: Sequence[int] | None = None) -> torch.Tensor:
        clips, layers = self.check(clips, frames=frames, policy=policy, layers=layers)
        return self._run(clips, int(frames), layers, logits=False)[0]

    def pooled_and_logits(self, clips, *, frames: int, layers: Sequence[int] | None = None):
        """One forward of a CTC checkpoint -> (pooled as `pooled` gives it, CTC logits float32
        [B, T, vocab] zero-padded past each clip's frames, valid frames per clip)."""
        if self.ctc is None:
            raise HFSpeechError(f"{self.name} is not a CTC fine-tuned checkpoint (no lm_head); its config's "
                                "architectures name no *ForCTC")
        clips, layers = self.check(clips, frames=frames, policy="trim", layers=layers)
        return self._run(clips, int(frames), layers, logits=True)

    def ctc_decode(self, logits: torch.Tensor, valid_frames: Sequence[int]) -> list[str]:
        """Greedy CTC transcripts: argmax per frame over each clip's valid frames, then the checkpoint's
        own tokenizer (repeats merged, blanks = its pad token dropped, word delimiter -> space)."""
        if self.ctc is None:
            raise HFSpeechError(f"{self.name} has no CTC head to decode with")
        if self.ctc.tokenizer is None:
            raise HFSpeechError(f"{self.name}: cannot decode CTC logits: {self.ctc.problem}")
        ids = logits.argmax(-1).cpu()
        return [self.ctc.tokenizer.decode(ids[i, :int(n)].tolist()) for i, n in enumerate(valid_frames)]

    def _run(self, clips: list[torch.Tensor], frames: int, layers: tuple[int, ...], logits: bool):
        lengths = [c.shape[0] for c in clips]
        valid = [self.native_frames(n) for n in lengths]
        groups = [list(range(len(clips)))] if self.pads_exactly else equal_length_groups(lengths)
        out = torch.empty((len(clips), len(layers), frames, self.dim), dtype=torch.float32, device=self.device)
        parts = []
        for group in groups:
            pooled, lg = self._forward([clips[i] for i in group], [valid[i] for i in group], frames, layers, logits)
            out[group] = pooled
            parts.append((group, lg))
        if not logits:
            return out, None, valid
        # logit frames: transformers' own count (the same as `valid` unless an adapter follows the encoder)
        logit_valid = [int(n) for n in self.model._get_feat_extract_output_lengths(torch.tensor(lengths))]
        padded = torch.zeros((len(clips), max(lg.shape[1] for _, lg in parts), parts[0][1].shape[-1]),
                             dtype=torch.float32, device=self.device)
        for group, lg in parts:
            padded[group, :lg.shape[1]] = lg
        for i, n in enumerate(logit_valid):
            padded[i, n:] = 0
        return out, padded, logit_valid

    def _forward(self, clips, valid, frames, layers, logits):
        """One model call on clips that may be padded together (same length, or `pads_exactly`)."""
        device = self.device
        longest = max(c.shape[0] for c in clips)
        batch = torch.zeros((len(clips), longest), dtype=torch.float32, device=device)
        for i, c in enumerate(clips):
            batch[i, :c.shape[0]] = normalized(c) if self.normalize else c
        mask = None
        if any(c.shape[0] != longest for c in clips):  # only for pads_exactly models (see _run)
            lengths = torch.tensor([c.shape[0] for c in clips], device=device)
            mask = (torch.arange(longest, device=device)[None] < lengths[:, None]).long()
        n_valid = valid[0] if len(set(valid)) == 1 else valid
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            with LayerTaps(self.base.encoder, frames, n_valid, layers, blocks=self.base.encoder.layers) as taps:
                out = self.model(batch, attention_mask=mask)
        return taps.pooled.float(), (out.logits.float() if logits else None)

    # ------------------------------------------------------------------ loading

    @classmethod
    def accepts(cls, spec: str) -> bool:
        path = Path(spec).expanduser()
        if path.is_dir():
            return read_config(path) is not None
        from ..load import is_hub_id

        if path.exists() or not is_hub_id(spec):
            return False
        try:  # config.json alone, through the hub cache (cached after the first time)
            folder = _hub(spec, (CONFIG,))
        except (HFSpeechError, ImportError):
            return False
        return read_config(folder) is not None

    @classmethod
    def choices(cls) -> str:
        return (f"a Hugging Face speech model ({' / '.join(MODEL_TYPES)}): its folder or hub id, e.g. "
                "facebook/hubert-large-ls960-ft")

    @classmethod
    def load(cls, spec: str, device="cpu") -> "HFSpeechEncoder":
        dev = encoder_device(device, HFSpeechError)
        folder = _folder(str(spec))
        config = read_config(folder)
        if config is None:
            raise HFSpeechError(f"{spec}: {folder / CONFIG} does not name a model_type of {', '.join(MODEL_TYPES)}")
        normalize = _normalize_setting(folder)
        ctc = any(str(a).endswith("ForCTC") for a in config.get("architectures") or [])
        try:
            import transformers
        except ImportError:
            from wat.data import DIST

            raise HFSpeechError(f"{spec}: Hugging Face speech models need transformers: "
                                f"pip install '{DIST}[speech]'") from None
        auto = transformers.AutoModelForCTC if ctc else transformers.AutoModel
        try:
            with _quiet_loading(transformers):
                model = auto.from_pretrained(str(folder), weights_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            from wat.data.files import one_line

            raise HFSpeechError(f"{spec}: transformers cannot load it ({type(e).__name__}: {one_line(e)})") from None
        model = model.float().eval().to(dev)
        tokenizer, problem = _tokenizer(folder) if ctc else (None, "")
        log.info("%s: %s (%s, %d blocks x %d, do_normalize=%s)", spec, type(model).__name__, config["model_type"],
                 model.config.num_hidden_layers, model.config.hidden_size, normalize)
        return cls(model, name=str(spec), normalize=normalize, tokenizer=tokenizer, tokenizer_problem=problem)


@contextmanager
def _quiet_loading(transformers):
    """transformers 5 draws a "Loading weights" bar on stderr for every `from_pretrained`, whatever
    wat's --progress says, so a one-line refusal after a load would not be one line: off for the load."""
    hf_logging = transformers.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _hub(repo_id: str, patterns) -> Path:
    from ..load import hub_snapshot

    return hub_snapshot(repo_id, patterns, what="a Hugging Face speech model", error=HFSpeechError)


def _folder(spec: str) -> Path:
    """A local folder as it is, or a hub id's snapshot: config, feature extractor and tokenizer files
    plus the weights, safetensors when the repository has them, else the PyTorch pickle (loaded
    weights_only), never both."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from ..load import is_hub_id

    if path.exists() or not is_hub_id(spec):
        raise HFSpeechError(f"{spec}: no such folder (a Hugging Face speech model is a folder or an owner/name id)")
    small = (CONFIG, PREPROCESSOR) + TOKENIZER_FILES
    folder = _hub(spec, small + SAFETENSORS)
    if not _has_weights(folder):
        folder = _hub(spec, small + TORCH_BINS)
    if not _has_weights(folder):
        raise HFSpeechError(f"{spec}: the hub snapshot {folder} holds no weights "
                            f"({', '.join(SAFETENSORS[:1] + TORCH_BINS[:1])})")
    return folder
