"""`ltar dictionaries`: the confounder dictionary Z and the global dictionary G, built from the cache.

Each configured `DictionarySpec` (`dictionaries.<name>` in pipeline.yaml) reads the real frames of one
split's finished videos from one per-frame array of the store (`clip/bg` for Z, `clip/frame` or
`timesformer/frame` for G), streamed block-wise with dask so memory stays bounded, and writes
`dictionaries/<name>/` into the same store (arrays and attributes: the block at the end of
extract/schema.py). Variants (ECRL Table 5):

- `kmeans`: FAISS k-means (GPU when faiss-gpu sees one, CPU otherwise), seeded, on a seeded subsample
  of at most `max_points` points, optionally after a FAISS PCA to `pca` dims. The prior
  `p(z_i) = N_i / N` counts every point of the split, assigned with the trained centroids.
- `random`: K points drawn (seeded) from the split's points; uniform prior.
- `noise`: K random vectors (seeded standard normal in D, L2-normalised when `spherical`), no data at all: ECRL
  Table 5's "random features"; uniform prior. The split's points are still assigned, for the objective.
- `average`: one entry per class of `task`, the mean of the real frames of the split's videos that
  carry the class (multi-label: every class a video carries); prior = class frequency over videos.
  `size` is ignored: K is the number of classes (the attrs keep `size_requested`). A class without a
  video in the split gets a zero entry and prior 0 (listed in the attrs as `empty_classes`).

Heads use `centroids` (K, D) and `prior` (K,): `centroids` is always in the source array's space.
With PCA, the clusters are found in the P-dim PCA space and each entry is its cluster's mean feature in D (the
mean of the split's points assigned to it, accumulated in the assignment pass; ECRL Sec. 4.2.1's "z_i is the
average feature of its cluster"; L2-normalised when `spherical`); `pca_centroids`, `pca_matrix` and
`pca_mean` are stored too, for a head that works in the PCA space (`Dictionary.project`).

Videos whose extraction failed (recorded in the store's `failures`) are skipped and counted; rows
of the split that are simply not extracted yet stop the run. Re-running with the same parameters
over the same rows is a no-op (the stored `params_hash`); a changed spec rewrites only that
dictionary; the cache's feature arrays are never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import DictionarySpec
from extract.contract import schema
from extract.contract.config import Config, to_dict
from extract.contract.schema import CacheError

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20  # fp32 bytes of one streamed block of rows (rounded to whole shards)


class DictionaryError(RuntimeError):
    """A dictionary cannot be built from this store with this spec; the message says what to do."""


@dataclass
class DictionaryResult:
    """What one `build_dictionary` call did; `str()` is its one-line report."""

    name: str
    variant: str
    size: int  # K written
    points_used: int  # points the entries were computed from
    points_total: int  # real frames of the split the prior counts
    objective: float  # mean squared distance of the split's points to their nearest entry
    seconds: float  # this call
    device: str
    status: str  # written | rewritten (parameters changed) | unchanged (same parameters)
    store: Path

    def line(self) -> str:
        return (
            f"{self.name}: {self.variant} K={self.size} points={self.points_used}/{self.points_total} "
            f"objective={self.objective:.4g} seconds={self.seconds:.2f} device={self.device} {self.status}"
        )

    __str__ = line


@dataclass
class Dictionary:
    """A dictionary as heads read it.

    centroids (K, D) float32, prior (K,) float32; with PCA also pca_centroids (K, P),
    pca_matrix (P, D), pca_mean (D,).
    """

    name: str
    centroids: np.ndarray
    prior: np.ndarray
    attrs: dict[str, Any]
    pca_centroids: np.ndarray | None = None
    pca_matrix: np.ndarray | None = None
    pca_mean: np.ndarray | None = None

    def project(self, x: np.ndarray) -> np.ndarray:
        """(..., D) source features -> (..., P) in the PCA space the k-means ran in."""
        if self.pca_matrix is None:
            raise DictionaryError(f"dictionary {self.name!r} was built without PCA; use its centroids as they are")
        return (x - self.pca_mean) @ self.pca_matrix.T  # (..., P)


def load_dictionary(store_path: str | Path, name: str) -> Dictionary:
    """Read `dictionaries/<name>` from a store (raises DictionaryError when it is not there)."""
    group, _ = schema.open_cache(store_path)
    path = schema.dictionary_path(name)
    if path not in group or "params_hash" not in group[path].attrs:
        raise DictionaryError(
            f"dictionary {name!r} is not in {store_path}; add dictionaries.{name} to the config and run "
            "`ltar dictionaries`"
        )
    sub = group[path]
    arrays = {n: np.asarray(sub[n][:]) for n, _ in sub.arrays()}
    return Dictionary(
        name=name,
        centroids=arrays[schema.DICT_CENTROIDS],
        prior=arrays[schema.DICT_PRIOR],
        attrs=dict(sub.attrs),
        pca_centroids=arrays.get(schema.DICT_PCA_CENTROIDS),
        pca_matrix=arrays.get(schema.DICT_PCA_MATRIX),
        pca_mean=arrays.get(schema.DICT_PCA_MEAN),
    )


# ---------------------------------------------------------------------------------------------
# Reading the split's points, block by block
# ---------------------------------------------------------------------------------------------


@dataclass
class _Points:
    """The real frames of one split's finished videos in one (N, L, D) source array.

    Point p is the p-th True of `keep` (N, L) in row-major order; blocks of whole rows are read
    with dask, so at most one block of float32 points is in memory at a time.
    """

    key: str  # `dictionaries.<name>` for error messages
    store: Path
    source: str
    array: Any  # dask array (N, L, D) float16, chunked by blocks of rows
    keep: np.ndarray  # (N, L) bool
    used_rows: np.ndarray  # (V,) the split's finished rows
    skipped_failed: int  # the split's rows skipped because their extraction failed
    video_ids: list[str]
    feature_dim: str  # the source's last dimension name
    bounds: np.ndarray = field(init=False)  # (B + 1,) row bounds of the dask blocks
    starts: np.ndarray = field(init=False)  # (B,) first point of each block
    counts: np.ndarray = field(init=False)  # (B,) points in each block

    def __post_init__(self) -> None:
        self.bounds = np.cumsum((0, *self.array.chunks[0]))  # (B + 1,)
        self.counts = np.add.reduceat(self.keep.sum(1), self.bounds[:-1])  # (B,)
        self.starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))  # (B,)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def dim(self) -> int:
        return int(self.array.shape[2])

    def blocks(
        self, only: np.ndarray | None = None, progress: bool = False, desc: str = ""
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (first point index, x (P, D) float32, video row (P,)) per block holding points.

        `only` (sorted point indices) skips the blocks that hold none of them. Non-finite values
        stop the run with the videos that hold them.
        """
        from tqdm import tqdm

        todo = np.flatnonzero(self.counts > 0)
        if only is not None:  # blocks whose point range [start, start + count) holds an index of `only`
            hits = np.searchsorted(only, self.starts + self.counts) - np.searchsorted(only, self.starts)
            todo = todo[hits[todo] > 0]
        for b in tqdm(todo, desc=desc, unit="block", disable=not progress, leave=False):
            r0, r1 = self.bounds[b], self.bounds[b + 1]
            keep = self.keep[r0:r1]  # (R, L)
            block = np.asarray(self.array.blocks[b].compute(scheduler="threads"))  # (R, L, D) float16
            x = block[keep].astype(np.float32)  # (P, D)
            rows = np.nonzero(keep)[0] + r0  # (P,)
            finite = np.isfinite(x).all(1)  # (P,)
            if not finite.all():
                bad = sorted({self.video_ids[r] for r in rows[~finite]})
                raise DictionaryError(
                    f"{self.key}.source: {self.source} in {self.store} holds NaN or inf in video(s) "
                    f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; the store is damaged: delete it "
                    "and run `ltar extract` again"
                )
            yield int(self.starts[b]), x, rows

    def gather(self, indices: np.ndarray, progress: bool = False, desc: str = "") -> np.ndarray:
        """Points at sorted `indices` -> (M, D) float32, in index order."""
        out = np.empty((len(indices), self.dim), dtype=np.float32)  # (M, D)
        for start, x, _ in self.blocks(indices, progress, desc):
            a, b = np.searchsorted(indices, [start, start + len(x)])
            out[a:b] = x[indices[a:b] - start]
        return out

    def rows_digest(self) -> str:
        """Hash of which points are used: rows and their frame masks."""
        h = hashlib.sha256(np.ascontiguousarray(self.used_rows, dtype=np.int64).tobytes())
        h.update(np.packbits(self.keep[self.used_rows]).tobytes())
        return h.hexdigest()


