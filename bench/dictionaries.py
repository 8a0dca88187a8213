"""Benchmark the k-means behind `ltar dictionaries`: FAISS against scikit-learn, like for like.

Both cluster the same float32 data (N points drawn around K/4 seeded centres, L2-normalised like
CLIP features) into K centroids:
- same start: the same K random points (FAISS `init_centroids`, scikit-learn `init=`, `n_init=1`);
- same iterations: scikit-learn (`max_iter`, `tol=0`) runs first and stops early only on strict
  convergence (labels unchanged); FAISS, which never stops early, then gets `niter` = the iterations
  scikit-learn ran (from the same start, more would not move the centroids);
- every point: FAISS `max_points_per_centroid` is raised so it does not subsample;
- same threads: `faiss.omp_set_num_threads(T)` and `threadpoolctl.threadpool_limits(T)` (OpenMP and
  BLAS of both libraries) around both runs, OMP_WAIT_POLICY=PASSIVE for both (see below).
Only the training call is timed. Each result's objective is computed the same way afterwards: mean
squared L2 distance of every point to its nearest final centroid. With faiss-gpu and a GPU the same
run is timed on the GPU too (gpu_s), else gpu_s=none.

The same run measures this machine's sgemm (numpy float32 GEMM on the assignment step's shape, same
threads) and reports each library's achieved GFLOP/s (2 N K D flops per iteration) as a fraction of it:
both are BLAS-bound on CPU, so that fraction, not a ratio between them, says how close to the machine
k-means runs.

Run from the repository root: `.venv/bin/python bench/dictionaries.py` (N=100k, D=512, K=512, at
most 20 iterations), `--quick` (N=20k, D=128, K=128) or `--smoke`. The last line is key=value pairs.
"""

from __future__ import annotations

import argparse
import os
import time

# Both libraries run on GNU OpenMP; on a machine shared with other work, spinning threads stall each
# other (2 threads can be 8x slower than 1), so idle threads sleep, for both alike (set before import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32: points around k // 4 seeded unit centres, L2-normalised. K centroids over
    fewer, overlapping blobs keep Lloyd's iterations moving (no convergence within 20), as on real
    features that have no K well-separated clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, k // 4), d), dtype=np.float32)  # (k/4, d)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = np.float32(1.0 / np.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)  # (n, d), norm ~1
    x = centres[rng.integers(len(centres), size=n)] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # (n, d)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared L2 distance of every point (n, d) to its nearest centroid (k, d)."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, _ = index.search(x, 1)  # (n, 1)
    return float(dist.sum(dtype=np.float64) / len(x))


def run_faiss(x: np.ndarray, init: np.ndarray, niter: int, gpu: bool = False) -> tuple[np.ndarray, float]:
    import faiss

    n, d = x.shape
    k = len(init)
    km = faiss.Kmeans(
        d, k, niter=niter, seed=0, gpu=gpu, verbose=False, max_points_per_centroid=n // k + 1, min_points_per_centroid=1
    )
    t0 = time.perf_counter()
    km.train(x, init_centroids=init)
    return np.asarray(km.centroids), time.perf_counter() - t0


def run_sklearn(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[np.ndarray, float, int]:
    from sklearn.cluster import KMeans

    km = KMeans(len(init), init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=0)
    t0 = time.perf_counter()
    km.fit(x)
    return km.cluster_centers_.astype(np.float32), time.perf_counter() - t0, int(km.n_iter_)


def sgemm_gflops(n: int = 2048, d: int = 512, repeats: int = 5) -> float:
    """This machine's float32 GEMM throughput (BLAS through numpy, under the caller's thread limit) on the
    shape k-means' assignment step has: (n, d) @ (d, n); the best of `repeats`, GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, d), dtype=np.float32)
    b = rng.standard_normal((d, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * n * d / best / 1e9


def kmeans_gflop(n: int, d: int, k: int, niter: int) -> float:
    """The arithmetic of Lloyd's iterations as BLAS does it: each iteration's point-centroid inner products,
    2 n k d flops (the norms and the centroid update are O(n d), negligible beside it)."""
    return 2.0 * n * k * d * niter / 1e9


def main(argv: list[str] | None = None) -> None:
    import faiss
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=20k, D=128, K=128 instead of 100k, 512, 512")
    ap.add_argument("--niter", type=int, default=20, help="Lloyd iterations for both")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads for both")
    ap.add_argument("--smoke", action="store_true", help="N=2k, D=32, K=16: the same code path in seconds")
    args = ap.parse_args(argv)
    n, d, k = (20_000, 128, 128) if args.quick else (100_000, 512, 512)
    if args.smoke:
        n, d, k = 2_000, 32, 16
    x = blobs(n, d, k)  # (n, d)
    init = x[np.random.default_rng(1).choice(n, size=k, replace=False)]  # (k, d): the shared starting centroids

    faiss.omp_set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        c_sk, sklearn_s, niter = run_sklearn(x, init, args.niter)
        # scikit-learn stops at strict convergence (labels unchanged), FAISS never does: it gets the
        # iterations scikit-learn ran (more would not move the centroids from the same start)
        c_faiss, faiss_s = run_faiss(x, init, niter)
        peak = sgemm_gflops(256 if args.smoke else 2048, d)
    gpu_s = None
    if faiss.get_num_gpus() > 0:
        run_faiss(x, init, 1, gpu=True)  # warm-up: CUDA context, cuBLAS handles
        gpu_s = run_faiss(x, init, niter, gpu=True)[1]
    obj_faiss, obj_sk = objective(x, c_faiss), objective(x, c_sk)
    gap = (obj_faiss - obj_sk) / obj_sk
    print(
        f"k-means of {n} x {d} float32 into {k} centroids, same init, {niter} iterations each "
        f"(of at most {args.niter}), {args.threads} threads each, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
        f"(faiss {faiss.__version__})"
    )
    print(f"  faiss:        {faiss_s:8.2f} s   objective {obj_faiss:.6f}")
    print(f"  scikit-learn: {sklearn_s:8.2f} s   objective {obj_sk:.6f}")
    if gpu_s is not None:
        print(f"  faiss-gpu:    {gpu_s:8.2f} s")
    print(f"  faiss is {sklearn_s / faiss_s:.1f}x faster; objective gap (faiss - sklearn) / sklearn = {gap:+.2e}")
    work = kmeans_gflop(n, d, k, niter)
    faiss_frac, sk_frac = work / faiss_s / peak, work / sklearn_s / peak
    print(
        f"  against this machine's sgemm ({peak:.1f} GFLOP/s, {args.threads} threads): faiss "
        f"{work / faiss_s:.1f} GFLOP/s = {faiss_frac:.2f} of it, scikit-learn {work / sklearn_s:.1f} GFLOP/s = "
        f"{sk_frac:.2f} ({work:.1f} GFLOP of inner products in all)"
    )
    print(
        f"speedup={sklearn_s / faiss_s:.2f} objective_gap={gap:.2e} faiss_s={faiss_s:.2f} sklearn_s={sklearn_s:.2f} "
        f"sgemm_gflops={peak:.1f} faiss_of_sgemm={faiss_frac:.2f} sklearn_of_sgemm={sk_frac:.2f} "
        f"n={n} d={d} k={k} niter={niter} gpu_s={'none' if gpu_s is None else f'{gpu_s:.2f}'}"
    )


if __name__ == "__main__":
    main()
