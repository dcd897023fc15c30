"""Synthetic feature caches for tests and benchmarks: the metadata of a made-up encoder and the
writer that turns arrays into shards plus an index, through the real `write_shard`/`build_index`
(the features themselves are each caller's: what a test needs to learn or find differs), and a
subset of a real cache's clips written as a cache of its own."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from wat.data.cache import CacheMeta, build_index, shard_path, write_shard
from wat.data.labels import Vocabulary


def synthetic_meta(*, vocab: Vocabulary, multilabel: bool, n_layers: int, n_frames: int, dim: int,
                   model: str = "synthetic", fingerprint: str = "0" * 16, policy: str = "trim",
                   clip_seconds: float = 5.0, dataset: str = "synthetic", **more) -> CacheMeta:
    """CacheMeta of a made-up encoder; `more`: any other CacheMeta field (pooling, versions, ...)."""
    more.setdefault("pooling", f"mean:{n_frames}")
    more.setdefault("sample_rate", 16000)
    return CacheMeta(model=model, fingerprint=fingerprint, n_layers=n_layers, n_frames=n_frames, dim=dim,
                     policy=policy, clip_seconds=clip_seconds, vocab=vocab, multilabel=multilabel,
                     dataset=dataset, **more)


def write_synthetic_cache(index, meta: CacheMeta, features: np.ndarray | Callable[[int, int], np.ndarray],
                          labels, *, ids=None, folds=None, durations=None, shards: int | list[int] = 2,
                          shard_dir=None) -> list[Path]:
    """Write clips as shards (`shards`: how many, split evenly, or their sizes) in `shard_dir`
    (default: beside `index`) and build `index` over them; returns the shard paths.
    `features` [N, L, T, D], or a function (start, stop) -> those rows (large caches made shard by
    shard); ids default to clip00000...; folds, durations: per clip or None."""
    index = Path(index)
    n = len(labels)
    sizes = shards if isinstance(shards, (list, tuple)) else np.diff(np.linspace(0, n, shards + 1).astype(int))
    if sum(sizes) != n:
        raise ValueError(f"shard sizes {list(sizes)} do not add up to the {n} clips")
    ids = list(ids) if ids is not None else [f"clip{i:05d}" for i in range(n)]
    rows = features if callable(features) else (lambda a, b: features[a:b])
    folder = Path(shard_dir) if shard_dir is not None else index.parent
    folder.mkdir(parents=True, exist_ok=True)
    paths, a = [], 0
    for s, k in enumerate(sizes):
        b = a + int(k)
        paths.append(shard_path(folder, s))
        write_shard(paths[-1], meta, ids[a:b], rows(a, b), labels[a:b],
                    folds=None if folds is None else folds[a:b],
                    durations=None if durations is None else durations[a:b])
        a = b
    build_index(index, paths)
    return paths


def write_subset(cache, rows, index) -> Path:
    """The clips `rows` of an open cache (`open_cache`) as a cache of their own at `index` (features and
    time means, one shard in INDEX.shards), through the real writer; returns `index`."""
    index = Path(index)
    path = shard_path(index.with_suffix(".shards"), 0)
    write_shard(path, cache.meta, [cache.ids[i] for i in rows], cache.read("features", rows),
                [cache.labels[i] for i in rows], cache.folds[rows], cache.durations[rows],
                mean=cache.read("mean", rows))
    build_index(index, [path])
    return index