def _open_points(group: Any, info: schema.CacheInfo, name: str, spec: DictionarySpec, block_rows: int | None):
    import dask.array as da

    key = f"dictionaries.{name}"
    path = info.path
    if spec.source not in group:
        present = [s for s in schema.DICTIONARY_SOURCES if s in group]
        raise DictionaryError(
            f"{key}.source: array {spec.source!r} is not in {path}; set it to one the store holds "
            f"({', '.join(present) or 'none: re-extract the store'})"
        )
    arr = group[spec.source]
    if arr.ndim != 3:
        raise DictionaryError(
            f"{key}.source: {spec.source!r} has shape {arr.shape}, not (videos, frames, features); choose one "
            f"of {', '.join(schema.DICTIONARY_SOURCES)}"
        )
    n, L, D = arr.shape
    splits = np.asarray(info.splits)
    rows = np.flatnonzero(splits == spec.split)  # (S,)
    if rows.size == 0:
        raise DictionaryError(
            f"{key}.split: split {spec.split!r} has no videos in {path}; the store holds "
            f"{sorted(set(info.splits))}: set {key}.split to one of them"
        )
    done = np.asarray(group[schema.DONE][:])  # (N,)
    failed = np.isin(np.asarray(info.video_ids, dtype=object)[rows], list(info.failures))  # (S,)
    pending = rows[~done[rows] & ~failed]
    if pending.size:
        raise DictionaryError(
            f"{pending.size} of the {rows.size} videos of split {spec.split!r} are not extracted yet in {path} "
            f"(e.g. {info.video_ids[pending[0]]}); run `ltar extract` to finish the store, then "
            "`ltar dictionaries`"
        )
    used = rows[done[rows]]  # (V,)
    keep = np.zeros((n, L), dtype=bool)  # (N, L)
    keep[used] = np.asarray(group[schema.FRAME_MASK][:])[used]
    if not keep.any():
        raise DictionaryError(
            f"{key}.split: split {spec.split!r} of {path} has no extracted frame ({rows.size} videos, "
            f"{int(failed.sum())} failed); fix the failed videos (`ltar inspect` lists them) and run `ltar extract`"
        )
    if block_rows is None:
        shards = max(1, BLOCK_BYTES // (schema.SHARD_VIDEOS * L * D * 4))
        block_rows = schema.SHARD_VIDEOS * shards
    array = da.from_zarr(str(path), component=spec.source, chunks=(min(block_rows, n), L, D))
    dims = arr.metadata.dimension_names or ("video", "frame", "feature")
    return _Points(key, path, spec.source, array, keep, used, int(failed.sum()), info.video_ids, dims[-1])


# ---------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows to unit L2 norm; zero rows stay zero. (K, D) -> (K, D)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)  # (K, 1)
    return (x / np.where(norm > 0, norm, 1)).astype(np.float32)


# Distributions that install the module `faiss`: more than one of them overwrite each other's files, and which build
# then runs depends on the install order (pyproject.toml's `cpu` and `gpu` extras install exactly one).
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss")


def faiss_build() -> dict[str, Any]:
    """Which FAISS runs: the installed distributions {name: version}, the module's version, whether it was built with
    GPU support, and the GPUs it sees."""
    from importlib import metadata

    import faiss

    installed = {}
    for name in FAISS_DISTRIBUTIONS:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    gpu_support = hasattr(faiss, "StandardGpuResources")
    return {
        "distributions": installed,
        "version": faiss.__version__,
        "gpu_support": gpu_support,
        "gpus": int(faiss.get_num_gpus()) if gpu_support and hasattr(faiss, "get_num_gpus") else 0,
    }


def check_faiss_build(build: dict[str, Any], cuda_available: bool) -> None:
    """Refuse a shadowed install (a CPU and a GPU FAISS distribution side by side); warn when a CUDA GPU is present
    but the FAISS that runs cannot use it."""
    dists = build["distributions"]
    gpu_dists = [d for d in dists if d.startswith("faiss-gpu")]
    if "faiss-cpu" in dists and gpu_dists:
        shown = ", ".join(f"{d} {v}" for d, v in dists.items())
        raise DictionaryError(
            f"both a CPU and a GPU FAISS are installed ({shown}); both install the module `faiss`, so the one "
            f"installed last runs (now the {'GPU' if build['gpu_support'] else 'CPU'} build). Keep one: "
            "`make setup FAISS=gpu` (or `pip uninstall -y faiss-cpu`) on a GPU machine, `make setup FAISS=cpu` "
            "elsewhere"
        )
    if cuda_available and not build["gpu_support"]:
        log.warning(
            "a CUDA GPU is present but FAISS %s is a CPU build: k-means runs on the CPU; `make setup FAISS=gpu` "
            "installs faiss-gpu-cu12 in its place",
            build["version"],
        )


def _device() -> tuple[bool, str]:
    import faiss

    build = faiss_build()
    shown = ", ".join(f"{d} {v}" for d, v in build["distributions"].items()) or f"faiss {build['version']}"
    if build["gpus"] > 0:
        return True, f"gpu ({build['gpus']} GPU{'s' if build['gpus'] > 1 else ''}; {shown})"
    return False, f"cpu ({faiss.omp_get_max_threads()} threads; {shown})"


def _assign(
    pts: _Points, entries: np.ndarray, transform: Any, gpu: bool, progress: bool, desc: str, sums: bool = False
):
    """Nearest entry of every point of the split. entries (K, d) in the space `transform` maps to.

    Returns counts (K,) int64 and the mean squared L2 distance to the nearest entry; with `sums`, also the sum
    (K, D) of the points assigned to each entry in their own (untransformed) space, for cluster means.
    """
    import faiss

    K, d = entries.shape
    index = faiss.IndexFlatL2(d)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(entries, dtype=np.float32))
    counts = np.zeros(K, dtype=np.int64)  # (K,)
    total = np.zeros((K, pts.dim), dtype=np.float64) if sums else None  # (K, D)
    sse = 0.0
    for _, x, _ in pts.blocks(progress=progress, desc=desc):
        xt = transform.apply(x) if transform is not None else x  # (P, d)
        dist, nearest = index.search(np.ascontiguousarray(xt), 1)  # (P, 1), (P, 1)
        counts += np.bincount(nearest[:, 0], minlength=K)
        sse += float(dist.sum(dtype=np.float64))
        if total is not None:
            np.add.at(total, nearest[:, 0], x)  # each point into its entry's sum, (K, D)
    if sums:
        return counts, sse / pts.total, total
    return counts, sse / pts.total


