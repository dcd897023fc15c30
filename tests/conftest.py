"""Shared fixtures. Tests run offline: WAT_OFFLINE=1 makes `load_whisper` use the PyPI copies of
tiny.en/base, and XDG_CACHE_HOME points at a stable folder under the pytest cache (one per
pytest-xdist worker) so the CTranslate2 conversion is done once, not per run (subprocesses inherit
both). Session fixtures are built once per worker process, under tmp_path_factory (per worker)."""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    os.environ["WAT_OFFLINE"] = "1"
    # Test tensors are small: a second intra-op thread only adds synchronisation, and on a busy
    # 2-core machine two competing torch threads ran several times slower than one.
    import torch
    torch.set_num_threads(1)
    # One XDG cache per pytest-xdist worker (`make test` runs several): tests treat it as theirs alone
    # (test_official's `server` empties the official heads folder in it, others expect a head not
    # cached yet), which holds within one process, not across processes sharing the folder.
    worker = getattr(config, "workerinput", {}).get("workerid")
    if getattr(config, "cache", None):
        cache = config.cache.mkdir("xdg-cache" + (f"-{worker}" if worker else ""))
    else:  # -p no:cacheprovider: a folder of this run only, removed at its end (it holds converted models)
        cache = tempfile.mkdtemp(prefix="wat-xdg-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
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


# Real features for the train/probe/tag tests: the synthetic ESC-50-layout demo set through tiny.en.
# Built once per session, on first use, with the same library calls `make demo` uses.

@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """11 synthetic sound classes x 8 clips, 5 folds (ESC-50 layout)."""
    from wat.data import make_demo
    return make_demo(tmp_path_factory.mktemp("demo") / "esc50-demo", clips_per_class=8, seed=0)


def _extract(dataset, model, out: Path, policy: str) -> Path:
    from wat.extract.pipeline import ExtractOptions, extract_dataset
    summary = extract_dataset(dataset, ExtractOptions(model="tiny.en", policy=policy, shard_size=32,
                                                      num_workers=0, progress=False), out, model=model)
    assert summary.written == len(dataset.clips), summary
    return out


@pytest.fixture(scope="session")
def demo_cache_trim(demo_data, tiny_model, tmp_path_factory) -> Path:
    """feats.h5 of the whole demo set (88 clips), tiny.en, policy trim (cheap: 5 s of encoder input)."""
    from wat.data import load_dataset
    return _extract(load_dataset("esc50", demo_data), tiny_model,
                    tmp_path_factory.mktemp("cache-trim") / "feats.h5", "trim")


@pytest.fixture(scope="session")
def demo_cache_pad30(demo_data, tiny_model, tmp_path_factory) -> Path:
    """feats.h5 of fold 1 of the demo set (2 clips per class, 22 clips), tiny.en, policy pad30 —
    the features `wat-tag` sees during transcription. pad30 costs 6x trim, hence one fold only."""
    import dataclasses
    from wat.data import load_dataset
    ds = load_dataset("esc50", demo_data)
    ds = dataclasses.replace(ds, clips=[c for c in ds.clips if c.fold == 1])
    return _extract(ds, tiny_model, tmp_path_factory.mktemp("cache-pad30") / "feats.h5", "pad30")


@pytest.fixture(scope="session")
def demo_head_pad30(demo_cache_pad30, tmp_path_factory) -> Path:
    """A TL-Tr head (width 64, for CPU speed) trained on demo_cache_pad30 (all its clips)."""
    from wat.train.loop import TrainOptions, train
    out = tmp_path_factory.mktemp("head-pad30")
    train(TrainOptions(features=str(demo_cache_pad30), out=str(out), head="tl-tr", proj_dim=64, epochs=20,
                       lr=1e-3, batch_size=8, mixup=0.0, seed=0, progress=False))
    return out / "wa.pt"


@pytest.fixture(scope="session")
def toy_encoder():
    """A test-only encoder family "toy" (specs "toy-*"), registered from the first test that uses it to
    the end of the session: the generic encoder paths without a model library. Returns the class."""
    import torch

    from wat.extract.encoders import ENCODERS, Encoder, register_encoder
    from wat.extract.pooling import pool_frames

    class ToyEncoder(Encoder):
        """2 "layers" of 3 channels at 100 frames/s (160-sample hops): frame t of layer l is
        (l + 1) * (the mean of its hop, the hop's energy, t)."""

        family = "toy"
        policies = ("trim",)
        sample_rate, frame_rate, n_layers, dim = 16000, 100.0, 2, 3
        hop = 160

        def __init__(self, name):
            self.name, self.fingerprint, self.device = name, "f" * 64, torch.device("cpu")

        def min_samples(self, policy):
            return self.hop

        def native_frames(self, samples, policy):
            return samples // self.hop

        def pooled(self, clips, *, frames, policy, layers=None):
            clips, layers = self.check(clips, frames=frames, policy=policy, layers=layers)
            out = []
            for c in clips:
                hops = c[: self.native_frames(len(c), policy) * self.hop].reshape(-1, self.hop)
                x = torch.stack([hops.mean(1), (hops ** 2).mean(1), torch.arange(len(hops), dtype=torch.float32)], 1)
                out.append(torch.stack([(i + 1) * pool_frames(x[None], frames, None)[0] for i in layers]))
            return torch.stack(out)

        @classmethod
        def accepts(cls, spec):
            return spec.startswith("toy-")

        @classmethod
        def load(cls, spec, device="cpu"):
            return cls(spec)

    register_encoder(ToyEncoder)
    yield ToyEncoder
    ENCODERS.pop("toy", None)


@pytest.fixture
def offline_hub(tmp_path):
    """offline_hub(repo_id, folder) -> env: a huggingface_hub cache under tmp_path/hub holding
    `folder` as the main snapshot of `repo_id`, and the environment (this one, WAT_OFFLINE unset)
    that reads it with HF_HUB_OFFLINE=1 (hub ids are loaded in a subprocess: the hub reads its
    settings at import)."""
    return lambda repo_id, folder: _offline_hub(tmp_path, repo_id, folder)


def _offline_hub(tmp_path: Path, repo_id: str, folder: Path) -> dict:
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    env = {k: v for k, v in os.environ.items() if k != "WAT_OFFLINE"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    return env
