"""What the features of a cache are: schema versions, input policies, the errors, `CacheMeta` (the
attributes every shard and index carries) and the names of the stored datasets. The schema itself is
described in the package docstring (`wat.data.cache`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

from ..labels import LabelError, Vocabulary
from ..spec import PAD30_FIX, WHISPER, FeatureSpec, Policy, padding_of
from ..errors import WatError


SCHEMA_VERSION = 5   # the newest schema this wat reads (and writes when a file needs it)
# 1: no per-clip checksums; 3: int8 storage or a layer subset; 4: pad30 = "mel"; 5: a non-Whisper encoder
READABLE_VERSIONS = (1, 2, 3, 4, 5)
FIELDS = ("features", "mean")
CHECKSUMS = {"features": "features_crc32", "mean": "mean_crc32"}  # field -> its per-row CRC-32 dataset
MEAN_LAYER_CRC = "mean_layer_crc32"  # per-(clip, layer) CRC-32 of `mean` (optional, see the table)
STORAGES = ("fp16", "int8")
STORED = {"fp16": np.float16, "int8": np.int8}
_META_KEYS = ("model", "fingerprint", "n_layers", "n_frames", "dim", "policy", "pooling",
              "sample_rate", "clip_seconds", "multilabel", "dataset")
STR = h5py.string_dtype("utf-8")
# optional per-clip columns: name -> stored dtype (see the schema table)
COLUMNS = {"snr": np.dtype(np.float32), "utterance": STR}


POLICIES = ("pad30", "trim")  # what the encoder sees: 30 s windows as in ASR, or only the clip
# How a pad30 window is padded to 30 s. "mel": transcribe's window (`extract.layers.pad30_input`),
# what this wat extracts; "samples": zero samples before the log-mel, pad30 caches of schema <= 3.
PAD30_PADDING = "mel"
PAD30_PADDINGS = ("mel", "samples")


class CacheError(WatError):
    """A cache that cannot be used as asked: missing/partial/mismatched shard, bad schema, bad input."""


class CorruptCacheError(CacheError):
    """Clip rows whose bytes changed since extraction (checksum mismatch) or, in a shard without
    checksums, rows that are all zero or non-finite."""


@dataclass(frozen=True, kw_only=True)
class CacheMeta:
    """What the features of a cache are (keyword-only: a dozen fields of similar types): its
    `FeatureSpec` (`spec`; the fields model..storage, layers, pad30_padding, encoder) and the
    dataset's fields (clip_seconds, vocab, multilabel, dataset, versions, columns)."""

    model: str
    fingerprint: str
    n_layers: int
    n_frames: int
    dim: int
    policy: str          # one of POLICIES
    pooling: str         # e.g. "mean:25"
    sample_rate: int
    clip_seconds: float
    vocab: Vocabulary
    multilabel: bool
    dataset: str
    versions: dict = field(default_factory=dict)  # package versions, informative only
    storage: str = "fp16"    # stored precision of features/mean: "fp16" | "int8" (scaled, see above)
    layers: tuple = ()       # encoder block index of each stored layer; () = all n_layers blocks
    columns: tuple[str, ...] = ()  # optional per-clip columns present (names in COLUMNS)
    pad30_padding: str = PAD30_PADDING  # pad30 only ("" for trim): "mel" (transcribe's window) | "samples"
    encoder: str = WHISPER   # encoder family; files without the attribute are Whisper's

    def __post_init__(self):
        layers = tuple(int(x) for x in self.layers) or tuple(range(self.n_layers))
        if len(layers) != self.n_layers or any(b <= a for a, b in zip(layers, layers[1:])) or min(layers, default=0) < 0:
            raise CacheError(f"layers {list(layers)} must be {self.n_layers} increasing block indices >= 0")
        if self.storage not in STORAGES:
            raise CacheError(f"unknown storage {self.storage!r}; one of {', '.join(STORAGES)}")
        bad = [c for c in self.columns if c not in COLUMNS]
        if bad:
            raise CacheError(f"unknown optional column(s) {bad}; known: {', '.join(COLUMNS)}")
        try:
            policy = Policy.of(self.policy, self.pad30_padding)
        except ValueError as e:
            raise CacheError(str(e)) from None
        if not self.encoder:
            raise CacheError("the encoder family must be named")
        object.__setattr__(self, "policy", policy.recorded)
        object.__setattr__(self, "pad30_padding", policy.padding)
        object.__setattr__(self, "layers", layers)  # frozen: normalised once, here
        object.__setattr__(self, "columns", tuple(sorted(self.columns)))

    @property
    def all_layers(self) -> bool:
        """True when the cache holds blocks 0..L-1 (no subset, or a subset that is a prefix)."""
        return self.layers == tuple(range(self.n_layers))

    @property
    def spec(self) -> FeatureSpec:
        """The features' record (the one compatibility rule lives there)."""
        return FeatureSpec(encoder=self.encoder, model=self.model, fingerprint=self.fingerprint,
                           policy=Policy.of(self.policy, self.pad30_padding), n_layers=self.n_layers,
                           layers=self.layers, dim=self.dim, n_frames=self.n_frames, pooling=self.pooling,
                           sample_rate=self.sample_rate, storage=self.storage)

    @classmethod
    def of(cls, spec: FeatureSpec, **dataset) -> "CacheMeta":
        """The meta of features `spec` of a dataset (clip_seconds, vocab, multilabel, dataset, ...)."""
        return cls(encoder=spec.encoder, model=spec.model, fingerprint=spec.fingerprint, n_layers=spec.n_layers,
                   n_frames=spec.n_frames, dim=spec.dim, policy=spec.policy.recorded, pooling=spec.pooling,
                   sample_rate=spec.sample_rate, storage=spec.storage, layers=spec.layers,
                   pad30_padding=spec.policy.padding, **dataset)

    def to_attrs(self) -> dict:
        d = {k: getattr(self, k) for k in _META_KEYS}
        plain = self.storage == "fp16" and self.all_layers  # what a version-2 reader reads right
        version = 5 if self.encoder != WHISPER else 4 if self.pad30_padding == "mel" else 2 if plain else 3
        d.update(schema_version=version, vocab=self.vocab.to_json(),
                 versions=json.dumps(self.versions, sort_keys=True), storage=self.storage,
                 layers=json.dumps(list(self.layers)))
        if self.columns:
            d["columns"] = json.dumps(list(self.columns))
        if self.pad30_padding == "mel":  # absent: "samples" (pad30 files of schema <= 3) or trim
            d["pad30_padding"] = self.pad30_padding
        if self.encoder != WHISPER:  # absent: Whisper (its caches stay byte-identical)
            d["encoder"] = self.encoder
        return d

    @classmethod
    def from_attrs(cls, attrs) -> "CacheMeta":
        try:
            version = int(attrs["schema_version"])
        except KeyError:
            raise CacheError("not a wat cache file: attribute 'schema_version' missing") from None
        if version not in READABLE_VERSIONS:
            raise CacheError(f"schema version {version}, this wat reads versions "
                             f"{READABLE_VERSIONS[0]}..{READABLE_VERSIONS[-1]}")
        try:
            return cls(model=attr_str(attrs["model"]), fingerprint=attr_str(attrs["fingerprint"]),
                       n_layers=int(attrs["n_layers"]), n_frames=int(attrs["n_frames"]),
                       dim=int(attrs["dim"]), policy=attr_str(attrs["policy"]), pooling=attr_str(attrs["pooling"]),
                       sample_rate=int(attrs["sample_rate"]), clip_seconds=float(attrs["clip_seconds"]),
                       vocab=Vocabulary.from_json(attr_str(attrs["vocab"])), multilabel=bool(attrs["multilabel"]),
                       dataset=attr_str(attrs["dataset"]), versions=json.loads(attr_str(attrs.get("versions", "{}"))),
                       storage=attr_str(attrs.get("storage", "fp16")), layers=tuple(json.loads(attr_str(attrs.get("layers", "[]")))),
                       columns=tuple(json.loads(attr_str(attrs.get("columns", "[]")))),
                       pad30_padding=attr_str(attrs.get("pad30_padding", "")),
                       encoder=attr_str(attrs.get("encoder", WHISPER)))
        except KeyError as e:
            raise CacheError(f"not a wat cache file: attribute {e.args[0]!r} missing") from None
        except (ValueError, LabelError) as e:
            raise CacheError(f"unreadable cache attributes: {e}") from None

    def incompatibilities(self, other: "CacheMeta", *, same_cache: bool = False) -> list[str]:
        """What makes features of `other` unusable next to ours: the features' rule
        (`FeatureSpec.incompatibilities`; model name/versions don't count, the stored precision
        only within one cache, `same_cache`), then the dataset's: label type, columns, classes."""
        out = self.spec.incompatibilities(other.spec, same_cache=same_cache)
        out += [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}"
                for k in ("multilabel", "columns") if getattr(self, k) != getattr(other, k)]
        if self.vocab != other.vocab:
            out.append(f"vocab: {len(self.vocab)} classes != {len(other.vocab)} classes"
                       if len(self.vocab) != len(other.vocab) else "vocab: different classes")
        return out

    def digest(self) -> str:
        """Hash of everything that matters for compatibility (not model name/versions)."""
        d = asdict(self)
        d.pop("versions"), d.pop("model")
        if not d["columns"]:
            d.pop("columns")  # caches without optional columns keep the digests they were written with
        d["vocab"] = self.vocab.to_json()
        if self.storage == "fp16":  # absent before they existed: digests of older caches still match
            d.pop("storage")
        if self.all_layers:
            d.pop("layers")
        if self.pad30_padding != "mel":  # absent before schema 4: digests of older caches still match
            d.pop("pad30_padding")
        if self.encoder == WHISPER:  # absent before schema 5: digests of Whisper caches still match
            d.pop("encoder")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def attr_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
