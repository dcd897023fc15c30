"""Shared fixtures. Tests run offline: WAT_OFFLINE=1 makes `load_whisper` use the PyPI copies of
tiny.en/base, and XDG_CACHE_HOME points at a stable folder under the pytest cache so the CTranslate2
conversion is done once, not per run (subprocesses inherit both)."""
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    os.environ["WAT_OFFLINE"] = "1"
    cache = config.cache.mkdir("xdg-cache") if config.cache else tempfile.mkdtemp(prefix="wat-xdg-")
    os.environ["XDG_CACHE_HOME"] = str(cache)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny.en (eval mode, CPU), shared by the whole session: do not modify it."""
    from wat.extract import load_whisper
    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def speech_wav() -> Path:
    """4.9 s of espeak-ng: "The weather is good today, and the birds are singing in the park."."""
    return FIXTURES / "speech_en.wav"


@pytest.fixture(scope="session")
def speech_audio(speech_wav) -> np.ndarray:
    """speech_wav as float32 mono 16 kHz samples."""
    audio, sr = sf.read(speech_wav, dtype="float32")
    assert sr == 16000 and audio.ndim == 1
    return audio