def _check_size(pts: _Points, key: str, k: int, available: int) -> None:
    if k > pts.total:
        raise DictionaryError(
            f"{key}.size: K = {k} is larger than the {pts.total} points (real frames of {len(pts.used_rows)} "
            f"videos) of the split in {pts.source}; lower {key}.size or extract more videos"
        )
    if k > available:
        raise DictionaryError(
            f"{key}.max_points: the subsample of {available} points is smaller than K = {k}; raise "
            f"{key}.max_points (or set it to null) or lower {key}.size"
        )


def _kmeans(pts: _Points, spec: DictionarySpec, key: str, progress: bool) -> dict[str, Any]:
    import faiss

    K, D = spec.size, pts.dim
    m = pts.total if spec.max_points is None else min(spec.max_points, pts.total)
    _check_size(pts, key, K, m)
    if spec.pca is not None and spec.pca > D:
        raise DictionaryError(
            f"{key}.pca: {spec.pca} dims is more than the {D} of {spec.source}; set {key}.pca to at most {D} or null"
        )
    rng = np.random.default_rng(spec.seed)
    chosen = np.sort(rng.choice(pts.total, size=m, replace=False)) if m < pts.total else np.arange(pts.total)
    x = pts.gather(chosen, progress, f"{key}: read")  # (M, D)
    pca = None
    if spec.pca is not None:
        pca = faiss.PCAMatrix(D, spec.pca)
        pca.train(x)
        x = pca.apply(x)  # (M, P)
    gpu, device = _device()
    init = {}
    if spec.init == "kmeans++":
        if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            raise DictionaryError(
                f"{key}.init: this FAISS ({faiss.__version__}) has no k-means++ seeding; set {key}.init to random "
                "or install a FAISS release that offers it"
            )
        init["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km = faiss.Kmeans(
        x.shape[1],
        K,
        niter=spec.niter,
        nredo=spec.nredo,
        seed=spec.seed,
        spherical=spec.spherical,
        gpu=gpu,
        verbose=False,
        # max_points is our seeded subsample: FAISS must not subsample again
        max_points_per_centroid=m // K + 1,
        min_points_per_centroid=1,  # FAISS only warns below 39 per centroid; small demos are fine
        **init,
    )
    km.train(x)
    found = np.asarray(km.centroids, dtype=np.float32)  # (K, P or D)
    if pca is None:
        counts, objective = _assign(pts, found, pca, gpu, progress, f"{key}: assign")
    else:
        counts, objective, sums = _assign(pts, found, pca, gpu, progress, f"{key}: assign", sums=True)
    out: dict[str, Any] = {"prior": counts / counts.sum(), "objective": objective, "points_used": m}
    out.update(device=device, iterations=spec.niter * spec.nredo)
    if pca is None:
        out["centroids"] = found
    else:
        A = faiss.vector_to_array(pca.A).reshape(spec.pca, D)  # (P, D), orthonormal rows
        mean = faiss.vector_to_array(pca.mean).astype(np.float32)  # (D,)
        # each entry is its cluster's mean feature in D (ECRL Sec. 4.2.1: "z_i is the average feature of its
        # cluster"), the clusters found in the PCA space and every point of the split assigned there; an entry no
        # point chose keeps the point of the PCA subspace its centroid stands for
        back = found @ A + mean  # (K, D)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], back)  # (K, D)
        out["centroids"] = _normalise(means) if spec.spherical else means.astype(np.float32)
        out[schema.DICT_PCA_CENTROIDS] = found
        out[schema.DICT_PCA_MATRIX] = A
        out[schema.DICT_PCA_MEAN] = mean
    return out


