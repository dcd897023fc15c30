"""Checking: every byte of a shard against its checksums and structure (`check_shard`), a whole
cache (`verify`, `wat-cache verify`) and a summary for people (`info`, `wat-cache info`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .handles import open_h5
from .integrity import corrupt_rows, field_problems, layer_crc32
from .layout import dequantize, row_scale, shard_digest
from .meta import CHECKSUMS, COLUMNS, FIELDS, MEAN_LAYER_CRC, STORED, CacheError, CacheMeta, attr_str
from .read import has_checksums, open_cache, read_field


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
        f = open_h5(p)
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
        damaged = field_problems(p, f)  # every field and attribute against its recorded CRC-32
        problems += list(damaged.values())
        try:
            try:
                ids = list(f["ids"].asstr()[:])
            except UnicodeDecodeError:
                return problems + [f"{p}: ids holds bytes that are not UTF-8"], []
            n = len(ids)
            stored = STORED[m.storage]
            want = {"features": ((n, m.n_layers, m.n_frames, m.dim), stored),
                    "mean": ((n, m.n_layers, m.dim), stored), "fold": ((n,), np.int16),
                    "duration": ((n,), np.float32), "label_indptr": ((n + 1,), np.int32)}
            if m.storage == "int8":
                want.update({f + "_scale": ((m.n_layers, m.dim), np.float32) for f in FIELDS})
            checksummed = has_checksums(f)
            if checksummed:
                want.update({c: ((n,), np.uint32) for c in CHECKSUMS.values()})
            by_layer = MEAN_LAYER_CRC in f
            if by_layer:
                want[MEAN_LAYER_CRC] = ((n, m.n_layers), np.uint32)
            want.update({name: ((n,), COLUMNS[name]) for name in m.columns})
            shapes = []
            for name, (shape, dtype) in want.items():
                d = f[name]
                if d.shape != shape or d.dtype != dtype:
                    shapes.append(f"{p}: {name} is {d.dtype}{list(d.shape)}, expected {np.dtype(dtype)}{list(shape)}")
            if shapes or bad:  # nothing more can be read as this cache's
                return problems + shapes, ids
            if int(f.attrs["n_clips"]) != n or attr_str(f.attrs["digest"]) != shard_digest(ids, m):
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
                deq = {name: lambda x, name=name: dequantize(x, row_scale(name, scale[name])) for name in FIELDS}
                atol = scale["features"] / 2 + scale["mean"] / 2 + 1e-2  # both quantisation errors
            else:
                deq = {name: (lambda x: x) for name in FIELDS}
                atol = 1e-2
            # rows are compared with checksums that are themselves intact (a damaged checksum array is
            # reported above as that field, not as every clip of the shard)
            crc = {k: f[c][:] if checksummed and c not in damaged else None for k, c in CHECKSUMS.items()}
            crc_layers = f[MEAN_LAYER_CRC][:] if by_layer and MEAN_LAYER_CRC not in damaged else None
            step = max(1, (64 << 20) // max(1, feats.dtype.itemsize * int(np.prod(feats.shape[1:]))))
            bad_rows = {"features": [], "mean": []}
            for a in range(0, n, step):
                for name, dset in (("features", feats), ("mean", mean)):
                    block = dset[a:a + step]
                    expected = None if crc[name] is None else crc[name][a:a + step]
                    bad = corrupt_rows(block, expected)
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
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            problems.append(f"{p}: unreadable ({' '.join(str(e).split())[:200]})")
            return problems, []
    return problems, ids


def verify(path, *, probe_rows: int = 16, progress: bool | None = None) -> list[str]:
    """Every problem found in the cache at `path` (empty list = OK). Reads every byte of features
    and mean; `progress`: a bar (None = on a TTY only)."""
    try:
        cache = open_cache(path)
    except CacheError as e:
        return [str(e)]
    from ..clikit.progress import progress as progress_bar

    problems, seen = [], {}
    with open_h5(cache.path) as f:  # the index's fields open_cache does not read (its copies of the scales)
        problems += list(field_problems(cache.path, f).values())
    rng = np.random.default_rng(0)
    total = cache.stored_dtype.itemsize * len(cache) * (int(np.prod(cache.shape("features")[1:])) + int(np.prod(cache.shape("mean")[1:])))
    with progress_bar(total=total, unit="B", unit_scale=True, desc="verify",
              disable=None if progress is None else not progress) as bar:
        for p, a, b in cache.shards:
            probs, ids = check_shard(p, cache.meta, probe_rows=probe_rows, rng=rng, bar=bar)
            problems += probs
            if ids and list(ids) != list(cache.ids[a:b]):
                problems.append(f"{p}: ids differ from the index")
            if cache.path != p:
                problems += _agrees_with_index(cache, p, a, b)
            for i in ids:
                if i in seen:
                    problems.append(f"{p}: duplicate id {i!r} (also in {seen[i]})")
                else:
                    seen[i] = p
    return problems


def _agrees_with_index(cache, p, a: int, b: int) -> list[str]:
    """The per-clip fields the index copied from shard `p` (rows a..b of the cache) must equal the
    shard's: readers use the index's copies, extraction's rerun checks the shard's. A field that
    fails its own checksum is reported by `check_shard`, not compared."""
    s = [q for q, _, _ in cache.shards].index(p)
    with open_h5(cache.path) as index:
        scales = {n: index[n][s] for n in (f + "_scale" for f in FIELDS) if n in index}
    ip = cache._indptr
    want = {"fold": cache.folds[a:b], "duration": cache.durations[a:b],
            "label_indptr": ip[a:b + 1] - ip[a], "label_indices": cache._indices[ip[a]:ip[b]],
            **{name: v[a:b] for name, v in cache.columns.items()}, **scales}
    out = []
    with open_h5(p) as f:
        for name, expected in want.items():
            try:
                got = read_field(p, f, name)
            except CacheError:
                continue
            if got.shape != np.shape(expected) or not np.array_equal(got, expected, equal_nan=got.dtype.kind == "f"):
                out.append(f"{p}: {name} differs from the index {cache.path}'s copy (rerun the wat-extract command "
                           "to rebuild the index)")
    return out


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
        **({"encoder": m.encoder} if m.encoder != "whisper" else {}),  # absent: Whisper (output as before)
    }
