"""`wat-eval`: run a trained head over a cache, score it, save predictions, tune thresholds.

Thresholds are tuned (max F1 per class) on a cache the head did not train on — a validation
cache, or the held-out fold(s) of a K-fold training cache (`tune_folds`) — and never on the clips
being evaluated: a tuning set that shares any clip id with the eval set is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wat.data.report import figures
from wat.data.cache import Cache, CacheError, open_cache
from wat.data.files import atomic_path, make_folder, remove_bare, write_csv, write_json
from wat.data.heads import Features, HeadError, HeadInfo, head_field, head_problems, probabilities, save_head
from wat.data.heads.official import load_named_head
from wat.data.labels import Vocabulary

from . import metrics, report
from wat.data.errors import WatError


class EvalError(WatError):
    """A head and a cache that do not go together, or options that cannot be honoured."""


@dataclass
class EvalOptions:
    top_k: int = 5
    threshold: float | None = None          # one decision threshold for every class (multi-label)
    tune_on: str | None = None              # cache to tune per-class thresholds on (not the eval set)
    tune_folds: tuple[int, ...] | None = None  # only these folds of `tune_on` (the head's held-out folds)
    batch_size: int = 256
    device: str | None = None               # None: cuda when present


def predict(head, info: HeadInfo, cache: Cache, indices=None, *, batch_size=256, device="cpu") -> np.ndarray:
    """Probabilities [N, n_vocab] float32 over `indices` (default all), read in order in blocks."""
    import torch
    from wat.data.clikit.progress import progress

    idx = np.arange(len(cache)) if indices is None else np.asarray(indices, np.int64)
    n_out = len(cache.meta.vocab)
    out = np.empty((len(idx), n_out), np.float32)
    head = head.to(device).eval()
    with torch.no_grad():
        for a in progress(range(0, len(idx), batch_size), desc="eval", unit="batch"):
            x = torch.from_numpy(cache.read(head_field(info.kind), idx[a:a + batch_size])).to(device)
            # parent-label heads: the first outputs are the vocabulary (softmax heads have none)
            out[a:a + len(x)] = probabilities(head(x), info.multilabel, n_out).cpu().numpy()
    return out


def tune_thresholds(targets: np.ndarray, probs: np.ndarray, default: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-class max-F1 thresholds; classes without positives keep `default` (listed)."""
    thr = np.full(targets.shape[1], default, np.float64)
    f1 = np.full(targets.shape[1], np.nan)
    skipped = []
    for c in range(targets.shape[1]):
        if targets[:, c].any():
            thr[c], f1[c] = metrics.best_f1_threshold(targets[:, c], probs[:, c])
        else:
            skipped.append(c)
    return thr, f1, skipped


def _export_thresholds(out: Path, head, info: HeadInfo, tuned: dict, vocab: Vocabulary) -> None:
    thr, f1 = tuned["thresholds"], tuned["f1"]
    write_csv(out / "thresholds.csv", ["class", "name", "threshold", "tune_f1"],
                     [(vocab.keys[c], vocab.names[c], thr[c], None if np.isnan(f1[c]) else f1[c])
                      for c in range(len(vocab))])
    save_head(out / "head_thresholds.pt", head.cpu(), replace(info, thresholds=[float(t) for t in thr]))


def _open(path, what) -> Cache:
    try:
        return open_cache(path)
    except (CacheError, OSError) as e:
        raise EvalError(f"{what}: {e}") from None


def evaluate(features, head_path, out_dir, opts: EvalOptions | None = None) -> dict:
    import torch

    opts = opts or EvalOptions()
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = _open(features, "--features")
    try:
        head, info = load_named_head(head_path, cache.meta.model, map_location="cpu")
    except HeadError as e:
        raise EvalError(str(e)) from None
    bad = head_problems(info, Features.of_cache(cache.meta))
    if bad:
        raise EvalError(f"head {head_path} does not fit cache {cache.path}: " + "; ".join(bad))
    if opts.top_k < 1:
        raise EvalError("--top-k must be at least 1")
    tuned = None
    if opts.tune_on:
        if not info.multilabel:
            raise EvalError("thresholds apply to multi-label heads; a single-label head predicts the arg-max")
        tuned = _tune(head, info, cache, opts, device)

    out = Path(out_dir)
    made = make_folder(out)
    try:
        return _evaluate(cache, head, info, head_path, features, out, opts, device, tuned)
    except BaseException:
        remove_bare(made)  # a run refused or failed before writing anything leaves no folder
        raise


