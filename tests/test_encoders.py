"""The encoder interface (wat.extract.encoders): the registry and `load_encoder` dispatch, the shared
argument checks, and WhisperEncoder = the Whisper path bit for bit (`encode_layers`, fingerprint,
name). A test-only family (conftest's `toy_encoder`) exercises the generic paths; the product has no mock."""
import numpy as np
import pytest
import torch

from wat.data.spec import FeatureSpec, Policy
from wat.extract import encode_layers, fingerprint, model_name
from wat.extract.encoders import (ENCODERS, Encoder, EncoderError, ShortClipError, UnknownModelError, as_clips,
                                  encoder_class, equal_length_groups, families, load_encoder, register_encoder)
from wat.extract.encoders.whisper_encoder import WhisperEncoder
from wat.extract.load import WhisperLoadError
from wat.extract.pooling import pool_frames, time_parts

SR = 16000


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
    assert enc.spec(policy="trim", frames=10, layers=(1, 3)) == FeatureSpec(
        encoder="whisper", model="tiny.en", fingerprint=fingerprint(tiny_model), n_layers=2, dim=384, n_frames=10,
        policy=Policy.TRIM, pooling="mean:10", sample_rate=16000, storage="fp16", layers=(1, 3))


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


def test_load_encoder_dispatch_and_errors(tiny_model, toy_encoder):
    assert list(families())[-1] == "whisper"  # the catch-all is tried last
    toy = load_encoder("toy-1")
    assert isinstance(toy, toy_encoder) and toy.name == "toy-1"
    enc = load_encoder("tiny.en")
    assert isinstance(enc, WhisperEncoder) and enc.fingerprint == fingerprint(tiny_model)
    assert isinstance(load_encoder("toy-2", family="toy"), toy_encoder)
    assert encoder_class("whisper") is WhisperEncoder
    with pytest.raises(EncoderError, match="unknown encoder family 'nope'"):
        encoder_class("nope")
    # a name no family accepts reaches the catch-all (Whisper), but the error lists every family's forms: it may
    # have been meant for another (crepe-huge); a Whisper-only caller (family= or load_whisper) keeps Whisper's list
    with pytest.raises(UnknownModelError, match="unknown encoder 'crepe-huge': use ") as e:
        load_encoder("crepe-huge")
    known = str(e.value).split(": use ", 1)[1].split("; ")   # in registration order, the catch-all last
    assert sorted(known[:-1]) == ["CREPE: crepe-full or crepe-tiny", "a Hugging Face speech model (wav2vec2 / hubert / "
                                  "wavlm / data2vec-audio): its folder or hub id, e.g. facebook/hubert-large-ls960-ft",
                                  "toy models"]
    assert known[-1].startswith("a Whisper model: one of tiny.en, ") and "large-v3" in known[-1]
    with pytest.raises(UnknownModelError, match="unknown Whisper model 'crepe-huge'"):
        load_encoder("crepe-huge", family="whisper")
    assert issubclass(WhisperLoadError, EncoderError) and issubclass(UnknownModelError, EncoderError)


def test_register_encoder_refuses_half_defined_or_duplicate_families(toy_encoder):
    class NoFamily(toy_encoder):
        family = ""

    class Other(toy_encoder):
        pass

    class NoPolicies(toy_encoder):
        family, policies = "nopol", ()

    with pytest.raises(TypeError, match="family"):
        register_encoder(NoFamily)
    with pytest.raises(TypeError, match="already registered"):
        register_encoder(Other)
    with pytest.raises(TypeError, match="policies"):
        register_encoder(NoPolicies)
    assert register_encoder(toy_encoder) is toy_encoder  # re-registering the same class is harmless


