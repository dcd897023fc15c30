"""What features are: `FeatureSpec`, the one record of an encoder's pooled features (which encoder
family and weights, input policy, layers, frames, pooling, stored precision), and `Policy`.

Caches (`CacheMeta.spec`), heads (`HeadInfo.spec`), the features a head is fed (`Features.spec`)
and the extraction manifest carry one; `FeatureSpec.incompatibilities` is THE rule that decides
whether two sets of features can be used together (`CacheMeta.incompatibilities` and
`heads.head_problems` add only their dataset-level checks: classes, label type, columns).

`Policy` is what the encoder was fed. Files record it as two attributes, `policy` ("pad30" |
"trim") and `pad30_padding` ("mel" | absent); `Policy.of` turns the recorded pair into one value,
the only place that does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

WHISPER = "whisper"   # the encoder family of files without an `encoder` attribute

PAD30_FIX = ("pad30 features from before cache schema 4 were padded with zero samples, not with the zero "
             "log-mel frames transcription feeds the encoder: re-extract that cache with wat-extract "
             "(and retrain heads trained on it)")


def padding_of(policy: str, pad30_padding: str | None) -> str:
    """The padding of `policy` features: "" for trim; for pad30 the recorded one, or "samples" when
    none is recorded (files and heads written before schema 4). The one normalisation of the
    recorded pair; `Policy.of` validates its result."""
    if policy != "pad30":
        return ""
    return pad30_padding or "samples"


class Policy(str, Enum):
    """What the encoder saw of a clip."""

    PAD30 = "pad30"                  # transcription's 30 s window: the clip's log-mel padded with zero
                                     # log-mel frames (`wat.extract.layers.pad30_input`, cache schema 4)
    PAD30_SAMPLES = "pad30-samples"  # pad30 of caches/heads before schema 4: zero samples padded first
    TRIM = "trim"                    # the clip only (every non-Whisper encoder)

    @classmethod
    def of(cls, policy, pad30_padding: str | None = None) -> "Policy":
        """The policy of a recorded (policy, pad30_padding) pair: a pad30 record without a padding
        (files and heads written before schema 4) is PAD30_SAMPLES. ValueError for anything else
        than the pairs wat writes."""
        if isinstance(policy, Policy):
            return policy
        if policy == "trim":
            return cls.TRIM
        if policy == "pad30":
            padding = padding_of(policy, pad30_padding)
            if padding not in ("mel", "samples"):
                raise ValueError(f"unknown pad30 padding {padding!r}; one of mel, samples")
            return cls.PAD30 if padding == "mel" else cls.PAD30_SAMPLES
        if policy == cls.PAD30_SAMPLES.value:
            return cls.PAD30_SAMPLES
        raise ValueError(f"unknown input policy {policy!r}; one of pad30, trim")

    @property
    def recorded(self) -> str:
        """The `policy` attribute files carry: "pad30" | "trim"."""
        return "trim" if self is Policy.TRIM else "pad30"

    @property
    def padding(self) -> str:
        """The `pad30_padding` it stands for: "mel", "samples", or "" (trim)."""
        return {Policy.PAD30: "mel", Policy.PAD30_SAMPLES: "samples", Policy.TRIM: ""}[self]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One encoder's pooled features, as stored or as a head expects them (keyword-only)."""

    encoder: str = WHISPER     # encoder family = the encoder registry's key ("whisper", "hf", "crepe")
    model: str                 # as loaded: "base", "facebook/hubert-large-ls960-ft", "crepe-tiny"
    fingerprint: str           # encoder-weights fingerprint ("" = unknown: official Whisper-AT heads)
    policy: Policy             # a str ("pad30", "trim") is taken as recorded (`Policy.of`, mel padding)
    n_layers: int              # layers stored (or a live encoder's blocks)
    layers: tuple[int, ...] | None = ()  # encoder block of each layer; () = 0..n_layers-1; None = a live
                                         # encoder, whose n_layers blocks are all there to pick from
    dim: int                   # encoder width
    n_frames: int | None       # pooled frames; None: any (a live encoder pools to what a head asks)
    pooling: str               # "mean:25"
    sample_rate: int
    storage: str = "fp16"      # stored precision: "fp16" | "int8"

    def __post_init__(self):
        pad = "mel" if isinstance(self.policy, str) and self.policy == "pad30" else None
        object.__setattr__(self, "policy", Policy.of(self.policy, pad))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers) or tuple(range(self.n_layers)))

    @property
    def all_layers(self) -> bool:
        """True when the features hold blocks 0..L-1 (no subset, or a subset that is a prefix)."""
        return self.layers is None or self.layers == tuple(range(self.n_layers))

    def incompatibilities(self, other: "FeatureSpec", *, same_cache: bool = False, head: bool = False) -> list[str]:
        """THE rule: why features `other` cannot be used where features `self` are (empty: they can).

        Caches (default): every field but the model name must agree; the stored precision is
        transparent to readers, so two caches may differ in it, the shards of one cache
        (`same_cache`) may not. `head=True`: `self` is what a head was trained on and `other` what
        it is about to be fed (a cache, or a live encoder: `other.layers` None, `other.n_frames`
        None); encoder weights are then compared by fingerprint when both sides know theirs,
        otherwise (official Whisper-AT heads record only the Whisper size their width implies) by
        Whisper release name when both names are release names; a head that reads `mean` takes
        any frame count (`n_frames` None); the messages speak of "head" and "features"."""
        return _head_problems(self, other) if head else _cache_problems(self, other, same_cache)


