"""Reading: `open_cache` checks every shard against the index, then `Cache` reads rows shard by
shard (f16; int8 dequantised) and checks each shard's rows against their checksums once per process."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from . import handles
from .handles import forget, handle, open_h5, verify_key
from .integrity import ATTRS, FIELD_CRC, FIX, SHARD_CHECKS, check_field, corrupt_message, corrupt_rows, raw
from .layout import dequantize, row_scale, shard_digest
from .meta import CHECKSUMS, FIELDS, MEAN_LAYER_CRC, STORED, CacheError, CacheMeta, CorruptCacheError, attr_str


def read_column(dset: h5py.Dataset) -> np.ndarray:
    return np.array(dset.asstr()[:], dtype=str) if h5py.check_string_dtype(dset.dtype) else dset[:]


def read_field(path, f: h5py.File, name: str) -> np.ndarray:
    """Dataset `name` of the open file `f` (at `path`), checked against the file's field checksums
    (`integrity.check_field`; files written before them: not), strings decoded. Whatever is wrong
    with it (missing, unreadable, changed bytes, not UTF-8) is one CacheError naming file and field."""
    try:
        data = raw(f[name])
    except KeyError:
        raise CacheError(f"{path}: dataset {name!r} is missing") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CorruptCacheError(f"{path}: {name} is unreadable ({' '.join(str(e).split())[:200]}): {FIX}") from None
    check_field(path, f, name, data)
    if data.dtype == object:
        try:
            return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in data.reshape(-1)], dtype=str)
        except UnicodeDecodeError:
            raise CorruptCacheError(f"{path}: {name} holds bytes that are not UTF-8: {FIX}") from None
    return data


def check_labels(path, indptr: np.ndarray, indices: np.ndarray, n: int, n_classes: int) -> None:
    """The label CSR must be one row per clip, in order, with class indices in range (files
    without field checksums are checked only this way; a flipped index used to be a traceback)."""
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != len(indices) or \
            (np.diff(indptr.astype(np.int64)) < 0).any():
        raise CorruptCacheError(f"{path}: label_indptr is not one row of labels per clip: {FIX}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_classes):
        raise CorruptCacheError(f"{path}: label_indices holds classes outside 0..{n_classes - 1}: {FIX}")


def shard_record(path: Path) -> tuple[CacheMeta, int, str, bool, str]:
    """(meta, clips, digest, has checksums, its field checksums as recorded: "" for none) of a
    shard file; its attributes are checked against their checksum."""
    with open_h5(path) as f:
        kind = attr_str(f.attrs.get("kind", ""))
        if kind != "shard":
            raise CacheError(f"{path}: not a shard file (attribute kind is {kind!r})")
        check_field(path, f, ATTRS)
        try:
            meta = CacheMeta.from_attrs(f.attrs)
            return (meta, int(f.attrs["n_clips"]), attr_str(f.attrs["digest"]), has_checksums(f),
                    attr_str(f.attrs.get(FIELD_CRC, "")))
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise CacheError(f"{path}: unreadable shard attributes ({e})") from None


def has_checksums(f: h5py.File) -> bool:
    return all(name in f for name in CHECKSUMS.values())


class Cache:
    """An opened, validated cache. Picklable: it holds paths, and files are opened per process."""

    def __init__(self, path, meta, ids, label_indptr, label_indices, folds, durations, shards, checksummed=None,
                 columns=None, shard_digests=()):
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
        self.shard_digests: tuple[str, ...] = tuple(shard_digests)  # as the index records them
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
        out = {}
        for f in FIELDS:  # every value of a shard depends on them: checked against their checksums
            scales = [read_field(p, handle(str(p)), f + "_scale") for p, _, _ in self.shards]
            for (p, _, _), sc in zip(self.shards, scales):
                if sc.shape != (self.meta.n_layers, self.meta.dim) or not np.isfinite(sc).all() or (sc < 0).any():
                    raise CorruptCacheError(f"{p}: {f}_scale is not {self.meta.n_layers} x {self.meta.dim} finite "
                                            f"scales >= 0: {FIX}")
            out[f] = np.stack(scales)
        return out

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

    @cached_property
    def content_digest(self) -> str:
        """sha256 of what this cache holds as its index lists it: the meta's digest (model
        fingerprint, policy, dims, layers, storage, vocabulary...), every clip's id, labels, fold and
        duration, the optional columns, and every shard's digest. A resumed training run compares it
        with the one it started on (`wat.train`): a cache re-extracted another way at the same path
        differs."""
        import hashlib

        h = hashlib.sha256(self.meta.digest().encode())
        for a in (self.ids.astype(str), self._indptr.astype(np.int64), self._indices.astype(np.int64),
                  self.folds.astype(np.int64), self.durations.astype(np.float32),
                  *(np.asarray(self.columns[k]).astype(str) if np.asarray(self.columns[k]).dtype.kind in "OUS"
                    else np.asarray(self.columns[k]) for k in sorted(self.columns))):
            h.update(str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
        h.update("\0".join(self.shard_digests).encode())
        return h.hexdigest()

    def identity(self) -> dict:
        """What a result computed from this cache depends on, for people and for comparison: model
        fingerprint, policy (and pad30 padding), schema version, storage, blocks, clips, and
        `content_digest`."""
        m = self.meta
        return {"fingerprint": m.fingerprint, "policy": m.policy, "pad30_padding": m.pad30_padding,
                "schema": int(m.to_attrs()["schema_version"]), "storage": m.storage, "layers": list(m.layers),
                "clips": len(self), "content": self.content_digest}

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
            path = self.shards[shard][0]
            self._crc[key] = read_field(path, handle(str(path)), CHECKSUMS[field])
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
    """Open an index file or a single shard; every shard is checked before anything is read, and
    every field read here (ids, labels, folds, durations, columns, the shard records, the
    attributes) against the file's field checksums (`integrity.seal`)."""
    path = Path(path)
    with open_h5(path) as f:
        kind = attr_str(f.attrs.get("kind", ""))
        if kind not in ("index", "shard"):
            raise CacheError(f"{path}: not a wat cache file (attribute kind is {kind!r}, not index or shard)")
        check_field(path, f, ATTRS)
        try:
            meta = CacheMeta.from_attrs(f.attrs)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
        ids = read_field(path, f, "ids")
        indptr, indices = read_field(path, f, "label_indptr"), read_field(path, f, "label_indices")
        check_labels(path, indptr, indices, len(ids), len(meta.vocab))
        folds, durs = read_field(path, f, "fold"), read_field(path, f, "duration")
        if folds.shape != ids.shape or durs.shape != ids.shape:
            raise CorruptCacheError(f"{path}: fold/duration do not hold one entry per clip: {FIX}")
        missing = [name for name in meta.columns if name not in f]
        if missing:
            raise CacheError(f"{path}: optional column {missing[0]!r} named in the attributes is missing")
        columns = {name: read_field(path, f, name) for name in meta.columns}
        if any(len(v) != len(ids) for v in columns.values()):
            raise CacheError(f"{path}: an optional column does not have one entry per clip")
        if kind == "shard":
            if int(f.attrs["n_clips"]) != len(ids) or attr_str(f.attrs["digest"]) != shard_digest(ids, meta):
                raise CacheError(f"{path}: shard content does not match its own digest")
            records = [(path, len(ids), attr_str(f.attrs["digest"]), None)]
            checksummed = [has_checksums(f)]
        else:
            paths, rows = read_field(path, f, "shard_paths"), read_field(path, f, "shard_rows")
            digests = read_field(path, f, "shard_digests")
            checks = read_field(path, f, SHARD_CHECKS) if SHARD_CHECKS in f else [None] * len(paths)
            if not len(paths) == len(rows) == len(digests) == len(checks):
                raise CorruptCacheError(f"{path}: the shard records do not agree in length: {FIX}")
            records = [(path.parent / p, int(r), d, c) for p, r, d, c in zip(paths, rows, digests, checks)]
    shards, start = [], 0
    if kind == "index":
        checksummed = []
    for p, rows, digest, checks in records:
        forget(str(p))  # a re-written shard must not be read through an old handle
        if kind == "index":
            m, n, d, crc, sealed = shard_record(p)
            checksummed.append(crc)
            bad = meta.incompatibilities(m, same_cache=True)
            if bad:
                raise CacheError(f"{p}: incompatible with index {path}: {'; '.join(bad)}")
            if n != rows:
                raise CacheError(f"{p}: {n} clips, index {path} expects {rows}")
            if d != digest:
                raise CacheError(f"{p}: not the shard the index {path} was built from (digest differs)")
            if checks is not None and sealed != checks:  # e.g. its field checksums removed or rewritten
                raise CorruptCacheError(f"{p}: its field checksums ({FIELD_CRC}) are not those the index {path} "
                                        f"was built with: {FIX}")
        shards.append((p, start, start + rows))
        start += rows
    if start != len(ids):
        raise CacheError(f"{path}: shards hold {start} clips, index lists {len(ids)}")
    return Cache(path, meta, ids, indptr, indices, folds, durs, shards, checksummed, columns,
                 [r[2] for r in records])