def test_generic_checks_and_pooling(toy_encoder):
    enc = toy_encoder("toy-x")
    clips = [np.linspace(-1, 1, 1600, dtype=np.float32), np.ones(800, np.float32)]
    got = enc.pooled(clips, frames=4, policy="trim", layers=[1])
    assert got.shape == (2, 1, 4, 3)
    # the time_parts windows of the clip's own frames: clip 2 has 5 frames of ones, time index 0..4
    start, end = time_parts(5, 4)
    want = [2 * np.arange(5, dtype=np.float32)[s:e].mean() for s, e in zip(start, end)]
    np.testing.assert_allclose(got[1, 0, :, 2].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(got[1, 0, :, :2].numpy(), 2.0, rtol=1e-6)
    assert enc.spec(policy="trim", frames=4).layers == (0, 1)
    with pytest.raises(ShortClipError, match="159 samples .* policy 'trim', which needs at least 160"):
        enc.pooled([np.ones(159, np.float32)], frames=1, policy="trim")
    for bad, match in [(dict(policy="pad30"), "does not apply to the toy encoder .toy-x., which takes .trim.*Whisper.s 30 s"), (dict(frames=0), "frames"),
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


def test_wat_extract_runs_any_registered_encoder(toy_encoder, tmp_path, capsys, monkeypatch):
    """`--model` goes through `load_encoder`: a non-Whisper family extracts with its own default policy
    (trim), its own sizes and layer subsets; `--policy pad30` is refused with one line before any work,
    the model's loading included."""
    from wat.data import load_dataset, make_demo, open_cache
    from wat.data.audio import fit_length, load_audio
    from wat.extract.cli import main
    from wat.extract.pipeline import shard_dir_for

    root = make_demo(tmp_path / "demo", clips_per_class=1, seed=3)
    base = ["--dataset", "esc50", "--root", str(root), "--model", "toy-a", "--frames", "10", "--shard-size", "4"]
    loads = []
    with monkeypatch.context() as m:
        m.setattr(toy_encoder, "load", classmethod(lambda cls, spec, device="cpu": loads.append(spec) or cls(spec)))
        assert main([*base, "--out", str(tmp_path / "pad30.h5"), "--policy", "pad30"]) == 2
    assert loads == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wat-extract: error: policy 'pad30' does not apply to the toy encoder 'toy-a', which takes "
                   "'trim' (default 'trim': leave the policy out) ('pad30' is Whisper's 30 s transcription window; "
                   "this encoder takes the clip as it is)"]
    assert not shard_dir_for(tmp_path / "pad30.h5").exists()

    assert main([*base, "--out", str(tmp_path / "f.h5"), "--progress", "none"]) == 0
    cache = open_cache(tmp_path / "f.h5")
    m = cache.meta
    assert (m.model, m.policy, m.n_layers, m.dim, m.n_frames, m.layers) == ("toy-a", "trim", 2, 3, 10, (0, 1))
    clips = {c.id: c for c in load_dataset("esc50", root).clips}
    rows = np.arange(len(cache))
    n = round(m.clip_seconds * SR)
    audio = [fit_length(load_audio(clips[cache.ids[r]].path), n) for r in rows]
    want = toy_encoder("toy-a").pooled(audio, frames=10, policy="trim").numpy()
    got = cache.read("features", rows).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())

    # the encoder gets each clip's real samples, not the window zero-padded to --clip-seconds
    assert main([*base, "--out", str(tmp_path / "pad.h5"), "--clip-seconds", "6", "--limit", "3",
                 "--progress", "none"]) == 0
    padded = open_cache(tmp_path / "pad.h5")
    audio = [load_audio(clips[padded.ids[r]].path) for r in range(3)]
    assert {len(a) for a in audio} == {5 * SR} and np.allclose(padded.durations, 5.0)
    want = toy_encoder("toy-a").pooled(audio, frames=10, policy="trim").numpy()
    np.testing.assert_allclose(padded.read("features", np.arange(3)).astype(np.float32), want,
                               rtol=1e-3, atol=1e-3 * np.abs(want).max())

    # no 30 s window: longer clips are this encoder's to take (Whisper refuses them)
    assert main([*base, "--out", str(tmp_path / "long.h5"), "--clip-seconds", "40", "--limit", "2",
                 "--progress", "none"]) == 0
    assert open_cache(tmp_path / "long.h5").meta.clip_seconds == 40.0

    assert main([*base, "--out", str(tmp_path / "sub.h5"), "--layers", "1:2", "--progress", "none"]) == 0
    sub = open_cache(tmp_path / "sub.h5")
    assert sub.meta.layers == (1,)
    np.testing.assert_array_equal(sub.read("features", rows), cache.read("features", rows)[:, 1:])


