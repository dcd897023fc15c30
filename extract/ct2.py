"""CTranslate2 (faster-whisper) `model.bin` files, read and written, and their conversion to an
openai-whisper checkpoint.

Layout (binary version 6, little-endian): u32 version; string spec name; u32 spec revision;
u32 variable count; per variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count,
raw bytes; then u32 alias count and (alias, target) string pairs. A string is a u16 length that
counts a trailing NUL, then the bytes. Besides the weights, the file holds small int8/int16 scalars
that configure the runtime (`decoder/activation`, `decoder/alignment_heads`, ...).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

VERSION = 6
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
          np.dtype(np.int32): 3, np.dtype(np.float16): 4}


class CT2Error(ValueError):
    """A model.bin that cannot be read, or that is not a convertible float Whisper model."""


class _Bytes:
    def __init__(self, buf: bytes, name: str):
        self.buf, self.name, self.pos = memoryview(buf), name, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CT2Error(f"{self.name}: truncated or corrupt: {what} needs {n} bytes at offset "
                           f"{self.pos}, but the file has {len(self.buf)} bytes")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.u("H", what + " length"), what))
        if not raw or raw[-1] != 0:
            raise CT2Error(f"{self.name}: corrupt: {what} at offset {self.pos - len(raw)} "
                           "is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2Error(f"{self.name}: corrupt: {what} is not UTF-8") from None


def _read_bytes(path) -> tuple[bytes, str]:
    """`path` is a model.bin, or a list of parts to concatenate (split packages)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    try:
        return b"".join(Path(p).read_bytes() for p in paths), str(paths[0])
    except OSError as e:
        raise CT2Error(f"{e.filename}: cannot read: {e.strerror}") from None


def parse_ct2(buf: bytes, name: str = "model.bin") -> tuple[dict[str, np.ndarray], dict]:
    """Variables (aliases resolved) and a header dict {version, spec, revision, aliases}."""
    r = _Bytes(buf, name)
    version = r.u("I", "version")
    if not 4 <= version <= VERSION:
        raise CT2Error(f"{name}: not a CTranslate2 model.bin this reader understands "
                       f"(binary version {version}, expected 4..{VERSION})")
    spec = r.string("spec name")
    revision = r.u("I", "spec revision")
    variables = {}
    for i in range(r.u("I", "variable count")):
        var = r.string(f"name of variable {i}")
        dims = tuple(r.u("I", f"{var} dims") for _ in range(r.u("B", f"{var} rank")))
        code = r.u("B", f"{var} dtype")
        if code not in DTYPES:
            raise CT2Error(f"{name}: corrupt: variable {var!r} has unknown dtype id {code}")
        nbytes = r.u("I", f"{var} byte count")
        itemsize = 2 if code == 5 else np.dtype(DTYPES[code]).itemsize
        if nbytes != itemsize * int(np.prod(dims, dtype=np.int64)):
            raise CT2Error(f"{name}: corrupt: variable {var!r} of shape {dims} has {nbytes} bytes")
        raw = r.take(nbytes, f"data of {var!r}")
        if code == 5:  # bfloat16 -> float32 is exact: the top 16 bits of a float32
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np.dtype(DTYPES[code]).newbyteorder("<"))
        variables[var] = arr.reshape(dims)
    aliases = {}
    if version >= 3:
        for i in range(r.u("I", "alias count")):
            alias, target = r.string(f"alias {i}"), r.string(f"target of alias {i}")
            if target not in variables:
                raise CT2Error(f"{name}: corrupt: alias {alias!r} points to missing {target!r}")
            aliases[alias] = target
            variables[alias] = variables[target]
    if r.pos != len(r.buf):
        raise CT2Error(f"{name}: corrupt: {len(r.buf) - r.pos} unexpected bytes after the aliases")
    return variables, {"version": version, "spec": spec, "revision": revision, "aliases": aliases}


def read_ct2(path) -> dict[str, np.ndarray]:
    """All variables of a model.bin (or of its concatenated parts), aliases resolved."""
    return parse_ct2(*_read_bytes(path))[0]


def write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec", revision: int = 3) -> None:
    def string(s: str) -> bytes:
        b = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", VERSION), string(spec), struct.pack("<II", revision, len(variables))]
    for name, value in variables.items():
        arr = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-D)
        if arr.dtype not in _CODES:
            raise CT2Error(f"cannot write {name!r}: dtype {arr.dtype} has no CTranslate2 id")
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        out += [string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape),
                struct.pack("<BI", _CODES[arr.dtype], len(raw)), raw]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(out))


