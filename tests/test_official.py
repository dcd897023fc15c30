"""Official Whisper-AT heads by name (`wat.data.official`): the real download code against a loopback
HTTP server this module starts (WAT_WHISPER_AT_URL), serving official-format fixture heads
(`at_model.*` state dicts of the released shapes, random weights, written here). No network."""
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wat.data.heads import official
from wat.data.heads import build_head, load_head
from wat.data.labels import audioset_vocabulary
from wat.data.heads.official import OfficialHeadError, fetch, load_named_head, release_of

N_AS = 527
SHAPES = {"tiny.en": (4, 384), "tiny": (4, 384), "base": (6, 512), "small": (12, 768)}


def official_head_bytes(release: str, low: bool = False, seed: int = 0) -> bytes:
    """An official-format head file: `at_model.*` keys, TL-Tr (low: TL-Tr512), 527 outputs."""
    import io
    torch.manual_seed(seed)
    n_layers, dim = SHAPES[release]
    head = build_head("tl-tr", n_layers, dim, N_AS, 512 if low else None)
    buf = io.BytesIO()
    torch.save({f"at_model.{k}": v for k, v in head.state_dict().items()}, buf)
    return buf.getvalue()


class Server:
    """Serves `files` (name -> bytes) at http://127.0.0.1:PORT/NAME; `mode[name]`: "cut" announces the
    whole length and sends half, "stall" sends half and waits for `release`; others are 404."""

    def __init__(self):
        self.files, self.mode, self.requests = {}, {}, []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append(name)
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                mode = outer.mode.get(name)
                if mode in ("cut", "stall"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if mode == "stall":
                        outer.release.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    """A loopback server as WAT_WHISPER_AT_URL, network allowed, and an empty heads folder (the
    session's XDG cache keeps its converted Whisper models; only the heads folder is reset)."""
    import shutil
    s = Server()
    monkeypatch.setenv(official.URL_ENV, s.url)
    monkeypatch.delenv("WAT_OFFLINE", raising=False)
    shutil.rmtree(official.folder(), ignore_errors=True)
    yield s
    s.close()
    shutil.rmtree(official.folder(), ignore_errors=True)


def test_downloads_once_records_the_digest_and_loads(server):
    data = official_head_bytes("tiny.en")
    server.files["tiny.en_ori.pth"] = data
    head, info = load_named_head("whisper-at", "tiny.en")
    assert (info.kind, info.n_layers, info.dim_in, info.proj_dim, info.n_classes) == ("tl-tr", 4, 384, None, N_AS)
    assert info.model == "whisper-at:tiny.en" and info.multilabel and info.policy == "pad30"
    path = official.folder() / "tiny.en_ori.pth"
    assert path.read_bytes() == data
    import hashlib
    assert (official.folder() / "SHA256SUMS").read_text() == f"{hashlib.sha256(data).hexdigest()}  tiny.en_ori.pth\n"
    ref, _ = load_head(path)
    x = torch.randn(2, 4, 25, 384)
    assert torch.equal(head(x), ref(x))
    assert fetch("whisper-at", "tiny.en") == path and server.requests == ["tiny.en_ori.pth"]  # once
    assert not list(official.folder().glob("*.partial"))


def test_low_heads_and_openai_ids(server):
    server.files["small_low.pth"] = official_head_bytes("small", low=True)
    _, info = load_named_head("whisper-at-low", "openai/whisper-small")
    assert (info.n_layers, info.dim_in, info.proj_dim, info.model) == (12, 768, 512, "whisper-at:small")


def test_an_interrupted_transfer_leaves_nothing(server):
    data = official_head_bytes("tiny.en")
    server.files["tiny.en_ori.pth"] = data
    server.mode["tiny.en_ori.pth"] = "cut"
    with pytest.raises(OfficialHeadError, match=rf"transfer stopped after {len(data) // 2} of {len(data)} bytes"):
        fetch("whisper-at", "tiny.en")
    assert sorted(p.name for p in official.folder().iterdir()) == ["tiny.en_ori.pth.lock"]  # no file, no record
    server.mode.clear()
    assert load_named_head("whisper-at", "tiny.en")[1].dim_in == 384


def test_a_killed_download_leaves_nothing_that_loads(server, tmp_path):
    """kill -9 in the middle of the transfer: only a .partial file remains, which nothing loads and
    the next download removes."""
    server.files["tiny.en_ori.pth"] = official_head_bytes("tiny.en")
    server.mode["tiny.en_ori.pth"] = "stall"
    code = "from wat.data.heads.official import fetch; fetch('whisper-at', 'tiny.en')"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in official.folder().glob("*.partial")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (official.folder() / "tiny.en_ori.pth").exists()
    assert not (official.folder() / "SHA256SUMS").exists()
    [partial] = official.folder().glob("*.partial")
    server.mode.clear()
    assert load_named_head("whisper-at", "tiny.en")[1].n_layers == 4
    assert not partial.exists()


def test_404_offline_and_no_network_are_one_line_with_the_fix(server, monkeypatch):
    with pytest.raises(OfficialHeadError) as e:
        fetch("whisper-at", "base")
    msg = str(e.value)
    assert "HTTP 404" in msg and f"{server.url}/base_ori.pth" in msg and "\n" not in msg
    assert "put it at" in msg and official.URL_ENV in msg and "give a head file" in msg
    monkeypatch.setenv("WAT_OFFLINE", "1")
    with pytest.raises(OfficialHeadError, match="not cached and WAT_OFFLINE is set: download .* put it at"):
        fetch("whisper-at", "base")
    monkeypatch.delenv("WAT_OFFLINE")
    monkeypatch.setenv(official.URL_ENV, "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(OfficialHeadError, match="no connection"):
        fetch("whisper-at", "base")
    assert not (official.folder() / "base_ori.pth").exists()


def test_a_file_that_differs_from_the_recorded_digest_is_refused(server):
    server.files["tiny.en_ori.pth"] = official_head_bytes("tiny.en", seed=0)
    path = fetch("whisper-at", "tiny.en")
    sums = (official.folder() / "SHA256SUMS").read_text()
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the cached file changed
    with pytest.raises(OfficialHeadError, match="is not the .* recorded when it was first downloaded"):
        fetch("whisper-at", "tiny.en")
    path.unlink()  # a re-download that brings other bytes than the first one
    server.files["tiny.en_ori.pth"] = official_head_bytes("tiny.en", seed=1)
    with pytest.raises(OfficialHeadError, match="the file at the source changed.*not kept"):
        fetch("whisper-at", "tiny.en")
    assert not path.exists() and (official.folder() / "SHA256SUMS").read_text() == sums
    server.files["tiny.en_ori.pth"] = good  # the recorded file again
    assert fetch("whisper-at", "tiny.en").read_bytes() == good


def test_a_file_that_is_not_the_heads_shape_is_refused(server):
    server.files["tiny.en_ori.pth"] = official_head_bytes("base")  # base's width under tiny.en's name
    with pytest.raises(OfficialHeadError, match="is not the official Whisper-AT head tiny.en_ori.pth .*width 512"):
        fetch("whisper-at", "tiny.en")
    server.files["tiny.en_ori.pth"] = b"<html>a login page</html>"
    with pytest.raises(OfficialHeadError, match="is not the official Whisper-AT head"):
        fetch("whisper-at", "tiny.en")
    assert sorted(p.name for p in official.folder().iterdir()) == ["tiny.en_ori.pth.lock"]


def test_names_and_models_without_a_head(monkeypatch):
    assert [release_of(m) for m in ("tiny.en", "large-v2", "openai/whisper-medium.en")] == \
        ["tiny.en", "large-v2", "medium.en"]
    for model, why in [("large", "'large' is large-v3 in openai-whisper and wat .* use the model large-v2"),
                       ("large-v3", "released no head for large-v3; official heads exist for tiny.en"),
                       ("turbo", "released no head for turbo"),
                       ("openai/whisper-large-v3", "released no head for openai/whisper-large-v3"),
                       ("/models/base.pt", "not a Whisper release name.* give the head file itself"),
                       ("distil-whisper/distil-large-v2", "not a Whisper release name")]:
        with pytest.raises(OfficialHeadError, match=why):
            release_of(model)
    with pytest.raises(OfficialHeadError, match="no low-dimension head .* for tiny, only for small.en, small, "
                                                "medium.en, medium, large-v1, large-v2: use whisper-at"):
        official.file_name("whisper-at-low", "tiny")
    assert official.file_name("whisper-at", "large-v2") == "large-v2_ori.pth"
    # whisper-at's own links when no mirror is set (its _MODELS_AT), 10 _ori and 6 _low files
    monkeypatch.delenv(official.URL_ENV, raising=False)
    assert official.url("large-v2_ori.pth") == "https://www.dropbox.com/s/3zxpyvdrxy22eq7/large-v2_ori.pth?dl=1"
    assert {f"{r}_ori.pth" for r in official.RELEASES} <= set(official._SHARES) and len(official._SHARES) == 16


def test_a_named_large_head_is_checked_by_release(server):
    """Fetched by name, an official large head knows its release: large-v1's head on large-v2 features
    is refused (an official head file alone can only say large-v1 or -v2)."""
    from wat.data.heads import Features, HeadInfo, head_problems
    info = HeadInfo("tl-tr", 32, 1280, N_AS, None, 25, audioset_vocabulary().to_json(), model="whisper-at:large-v1")
    feats = lambda m: Features(32, 1280, m, "", "pad30")  # noqa: E731
    assert head_problems(info, feats("large-v1")) == []
    assert "large-v1" in head_problems(info, feats("large-v2"))[0]
    info.model = "whisper-at:large"
    assert head_problems(info, feats("large-v2")) == [] and head_problems(info, feats("large"))
