"""The head schema: head architectures, the registry of head kinds, `HeadInfo`, the checkpoint
format, the one head-vs-features compatibility rule and the one logits -> probabilities function.

This module is to heads what `cache.py` is to feature caches: `wat.train` writes heads, `wat.eval`
and `wat.extract.tag` read them, and none of them needs the others for it.

Input per clip is `[L, T, D]` (layers x pooled frames x width); heads return logits `[B, C]`.
Blocks are a small copy of openai-whisper's `ResidualAttentionBlock` (pre-LN attention + 4x GELU
MLP) with the same parameter names and the same arithmetic: importing `whisper.model` would pull
whisper's transcription, numba and tiktoken into every training and evaluation process.
Attribute names (`down_layer`, `time_tr`, `layer_tr`, `mlp_layer`, `layer_weight`) are those of
the official Whisper-AT code, so an official `at_model.*` state dict maps onto ours by dropping the
prefix.

Adding a head kind is one `Head` subclass with a `kind` name and the cache `field` it reads
(`features` [L, T, D] or the time `mean` [L, D]); defining the class registers it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import PAD30_FIX, PAD30_PADDING, PAD30_PADDINGS, CacheMeta, padding_of
from .files import load_torch_dict, save_torch
from .labels import Vocabulary

TIME_HEADS, LAYER_HEADS = 1, 8
# encoder width -> (layers, size name): official heads carry no per-layer parameter, so an
# official checkpoint's layer count is known only through its width
WHISPER_WIDTHS = {384: (4, "tiny"), 512: (6, "base"), 768: (12, "small"), 1024: (24, "medium"), 1280: (32, "large")}
FORMAT = "wat-head"


class HeadError(ValueError):
    """A checkpoint or head configuration that cannot be used."""


# ---------------------------------------------------------------- whisper's block, without whisper

class _LayerNorm(nn.LayerNorm):
    # whisper.model.LayerNorm: normalise in fp32, return the input dtype
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class _Linear(nn.Linear):
    # whisper.model.Linear: weights cast to the input dtype
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _SelfAttention(nn.Module):
    """whisper.model.MultiHeadAttention without the cross-attention, mask and kv-cache paths."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = _Linear(n_state, n_state)
        self.key = _Linear(n_state, n_state, bias=False)
        self.value = _Linear(n_state, n_state)
        self.out = _Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.view(*t.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
                   for t in (self.query(x), self.key(x), self.value(x)))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
    """whisper.model.ResidualAttentionBlock (encoder form): same parameter names, same numerics."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = _SelfAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(_Linear(n_state, 4 * n_state), nn.GELU(), _Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


# ---------------------------------------------------------------- head kinds

HEADS: dict[str, type["Head"]] = {}  # kind name -> class, filled by defining a Head subclass


def _classifier(width: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_classes))


def _projection(dim_in: int, proj_dim: int | None) -> nn.Sequential | None:
    return None if proj_dim is None else nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, proj_dim))


class Head(nn.Module):
    """Base of every head kind. A subclass sets `kind` (its name in checkpoints and on the command
    line) and `field` (the cache dataset it is trained and evaluated on), and takes
    `(n_layers, dim_in, n_classes, proj_dim=None)`; `proj_dim`, the projection width, is refused
    unless the class sets `projects`."""

    kind: str = ""
    field: str = "features"     # "features" ([B, L, T, D]) or "mean" ([B, L, D], T times smaller)
    projects: bool = False      # accepts a projection width `proj_dim`

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.field not in ("features", "mean"):
                raise HeadError(f"{cls.__name__}.field must be 'features' or 'mean', not {cls.field!r}")
            HEADS[cls.kind] = cls

    def __init__(self, n_layers: int):
        super().__init__()
        self.n_layers = n_layers

    @classmethod
    def check_dim(cls, proj_dim: int | None, what: str = "--proj-dim") -> None:
        """`what` names where the width came from: the option, or a head file's info."""
        if proj_dim is not None and not cls.projects:
            raise HeadError(f"{what} {proj_dim}: {cls.kind} has no projection (only "
                            + " and ".join(k for k, c in HEADS.items() if c.projects) + " have one)")

    def _check(self, x: Tensor, need_time: bool) -> Tensor:
        if x.dim() not in ((4,) if need_time else (3, 4)) or x.shape[1] != self.n_layers:
            want = "[B, L, T, D]" if need_time else "[B, L, T, D] or [B, L, D]"
            raise HeadError(f"{type(self).__name__} expects {want} with L={self.n_layers}, got {list(x.shape)}")
        return x.float()


