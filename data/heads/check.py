"""Head vs features: `Features` (what a head is about to be fed) and `head_problems`, the rule for
wat-train --init, wat-eval and wat-tag: the features' rule (`FeatureSpec.incompatibilities`, head
voice) plus the classes and label type."""
from __future__ import annotations

from dataclasses import dataclass

from ..cache import PAD30_PADDING, CacheMeta
from ..labels import Vocabulary
from ..spec import WHISPER, FeatureSpec, Policy, padding_of
from .checkpoint import HeadInfo


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
    encoder: str = WHISPER              # encoder family

    def __post_init__(self):
        object.__setattr__(self, "pad30_padding", padding_of(self.policy, self.pad30_padding))

    @classmethod
    def of_cache(cls, meta: CacheMeta) -> "Features":
        return cls(meta.n_layers, meta.dim, meta.model, meta.fingerprint, meta.policy, meta.n_frames,
                   meta.vocab, meta.multilabel, meta.layers, meta.pad30_padding, meta.encoder)

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(encoder=self.encoder, model=self.model, fingerprint=self.fingerprint,
                           policy=Policy.of(self.policy, self.pad30_padding), n_layers=self.n_layers,
                           layers=self.layers, dim=self.dim, n_frames=self.n_frames,
                           pooling="" if self.n_frames is None else f"mean:{self.n_frames}", sample_rate=16000)


def head_problems(info: HeadInfo, feats: Features) -> list[str]:
    """Why `feats` are not what the head was trained on (empty: they are): the features' rule,
    `info.spec.incompatibilities(feats.spec, head=True)` (encoder family, layers, frames, weights,
    input policy), then the label type and classes when `feats` knows them."""
    out = info.spec.incompatibilities(feats.spec, head=True)
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
