"""Intervals for the tables that count both sources of noise, the test videos and the training seeds; paired
differences between rows; a family-wise correction over a table's Δ cells; the gap closed with its interval.

A row's estimate is θ = (1/S) Σ_s m_s, m_s the metric of seed s's run on all N test videos. Its variance has
two parts, estimated apart and added:
- **videos** (seeds fixed): the delete-one jackknife over test videos, var_V = (N−1)/N Σ_i (θ_(i) − θ_(·))², θ_(i)
  the estimate with video i left out. For a per-video mean (Acc@k, order confusion) that is exactly the sample
  variance of the per-video seed-mean hit over N; mAP is recomputed exactly with each video left out (in closed form,
  train.metrics.leave_one_out_average_precision). No Monte Carlo draw enters, so no star depends on a resampling seed.
- **seeds** (training noise): the between-seed sample variance of m_s over S, var_S = s²_m / S, on S − 1 degrees
  of freedom. Resampling S = 3 seeds with replacement, as the crossed bootstrap did, shrinks it by (S−1)/S and
  reads its tail off the [min, max] of three values; here it enters with a t quantile instead.

The 95 % interval is θ ± q √(var_V + var_S) with q = t_{0.975,ν}, ν the Welch–Satterthwaite degrees of freedom of
the sum (var_V on N − 1, var_S on S − 1), floored so that the seed part alone keeps its own t_{S−1} interval:
q √(var_V + var_S) ≥ t_{0.975,S−1} √var_S (`Replicates.quantile` says why). Where seed noise dominates at S = 3
the quantile is t_2 = 4.30, not 1.96. The seed × video interaction is counted in both parts, a small over-count
(conservative). With one seed the seed part cannot be estimated: the interval is the video part alone and says
so (`seed_noise`).

A paired difference applies the same to the per-seed differences d_s = m_s − m'_s (seed s of one row against
seed s of the other: they share the seed's data order and, for the modules they share, the initial weights) and
to the jackknife of the difference on the same videos, so what the rows share cancels; a row against itself is
exactly 0 with a zero-width interval. Its p-value is the two-sided t test of the same statistic; `holm` turns a
table's p-values into family-wise adjusted ones. `gap_closed` is a ratio of two such differences with Fieller's
interval, which is bounded only where the denominator (the oracle's gap) is itself resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from train.metrics import average_precision, leave_one_out_average_precision

LEVEL = 0.95  # every interval's coverage; a Δ's star is its Holm-adjusted p below 1 - LEVEL


@dataclass(frozen=True)
class Interval:
    estimate: float  # the metric's mean over the seeds on all videos (or a difference / ratio of such means)
    low: float
    high: float
    se: float = float("nan")  # √(var_V + var_S)
    df: float = float("nan")  # Welch–Satterthwaite degrees of freedom of the t quantile
    p: float = float("nan")  # two-sided p of "the estimate is 0" (meaningful for a difference)
    seeds: int = 0  # how many seeds it rests on
    seed_noise: bool = True  # False with one seed: training noise is not counted

    def excludes_zero(self) -> bool:
        """The uncorrected interval excludes 0 (the table's star also needs the family-wise correction)."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Replicates:
    """What an interval needs of one cell, closed under linear combination (differences, Fieller's a − R b):
    per_seed (S,) the metric of each seed on all videos, loo (N,) the seed-mean with each video left out."""

    per_seed: np.ndarray  # (S,) m_s
    loo: np.ndarray  # (N,) θ_(i)

    @property
    def estimate(self) -> float:
        return float(self.per_seed.mean())

    def __sub__(self, other: Replicates) -> Replicates:
        if len(self.per_seed) != len(other.per_seed):
            raise ValueError(
                f"a paired difference needs the same seeds in both rows, got {len(self.per_seed)} and "
                f"{len(other.per_seed)}; train both rows with the same --seeds"
            )
        if len(self.loo) != len(other.loo):
            raise ValueError(f"a paired difference needs the same videos, got {len(self.loo)} and {len(other.loo)}")
        return Replicates(self.per_seed - other.per_seed, self.loo - other.loo)

    def scaled(self, factor: float) -> Replicates:
        return Replicates(factor * self.per_seed, factor * self.loo)

    def variances(self) -> tuple[float, float]:
        """(var_V, var_S) of the estimate: the jackknife over videos and the between-seed variance / S."""
        n, s = len(self.loo), len(self.per_seed)
        var_v = (n - 1) / n * float(np.sum((self.loo - self.loo.mean()) ** 2)) if n > 1 else 0.0
        var_s = float(self.per_seed.var(ddof=1)) / s if s > 1 else 0.0
        return var_v, var_s

    def degrees_of_freedom(self) -> float:
        n, s = len(self.loo), len(self.per_seed)
        var_v, var_s = self.variances()
        if s < 2:
            return float(max(n - 1, 1))
        parts = var_v**2 / max(n - 1, 1) + var_s**2 / (s - 1)
        return (var_v + var_s) ** 2 / parts if parts > 0 else float(s - 1)

    def quantile(self, level: float = LEVEL) -> float:
        """The multiplier of the standard error: t at Satterthwaite's ν, floored so that the seed part alone
        gets at least its own t_{S−1} interval (Satterthwaite's ν̂ grows when the seed variance happens to be
        small, which makes the plain rule cover 92.6 % at S = 3; floored, 95.0-95.5 % over every mix of the two
        parts in a Gaussian simulation, and 94.3 % or more at S ≥ 5)."""
        var_v, var_s = self.variances()
        if var_v + var_s == 0:  # a constant (a row against itself): no spread for a multiplier to scale
            return float(student_t.ppf(0.5 + level / 2, max(len(self.loo) - 1, 1)))
        q = float(student_t.ppf(0.5 + level / 2, self.degrees_of_freedom()))
        if len(self.per_seed) > 1 and var_s > 0:
            q = max(q, float(student_t.ppf(0.5 + level / 2, len(self.per_seed) - 1)) * np.sqrt(var_s / (var_v + var_s)))
        return q

    def interval(self) -> Interval:
        estimate = self.estimate
        var_v, var_s = self.variances()
        se = float(np.sqrt(var_v + var_s))
        df, seeds = self.degrees_of_freedom(), len(self.per_seed)
        half = self.quantile() * se
        if se > 0:  # the level at which the interval just touches 0: both rules must exclude it
            p = float(2 * student_t.sf(abs(estimate) / se, df))
            if seeds > 1 and var_s > 0:
                p = max(p, float(2 * student_t.sf(abs(estimate) / np.sqrt(var_s), seeds - 1)))
        else:  # no spread at all: a row against itself (p = 1), or a difference no draw could undo
            p = 1.0 if estimate == 0 else 0.0
        return Interval(estimate, estimate - half, estimate + half, se, df, p, seeds, seeds > 1)


def _hits(scores: np.ndarray, labels: np.ndarray, metric: str, partner: np.ndarray | None) -> np.ndarray:
    """(S, N) per-video hit of a per-video-mean metric: scores (S, N, C), labels (N,)."""
    if metric == "order":
        if partner is None or (partner[labels] < 0).any():
            raise ValueError("the order confusion needs every video's class to have a partner (`partner`)")
        return (scores.argmax(-1) == partner[labels][None]).astype(np.float64)
    if metric == "acc1":
        return (scores.argmax(-1) == labels[None]).astype(np.float64)
    k = min(5, scores.shape[-1])  # acc5: ties broken as train.metrics.topk_accuracy breaks them (sklearn's)
    top = np.argsort(scores, axis=-1, kind="stable")[..., ::-1][..., :k]  # (S, N, k)
    return (top == labels[None, :, None]).any(-1).astype(np.float64)


def replicates(scores: np.ndarray, labels: np.ndarray, metric: str, partner: np.ndarray | None = None) -> Replicates:
    """The per-seed metric and the leave-one-video-out seed-mean of a cell: scores (S, N, C), labels (N,) or (N, C).

    mAP averages AP over one class set, the classes with a positive in the whole split (a left-out video never
    changes which classes count); a class whose only positive is the left-out video keeps its whole-split AP."""
    S, N, C = scores.shape
    if metric in ("acc1", "acc5", "order"):
        hits = _hits(scores, labels, metric, partner)  # (S, N)
        h = hits.mean(0)  # (N,) the seed-mean hit of each video
        loo = (h.sum() - h) / (N - 1) if N > 1 else h.copy()  # (N,) θ_(i), exactly
        return Replicates(hits.mean(1), loo)
    if metric != "map":
        raise ValueError(f"no interval for metric {metric!r}")
    positives = labels.astype(bool) if labels.ndim == 2 else np.eye(C, dtype=bool)[labels]  # (N, C)
    keep = positives.any(0)  # (C,) the split's class set
    K = int(keep.sum())
    x = scores[:, :, keep].transpose(1, 0, 2).reshape(N, S * K)  # (N, S·K): every seed's classes side by side
    y = np.tile(positives[:, keep], (1, S))  # (N, S·K)
    full = average_precision(x, y).reshape(S, K)  # (S, K)
    left_out = leave_one_out_average_precision(x, y).reshape(N, S, K)  # (N, S, K) every video left out once
    loo = np.where(np.isnan(left_out), full[None], left_out).mean((1, 2))  # (N,) θ_(i)
    return Replicates(full.mean(1), loo)


def interval(scores: np.ndarray, labels: np.ndarray, metric: str, partner: np.ndarray | None = None) -> Interval:
    """Mean over seeds with its 95 % interval counting video and seed noise: scores (S, N, C)."""
    return replicates(scores, labels, metric, partner).interval()


def paired_difference(
    scores: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    metric: str,
    partner: np.ndarray | None = None,
) -> Interval:
    """Row minus reference row on the same videos, seed s against seed s, with its interval and p-value:
    scores and reference (S, N, C) (the same S; anything else is refused, never silently truncated)."""
    return (replicates(scores, labels, metric, partner) - replicates(reference, labels, metric, partner)).interval()


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error) for the p-values `p` (K,), in their order."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    k = len(p)
    stepped = np.maximum.accumulate((k - np.arange(k)) * p[order])  # (K,) in ascending p order
    out = np.empty(k)
    out[order] = np.minimum(stepped, 1.0)
    return out


