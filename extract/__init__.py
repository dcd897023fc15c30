"""Whisper loading (names, .pt, CTranslate2 and Hugging Face folders, HF ids, offline copies) and
encoder layer taps."""
from .layers import (EncoderPasses, LayerTaps, ShortClipError, encode_layers, encoder_frames, log_mel,
                     pad30_input)
from .load import WhisperLoadError, fingerprint, load_whisper, model_name

__all__ = ["load_whisper", "WhisperLoadError", "fingerprint", "model_name",
           "encode_layers", "encoder_frames", "EncoderPasses", "LayerTaps", "log_mel", "pad30_input",
           "ShortClipError"]
