"""The HEAR seed's ensemble served by wat.extract.hear: hearvalidator, and the fused embeddings
against the members' own (alignment in time, width matching, the `_g` scene embedding)."""
import importlib
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from wat.data import fusion as DF
from wat.extract import hear
from wat.extract.hear_ensemble import EnsembleHEAR

E = hear.get_timestamp_embeddings   # what hear.load_model hands an ensemble: a member's embeddings


def _validator(monkeypatch):
    # as tests/test_hear.py: hearvalidator imports tensorflow but uses it only for TensorFlow models
    tf = types.ModuleType("tensorflow")
    tf.Module = type("Module", (), {})
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    return importlib.import_module("hearvalidator.validate")


class Every40ms(nn.Module):
    """A stand-in member on another frame grid (25 frames/s, 6 wide): frame j is the mean of its 640
    samples and their square, repeated; it lets the alignment be checked against a known signal."""
    sample_rate = 16000
    timestamp_embedding_size = scene_embedding_size = 6
    name, family = "grid40", "test"

    def timestamps(self, n_frames):
        return (torch.arange(n_frames, dtype=torch.float32) + 0.5) * 40.0

    def frames(self, audio):
        n = audio.shape[1] // 640
        x = audio[:, :n * 640].reshape(len(audio), n, 640)
        return torch.stack([x.mean(-1), (x ** 2).mean(-1)] * 3, -1)


def test_hearvalidator_passes_on_an_ensemble(monkeypatch, capsys):
    validate = _validator(monkeypatch)
    v = validate.ValidateModel("wat.extract.hear", "tiny.en+base", device="cpu")
    v()   # raises validate.ModelError on any failed check
    out = capsys.readouterr().out
    assert "Received embedding of shape: torch.Size([16, 100, 896])" in out     # 384 + 512, 20 ms frames
    assert "Interval between timestamps is 20.0ms" in out
    assert "Received embedding of shape: torch.Size([8, 896])" in out
    assert v.model.name == "fusion_cat_W1W2"


def test_cat_of_members_then_g_groups(tiny_model):
    torch.manual_seed(0)
    audio = torch.rand(3, 16000) * 2 - 1
    one = hear.WhisperHEAR(tiny_model)
    two = hear.WhisperHEAR(tiny_model, layers=[0, 1])
    m = EnsembleHEAR([one, two], E)
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    a, ta = hear.get_timestamp_embeddings(audio, one)
    b, _ = hear.get_timestamp_embeddings(audio, two)
    torch.testing.assert_close(emb, torch.cat([a, b], -1))        # same 20 ms grid: nothing interpolated
    torch.testing.assert_close(ts, ta)
    torch.testing.assert_close(hear.get_scene_embeddings(audio, m), torch.cat([a, b], -1).mean(1))

    g = EnsembleHEAR([one, two], E, groups=5)
    assert g.scene_embedding_size == 5 * 768 and g.timestamp_embedding_size == 768 and g.name.endswith("_g")
    scene = hear.get_scene_embeddings(audio, g)
    want = torch.cat([torch.cat([a, b], -1)[:, k * 10:(k + 1) * 10].mean(1) for k in range(5)], -1)  # 50 frames
    torch.testing.assert_close(scene, want)

    avg = EnsembleHEAR([one, two], E, fusion="avg")
    torch.testing.assert_close(hear.get_scene_embeddings(audio, avg), ((a + b) / 2).mean(1))

    for model in (m, g):   # no clips: the HEAR shapes with n = 0 (the first member's grid was read from clip 0)
        emb, ts = hear.get_timestamp_embeddings(audio[:0], model)
        assert emb.shape == (0, 50, 768) and ts.shape == (0, 50)
        assert hear.get_scene_embeddings(audio[:0], model).shape == (0, model.scene_embedding_size)


def test_members_on_other_grids_and_widths_are_interpolated(tiny_model):
    torch.manual_seed(1)
    audio = torch.rand(2, 16000) * 2 - 1                   # 50 Whisper frames, 25 frames of the stand-in
    w, s = hear.WhisperHEAR(tiny_model), Every40ms()
    m = EnsembleHEAR([w, s], E)
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    a, ta = hear.get_timestamp_embeddings(audio, w)
    assert emb.shape == (2, 50, 390) and torch.equal(ts, ta)   # the first member's grid and timestamps
    mine = s.frames(audio).numpy()
    src, dst = (np.arange(25) + 0.5) / 25, (np.arange(50) + 0.5) / 50
    by_hand = np.stack([np.stack([np.interp(dst, src, mine[n, :, d]) for d in range(6)], 1) for n in range(2)])
    np.testing.assert_allclose(emb[..., 384:].numpy(), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb[..., :384], a)

    with pytest.raises(ValueError, match="equal widths.*match_width"):
        EnsembleHEAR([w, s], E, fusion="avg")
    mw = EnsembleHEAR([s, w], E, fusion="avg", match_width=True)   # to the stand-in's width and grid
    assert mw.timestamp_embedding_size == mw.scene_embedding_size == 6 and mw.name == "fusion_avg_gW_d6"
    e2, t2 = hear.get_timestamp_embeddings(audio, mw)
    want = (torch.from_numpy(mine) + DF.interp_width(DF.interp_time(a, 25), 6)) / 2
    torch.testing.assert_close(e2, want)
    assert t2.shape == (2, 25)


def test_bad_ensembles(tiny_model):
    w = hear.WhisperHEAR(tiny_model)
    for kwargs, match in [({"fusion": "max"}, "fusion"), ({"groups": -1}, "groups"), ({"groups": 1.5}, "groups"),
                          ({"groups": True}, "groups")]:
        with pytest.raises(ValueError, match=match):
            EnsembleHEAR([w, w], E, **kwargs)
    with pytest.raises(ValueError, match="at least two"):
        EnsembleHEAR([w], E)
    with pytest.raises(ValueError, match="empty model name"):
        hear.load_model("tiny.en+")
    with pytest.raises(ValueError, match="ensembles"):
        hear.load_model("tiny.en", groups=5)
