"""Metrics against values computed by hand (see the comments for the arithmetic)."""
import json
import math

import numpy as np
import pytest

from wat.eval import metrics

# columns: 0 has a tie across a positive and a negative; 1 has no positives; 2 is perfectly ranked;
# 3 has no negatives (AP defined, AUC not)
TARGETS = np.array([[1, 0, 0, 1],
                    [0, 0, 1, 1],
                    [1, 0, 1, 1],
                    [0, 0, 1, 1]], bool)
SCORES = np.array([[0.9, 0.3, 0.2, 0.5],
                   [0.5, 0.1, 0.8, 0.4],
                   [0.5, 0.2, 0.3, 0.3],
                   [0.1, 0.4, 0.6, 0.2]])


def test_ap_auc_with_tie_and_skipped_classes():
    s = metrics.multilabel_scores(TARGETS, SCORES)
    # class 0, thresholds 0.9 (P=1, R=1/2) and 0.5 (P=2/3, R=1): AP = 1/2*1 + 1/2*2/3 = 5/6
    assert s.per_class[0] == pytest.approx(5 / 6)
    # AUC pairs (pos 0.9, 0.5 vs neg 0.5, 0.1): 1 + 1 + 0.5 (tie) + 1 = 3.5 / 4
    assert s.per_class_auc[0] == pytest.approx(0.875)
    assert s.per_class[1] is None and s.per_class_auc[1] is None
    assert s.per_class[2] == pytest.approx(1.0) and s.per_class_auc[2] == pytest.approx(1.0)
    assert s.per_class[3] == pytest.approx(1.0) and s.per_class_auc[3] is None
    assert s.skipped_classes == [1]
    assert s.skipped_auc_classes == [1, 3]
    assert s.mAP == pytest.approx((5 / 6 + 1 + 1) / 3)
    assert s.mAUC == pytest.approx((0.875 + 1) / 2)
    assert s.d_prime == pytest.approx(math.sqrt(2) * 1.534120544, abs=1e-6)   # Phi^-1(0.9375)
    assert s.accuracy is None
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["skipped_classes"] == [1] and d["per_class"][1] is None


def test_ap_auc_without_ties():
    t = np.array([0, 1, 0, 1, 1], bool)[:, None]
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2])[:, None]
    s = metrics.multilabel_scores(t, p)
    # ranks: 0.8+ (P1 R1/3), 0.4+ (P1 R2/3), 0.35-, 0.2+ (P3/4 R1): AP = (1 + 1 + 3/4) / 3
    assert s.mAP == pytest.approx(11 / 12)
    # pos 0.4 beats 2 negatives, 0.8 beats 2, 0.2 beats 1: 5/6
    assert s.mAUC == pytest.approx(5 / 6)


def test_ap_of_all_classes_at_once_equals_sklearn():
    """The vectorised AP (blocks of 64 classes) equals sklearn's per-class calls, ties included."""
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    y = rng.random((300, 150)) < 0.08
    y[:, 7] = False                                        # no positives: skipped
    y[:, 8] = True                                         # no negatives: AP 1
    p = np.round(rng.random((300, 150)), 2)                # many ties
    p[:, 9] = 0.5                                          # one tie group: AP = prevalence
    ap, skipped = metrics.per_class_ap(y, p)
    assert skipped == [7] and ap[7] is None
    ref = [average_precision_score(y[:, c], p[:, c]) for c in range(150) if c != 7]
    np.testing.assert_allclose([v for v in ap if v is not None], ref, rtol=1e-12)


def test_d_prime_values():
    assert metrics.d_prime(0.5) == 0.0
    assert metrics.d_prime(0.975) == pytest.approx(2.771807, abs=1e-5)   # sqrt(2) * 1.959964
    assert metrics.d_prime(1.0) == math.inf
    s = metrics.multilabel_scores(np.array([[1], [0]], bool), np.array([[0.9], [0.1]]))
    assert s.d_prime == math.inf and s.to_dict()["d_prime"] is None


