"""Classification metrics, written out so no scikit-learn is needed.

Conventions follow scikit-learn (and so the research code, which called it):
- an INVALID prediction (−1) is simply a class nobody belongs to: it is wrong for accuracy, lowers
  recall in F1 and is a row/column of the confusion matrix in MCC;
- weighted F1 averages the per-class F1 over the classes present in labels or predictions,
  weighted by each class's number of true items (a class with no true items weighs 0; a class
  never predicted has F1 0);
- MCC is the multi-class Matthews coefficient (Gorodkin's R_K) and is 0 when either the labels or
  the predictions are a single class (the denominator vanishes).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from fastmemit.downstream.base import INVALID
from fastmemit.errors import DownstreamError


def _check(y_true: Sequence[int], y_pred: Sequence[int]) -> None:
    if len(y_true) != len(y_pred):
        raise DownstreamError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        raise DownstreamError("no items to score")


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of items predicted right; invalid predictions count as wrong."""
    _check(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def invalid_rate(y_pred: Sequence[int]) -> float:
    if not y_pred:
        raise DownstreamError("no items to score")
    return sum(p == INVALID for p in y_pred) / len(y_pred)


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Support-weighted mean of per-class F1 (scikit-learn ``f1_score(average='weighted')``)."""
    _check(y_true, y_pred)
    support = Counter(y_true)
    predicted = Counter(y_pred)
    tp = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    total = 0.0
    for c, n_true in support.items():
        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (n_true + n_predicted); 0 when both are 0
        denom = n_true + predicted[c]
        total += n_true * (2 * tp[c] / denom if denom else 0.0)
    return total / len(y_true)


def mcc(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Multi-class Matthews correlation coefficient (scikit-learn ``matthews_corrcoef``)."""
    _check(y_true, y_pred)
    n = len(y_true)
    t_sum = Counter(y_true)  # row sums of the confusion matrix
    p_sum = Counter(y_pred)  # column sums
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    classes = set(t_sum) | set(p_sum)
    # integer arithmetic: exact, no overflow in Python
    cov_tp = correct * n - sum(t_sum[c] * p_sum[c] for c in classes)
    cov_pp = n * n - sum(p_sum[c] ** 2 for c in classes)
    cov_tt = n * n - sum(t_sum[c] ** 2 for c in classes)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_tt * cov_pp)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float | int]:
    """accuracy, invalid (rate), f1 (weighted), mcc, n, correct, invalid_count."""
    _check(y_true, y_pred)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "invalid": invalid_rate(y_pred),
        "f1": weighted_f1(y_true, y_pred),
        "mcc": mcc(y_true, y_pred),
        "n": len(y_true),
        "correct": sum(t == p for t, p in zip(y_true, y_pred)),
        "invalid_count": sum(p == INVALID for p in y_pred),
    }