def _random(pts: _Points, spec: DictionarySpec, key: str, progress: bool) -> dict[str, Any]:
    K = spec.size
    _check_size(pts, key, K, pts.total)
    chosen = np.sort(np.random.default_rng(spec.seed).choice(pts.total, size=K, replace=False))
    x = pts.gather(chosen, progress, f"{key}: read")  # (K, D)
    entries = _normalise(x) if spec.spherical else x
    gpu, device = _device()
    _, objective = _assign(pts, entries, None, gpu, progress, f"{key}: assign")
    prior = np.full(K, 1.0 / K)  # (K,)
    return {"centroids": entries, "prior": prior, "objective": objective, "points_used": K, "device": device}


def _noise(pts: _Points, spec: DictionarySpec, key: str, progress: bool) -> dict[str, Any]:
    K = spec.size
    x = np.random.default_rng(spec.seed).standard_normal((K, pts.dim)).astype(np.float32)  # (K, D)
    entries = _normalise(x) if spec.spherical else x
    gpu, device = _device()
    _, objective = _assign(pts, entries, None, gpu, progress, f"{key}: assign")
    prior = np.full(K, 1.0 / K)  # (K,)
    return {"centroids": entries, "prior": prior, "objective": objective, "points_used": 0, "device": device}


def _average(pts: _Points, spec: DictionarySpec, key: str, group: Any, info: schema.CacheInfo, progress: bool):
    name = f"{schema.LABELS}/{spec.task}"
    if name not in group or spec.task not in info.vocabularies:
        raise DictionaryError(
            f"{key}.task: the store {pts.store} has no labels for task {spec.task!r}; set {key}.task to one of "
            f"{sorted(info.vocabularies)}"
        )
    vocab = info.vocabularies[spec.task]
    names = list(vocab["names"])
    C = len(names)
    labels = np.asarray(group[name][:])  # (N,) int32 or (N, C) bool
    if labels.ndim == 1:  # single label, -1 = none -> multi-hot (N, C)
        hot = labels[:, None] == np.arange(C)[None, :]
    else:
        hot = labels.astype(bool)
    videos = hot[pts.used_rows].sum(0)  # (C,) videos of the split carrying each class
    if videos.sum() == 0:
        raise DictionaryError(
            f"{key}.task: no video of split {spec.split!r} has a {spec.task!r} label in {pts.store}; choose another "
            f"{key}.task or {key}.variant"
        )
    sums = np.zeros((C, pts.dim))  # (C, D) float64
    frames = np.zeros(C)  # (C,)
    for _, x, rows in pts.blocks(progress=progress, desc=f"{key}: average"):
        member = hot[rows].astype(np.float64)  # (P, C)
        sums += member.T @ x  # (C, D)
        frames += member.sum(0)
    means = (sums / np.maximum(frames, 1)[:, None]).astype(np.float32)  # (C, D), zero for empty classes
    entries = _normalise(means) if spec.spherical else means
    gpu, device = _device()
    _, objective = _assign(pts, entries, None, gpu, progress, f"{key}: assign")
    empty = [names[c] for c in np.flatnonzero(videos == 0)]
    if empty:
        log.warning(
            "%s: %d classes of %r have no video in split %r: zero entries", key, len(empty), spec.task, spec.split
        )
    return {
        "centroids": entries,
        "prior": videos / videos.sum(),
        "objective": objective,
        "points_used": pts.total,
        "device": device,
        "empty_classes": empty,
    }


