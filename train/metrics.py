"""Acc@k and mAP, vectorised, with scikit-learn's conventions (tests compare against sklearn)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """scores (N, C), labels (N,) int -> share of rows whose label is among the k highest scores.

    Ties are broken as scikit-learn breaks them: k = 1 is `accuracy_score` of the argmax (the lowest
    tied class wins); k > 1 is `top_k_accuracy_score` (a stable ascending sort, reversed).
    """
    if k == 1:
        return float((scores.argmax(1) == labels).mean())
    k = min(k, scores.shape[1])
    order = np.argsort(scores, axis=1, kind="stable")[:, ::-1][:, :k]  # (N, k)
    return float((order == labels[:, None]).any(1).mean())


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP (C,) as sklearn's `average_precision_score` (step-wise, ties grouped); NaN for a
    class without positives. scores (N, C) float, targets (N, C) bool."""
    n, c = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, C)
    s = np.take_along_axis(scores, order, 0)  # (N, C) descending
    t = np.take_along_axis(targets.astype(np.float64), order, 0)  # (N, C)
    tp = np.cumsum(t, 0)  # true positives within the top i+1, (N, C)
    # a threshold admits a whole tie group: precision and recall are read at the group's last row
    last = np.ones((n, c), dtype=bool)
    last[:-1] = s[:-1] != s[1:]
    end = np.where(last, np.arange(n)[:, None], n - 1)
    end = np.minimum.accumulate(end[::-1], 0)[::-1]  # (N, C) index of the last row of each row's group
    tp_end = np.take_along_axis(tp, end, 0)
    precision = tp_end / (end + 1)
    positives = t.sum(0)  # (C,)
    # AP = sum over thresholds of (R_k - R_{k-1}) P_k: each group's recall step is its positives
    ap = (precision * t).sum(0) / np.maximum(positives, 1)
    return np.where(positives > 0, ap, np.nan)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP over classes with at least one positive."""
    ap = average_precision(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def compute_metrics(scores: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict[str, float]:
    """activity (single label): acc1, acc5, map; atomic (multi-label): map."""
    if multi_label:
        return {"map": mean_average_precision(scores, labels.astype(bool))}
    onehot = np.zeros_like(scores, dtype=bool)
    onehot[np.arange(len(labels)), labels] = True
    return {
        "acc1": topk_accuracy(scores, labels, 1),
        "acc5": topk_accuracy(scores, labels, 5),
        "map": mean_average_precision(scores, onehot),
    }


def primary_metric(multi_label: bool) -> str:
    return "map" if multi_label else "acc1"