def _evaluate(cache: Cache, head, info: HeadInfo, head_path, features, out: Path, opts: EvalOptions, device,
              tuned) -> dict:
    probs = predict(head, info, cache, batch_size=opts.batch_size, device=device)
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(bad):
        raise EvalError(f"the head gives NaN or infinite scores for {len(bad)} clip(s) of {cache.path} (e.g. "
                        f"{', '.join(map(str, cache.ids[bad[:3]]))}): non-finite weights or features; "
                        "`wat-cache verify` checks the cache")
    vocab, n = cache.meta.vocab, len(cache.meta.vocab)
    k = min(opts.top_k, n)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    with atomic_path(out / "predictions.npz") as tmp, open(tmp, "wb") as f:  # never a torn file
        np.savez_compressed(f, ids=cache.ids.astype(str), keys=np.array(vocab.keys),
                            probs=probs.astype(np.float16), top_k=top.astype(np.int32))

    y = cache.label_matrix()
    if info.multilabel:
        s = metrics.multilabel_scores(y, probs)
    else:
        labels = y.argmax(1)
        s = metrics.singlelabel_scores(labels, probs)
        cm = metrics.confusion_matrix(labels, probs.argmax(1), n)
        write_csv(out / "confusion.csv", ["true \\ predicted"] + list(vocab.names),
                         [(name, *row) for name, row in zip(vocab.names, cm.tolist())])
        report.plot_confusion(cm, vocab.names, out / "confusion.png",
                              (f"Confusion of the {info.kind} head", figures.cache_label(cache.meta, len(cache))))
    result = {"features": str(cache.path), "head": str(head_path), "kind": info.kind, "n_clips": len(cache),
              "metric": "mAP" if info.multilabel else "accuracy", **s.to_dict()}
    result["skipped_class_names"] = [vocab.names[c] for c in s.skipped_classes]
    if not info.multilabel:
        result["top_k"] = k
        result["top_k_accuracy"] = float(np.mean([l in t for l, t in zip(y.argmax(1), top)]))

    # decisions: tuned thresholds > --threshold > thresholds stored in the head
    thr, source = None, None
    if tuned is not None:
        thr, source = tuned["thresholds"][:n], f"tuned on {len(tuned['ids'])} clips of {opts.tune_on}"
        _export_thresholds(out, head, info, tuned, vocab)
        result["tuning"] = {"cache": str(opts.tune_on), "folds": list(opts.tune_folds or []),
                            "n_clips": len(tuned["ids"]), "classes_without_positives": tuned["skipped"],
                            "head": str(out / "head_thresholds.pt")}
    elif opts.threshold is not None:
        thr, source = np.full(n, opts.threshold), f"--threshold {opts.threshold}"
    elif info.thresholds:
        thr, source = np.asarray(info.thresholds[:n], np.float64), "stored in the head"
    if thr is not None and info.multilabel:
        macro, micro = metrics.decision_f1(y, probs >= thr[None, :])
        result["decisions"] = {"thresholds": source, "macro_f1": macro, "micro_f1": micro}

    header, rows = metrics.per_class_table(vocab.keys, vocab.names, s, y.sum(0))
    write_csv(out / "per_class.csv", header, rows)
    order = metrics.ap_ranking(s)
    by_f1 = not info.multilabel   # single-label: class-wise F1 of the arg-max, as in the paper's ESC-50 figures
    report.plot_per_class(s.per_class_f1 if by_f1 else s.per_class, vocab.names, out / "per_class.png",
                          metric="F1" if by_f1 else "AP", overall=s.macro_f1 if by_f1 else s.mAP,
                          title=(f"Per-class {'F1' if by_f1 else 'AP'} of the {info.kind} head",
                                 figures.cache_label(cache.meta, len(cache))))
    result["per_class_top"] = [{"name": vocab.names[c], "AP": s.per_class[c]} for c in order[:10]]
    for key in ("per_class", "per_class_auc", "per_class_f1"):
        result.pop(key, None)     # in per_class.csv
    write_json(out / "metrics.json", result)
    options = {"--features": str(features), "--head": str(head_path), **{
        f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(opts).items()}}
    report.eval_html(result, out, meta=cache.meta, info=info, options=options,
                     per_class_rows=[r[1:] for r in rows], per_class_header=header[1:])
    return result


def _tune(head, info: HeadInfo, eval_cache: Cache, opts: EvalOptions, device) -> dict:
    """Per-class thresholds over all head outputs, from clips of the tuning cache that are not evaluated."""
    tcache = _open(opts.tune_on, "--tune-thresholds-on")
    bad = head_problems(info, Features.of_cache(tcache.meta))
    if bad:
        raise EvalError(f"head does not fit tuning cache {tcache.path}: " + "; ".join(bad))
    idx = np.arange(len(tcache))
    if opts.tune_folds:
        idx = np.flatnonzero(np.isin(tcache.folds, opts.tune_folds))
        if not len(idx):
            raise EvalError(f"--tune-folds {list(opts.tune_folds)}: no clip of {tcache.path} is in those folds")
    shared = np.intersect1d(tcache.ids[idx], eval_cache.ids)
    if len(shared):
        raise EvalError(f"thresholds must not be tuned on evaluated clips: {len(shared)} tuning clip(s) are in "
                        f"{eval_cache.path} (e.g. {shared[0]}); use a validation cache or --tune-folds")
    probs = predict(head, info, tcache, idx, batch_size=opts.batch_size, device=device)
    default = 0.5 if opts.threshold is None else opts.threshold
    thr, f1, skipped = tune_thresholds(tcache.label_matrix()[idx], probs, default)
    full = np.full(info.n_classes, default)   # parent-label outputs beyond the vocabulary keep the default
    full[:len(thr)] = thr
    return {"thresholds": full, "f1": f1, "skipped": skipped, "ids": tcache.ids[idx], "cache": tcache}
