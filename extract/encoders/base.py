"""The encoder interface: what every family (Whisper, Hugging Face speech models, CREPE) gives the
rest of wat, and the registry that turns a `--model` string into a loaded encoder.

A family is one `Encoder` subclass decorated with `@register_encoder` (lhotse's registered
back-ends): its `family` name (the cache's `encoder` attribute), `accepts(spec)` (could it load this
string?) and `load(spec, device)`, plus the encoder's sizes and `pooled(clips, ...)`. Everything
downstream (the extraction pipeline, the HEAR module, the caches' feature record) uses only this
interface, so a new family is one module and its tests.
"""
from __future__ import annotations

import abc
import hashlib
import importlib
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from wat.data.spec import FeatureSpec

from ..pooling import integer
from wat.data.errors import WatError

# family -> module that registers it when imported. `load_encoder` imports these on first use (a
# family's heavy library is imported only by its own module, and only when it is tried); the
# catch-all family (`fallback = True`: Whisper) is tried last whatever its place here.
BUILTIN = {"whisper": "wat.extract.encoders.whisper_encoder", "hf": "wat.extract.encoders.hf_speech",
           "crepe": "wat.extract.encoders.crepe"}

ENCODERS: dict[str, type["Encoder"]] = {}  # family -> class, in registration order


class EncoderError(WatError):
    """An encoder cannot be loaded or cannot take these arguments; the message says why and what to do.
    Each family's load errors derive from it (`wat.extract.load.WhisperLoadError`, ...)."""


class UnknownModelError(EncoderError):
    """A model name the family does not know (not a file, folder or hub id either). Raised by the
    catch-all family, `load_encoder` says instead what every family takes (`Encoder.choices`): the name
    may have been meant for another family (crepe-huge)."""


class ShortClipError(ValueError):
    """A clip shorter than the encoder's `min_samples(policy)`: no frame of its audio can be computed."""

    def __init__(self, samples: int, policy: str, need: int, why: str = "", sample_rate: int = 16000):
        self.samples, self.policy, self.need = samples, policy, need
        super().__init__(f"a clip of {samples} samples ({1000 * samples / sample_rate:g} ms at "
                         f"{sample_rate / 1000:g} kHz) is too short for policy {policy!r}, which needs at "
                         f"least {need} samples" + (f": {why}" if why else ""))