def test_all_classes_without_positives_gives_none_not_nan():
    s = metrics.multilabel_scores(np.zeros((3, 2), bool), np.random.rand(3, 2))
    assert s.mAP is None and s.mAUC is None and s.d_prime is None
    assert s.skipped_classes == [0, 1]


def test_singlelabel_accuracy_f1_confusion():
    labels = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 0])
    probs = np.eye(4)[pred] * 0.7 + 0.1
    cm = metrics.confusion_matrix(labels, pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    f1 = metrics.per_class_f1(labels, pred, 4)
    # F1 = 2TP / (support + predicted): 2/4, 2/3, 4/5, class 3 absent -> NaN
    np.testing.assert_allclose(f1[:3], [0.5, 2 / 3, 0.8])
    assert math.isnan(f1[3])
    m, skipped = metrics.macro_f1(labels, pred, 4)
    assert m == pytest.approx((0.5 + 2 / 3 + 0.8) / 3) and skipped == [3]
    s = metrics.singlelabel_scores(labels, probs)
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert s.per_class_f1[3] is None and s.skipped_classes == [3]
    assert metrics.accuracy(labels, pred) == pytest.approx(4 / 6)


def test_best_f1_threshold():
    # cuts: 0.9 -> 2/4, 0.8 -> 2/5, 0.7 -> 4/6, 0.3 -> 6/7, 0.2 -> 6/8
    thr, f1 = metrics.best_f1_threshold([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.3, 0.2])
    assert thr == 0.3 and f1 == pytest.approx(6 / 7)
    # a tie is never split: cut 0.5 takes both (F1 2/4), cut 0.1 -> 4/5
    thr, f1 = metrics.best_f1_threshold([1, 0, 1], [0.5, 0.5, 0.1])
    assert thr == 0.1 and f1 == pytest.approx(0.8)
    with pytest.raises(ValueError):
        metrics.best_f1_threshold([0, 0], [0.2, 0.1])


def test_shape_and_nan_errors():
    with pytest.raises(ValueError):
        metrics.multilabel_scores(np.zeros((3, 2), bool), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        metrics.multilabel_scores(np.ones((2, 1), bool), np.array([[np.nan], [0.1]]))


def test_chance_scores():
    from wat.eval.metrics import chance, multilabel_scores
    assert chance(np.array([0, 0, 0, 1, 2])) == pytest.approx(0.6)      # always the majority class
    rng = np.random.default_rng(0)
    y = rng.random((4000, 3)) < np.array([0.1, 0.3, 0.5])
    assert chance(np.c_[y, np.zeros((4000, 1), bool)]) == pytest.approx(y.mean(0).mean())   # empty class skipped
    assert multilabel_scores(y, rng.random(y.shape)).mAP == pytest.approx(chance(y), abs=0.02)


def test_multilabel_f1_and_decision_f1():
    t = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    d = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0]], bool)
    f1 = metrics.multilabel_f1(t, d)
    # 2TP / (positives + predicted): class 0 2*1/(2+2), class 1 2*2/(2+3), class 2 no positives
    np.testing.assert_allclose(f1[:2], [0.5, 0.8])
    assert math.isnan(f1[2])
    macro, micro = metrics.decision_f1(t, d)
    assert macro == pytest.approx(0.65) and micro == pytest.approx(2 * 3 / (4 + 6))
    assert metrics.decision_f1(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (None, None)


def test_train_and_eval_start_without_sklearn_or_scipy(tmp_path):
    """scipy.stats and sklearn.metrics (~1.3 s of CPU) come in on first use, not with wat-train's or
    wat-eval's modules: a run refused on its inputs never pays for them."""
    import subprocess
    import sys
    code = ("import sys, wat.eval.metrics, wat.train.loop, wat.eval.evaluate\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n"
            "wat.eval.metrics.multilabel_scores([[1, 0], [0, 1]], [[0.9, 0.2], [0.1, 0.8]])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "['scipy', 'sklearn']"]
