"""Head vs features: `Features` (what a head is about to be fed) and `head_problems`, the one rule
for wat-train --init, wat-eval and wat-tag."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..cache import PAD30_FIX, PAD30_PADDING, CacheMeta, padding_of
from ..labels import Vocabulary
from .checkpoint import HeadInfo
from .kinds import head_field


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
