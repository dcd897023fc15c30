"""Hugging Face Whisper folders: tiny random `WhisperForConditionalGeneration` models of each kind
(80 mels; 128 mels with large-v3's 51866 vocabulary; a distil-whisper-like 2-layer decoder, sharded)
saved with `save_pretrained`, loaded with `load_whisper`, agree with transformers block by block and
in decoder logits. Configs keep openai-whisper's fixed shapes (1500 audio positions, 448 text
positions, MLP 4 x width) at a tiny width."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import whisper

transformers = pytest.importorskip("transformers")
from transformers import WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

from wat.extract import WhisperLoadError, encode_layers, fingerprint, load_whisper  # noqa: E402
from wat.extract.hf import HFError, hf_to_whisper  # noqa: E402

WIDTH = 64
KINDS = {  # name: (n_mels, encoder layers, decoder layers, vocabulary)
    "80mel": (80, 2, 2, 51865),          # the multilingual vocabulary of tiny..large-v2
    "128mel-v3": (128, 2, 4, 51866),     # large-v3 / turbo: 128 mel bins, one more language token
    "distil": (80, 4, 2, 51864),         # distil-whisper: deep encoder, 2 decoder layers (.en vocab)
}
TOKENS = [50257, 50362, 440, 1770, 318, 1049, 13]  # <|endoftext|>-free text tokens, valid in all three


def hf_model(kind: str, seed: int = 0) -> WhisperForConditionalGeneration:
    n_mels, enc, dec, vocab = KINDS[kind]
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=n_mels, d_model=WIDTH, encoder_layers=enc,
                           decoder_layers=dec, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=4 * WIDTH, decoder_ffn_dim=4 * WIDTH,
                           max_source_positions=1500, max_target_positions=448)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init leaves norms at 1/0 and biases at 0: make every tensor distinct
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, p in model.named_parameters():
            if name.endswith("k_proj.bias"):
                p.zero_()
    return model


def save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


@pytest.fixture(scope="module")
def xdg(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(autouse=True)
def _cache(xdg, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))


@pytest.fixture(scope="module")
def speech_30s(speech_audio):
    return whisper.pad_or_trim(torch.from_numpy(speech_audio))


@pytest.mark.parametrize("kind", list(KINDS))
def test_features_and_logits_agree_with_transformers(kind, tmp_path, speech_30s):
    hf = hf_model(kind)
    ours = load_whisper(save(hf, tmp_path / kind))
    n_mels, enc, dec, vocab = KINDS[kind]
    assert (ours.dims.n_mels, ours.dims.n_audio_layer, ours.dims.n_text_layer, ours.dims.n_vocab) == \
        (n_mels, enc, dec, vocab)
    audio = speech_30s[None]
    # frames=1500 over a 30 s input: one window per encoder frame, i.e. the raw block outputs
    layers = encode_layers(ours, audio, frames=1500, policy="pad30")[0]  # [L, 1500, D]
    mel = whisper.log_mel_spectrogram(audio[0], n_mels)[None]
    with torch.no_grad():
        out = hf.model.encoder(mel, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, blocks 0..L-2, then ln(block L-1)
    assert len(hidden) == enc + 1
    for i in range(enc - 1):
        torch.testing.assert_close(layers[i], hidden[i + 1][0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # HF's last hidden state has the final LayerNorm (our ln_post) applied
        torch.testing.assert_close(ours.encoder.ln_post(layers[-1]), hidden[-1][0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(layers[-1], hidden[-1][0], atol=1e-2)  # ... and it matters
        tokens = torch.tensor([TOKENS])
        mine = ours.logits(tokens, ours.embed_audio(mel))
        theirs = hf(input_features=mel, decoder_input_ids=tokens).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_large_v3_vocabulary_picks_the_right_tokenizer(tmp_path, speech_30s):
    """openai-whisper derives multilingual / language count from n_vocab: 51866 -> 100 languages
    (large-v3 added Cantonese); decoding runs with that tokenizer on the converted model."""
    model = load_whisper(save(hf_model("128mel-v3"), tmp_path / "v3"))
    assert model.is_multilingual and model.num_languages == 100
    tok = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages, language="yue")
    assert max(tok.sot_sequence) < model.dims.n_vocab and tok.eot < model.dims.n_vocab
    mel = whisper.log_mel_spectrogram(speech_30s, 128)
    result = whisper.decode(model, mel, whisper.DecodingOptions(language="en", sample_len=3, fp16=False))
    assert isinstance(result.text, str) and len(result.tokens) <= 3
    en = load_whisper(save(hf_model("distil"), tmp_path / "en"))
    assert not en.is_multilingual


def test_sharded_and_bin_folders_convert_to_the_same_weights(tmp_path):
    hf = hf_model("distil", seed=1)
    whole = hf_to_whisper(save(hf, tmp_path / "whole"))
    sharded = save(hf, tmp_path / "sharded", max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(sharded / "config.json", bin_dir)
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    for folder in (sharded, bin_dir):
        other = hf_to_whisper(folder)
        assert other["dims"] == whole["dims"]
        assert other["model_state_dict"].keys() == whole["model_state_dict"].keys()
        assert all(torch.equal(other["model_state_dict"][k], v) for k, v in whole["model_state_dict"].items())
    assert whole["dims"]["n_text_layer"] == 2 and whole["dims"]["n_audio_layer"] == 4


def test_converted_once_then_cached_and_fingerprints_differ(tmp_path, xdg, caplog):
    a = load_whisper(save(hf_model("80mel"), tmp_path / "a"))
    b = load_whisper(save(hf_model("128mel-v3"), tmp_path / "b"))
    cached = sorted(p.name for p in (xdg / "wat").glob("hf-*.pt"))
    assert len(cached) >= 2
    with caplog.at_level("INFO", logger="wat.extract.load"):
        again = load_whisper(tmp_path / "a")
    assert "converted copy read from" in caplog.text
    assert sorted(p.name for p in (xdg / "wat").glob("hf-*.pt")) == cached
    assert fingerprint(again) == fingerprint(a) != fingerprint(b)
    # a changed tensor is a different model: different cache entry and fingerprint
    hf = hf_model("80mel")
    with torch.no_grad():
        hf.model.encoder.layers[0].fc1.bias[0] += 1
    c = load_whisper(save(hf, tmp_path / "c"))
    assert fingerprint(c) != fingerprint(a)


def test_alignment_heads_from_generation_config(tmp_path):
    folder = save(hf_model("80mel"), tmp_path / "m")
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["alignment_heads"] = [[1, 0], [1, 3]]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    model = load_whisper(folder)
    assert model.alignment_heads.to_dense().nonzero().tolist() == [[1, 0], [1, 3]]


def test_refused_folders(tmp_path):
    hf = hf_model("80mel")
    folder = save(hf, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(folder, d)
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d

    with pytest.raises(WhisperLoadError, match="encoder_ffn_dim 128 is not 4 x d_model"):
        load_whisper(variant("ffn", encoder_ffn_dim=128))
    with pytest.raises(WhisperLoadError, match="config.json says 3 decoder layers, the weights have 2"):
        load_whisper(variant("depth", decoder_layers=3))
    with pytest.raises(WhisperLoadError, match="field 'num_mel_bins' is None"):
        load_whisper(variant("mels", num_mel_bins=None))
    empty = variant("empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(WhisperLoadError, match="Whisper config.json but no weights"):
        load_whisper(empty)
    torn = variant("torn")
    raw = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WhisperLoadError, match="cannot read safetensors"):
        load_whisper(torn)
    untied = variant("untied", tie_word_embeddings=False)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"] + 1
    torch.save(sd, untied / "pytorch_model.bin")
    (untied / "model.safetensors").unlink()
    with pytest.raises(HFError, match="untied output layer"):
        hf_to_whisper(untied)


def test_hub_id_through_the_offline_hub_cache(offline_hub, tmp_path):
    """`owner/name` resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1 (and
    WAT_OFFLINE unset: the hub's own switch is respected); an id not in the cache is a clear error."""
    pytest.importorskip("huggingface_hub")
    folder = save(hf_model("80mel"), tmp_path / "m")
    env = offline_hub("wat-test/tiny-whisper", folder)
    code = ("from wat.extract import load_whisper, fingerprint; import sys\n"
            "print(fingerprint(load_whisper(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, "wat-test/tiny-whisper"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fingerprint(load_whisper(folder))
    err = subprocess.run([sys.executable, "-c", code, "wat-test/not-cached"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert err.returncode == 1 and "WhisperLoadError" in err.stderr
    assert "not a Whisper model in the local Hugging Face cache" in err.stderr


def test_hub_id_not_cached_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WAT_OFFLINE", "1")  # the test session's setting: local files only
    with pytest.raises(WhisperLoadError, match=r"'nobody/no-such-whisper' is neither a file nor a folder"):
        load_whisper("nobody/no-such-whisper")
    with pytest.raises(WhisperLoadError, match="no such file or directory"):
        load_whisper(str(tmp_path / "missing" / "model.pt"))


def test_hf_model_drives_the_extraction_features(tmp_path):
    """The converted model is an ordinary Whisper to the rest of wat: pooled features have its shape."""
    model = load_whisper(save(hf_model("distil"), tmp_path / "d"))
    feats = encode_layers(model, np.zeros((2, 16000 * 5), np.float32), frames=25, policy="trim")
    assert feats.shape == (2, 4, 25, WIDTH) and torch.isfinite(feats).all()
