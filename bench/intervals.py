"""Do the tables' intervals hold their 95 %? Simulated tables, the interval of train/stats.py against the crossed
bootstrap the tables used before (seeds and videos resampled together, percentile interval), side by side.

A simulated table has two rows, S seeds each, scored on the same N test videos; only the paired Δ is read.
- activity Acc@1: seed s of row r hits video v when w Z_v + √(1−w²) E_rsv < Φ⁻¹(p0 + δ_r + a_rs): Z_v the
  video's difficulty (shared by every run, so runs agree on most videos, as trained runs do), E the run's own
  noise on it, a_rs ~ N(0, σ) the seed's training luck (the seed noise being varied).
- atomic mAP: scores y_vc (μ + δ_r + a_rs) + w Z_vc + √(1−w²) E_rsvc over C classes, y_vc ~ Bernoulli(0.3).
Null (δ_A = δ_B): the share of tables whose Δ is starred (its interval excludes 0; one cell, so no correction),
nominal 5 %. Non-null: the share of intervals that cover the true Δ, the mean estimate over `truth` extra
tables (so it is the expected Δ at this N, finite-sample bias of mAP included), nominal 95 %. The per-seed Δ
SD printed is the measured SD of m_s − m'_s under the null, the figure the seed noise is read by.

Usage: python -m bench.intervals [--sims 300] [--smoke]. The last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.metrics import mean_average_precision  # noqa: E402
from train.stats import paired_difference, replicates  # noqa: E402

SEEDS = 3
SHARED = 0.8  # w: how much of a run's per-video outcome the video's difficulty decides
DESIGNS = {  # metric -> videos, classes, base level, true Δ of the non-null, seed-noise levels σ
    "acc1": dict(videos=512, classes=8, base=0.6, delta=0.04, sigmas=(0.0, 0.01, 0.02, 0.035, 0.045)),
    "map": dict(videos=256, classes=8, base=1.5, delta=0.3, sigmas=(0.0, 0.1, 0.2, 0.35)),
}


def simulate(metric: str, sigma: float, delta: float, rng: np.random.Generator, videos: int | None = None):
    """One table: (scores_a, scores_b) (S, N, C) each and the labels ((N,) for acc1, (N, C) for map)."""
    d = DESIGNS[metric]
    n, c = videos or d["videos"], d["classes"]
    shift = np.array([delta, 0.0])[:, None] + sigma * rng.standard_normal((2, SEEDS))  # (2, S) δ_r + a_rs
    if metric == "acc1":
        labels = rng.integers(0, c, n)  # (N,)
        z = rng.standard_normal(n)  # (N,) video difficulty
        e = rng.standard_normal((2, SEEDS, n))  # (2, S, N)
        p = np.clip(d["base"] + shift, 0.01, 0.99)
        hit = SHARED * z + np.sqrt(1 - SHARED**2) * e < norm.ppf(p)[..., None]  # (2, S, N)
        wrong = (labels + 1 + rng.integers(0, c - 1, n)) % c  # (N,) some other class
        top = np.where(hit, labels, wrong)  # (2, S, N) the predicted class
        scores = np.eye(c)[top]  # (2, S, N, C)
        return scores[0], scores[1], labels
    labels = rng.random((n, c)) < 0.3  # (N, C)
    z = rng.standard_normal((n, c))
    e = rng.standard_normal((2, SEEDS, n, c))
    scores = labels * (d["base"] + shift)[..., None, None] + SHARED * z + np.sqrt(1 - SHARED**2) * e  # (2, S, N, C)
    return scores[0], scores[1], labels


def crossed_bootstrap(a: np.ndarray, b: np.ndarray, labels: np.ndarray, metric: str, draws: int, rng) -> tuple:
    """The tables' interval before: seeds and videos resampled together, the percentile interval of the Δ."""
    S, N = a.shape[:2]
    seed_idx, video_idx = rng.integers(0, S, (draws, S)), rng.integers(0, N, (draws, N))
    if metric == "acc1":
        hits = (np.stack([a, b]).argmax(-1) == labels).astype(np.float64)  # (2, S, N)
        per = hits[:, seed_idx[:, :, None], video_idx[:, None, :]].mean((2, 3))  # (2, draws)
        diff = per[0] - per[1]
    else:
        diff = np.array(
            [
                np.mean(
                    [
                        mean_average_precision(a[s][v], labels[v]) - mean_average_precision(b[s][v], labels[v])
                        for s in ss
                    ]
                )
                for ss, v in zip(seed_idx, video_idx, strict=True)
            ]
        )
    return tuple(np.percentile(diff, [2.5, 97.5]))


