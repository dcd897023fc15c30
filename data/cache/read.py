"""Reading: `open_cache` checks every shard against the index, then `Cache` reads rows shard by
shard (f16; int8 dequantised) and checks each shard's rows against their checksums once per process."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from . import handles
from .handles import forget, handle, open_h5, verify_key
from .integrity import corrupt_message, corrupt_rows
from .layout import dequantize, row_scale, shard_digest
from .meta import CHECKSUMS, FIELDS, MEAN_LAYER_CRC, STORED, CacheError, CacheMeta, CorruptCacheError, attr_str


def read_column(dset: h5py.Dataset) -> np.ndarray:
    return np.array(dset.asstr()[:], dtype=str) if h5py.check_string_dtype(dset.dtype) else dset[:]


def shard_record(path: Path) -> tuple[CacheMeta, int, str, bool]:
    """(meta, clips, digest, has checksums) of a shard file."""
    with open_h5(path) as f:
        if attr_str(f.attrs.get("kind", "")) != "shard":
            raise CacheError(f"{path}: not a shard file")
        try:
            meta = CacheMeta.from_attrs(f.attrs)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
        return meta, int(f.attrs["n_clips"]), attr_str(f.attrs["digest"]), has_checksums(f)


def has_checksums(f: h5py.File) -> bool:
    return all(name in f for name in CHECKSUMS.values())


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
        return handle(str(self.shards[shard][0]))[field]

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(STORED[self.meta.storage])

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
        return dequantize(rows, row_scale(field, self.scales(field)[shard]))

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
            rows = read_rows(self.dataset(int(s), field), uniq)
            if not self.is_verified(int(s), field):  # random access: check what was read (as stored)
                self.check_rows(int(s), field, uniq, rows)
            out[where] = self.dequantize(field, rows, int(s))[inverse]
        return out

    def close(self) -> None:
        for p, _, _ in self.shards:
            forget(str(p))

    # ------------------------------------------------------------ integrity (see the module doc)

    def bad_rows(self, shard: int, field: str, rows, block: np.ndarray) -> np.ndarray:
        """Positions in `block` that are not what extraction wrote (`corrupt_rows`). `block` holds
        rows `rows` (local row numbers: an array, or an int for rows rows..rows+len(block)) of
        shard `shard`'s `field`."""
        if not self.checksummed[shard]:
            return corrupt_rows(block, None)
        key = (shard, field)
        if key not in self._crc:
            self._crc[key] = self.dataset(shard, CHECKSUMS[field])[:]
        crc = self._crc[key]
        return corrupt_rows(block, crc[rows] if isinstance(rows, np.ndarray) else crc[rows:rows + len(block)])

    def check_rows(self, shard: int, field: str, rows, block: np.ndarray) -> None:
        """Raise CorruptCacheError naming the clips of `block` that fail `bad_rows`."""
        bad = self.bad_rows(shard, field, rows, block)
        if len(bad):
            local = rows[bad] if isinstance(rows, np.ndarray) else rows + bad
            raise CorruptCacheError(self._corrupt_message(shard, field, local))

    def _corrupt_message(self, shard: int, field: str, local) -> str:
        path, first, _ = self.shards[shard]
        return corrupt_message(path, field, [self.ids[first + int(i)] for i in local], self.checksummed[shard])

    def layer_checkable(self, field: str) -> bool:
        """True when a read of some layers of `field` can be checked on its own (`check_layer_block`):
        `mean`, every shard with per-layer checksums. Otherwise a reader of part of a row checks the
        whole field first (`verify_field`)."""
        return field == "mean" and all(self._layer_checksummed)

    @cached_property
    def _layer_checksummed(self) -> list[bool]:
        return [MEAN_LAYER_CRC in handle(str(p)) for p, _, _ in self.shards]

    def _verify_key(self, shard: int, field: str) -> tuple:
        return verify_key(self.shards[shard][0], field)

    def is_verified(self, shard: int, field: str) -> bool:
        return self._verify_key(shard, field) in handles.VERIFIED

    def mark_verified(self, shard: int, field: str) -> None:
        handles.VERIFIED.add(self._verify_key(shard, field))

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


def read_rows(dset: h5py.Dataset, rows: np.ndarray, max_gap: int = 8) -> np.ndarray:
    """Sorted unique rows, read as few contiguous slices (small gaps are read and dropped)."""
    out = np.empty((len(rows),) + dset.shape[1:], dset.dtype)
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        a, b = int(rows[run[0]]), int(rows[run[-1]]) + 1
        out[run] = dset[a:b][rows[run] - a] if b - a != len(run) else dset[a:b]
    return out


def open_cache(path) -> Cache:
    """Open an index file or a single shard; every shard is checked before anything is read."""
    path = Path(path)
    with open_h5(path) as f:
        kind = attr_str(f.attrs.get("kind", ""))
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
            columns = {name: read_column(f[name]) for name in meta.columns}
        except KeyError as e:
            raise CacheError(f"{path}: optional column {e.args[0]!r} named in the attributes is missing") from None
        if any(len(v) != len(ids) for v in columns.values()):
            raise CacheError(f"{path}: an optional column does not have one entry per clip")
        if kind == "shard":
            if int(f.attrs["n_clips"]) != len(ids) or attr_str(f.attrs["digest"]) != shard_digest(ids, meta):
                raise CacheError(f"{path}: shard content does not match its own digest")
            records = [(path, len(ids), attr_str(f.attrs["digest"]))]
            checksummed = [has_checksums(f)]
        else:
            records = [(path.parent / p, int(r), d) for p, r, d in zip(
                f["shard_paths"].asstr()[:], f["shard_rows"][:], f["shard_digests"].asstr()[:])]
    shards, start = [], 0
    if kind == "index":
        checksummed = []
    for p, rows, digest in records:
        forget(str(p))  # a re-written shard must not be read through an old handle
        if kind == "index":
            m, n, d, crc = shard_record(p)
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