class Encoder(abc.ABC):
    """A loaded, frozen audio encoder whose layer outputs wat caches.

        enc = load_encoder("base")                   # or "facebook/hubert-large-ls960-ft", "crepe-tiny"
        x = enc.pooled(clips, frames=25, policy=enc.policies[0])   # float32 [B, L, 25, D]

    Layers are the encoder's transformer blocks (a convolutional front end is not a layer; CREPE has
    one layer). `pooled` mean-pools each layer's frames that cover a clip into `frames` windows, the
    `wat.extract.pooling.time_parts` windows shared by every family; a clip's result never depends
    on the other clips of its batch."""

    family: ClassVar[str]                 # registry key = the cache's `encoder` ("whisper", "hf", "crepe")
    policies: ClassVar[tuple[str, ...]]   # input policies accepted; the first is the default
    fallback: ClassVar[bool] = False      # True: loads whatever no other family accepts (tried last)
    max_seconds: ClassVar[float | None] = None  # audio encoded per clip (Whisper: its 30 s window); None = all
    # wat-extract fits every clip to the run's clip length; True: the encoder gets the zero-padded
    # window (Whisper, as wat always fed it: its caches stay byte-identical), False: only the clip's
    # real samples (zero padding would change per-clip normalisation and GroupNorm statistics)
    pad_to_clip_length: ClassVar[bool] = False

    name: str                  # what it was loaded from ("base", "facebook/hubert-xlarge-ll60k", "crepe-tiny")
    fingerprint: str           # sha256 of the encoder's weights ("" = unknown)
    sample_rate: int           # Hz of the audio `pooled` takes (16000 for all of wat's)
    n_layers: int              # layers `pooled` can return (blocks of the encoder)
    dim: int                   # width of each layer's output
    frame_rate: float          # native frames per second (Whisper and wav2vec2 families 50)
    device: torch.device       # where it runs; `pooled` returns tensors there

    @abc.abstractmethod
    def min_samples(self, policy: str) -> int:
        """The fewest samples a clip needs to give a frame of its own audio under `policy`;
        `pooled` raises `ShortClipError` for a shorter clip."""

    @abc.abstractmethod
    def native_frames(self, samples: int, policy: str) -> int:
        """How many encoder frames cover a clip of `samples` samples (of its first `max_seconds`):
        the frames `pooled` averages into its `frames` windows."""

    @abc.abstractmethod
    def pooled(self, clips, *, frames: int, policy: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """`clips`: [B, S] tensor/array or a list of 1-D clips of any lengths, at `sample_rate`
        -> float32 [B, len(layers), frames, dim] on `self.device`: each layer's output over the clip's
        `native_frames`, mean-pooled into `frames` `time_parts` windows. `layers`: indices in
        0..n_layers-1, ascending (None = all). Use `self.check(...)` for the arguments."""

    @classmethod
    @abc.abstractmethod
    def accepts(cls, spec: str) -> bool:
        """Could this family load `spec`? Cheap and without side effects where possible (a name
        pattern, a folder's config); never raises for a spec of another family."""

    @classmethod
    def choices(cls) -> str:
        """What `load` takes, in words, for the error on a name no family knows ("CREPE: crepe-full,
        crepe-tiny"); override with the family's names and forms."""
        return f"{cls.family} models"

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: str, device="cpu") -> "Encoder":
        """Load `spec` (name, file, folder or hub id) onto `device`, in eval mode; `EncoderError`
        (or a subclass) with the reason and the fix when it cannot."""

    # ------------------------------------------------------------------ shared by every family

    @property
    def default_policy(self) -> str:
        return self.policies[0]

    def policy_for(self, policy: str | None) -> str:
        """`policy` checked against this encoder's (None = its default); ValueError naming the ones it takes."""
        return self.check_policy(policy, self.name)

    @classmethod
    def check_policy(cls, policy: str | None, name: str) -> str:
        """`policy_for` before loading: the policies are the family's, so a run can refuse one before
        the weights load (HuBERT X-Large is ~4 GB). `name`: the model, for the message."""
        if policy is None:
            return cls.policies[0]
        if policy not in cls.policies:
            why = (" ('pad30' is Whisper's 30 s transcription window; this encoder takes the clip as it is)"
                   if policy == "pad30" else "")
            raise ValueError(f"policy {policy!r} does not apply to the {cls.family} encoder {name!r}, which "
                             f"takes {' or '.join(repr(p) for p in cls.policies)} (default "
                             f"{cls.policies[0]!r}: leave the policy out){why}")
        return policy

    def all_frames(self, audio: torch.Tensor, *, policy: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Every native frame of each clip, unpooled: [n, S] (equal lengths) -> float32
        [n, len(layers), T, dim], T = `native_frames(S, policy)` (the HEAR module's timestamp
        embeddings). Families with `max_seconds` override it to encode longer audio window by window.
        ShortClipError for clips under `min_samples(policy)` (they have no native frame to ask for)."""
        need = self.min_samples(self.policy_for(policy))
        if audio.shape[-1] < need:
            raise ShortClipError(audio.shape[-1], policy, need, sample_rate=self.sample_rate)
        return self.pooled(audio, frames=self.native_frames(audio.shape[-1], policy), policy=policy, layers=layers)

    def timestamps(self, n_frames: int) -> torch.Tensor:
        """The centre of each of `n_frames` native frames in ms, float32 [n_frames]: frame j spans
        [j, j + 1) / frame_rate s. Override where the frames are centred elsewhere (CREPE: at j hops)."""
        return (torch.arange(n_frames, dtype=torch.float32) + 0.5) * (1000.0 / self.frame_rate)

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries that computed the features ({"transformers": "4.57.1"}), recorded
        in the cache beside torch's and numpy's: informative only."""
        return {}

    def spec(self, *, policy: str, frames: int, layers: Sequence[int] | None = None, storage: str = "fp16") -> FeatureSpec:
        """The feature record of `pooled(..., frames=frames, policy=policy, layers=layers)` stored as
        `storage` (`wat.data.cache.CacheMeta.of(spec, ...)` adds the dataset's fields)."""
        layers = tuple(range(self.n_layers)) if layers is None else tuple(layers)
        return FeatureSpec(encoder=self.family, model=self.name, fingerprint=self.fingerprint, n_layers=len(layers),
                           dim=self.dim, n_frames=frames, policy=policy, pooling=f"mean:{frames}",
                           sample_rate=self.sample_rate, storage=storage, layers=layers)

    def check(self, clips, *, frames, policy: str, layers=None) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """Validate `pooled`'s arguments -> (clips as 1-D float32 tensors on `self.device`, layer
        indices). ValueError for a bad frames/policy/layers value or shape; ShortClipError for a
        clip under `min_samples(policy)`."""
        self.policy_for(policy)
        if policy is None:
            raise ValueError("policy must be given (the encoder's default: `policy_for(None)`)")
        if integer(frames) is None or integer(frames) < 1:
            raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
        layers = tuple(range(self.n_layers)) if layers is None else tuple(integer(i) for i in layers)
        if (not layers or any(i is None or not 0 <= i < self.n_layers for i in layers)
                or any(b <= a for a, b in zip(layers, layers[1:]))):
            raise ValueError(f"layers must be ascending indices in 0..{self.n_layers - 1}, got {layers!r}")
        clips = as_clips(clips)
        for c in clips:
            if c.shape[0] < self.min_samples(policy):
                raise ShortClipError(c.shape[0], policy, self.min_samples(policy), sample_rate=self.sample_rate)
        return [c.to(self.device, torch.float32) for c in clips], layers

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r}: {self.n_layers} layers x {self.dim}, "
                f"{self.frame_rate:g} frames/s, {self.device}>")


