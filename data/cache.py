"""The feature cache: HDF5 shards plus one index file. This module owns the schema.

A cache is a folder of shards (each a contiguous slice of the sorted clip list, written by
`write_shard`) and an index file (`feats.h5`, written by `build_index`) that users pass around.

Shard file (`shard-00000.h5`), N clips, L layers, T pooled frames, D dims, C classes:

    =============== ======== ============ ============================== ===========================
    dataset         dtype    shape        chunks                         notes
    =============== ======== ============ ============================== ===========================
    ids             utf-8    [N]          -                              variable-length strings
    features        f16|i8   [N, L, T, D] (k, L, T, D), k = 1..4         k*record ~ <= 1 MiB
    mean            f16|i8   [N, L, D]    (min(256, N), 1, D)            time mean, computed in fp32
    features_scale  f32      [L, D]       -                              int8 storage only
    mean_scale      f32      [L, D]       -                              int8 storage only
    features_crc32  uint32   [N]          -                              zlib CRC-32 of each clip's row
    mean_crc32      uint32   [N]          -                              as stored (f16|i8, C order); v2+
    mean_layer_crc32 uint32  [N, L]       -                              per clip and layer; optional
    label_indptr    int32    [N + 1]      -                              CSR: clip i has labels
    label_indices   int32    [nnz]        -                              indices[indptr[i]:indptr[i+1]]
    fold            int16    [N]          -                              -1 = no fold
    duration        f32      [N]          -                              seconds of real audio
    --------------- -------- ------------ ------------------------------ ---------------------------
    optional columns (`COLUMNS`; present when the meta's `columns` names them, in every shard):
    snr             f32      [N]          -                              dB of a noisy-speech mixture
    utterance       utf-8    [N]          -                              speech id of the mixture
    =============== ======== ============ ============================== ===========================

    No compression: fp16 activations gain only ~1.1x from gzip+shuffle and reads get slower.
    Rows of `features` are stored whole and in order inside each chunk, so a reader can copy a row
    straight from the file (`row_offsets`) instead of going through the HDF5 library.

Storage precision (`storage` attribute): "fp16" stores the values; "int8" stores
round(x / scale) clipped to +-127 with one scale per (layer, channel) per shard and field,
scale = max |x| / 127 over the shard's clips (and frames): the error of a value is at most
scale / 2. Readers dequantise (`x = q * scale`, as f16) — on the device the features go to — so
nothing downstream sees the stored precision. Layer subsets (`layers` attribute): the encoder block
index of each stored layer (`wat-extract --layers 8:32`); L = len(layers).

    Checksums (schema 2+): written from the very arrays that go to disk, so any later change of a
    byte of a clip's `features` or `mean` row (a bad disk, a truncated copy, a stray write) is
    detected by `verify` and by the readers, which check each shard the first time a process reads
    it (`check_rows`). `mean_layer_crc32` holds one CRC-32 per clip and layer of `mean`, so that a read
    of one layer (a probe's) is checked on its own (`check_layer_block`) instead of the whole field
    first (32x one layer's bytes at large width: BENCHMARKS.md); it is optional integrity data, not
    a schema change: shards written before it (no dataset) read as they did, with the whole-field
    check, and older readers ignore it. CRC-32 rather than a cryptographic hash: it guards against accidents, not
    attackers, and zlib's runs at memory speed (BENCHMARKS.md: verify vs a plain read). Schema 1
    shards (no checksums) still open; for them readers refuse rows that are all zero or non-finite,
    and `verify`/`info` say that the shards carry no checksums.

Attributes (shard and index alike): `schema_version`, `kind` ("shard" | "index"), `model`,
`fingerprint`, `n_layers`, `n_frames`, `dim`, `policy`, `pad30_padding`, `pooling`, `sample_rate`, `clip_seconds`,
`vocab` (Vocabulary JSON), `multilabel`, `dataset`, `versions` (JSON), `storage`, `layers` (JSON
list), `columns` (JSON list of the optional columns present; absent = none, so caches written
before columns existed stay valid and keep their digests); shards also `n_clips` and `digest`
(sha256 of the ids and the meta, so a shard swapped for another is detected). `schema_version` is
the oldest reader that reads the file right: 2 for fp16 caches of every layer (version 1 plus
checksums; `storage`/`layers` absent means fp16/all), 3 for int8 or layer-subset caches, which a
version-2 reader would misread, 4 for pad30 caches (`pad30_padding` = "mel": the window
`whisper.transcribe` feeds the encoder, padded with zero log-mel frames; a version-3 reader would
take them for the older pad30 features and mix the two). pad30 files of versions 1-3 have no
`pad30_padding` attribute: their windows were padded with zero *samples* before the log-mel
("samples"), which is not what transcription feeds the encoder; they are still read, but never
next to "mel" features (`incompatibilities`, and `heads.head_problems` for heads trained on them).
Trim caches have no padding (`pad30_padding` absent, "" in `CacheMeta`) and keep versions 2/3.
Version 1 files (no checksums) are still read. Optional columns are
per-clip metadata that a reader may use or ignore (wat-robust writes `snr` and `utterance`;
wat-probe/wat-train ignore them); a new one is one row in `COLUMNS`. Caches whose shards hold
different column sets are incompatible.

Index file (`feats.h5`): `features` and `mean` are HDF5 virtual datasets over the shards with
source paths relative to the index's folder (HDF5 resolves them there, so the folder can be moved;
missing sources read as NaN, never zeros); `ids`, `label_indptr`, `label_indices`, `fold`,
`duration` and the optional columns are copied in; `shard_paths` (utf-8, relative), `shard_rows`
(int64) and `shard_digests` (utf-8) record the shards; int8 caches also copy each shard's scales
into `features_scale` and `mean_scale` [S, L, D] (the virtual datasets hold the raw int8 values).
`open_cache` checks every shard against these records before any read,
and `Cache.read` reads the shards directly, so a VDS fill value can never reach a caller.

Atomicity: every file is written to a `.partial` file beside NAME, flushed, fsynced, closed and `os.replace`d onto
NAME (then the folder is fsynced; `files.atomic_path`): a file with the final name is always whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from .files import atomic_path
from .labels import LabelError, Vocabulary

SCHEMA_VERSION = 4   # the newest schema this wat reads (and writes when a file needs it)
READABLE_VERSIONS = (1, 2, 3, 4)  # 1: no per-clip checksums; 3: int8 storage or a layer subset; 4: pad30 = "mel"
FIELDS = ("features", "mean")
CHECKSUMS = {"features": "features_crc32", "mean": "mean_crc32"}  # field -> its per-row CRC-32 dataset
MEAN_LAYER_CRC = "mean_layer_crc32"  # per-(clip, layer) CRC-32 of `mean` (optional, see the table)
STORAGES = ("fp16", "int8")
_STORED = {"fp16": np.float16, "int8": np.int8}
_META_KEYS = ("model", "fingerprint", "n_layers", "n_frames", "dim", "policy", "pooling",
              "sample_rate", "clip_seconds", "multilabel", "dataset")
_STR = h5py.string_dtype("utf-8")
# optional per-clip columns: name -> stored dtype (see the schema table)
COLUMNS = {"snr": np.dtype(np.float32), "utterance": _STR}


POLICIES = ("pad30", "trim")  # what the encoder sees: 30 s windows as in ASR, or only the clip
# How a pad30 window is padded to 30 s. "mel": transcribe's window (`extract.layers.pad30_input`),
# what this wat extracts; "samples": zero samples before the log-mel, pad30 caches of schema <= 3.
PAD30_PADDING = "mel"
PAD30_PADDINGS = ("mel", "samples")
PAD30_FIX = ("pad30 features from before cache schema 4 were padded with zero samples, not with the zero "
             "log-mel frames transcription feeds the encoder: re-extract that cache with wat-extract "
             "(and retrain heads trained on it)")


def padding_of(policy: str, pad30_padding: str | None) -> str:
    """The padding of `policy` features: "" for trim; for pad30 the recorded one, or "samples" when
    none is recorded (files and heads written before schema 4)."""
    if policy != "pad30":
        return ""
    return pad30_padding or "samples"


class CacheError(Exception):
    """A cache that cannot be used as asked: missing/partial/mismatched shard, bad schema, bad input."""


class CorruptCacheError(CacheError):
    """Clip rows whose bytes changed since extraction (checksum mismatch) or, in a shard without
    checksums, rows that are all zero or non-finite."""


@dataclass(frozen=True, kw_only=True)
class CacheMeta:
    """What the features of a cache are (keyword-only: a dozen fields of similar types)."""

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

    def __post_init__(self):
        layers = tuple(int(x) for x in self.layers) or tuple(range(self.n_layers))
        if len(layers) != self.n_layers or any(b <= a for a, b in zip(layers, layers[1:])) or min(layers, default=0) < 0:
            raise CacheError(f"layers {list(layers)} must be {self.n_layers} increasing block indices >= 0")
        if self.storage not in STORAGES:
            raise CacheError(f"unknown storage {self.storage!r}; one of {', '.join(STORAGES)}")
        bad = [c for c in self.columns if c not in COLUMNS]
        if bad:
            raise CacheError(f"unknown optional column(s) {bad}; known: {', '.join(COLUMNS)}")
        padding = padding_of(self.policy, self.pad30_padding)
        if self.policy == "pad30" and padding not in PAD30_PADDINGS:
            raise CacheError(f"unknown pad30 padding {padding!r}; one of {', '.join(PAD30_PADDINGS)}")
        object.__setattr__(self, "pad30_padding", padding)
        object.__setattr__(self, "layers", layers)  # frozen: normalised once, here
        object.__setattr__(self, "columns", tuple(sorted(self.columns)))

    @property
    def all_layers(self) -> bool:
        """True when the cache holds blocks 0..L-1 (no subset, or a subset that is a prefix)."""
        return self.layers == tuple(range(self.n_layers))

    def to_attrs(self) -> dict:
        d = {k: getattr(self, k) for k in _META_KEYS}
        plain = self.storage == "fp16" and self.all_layers  # what a version-2 reader reads right
        version = 4 if self.pad30_padding == "mel" else 2 if plain else 3
        d.update(schema_version=version, vocab=self.vocab.to_json(),
                 versions=json.dumps(self.versions, sort_keys=True), storage=self.storage,
                 layers=json.dumps(list(self.layers)))
        if self.columns:
            d["columns"] = json.dumps(list(self.columns))
        if self.pad30_padding == "mel":  # absent: "samples" (pad30 files of schema <= 3) or trim
            d["pad30_padding"] = self.pad30_padding
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
            return cls(model=_s(attrs["model"]), fingerprint=_s(attrs["fingerprint"]),
                       n_layers=int(attrs["n_layers"]), n_frames=int(attrs["n_frames"]),
                       dim=int(attrs["dim"]), policy=_s(attrs["policy"]), pooling=_s(attrs["pooling"]),
                       sample_rate=int(attrs["sample_rate"]), clip_seconds=float(attrs["clip_seconds"]),
                       vocab=Vocabulary.from_json(_s(attrs["vocab"])), multilabel=bool(attrs["multilabel"]),
                       dataset=_s(attrs["dataset"]), versions=json.loads(_s(attrs.get("versions", "{}"))),
                       storage=_s(attrs.get("storage", "fp16")), layers=tuple(json.loads(_s(attrs.get("layers", "[]")))),
                       columns=tuple(json.loads(_s(attrs.get("columns", "[]")))),
                       pad30_padding=_s(attrs.get("pad30_padding", "")))
        except KeyError as e:
            raise CacheError(f"not a wat cache file: attribute {e.args[0]!r} missing") from None
        except (ValueError, LabelError) as e:
            raise CacheError(f"unreadable cache attributes: {e}") from None

    def incompatibilities(self, other: "CacheMeta", *, same_cache: bool = False) -> list[str]:
        """What makes features of `other` unusable next to ours (model name/versions don't count).
        The stored precision is transparent to readers, so two caches may differ in it; the shards
        of one cache (`same_cache`) may not: one output holds one precision."""
        keys = ("fingerprint", "policy", "pooling", "n_layers", "layers", "n_frames", "dim", "sample_rate",
                "multilabel", "columns") + (("storage",) if same_cache else ())
        out = [f"{k}: {_show(getattr(self, k))} != {_show(getattr(other, k))}"
               for k in keys if getattr(self, k) != getattr(other, k)]
        if self.policy == other.policy and self.pad30_padding != other.pad30_padding:
            out.append(f"pad30_padding: {self.pad30_padding} != {other.pad30_padding} ({PAD30_FIX})")
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
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _s(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _show(v) -> str:
    if (isinstance(v, tuple) and len(v) > 2 and all(isinstance(x, int) for x in v)
            and v == tuple(range(v[0], v[-1] + 1))):
        return f"{v[0]}:{v[-1] + 1}"  # layer ranges read as the --layers option that made them
    return repr(v)


def shard_path(shard_dir, i: int) -> Path:
    return Path(shard_dir) / f"shard-{i:05d}.h5"


def _digest(ids, meta: CacheMeta) -> str:
    h = hashlib.sha256(meta.digest().encode())
    for s in ids:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()


def _features_chunks(shape) -> tuple:
    n, l, t, d = shape
    k = max(1, min(4, (1 << 20) // max(1, l * t * d * 2)))  # ~<=1 MiB chunks: one record for large
    return (max(1, min(k, n)), l, t, d)


def row_crc32(block: np.ndarray) -> np.ndarray:
    """CRC-32 (zlib) of each row of `block`, over its bytes as stored (f16 or int8, C order): uint32 [n].
    Any other dtype is taken as values to be stored as f16."""
    return _gather_crc32(_row_crc32_async(block))


_PIECE = 16 << 20  # bytes of rows per task of the checksum threads
_threads: ThreadPoolExecutor | None = None


def _forget_threads() -> None:
    # a forked child (decode workers, multiprocessing) has none of its parent's threads: a pool
    # copied from the parent would take tasks and never run them
    global _threads
    _threads = None


os.register_at_fork(after_in_child=_forget_threads)


def _row_tasks(fn, rows: np.ndarray) -> list[tuple[int, object]]:
    """(first row, future of fn(those rows)) per piece of `rows` [n, row bytes...], run by a few
    threads: zlib and numpy release the GIL on large buffers, so the pieces run beside each other
    and beside the caller (e.g. its HDF5 write)."""
    global _threads
    if _threads is None:
        _threads = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="wat-rows")
    step = max(1, _PIECE // max(1, rows.itemsize * rows[0].size)) if len(rows) else 1
    return [(a, _threads.submit(fn, rows[a:a + step])) for a in range(0, len(rows), step)]


def _row_crc32_async(block: np.ndarray) -> list:
    """`row_crc32` as futures (see `_row_tasks`)."""
    block = np.ascontiguousarray(block, dtype=np.int8 if block.dtype == np.int8 else "<f2")
    return _row_tasks(lambda part: [zlib.crc32(r) for r in part], block.reshape(len(block), -1))


def _gather_crc32(tasks: list) -> np.ndarray:
    return np.array([c for _, f in tasks for c in f.result()], np.uint32)


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the rows of `x` that hold a NaN or an inf. f16 rows (what the extractor writes) are
    checked on their bits by the row threads (`_nonfinite_bits`); other types with numpy."""
    n, bad = len(x), []
    if x.dtype != np.float16:
        for a in range(0, n, 256):
            part = x[a:a + 256]
            bad.extend(a + np.flatnonzero(~np.isfinite(part).reshape(len(part), -1).all(axis=1)))
        return np.asarray(bad, np.int64)
    bits = np.ascontiguousarray(x).view(np.uint16).reshape(n, -1)
    return np.asarray([a + i for a, f in _row_tasks(_nonfinite_bits, bits) for i in f.result()], np.int64)


def _nonfinite_bits(bits: np.ndarray, piece: int = 1 << 20) -> list[int]:
    """Rows of f16 bit patterns [n, m] with an exponent of all ones (inf or NaN), ~`piece` bytes at a
    time through a small buffer: ~10x numpy's f16 isfinite, which converts every value to f32 first."""
    step = max(1, piece // max(1, bits.itemsize * bits.shape[1]))
    tmp = np.empty((min(step, len(bits)), bits.shape[1]), np.uint16)
    bad = []
    for a in range(0, len(bits), step):
        part = tmp[:len(bits[a:a + step])]
        np.bitwise_and(bits[a:a + step], 0x7FFF, out=part)
        bad.extend((a + np.flatnonzero(part.max(axis=1) >= 0x7C00)).tolist())
    return bad


def layer_crc32(block: np.ndarray) -> np.ndarray:
    """uint32 [n, L]: `row_crc32` of each clip's layers of a `mean` block [n, L, D]."""
    n, L = block.shape[:2]
    return row_crc32(block.reshape(n * L, -1)).reshape(n, L)


def check_layer_block(path, rows: slice, layers: slice, block: np.ndarray) -> None:
    """Raise CorruptCacheError when stored `mean` rows `rows`, layers `layers` (every channel) of
    shard `path`, read as `block` [rows, layers, D], differ from their per-layer checksums. A layer
    whose every row this process has checked is not checked again (`_VERIFIED`, as `verify_field`)."""
    where, _, mtime, size = _verify_key(path, "")
    keys = [(where, f"mean:{l}", mtime, size) for l in range(layers.start, layers.stop)]
    if all(k in _VERIFIED for k in keys):
        return
    f = _handle(str(path))
    crc = f[MEAN_LAYER_CRC]
    bad = np.flatnonzero((layer_crc32(block) != crc[rows, layers]).any(axis=1))
    if len(bad):
        ids = f["ids"].asstr()[rows][bad]
        raise CorruptCacheError(_corrupt_message(path, "mean", ids, True))
    if rows.start == 0 and rows.stop >= crc.shape[0]:
        _VERIFIED.update(keys)


def _verify_key(path, field: str) -> tuple:
    """Key of `_VERIFIED`: the file (resolved), what was checked, and the file's mtime and size."""
    st = os.stat(path)
    return (str(Path(path).resolve()), field, st.st_mtime_ns, st.st_size)


def _corrupt_message(path, field: str, ids, checksummed: bool) -> str:
    shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
    how = "fail their checksum" if checksummed else "are all zero or non-finite (a shard without checksums)"
    return (f"{path}: {len(ids)} clip(s) {how} in {field} ({shown}): the cache is corrupt; `wat-cache verify` "
            f"lists every problem, and rerunning the wat-extract command that made it rebuilds the bad shards")


class _WriteGuard(io.RawIOBase):
    """The file object h5py writes a new file through. HDF5 does not recover from a failed write
    (full disk, file-size limit): its later flushes fail again and the process crashed in h5py's
    teardown (exit 139). So the first OSError is kept and later writes are dropped: HDF5 closes
    normally, then `_atomic_h5` raises the kept error and the temporary file is deleted."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self.raw.seek(pos, whence)

    def tell(self):
        return self.raw.tell()

    def readinto(self, b):
        return self.raw.readinto(b)

    def _guard(self, op, *args):
        if self.error is None:
            try:
                return op(*args)
            except OSError as e:
                self.error = e
        return None

    def write(self, b):
        n = self._guard(self.raw.write, b)
        return len(memoryview(b)) if n is None else n

    def truncate(self, size=None):
        self._guard(self.raw.truncate, size)
        return size

    def flush(self):
        self._guard(self.raw.flush)


@contextmanager
def _atomic_h5(path: Path):
    """Yields an h5py.File on a temporary file beside PATH; it becomes PATH (durably, see
    `files.atomic_path`) only once it is whole and closed. A write error (ENOSPC, EFBIG) is raised
    as OSError after HDF5 has closed its objects in order, and nothing is left behind."""
    with atomic_path(path) as tmp, open(tmp, "r+b", buffering=0) as raw:
        guard = _WriteGuard(raw)
        f = h5py.File(guard, "w")
        try:
            yield f
            f.flush()
        except BaseException as e:
            f.close()
            if guard.error is not None and e is not guard.error:
                raise guard.error from e  # HDF5's own message hides the OS error behind it
            raise
        f.close()
        if guard.error is not None:
            raise guard.error


def _csr(labels, n_classes: int):
    indptr = np.zeros(len(labels) + 1, np.int64)
    flat = []
    for i, lab in enumerate(labels):
        lab = [int(x) for x in lab]
        if any(x < 0 or x >= n_classes for x in lab):
            raise CacheError(f"clip {i}: label out of range 0..{n_classes - 1}: {lab}")
        flat.extend(lab)
        indptr[i + 1] = len(flat)
    if indptr[-1] >= 2**31:
        raise CacheError("too many labels for int32 CSR")
    return indptr.astype(np.int32), np.asarray(flat, np.int32)


def _int8_scale(x: np.ndarray, axes: tuple, block: int = 64) -> np.ndarray:
    """max |x| / 127 over `axes` (rows first), per remaining (layer, channel), in row blocks."""
    amax = None
    for a in range(0, len(x), block):
        m = np.abs(np.asarray(x[a:a + block], np.float32)).max(axis=axes)
        amax = m if amax is None else np.maximum(amax, m)
    return (amax / 127).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, block: int = 64) -> np.ndarray:
    """round(x / scale) clipped to +-127 as int8; `scale` broadcasts against one row of x."""
    inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)  # an all-zero channel stays 0
    q = np.empty(x.shape, np.int8)
    for a in range(0, len(x), block):
        v = np.asarray(x[a:a + block], np.float32) * inv
        q[a:a + block] = np.clip(np.rint(v, out=v), -127, 127, out=v)
    return q


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 rows -> f16 values f16(q) * f16(scale), rounded once (`scale` broadcasts against a row).
    The product of two f16 values is exact in f32, so this equals torch's f16 multiply that the
    readers run on the device: every reader returns the same bits."""
    return (q.astype(np.float32) * scale.astype(np.float16).astype(np.float32)).astype(np.float16)


def _row_scale(field: str, scale: np.ndarray) -> np.ndarray:
    # [L, D] -> broadcastable against one row: features rows are [L, T, D], mean rows [L, D]
    return scale[:, None, :] if field == "features" else scale


def write_shard(path, meta: CacheMeta, ids, features, labels, folds=None, durations=None, mean=None,
                columns: dict | None = None, timing: dict | None = None) -> None:
    """Write one shard atomically. features [N, L, T, D] any float, stored as `meta.storage`
    (f16, or int8 with per-(layer, channel) scales of this shard); labels: index tuples;
    columns: {name: N values} for exactly the optional columns `meta.columns` names.
    `timing`: gets "checksum", the seconds spent on the finite check and waiting for the CRC-32s
    (computed by threads while the rows are written)."""
    t_check = time.perf_counter()
    path = Path(path)
    ids = [str(i) for i in ids]
    n = len(ids)
    features = np.asarray(features)
    want = (n, meta.n_layers, meta.n_frames, meta.dim)
    if features.shape != want:
        raise CacheError(f"{path}: features shape {features.shape}, meta says {want}")
    if n == 0:
        raise CacheError(f"{path}: empty shard")
    if len(set(ids)) != n:
        raise CacheError(f"{path}: duplicate ids in shard")
    if len(labels) != n:
        raise CacheError(f"{path}: {len(labels)} label rows for {n} clips")
    bad = _nonfinite_rows(features)  # a NaN in a cache poisons every model trained on it: refuse here
    if len(bad):
        raise CacheError(f"{path}: NaN/inf in features of clip(s) {', '.join(ids[i] for i in bad[:5])}")
    t_check = time.perf_counter() - t_check
    if mean is None:
        mean = features.mean(axis=2, dtype=np.float32)  # fp32 accumulation, no fp32 copy of features
    mean = np.asarray(mean)
    if mean.shape != (n, meta.n_layers, meta.dim):
        raise CacheError(f"{path}: mean shape {mean.shape}, expected {(n, meta.n_layers, meta.dim)}")
    indptr, indices = _csr(labels, len(meta.vocab))
    folds = np.full(n, -1, np.int16) if folds is None else np.asarray(folds, np.int16)
    durations = np.full(n, meta.clip_seconds, np.float32) if durations is None else np.asarray(durations, np.float32)
    if folds.shape != (n,) or durations.shape != (n,):
        raise CacheError(f"{path}: folds/durations must have {n} entries")
    columns = _check_columns(path, meta, columns or {}, n)
    if meta.storage == "int8":
        f_scale, m_scale = _int8_scale(features, (0, 2)), _int8_scale(mean, (0,))
        stored = {"features": quantize(features, _row_scale("features", f_scale)),
                  "mean": quantize(mean, m_scale), "features_scale": f_scale, "mean_scale": m_scale}
    else:
        stored = {"features": features.astype(np.float16, copy=False), "mean": mean.astype(np.float16)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # checksums over the arrays that go to disk (int8 storage: the quantised values), computed while
    # they are written; their datasets are made first (as zeros, filled in last), as they always were
    crcs = {name: _row_crc32_async(stored[name]) for name in FIELDS}
    t_crc = time.perf_counter()
    mean_layers = layer_crc32(stored["mean"])  # small: n x L rows of D values
    t_check += time.perf_counter() - t_crc
    with _atomic_h5(path) as f:
        f.attrs.update(meta.to_attrs())
        f.attrs.update(kind="shard", n_clips=n, digest=_digest(ids, meta))
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
        for name in FIELDS:
            f.create_dataset(CHECKSUMS[name], data=np.zeros(n, np.uint32))
        f.create_dataset(MEAN_LAYER_CRC, data=mean_layers)
        f.create_dataset("features", data=stored.pop("features"), chunks=_features_chunks(features.shape))
        f.create_dataset("mean", data=stored.pop("mean"), chunks=(min(256, n), 1, meta.dim))
        t_crc = time.perf_counter()
        for name in FIELDS:
            f[CHECKSUMS[name]][...] = _gather_crc32(crcs[name])
        t_check += time.perf_counter() - t_crc
        for name, data in stored.items():  # the int8 scales
            f.create_dataset(name, data=data)
        f.create_dataset("label_indptr", data=indptr)
        f.create_dataset("label_indices", data=indices)
        f.create_dataset("fold", data=folds)
        f.create_dataset("duration", data=durations)
        for name, values in columns.items():
            f.create_dataset(name, data=values, dtype=COLUMNS[name])
    if timing is not None:
        timing["checksum"] = timing.get("checksum", 0.0) + t_check


def _check_columns(path, meta: CacheMeta, columns: dict, n: int) -> dict:
    if set(columns) != set(meta.columns):
        raise CacheError(f"{path}: columns {sorted(columns)} given, meta says {list(meta.columns)}")
    out = {}
    for name, values in columns.items():
        if COLUMNS[name] == _STR:
            values = np.array([str(v) for v in values], dtype=object)
        else:
            values = np.asarray(values, COLUMNS[name])
        if values.shape != (n,):
            raise CacheError(f"{path}: column {name!r} has shape {values.shape}, expected ({n},)")
        out[name] = values
    return out


def _read_column(dset: h5py.Dataset) -> np.ndarray:
    return np.array(dset.asstr()[:], dtype=str) if h5py.check_string_dtype(dset.dtype) else dset[:]


def _open_h5(path) -> h5py.File:
    path = Path(path)
    if path.name.endswith(".partial"):
        raise CacheError(f"{path}: unfinished file (.partial), not a shard")
    if not path.is_file():
        raise CacheError(f"{path}: file missing")
    try:
        # default locking: HDF5 refuses a second open of one file with other locking flags (a VDS read
        # opens the shards itself). On network filesystems set HDF5_USE_FILE_LOCKING=FALSE instead.
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: unreadable HDF5 file ({e})") from None


def _shard_record(path: Path) -> tuple[CacheMeta, int, str, bool]:
    """(meta, clips, digest, has checksums) of a shard file."""
    with _open_h5(path) as f:
        if _s(f.attrs.get("kind", "")) != "shard":
            raise CacheError(f"{path}: not a shard file")
        try:
            meta = CacheMeta.from_attrs(f.attrs)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
        return meta, int(f.attrs["n_clips"]), _s(f.attrs["digest"]), _has_checksums(f)


def _has_checksums(f: h5py.File) -> bool:
    return all(name in f for name in CHECKSUMS.values())


def build_index(index_path, shard_paths) -> None:
    """Write the index file over the given shards (in that order), atomically."""
    index_path = Path(index_path)
    root = index_path.parent.resolve()
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise CacheError(f"{index_path}: no shards to index")
    records = [_shard_record(p) for p in shard_paths]
    meta = records[0][0]
    for p, (m, *_) in zip(shard_paths, records):
        bad = meta.incompatibilities(m, same_cache=True)
        if bad:
            raise CacheError(f"{p}: incompatible with {shard_paths[0]}: {'; '.join(bad)}")
    rel = [os.path.relpath(p.resolve(), root) for p in shard_paths]
    rows = [r[1] for r in records]
    n = sum(rows)
    L, T, D = meta.n_layers, meta.n_frames, meta.dim
    ids, indptr, indices, folds, durs = [], [np.zeros(1, np.int64)], [], [], []
    scales = {"features_scale": [], "mean_scale": []} if meta.storage == "int8" else {}
    cols = {name: [] for name in meta.columns}
    offset = 0
    for p in shard_paths:
        with _open_h5(p) as f:
            for name in cols:
                cols[name].append(_read_column(f[name]))
            ids.extend(f["ids"].asstr()[:])
            for name, got in scales.items():
                got.append(f[name][:])
            ip = f["label_indptr"][:].astype(np.int64)
            indptr.append(ip[1:] + offset)
            offset += int(ip[-1])
            indices.append(f["label_indices"][:])
            folds.append(f["fold"][:])
            durs.append(f["duration"][:])
    if len(set(ids)) != len(ids):
        raise CacheError(f"{index_path}: clip ids repeat across shards")
    stored = _STORED[meta.storage]
    layouts = {"features": h5py.VirtualLayout((n, L, T, D), stored),
               "mean": h5py.VirtualLayout((n, L, D), stored)}
    start = 0
    for r, k in zip(rel, rows):
        for name, lay in layouts.items():
            lay[start:start + k] = h5py.VirtualSource(r, name, shape=(k,) + lay.shape[1:], dtype=stored)
        start += k
    # missing source -> NaN, not 0 (int8 has no NaN: open_cache/Cache.read never read through the VDS)
    fill = np.float16(np.nan) if meta.storage == "fp16" else np.int8(0)
    with _atomic_h5(index_path) as f:
        f.attrs.update(meta.to_attrs())
        f.attrs.update(kind="index", n_clips=n)
        for name, lay in layouts.items():
            f.create_virtual_dataset(name, lay, fillvalue=fill)
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
        f.create_dataset("label_indptr", data=np.concatenate(indptr).astype(np.int32))
        f.create_dataset("label_indices", data=np.concatenate(indices).astype(np.int32))
        f.create_dataset("fold", data=np.concatenate(folds).astype(np.int16))
        f.create_dataset("duration", data=np.concatenate(durs).astype(np.float32))
        for name, parts in cols.items():
            values = np.concatenate(parts)
            f.create_dataset(name, data=values.astype(object) if COLUMNS[name] == _STR else values,
                             dtype=COLUMNS[name])
        f.create_dataset("shard_paths", data=np.array(rel, dtype=object), dtype=_STR)
        f.create_dataset("shard_rows", data=np.asarray(rows, np.int64))
        f.create_dataset("shard_digests", data=np.array([r[2] for r in records], dtype=object), dtype=_STR)
        for name, got in scales.items():
            f.create_dataset(name, data=np.stack(got))


# Open read-only files, per process: h5py handles never cross a fork or a pickle.
_HANDLES: dict[str, tuple[int, h5py.File]] = {}
# (shard path, field, mtime, size) whose every row this process has checked against its checksums
# (or, without checksums, for zero/non-finite rows): readers check a shard once per run. Field
# "mean:L": layer L of `mean`, checked against its per-layer checksums (`check_layer_block`).
_VERIFIED: set[tuple] = set()


def _handle(path: str) -> h5py.File:
    entry = _HANDLES.get(path)
    if entry is None or entry[0] != os.getpid() or not entry[1].id.valid:
        _HANDLES[path] = entry = (os.getpid(), _open_h5(path))
    return entry[1]


# Plain file descriptors of the same files, for readers that copy raw rows (`row_offsets`).
_FDS: dict[str, tuple[int, int]] = {}


def raw_fd(path: str) -> int:
    """A read-only descriptor of shard `path` for os.preadv, one per process (valid until `_forget`)."""
    entry = _FDS.get(path)
    if entry is None or entry[0] != os.getpid():
        _FDS[path] = entry = (os.getpid(), os.open(path, os.O_RDONLY))
    return entry[1]


def _forget(path: str) -> None:
    entry = _HANDLES.pop(path, None)
    if entry is not None and entry[0] == os.getpid() and entry[1].id.valid:
        entry[1].close()
    fd = _FDS.pop(path, None)
    if fd is not None and fd[0] == os.getpid():
        os.close(fd[1])


class Cache:
    """An opened, validated cache. Picklable: it holds paths, and files are opened per process."""

    def __init__(self, path, meta, ids, label_indptr, label_indices, folds, durations, shards, checksummed=None,
                 columns=None):
        self.path = Path(path)
        self.meta: CacheMeta = meta
        self.ids: np.ndarray = ids
        self._indptr, self._indices = label_indptr, label_indices
        self.folds: np.ndarray = folds
        self.durations: np.ndarray = durations
        self.shards: list[tuple[Path, int, int]] = shards  # (path, start, stop)
        # per shard: holds per-clip checksums (schema 2), else only zero/non-finite rows are caught
        self.checksummed: list[bool] = list(checksummed) if checksummed is not None else [True] * len(shards)
        self.columns: dict[str, np.ndarray] = columns or {}  # the optional columns, by name
        self._starts = np.array([s[1] for s in shards], np.int64)
        self._crc: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, {len(self)} clips, {len(self.shards)} shards)"

    @cached_property
    def labels(self) -> list[tuple[int, ...]]:
        ip, ix = self._indptr, self._indices.tolist()
        return [tuple(ix[ip[i]:ip[i + 1]]) for i in range(len(self))]

    def label_matrix(self) -> np.ndarray:
        y = np.zeros((len(self), len(self.meta.vocab)), bool)
        rows = np.repeat(np.arange(len(self)), np.diff(self._indptr))
        y[rows, self._indices] = True
        return y

    def shape(self, field: str) -> tuple[int, ...]:
        m = self.meta
        per = {"features": (m.n_layers, m.n_frames, m.dim), "mean": (m.n_layers, m.dim)}
        if field not in per:
            raise CacheError(f"unknown field {field!r}; one of {FIELDS}")
        return (len(self),) + per[field]

    def dataset(self, shard: int, field: str) -> h5py.Dataset:
        """The h5py dataset of one shard, opened lazily in this process (stored values: f16 or int8)."""
        return _handle(str(self.shards[shard][0]))[field]

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(_STORED[self.meta.storage])

    @cached_property
    def _scales(self) -> dict[str, np.ndarray]:
        if self.meta.storage != "int8":
            return {}
        return {f: np.stack([self.dataset(s, f + "_scale")[:] for s in range(len(self.shards))]) for f in FIELDS}

    def scales(self, field: str) -> np.ndarray | None:
        """[S, L, D] f32 int8 scales of `field` per shard (x = q * scale); None for fp16 caches."""
        self.shape(field)  # checks the name
        return self._scales.get(field)

    def dequantize(self, field: str, rows: np.ndarray, shard: int) -> np.ndarray:
        """Stored rows of one shard -> f16 values (fp16 rows are returned as they are)."""
        if self.meta.storage == "fp16":
            return rows
        return dequantize(rows, _row_scale(field, self.scales(field)[shard]))

    def shard_of(self, indices) -> np.ndarray:
        return np.searchsorted(self._starts, indices, side="right") - 1

    def read(self, field: str, indices) -> np.ndarray:
        """Rows `indices` (any order, repeats allowed) of `field` as f16 (int8 storage dequantised),
        read shard by shard."""
        shape = self.shape(field)
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a cache of {len(self)} clips")
        out = np.empty((idx.size,) + shape[1:], np.float16)
        shard = self.shard_of(idx)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = idx[where] - self.shards[s][1]
            uniq, inverse = np.unique(local, return_inverse=True)
            rows = _read_rows(self.dataset(int(s), field), uniq)
            if not self.is_verified(int(s), field):  # random access: check what was read (as stored)
                self.check_rows(int(s), field, uniq, rows)
            out[where] = self.dequantize(field, rows, int(s))[inverse]
        return out

    def close(self) -> None:
        for p, _, _ in self.shards:
            _forget(str(p))

    # ------------------------------------------------------------ integrity (see the module doc)

    def bad_rows(self, shard: int, field: str, rows, block: np.ndarray) -> np.ndarray:
        """Positions in `block` that are not what extraction wrote (`_bad_rows`). `block` holds
        rows `rows` (local row numbers: an array, or an int for rows rows..rows+len(block)) of
        shard `shard`'s `field`."""
        if not self.checksummed[shard]:
            return _bad_rows(block, None)
        key = (shard, field)
        if key not in self._crc:
            self._crc[key] = self.dataset(shard, CHECKSUMS[field])[:]
        crc = self._crc[key]
        return _bad_rows(block, crc[rows] if isinstance(rows, np.ndarray) else crc[rows:rows + len(block)])

    def check_rows(self, shard: int, field: str, rows, block: np.ndarray) -> None:
        """Raise CorruptCacheError naming the clips of `block` that fail `bad_rows`."""
        bad = self.bad_rows(shard, field, rows, block)
        if len(bad):
            local = rows[bad] if isinstance(rows, np.ndarray) else rows + bad
            raise CorruptCacheError(self._corrupt_message(shard, field, local))

    def _corrupt_message(self, shard: int, field: str, local) -> str:
        path, first, _ = self.shards[shard]
        return _corrupt_message(path, field, [self.ids[first + int(i)] for i in local], self.checksummed[shard])

    def layer_checkable(self, field: str) -> bool:
        """True when a read of some layers of `field` can be checked on its own (`check_layer_block`):
        `mean`, every shard with per-layer checksums. Otherwise a reader of part of a row checks the
        whole field first (`verify_field`)."""
        return field == "mean" and all(self._layer_checksummed)

    @cached_property
    def _layer_checksummed(self) -> list[bool]:
        return [MEAN_LAYER_CRC in _handle(str(p)) for p, _, _ in self.shards]

    def _verify_key(self, shard: int, field: str) -> tuple:
        return _verify_key(self.shards[shard][0], field)

    def is_verified(self, shard: int, field: str) -> bool:
        return self._verify_key(shard, field) in _VERIFIED

    def mark_verified(self, shard: int, field: str) -> None:
        _VERIFIED.add(self._verify_key(shard, field))

    def verify_field(self, field: str, block_bytes: int = 64 << 20) -> None:
        """Check every row of `field` in shards this process has not checked yet; raises
        CorruptCacheError. Readers that do not see every row themselves call this first."""
        rows = max(1, block_bytes // (self.stored_dtype.itemsize * int(np.prod(self.shape(field)[1:]))))
        for s, (_, start, stop) in enumerate(self.shards):
            if self.is_verified(s, field):
                continue
            dset = self.dataset(s, field)
            for a in range(0, stop - start, rows):
                self.check_rows(s, field, a, dset[a:a + rows])
            self.mark_verified(s, field)


def _read_rows(dset: h5py.Dataset, rows: np.ndarray, max_gap: int = 8) -> np.ndarray:
    """Sorted unique rows, read as few contiguous slices (small gaps are read and dropped)."""
    out = np.empty((len(rows),) + dset.shape[1:], dset.dtype)
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        a, b = int(rows[run[0]]), int(rows[run[-1]]) + 1
        out[run] = dset[a:b][rows[run] - a] if b - a != len(run) else dset[a:b]
    return out


def _chunk_grid(dset: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in its file of each chunk of `dset`, as an array over the chunk grid, when every
    chunk lies raw there (no filter, little-endian, all allocated, full size: HDF5 stores edge
    chunks whole when unfiltered); else None."""
    if dset.chunks is None or dset.dtype.byteorder == ">" or dset.id.get_create_plist().get_nfilters():
        return None
    chunks = dset.chunks
    grid = np.full([-(-n // k) for n, k in zip(dset.shape, chunks)], -1, np.int64)
    size = dset.dtype.itemsize * int(np.prod(chunks))
    if hasattr(dset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
        def visit(info):
            if info.byte_offset is not None and info.size == size:
                grid[tuple(o // k for o, k in zip(info.chunk_offset, chunks))] = info.byte_offset
        dset.id.chunk_iter(visit)
    else:
        for at in np.ndindex(*grid.shape):
            info = dset.id.get_chunk_info_by_coord(tuple(i * k for i, k in zip(at, chunks)))
            if info.byte_offset is not None and info.size == size:
                grid[at] = info.byte_offset
    return None if (grid < 0).any() else grid


def row_offsets(dset: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in its file of each row of `dset` when every row lies whole and raw in the file
    (no filter, little-endian, chunks spanning whole rows, all allocated); else None. Readers then
    copy rows with plain file reads straight into their batch buffers, one copy per row."""
    shape, chunks = dset.shape, dset.chunks
    if dset.dtype.byteorder == ">" or dset.id.get_create_plist().get_nfilters():
        return None
    row_bytes = dset.dtype.itemsize * int(np.prod(shape[1:]))
    if chunks is None:
        start = dset.id.get_offset()
        return None if start is None else start + np.arange(shape[0], dtype=np.int64) * row_bytes
    if tuple(chunks[1:]) != tuple(shape[1:]):
        return None
    grid = _chunk_grid(dset)
    if grid is None:
        return None
    k = chunks[0]
    return (grid.reshape(-1)[:, None] + np.arange(k, dtype=np.int64) * row_bytes).reshape(-1)[:shape[0]]


def layer_chunk_offsets(dset: h5py.Dataset) -> np.ndarray | None:
    """[row chunks, layers] byte offsets in its file of the chunks of a dataset chunked one layer
    at a time (`mean`: chunks (k, 1, D)), each holding k rows of one layer, when all lie raw in the
    file (`_chunk_grid`); else None. Readers of whole blocks of rows then copy whole chunks with
    plain file reads instead of going through the HDF5 library."""
    chunks = dset.chunks
    if chunks is None or len(chunks) < 2 or chunks[1] != 1 or tuple(chunks[2:]) != tuple(dset.shape[2:]):
        return None
    grid = _chunk_grid(dset)
    return None if grid is None else grid.reshape(grid.shape[:2])


def open_cache(path) -> Cache:
    """Open an index file or a single shard; every shard is checked before anything is read."""
    path = Path(path)
    with _open_h5(path) as f:
        kind = _s(f.attrs.get("kind", ""))
        if kind not in ("index", "shard"):
            raise CacheError(f"{path}: not a wat cache file")
        try:
            meta = CacheMeta.from_attrs(f.attrs)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
        ids = np.array(f["ids"].asstr()[:], dtype=str)
        indptr, indices = f["label_indptr"][:], f["label_indices"][:]
        folds, durs = f["fold"][:], f["duration"][:]
        try:
            columns = {name: _read_column(f[name]) for name in meta.columns}
        except KeyError as e:
            raise CacheError(f"{path}: optional column {e.args[0]!r} named in the attributes is missing") from None
        if any(len(v) != len(ids) for v in columns.values()):
            raise CacheError(f"{path}: an optional column does not have one entry per clip")
        if kind == "shard":
            if int(f.attrs["n_clips"]) != len(ids) or _s(f.attrs["digest"]) != _digest(ids, meta):
                raise CacheError(f"{path}: shard content does not match its own digest")
            records = [(path, len(ids), _s(f.attrs["digest"]))]
            checksummed = [_has_checksums(f)]
        else:
            records = [(path.parent / p, int(r), d) for p, r, d in zip(
                f["shard_paths"].asstr()[:], f["shard_rows"][:], f["shard_digests"].asstr()[:])]
    shards, start = [], 0
    if kind == "index":
        checksummed = []
    for p, rows, digest in records:
        _forget(str(p))  # a re-written shard must not be read through an old handle
        if kind == "index":
            m, n, d, crc = _shard_record(p)
            checksummed.append(crc)
            bad = meta.incompatibilities(m, same_cache=True)
            if bad:
                raise CacheError(f"{p}: incompatible with index {path}: {'; '.join(bad)}")
            if n != rows:
                raise CacheError(f"{p}: {n} clips, index {path} expects {rows}")
            if d != digest:
                raise CacheError(f"{p}: not the shard the index {path} was built from (digest differs)")
        shards.append((p, start, start + rows))
        start += rows
    if start != len(ids):
        raise CacheError(f"{path}: shards hold {start} clips, index lists {len(ids)}")
    return Cache(path, meta, ids, indptr, indices, folds, durs, shards, checksummed, columns)


def _bad_rows(block: np.ndarray, crc: np.ndarray | None) -> np.ndarray:
    """Rows of `block` that are not what extraction wrote: CRC-32 differs from `crc`, or, for a
    shard without checksums (crc None), rows that are all zero or non-finite."""
    if crc is None:
        flat = block.reshape(len(block), -1)
        return np.flatnonzero(~np.isfinite(flat).all(1) | ~flat.any(1))
    return np.flatnonzero(row_crc32(block) != crc)


def _what(row: np.ndarray) -> str:
    """What a bad row looks like, for people: ' (NaN/inf)', ' (all zero)' or ''."""
    return " (NaN/inf)" if not np.isfinite(row).all() else " (all zero)" if not row.any() else ""


def check_shard(p, meta: CacheMeta | None = None, *, probe_rows: int = 16, rng=None,
                bar=None) -> tuple[list[str], list[str]]:
    """(problems, ids) of one shard file: attributes (against `meta` when given), shapes, ids digest,
    labels, and every byte of `features` and `mean` against the per-clip checksums. Shards without
    checksums (schema 1): all-zero/non-finite rows and the time mean of `probe_rows` sampled rows.
    Reads in blocks (bounded memory); `bar` (tqdm) advances by the bytes read."""
    p = Path(p)
    problems = []
    try:
        f = _open_h5(p)
    except CacheError as e:
        return [str(e)], []
    with f:
        try:
            m = CacheMeta.from_attrs(f.attrs)
        except CacheError as e:
            return [f"{p}: {e}"], []
        bad = meta.incompatibilities(m, same_cache=True) if meta is not None else []
        if bad:
            problems.append(f"{p}: attributes differ: {'; '.join(bad)}")
        try:
            ids = list(f["ids"].asstr()[:])
            n = len(ids)
            stored = _STORED[m.storage]
            want = {"features": ((n, m.n_layers, m.n_frames, m.dim), stored),
                    "mean": ((n, m.n_layers, m.dim), stored), "fold": ((n,), np.int16),
                    "duration": ((n,), np.float32), "label_indptr": ((n + 1,), np.int32)}
            if m.storage == "int8":
                want.update({f + "_scale": ((m.n_layers, m.dim), np.float32) for f in FIELDS})
            checksummed = _has_checksums(f)
            if checksummed:
                want.update({c: ((n,), np.uint32) for c in CHECKSUMS.values()})
            by_layer = MEAN_LAYER_CRC in f
            if by_layer:
                want[MEAN_LAYER_CRC] = ((n, m.n_layers), np.uint32)
            want.update({name: ((n,), COLUMNS[name]) for name in m.columns})
            for name, (shape, dtype) in want.items():
                d = f[name]
                if d.shape != shape or d.dtype != dtype:
                    problems.append(f"{p}: {name} is {d.dtype}{list(d.shape)}, expected {np.dtype(dtype)}{list(shape)}")
            if problems:
                return problems, ids
            if int(f.attrs["n_clips"]) != n or _s(f.attrs["digest"]) != _digest(ids, m):
                problems.append(f"{p}: ids do not match the shard's digest")
            ip, ix = f["label_indptr"][:], f["label_indices"][:]
            if ip[0] != 0 or np.any(np.diff(ip) < 0) or ip[-1] != len(ix) or (
                    len(ix) and (ix.min() < 0 or ix.max() >= len(m.vocab))):
                problems.append(f"{p}: malformed labels (CSR)")
            feats, mean = f["features"], f["mean"]
            if m.storage == "int8":  # int8 values are always finite: their scales must be
                scale = {name: f[name + "_scale"][:] for name in FIELDS}
                for name, sc in scale.items():
                    if not np.isfinite(sc).all() or (sc < 0).any():
                        problems.append(f"{p}: NaN/inf or negative {name}_scale")
                if problems:
                    return problems, ids
                deq = {name: lambda x, name=name: dequantize(x, _row_scale(name, scale[name])) for name in FIELDS}
                atol = scale["features"] / 2 + scale["mean"] / 2 + 1e-2  # both quantisation errors
            else:
                deq = {name: (lambda x: x) for name in FIELDS}
                atol = 1e-2
            crc = {k: f[c][:] if checksummed else None for k, c in CHECKSUMS.items()}
            crc_layers = f[MEAN_LAYER_CRC][:] if by_layer else None
            step = max(1, (64 << 20) // max(1, feats.dtype.itemsize * int(np.prod(feats.shape[1:]))))
            bad_rows = {"features": [], "mean": []}
            for a in range(0, n, step):
                for name, dset in (("features", feats), ("mean", mean)):
                    block = dset[a:a + step]
                    expected = None if crc[name] is None else crc[name][a:a + step]
                    bad = _bad_rows(block, expected)
                    if name == "mean" and crc_layers is not None:  # what one-layer reads are checked against
                        bad = np.union1d(bad, np.flatnonzero((layer_crc32(block) != crc_layers[a:a + step]).any(1)))
                    bad_rows[name] += [(a + i, _what(block[i])) for i in bad]
                    if bar is not None:
                        bar.update(block.nbytes)
            how = "fail their checksum" if checksummed else "are all zero or non-finite"
            for name, rows in bad_rows.items():
                if rows:
                    shown = ", ".join(ids[i] + what for i, what in rows[:5]) + (", ..." if len(rows) > 5 else "")
                    problems.append(f"{p}: {len(rows)} clip(s) {how} in {name}: {shown}")
            if not checksummed:  # the checksums cover mean too; without them, compare with features
                rng = rng if rng is not None else np.random.default_rng(0)
                sample = np.sort(rng.choice(n, size=min(probe_rows, n), replace=False))
                expect = deq["features"](feats[sample]).astype(np.float32).mean(axis=2)
                got = deq["mean"](mean[sample]).astype(np.float32)
                if not np.allclose(got, expect, rtol=1e-2, atol=atol, equal_nan=True):
                    problems.append(f"{p}: mean disagrees with the time mean of features")
        except (OSError, KeyError) as e:
            problems.append(f"{p}: unreadable ({e})")
            return problems, []
    return problems, ids


def verify(path, *, probe_rows: int = 16, progress: bool | None = None) -> list[str]:
    """Every problem found in the cache at `path` (empty list = OK). Reads every byte of features
    and mean; `progress`: a bar (None = on a TTY only)."""
    try:
        cache = open_cache(path)
    except CacheError as e:
        return [str(e)]
    from .progress import progress as progress_bar

    problems, seen = [], {}
    rng = np.random.default_rng(0)
    total = cache.stored_dtype.itemsize * len(cache) * (int(np.prod(cache.shape("features")[1:])) + int(np.prod(cache.shape("mean")[1:])))
    with progress_bar(total=total, unit="B", unit_scale=True, desc="verify",
              disable=None if progress is None else not progress) as bar:
        for p, a, b in cache.shards:
            probs, ids = check_shard(p, cache.meta, probe_rows=probe_rows, rng=rng, bar=bar)
            problems += probs
            if ids and list(ids) != list(cache.ids[a:b]):
                problems.append(f"{p}: ids differ from the index")
            for i in ids:
                if i in seen:
                    problems.append(f"{p}: duplicate id {i!r} (also in {seen[i]})")
                else:
                    seen[i] = p
    return problems


def info(path) -> dict:
    """A summary of the cache for people and scripts (JSON-serialisable)."""
    cache = open_cache(path)
    m = cache.meta
    y = cache.label_matrix()
    per_class = y.sum(axis=0)
    per_clip = y.sum(axis=1)
    files = {cache.path.resolve()} | {p.resolve() for p, _, _ in cache.shards}
    folds, counts = np.unique(cache.folds, return_counts=True)
    return {
        "path": str(cache.path), "clips": len(cache), "shards": len(cache.shards),
        "features": list(cache.shape("features")), "mean": list(cache.shape("mean")),
        "dtype": str(cache.stored_dtype), "storage": m.storage, "layers": list(m.layers), "model": m.model,
        "fingerprint": m.fingerprint, "policy": m.policy, "pad30_padding": m.pad30_padding,
        "pooling": m.pooling, "sample_rate": m.sample_rate, "clip_seconds": m.clip_seconds,
        "dataset": m.dataset, "classes": len(m.vocab), "multilabel": m.multilabel, "columns": list(m.columns),
        "labels": {"total": int(per_clip.sum()), "unlabeled_clips": int((per_clip == 0).sum()),
                   "max_per_clip": int(per_clip.max(initial=0)),
                   "classes_without_clips": int((per_class == 0).sum()),
                   "min_per_class": int(per_class.min()) if per_class.size else 0,
                   "max_per_class": int(per_class.max(initial=0))},
        "folds": {int(k): int(v) for k, v in zip(folds, counts)},
        "bytes_on_disk": int(sum(p.stat().st_size for p in files)),
        "checksums": sum(cache.checksummed),  # shards with per-clip checksums (schema 2+)
        "versions": m.versions,
    }