# ---------------------------------------------------------------------------------------------
# Parameters, writing, the command
# ---------------------------------------------------------------------------------------------

_USED_KEYS = {  # spec keys each variant's result depends on (the others are recorded as null)
    "kmeans": ("source", "split", "size", "pca", "spherical", "niter", "nredo", "init", "max_points", "seed"),
    "random": ("source", "split", "size", "spherical", "seed"),
    "noise": ("source", "split", "size", "spherical", "seed"),
    "average": ("source", "split", "task", "spherical"),
}


def _params(spec: DictionarySpec, pts: _Points) -> tuple[dict[str, Any], str]:
    """The variant's effective parameters (attrs) and their hash with the rows used."""
    used = {k: v for k, v in to_dict(spec).items() if k in _USED_KEYS[spec.variant]}
    params = {k: used.get(k) for k in to_dict(spec) if k not in ("size", "variant")}
    params.update(variant=spec.variant, size_requested=spec.size)
    # with PCA the entries are the clusters' means in D (before: their centroids mapped back): old ones rebuild
    entries = {"pca_entries": "cluster_mean"} if used.get("pca") is not None else {}
    blob = json.dumps(
        {"schema": schema.FEATURES_VERSION, "variant": spec.variant, **used, **entries, "rows": pts.rows_digest()},
        sort_keys=True,
    )
    return params, hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write(group: Any, name: str, pts: _Points, spec: DictionarySpec, out: dict[str, Any], attrs: dict) -> bool:
    """Replace `dictionaries/<name>` (only it) with `out`; returns True when one was there before."""
    from extract.contract.store import create_array

    path = schema.dictionary_path(name)
    existed = path in group
    if existed:
        del group[path]
    K, D = out["centroids"].shape
    values = {
        schema.dictionary_path(name, schema.DICT_CENTROIDS): out["centroids"],
        schema.dictionary_path(name, schema.DICT_PRIOR): out["prior"],
    }
    values.update({schema.dictionary_path(name, k): out[k] for k in out if k.startswith("pca_")})
    for arr_spec in schema.dictionary_specs(name, K, D, pts.feature_dim, spec.pca if "pca_matrix" in out else None):
        create_array(group, arr_spec)
        group[arr_spec.name][...] = np.asarray(values[arr_spec.name], dtype=np.float32)
    sub = group[path]
    sub.attrs.update(attrs)
    sub.attrs["params_hash"] = attrs["params_hash"]  # last: a dictionary without it is rewritten
    return existed