def calibrate(metric: str, sigma: float, sims: int, truth: int, draws: int, seed: int = 0) -> dict[str, float]:
    """False-positive rate (null) and coverage (non-null) of both intervals at one seed-noise level."""
    rng = np.random.default_rng(seed)
    delta = DESIGNS[metric]["delta"]
    out = {"fp_new": 0, "fp_old": 0, "cover_new": 0, "cover_old": 0}
    per_seed = []
    for _ in range(sims):
        a, b, y = simulate(metric, sigma, 0.0, rng)
        d = paired_difference(a, b, y, metric)
        out["fp_new"] += d.excludes_zero()
        low, high = crossed_bootstrap(a, b, y, metric, draws, rng)
        out["fp_old"] += low > 0 or high < 0
        per_seed.append(replicates(a, y, metric).per_seed - replicates(b, y, metric).per_seed)
    true = np.mean([paired_difference(*simulate(metric, sigma, delta, rng), metric).estimate for _ in range(truth)])
    for _ in range(sims):
        a, b, y = simulate(metric, sigma, delta, rng)
        d = paired_difference(a, b, y, metric)
        out["cover_new"] += d.low <= true <= d.high
        low, high = crossed_bootstrap(a, b, y, metric, draws, rng)
        out["cover_old"] += low <= true <= high
    res = {k: v / sims for k, v in out.items()}
    res["seed_delta_sd"] = float(np.std(np.concatenate(per_seed), ddof=1))
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sims", type=int, default=300, help="simulated tables per cell (null and non-null each)")
    parser.add_argument("--smoke", action="store_true", help="a few tables per level: the same code path, fast")
    args = parser.parse_args(argv)
    sims, truth, draws = (8, 8, 50) if args.smoke else (args.sims, 2000, 400)
    t0 = time.perf_counter()
    figures = {}
    print(
        f"{SEEDS} seeds x 2 rows per table, {sims} null and {sims} non-null tables per level; old = crossed bootstrap"
    )
    print(f"{'metric':<8}{'sigma':>7}{'per-seed Δ SD':>15}{'FP old':>9}{'FP new':>9}{'cover old':>11}{'cover new':>11}")
    for metric, d in DESIGNS.items():
        worst = {"fp_new": 0.0, "fp_old": 0.0, "cover_new": 1.0, "cover_old": 1.0}
        for sigma in d["sigmas"]:
            r = calibrate(metric, sigma, sims, truth, draws)
            print(
                f"{metric:<8}{sigma:>7.3f}{100 * r['seed_delta_sd']:>13.1f}pt{100 * r['fp_old']:>8.1f}%"
                f"{100 * r['fp_new']:>8.1f}%{100 * r['cover_old']:>10.1f}%{100 * r['cover_new']:>10.1f}%"
            )
            worst = {k: (max if k.startswith("fp") else min)(worst[k], r[k]) for k in worst}
        figures.update({f"{metric}_{k}": f"{v:.3f}" for k, v in worst.items()})
    figures["seconds"] = f"{time.perf_counter() - t0:.1f}"
    print("worst over the seed-noise levels (max false-positive rate, min coverage):")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
