"""Scoring a head during training: probabilities over held-out clips, and the headline score plus
per-class values through the one metrics module."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from wat.data.heads import probabilities
from wat.data.cache.store import FeatureStore
from wat.eval import metrics

from .inputs import COMPUTE


@torch.no_grad()
def predict(head, store: FeatureStore, indices: np.ndarray, multilabel: bool, batch_size: int = 256,
            autocast=None) -> np.ndarray:
    """Probabilities [len(indices), C] (sigmoid or softmax), rows in the order of `indices`."""
    head.eval()
    indices = np.asarray(indices)
    row = np.empty(int(indices.max()) + 1, np.int64)  # eval indices are unique: invert once
    row[indices] = np.arange(len(indices))
    out = None
    try:
        for idx, x in store.iter_batches(indices, batch_size, shuffle=False, dtype=COMPUTE):
            with autocast or contextlib.nullcontext():
                z = head(x)
            p = probabilities(z, multilabel).cpu().numpy()
            if out is None:
                out = np.empty((len(indices), p.shape[1]), np.float32)
            out[row[idx]] = p
    finally:
        head.train()
    return out


def score(targets: np.ndarray, probs: np.ndarray, multilabel: bool) -> dict:
    """Headline score, its per-class values (`per_class`: AP or F1), + mAUC, d' and skipped classes
    multi-label, and the full `metrics.Scores` (`scores`, for per_class.csv) via the one metrics module."""
    if multilabel:
        s = metrics.multilabel_scores(targets, probs)
        return {"metric": "mAP", "score": s.mAP, "mAUC": s.mAUC, "d_prime": s.d_prime,
                "per_class": s.per_class, "skipped_classes": s.skipped_classes, "scores": s}
    s = metrics.singlelabel_scores(targets.argmax(1), probs)
    return {"metric": "accuracy", "score": s.accuracy, "per_class": s.per_class_f1, "scores": s}
