"""`--init`: the head a run starts from — a head file (ours or an official `at_model.*` one) or an
official Whisper-AT head by name (`whisper-at`, `whisper-at-low`: the head of the Whisper model
the training cache was extracted with, fetched once by `wat.data.heads.official`).

The body (everything but the output layer) is kept. The output layer is rebuilt for the run's
vocabulary: a class the init head also has (same AudioSet MID or name, `wat.data.labels.class_rows`)
keeps its row (weights and bias), the others start fresh. Without --head/--proj-dim the run trains
the init head's kind and projection width.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wat.data.cache import Cache
from wat.data.heads import Features, HeadError, HeadInfo, head_problems
from wat.data.labels import Vocabulary, class_rows
from wat.data.heads.official import load_named_head

from .options import TrainError, TrainOptions

log = logging.getLogger(__name__)
OUT = "mlp_layer.1."  # the output Linear of every head kind (`_classifier`: LayerNorm, Linear)
DEFAULT_HEAD = "tl-tr"


@dataclass
class Init:
    """A checked --init head: its info and weights, and the rows of its output layer the run keeps."""

    info: HeadInfo
    state: dict[str, Tensor]
    rows: list[int | None] | None = None  # per run class, the init head's output row; set by `for_vocab`

    def for_vocab(self, vocab: Vocabulary, what: str) -> "Init":
        """Match the run's classes to the init head's outputs (logged: how many rows are kept)."""
        n = self.info.n_classes
        if self.info.vocab_json:
            theirs = Vocabulary.from_json(self.info.vocab_json)
            rows = class_rows(vocab, Vocabulary(theirs.keys[:n], theirs.names[:n]))
        else:  # a head without a vocabulary: its rows fit only the same number of classes, in order
            rows = list(range(n)) if len(vocab) == n else [None] * len(vocab)
        kept = sum(r is not None for r in rows)
        log.info("--init %s: %d of the %d classes keep the init head's output row, %d start fresh",
                 what, kept, len(vocab), len(vocab) - kept)
        return dataclasses.replace(self, rows=rows)

    def apply(self, head: nn.Module) -> nn.Module:
        """Load the body into a freshly built head (its output rows already randomly initialised),
        then copy the matched rows."""
        body = {k: v for k, v in self.state.items() if not k.startswith(OUT)}
        missing, unexpected = head.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith(OUT) for k in missing):
            raise TrainError(f"--init weights do not fit the head (missing {missing}, unexpected {unexpected})")
        out = dict(head.named_parameters())
        with torch.no_grad():
            for i, j in enumerate(self.rows or []):
                if j is not None:
                    out[OUT + "weight"][i] = self.state[OUT + "weight"][j]
                    out[OUT + "bias"][i] = self.state[OUT + "bias"][j]
        return head


def load_init(opts: TrainOptions, cache: Cache) -> tuple[TrainOptions, Init | None]:
    """The --init head, checked against the training cache, and the options with the head kind and
    projection resolved (--head unset: the init head's, or tl-tr without --init)."""
    if opts.init is None:
        return (opts if opts.head else dataclasses.replace(opts, head=DEFAULT_HEAD)), None
    m = cache.meta
    try:
        src, info = load_named_head(opts.init, m.model)  # what it was trained on: checked below, by the one rule
    except HeadError as e:
        raise TrainError(f"--init: {e}") from None
    # transfer to other classes is allowed: the classes and label type are not compared
    feats = Features(m.n_layers, m.dim, m.model, m.fingerprint, m.policy, m.n_frames, layers=m.layers,
                     pad30_padding=m.pad30_padding, encoder=m.encoder)
    bad = head_problems(info, feats)
    other_policy = [b for b in bad if b.startswith("input policy")]
    if opts.allow_policy_mismatch and other_policy:
        log.warning("--init %s: %s; fine-tuned anyway (--allow-policy-mismatch)", opts.init, other_policy[0])
        bad = [b for b in bad if b not in other_policy]
    if bad:
        hint = " (--allow-policy-mismatch fine-tunes it anyway)" if bad == other_policy else ""
        raise TrainError(f"--init {opts.init} does not fit {opts.features}: {'; '.join(bad)}{hint}")
    if opts.head is None:
        opts = dataclasses.replace(opts, head=info.kind,
                                   proj_dim=info.proj_dim if opts.proj_dim is None else opts.proj_dim)
    if (info.kind, info.dim_in, info.proj_dim) != (opts.head, m.dim, opts.proj_dim):
        raise TrainError(f"--init {opts.init} is a {info.kind} head (width {info.dim_in}, projection "
                         f"{info.proj_dim}); this run trains {opts.head} (width {m.dim}, projection {opts.proj_dim}): "
                         "leave out --head and --proj-dim to train the init head's kind")
    return opts, Init(info, {k: v.detach().clone() for k, v in src.state_dict().items()})
