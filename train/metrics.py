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


def leave_one_out_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, C) per-class AP with row i left out, for every row i at once, exactly as `average_precision` on the
    other N − 1 rows (ties grouped as sklearn groups them); NaN where the class has no positive left.
    scores (N, C) float, targets (N, C) bool.

    With rows sorted by score, AP = (1/P) Σ_groups pos_g · TP_g / N_g (TP_g, N_g cumulative at the tie group's
    end). Leaving out a row of group g* (label y) removes y from P, pos_g* and every TP at or after g*, and one
    from every N at or after g*; the groups before are untouched. So each left-out AP is a prefix sum, the
    changed own-group term and a suffix sum, read off cumulative sums in O(N C) instead of N sorts."""
    n, c = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, C)
    s = np.take_along_axis(scores, order, 0)  # (N, C) descending
    t = np.take_along_axis(targets.astype(np.float64), order, 0)  # (N, C) labels in that order
    tp = np.cumsum(t, 0)  # (N, C)
    rows = np.arange(n)[:, None]
    last = np.ones((n, c), dtype=bool)  # the last row of its tie group
    last[:-1] = s[:-1] != s[1:]
    first = np.ones((n, c), dtype=bool)  # the first row of its tie group
    first[1:] = last[:-1]
    end = np.minimum.accumulate(np.where(last, rows, n - 1)[::-1], 0)[::-1]  # (N, C) its group's last row
    start = np.maximum.accumulate(np.where(first, rows, 0), 0)  # (N, C) its group's first row
    tp_end = np.take_along_axis(tp, end, 0)  # (N, C) TP_g of each row's group
    tp_before = np.where(start > 0, np.take_along_axis(tp, np.maximum(start - 1, 0), 0), 0.0)  # TP before the group
    pos = tp_end - tp_before  # (N, C) pos_g of each row's group
    count = (end + 1).astype(np.float64)  # (N, C) N_g
    fewer = np.maximum(count - 1, 1.0)  # N_g − 1 (a group after the left-out row's has N_g ≥ 2)
    term = np.where(last, pos * tp_end / count, 0.0)  # (N, C) each group's term, at its last row
    after_neg = np.where(last, pos * tp_end / fewer, 0.0)  # the term once a negative before it is left out
    after_pos = np.where(last, pos * (tp_end - 1) / fewer, 0.0)  # ... once a positive before it is left out
    csum, cneg, cpos = np.cumsum(term, 0), np.cumsum(after_neg, 0), np.cumsum(after_pos, 0)
    at = lambda a: np.take_along_axis(a, end, 0)  # noqa: E731  (N, C) a cumulative sum read at the row's group end
    prefix = at(csum) - np.take_along_axis(term, end, 0)  # the groups before the row's own
    suffix = np.where(t > 0, cpos[-1] - at(cpos), cneg[-1] - at(cneg))  # the groups after it
    own = np.where(count > 1, (pos - t) * (tp_end - t) / fewer, 0.0)  # the row's group without the row
    left = tp[-1][None] - t  # (N, C) positives left
    ap_sorted = np.where(left > 0, (prefix + own + suffix) / np.maximum(left, 1), np.nan)
    out = np.empty((n, c))
    np.put_along_axis(out, order, ap_sorted, 0)  # back to the rows' own order
    return out
