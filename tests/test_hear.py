"""HEAR 2021 API: the real hearvalidator on tiny.en, and the embeddings against encode_layers."""
import importlib
import sys
import types

import numpy as np
import pytest
import torch

from wat.extract import encode_layers, hear


def test_hearvalidator_passes(monkeypatch, capsys):
    # hearvalidator imports tensorflow at module level but only uses it for TensorFlow models:
    # an empty stand-in (with the Module class its isinstance check needs) lets its torch checks run
    tf = types.ModuleType("tensorflow")
    tf.Module = type("Module", (), {})
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    validate = importlib.import_module("hearvalidator.validate")
    v = validate.ValidateModel("wat.extract.hear", "tiny.en", device="cpu")
    v()   # raises validate.ModelError on any failed check
    assert v.model_type == "torch"
    out = capsys.readouterr().out
    assert "Received embedding of shape: torch.Size([16, 100, 384])" in out
    assert "Interval between timestamps is 20.0ms" in out
    assert "Received embedding of shape: torch.Size([8, 384])" in out


def test_embeddings_are_encoder_layers(tiny_model):
    torch.manual_seed(0)
    audio = torch.rand(3, 16000) * 2 - 1          # 1 s -> 50 encoder frames
    ref = encode_layers(tiny_model, audio, frames=50, policy="trim")   # [3, 4, 50, 384]

    m = hear.WhisperHEAR(tiny_model)
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    assert emb.dtype == torch.float32 and emb.shape == (3, 50, 384) and ts.shape == (3, 50)
    torch.testing.assert_close(emb, ref.mean(1))
    assert ts[1, :3].tolist() == [10.0, 30.0, 50.0] and ts[2, -1].item() == 990.0
    torch.testing.assert_close(hear.get_scene_embeddings(audio.numpy(), m), ref.mean(1).mean(1))

    m = hear.WhisperHEAR(tiny_model, layers=[3, 1], reduce="concat", batch_size=2)
    assert m.scene_embedding_size == m.timestamp_embedding_size == 768
    emb, _ = hear.get_timestamp_embeddings(audio, m)    # batches of 2: float noise of other BLAS paths
    torch.testing.assert_close(emb[..., :384], ref[:, 3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb[..., 384:], ref[:, 1], atol=1e-4, rtol=1e-4)


def test_long_audio_in_30s_windows(tiny_model):
    audio = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 16000 * 31)).astype(np.float32))
    m = hear.WhisperHEAR(tiny_model, layers=[0])
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    assert emb.shape == (1, 1550, 384)
    np.testing.assert_allclose(np.diff(ts[0].numpy()), 20.0)
    tail = encode_layers(tiny_model, audio[:, 16000 * 30:], frames=50, policy="trim")[:, 0]
    torch.testing.assert_close(emb[:, 1500:], tail)


def test_bad_options(tiny_model):
    with pytest.raises(ValueError, match="layers"):
        hear.WhisperHEAR(tiny_model, layers=[4])
    with pytest.raises(ValueError, match="reduce"):
        hear.WhisperHEAR(tiny_model, reduce="max")
    with pytest.raises(ValueError, match="n_sounds"):
        hear.get_scene_embeddings(torch.zeros(16000), hear.WhisperHEAR(tiny_model))
