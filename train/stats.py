"""Confidence intervals for the tables: a bootstrap over test videos pooled with the seeds, and paired
differences between rows on the same test videos.

One draw resamples the row's seeds (S of S, with replacement) and the split's videos (N of N, with
replacement) and averages the metric of the drawn seeds on the drawn videos; the 95% interval is the
2.5th-97.5th percentile of `draws` such means. A paired difference draws the same seeds (by index: seed s
of one row against seed s of the other) and the same videos for both rows, so what the two rows share (the
test videos, the seeds' data orders) cancels; the difference of a row with itself is exactly 0 in every draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.metrics import mean_average_precision

DRAWS = 1000  # bootstrap draws per cell
CI_SEED = 0  # the draws are a function of this seed, the number of seeds and the number of videos only


@dataclass(frozen=True)
class Interval:
    estimate: float  # the metric's mean over the seeds on all videos
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def draw_indices(seeds: int, videos: int, draws: int = DRAWS, seed: int = CI_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(draws, seeds) seed indices and (draws, videos) video indices, with replacement."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, seeds, (draws, seeds)), rng.integers(0, videos, (draws, videos))


def per_draw(
    scores: np.ndarray,
    labels: np.ndarray,
    metric: str,
    seed_idx: np.ndarray,
    video_idx: np.ndarray,
    partner: np.ndarray | None = None,
):
    """The metric of every draw: scores (S, N, C) of S seeds, labels (N,) or (N, C) -> (draws,).

    Acc@k is a mean over videos of a per-video hit, so a draw is a gather of the (S, N) hit matrix; mAP is
    recomputed on every draw's videos (a loop over draws and seeds, never over videos or classes). `order`
    (single-label, every label with a partner class, `partner` (C,)): the share of videos whose top-1 class is
    their class's partner, the activity that holds the same actions in another order (lower is better)."""
    if metric in ("acc1", "acc5", "order"):
        if metric == "order":
            if partner is None or (partner[labels] < 0).any():
                raise ValueError("the order confusion needs every video's class to have a partner (`partner`)")
            hit = (scores.argmax(-1) == partner[labels][None]).astype(np.float64)  # (S, N)
        else:
            k = 1 if metric == "acc1" else 5
            top = np.argsort(-scores, axis=-1)[..., :k]  # (S, N, k)
            hit = (top == labels[None, :, None]).any(-1).astype(np.float64)  # (S, N)
        return hit[seed_idx[:, :, None], video_idx[:, None, :]].mean((1, 2))  # (draws,)
    if metric != "map":
        raise ValueError(f"no bootstrap for metric {metric!r}")
    positives = labels.astype(bool) if labels.ndim == 2 else np.eye(scores.shape[-1], dtype=bool)[labels]
    out = np.empty(len(seed_idx))
    for d, (seeds, videos) in enumerate(zip(seed_idx, video_idx, strict=True)):
        out[d] = np.mean([mean_average_precision(scores[s][videos], positives[videos]) for s in seeds])
    return out


def point(scores: np.ndarray, labels: np.ndarray, metric: str, partner: np.ndarray | None = None) -> float:
    """The metric averaged over the S seeds on all videos: scores (S, N, C)."""
    S, N = scores.shape[:2]
    return float(per_draw(scores, labels, metric, np.arange(S)[None], np.arange(N)[None], partner)[0])


def interval(
    scores: np.ndarray, labels: np.ndarray, metric: str, draws: int = DRAWS, partner: np.ndarray | None = None
) -> Interval:
    """Mean over seeds and its 95% bootstrap interval (videos and seeds resampled): scores (S, N, C)."""
    S, N = scores.shape[:2]
    seed_idx, video_idx = draw_indices(S, N, draws)
    values = per_draw(scores, labels, metric, seed_idx, video_idx, partner)
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(point(scores, labels, metric, partner), float(low), float(high))


def paired_difference(
    scores: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    metric: str,
    draws: int = DRAWS,
    partner: np.ndarray | None = None,
) -> Interval:
    """Row minus reference row on the same videos and seed indices, with its 95% bootstrap interval.
    scores (S, N, C), reference (S', N, C): the first min(S, S') seeds of each are paired."""
    S = min(len(scores), len(reference))
    scores, reference = scores[:S], reference[:S]
    seed_idx, video_idx = draw_indices(S, scores.shape[1], draws)
    diff = per_draw(scores, labels, metric, seed_idx, video_idx, partner) - per_draw(
        reference, labels, metric, seed_idx, video_idx, partner
    )
    low, high = np.percentile(diff, [2.5, 97.5])
    estimate = point(scores, labels, metric, partner) - point(reference, labels, metric, partner)
    return Interval(estimate, float(low), float(high))


def chance_level(labels: np.ndarray, metric: str, num_classes: int) -> float:
    """What a classifier without information scores: 1/C (Acc@1), min(5, C)/C (Acc@5), the mean positive
    rate per class (mAP of constant scores, in expectation of random ones)."""
    if metric in ("acc1", "order"):  # order: a random top-1 is the partner with probability 1/C
        return 1.0 / num_classes
    if metric == "acc5":
        return min(5, num_classes) / num_classes
    positives = labels.astype(bool) if labels.ndim == 2 else np.eye(num_classes, dtype=bool)[labels]
    return float(positives.mean(0)[positives.any(0)].mean())