class _TransformerHead(Head):
    projects = True

    @classmethod
    def check_dim(cls, proj_dim: int | None, what: str = "--proj-dim") -> None:
        if proj_dim is not None and (proj_dim <= 0 or proj_dim % LAYER_HEADS):
            raise HeadError(f"{what} {proj_dim}: the projection width must be a positive multiple of {LAYER_HEADS}")


class LastMLP(Head):
    """Last layer -> time mean -> LN -> Linear."""

    kind, field = "last-mlp", "mean"

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)[:, -1]
        return self.mlp_layer(x.mean(1) if x.dim() == 3 else x)


class WAMLP(Head):
    """Time mean -> learnable weighted average of the layers -> LN -> Linear."""

    kind, field = "wa-mlp", "mean"

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.mlp_layer = _classifier(dim_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=False)
        if x.dim() == 4:
            x = x.mean(2)
        x = torch.einsum("bld,l->bd", x, self.layer_weight) / self.layer_weight.sum()
        return self.mlp_layer(x)


class WATr(_TransformerHead):
    """Weighted layer average -> [optional LN+Linear to `proj_dim`] -> time block (1 head) -> time mean -> LN -> Linear."""

    kind = "wa-tr"

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        width = proj_dim or dim_in
        self.layer_weight = nn.Parameter(torch.full((n_layers,), 1.0 / n_layers))
        self.down_layer = _projection(dim_in, proj_dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        x = torch.einsum("bltd,l->btd", x, self.layer_weight) / self.layer_weight.sum()
        if self.down_layer is not None:
            x = self.down_layer(x)
        return self.mlp_layer(self.time_tr(x).mean(1))


class TLTr(_TransformerHead):
    """Time-and-layer-wise transformer: [LN+Linear to `proj_dim`] -> time block (1 head) on every
    layer -> time mean -> layer block (8 heads) -> layer mean -> LN -> Linear.
    `proj_dim=None` keeps the encoder width (official mode `tl_tr_1_8`; else `tl_down_tr_{proj_dim}_1_8`)."""

    kind = "tl-tr"

    def __init__(self, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None):
        super().__init__(n_layers)
        width = proj_dim or dim_in
        if width % LAYER_HEADS:  # every Whisper width is a multiple; other encoders' need not be (CREPE, ...)
            raise HeadError(f"{self.kind} on features {dim_in} wide: its layer block has {LAYER_HEADS} attention "
                            f"heads, so the width must be a multiple of {LAYER_HEADS}; project the features "
                            f"with --proj-dim (a multiple of {LAYER_HEADS})")
        self.down_layer = _projection(dim_in, proj_dim)
        self.time_tr = ResidualAttentionBlock(width, TIME_HEADS)
        self.layer_tr = ResidualAttentionBlock(width, LAYER_HEADS)
        self.mlp_layer = _classifier(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._check(x, need_time=True)
        if self.down_layer is not None:
            x = self.down_layer(x)
        b, l, t, d = x.shape
        x = self.time_tr(x.reshape(b * l, t, d)).mean(1).reshape(b, l, d)
        return self.mlp_layer(self.layer_tr(x).mean(1))


def head_class(kind: str) -> type[Head]:
    try:
        return HEADS[kind]
    except KeyError:
        raise HeadError(f"unknown head kind {kind!r}; choose from {', '.join(HEADS)}") from None


def head_field(kind: str) -> str:
    """The cache dataset (`features` or `mean`) a head of this kind reads."""
    return head_class(kind).field


def build_head(kind: str, n_layers: int, dim_in: int, n_classes: int, proj_dim: int | None = None,
               what: str = "--proj-dim") -> nn.Module:
    """`what`: where `proj_dim` came from, for the error message (the option, or a head file's info)."""
    cls = head_class(kind)
    cls.check_dim(proj_dim, what)
    return cls(n_layers, dim_in, n_classes, proj_dim)


def probabilities(logits: Tensor, multilabel: bool, n: int | None = None) -> Tensor:
    """Logits [B, C] -> probabilities [B, n] (fp32): sigmoid per class for multi-label heads,
    softmax over all C outputs for single-label ones; `n` keeps the first n outputs (a
    --parent-labels head's vocabulary comes first, its parent labels after)."""
    z = logits.float()
    p = torch.sigmoid(z) if multilabel else torch.softmax(z, -1)
    return p if n is None else p[:, :n]


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class HeadInfo:
    """Everything needed to rebuild a head and to check it is fed the features it was trained on."""

    kind: str
    n_layers: int
    dim_in: int
    n_classes: int
    proj_dim: int | None = None  # projection width of WA-Tr / TL-Tr heads (None: the encoder width dim_in)
    n_frames: int = 25
    vocab_json: str = ""        # wat.data.labels.Vocabulary.to_json() of the head's outputs
    model: str = ""             # Whisper model the cache came from, e.g. "tiny.en"
    fingerprint: str = ""       # that model's encoder-weights fingerprint ("" = unknown)
    policy: str = "pad30"       # input policy of the features ("pad30" | "trim")
    multilabel: bool = True     # sigmoid outputs (True) or softmax over classes (False)
    primary_classes: int | None = None  # --parent-labels: the first N outputs are the real vocabulary
    thresholds: list[float] | None = None  # optional per-class decision thresholds (set by eval)
    layers: list[int] | None = None  # encoder block of each input layer (a --layers cache); None = 0..n_layers-1
    pad30_padding: str = PAD30_PADDING  # pad30 features: "mel" (transcribe's window) | "samples" (a cache of
                                        # schema <= 3; head files without the field); "" for trim

    def __post_init__(self):
        self.pad30_padding = padding_of(self.policy, self.pad30_padding)

    @property
    def blocks(self) -> tuple[int, ...]:
        """The encoder blocks the head reads, in its input order."""
        return tuple(self.layers) if self.layers is not None else tuple(range(self.n_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadInfo":
        """The info of a saved head; a missing, wrongly-typed or inconsistent field is a HeadError
        (a head file is user input: it must never become a traceback or a silently wrong head)."""
        if not isinstance(d, dict):
            raise HeadError(f"head info is a {type(d).__name__}, not a dict")
        if "dim" in d and "proj_dim" not in d:  # checkpoints written before the rename
            d = {**d, "proj_dim": d["dim"]}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise HeadError(f"head info lacks {', '.join(missing)}")
        # a head saved before the field existed was trained on sample-padded pad30 features
        info = cls(**{k: v for k, v in {**d, "pad30_padding": d.get("pad30_padding", "")}.items() if k in _INFO_TYPES})
        for k, want in _INFO_TYPES.items():
            v = getattr(info, k)
            if not (isinstance(v, want) and not (isinstance(v, bool) and bool not in want)):
                raise HeadError(f"head info {k} = {v!r} is not {' or '.join(t.__name__ for t in want)}")
        if info.policy == "pad30" and info.pad30_padding not in PAD30_PADDINGS:
            raise HeadError(f"head info: pad30_padding {info.pad30_padding!r} is not one of {', '.join(PAD30_PADDINGS)}")
        if min(info.n_layers, info.dim_in, info.n_classes, info.n_frames) < 1:
            raise HeadError("head info: n_layers, dim_in, n_classes and n_frames must be at least 1")
        if info.thresholds is not None and (len(info.thresholds) != info.n_classes
                                            or not all(isinstance(t, (int, float)) for t in info.thresholds)):
            raise HeadError(f"head info: thresholds must be {info.n_classes} numbers")
        if info.layers is not None and (
                len(info.layers) != info.n_layers or not all(type(b) is int and b >= 0 for b in info.layers)
                or any(b <= a for a, b in zip(info.layers, info.layers[1:]))):
            raise HeadError(f"head info: layers must be {info.n_layers} increasing encoder blocks >= 0")
        if info.vocab_json:
            try:
                vocab = Vocabulary.from_json(info.vocab_json)
            except (ValueError, KeyError, TypeError) as e:
                raise HeadError(f"head info: unreadable vocabulary ({type(e).__name__}: {e})") from None
            if not all(isinstance(t, str) for t in vocab.keys + vocab.names):
                raise HeadError("head info: the vocabulary's keys and names must be strings")
            if len(vocab.keys) != len(vocab.names) or len(vocab.keys) > info.n_classes:
                raise HeadError(f"head info: a vocabulary of {len(vocab.keys)} keys and {len(vocab.names)} names "
                                f"does not fit {info.n_classes} outputs")
        return info


# the type each HeadInfo field must have in a loaded file (bool is refused where an int is meant)
_INFO_TYPES = {"kind": (str,), "n_layers": (int,), "dim_in": (int,), "n_classes": (int,),
               "proj_dim": (int, type(None)), "n_frames": (int,), "vocab_json": (str,), "model": (str,),
               "fingerprint": (str,), "policy": (str,), "multilabel": (bool,),
               "primary_classes": (int, type(None)), "thresholds": (list, type(None)),
               "layers": (list, type(None)), "pad30_padding": (str,)}


def head_from_info(info: HeadInfo) -> nn.Module:
    return build_head(info.kind, info.n_layers, info.dim_in, info.n_classes, info.proj_dim, what="head info proj_dim")


def save_head(path, head: nn.Module, info: HeadInfo) -> None:
    """Atomic, durable write of `{format, info (plain dict), state_dict}`; loads with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    save_torch(path, {"format": FORMAT, "version": 1, "info": info.to_dict(), "state_dict": state})


def official_to_state_dict(state: dict) -> dict:
    """Official Whisper-AT names -> ours: drop `at_model.` (inference package) or `module.`
    (DataParallel training checkpoints); the submodule names are identical."""
    out = {}
    for k, v in state.items():
        for prefix in ("at_model.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def _official_info(state: dict) -> HeadInfo:
    if "layer_tr.attn.query.weight" not in state or "mlp_layer.1.weight" not in state:
        raise HeadError("not a wat head nor an official Whisper-AT TL-Tr head "
                        "(expected at_model.time_tr/layer_tr/mlp_layer keys)")
    n_classes, width = state["mlp_layer.1.weight"].shape
    if "down_layer.1.weight" in state:
        proj_dim, dim_in = state["down_layer.1.weight"].shape
    else:
        proj_dim, dim_in = None, width
    if dim_in not in WHISPER_WIDTHS:
        raise HeadError(f"official head with width {dim_in} matches no Whisper size")
    n_layers, size = WHISPER_WIDTHS[dim_in]
    from .labels import audioset_vocabulary
    vocab = audioset_vocabulary()
    if n_classes != len(vocab):
        raise HeadError(f"official head has {n_classes} outputs, expected the {len(vocab)} AudioSet classes")
    return HeadInfo("tl-tr", n_layers, dim_in, n_classes, proj_dim, 25, vocab.to_json(),
                    model=f"whisper-at:{size}", fingerprint="", policy="pad30", multilabel=True,
                    pad30_padding=PAD30_PADDING)  # trained on whisper-at's transcribe windows: log-mel padding


def load_head(path, n_layers: int | None = None, map_location="cpu") -> tuple[nn.Module, HeadInfo]:
    """Load one of our heads or an official Whisper-AT head (`at_model.*`, modes `tl_tr_1_8` and
    `tl_down_tr_512_1_8`; logits over the 527 AudioSet classes). `n_layers`: the layer count of
    the features it will see; a different one is a HeadError."""
    obj = load_torch_dict(path, HeadError, "a head checkpoint", map_location)
    try:
        if obj.get("format") == FORMAT:
            info, state = HeadInfo.from_dict(obj.get("info")), obj.get("state_dict")
        else:
            info, state = None, obj
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise HeadError(f"its state_dict is not a dict of named tensors (a {type(state).__name__})")
        if info is None:
            state = official_to_state_dict(state)
            info = _official_info(state)
        head = head_from_info(info)
    except HeadError as e:
        raise HeadError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:  # a field build_head cannot use
        raise HeadError(f"{path}: head info does not describe a buildable head ({e})") from None
    if n_layers is not None and n_layers != info.n_layers:
        raise HeadError(f"{path}: head expects {info.n_layers}-layer features "
                        f"(width {info.dim_in}), the features have {n_layers} layers")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HeadError(f"{path}: weights do not fit a {info.kind} head: {e}") from None
    return head.eval(), info


# ---------------------------------------------------------------- head vs features

@dataclass(frozen=True)
class Features:
    """What a head is about to be fed: a cache's features (`of_cache`) or those a live model
    produces while transcribing (wat-tag). `None` fields are not checked."""

    n_layers: int
    dim: int                            # encoder width
    model: str                          # model name the features come from ("" = unknown)
    fingerprint: str                    # its encoder-weights fingerprint ("" = unknown)
    policy: str                         # "pad30" | "trim"
    n_frames: int | None = None         # None: the caller pools to the head's frame count (wat-tag)
    vocab: Vocabulary | None = None     # None: the head's own classes are reported (wat-tag)
    multilabel: bool | None = None
    layers: tuple[int, ...] | None = None  # encoder block of each layer; None: a live encoder, whose
                                           # n_layers blocks are all there to pick the head's from
    pad30_padding: str = PAD30_PADDING  # pad30: "mel" (transcription, this wat's caches) | "samples"

    def __post_init__(self):
        object.__setattr__(self, "pad30_padding", padding_of(self.policy, self.pad30_padding))

    @classmethod
    def of_cache(cls, meta: CacheMeta) -> "Features":
        return cls(meta.n_layers, meta.dim, meta.model, meta.fingerprint, meta.policy, meta.n_frames,
                   meta.vocab, meta.multilabel, meta.layers, meta.pad30_padding)


# A Whisper release name, as wat, openai-whisper, whisper-at (official heads: "whisper-at:SIZE") and
# Hugging Face ids ("openai/whisper-large-v3") spell it; other names (paths, fine-tunes) match nothing.
_RELEASE = re.compile(r"(?:whisper-at:|whisper-)?(tiny|base|small|medium|large)(\.en)?(-v\d)?(-turbo)?")


def _whisper_release(name: str) -> tuple[str, frozenset[str] | None] | None:
    """(size, the large releases the name can stand for) of a Whisper release name, None for other
    names. The release set is None for sizes below large, which have one release each. "large" is
    large-v3 in openai-whisper (and so in wat); whisper-at's official large heads were trained on
    large-v1 or large-v2 (its "large" is large-v2), and the head file does not say which."""
    base = name.rsplit("/", 1)[-1]
    if base == "turbo":  # openai-whisper's alias
        return "large", frozenset({"large-v3-turbo"})
    m = _RELEASE.fullmatch(base)
    if not m:
        return None
    size, _, version, turbo = m.groups()
    if size != "large":
        return size, None
    if name.startswith("whisper-at:"):
        return size, frozenset({"large-v1", "large-v2"})
    return size, frozenset({f"large{version or '-v3'}{turbo or ''}"})


def head_problems(info: HeadInfo, feats: Features) -> list[str]:
    """Why `feats` are not what the head was trained on (empty: they are). The one rule for
    wat-train --init, wat-eval and wat-tag; mirrors `CacheMeta.incompatibilities`.

    Encoder weights: compared by fingerprint when both sides know theirs; otherwise (official
    Whisper-AT heads record only the Whisper size their width implies) by Whisper release name, when
    both names are release names: the size, and for large models the release (large-v1/-v2 for an
    official head, large-v3 for "large", large-v3-turbo, ...)."""
    out = []
    blocks = info.blocks
    # a head trained on a --layers cache reads those blocks: a cache must hold exactly them, a live
    # encoder must have them (wat-tag taps only those)
    live_subset = feats.layers is None and info.layers is not None
    if live_subset:
        fits = info.dim_in == feats.dim and max(blocks) < feats.n_layers
    else:
        fits = (info.n_layers, info.dim_in) == (feats.n_layers, feats.dim)
    if not fits:
        trained = f" (trained on {info.model})" if info.model else ""
        which = f" (blocks {blocks[0]}..{blocks[-1]})" if info.layers is not None else ""
        out.append(f"layers x width: head expects {info.n_layers} encoder layers{which} of width {info.dim_in}"
                   f"{trained}, the features have {feats.n_layers} layers of width {feats.dim}")
    elif feats.layers is not None and blocks != tuple(feats.layers):
        out.append(f"encoder blocks: head reads {list(blocks)}, the features hold {list(feats.layers)}")
    if feats.n_frames is not None and head_field(info.kind) == "features" and info.n_frames != feats.n_frames:
        out.append(f"frames: head {info.n_frames}, cache {feats.n_frames}")
    if info.fingerprint and feats.fingerprint:
        if info.fingerprint != feats.fingerprint:
            out.append(f"Whisper weights: head trained on {info.model or '?'} ({info.fingerprint[:12]}), "
                       f"features from {feats.model or '?'} ({feats.fingerprint[:12]})")
    else:
        mine, theirs = _whisper_release(info.model), _whisper_release(feats.model)
        if mine and theirs and mine[0] != theirs[0]:
            out.append(f"Whisper weights: head trained on {info.model} (a {mine[0]} model), "
                       f"features from {feats.model} (a {theirs[0]} model)")
        elif mine and theirs and mine[1] and theirs[1] and not mine[1] & theirs[1]:
            out.append(f"Whisper weights: head trained on {info.model} ({' or '.join(sorted(mine[1]))}), "
                       f"features from {feats.model} ({' or '.join(sorted(theirs[1]))}); 'large' is "
                       "large-v3 in openai-whisper and wat but large-v2 in whisper-at")
    if info.policy != feats.policy:
        out.append(f"input policy: head {info.policy}, cache {feats.policy} "
                   f"(the head was trained on '{info.policy}' features)")
    elif info.pad30_padding != feats.pad30_padding:
        out.append(f"input policy: head pad30 with {info.pad30_padding} padding, features pad30 with "
                   f"{feats.pad30_padding} padding ({PAD30_FIX})")
    if feats.multilabel is not None and info.multilabel != feats.multilabel:
        out.append(f"label type: head {'multi' if info.multilabel else 'single'}-label, "
                   f"cache {'multi' if feats.multilabel else 'single'}-label")
    if feats.vocab is not None:
        head_vocab = Vocabulary.from_json(info.vocab_json) if info.vocab_json else None
        primary = info.primary_classes or info.n_classes
        if head_vocab is None or head_vocab.keys[:primary] != feats.vocab.keys:
            n = "?" if head_vocab is None else primary
            out.append(f"classes: head has {n} classes, cache {len(feats.vocab)}"
                       + ("" if head_vocab is None or primary != len(feats.vocab) else " (different keys or order)"))
    return out