def _check_float(variables: dict[str, np.ndarray], name: str) -> None:
    scales = sorted(v for v in variables if v.endswith("_scale"))
    # int8/int16 *scalars* are runtime settings (activation, num_heads, ...); int *weights* are not
    ints = sorted(k for k, v in variables.items() if v.dtype.kind == "i"
                  and k.rsplit("/", 1)[-1] in ("weight", "bias", "encodings", "gamma", "beta"))
    if scales or ints:
        raise CT2Error(f"{name}: quantized CTranslate2 model ({(ints or scales)[0]!r} is "
                       f"{variables[(ints or scales)[0]].dtype}{' with scales' if scales else ''}); "
                       "only float16/float32/bfloat16 models can be converted exactly — "
                       "re-export it without quantization (ct2-transformers-converter without "
                       "--quantization int8)")


def _scalar(variables, key, default):
    return int(variables[key].reshape(-1)[0]) if key in variables else default


def ct2_to_whisper(model_dir, parts=None) -> dict:
    """An openai-whisper checkpoint {"dims", "model_state_dict"} (+ "alignment_heads" when the
    directory's config.json lists them) from a CTranslate2 Whisper directory. `parts` overrides the
    model.bin location with a list of files to concatenate."""
    model_dir = Path(model_dir)
    buf, name = _read_bytes(parts or model_dir / "model.bin")
    v, header = parse_ct2(buf, name)
    if header["spec"] != "WhisperSpec":
        raise CT2Error(f"{name}: a CTranslate2 {header['spec']}, not a Whisper model")
    _check_float(v, name)
    try:
        return _convert(v, model_dir)
    except KeyError as e:
        raise CT2Error(f"{name}: incomplete Whisper model: variable {e.args[0]!r} missing") from None


def _convert(v: dict[str, np.ndarray], model_dir: Path) -> dict:
    sd = {}

    def put(dst, src):
        sd[dst] = torch.from_numpy(np.array(v[src]))

    def linear(dst, src, bias=True):
        put(f"{dst}.weight", f"{src}/weight")
        if bias:
            put(f"{dst}.bias", f"{src}/bias")

    def norm(dst, src):
        put(f"{dst}.weight", f"{src}/gamma")
        put(f"{dst}.bias", f"{src}/beta")

    def split(dst_names, src, n):
        # fused projections: q,k,v (thirds) or k,v (halves); openai-whisper's key has no bias
        ws = np.split(v[f"{src}/weight"], n, axis=0)
        bs = np.split(v[f"{src}/bias"], n, axis=0)
        for dst, w, b in zip(dst_names, ws, bs):
            sd[f"{dst}.weight"] = torch.from_numpy(np.array(w))
            if dst.endswith(".key"):
                if np.any(b != 0):
                    raise CT2Error(f"{src}: the key projection has a non-zero bias, "
                                   "which openai-whisper cannot represent")
            else:
                sd[f"{dst}.bias"] = torch.from_numpy(np.array(b))

    def block(dst, src, cross):
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        split([f"{dst}.attn.{p}" for p in ("query", "key", "value")],
              f"{src}/self_attention/linear_0", 3)
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        if cross:
            norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            split([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"],
                  f"{src}/attention/linear_1", 2)
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    def n_layers(prefix):
        return len({m.group(1) for k in v for m in [re.match(rf"{prefix}/layer_(\d+)/", k)] if m})

    n_audio_layer, n_text_layer = n_layers("encoder"), n_layers("decoder")
    for i in ("1", "2"):
        linear(f"encoder.conv{i}", f"encoder/conv{i}")
    put("encoder.positional_embedding", "encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    put("decoder.token_embedding.weight", "decoder/embeddings/weight")
    put("decoder.positional_embedding", "decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")

    n_audio_ctx, n_audio_state = sd["encoder.positional_embedding"].shape
    n_text_ctx, n_text_state = sd["decoder.positional_embedding"].shape
    dims = dict(
        n_mels=sd["encoder.conv1.weight"].shape[1],
        n_audio_ctx=n_audio_ctx, n_audio_state=n_audio_state,
        # every Whisper size uses 64-dim heads; the file's scalar wins when present
        n_audio_head=_scalar(v, "encoder/num_heads", n_audio_state // 64),
        n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=n_text_ctx, n_text_state=n_text_state,
        n_text_head=_scalar(v, "decoder/num_heads", n_text_state // 64),
        n_text_layer=n_text_layer,
    )
    ckpt = {"dims": {k: int(x) for k, x in dims.items()}, "model_state_dict": sd}
    config = model_dir / "config.json"
    if config.is_file():
        try:
            heads = json.loads(config.read_text()).get("alignment_heads")
        except (OSError, ValueError):
            heads = None
        if heads:
            ckpt["alignment_heads"] = [[int(a), int(b)] for a, b in heads]
    return ckpt
