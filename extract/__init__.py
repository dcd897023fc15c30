"""Whisper loading (names, .pt, CTranslate2 and Hugging Face folders, HF ids, offline copies) and
encoder layer taps.

The names below load on first use (PEP 562): `wat-extract --help` and the other commands import
this package without torch or whisper."""
from __future__ import annotations

from typing import TYPE_CHECKING

# name -> module that defines it
_LAZY = {"load_whisper": "load", "WhisperLoadError": "load", "fingerprint": "load", "model_name": "load",
         "encode_layers": "layers", "encoder_frames": "layers", "EncoderPasses": "layers", "LayerTaps": "layers",
         "log_mel": "layers", "pad30_input": "layers", "ShortClipError": "layers"}

__all__ = ["load_whisper", "WhisperLoadError", "fingerprint", "model_name",
           "encode_layers", "encoder_frames", "EncoderPasses", "LayerTaps", "log_mel", "pad30_input",
           "ShortClipError"]

if TYPE_CHECKING:
    from .layers import (EncoderPasses, LayerTaps, ShortClipError, encode_layers, encoder_frames, log_mel,
                         pad30_input)
    from .load import WhisperLoadError, fingerprint, load_whisper, model_name


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
