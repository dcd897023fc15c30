"""HEAR 2021 API: the real hearvalidator on tiny.en, and the embeddings against encode_layers."""
import importlib
import sys
import types

import numpy as np
import pytest
import torch

from wat.extract import encode_layers, hear, log_mel, pad30_input
from wat.extract.layers import short_input


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


def test_no_clips_give_the_hear_shapes_with_n_0(tiny_model):
    """An empty batch: [0, T, D] embeddings and [0, T] timestamps (T what a clip of that length gives) and
    [0, D] scene embeddings, as the HEAR API's shapes say for n = 0 (it crashed in HEARModel.frames)."""
    m = hear.WhisperHEAR(tiny_model, layers=[0])
    emb, ts = hear.get_timestamp_embeddings(np.zeros((0, 16000), np.float32), m)
    assert emb.shape == (0, 50, 384) and ts.shape == (0, 50) and emb.dtype == ts.dtype == torch.float32
    assert m.frames(torch.zeros(0, 8000)).shape == (0, 25, 384)
    assert hear.get_scene_embeddings(torch.zeros(0, 16000), m).shape == (0, 384)


def test_non_finite_audio_is_refused_naming_its_rows(tiny_model):
    """A NaN or inf sample used to give NaN embeddings without a word: both API calls refuse the batch,
    naming the rows (the count past ten); an empty batch keeps its n = 0 shapes (test above)."""
    m = hear.WhisperHEAR(tiny_model, layers=[0])
    audio = torch.zeros(4, 4000)
    audio[1, 7], audio[3, 0] = float("nan"), float("-inf")
    for call in (hear.get_timestamp_embeddings, hear.get_scene_embeddings):
        with pytest.raises(ValueError, match=r"audio rows \[1, 3\] of 4 hold non-finite samples"):
            call(audio, m)
        with pytest.raises(ValueError, match=r"rows \[0\] of 1 "):
            call(np.full((1, 4000), np.inf, np.float32), m)
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(12 in all\)\] of 12"):
        hear.get_scene_embeddings(torch.full((12, 4000), float("nan")), m)


def test_long_audio_in_30s_windows(tiny_model):
    # 31 s + 100 samples: the tail's last 100 samples reach no new encoder frame (50, not 51)
    audio = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 16000 * 31 + 100)).astype(np.float32))
    m = hear.WhisperHEAR(tiny_model, layers=[0])
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    assert emb.shape == (1, 1550, 384)
    np.testing.assert_allclose(np.diff(ts[0].numpy()), 20.0)
    tail = encode_layers(tiny_model, audio[:, 16000 * 30:], frames=50, policy="trim")[:, 0]
    torch.testing.assert_close(emb[:, 1500:], tail)


@pytest.mark.parametrize("policy", ["trim", "pad30"])
def test_long_audio_with_a_tail_of_a_few_samples(tiny_model, policy):
    """30 s + r samples, r = 1..200: a last window whisper's STFT alone cannot take (trim) or with
    no log-mel frame (r < 160). r < 160 adds no frame (as inside a window); r = 160..200 adds one
    encoder frame at 30 010 ms: trim encodes it with the previous frame's 320 samples in front
    (same log-mel frame centres), pad30 as the tail's own transcribe window. The first 1500 frames
    are those of the 30 s alone."""
    a = 30 * 16000
    audio = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, a + 201)).astype(np.float32))
    m = hear.WhisperHEAR(tiny_model, layers=[0, 3], policy=policy)
    head = hear.get_timestamp_embeddings(audio[:, :a], m)[0]
    assert head.shape == (1, 1500, 384)
    for r in (1, 100, 159, 160, 200) + ((201,) if policy == "trim" else ()):
        x = audio[:, :a + r]
        emb, ts = hear.get_timestamp_embeddings(x, m)
        t = 1500 + (r >= 160)
        assert emb.shape == (1, t, 384) and ts[0].tolist() == [10.0 + 20.0 * j for j in range(t)], r
        torch.testing.assert_close(emb[:, :1500], head, rtol=0, atol=0)
        if r < 160:
            continue
        if policy == "pad30":
            real = _block_outputs(tiny_model, pad30_input([x[0, a:]], 80)[0], [0, 3])[:, 0]
        elif r <= 200:
            folded = log_mel(x[:, a - 320:], 80)       # 3 log-mel frames; the tail's is the third
            longer = log_mel(x[:, a - 640:], 80)
            torch.testing.assert_close(folded[..., 2], longer[..., 4])   # centred at sample a either way
            real = _block_outputs(tiny_model, folded, [0, 3])[:, 1]
        else:                                         # long enough alone: encoded alone, as before
            real = _block_outputs(tiny_model, log_mel(x[:, a:], 80), [0, 3])[:, 0]
        torch.testing.assert_close(emb[0, 1500], real.mean(0), atol=1e-5, rtol=1e-5)


