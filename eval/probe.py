"""Layer-wise linear probing on the cache's time-mean features (paper figures 1-3).

Every (feature, fold) pair is one task: the task reads only the columns it needs from the
`mean` dataset through the dask view (one layer for a layer probe), standardises them, fits a
linear classifier and returns test-set probabilities. Tasks run in `jobs` processes or on a dask
cluster, so memory stays bounded by one layer's matrix per worker.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from argparse import ArgumentTypeError

from wat.data.cache import Cache, CacheError, CacheMeta, open_cache
from wat.data.clikit.args import comma_list, layers_text

from . import fusion as fusions, logistic, metrics, probe_kinds
from wat.data.errors import WatError

FUSIONS = fusions.KINDS
log = logging.getLogger(__name__)


class ProbeError(WatError):
    """Inputs that cannot be probed as asked (mismatched caches, bad layer list, no labels)."""


@dataclass
class ProbeOptions:
    layers: list | None = None           # encoder blocks (ints) and/or slices of them; None = all
    fusion: tuple[str, ...] = FUSIONS    # baselines besides the single layers
    folds: int | None = None             # K-fold when the cache has no folds (None: 5); must match a cache's own
    jobs: int = 1                        # worker processes
    scheduler: str | None = None         # address of a running dask scheduler (overrides jobs)
    C: float = logistic.DEFAULT_C        # linear probe: inverse L2 strength (sklearn convention)
    max_iter: int = logistic.DEFAULT_MAX_ITER  # linear probe: lbfgs iterations at most
    tol: float = logistic.DEFAULT_TOL    # linear probe: a fit stops when every entry of its gradient is below (sklearn's tol)
    seed: int = 0
    device: str | None = None            # device of the torch fits (multi-label linear, mlp, knn); None = cuda when present
    groups: int | None = None            # k of the `_g` fusions (time groups whose means are concatenated); None: the
                                         # seed's 5, skipped with a note on fewer frames (a k given is refused there)
    align_to: int | None = None          # cross-cache fusions: the cache (position) whose frames others follow; None:
                                         # the first (None rather than 0 so that one given where no fusion uses it is refused)
    match_width: bool = False            # cross-cache fusions: interpolate widths to that cache's first
    probes: tuple = ("linear",)          # probe kinds (`probe_kinds`): names (their benchmark's defaults) or ProbeKind instances


@dataclass(frozen=True)
class Feature:
    """What one probe sees: layer(s) of one cache, or a fusion over layers and/or caches."""
    kind: str                             # "layer" | one of FUSIONS
    caches: tuple[int, ...]
    layers: tuple[tuple[int, ...], ...]   # per cache in `caches`
    fused: fusions.Fused = fusions.Fused()  # fusions: time groups, aligned frames, matched width

    @property
    def name(self) -> str:
        c = "+".join(map(str, self.caches))
        return f"{c}:{self.layers[0][0]}" if self.kind == "layer" else f"{self.kind}[{c}]"


@dataclass
class FeatureResult:
    feature: Feature
    fold_scores: list[float]
    fold_macro_f1: list[float]
    classwise_f1: np.ndarray              # [C] on the pooled test predictions, NaN where undefined
    classwise_ap: np.ndarray | None       # [C] multi-label only, NaN where no positives
    probe: str = "linear"                 # the probe kind (`probe_kinds`) that scored it

    @property
    def score(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def score_std(self) -> float:
        return float(np.std(self.fold_scores))

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.fold_macro_f1))


@dataclass
class ProbeReport:
    metric: str                           # "accuracy" | "mAP"
    protocol: str                         # "5-fold (cache folds)", "eval cache", ...
    n_folds: int
    caches: list[str]
    eval_caches: list[str]
    keys: tuple[str, ...]
    names: tuple[str, ...]
    chance: float
    results: list[FeatureResult] = field(default_factory=list)
    skipped_classes: list[int] = field(default_factory=list)   # no positives in some test fold
    metas: list[CacheMeta] = field(default_factory=list)       # of `caches`: labels for figures and reports
    n_clips: int = 0                                           # clips probed (train caches)
    n_eval_clips: int = 0                                      # clips tested (eval caches; 0 = K-fold)
    notes: list[str] = field(default_factory=list)             # fusions skipped and why, time alignment
    probes: tuple[str, ...] = ("linear",)                      # probe kinds run, in order; the first is the primary

    def layer_results(self, cache: int = 0, probe: str | None = None) -> list[FeatureResult]:
        """Per-layer results of one probe kind (None: the primary, `probes[0]`)."""
        probe = probe or self.probes[0]
        return [r for r in self.results
                if r.feature.kind == "layer" and r.feature.caches == (cache,) and r.probe == probe]

    def fusion_results(self, probe: str | None = None) -> list[FeatureResult]:
        probe = probe or self.probes[0]
        return [r for r in self.results if r.feature.kind != "layer" and r.probe == probe]

    def best(self, probe: str | None = None) -> FeatureResult:
        probe = probe or self.probes[0]
        return max((r for r in self.results if r.feature.kind == "layer" and r.probe == probe), key=lambda r: r.score)


# ---------------------------------------------------------------- inputs

def _open(paths) -> list[Cache]:
    return [p if isinstance(p, Cache) else open_cache(p) for p in paths]


def check_distinct(features, what: str = "--features") -> None:
    """Refuse a cache (path or Cache) given twice: it was probed concatenated with itself, as if it
    were a second encoder. Before any cache is opened."""
    paths = [os.path.realpath(f.path if isinstance(f, Cache) else f) for f in features]
    twice = next((f for f, r in zip(features, paths) if paths.count(r) > 1), None)
    if twice is not None:
        raise ProbeError(f"{what} {twice.path if isinstance(twice, Cache) else twice}: the same cache given twice")


def check_aligned(caches: list[Cache], what: str = "--features") -> None:
    """Several caches are fused clip by clip: same ids in the same order, same labels."""
    first = caches[0]
    for c in caches[1:]:
        if len(c) != len(first) or not np.array_equal(c.ids, first.ids):
            n_diff = (sum(a != b for a, b in zip(c.ids, first.ids)) + abs(len(c) - len(first)))
            raise ProbeError(f"{what}: {c.path} and {first.path} do not hold the same clip ids in the same "
                             f"order ({len(c)} vs {len(first)} clips, {n_diff} positions differ)")
        if c.meta.vocab != first.meta.vocab or c.labels != first.labels:
            raise ProbeError(f"{what}: {c.path} and {first.path} have different labels")


def _check_eval(train: list[Cache], test: list[Cache]) -> None:
    if len(test) != len(train):
        raise ProbeError(f"{len(train)} --features but {len(test)} --eval-features: give one eval cache per train cache")
    check_aligned(test, "--eval-features")
    for a, b in zip(train, test):
        bad = a.meta.incompatibilities(b.meta)
        if bad:
            raise ProbeError(f"eval cache {b.path} does not match {a.path}: {'; '.join(bad)}")


def select_layers(caches: list[Cache], layers) -> list[tuple[int, ...]]:
    """Per cache, the encoder blocks to probe. Layers are named by encoder block everywhere (a
    `--layers 8:32` cache probes as layers 8..31), whatever position they have in the cache.
    `layers`: None (all), or blocks (ints) and slices of blocks (`cliargs.layer_list`; an open end
    is the cache's first or last block); a block the cache lacks or named twice is refused."""
    out = []
    for c in caches:
        have = c.meta.layers
        if layers is None:
            out.append(have)
            continue
        blocks, bad = [], []
        for item in layers:
            s = item if isinstance(item, slice) else slice(int(item), int(item) + 1)
            start = have[0] if s.start is None else s.start
            stop = have[-1] + 1 if s.stop is None else s.stop
            # bounds first: a range is expanded only within the cache's span (never 0:10**12)
            if start < have[0] or stop > have[-1] + 1 or start >= stop or not set(range(start, stop)) <= set(have):
                bad.append(layers_text([item]))
            else:
                blocks += range(start, stop)
        if bad:
            held = f"{have[0]}..{have[-1]}" if len(have) == have[-1] - have[0] + 1 else str(list(have))
            raise ProbeError(f"layer(s) [{', '.join(bad)}] out of range: {c.path} holds layers {held}")
        twice = sorted(b for b, n in Counter(blocks).items() if n > 1)
        if twice:
            raise ProbeError(f"--layers names layer(s) {twice} more than once")
        out.append(tuple(blocks))
    return out


def features_to_probe(layers: list[tuple[int, ...]], fusion, metas=None,
                      opts: ProbeOptions | None = None) -> tuple[list[Feature], list[str]]:
    """Every single layer, then the fusions (`wat.eval.fusion.plan`), and notes on fusions skipped."""
    bad = set(fusion) - set(FUSIONS)
    if bad:
        raise ProbeError(f"unknown fusion {sorted(bad)}; choose from none, {', '.join(FUSIONS)}")
    opts = replace(opts or ProbeOptions(), fusion=tuple(fusion))
    check_fusion_options(len(layers), opts)   # probe() ran it already; a direct caller has not
    out = [Feature("layer", (c,), ((l,),)) for c, ls in enumerate(layers) for l in ls]
    try:
        planned, notes = fusions.plan(metas, layers, fusion, groups=opts.groups, reference=opts.align_to or 0,
                                      match_width=opts.match_width)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    out += [Feature(kind, caches, ls, how) for kind, caches, ls, how in planned]
    return out, notes


def check_fusion_options(n_caches: int, opts: ProbeOptions) -> None:
    """Refuse (ProbeError) `groups`, `align_to` or `match_width` given where no fusion of `opts.fusion` acts on
    them, and an `align_to` that is not one of the `n_caches`. Refused rather than warned about: they used to be
    ignored silently (match_width with one cache, align_to with no fusion), so the run was not the one asked
    for while its report listed the option. wat-probe reports this very error (no second copy in the CLI)."""
    several = n_caches > 1
    grouped = [k for k in opts.fusion if k.endswith("_g")]
    means = [k for k in opts.fusion if k != "concat"]    # concat keeps every layer's own width
    named = f"--fusion {','.join(opts.fusion) or 'none'}"
    if opts.align_to is not None and not 0 <= opts.align_to < n_caches:
        raise ProbeError(f"--align-to {opts.align_to + 1}: " + (f"only {n_caches} --features given" if opts.align_to > 0
                                                              else "the --features are counted from 1"))
    if opts.groups is not None and not grouped:
        raise ProbeError(f"--groups {opts.groups}: only the _g fusions (mean_g, avg_g) cut frames into time groups; "
                         f"{named} has none")
    if opts.match_width and not (several and means):
        raise ProbeError("--match-width interpolates the widths of several caches: give two --features or more"
                         if not several else f"--match-width: {named} has no fusion of layer means whose widths it "
                         "would match")
    if opts.align_to is not None and not (several and (grouped or (opts.match_width and means))):
        shown = f"--align-to {opts.align_to + 1}"
        raise ProbeError(f"{shown} picks the cache the others follow in fusions across caches: give two --features "
                         "or more" if not several else f"{shown}: {named} aligns no caches (the _g fusions align "
                         "frames to it, --match-width widths)")


def targets(cache: Cache) -> np.ndarray:
    """Single-label: [N] class indices; multi-label: [N, C] bool."""
    if cache.meta.multilabel:
        return cache.label_matrix()
    bad = [cache.ids[i] for i, lab in enumerate(cache.labels) if len(lab) != 1]
    if bad:
        raise ProbeError(f"{cache.path}: single-label cache with {len(bad)} clip(s) not having exactly one "
                         f"label (e.g. {', '.join(bad[:3])})")
    return np.array([lab[0] for lab in cache.labels], np.int64)


def make_folds(cache: Cache, y: np.ndarray, k: int | None, seed: int) -> tuple[np.ndarray, str]:
    """Fold id per clip: the cache's own folds when every clip has one, else a seeded K-fold split
    (k None: 5). A `k` given that differs from the cache's own fold count is refused (as wat-train
    refuses it): it used to run the cache's folds and exit 0."""
    f = np.asarray(cache.folds)
    if len(f) and (f >= 0).all() and len(np.unique(f)) > 1:
        held = np.unique(f)
        if k is not None and k != len(held):
            raise ProbeError(f"--folds {k}: {cache.path} has {len(held)} folds of its own ({', '.join(map(str, held))}); "
                             f"give --folds {len(held)} or leave --folds out")
        return f.astype(np.int64), f"{len(held)}-fold (cache folds)"
    k = 5 if k is None else k
    if k < 2:
        raise ProbeError("--folds must be at least 2 (or give --eval-features)")
    from sklearn.model_selection import KFold, StratifiedKFold
    if y.ndim == 1 and np.bincount(y).min(initial=k) >= k:
        split = StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    else:
        split = KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)))
    out = np.empty(len(y), np.int64)
    for i, (_, test) in enumerate(split):
        out[test] = i
    return out, f"{k}-fold (seeded split)"


