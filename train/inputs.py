"""What a run trains on: the caches opened and checked (`prepare`, before anything is loaded), the
stores and targets, the splits, and the batches of each epoch.

Data path: the cache is opened once; `FeatureStore` holds the field in one tensor (on the device
when it fits) and batches are tensor indexing, or it streams shard-ordered blocks through a
shuffle buffer. Targets live in one tensor indexed by the same indices. No per-step file opens,
no per-sample Python.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from wat.data.cache import Cache, CacheError, open_cache
from wat.data.heads import HeadInfo, head_class, head_field
from wat.data.labels import Vocabulary, parent_labels
from wat.data.cache.store import FeatureStore

from .init import Init, load_init
from .options import PROBE_START_MIN, TrainError, TrainOptions, default_batch, wa_range
from .step import StepConfig


@dataclass
class Data:
    cache: Cache
    store: FeatureStore
    targets: torch.Tensor      # [N, C] float (multi-label) on the device
    classes: torch.Tensor      # [N] long class index (single-label; -1 when multi-label)
    vocab: Vocabulary          # training vocabulary (extended with --parent-labels)


@dataclass
class Setup:
    """Everything `train` needs, opened and checked before any training starts."""

    cache: Cache
    data: Data                     # training store and targets
    y: np.ndarray                  # [N, C] bool labels of the training cache (original vocabulary)
    ev: Data | None                # where held-out clips are scored (the training data for folds)
    ev_y: np.ndarray | None
    splits: list                   # (name, train indices, eval indices or None)
    unlabeled: FeatureStore | None
    cfg: StepConfig
    info: HeadInfo


def _check_labels(cache: Cache, what: str) -> np.ndarray:
    y = cache.label_matrix()
    n = y.sum(1)
    if not n.any():
        raise TrainError(f"{what} {cache.path} has no labels (a cache of unlabeled clips can only "
                         "be used with --unlabeled-features)")
    if not cache.meta.multilabel and (n != 1).any():
        raise TrainError(f"{what} {cache.path} is single-label but {int((n != 1).sum())} clips "
                         "do not have exactly one label")
    return y


def _open(path, what: str) -> Cache:
    try:
        return open_cache(path)
    except (CacheError, OSError) as e:
        raise TrainError(f"{what}: {e}") from None


def _load_data(cache: Cache, y: np.ndarray, ext: tuple[Vocabulary, np.ndarray] | None,
               field: str, opts: TrainOptions, device) -> Data:
    vocab = cache.meta.vocab
    if ext is not None:  # parent labels: a clip also carries all ancestors of its classes
        vocab, a = ext
        y = (y.astype(np.float32) @ a) > 0
    store = FeatureStore(cache, field, memory_budget=opts.memory_budget, device=device)
    classes = torch.from_numpy(y.argmax(1) if not cache.meta.multilabel else np.full(len(y), -1)).to(device)
    return Data(cache, store, torch.from_numpy(y.astype(np.float32)).to(device), classes, vocab)


def _ancestor_matrix(vocab: Vocabulary) -> tuple[Vocabulary, np.ndarray]:
    ext, ancestors = parent_labels(vocab)
    a = np.zeros((len(vocab), len(ext)), np.float32)
    a[np.arange(len(vocab)), np.arange(len(vocab))] = 1
    for c, anc in enumerate(ancestors):
        a[c, list(anc)] = 1
    return ext, a


def _info(opts: TrainOptions, cache: Cache, vocab: Vocabulary, primary: int | None) -> HeadInfo:
    m = cache.meta
    return HeadInfo(opts.head, m.n_layers, m.dim, len(vocab), opts.proj_dim, m.n_frames, vocab.to_json(),
                    m.model, m.fingerprint, m.policy, m.multilabel, primary, layers=list(m.layers),
                    pad30_padding=m.pad30_padding, encoder=m.encoder)


def _compatible(meta, other: Cache, flag: str, path: str, ignore=()) -> None:
    bad = [b for b in meta.incompatibilities(other.meta) if not b.startswith(ignore)]
    if bad:
        raise TrainError(f"{flag} {other.path} does not match {path}: {'; '.join(bad)}")


@dataclass
class Checked:
    """The inputs of a run opened and checked, nothing loaded yet (`check_inputs`)."""

    cache: Cache
    y: np.ndarray                  # [N, C] bool labels of the training cache
    ecache: Cache | None           # --eval-features
    ev_y: np.ndarray | None        # its labels
    ucache: Cache | None           # --unlabeled-features
    splits: list                   # (name, train indices, eval indices or None)
    field: str                     # "features" or "mean": what the head reads
    ext: tuple | None              # (extended vocabulary, ancestor matrix) with --parent-labels
    cfg: StepConfig
    info: HeadInfo
    opts: TrainOptions             # the run's options, the batch size and head kind resolved
    init: Init | None = None       # --init: the head to start from, matched to the run's classes


def prepare(opts: TrainOptions, device) -> Setup:
    """Open and check every input, then load the stores (checks first: loading can take minutes)."""
    c = check_inputs(opts)
    return load_inputs(c, c.opts, device)


def check_inputs(opts: TrainOptions, world_size: int = 1) -> Checked:
    """Open and check every input (cache metadata and labels only): quick, and done before the run
    makes RUN_DIR, so that a refused run leaves nothing behind. Without a batch size, the default
    for the smallest training split is chosen (`Checked.opts`)."""
    if opts.cr_views < 1 or opts.epochs < 1 or (opts.batch_size is not None and opts.batch_size < 1):
        raise TrainError("--epochs, --batch-size and --cr-views must be >= 1")
    if opts.folds and opts.eval_features:
        raise TrainError("use either --eval-features or --folds, not both")
    if opts.probe_start and opts.init:
        raise TrainError("--probe-start on would replace the --init head's weights: use one of them")
    wa_range(opts)
    cache = _open(opts.features, "--features")
    meta = cache.meta
    y = _check_labels(cache, "--features")
    if opts.parent_labels and not meta.multilabel:
        raise TrainError("--parent-labels needs a multi-label cache")
    opts, init = load_init(opts, cache)  # the head kind is the --init head's unless --head names one
    field = head_field(opts.head)
    head_class(opts.head).check_dim(opts.proj_dim)  # a width the head kind cannot take, before RUN_DIR

    ecache = ucache = ev_y = None
    if opts.folds:
        folds = np.unique(cache.folds)
        if (folds < 0).any() or len(folds) != opts.folds:
            raise TrainError(f"--folds {opts.folds}: the cache's clips have folds {folds.tolist()}")
        splits = [(f"fold{f}", np.flatnonzero(cache.folds != f), np.flatnonzero(cache.folds == f)) for f in folds]
    elif opts.eval_features:
        ecache = _open(opts.eval_features, "--eval-features")
        if ecache.meta.vocab != meta.vocab:
            raise TrainError(f"vocabulary mismatch: {opts.features} has {len(meta.vocab)} classes, "
                             f"{opts.eval_features} has {len(ecache.meta.vocab)}"
                             + (" (different classes)" if len(ecache.meta.vocab) == len(meta.vocab) else ""))
        _compatible(meta, ecache, "--eval-features", opts.features)
        ev_y = _check_labels(ecache, "--eval-features")
        splits = [("main", np.arange(len(cache)), np.arange(len(ecache)))]
    else:
        splits = [("main", np.arange(len(cache)), None)]
    _check_splits(splits, y, meta, opts)
    if opts.probe_start and (n := min(len(tr) for _, tr, _ in splits)) < PROBE_START_MIN:
        raise TrainError(f"--probe-start on: {n} training clips; it holds back a fifth of them and needs "
                         f"{PROBE_START_MIN} or more")
    if opts.batch_size is None:
        opts = dataclasses.replace(opts, batch_size=default_batch(min(len(tr) for _, tr, _ in splits), world_size))
    if opts.unlabeled_features:
        ucache = _open(opts.unlabeled_features, "--unlabeled-features")
        _compatible(meta, ucache, "--unlabeled-features", opts.features, ignore=("vocab", "multilabel"))
        if len(ucache) < opts.unlabeled_ratio * opts.batch_size:
            raise TrainError(f"--unlabeled-features has {len(ucache)} clips, fewer than one step's "
                             f"{opts.unlabeled_ratio} x {opts.batch_size}")

    cr = opts.cr_views > 1 or ucache is not None
    fmask = opts.feature_mask if opts.feature_mask is not None else (meta.dim // 10 if cr else 0)
    tmask = opts.time_mask if field == "features" else 0  # MLP heads see time means: nothing to mask
    if cr and fmask == 0 and tmask == 0:
        raise TrainError("consistency regularisation needs views that differ: set --time-mask or --feature-mask")
    cfg = StepConfig(meta.multilabel, tmask, fmask, opts.mixup, opts.label_smoothing, opts.cr_views,
                     opts.cr_weight, opts.cr_unlabeled_weight)
    ext = _ancestor_matrix(meta.vocab) if opts.parent_labels else None
    vocab = ext[0] if ext is not None else meta.vocab
    info = _info(opts, cache, vocab, len(meta.vocab) if ext is not None else None)
    if init is not None:
        init = init.for_vocab(vocab, opts.init)
    return Checked(cache, y, ecache, ev_y, ucache, splits, field, ext, cfg, info, opts, init)


def _check_splits(splits: list, y: np.ndarray, meta, opts: TrainOptions) -> None:
    """Refuse, before RUN_DIR is made, single-label training clips of one class only (the whole
    cache, or a fold's training clips: one line naming the fold): a head cannot learn from them."""
    if meta.multilabel:
        return
    for name, tr, _ in splits:
        present = np.unique(y[tr].argmax(1))
        if len(present) < 2:
            where = "the training clips" if name == "main" else f"{name}'s training clips (the other folds)"
            raise TrainError(f"{where} are all of class {meta.vocab.names[present[0]]!r}: a single-label head "
                             "needs clips of at least two classes")


def load_inputs(c: Checked, opts: TrainOptions, device) -> Setup:
    """Load the checked inputs' stores and targets (can take minutes)."""
    data = _load_data(c.cache, c.y, c.ext, c.field, opts, device)
    ev, ev_y = None, c.ev_y
    if opts.folds:  # held-out folds are scored from the training store
        ev, ev_y = data, c.y
    elif c.ecache is not None:
        ev = _load_data(c.ecache, c.ev_y, c.ext, c.field, opts, device)
    unl = FeatureStore(c.ucache, c.field, memory_budget=opts.memory_budget, device=device) if c.ucache else None
    return Setup(c.cache, data, c.y, ev, ev_y, c.splits, unl, c.cfg, c.info)


# ---------------------------------------------------------------- batches

def balanced_weights(y: np.ndarray) -> torch.Tensor:
    """Per clip: sum over its labels of 1000 / (class count + 0.01) (official Whisper-AT)."""
    w_class = 1000.0 / (y.sum(0) + 0.01)
    return torch.from_numpy((y * w_class).sum(1)).double()


def epoch_order(train_idx: np.ndarray, weights: torch.Tensor | None, gen: torch.Generator) -> np.ndarray:
    """The clips of one epoch in the order they are seen (drawn with `weights` when balanced)."""
    n = len(train_idx)
    if weights is not None:  # WeightedRandomSampler(replacement=True), drawn from our generator
        pick = torch.multinomial(weights[torch.from_numpy(train_idx)], n, replacement=True, generator=gen)
    else:
        pick = torch.randperm(n, generator=gen)
    return train_idx[pick.numpy()]


# Batches reach the step as stored (f16, or int8 + scales) and become f32, what the heads compute
# in, on the device: one conversion pass there, none on the host.
COMPUTE = torch.float32


def batches(store: FeatureStore, order: np.ndarray, bs: int, gen: torch.Generator):
    """(indices, f32 features) batches of `order`: indexing when the store is resident, else
    shard-ordered blocks through a shuffle buffer seeded from `gen`. Streaming gives up some
    randomness for sequential reads: the clips of `order` (repeats kept) are shuffled within
    windows of a few blocks of rows, shards and blocks visited in a random order (for `mean` at
    large width up to 6144 clips a window, 1536 when the memory budget holds less; see
    wat.data.cache.store). Same `gen` state, same batches."""
    if store.in_memory:  # order is already random: index the resident tensor (into kept buffers)
        yield from store.iter_batches(order, bs, shuffle=False, dtype=COMPUTE)
    else:  # shard-ordered blocks + shuffle buffer, seeded from our generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        yield from store.iter_batches(order, bs, shuffle=True, seed=seed, dtype=COMPUTE)


def unlabeled_batches(store: FeatureStore, n: int, gen: torch.Generator, world=None):
    """Endless batches of `n` unlabeled clips. Under torchrun (`world.parallel`) every rank draws
    the same `n` clips (one generator state) and yields (its `Share` of them: every N-th from its
    rank, those rows), so the ranks' unlabeled clips together are one process's batch."""
    parallel = world is not None and world.parallel
    share = None
    if parallel:
        from .augment import Share
        share = Share(torch.arange(world.rank, n, world.size), n)
    while True:
        if store.in_memory:
            idx = torch.randint(0, len(store), (n,), generator=gen).numpy()
            if not parallel:
                yield store.get(idx, COMPUTE)
            else:
                yield share, store.get(idx[share.rows.numpy()], COMPUTE)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            for _, x in store.iter_batches(np.arange(len(store)), n, shuffle=True, seed=seed, dtype=COMPUTE):
                if len(x) == n:
                    yield x if not parallel else (share, x[share.rows.to(x.device)])