def _block_outputs(model, mel, layers):
    """The encoder's per-frame outputs of `layers` on `mel` [1, 80, M], unpooled: [L, T, D]."""
    outs = []
    hooks = [model.encoder.blocks[i].register_forward_hook(lambda mod, a, o: outs.append(o[0])) for i in layers]
    try:
        with torch.no_grad(), short_input(model.encoder, (mel.shape[-1] + 1) // 2):
            model.encoder(mel)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("policy", ["trim", "pad30"])
def test_timestamps_are_the_encoder_frames(tiny_model, speech_audio, policy):
    """Clips ending 0, 1, 159, 160, 161, 319 samples into a 320-sample step: one timestamp per encoder
    frame the encoder really computes from the clip's own log-mel, each frame once (ceil(samples / 320)
    timestamps repeated a frame at 1..159), centred at 10 + 20 j ms. pad30 keeps as many frames of
    transcribe's window, and the embeddings are those frames' outputs."""
    m = hear.WhisperHEAR(tiny_model, layers=[0, 3], policy=policy)
    counts = []
    for r in (0, 1, 159, 160, 161, 319):
        x = torch.from_numpy(np.resize(speech_audio, 25 * 320 + r).astype(np.float32))
        emb, ts = hear.get_timestamp_embeddings(x[None], m)
        real = _block_outputs(tiny_model, log_mel(x[None], 80), [0, 3])     # the clip alone: trim
        t = real.shape[1]
        counts.append(t)
        if policy == "pad30":
            real = _block_outputs(tiny_model, pad30_input([x], 80)[0], [0, 3])[:, :t]
        assert emb.shape == (1, t, 384) and ts.shape == (1, t)
        torch.testing.assert_close(emb[0], real.mean(0), atol=1e-5, rtol=1e-5)
        assert ts[0].tolist() == [10.0 + 20.0 * j for j in range(t)] and bool((ts[0].diff() > 0).all())
    assert counts == [25, 25, 25, 26, 26, 26]


def test_bad_options(tiny_model):
    with pytest.raises(ValueError, match="layers"):
        hear.WhisperHEAR(tiny_model, layers=[4])
    with pytest.raises(ValueError, match="reduce"):
        hear.WhisperHEAR(tiny_model, reduce="max")
    with pytest.raises(ValueError, match="n_sounds"):
        hear.get_scene_embeddings(torch.zeros(16000), hear.WhisperHEAR(tiny_model))
    # numbers: 0, negative, NaN, inf, absurd and fractional values are refused, never truncated
    for bad in (0, -1, float("nan"), float("inf"), 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            hear.WhisperHEAR(tiny_model, batch_size=bad)
        if bad != 0:   # layer 0 exists
            with pytest.raises(ValueError, match="layers"):
                hear.WhisperHEAR(tiny_model, layers=[bad])
        with pytest.raises(ValueError, match="frames"):
            encode_layers(tiny_model, torch.zeros(1, 16000), frames=bad)
    with pytest.raises(ValueError, match="layers"):
        hear.WhisperHEAR(tiny_model, layers=[10**12])
    with pytest.raises(ValueError, match="frames"):
        encode_layers(tiny_model, torch.zeros(1, 16000), frames=10**12)
    # an absurd batch is one batch of everything; integer strings still work
    m = hear.WhisperHEAR(tiny_model, layers=["3"], batch_size=10**12)
    assert m.layers == (3,) and hear.get_scene_embeddings(torch.zeros(2, 4000), m).shape == (2, 384)
