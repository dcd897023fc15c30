"""The head schema: head architectures, the registry of head kinds, `HeadInfo`, the checkpoint
format, the one head-vs-features compatibility rule and the one logits -> probabilities function.

This package is to heads what `wat.data.cache` is to feature caches: `wat.train` writes heads, `wat.eval`
and `wat.tag` read them, and none of them needs the others for it.

Modules: `blocks` (whisper's attention block, without whisper), `kinds` (`Head`, the registry, the
four Whisper-AT heads, `build_head`, `probabilities`), `checkpoint` (`HeadInfo`, `save_head`,
`load_head`), `check` (`Features`, `head_problems`). The names below are re-exported here.

Adding a head kind is one `Head` subclass with a `kind` name and the cache `field` it reads
(`features` [L, T, D] or the time `mean` [L, D]) and its default learning rate `lr`; defining the class
registers it.

The names below load on first use (PEP 562): the commands' --help imports this package without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

from .names import BUILTIN_KINDS, LAYER_ATTN_HEADS, TIME_ATTN_HEADS

# name -> module that defines it
_LAZY = {**dict.fromkeys(("ResidualAttentionBlock",), "blocks"),
         **dict.fromkeys(("Features", "head_problems"), "check"),
         **dict.fromkeys(("FORMAT", "WHISPER_WIDTHS", "HeadInfo", "head_from_info", "load_head",
                          "official_to_state_dict", "save_head"), "checkpoint"),
         **dict.fromkeys(("HEADS", "LAYER_HEADS", "TIME_HEADS", "WAMLP", "Head", "HeadError", "LastMLP", "TLTr",
                          "WATr", "build_head", "head_class", "head_field", "n_parameters", "probabilities"), "kinds")}

__all__ = ["Head", "HEADS", "HeadError", "HeadInfo", "Features", "build_head", "load_head", "save_head",
           "head_problems", "head_class", "head_field", "head_from_info", "probabilities", "n_parameters",
           "official_to_state_dict", "ResidualAttentionBlock", "LastMLP", "WAMLP", "WATr", "TLTr",
           "TIME_ATTN_HEADS", "LAYER_ATTN_HEADS", "TIME_HEADS", "LAYER_HEADS", "BUILTIN_KINDS", "WHISPER_WIDTHS",
           "FORMAT"]

if TYPE_CHECKING:
    from .blocks import ResidualAttentionBlock
    from .check import Features, head_problems
    from .checkpoint import (FORMAT, WHISPER_WIDTHS, HeadInfo, head_from_info, load_head, official_to_state_dict,
                             save_head)
    from .kinds import (HEADS, LAYER_HEADS, TIME_HEADS, WAMLP, Head, HeadError, LastMLP, TLTr, WATr, build_head,
                        head_class, head_field, n_parameters, probabilities)


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