def check_splits(y: np.ndarray, y_test: np.ndarray, folds: list, fold_ids, multilabel: bool, names) -> None:
    """Refuse, before any fit, splits a probe cannot learn or score: training clips of one class
    only (single-label: sklearn raised mid-run), or without any positive label, and test clips
    without any positive label (multi-label: no AP to average). One line naming the fold."""
    for k, (tr, te) in enumerate(folds):
        where = "the training clips" if fold_ids is None else f"fold {fold_ids[k]}'s training clips (the other folds)"
        test = "the eval clips" if fold_ids is None else f"fold {fold_ids[k]}'s clips"
        if multilabel:
            if not y[tr].any():
                raise ProbeError(f"{where} carry no label at all: nothing to learn")
            if not y_test[te].any():
                raise ProbeError(f"{test} carry no label at all: no class can be scored (too few labelled clips)")
        else:
            present = np.unique(y[tr])
            if len(present) < 2:
                whole = len(np.unique(y)) < 2
                raise ProbeError((f"every clip is of class {names[present[0]]!r}" if whole else
                                  f"{where} are all of class {names[present[0]]!r}")
                                 + ": a probe needs clips of at least two classes")


# ---------------------------------------------------------------- one task (runs in a worker)

def load_matrix(caches: list[Cache], feat: Feature) -> np.ndarray:
    """[N, D'] float32 of one feature, read through the dask view of the `mean` dataset."""
    from wat.data.cache import dask_view

    if feat.kind not in ("layer", "concat"):
        return fusions.matrix(caches, feat.kind, feat.caches, feat.layers, feat.fused)
    parts = []
    for c, layers in zip(feat.caches, feat.layers):
        v = dask_view(caches[c], "mean")
        pos = [caches[c].meta.layers.index(l) for l in layers]  # encoder block -> position in the cache
        sel = v[:, pos[0], :] if len(pos) == 1 else v[:, pos, :]
        if feat.kind == "concat":
            x = sel.reshape(sel.shape[0], -1)
        else:
            x = sel
        parts.append(x.astype(np.float32).compute(scheduler="synchronous"))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def fit_task(train: list[Cache], test: list[Cache] | None, feat: Feature, tr_idx, te_idx, y,
             multilabel: bool, n_classes: int, opts: ProbeOptions,
             kind: probe_kinds.ProbeKind | None = None) -> np.ndarray:
    """Probabilities [len(te_idx), C] of one probe of `kind` (None: linear). `test` None: test rows
    come from the train caches."""
    x = load_matrix(train, feat)
    xtr = x[tr_idx]
    xte = (x if test is None else load_matrix(test, feat))[te_idx]
    del x
    kind = kind or probe_kinds.LinearProbe()
    return kind.fit_predict(xtr, y[tr_idx], xte, n_classes=n_classes, multilabel=multilabel, opts=opts)


