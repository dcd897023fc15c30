"""Hugging Face speech encoders (wat.extract.encoders.hf_speech): tiny random wav2vec2 / HuBERT /
WavLM / data2vec-audio models written with `save_pretrained` (both `feat_extract_norm` types,
`do_stable_layer_norm` both ways, a HuBERT *ForCTC with a tokenizer written to disk), checked
against transformers' own outputs: pooled layers = `hidden_states` pooled by hand over the
`time_parts` windows, input normalised by the checkpoint's own `Wav2Vec2FeatureExtractor`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertForCTC,  # noqa: E402
                          HubertModel, Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                          Wav2Vec2Model, WavLMConfig, WavLMModel)

from wat.extract.encoders import ShortClipError, load_encoder  # noqa: E402
from wat.extract.encoders import hf_speech  # noqa: E402
from wat.extract.encoders.hf_speech import HFSpeechEncoder, HFSpeechError  # noqa: E402
from wat.extract.pooling import time_parts  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
FAMILIES = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "hubert": (HubertConfig, HubertModel),
            "wavlm": (WavLMConfig, WavLMModel), "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel)}
# name: (model_type, feat_extract_norm, do_stable_layer_norm); data2vec-audio has neither setting
# (LayerNorm convolutions, post-LN blocks)
KINDS = {
    "wav2vec2-base": ("wav2vec2", "group", False), "wav2vec2-lv60": ("wav2vec2", "layer", True),
    "wav2vec2-layer-postln": ("wav2vec2", "layer", False),
    "hubert-base": ("hubert", "group", False), "hubert-large": ("hubert", "layer", True),
    "wavlm-base": ("wavlm", "group", False), "wavlm-large": ("wavlm", "layer", True),
    "data2vec-audio": ("data2vec-audio", None, None),
}
LENGTHS = (4000, 2721, 5123)  # samples: three lengths, so a batch needs padding or groups


def tiny_model(kind: str, seed: int = 0, ctc_vocab: int | None = None, **sizes):
    """A tiny random model of `kind` (KINDS); `sizes` override SMALL (hidden_size=48, ...)."""
    model_type, norm, stable = KINDS[kind]
    config_cls, model_cls = FAMILIES[model_type]
    extra = {}
    if model_type == "data2vec-audio":
        extra = dict(num_conv_pos_embeddings=5, conv_pos_kernel_size=7)
    else:
        extra = dict(feat_extract_norm=norm, do_stable_layer_norm=stable)
    if model_type == "wavlm":
        extra.update(num_buckets=32, max_bucket_distance=64)
    if ctc_vocab:
        extra.update(vocab_size=ctc_vocab, pad_token_id=0)
        model_cls = HubertForCTC
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **extra, **sizes})).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: make every tensor distinct
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save(model, folder, *, do_normalize=True, extractor=True):
    model.save_pretrained(folder)
    if extractor:
        layer = getattr(model.config, "feat_extract_norm", "layer") == "layer"
        Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=layer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips(speech_audio):
    """Three clips of speech (different lengths, different loudness)."""
    return [torch.from_numpy(speech_audio[i * 3000:i * 3000 + n].copy()) * (1 + i) for i, n in enumerate(LENGTHS)]


def pooled_by_hand(hidden: torch.Tensor, frames: int) -> torch.Tensor:
    """[T, D] -> [frames, D]: means over the `time_parts` windows, one window at a time."""
    start, end = time_parts(hidden.shape[0], frames)
    return torch.stack([hidden[s:e].double().mean(0) for s, e in zip(start, end)]).float()


def reference(model, folder, clip, frames):
    """transformers on one clip alone: its feature extractor, then hidden_states[1:] pooled by hand."""
    fe = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    x = fe(clip.numpy(), sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    blocks = out.hidden_states[1:]
    assert len(blocks) == model.config.num_hidden_layers
    return torch.stack([pooled_by_hand(h[0], frames) for h in blocks]), out


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", list(KINDS))
def test_pooled_layers_equal_transformers_hidden_states(kind, tmp_path, clips):
    """A batch of three clips of different lengths (padded + masked, or grouped by length, whichever
    the model needs) gives each clip what transformers gives it alone, for every block."""
    model = tiny_model(kind)
    folder = save(model, tmp_path / kind)
    enc = load_encoder(folder)
    assert isinstance(enc, HFSpeechEncoder) and enc.family == "hf"
    assert (enc.n_layers, enc.dim, enc.frame_rate, enc.policies) == (3, 32, 50.0, ("trim",))
    assert enc.pads_exactly == (KINDS[kind][1] == "layer" and kind != "data2vec-audio")
    ours = enc.pooled(clips, frames=7, policy="trim")
    assert ours.shape == (3, 3, 7, 32) and ours.dtype == torch.float32
    for i, clip in enumerate(clips):
        want, out = reference(model, folder, clip, 7)
        assert rel_err(ours[i], want) <= 1e-5, (kind, i)
        if KINDS[kind][2]:
            # pre-LN (stable) blocks: the encoder's final LayerNorm follows the last block. In
            # transformers 5 hidden_states[-1] is the block's own output (wat's last layer) and only
            # last_hidden_state is normalised (in 4.x hidden_states[-1] was the normalised one)
            assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
            ln = model.encoder.layer_norm
            with torch.no_grad():
                assert torch.allclose(ln(out.hidden_states[-1]), out.last_hidden_state, atol=1e-5)
        else:  # post-LN blocks end in a LayerNorm of their own; no final one
            assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    # layers=: a subset of blocks is the same numbers
    assert torch.equal(enc.pooled(clips, frames=7, policy="trim", layers=[0, 2]), ours[:, [0, 2]])


@pytest.mark.parametrize("kind", ["wav2vec2-base", "wavlm-large", "data2vec-audio"])
def test_a_clips_features_do_not_depend_on_its_batch(kind, tmp_path, clips):
    enc = load_encoder(save(tiny_model(kind), tmp_path / kind))
    alone = enc.pooled([clips[1]], frames=5, policy="trim")[0]
    other = clips[0][:clips[1].shape[0]].flip(0)  # another clip of the same length: one group with it
    for batch in ([clips[0], clips[1], clips[2]], [clips[1], other], [clips[2], clips[2][:999], clips[1]]):
        got = enc.pooled(batch, frames=5, policy="trim")
        assert rel_err(got[[i for i, c in enumerate(batch) if c is clips[1]][0]], alone) <= 1e-5


@pytest.mark.parametrize("kind", ["wav2vec2-base", "data2vec-audio", "wav2vec2-lv60"])
def test_padding_in_transformers_leaks_where_the_docstring_says(kind, clips):
    """Why some models are only batched with clips of their own length: transformers itself, given
    a zero-padded clip (and the attention mask where the model takes one), returns other features
    for it than for the clip alone - for group-norm models and for data2vec-audio, not for the
    wav2vec2 "layer" model, which wat pads."""
    model = tiny_model(kind)
    long, short = clips[2], clips[1]
    x = torch.zeros(2, long.shape[0])
    x[0], x[1, :short.shape[0]] = long, short
    mask = torch.zeros(2, long.shape[0], dtype=torch.long)
    mask[0], mask[1, :short.shape[0]] = 1, 1
    masked = KINDS[kind][1] != "group"
    with torch.no_grad():
        padded = model(x, attention_mask=mask if masked else None).last_hidden_state[1]
        alone = model(short[None]).last_hidden_state[0]
    err = rel_err(padded[:alone.shape[0]], alone)
    assert (err <= 1e-5) == (kind == "wav2vec2-lv60"), err


def test_do_normalize_false_feeds_the_samples_as_they_are(tmp_path, clips):
    # a "layer" model: a group-norm one is blind to an affine change of its input (its first
    # GroupNorm removes each channel's offset and scale), so normalising would not show there
    model = tiny_model("hubert-large")
    raw = load_encoder(save(model, tmp_path / "raw", do_normalize=False))
    norm = load_encoder(save(model, tmp_path / "norm", do_normalize=True))
    assert (raw.normalize, norm.normalize) == (False, True)
    clip = 0.05 * clips[0] + 0.2
    with torch.no_grad():
        want = model(clip[None], output_hidden_states=True).hidden_states[1:]
    got = raw.pooled([clip], frames=3, policy="trim")[0]
    assert rel_err(got, torch.stack([pooled_by_hand(h[0], 3) for h in want])) <= 1e-5
    assert rel_err(norm.pooled([clip], frames=3, policy="trim")[0], got) > 1e-2


def test_missing_feature_extractor_config_is_the_default_with_a_warning(tmp_path, caplog):
    enc = load_encoder(save(tiny_model("wav2vec2-base"), tmp_path / "m", extractor=False))
    assert enc.normalize is True
    assert "preprocessor_config.json" in caplog.text
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 8000}))
    with pytest.raises(HFSpeechError, match="sampling_rate 8000"):
        load_encoder(tmp_path / "m")


def test_loading_draws_no_transformers_bar(tmp_path, capfd):
    """A refusal after a load must stay one line: transformers' own "Loading weights" bar is off
    during the load, and its setting is as it was afterwards."""
    folder = save(tiny_model("wav2vec2-base"), tmp_path / "m")
    hf_logging = transformers.utils.logging
    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_encoder(folder)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_frames_from_the_conv_arithmetic_and_short_clips(tmp_path):
    model = tiny_model("wav2vec2-lv60")
    enc = load_encoder(save(model, tmp_path / "m"))
    assert enc.min_samples("trim") == 400  # the receptive field of the default conv stack
    for n in (400, 401, 719, 720, 16000, 16319, 16320, 160000):
        frames = enc.native_frames(n, "trim")
        assert frames == int(model._get_feat_extract_output_lengths(torch.tensor(n)))
        if n <= 16320:
            with torch.no_grad():
                assert model(torch.randn(1, n)).last_hidden_state.shape[1] == frames
    assert enc.native_frames(399, "trim") == 0
    with pytest.raises(ShortClipError, match="399 samples"):
        enc.pooled([torch.randn(399)], frames=1, policy="trim")
    with pytest.raises(ValueError, match="policy 'pad30'"):
        enc.pooled([torch.randn(1000)], frames=1, policy="pad30")
    # more pooled frames than native ones: the adaptive windows repeat frames, as for Whisper
    assert enc.pooled([torch.randn(400)], frames=4, policy="trim").shape == (1, 3, 4, 32)


def test_front_end_runs_in_bounded_pieces(tmp_path, clips, monkeypatch):
    """The conv feature encoder sees at most FRONT_END_SAMPLES samples (whole clips) per call; the
    features are the same as in one call."""
    folder = save(tiny_model("wavlm-base"), tmp_path / "m")
    batch = torch.stack([c[:2721] for c in clips] * 2)  # 6 equal clips
    whole = load_encoder(folder).pooled(batch, frames=4, policy="trim")
    monkeypatch.setattr(hf_speech, "FRONT_END_SAMPLES", 2 * 2721)
    enc = load_encoder(folder)
    calls = []
    enc.base.feature_extractor.conv_layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    assert rel_err(enc.pooled(batch, frames=4, policy="trim"), whole) <= 1e-6
    assert calls == [2, 2, 2]


VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6, "c": 7}


def ctc_folder(tmp_path, tokenizer=True):
    model = tiny_model("hubert-large", ctc_vocab=len(VOCAB))
    folder = save(model, tmp_path / "ctc")
    if tokenizer:
        (folder / "vocab.json").write_text(json.dumps(VOCAB))
        Wav2Vec2CTCTokenizer(str(folder / "vocab.json")).save_pretrained(folder)
    return model, folder


def test_ctc_checkpoint_pooled_and_logits_from_one_forward(tmp_path, clips):
    model, folder = ctc_folder(tmp_path)
    enc = load_encoder(folder)
    assert enc.ctc is not None and enc.ctc.tokenizer is not None
    passes = []
    enc.base.encoder.layers[0].register_forward_hook(lambda *a: passes.append(1))
    pooled, logits, valid = enc.pooled_and_logits(clips, frames=5)
    assert len(passes) == 1  # hubert-large pads: one forward for the batch
    assert torch.equal(pooled, enc.pooled(clips, frames=5, policy="trim"))
    assert valid == [enc.native_frames(c.shape[0]) for c in clips]
    assert logits.shape == (3, max(valid), len(VOCAB))
    fe = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    tok = Wav2Vec2CTCTokenizer.from_pretrained(folder)
    for i, clip in enumerate(clips):
        with torch.no_grad():
            want = model(fe(clip.numpy(), sampling_rate=16000, return_tensors="pt").input_values).logits[0]
        assert rel_err(logits[i, :valid[i]], want) <= 1e-5
        assert not logits[i, valid[i]:].any()
        assert enc.ctc_decode(logits[i:i + 1], valid[i:i + 1]) == tok.batch_decode(want.argmax(-1)[None])
    # the fingerprint is the encoder's: the CTC head is not part of it
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(folder)
    assert load_encoder(folder).fingerprint == enc.fingerprint


def test_ctc_decode_is_greedy_ctc_with_the_checkpoints_tokenizer(tmp_path):
    _, folder = ctc_folder(tmp_path)
    enc = load_encoder(folder)
    path = [5, 5, 0, 6, 4, 4, 6, 0, 6, 5, 0, 0]  # a a _ b | | b _ b a _ _  -> "ab bba"
    logits = torch.nn.functional.one_hot(torch.tensor(path), len(VOCAB)).float()[None].repeat(2, 1, 1)
    assert enc.ctc_decode(logits, [12, 3]) == ["ab bba", "a"]


def test_ctc_without_a_tokenizer_keeps_the_logits(tmp_path, clips):
    _, folder = ctc_folder(tmp_path, tokenizer=False)
    enc = load_encoder(folder)
    _, logits, valid = enc.pooled_and_logits(clips[:1], frames=2)
    with pytest.raises(HFSpeechError, match="no vocab.json"):
        enc.ctc_decode(logits, valid)
    pretrained = load_encoder(save(tiny_model("hubert-base"), tmp_path / "pre"))
    assert pretrained.ctc is None
    with pytest.raises(HFSpeechError, match="not a CTC fine-tuned checkpoint"):
        pretrained.pooled_and_logits(clips[:1], frames=2)


def test_fingerprint_is_the_weights(tmp_path):
    model = tiny_model("wav2vec2-base")
    a = load_encoder(save(model, tmp_path / "a"))
    b = load_encoder(save(model, tmp_path / "b"))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    with torch.no_grad():
        model.encoder.layers[1].feed_forward.output_dense.bias[0] += 1e-3
    assert load_encoder(save(model, tmp_path / "c")).fingerprint != a.fingerprint
    spec = a.spec(policy="trim", frames=25)
    spec = getattr(spec, "__dict__", spec)
    assert spec["fingerprint"] == a.fingerprint and spec["model"] == str(tmp_path / "a")


def test_hub_id_through_the_offline_hub_cache(offline_hub, tmp_path, clips):
    """`owner/name` of a speech model resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1
    (WAT_OFFLINE unset) to the hf family; an id not in the cache is not this family's."""
    pytest.importorskip("huggingface_hub")
    folder = save(tiny_model("hubert-base"), tmp_path / "m")
    env = offline_hub("wat-test/tiny-hubert", folder)
    code = ("from wat.extract.encoders import load_encoder; from wat.extract.encoders.hf_speech import "
            "HFSpeechEncoder as H; import sys\n"
            "print(H.accepts(sys.argv[1])); e = load_encoder(sys.argv[1]); print(e.family, e.fingerprint)")
    out = subprocess.run([sys.executable, "-c", code, "wat-test/tiny-hubert"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "hf", load_encoder(folder).fingerprint]
    err = subprocess.run([sys.executable, "-c", code, "wat-test/not-cached"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert err.returncode == 1 and err.stdout.split() == ["False"]  # then Whisper's loader says why


def test_not_this_family(tmp_path):
    assert not HFSpeechEncoder.accepts("tiny.en") and not HFSpeechEncoder.accepts("crepe-tiny")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    assert not HFSpeechEncoder.accepts(str(tmp_path / "w"))
    with pytest.raises(HFSpeechError, match="does not name a model_type"):
        HFSpeechEncoder.load(str(tmp_path / "w"))
    with pytest.raises(HFSpeechError, match="no such folder"):
        HFSpeechEncoder.load(str(tmp_path / "missing" / "x.bin"))


@pytest.mark.parametrize("spec", ["hf", "crepe-tiny"])
def test_wat_extract_with_hf_and_crepe(spec, tmp_path):
    """wat-extract with an HF speech folder and with CREPE tiny: trim by default, the cache's rows
    are the encoder's pooled layers of the clips as the pipeline cuts them (fp16)."""
    from wat.data import load_dataset, make_demo, open_cache
    from wat.data.audio import fit_length, load_audio
    from wat.extract.cli import main

    if spec == "crepe-tiny":
        from wat.extract.encoders.crepe import CrepeError

        try:
            load_encoder(spec)
        except CrepeError as e:
            pytest.skip(str(e))
    else:
        spec = str(save(tiny_model("wav2vec2-base"), tmp_path / "w2v"))
    root = make_demo(tmp_path / "demo", clips_per_class=1, seed=3)
    args = ["--dataset", "esc50", "--root", str(root), "--model", spec, "--frames", "5", "--shard-size", "4",
            "--limit", "5", "--clip-seconds", "1.5", "--out", str(tmp_path / "f.h5"), "--progress", "none"]
    assert main(args) == 0
    cache = open_cache(tmp_path / "f.h5")
    enc = load_encoder(spec)
    assert (cache.meta.model, cache.meta.policy, cache.meta.n_layers, cache.meta.dim, cache.meta.fingerprint) == \
        (spec, "trim", enc.n_layers, enc.dim, enc.fingerprint)
    clips = {c.id: c for c in load_dataset("esc50", root).clips}
    rows = np.arange(len(cache))
    audio = [fit_length(load_audio(clips[cache.ids[r]].path), 24000) for r in rows]
    want = enc.pooled(audio, frames=5, policy="trim").numpy()
    got = cache.read("features", rows).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_wat_extract_skips_a_clip_with_fewer_encoder_frames_than_frames(tmp_path):
    """Clips reach an HF encoder unpadded, so a clip much shorter than --clip-seconds can have fewer
    native frames than --frames: pooling would repeat frames. Such a clip is that clip's recorded
    error (errors.tsv, the summary's reasons), never a row; a clip with exactly --frames is kept."""
    import soundfile as sf

    from wat.data import open_cache
    from wat.extract.cli import main
    from wat.extract.pipeline import shard_dir_for

    folder = str(save(tiny_model("wav2vec2-base"), tmp_path / "w2v"))
    rng = np.random.default_rng(0)
    # 16000 samples: 49 frames; 8080: exactly 25 (the default conv stack: (n - 400) // 320 + 1); 3200: 9
    for name, n in (("long", 16000), ("edge", 8080), ("short", 3200)):
        sf.write(tmp_path / f"{name}.wav", rng.uniform(-0.5, 0.5, n).astype(np.float32), 16000)
    (tmp_path / "clips.csv").write_text("path,labels\nlong.wav,a\nedge.wav,b\nshort.wav,a\n")
    assert main(["--dataset", "csv", "--root", str(tmp_path), "--manifest", str(tmp_path / "clips.csv"),
                 "--model", folder, "--frames", "25", "--clip-seconds", "1", "--out", str(tmp_path / "f.h5"),
                 "--progress", "none"]) == 0
    cache = open_cache(tmp_path / "f.h5")
    assert sorted(cache.ids) == ["edge.wav", "long.wav"]
    errors = (shard_dir_for(tmp_path / "f.h5") / "errors.tsv").read_text().splitlines()
    assert len(errors) == 2 and "short.wav" in errors[1]
    assert "3200 samples of audio give 9 encoder frames, fewer than --frames 25" in errors[1]
