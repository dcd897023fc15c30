"""The one metrics module (train and eval): AP/mAP, AUC/mAUC, d', accuracy, F1, confusion matrix.

Classes that make a metric undefined (no positives for AP/F1, no positives or no negatives for
AUC) are skipped and listed, never averaged in as NaN or zero.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from wat.data.files import json_safe

# scipy.stats and sklearn.metrics are imported inside the functions that use them: together ~1.3 s
# of CPU per process (wat-train imports this module at start), which a run refused on its inputs,
# or one that never scores, should not pay.


@dataclass
class Scores:
    n_clips: int
    n_classes: int
    mAP: float | None                    # mean AP over classes with positives (None: no such class)
    mAUC: float | None                   # mean AUC over classes with positives and negatives
    d_prime: float | None                # sqrt(2) * Phi^-1(mAUC), as in the AudioSet papers
    per_class: list[float | None]        # AP per class, None where skipped
    per_class_auc: list[float | None]
    skipped_classes: list[int] = field(default_factory=list)      # no positives: no AP
    skipped_auc_classes: list[int] = field(default_factory=list)  # no positives or no negatives: no AUC
    accuracy: float | None = None        # single-label only
    macro_f1: float | None = None        # single-label only: mean F1 over classes present in the targets
    per_class_f1: list[float | None] | None = None

    def to_dict(self) -> dict:
        """JSON-safe: non-finite floats (d' of a perfect AUC is infinite) become None."""
        return json_safe(asdict(self))


def ap_ranking(s: Scores) -> list[int]:
    """Class indices by AP, highest first; classes without AP last."""
    return sorted(range(s.n_classes), key=lambda c: (s.per_class[c] is None, -(s.per_class[c] or 0.0)))


def per_class_table(keys, names, s: Scores, support, *, ranked: bool = True) -> tuple[list[str], list[tuple]]:
    """(header, rows) of the per-class CSV that wat-train and wat-eval both write: AP rank, class
    key, name, AP, AUC, F1 (single-label scores only), support. Rows by AP rank, or in class order."""
    rank = {c: r + 1 for r, c in enumerate(ap_ranking(s))}
    header = ["rank", "class", "name", "AP", "AUC", "support"] + (["F1"] if s.per_class_f1 else [])
    rows = [(rank[c], keys[c], names[c], s.per_class[c], s.per_class_auc[c], int(support[c]))
            + ((s.per_class_f1[c],) if s.per_class_f1 else ())
            for c in (ap_ranking(s) if ranked else range(s.n_classes))]
    return header, rows


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _check(targets, scores) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be [N, C]")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return targets, scores


def one_hot(labels, n_classes: int) -> np.ndarray:
    """[N] class indices (or a list of label tuples) -> [N, C] bool."""
    out = np.zeros((len(labels), n_classes), dtype=bool)
    for i, lab in enumerate(labels):
        out[i, list(lab) if isinstance(lab, (tuple, list, np.ndarray)) else int(lab)] = True
    return out


def d_prime(auc):
    """sqrt(2) * Phi^-1(AUC); +-inf at AUC 1 / 0."""
    from scipy.stats import norm

    return float(np.sqrt(2.0) * norm.ppf(auc)) if np.ndim(auc) == 0 else np.sqrt(2.0) * norm.ppf(auc)


def per_class_ap(targets, scores) -> tuple[list[float | None], list[int]]:
    """AP per class, equal to sklearn's `average_precision_score` (ties ranked as one threshold), for
    all classes at once: AP = mean over a class's positives of the precision at the end of their tie
    group. One sort per block of classes instead of one validated sklearn call per class (527 calls
    took seconds per evaluation at AudioSet shape)."""
    targets, scores = _check(targets, scores)
    n, n_classes = targets.shape
    ap = np.full(n_classes, np.nan)
    rank = np.arange(1, n + 1)[:, None]
    for a in range(0, n_classes, 64):                      # bounded memory: [N, 64] blocks
        order = np.argsort(-scores[:, a:a + 64], axis=0, kind="stable")
        s = np.take_along_axis(scores[:, a:a + 64], order, 0)
        t = np.take_along_axis(targets[:, a:a + 64], order, 0)
        precision = np.cumsum(t, 0) / rank
        last = np.ones(s.shape, bool)                      # last row of each run of equal scores
        last[:-1] = s[:-1] != s[1:]
        end = np.minimum.accumulate(np.where(last, rank - 1, n)[::-1], axis=0)[::-1]
        pos = t.sum(0)
        ap[a:a + 64] = np.where(pos > 0, (t * np.take_along_axis(precision, end, 0)).sum(0) / np.maximum(pos, 1),
                                np.nan)
    skipped = [int(c) for c in np.flatnonzero(np.isnan(ap))]
    return [None if np.isnan(v) else float(v) for v in ap], skipped


def per_class_auc(targets, scores) -> tuple[list[float | None], list[int]]:
    from sklearn.metrics import roc_auc_score

    targets, scores = _check(targets, scores)
    auc, skipped = [], []
    for c in range(targets.shape[1]):
        pos = int(targets[:, c].sum())
        if 0 < pos < len(targets):
            auc.append(float(roc_auc_score(targets[:, c], scores[:, c])))
        else:
            auc.append(None)
            skipped.append(c)
    return auc, skipped


def multilabel_scores(targets, scores) -> Scores:
    """targets [N, C] bool, scores [N, C] (probabilities or logits: only the ranking matters)."""
    targets, scores = _check(targets, scores)
    ap, skip_ap = per_class_ap(targets, scores)
    auc, skip_auc = per_class_auc(targets, scores)
    m_auc = _mean(auc)
    return Scores(n_clips=len(targets), n_classes=targets.shape[1], mAP=_mean(ap), mAUC=m_auc,
                  d_prime=None if m_auc is None else d_prime(m_auc), per_class=ap, per_class_auc=auc,
                  skipped_classes=skip_ap, skipped_auc_classes=skip_auc)


def singlelabel_scores(labels, probs) -> Scores:
    """labels [N] class indices, probs [N, C]: accuracy, macro-F1, plus the one-vs-rest AP/AUC figures."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    n_classes = probs.shape[1]
    s = multilabel_scores(one_hot(labels, n_classes), probs)
    pred = probs.argmax(1)
    f1 = per_class_f1(labels, pred, n_classes)
    s.accuracy = accuracy(labels, pred)
    s.per_class_f1 = [None if math.isnan(v) else float(v) for v in f1]
    s.macro_f1 = _mean(s.per_class_f1)
    return s


def chance(targets) -> float:
    """The score of guessing without looking at the audio: single-label ([N] class indices), the
    accuracy of always answering the most frequent class; multi-label ([N, C] bool), the mAP of
    random scores (a class's expected AP is its prevalence), over the classes with positives."""
    t = np.asarray(targets)
    if t.ndim == 1:
        return float(np.bincount(t.astype(np.int64)).max() / len(t))
    prevalence = t.astype(bool).mean(0)
    return float(prevalence[prevalence > 0].mean())


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"accuracy needs two equal non-empty 1-D arrays, got {y_true.shape} and {y_pred.shape}")
    return float((y_true == y_pred).mean())


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """[C, C] int64 counts; rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def multilabel_f1(targets, decisions) -> np.ndarray:
    """THE F1: per class of [N, C] yes/no decisions, 2TP / (positives + predicted) (sklearn's
    f1_score per column); NaN for classes without positives (undefined recall), which means skip."""
    from sklearn.metrics import f1_score

    t, d = np.asarray(targets, bool), np.asarray(decisions, bool)
    if t.ndim != 2 or t.shape != d.shape:
        raise ValueError(f"targets {t.shape} and decisions {d.shape} must both be [N, C]")
    f1 = np.asarray(f1_score(t, d, average=None, zero_division=0.0), np.float64)
    f1[~t.any(0)] = np.nan
    return f1


def decision_f1(targets, decisions) -> tuple[float | None, float | None]:
    """(macro-F1 over the classes with positives, micro-F1) of [N, C] decisions; None where undefined."""
    from sklearn.metrics import f1_score

    t, d = np.asarray(targets, bool), np.asarray(decisions, bool)
    f1 = multilabel_f1(t, d)
    has = ~np.isnan(f1)
    macro = float(f1[has].mean()) if has.any() else None
    micro = float(f1_score(t, d, average="micro", zero_division=0.0)) if t.any() or d.any() else None
    return macro, micro


def per_class_f1(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Single-label F1 per class (one-vs-rest decisions of the predicted class); NaN for classes
    absent from y_true (undefined recall) — macro_f1 skips them."""
    eye = np.eye(n_classes, dtype=bool)
    return multilabel_f1(eye[np.asarray(y_true, np.int64)], eye[np.asarray(y_pred, np.int64)])


def macro_f1(y_true, y_pred, n_classes: int) -> tuple[float | None, list[int]]:
    """Mean F1 over the classes present in y_true, and the skipped (absent) classes."""
    f1 = per_class_f1(y_true, y_pred, n_classes)
    present = ~np.isnan(f1)
    return (float(f1[present].mean()) if present.any() else None), np.flatnonzero(~present).tolist()


def best_f1_threshold(target, score) -> tuple[float, float]:
    """Threshold maximising F1 for one class: (threshold, F1). Predict positive when score >= threshold."""
    target = np.asarray(target, bool)
    score = np.asarray(score, np.float64)
    if not target.any():
        raise ValueError("no positives: F1 threshold undefined")
    order = np.argsort(-score, kind="stable")
    s, t = score[order], target[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[s[1:] != s[:-1], True]     # cut only between distinct scores (ties go together)
    tp, fp, cut = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + t.sum())
    k = int(np.argmax(f1))
    return float(cut[k]), float(f1[k])