def _call(i, args):
    return i, fit_task(*args)


def _worker_init():
    from threadpoolctl import threadpool_limits
    import torch

    torch.set_num_threads(1)
    threadpool_limits(1)


@contextmanager
def _one_thread():
    """One BLAS/torch thread per fit: extra threads oversubscribe a shared machine and slow small
    fits many times over; parallelism comes from running several fits (pool workers get one thread
    in `_worker_init`, dask's nanny starts its workers with one)."""
    from threadpoolctl import threadpool_limits
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


def run_tasks(tasks: list[tuple], opts: ProbeOptions):
    """Yield (task index, result) in completion order: dask cluster, process pool, or in-process."""
    from wat.data.clikit.progress import progress

    bar = progress(total=len(tasks), desc="probe", unit="fit")
    if opts.scheduler:
        from distributed import Client, as_completed
        with Client(opts.scheduler) as client:
            futures = [client.submit(_call, i, t, pure=False) for i, t in enumerate(tasks)]
            for fut in as_completed(futures):
                yield fut.result()
                bar.update()
    elif opts.jobs > 1 and len(tasks) > 1:
        # forked workers start at once with everything imported; spawned ones (loky) re-import
        # torch/sklearn/dask first, seconds per worker. Workers run single-threaded (_worker_init).
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(opts.jobs, len(tasks)), mp_context=ctx, initializer=_worker_init) as pool:
            futures = [pool.submit(_call, i, t) for i, t in enumerate(tasks)]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
                    bar.update()
            finally:
                for fut in futures:
                    fut.cancel()
    else:
        with _one_thread():
            for i, t in enumerate(tasks):
                yield _call(i, t)
                bar.update()
    bar.close()


