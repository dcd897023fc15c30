"""The encoder interface (wat.extract.encoders): the registry and `load_encoder` dispatch, the shared
argument checks, and WhisperEncoder = the Whisper path bit for bit (`encode_layers`, fingerprint,
name). A test-only family registered here exercises the generic paths; the product has no mock."""
import numpy as np
import pytest
import torch

from wat.extract import encode_layers, fingerprint, model_name
from wat.extract.encoders import (ENCODERS, Encoder, EncoderError, ShortClipError, as_clips, encoder_class,
                                  equal_length_groups, families, load_encoder, register_encoder)
from wat.extract.encoders.whisper_encoder import WhisperEncoder
from wat.extract.load import WhisperLoadError
from wat.extract.pooling import pool_frames, time_parts

SR = 16000


class ToyEncoder(Encoder):
    """A test family: 2 "layers" of 3 channels at 100 frames/s (160-sample hops), whose frame t of
    layer l is (l + 1) * (the mean of its hop, the hop's energy, t); accepts specs "toy-*"."""

    family = "toy"
    policies = ("trim",)
    sample_rate, frame_rate, n_layers, dim = SR, 100.0, 2, 3
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


@pytest.fixture
def toy():
    register_encoder(ToyEncoder)
    yield
    ENCODERS.pop("toy", None)


def test_whisper_encoder_is_the_whisper_path_bit_for_bit(tiny_model, speech_audio):
    enc = WhisperEncoder(tiny_model)
    assert (enc.family, enc.policies, enc.default_policy) == ("whisper", ("pad30", "trim"), "pad30")
    assert (enc.n_layers, enc.dim, enc.sample_rate, enc.frame_rate) == (4, 384, 16000, 50.0)
    assert enc.name == model_name(tiny_model) == "tiny.en" and enc.fingerprint == fingerprint(tiny_model)
    assert enc.model is tiny_model and enc.device == torch.device("cpu")
    x = torch.from_numpy(np.stack([speech_audio[:3 * SR], speech_audio[SR:4 * SR]]))
    for policy in ("pad30", "trim"):
        for layers in (None, (1, 3)):
            got = enc.pooled(x, frames=25, policy=policy, layers=layers)
            assert torch.equal(got, encode_layers(tiny_model, x, frames=25, policy=policy, layers=layers))
    assert enc.native_frames(3 * SR, "trim") == enc.native_frames(3 * SR, "pad30") == 150
    assert enc.min_samples("trim") == 201 and enc.min_samples("pad30") == 160
    assert enc.spec(policy="trim", frames=10, layers=(1, 3)) == dict(
        model="tiny.en", fingerprint=fingerprint(tiny_model), n_layers=2, dim=384, n_frames=10, policy="trim",
        pooling="mean:10", sample_rate=16000, storage="fp16", layers=(1, 3))


def test_whisper_list_of_clips_of_any_lengths_is_each_clip_alone(tiny_model, speech_audio):
    """A clip's features do not depend on the other clips of the call (lengths differ: no padding)."""
    enc = WhisperEncoder(tiny_model)
    clips = [speech_audio[:SR], speech_audio[:2 * SR], speech_audio[SR // 2:3 * SR // 2]]
    for policy in ("trim", "pad30"):
        got = enc.pooled(clips, frames=5, policy=policy)
        assert got.shape == (3, 4, 5, 384)
        for c, g in zip(clips, got):
            torch.testing.assert_close(g, encode_layers(tiny_model, c[None], frames=5, policy=policy)[0],
                                       rtol=1e-5, atol=1e-5)


def test_load_encoder_dispatch_and_errors(tiny_model, toy):
    assert list(families())[-1] == "whisper"  # the catch-all is tried last
    toy = load_encoder("toy-1")
    assert isinstance(toy, ToyEncoder) and toy.name == "toy-1"
    enc = load_encoder("tiny.en")
    assert isinstance(enc, WhisperEncoder) and enc.fingerprint == fingerprint(tiny_model)
    assert isinstance(load_encoder("toy-2", family="toy"), ToyEncoder)
    assert encoder_class("whisper") is WhisperEncoder
    with pytest.raises(EncoderError, match="unknown encoder family 'nope'"):
        encoder_class("nope")
    with pytest.raises(WhisperLoadError, match="unknown Whisper model"):  # a WhisperLoadError is an EncoderError
        load_encoder("not-a-model")
    assert issubclass(WhisperLoadError, EncoderError)


def test_register_encoder_refuses_half_defined_or_duplicate_families(toy):
    class NoFamily(ToyEncoder):
        family = ""

    class Other(ToyEncoder):
        pass

    class NoPolicies(ToyEncoder):
        family, policies = "nopol", ()

    with pytest.raises(TypeError, match="family"):
        register_encoder(NoFamily)
    with pytest.raises(TypeError, match="already registered"):
        register_encoder(Other)
    with pytest.raises(TypeError, match="policies"):
        register_encoder(NoPolicies)
    assert register_encoder(ToyEncoder) is ToyEncoder  # re-registering the same class is harmless


def test_generic_checks_and_pooling():
    enc = ToyEncoder("toy-x")
    clips = [np.linspace(-1, 1, 1600, dtype=np.float32), np.ones(800, np.float32)]
    got = enc.pooled(clips, frames=4, policy="trim", layers=[1])
    assert got.shape == (2, 1, 4, 3)
    # the time_parts windows of the clip's own frames: clip 2 has 5 frames of ones, time index 0..4
    start, end = time_parts(5, 4)
    want = [2 * np.arange(5, dtype=np.float32)[s:e].mean() for s, e in zip(start, end)]
    np.testing.assert_allclose(got[1, 0, :, 2].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(got[1, 0, :, :2].numpy(), 2.0, rtol=1e-6)
    assert enc.spec(policy="trim", frames=4)["layers"] == (0, 1)
    with pytest.raises(ShortClipError, match="159 samples .* policy 'trim', which needs at least 160"):
        enc.pooled([np.ones(159, np.float32)], frames=1, policy="trim")
    for bad, match in [(dict(policy="pad30"), "not one of toy encoder 'toy-x'"), (dict(frames=0), "frames"),
                       (dict(frames=2.5), "frames"), (dict(layers=[2]), "layers"), (dict(layers=[1, 0]), "layers"),
                       (dict(layers=[]), "layers")]:
        with pytest.raises(ValueError, match=match):
            enc.pooled(clips, **{"frames": 2, "policy": "trim", **bad})
    with pytest.raises(ValueError, match="1-D"):
        as_clips([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="samples > 0"):
        as_clips([np.zeros(0)])
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        as_clips(np.zeros(5))
    assert [c.shape[0] for c in as_clips(np.zeros((2, 7)))] == [7, 7]
    assert equal_length_groups([3, 5, 3, 7, 5]) == [[0, 2], [1, 4], [3]]


def test_pool_frames_takes_one_valid_count_per_clip():
    x = torch.randn(3, 10, 4)
    got = pool_frames(x, 3, [10, 4, 7])
    for i, n in enumerate([10, 4, 7]):
        torch.testing.assert_close(got[i], pool_frames(x[i:i + 1, :n], 3, None)[0])