def build_dictionary(
    store_path: str | Path, name: str, spec: DictionarySpec, progress: bool = False, block_rows: int | None = None
) -> DictionaryResult:
    """Build (or keep, when its parameters and rows are unchanged) `dictionaries/<name>` in a store.

    `block_rows` overrides how many video rows one streamed block holds (tests; default: about
    BLOCK_BYTES of float32, whole shards).
    """
    import faiss
    import torch

    t0 = time.perf_counter()
    build = faiss_build()
    check_faiss_build(build, torch.cuda.is_available())
    store_path = Path(store_path)
    key = f"dictionaries.{name}"
    try:
        group, info = schema.open_cache(store_path, mode="r+")
    except CacheError as e:
        raise DictionaryError(str(e)) from None
    pts = _open_points(group, info, name, spec, block_rows)
    params, digest = _params(spec, pts)
    path = schema.dictionary_path(name)
    if path in group and group[path].attrs.get("params_hash") == digest:
        a = dict(group[path].attrs)
        return DictionaryResult(
            name,
            spec.variant,
            a["size"],
            a["points_used"],
            a["points_total"],
            a["objective"],
            time.perf_counter() - t0,
            a["device"],
            "unchanged (same parameters)",
            store_path,
        )
    if spec.variant == "kmeans":
        out = _kmeans(pts, spec, key, progress)
    elif spec.variant == "random":
        out = _random(pts, spec, key, progress)
    elif spec.variant == "noise":
        out = _noise(pts, spec, key, progress)
    else:
        out = _average(pts, spec, key, group, info, progress)
    out["prior"] = np.asarray(out["prior"], dtype=np.float32)
    K = len(out["centroids"])
    seconds = time.perf_counter() - t0
    attrs = {
        **params,
        "size": K,
        "iterations": out.get("iterations", 0),
        "objective": float(out["objective"]),
        "points_used": int(out["points_used"]),
        "points_total": pts.total,
        "videos": int(len(pts.used_rows)),
        "skipped_failed": pts.skipped_failed,
        "empty_classes": out.get("empty_classes", []),
        "faiss_version": faiss.__version__,
        "faiss_build": {**build, "distributions": dict(build["distributions"])},
        "device": out["device"],
        "seconds": round(seconds, 3),
        "params_hash": digest,
        "built_from_split": spec.split,  # the store state it was built from: train refuses it once that changes
        "rows_done_digest": schema.rows_digest(pts.used_rows),
    }
    existed = _write(group, name, pts, spec, out, attrs)
    status = "rewritten (parameters changed)" if existed else "written"
    log.info("%s: %s", key, status)
    return DictionaryResult(
        name,
        spec.variant,
        K,
        attrs["points_used"],
        pts.total,
        attrs["objective"],
        time.perf_counter() - t0,
        out["device"],
        status,
        store_path,
    )