@dataclass(frozen=True)
class GapClosed:
    """(row − baseline) / (oracle − baseline) with Fieller's interval; `status` says whether it can be read."""

    estimate: float
    low: float
    high: float
    status: str  # "resolved" (the oracle's gap is resolved, the interval bounded) or "unstable" (it is not)


def fieller_ratio(a: Replicates, b: Replicates) -> GapClosed:
    """a / b with Fieller's 95 % interval: the R with (a − R b)² ≤ t² Var(a − R b), Var from the same two parts
    as every interval (jackknife over videos + between seeds / S), q the larger of a's and b's own multipliers.
    Bounded exactly when b² > q² Var(b), i.e. b resolved from 0 (at b's own multiplier: the oracle's Δ interval
    excludes 0; at a larger one when the row's difference is the noisier); otherwise `unstable`, and only the
    point estimate is given. The baseline's row is 0 [0, 0] and the oracle's 1 [1, 1] wherever the gap is
    resolved."""
    ratio = a.estimate / b.estimate if b.estimate != 0 else float("nan")
    q = max(a.quantile(), b.quantile())  # the larger of the two differences' own multipliers

    def parts(u: Replicates, v: Replicates) -> float:  # Cov(u, v) with the same two parts
        n, s = len(u.loo), len(u.per_seed)
        cov_v = (n - 1) / n * float(np.sum((u.loo - u.loo.mean()) * (v.loo - v.loo.mean()))) if n > 1 else 0.0
        cov_s = float(np.cov(u.per_seed, v.per_seed, ddof=1)[0, 1]) / s if s > 1 else 0.0
        return cov_v + cov_s

    va, vb, cab = parts(a, a), parts(b, b), parts(a, b)
    ea, eb = a.estimate, b.estimate
    qa, qb, qc = eb**2 - q**2 * vb, ea * eb - q**2 * cab, ea**2 - q**2 * va  # qa R² − 2 qb R + qc ≤ 0
    disc = qb**2 - qa * qc
    if qa <= 0 or disc < 0:
        return GapClosed(ratio, float("nan"), float("nan"), "unstable")
    root = float(np.sqrt(disc))
    return GapClosed(ratio, (qb - root) / qa, (qb + root) / qa, "resolved")


def chance_level(labels: np.ndarray, metric: str, num_classes: int) -> float:
    """What a classifier without information scores: 1/C (Acc@1), min(5, C)/C (Acc@5), the mean positive
    rate per class (mAP of constant scores, in expectation of random ones)."""
    if metric in ("acc1", "order"):  # order: a random top-1 is the partner with probability 1/C
        return 1.0 / num_classes
    if metric == "acc5":
        return min(5, num_classes) / num_classes
    positives = labels.astype(bool) if labels.ndim == 2 else np.eye(num_classes, dtype=bool)[labels]
    return float(positives.mean(0)[positives.any(0)].mean())
