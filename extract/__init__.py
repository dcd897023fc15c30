"""Whisper loading (names, .pt, CTranslate2 and Hugging Face folders, HF ids, offline copies) and
encoder layer taps.

The names below load on first use (PEP 562): `wat-extract --help` and the other commands import
this package without torch or whisper."""
from __future__ import annotations

from typing import TYPE_CHECKING

from wat.data.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