def test_hear_module_serves_any_encoder(toy_encoder, monkeypatch, capsys):
    """`wat.extract.hear.load_model` takes any registered family: timestamp embeddings are its native
    frames (here 100 per second, centred at 5, 15, 25 ms), and the real hearvalidator passes."""
    import importlib
    import sys
    import types

    from wat.extract import hear

    m = hear.load_model("toy-a")
    assert (m.name, m.family, m.sample_rate, m.timestamp_embedding_size) == ("toy-a", "toy", 16000, 3)
    audio = torch.rand(2, 1600) * 2 - 1
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    frames = toy_encoder("toy-a").pooled(audio, frames=10, policy="trim")      # 10 native frames: no pooling
    torch.testing.assert_close(emb, frames.mean(1))
    assert ts.shape == (2, 10) and ts[0, :3].tolist() == [5.0, 15.0, 25.0]
    torch.testing.assert_close(hear.get_scene_embeddings(audio, m), frames.mean(1).mean(1))
    cat = hear.load_model("toy-a", layers=[1, 0], reduce="concat")
    torch.testing.assert_close(hear.get_timestamp_embeddings(audio, cat)[0],
                               torch.cat([frames[:, 1], frames[:, 0]], -1))
    with pytest.raises(ValueError, match="policy 'pad30' does not apply to the toy encoder"):
        hear.load_model("toy-a", policy="pad30")

    tf = types.ModuleType("tensorflow")   # as tests/test_hear.py: a stand-in for its TF-only checks
    tf.Module = type("Module", (), {})
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    monkeypatch.delitem(sys.modules, "hearvalidator.validate", raising=False)
    validate = importlib.import_module("hearvalidator.validate")
    validate.ValidateModel("wat.extract.hear", "toy-a", device="cpu")()
    assert "Interval between timestamps is 10.0ms" in capsys.readouterr().out


def test_family_of_names_the_family_without_loading(toy_encoder):
    from wat.extract.encoders import family_of

    assert family_of("toy-q") == "toy" and family_of("tiny.en") == "whisper" and family_of("no/such") == "whisper"


def test_a_clip_too_short_for_the_encoder_is_skipped_with_its_reason(toy_encoder, tmp_path):
    """Clips go to a non-Whisper encoder unpadded: one shorter than its `min_samples` (here a family
    whose frames are 0.5 s) is that clip's recorded error, not a failed batch or run."""
    import soundfile as sf

    from wat.data import open_cache
    from wat.extract.cli import main
    from wat.extract.encoders import ENCODERS, register_encoder
    from wat.extract.pipeline import shard_dir_for

    class HalfSecond(toy_encoder):
        family, hop = "toy-half", 8000

        @classmethod
        def accepts(cls, spec):
            return spec.startswith("half-")

    rng = np.random.default_rng(0)
    sf.write(tmp_path / "long.wav", rng.uniform(-0.5, 0.5, 2 * SR).astype(np.float32), SR)
    sf.write(tmp_path / "short.wav", rng.uniform(-0.5, 0.5, 4800).astype(np.float32), SR)   # 0.3 s
    (tmp_path / "clips.csv").write_text("path,labels\nlong.wav,a\nshort.wav,b\n")
    register_encoder(HalfSecond)
    try:
        assert main(["--dataset", "csv", "--root", str(tmp_path), "--manifest", str(tmp_path / "clips.csv"),
                     "--model", "half-1", "--frames", "2", "--clip-seconds", "1", "--out", str(tmp_path / "f.h5"),
                     "--progress", "none"]) == 0
    finally:
        ENCODERS.pop("toy-half", None)
    cache = open_cache(tmp_path / "f.h5")
    assert len(cache) == 1 and cache.meta.encoder == "toy-half"
    errors = (shard_dir_for(tmp_path / "f.h5") / "errors.tsv").read_text()
    assert "short.wav" in errors and "4800 samples of audio, fewer than the 8000 the toy-half encoder 'half-1' needs" in errors