# ---------------------------------------------------------------- the whole probe

def probe(features, eval_features=None, opts: ProbeOptions | None = None) -> ProbeReport:
    """Probe every selected layer (and the fusion baselines) of one or more aligned caches."""
    opts = opts or ProbeOptions()
    try:
        kinds = probe_kinds.resolve(opts.probes)
    except probe_kinds.ProbeKindError as e:
        raise ProbeError(str(e)) from None
    if not features:
        raise ProbeError("no --features given")
    check_fusion_options(len(features), opts)   # before any cache is opened
    check_distinct(features)
    if eval_features:
        check_distinct(eval_features, "--eval-features")
    train = _open(features)
    check_aligned(train)
    test = _open(eval_features) if eval_features else None
    if test:
        _check_eval(train, test)
    meta = train[0].meta
    multilabel, n_classes = meta.multilabel, len(meta.vocab)
    for c in train + (test or []):
        # caches with per-layer checksums: each task checks the layers it reads (one layer's bytes);
        # older ones: every row of `mean` once per process, before any task (forked workers inherit it)
        if not c.layer_checkable("mean"):
            c.verify_field("mean")
    y = targets(train[0])
    metas = [c.meta for c in train]
    feats, notes = features_to_probe(select_layers(train, opts.layers), opts.fusion, metas, opts)
    notes += sorted({n for f in feats if f.kind != "layer" and (n := fusions.time_note(metas, f.fused, f.caches))})

    if test:
        y_test = targets(test[0])
        folds = [(np.arange(len(y)), np.arange(len(y_test)))]
        protocol = "eval cache"
    else:
        fold_of, protocol = make_folds(train[0], y, opts.folds, opts.seed)
        folds = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in np.unique(fold_of)]
        y_test = y
    check_splits(y, y_test, folds, None if test else np.unique(fold_of), multilabel, meta.vocab.names)
    for kind in kinds:
        note = kind.advice(min(len(tr) for tr, _ in folds))
        if note:
            log.warning(note)
    if any(kind.uses_device(multilabel) for kind in kinds) and not opts.scheduler and opts.jobs > 1:
        import torch
        if (opts.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
            # the GPU does the work; forked workers could not use CUDA anyway
            opts = replace(opts, jobs=1, device=opts.device or "cuda")
    runs = [(f, kind) for f in feats for kind in kinds]   # a run: one feature probed by one kind
    tasks = [(train, test, feat, tr, te, y, multilabel, n_classes, opts, kind)
             for feat, kind in runs for tr, te in folds]

    n_test = len(y_test)
    pooled: dict[tuple, np.ndarray] = {}       # test-set probabilities of runs still going
    left = {f: len(folds) for f in runs}
    fold_scores = {f: [None] * len(folds) for f in runs}
    fold_f1 = {f: [None] * len(folds) for f in runs}
    done: dict[tuple, FeatureResult] = {}
    skipped: set[int] = set()
    for i, probs in run_tasks(tasks, opts):
        feat, k = runs[i // len(folds)], i % len(folds)
        te = folds[k][1]
        pooled.setdefault(feat, np.zeros((n_test, n_classes), np.float32))[te] = probs
        if multilabel:
            ap, skip = metrics.per_class_ap(y_test[te], probs)   # the probe reports AP only (no AUC)
            if len(skip) == len(ap):
                raise ProbeError("a test fold has no positive label at all: too few labelled clips to probe")
            skipped.update(skip)
            fold_scores[feat][k] = float(np.mean([v for v in ap if v is not None]))
            fold_f1[feat][k] = float(np.nanmean(metrics.multilabel_f1(y_test[te], probs >= 0.5)))
        else:
            pred = probs.argmax(1)
            fold_scores[feat][k] = metrics.accuracy(y_test[te], pred)
            fold_f1[feat][k] = metrics.macro_f1(y_test[te], pred, n_classes)[0]
        left[feat] -= 1
        if not left[feat]:   # class-wise figures on the pooled test folds, then free the [N, C] array
            p = pooled.pop(feat)
            if multilabel:
                cw = metrics.multilabel_f1(y_test, p >= 0.5)
                ap = np.array([np.nan if v is None else v for v in metrics.per_class_ap(y_test, p)[0]])
            else:
                cw, ap = metrics.per_class_f1(y_test, p.argmax(1), n_classes), None
            done[feat] = FeatureResult(feat[0], fold_scores[feat], fold_f1[feat], cw, ap, probe=feat[1].name)
    results = [done[f] for f in runs]

    chance = metrics.chance(y_test)
    return ProbeReport(metric="mAP" if multilabel else "accuracy", protocol=protocol, n_folds=len(folds),
                       caches=[str(c.path) for c in train], eval_caches=[str(c.path) for c in test or []],
                       keys=meta.vocab.keys, names=meta.vocab.names, chance=chance, results=results,
                       skipped_classes=sorted(skipped), metas=metas, n_clips=len(y),
                       n_eval_clips=len(y_test) if test else 0, notes=notes,
                       probes=tuple(kind.name for kind in kinds))


def parse_fusion(text: str) -> tuple[str, ...]:
    """--fusion: "none" (or nothing) or comma-separated fusion names (`comma_list`)."""
    if text.strip() in ("", "none"):
        return ()
    try:
        parts = comma_list(text, what="fusion")
    except ArgumentTypeError as e:
        raise ProbeError(f"--fusion: {e}") from None
    bad = set(parts) - set(FUSIONS)
    if bad:
        raise ProbeError(f"unknown fusion {sorted(bad)}; choose from none, {', '.join(FUSIONS)}")
    return parts


def parse_probes(text: str, settings: dict[str, dict] | None = None) -> tuple:
    """--probe "linear,mlp,knn" -> probe kinds, each built with its `settings[name]` (e.g. the
    --mlp-* / --knn-* options; the kind's defaults otherwise)."""
    try:
        names = list(comma_list(text, what="probe kind"))
    except ArgumentTypeError as e:
        raise ProbeError(f"--probe: {e}") from None
    try:
        known = probe_kinds.resolve(names)   # unknown or repeated names, none at all
        return tuple(type(k)(**(settings or {}).get(k.name, {})) for k in known)
    except probe_kinds.ProbeKindError as e:
        raise ProbeError(f"--probe: {e}") from None


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["ProbeError", "ProbeOptions", "Feature", "FeatureResult", "ProbeReport", "probe", "load_matrix",
           "check_aligned", "check_distinct", "check_fusion_options", "make_folds", "parse_fusion", "parse_probes", "CacheError"]