def check_all(store_path: Path, cfg: Config) -> None:
    """What can be checked of every dictionary before any is written (so a bad one late in the config costs no
    rewrite of the ones before it): its source, split and finished videos, and K against the split's points
    (k-means also against its subsample). Raises the first DictionaryError."""
    group, info = schema.open_cache(store_path)
    for name, spec in cfg.dictionaries.items():
        pts = _open_points(group, info, name, spec, None)
        if spec.variant in ("kmeans", "random"):
            m = pts.total if spec.max_points is None or spec.variant == "random" else min(spec.max_points, pts.total)
            _check_size(pts, f"dictionaries.{name}", spec.size, m)


def build_dictionaries(cfg: Config, store_path: Path | None = None, progress: bool = True) -> list[DictionaryResult]:
    """Every dictionary of `cfg.dictionaries`, in config order, into `store_path` (default: the store
    the config names, as `ltar extract` wrote it)."""
    if not cfg.dictionaries:
        raise DictionaryError("dictionaries: the config names no dictionary; add one under `dictionaries:`")
    if store_path is None:
        from extract.contract.locate import write_pointer
        from extract.inspect import locate_store

        try:
            store_path = locate_store(cfg)
        except CacheError as e:
            raise DictionaryError(str(e)) from None
        device = schema.open_cache(store_path)[1].attrs.get("provenance", {}).get("device", "cpu")
        write_pointer(cfg, store_path, str(device).split(":")[0], "ltar dictionaries")
    from extract.contract.lock import StoreLocked, acquire_lock

    try:
        schema.open_cache(store_path)  # a missing store is a sentence here, not an empty folder made by the lock
        with acquire_lock(store_path):  # the writers' lock: no extraction or import writes the store meanwhile
            check_all(store_path, cfg)  # every dictionary's source and size, before any is written
            return [build_dictionary(store_path, name, spec, progress) for name, spec in cfg.dictionaries.items()]
    except (CacheError, StoreLocked) as e:
        raise DictionaryError(str(e)) from None