def as_clips(clips) -> list[torch.Tensor]:
    """[B, S] tensor/array or a sequence of 1-D clips -> a list of 1-D tensors (not copied when
    already tensors); ValueError for another shape or an empty clip."""
    if torch.is_tensor(clips) or isinstance(clips, np.ndarray):
        clips = torch.as_tensor(clips)
        if clips.ndim != 2:
            raise ValueError(f"clips must be [batch, samples] or a list of 1-D clips, got shape {tuple(clips.shape)}")
        clips = list(clips)
    out = [c if torch.is_tensor(c) else torch.as_tensor(np.asarray(c)) for c in clips]
    for c in out:
        if c.ndim != 1 or c.shape[0] == 0:
            raise ValueError(f"each clip must be 1-D with samples > 0, got shape {tuple(c.shape)}")
    return out


def equal_length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Positions grouped by equal length, groups in order of first appearance: batches whose clips
    need no padding, so no clip's result depends on another's length."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return list(groups.values())


def encoder_device(device, error: type[Exception] = EncoderError) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", a torch.device) checked for loading an encoder onto it:
    `error` for a name torch does not know or CUDA that is not there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} requested but CUDA is not available")
    return dev


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """THE weights fingerprint (`Encoder.fingerprint`): sha256 hex of every tensor's name, shape and
    float32 values, in name order. The same weights give the same fingerprint whatever file format or
    precision they were stored in; any changed weight gives another."""
    h = hashlib.sha256()
    for key, t in sorted(tensors.items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    """Class decorator: make `cls` the encoder of its `family` for `load_encoder`."""
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise TypeError(f"{cls.__name__} needs a class attribute `family` (a non-empty str)")
    old = ENCODERS.get(family)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise TypeError(f"encoder family {family!r} is already registered by {old.__qualname__}")
    if not getattr(cls, "policies", None):
        raise TypeError(f"{cls.__name__} needs `policies`, a non-empty tuple (the first is the default)")
    ENCODERS[family] = cls
    return cls


def families() -> dict[str, type[Encoder]]:
    """Every registered family (the built-in ones imported first), in the order `load_encoder`
    tries them: the catch-all family last."""
    for module in BUILTIN.values():
        importlib.import_module(module)
    return dict(sorted(ENCODERS.items(), key=lambda kv: kv[1].fallback))


def encoder_class(family: str) -> type[Encoder]:
    """The class registered for `family` ("whisper", "hf", "crepe"); EncoderError if none."""
    if family in BUILTIN:
        importlib.import_module(BUILTIN[family])
    if family not in ENCODERS:
        raise EncoderError(f"unknown encoder family {family!r}; known: {', '.join(families())}")
    return ENCODERS[family]


def family_of(spec) -> str:
    """The family that `load_encoder(spec)` would load `spec` with, without loading it: the first
    whose `accepts(spec)` is true, the catch-all (Whisper) last."""
    for family, cls in families().items():
        if cls.accepts(str(spec)):
            return family
    raise EncoderError(f"no encoder family accepts {str(spec)!r} (families: {', '.join(ENCODERS)})")


def load_encoder(spec, device="cpu", *, family: str | None = None) -> Encoder:
    """The encoder `spec` names, loaded on `device`: CREPE names (crepe-full, crepe-tiny), Hugging
    Face speech folders or ids (wav2vec2, HuBERT, WavLM, data2vec-audio), else Whisper (every form
    `wat.extract.load_whisper` takes). `family`: skip the guess (e.g. the family a cache recorded).
    A name no family knows: UnknownModelError listing what each family takes."""
    cls = encoder_class(family or family_of(spec))
    try:
        return cls.load(str(spec), device)
    except UnknownModelError:
        if family is not None or not cls.fallback:
            raise
        # the catch-all only got the name because no family accepted it: its own list ("unknown Whisper
        # model") hides the other families' (crepe-huge was meant for CREPE)
        known = "; ".join(c.choices() for c in families().values())
        raise UnknownModelError(f"unknown encoder {str(spec)!r}: use {known}") from None