def _cache_problems(a: FeatureSpec, b: FeatureSpec, same_cache: bool) -> list[str]:
    out = []
    if a.encoder != b.encoder:
        out.append(f"encoder: {a.encoder} != {b.encoder} (features of different encoder families never mix: "
                   f"extract with the same encoder)")
    fields = {"fingerprint": lambda s: s.fingerprint, "policy": lambda s: s.policy.recorded,
              "pooling": lambda s: s.pooling, "n_layers": lambda s: s.n_layers, "layers": lambda s: s.layers,
              "n_frames": lambda s: s.n_frames, "dim": lambda s: s.dim, "sample_rate": lambda s: s.sample_rate}
    if same_cache:
        fields["storage"] = lambda s: s.storage
    out += [f"{k}: {_show(get(a))} != {_show(get(b))}" for k, get in fields.items() if get(a) != get(b)]
    if a.policy.recorded == b.policy.recorded and a.policy.padding != b.policy.padding:
        out.append(f"pad30_padding: {a.policy.padding} != {b.policy.padding} ({PAD30_FIX})")
    return out


def _head_problems(head: FeatureSpec, feats: FeatureSpec) -> list[str]:
    out = []
    if head.encoder != feats.encoder:
        out.append(f"encoder: head trained on {head.encoder} features ({head.model or '?'}), the features are "
                   f"{feats.encoder} features ({feats.model or '?'}): extract with the head's encoder, or train "
                   f"a head on these features")
    blocks = head.layers
    subset = head.layers != tuple(range(head.n_layers))
    # a head trained on a --layers cache reads those blocks: a cache must hold exactly them, a live
    # encoder must have them (wat-tag taps only those)
    if feats.layers is None and subset:
        fits = head.dim == feats.dim and max(blocks) < feats.n_layers
    else:
        fits = (head.n_layers, head.dim) == (feats.n_layers, feats.dim)
    if not fits:
        trained = f" (trained on {head.model})" if head.model else ""
        which = f" (blocks {blocks[0]}..{blocks[-1]})" if subset else ""
        out.append(f"layers x width: head expects {head.n_layers} encoder layers{which} of width {head.dim}"
                   f"{trained}, the features have {feats.n_layers} layers of width {feats.dim}")
    elif feats.layers is not None and blocks != feats.layers:
        out.append(f"encoder blocks: head reads {list(blocks)}, the features hold {list(feats.layers)}")
    if feats.n_frames is not None and head.n_frames is not None and head.n_frames != feats.n_frames:
        out.append(f"frames: head {head.n_frames}, cache {feats.n_frames}")
    if head.fingerprint and feats.fingerprint:
        if head.fingerprint != feats.fingerprint:
            weights = "Whisper weights" if head.encoder == feats.encoder == WHISPER else "encoder weights"
            out.append(f"{weights}: head trained on {head.model or '?'} ({head.fingerprint[:12]}), "
                       f"features from {feats.model or '?'} ({feats.fingerprint[:12]})")
    else:
        mine, theirs = whisper_release(head.model), whisper_release(feats.model)
        if mine and theirs and mine[0] != theirs[0]:
            out.append(f"Whisper weights: head trained on {head.model} (a {mine[0]} model), "
                       f"features from {feats.model} (a {theirs[0]} model)")
        elif mine and theirs and mine[1] and theirs[1] and not mine[1] & theirs[1]:
            out.append(f"Whisper weights: head trained on {head.model} ({' or '.join(sorted(mine[1]))}), "
                       f"features from {feats.model} ({' or '.join(sorted(theirs[1]))}); 'large' is "
                       "large-v3 in openai-whisper and wat but large-v2 in whisper-at")
    if head.policy.recorded != feats.policy.recorded:
        out.append(f"input policy: head {head.policy.recorded}, cache {feats.policy.recorded} "
                   f"(the head was trained on '{head.policy.recorded}' features)")
    elif head.policy.padding != feats.policy.padding:
        out.append(f"input policy: head pad30 with {head.policy.padding} padding, features pad30 with "
                   f"{feats.policy.padding} padding ({PAD30_FIX})")
    return out


def _show(v) -> str:
    if (isinstance(v, tuple) and len(v) > 2 and all(isinstance(x, int) for x in v)
            and v == tuple(range(v[0], v[-1] + 1))):
        return f"{v[0]}:{v[-1] + 1}"  # layer ranges read as the --layers option that made them
    return repr(v)


# A Whisper release name, as wat, openai-whisper, whisper-at (official heads: "whisper-at:SIZE") and
# Hugging Face ids ("openai/whisper-large-v3") spell it; other names (paths, fine-tunes) match nothing.
_RELEASE = re.compile(r"(?:whisper-at:|whisper-)?(tiny|base|small|medium|large)(\.en)?(-v\d)?(-turbo)?")


def whisper_release(name: str) -> tuple[str, frozenset[str] | None] | None:
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
    if name.startswith("whisper-at:"):  # an official head: its release when it was fetched by name
        return size, frozenset({f"large{version}"} if version else {"large-v1", "large-v2"})
    return size, frozenset({f"large{version or '-v3'}{turbo or ''}"})
