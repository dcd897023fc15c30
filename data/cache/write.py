"""Writing: one shard (`write_shard`) and the index over shards (`build_index`), each atomically
and with a write guard so that a full disk is an OSError, not a crash in HDF5's teardown."""
from __future__ import annotations

import io
import os
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..files import atomic_path
from .handles import open_h5
from .integrity import SHARD_CHECKS, gather_crc32, layer_crc32, nonfinite_rows, row_crc32_async, seal
from .layout import features_chunks, int8_scale, quantize, row_scale, shard_digest
from .meta import CHECKSUMS, COLUMNS, FIELDS, MEAN_LAYER_CRC, STORED, STR, CacheError, CacheMeta
from .read import check_labels, read_field, shard_record


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
    bad = nonfinite_rows(features)  # a NaN in a cache poisons every model trained on it: refuse here
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
        f_scale, m_scale = int8_scale(features, (0, 2)), int8_scale(mean, (0,))
        stored = {"features": quantize(features, row_scale("features", f_scale)),
                  "mean": quantize(mean, m_scale), "features_scale": f_scale, "mean_scale": m_scale}
    else:
        stored = {"features": features.astype(np.float16, copy=False), "mean": mean.astype(np.float16)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # checksums over the arrays that go to disk (int8 storage: the quantised values), computed while
    # they are written; their datasets are made first (as zeros, filled in last), as they always were
    crcs = {name: row_crc32_async(stored[name]) for name in FIELDS}
    t_crc = time.perf_counter()
    mean_layers = layer_crc32(stored["mean"])  # small: n x L rows of D values
    t_check += time.perf_counter() - t_crc
    with _atomic_h5(path) as f:
        f.attrs.update(meta.to_attrs())
        f.attrs.update(kind="shard", n_clips=n, digest=shard_digest(ids, meta))
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STR)
        for name in FIELDS:
            f.create_dataset(CHECKSUMS[name], data=np.zeros(n, np.uint32))
        f.create_dataset(MEAN_LAYER_CRC, data=mean_layers)
        f.create_dataset("features", data=stored.pop("features"), chunks=features_chunks(features.shape))
        f.create_dataset("mean", data=stored.pop("mean"), chunks=(min(256, n), 1, meta.dim))
        t_crc = time.perf_counter()
        for name in FIELDS:
            f[CHECKSUMS[name]][...] = gather_crc32(crcs[name])
        t_check += time.perf_counter() - t_crc
        for name, data in stored.items():  # the int8 scales
            f.create_dataset(name, data=data)
        f.create_dataset("label_indptr", data=indptr)
        f.create_dataset("label_indices", data=indices)
        f.create_dataset("fold", data=folds)
        f.create_dataset("duration", data=durations)
        for name, values in columns.items():
            f.create_dataset(name, data=values, dtype=COLUMNS[name])
        seal(f)  # last: the CRC-32 of every other field and of the attributes
    if timing is not None:
        timing["checksum"] = timing.get("checksum", 0.0) + t_check


def _check_columns(path, meta: CacheMeta, columns: dict, n: int) -> dict:
    if set(columns) != set(meta.columns):
        raise CacheError(f"{path}: columns {sorted(columns)} given, meta says {list(meta.columns)}")
    out = {}
    for name, values in columns.items():
        if COLUMNS[name] == STR:
            values = np.array([str(v) for v in values], dtype=object)
        else:
            values = np.asarray(values, COLUMNS[name])
        if values.shape != (n,):
            raise CacheError(f"{path}: column {name!r} has shape {values.shape}, expected ({n},)")
        out[name] = values
    return out


def build_index(index_path, shard_paths) -> None:
    """Write the index file over the given shards (in that order), atomically."""
    index_path = Path(index_path)
    root = index_path.parent.resolve()
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise CacheError(f"{index_path}: no shards to index")
    records = [shard_record(p) for p in shard_paths]
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
    for p in shard_paths:  # every field copied is checked first: a damaged one is never sealed anew
        with open_h5(p) as f:
            for name in cols:
                cols[name].append(read_field(p, f, name))
            ids.extend(read_field(p, f, "ids"))
            for name, got in scales.items():
                got.append(read_field(p, f, name))
            ip, ix = read_field(p, f, "label_indptr").astype(np.int64), read_field(p, f, "label_indices")
            n_meta = len(meta.vocab)
            check_labels(p, ip, ix, len(ip) - 1, n_meta)
            indptr.append(ip[1:] + offset)
            offset += int(ip[-1])
            indices.append(ix)
            folds.append(read_field(p, f, "fold"))
            durs.append(read_field(p, f, "duration"))
    if len(set(ids)) != len(ids):
        raise CacheError(f"{index_path}: clip ids repeat across shards")
    stored = STORED[meta.storage]
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
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STR)
        f.create_dataset("label_indptr", data=np.concatenate(indptr).astype(np.int32))
        f.create_dataset("label_indices", data=np.concatenate(indices).astype(np.int32))
        f.create_dataset("fold", data=np.concatenate(folds).astype(np.int16))
        f.create_dataset("duration", data=np.concatenate(durs).astype(np.float32))
        for name, parts in cols.items():
            values = np.concatenate(parts)
            f.create_dataset(name, data=values.astype(object) if COLUMNS[name] == STR else values,
                             dtype=COLUMNS[name])
        f.create_dataset("shard_paths", data=np.array(rel, dtype=object), dtype=STR)
        f.create_dataset("shard_rows", data=np.asarray(rows, np.int64))
        f.create_dataset("shard_digests", data=np.array([r[2] for r in records], dtype=object), dtype=STR)
        for name, got in scales.items():
            f.create_dataset(name, data=np.stack(got))
        f.create_dataset(SHARD_CHECKS, data=np.array([r[4] for r in records], dtype=object), dtype=STR)
        seal(f)  # last: the CRC-32 of every field copied above and of the attributes
