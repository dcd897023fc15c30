"""An official Whisper-AT head mirror for tests and benchmarks: a loopback HTTP server to point
WAT_WHISPER_AT_URL at (so the real download code runs, no network), official-format head files
(`at_model.*` state dicts, 527 AudioSet outputs) with random weights, and a stand-in official head
made from a head wat trained (what fine-tuning from an official head is measured on here)."""
from __future__ import annotations

import http.server
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wat.data.labels import Vocabulary

OUT = "mlp_layer.1."  # the output layer's keys in a TL-Tr state dict

N_AS = 527
SHAPES = {"tiny.en": (4, 384), "tiny": (4, 384), "base": (6, 512), "small": (12, 768)}


def official_head_bytes(release: str, low: bool = False, seed: int = 0) -> bytes:
    """An official-format head file: `at_model.*` keys, TL-Tr (low: TL-Tr512), 527 outputs."""
    import io
    import torch
    from wat.data.heads import build_head
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


def standin_official_head(run_dir, vocab: Vocabulary) -> bytes:
    """A wat head (RUN_DIR/wa.pt, trained on `vocab`) written as an official head file: its body,
    and in a fresh 527-row output layer its trained rows at the AudioSet rows of the classes that
    have one (as an official head's rows for those classes would be); `at_model.*` names."""
    import io
    import torch
    from wat.data.heads import build_head, load_head
    from wat.data.labels import audioset_vocabulary, class_rows
    trained, info = load_head(run_dir / "wa.pt")
    torch.manual_seed(1)
    full = build_head("tl-tr", info.n_layers, info.dim_in, N_AS, info.proj_dim).state_dict()
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith(OUT)}
    w, b = full[OUT + "weight"].clone(), full[OUT + "bias"].clone()
    for i, j in enumerate(class_rows(vocab, audioset_vocabulary())):
        if j is not None:
            w[j], b[j] = trained.state_dict()[OUT + "weight"][i], trained.state_dict()[OUT + "bias"][i]
    state.update({OUT + "weight": w, OUT + "bias": b})
    buf = io.BytesIO()
    torch.save({f"at_model.{k}": v for k, v in state.items()}, buf)
    return buf.getvalue()


def serve_standin(server: Server, pretrain, out, seed: int = 0, **recipe) -> str:
    """Train a head with the default recipe (`recipe`: TrainOptions fields to change) on the cache
    `pretrain` (into OUT) and serve it, as a stand-in official head, under the official file name for
    the cache's model; returns that name."""
    from wat.data import open_cache
    from wat.data.heads import official
    from wat.train.loop import TrainOptions, train
    meta = open_cache(pretrain).meta
    train(TrainOptions(features=str(pretrain), out=str(out), seed=seed, progress=False, **recipe))
    name = official.file_name("whisper-at", meta.model)
    server.files[name] = standin_official_head(out, meta.vocab)
    return name


def init_vs_scratch(fine_tune, score, out, seed: int = 0) -> dict:
    """Train on the cache `fine_tune`, scored on `score`, twice with the same recipe (defaults),
    epochs, seed and clips: from scratch and with --init whisper-at (the head the mirror serves).
    A stand-in learnt on trim features, but the official file format implies pad30, hence
    allow_policy_mismatch. Returns {"scratch": final metrics, "init": final metrics} (train's dicts)."""
    from pathlib import Path
    from wat.train.loop import TrainOptions, train
    return {name: train(TrainOptions(features=str(fine_tune), eval_features=str(score), out=str(Path(out) / name),
                                     init=init, allow_policy_mismatch=True, seed=seed, progress=False))
            for name, init in (("scratch", None), ("init", "whisper-at"))}
