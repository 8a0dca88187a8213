"""The cache schema, declared once. `extract` writes it; `train` reads it through `open_cache`.

One Zarr v3 store per (dataset, fingerprint): `<cache.root>/<dataset>/<fingerprint>.zarr`.
Per-video arrays have the video index as first axis, one video per chunk row, rows grouped into
shards of `SHARD_VIDEOS` (so a large dataset is not millions of files), fp16 features with zstd,
and named dimensions so `xarray.open_zarr` shows them. `done[i]` is written after every other
array of row i, so a row is either complete or recomputed on resume.

Arrays (N videos, L frames, Dc CLIP dim, Dv TimeSformer dim, h×w saliency map):
    clip/frame        (N, L, Dc) fp16   VP: pooled, projected, L2-normalised CLIP image embedding
    clip/fg           (N, L, Dc) fp16   FG: CLIP embedding of the foreground crop
    clip/bg           (N, L, Dc) fp16   BG: CLIP embedding of the frame with the salient region masked
    saliency          (N, L, h, w) uint8 the saliency map the crops came from (0..255)
    timesformer/frame (N, L, Dv) fp16   V: TimeSformer spatial tokens of frame l averaged (in the clip around it,
                                        `encoders.timesformer.sampling: clips`; in the L-frame clip, `spread`)
    timesformer/cls   (N, Dv) fp16      v_cls: CLS token (the L clips' averaged, as the official multi-view test
                                        averages its views; the one clip's, `spread`)
    frame_mask        (N, L) bool       True where the slot holds a real frame
    timestamps        (N, L) float32    seconds of the frame actually sampled per slot
    fps               (N,) float32      the video's average frame rate
    segment_mask      (N, L) bool       True where the sampled frame lies inside one of the video's annotated action
                                        segments (all False where the dataset annotates none: `annotated_segments`)
    done              (N,) bool         the row is complete
    video             (N,) string       the video ids: xarray's `video` coordinate, written at creation; a copy
                                        in each group whose arrays have a video axis (clip/, timesformer/,
                                        labels/), since xarray resolves coordinates per group
    labels/<task>     (N,) int32 (single label, -1 = none) or (N, C) bool (multi-hot)
    text/<task>       (C, Dc) fp16      T0: class-name embeddings averaged over prompt templates
Attributes (root): schema_version, fingerprint, dataset, video_ids, video_paths, splits, vocabularies,
provenance (encoders, weights, libraries), config (resolved), shard_videos, failures {video_id: reason},
file_stamps {video_id: [size, mtime_ns]} and file_paths {video_id: absolute path} of the rows written,
annotated_segments (whether `segment_mask` holds the dataset's annotation), same_set_pairs (pairs of activity
class names made of the same actions in another order, as the dataset names them; [] where it names none).

Schema versions: 1, the features and labels; 2 (now) adds segment_mask, annotated_segments, same_set_pairs
and file_paths, what stage 2 read from the dataset before. `ltar extract` upgrades a version-1 store in place
(no feature is recomputed).

The shard size along the video axis is fixed per store when it is created (`cache.shard_videos`,
default `SHARD_VIDEOS`): encoder groups restart at every shard, so a store's shard size decides its
groups, and every later run (resume, cluster workers) reads it back from the store, never from the
config. `LOCK_FILE` inside the store directory names the run writing it (extract/scale.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
UPGRADABLE = (1,)  # versions `ltar extract` upgrades in place
# The version of what the feature arrays hold, in the store's fingerprint (its name). Bumped only when the features
# themselves change; a schema version that only adds what is computed without the encoders (version 2: segment
# masks, same-set pairs) upgrades a store in place and keeps its name.
FEATURES_VERSION = 1
SHARD_VIDEOS = 64  # default videos per shard file along the video axis (cache.shard_videos)
STRING = "StringDType()"  # variable-length UTF-8 (zarr v3 `string`), as numpy prints the dtype it reads back
LOCK_FILE = "ltar.lock"  # inside the store directory: the run writing it (host, pid, start time)

CLIP_FRAME, CLIP_FG, CLIP_BG = "clip/frame", "clip/fg", "clip/bg"
SALIENCY = "saliency"
TSF_FRAME, TSF_CLS = "timesformer/frame", "timesformer/cls"
FRAME_MASK, TIMESTAMPS, FPS, DONE = "frame_mask", "timestamps", "fps", "done"
SEGMENT_MASK = "segment_mask"
LABELS, TEXT = "labels", "text"
VIDEO = "video"  # the video-id coordinate array (and the first dimension of every per-video array)
VIDEO_COORDS = (VIDEO, f"clip/{VIDEO}", f"timesformer/{VIDEO}", f"{LABELS}/{VIDEO}")  # one per group, see above


class CacheError(RuntimeError):
    """A store that cannot be used as it is: missing, unfinished, or of another schema version."""


@dataclass(frozen=True)
class ArraySpec:
    name: str  # path inside the store
    shape: tuple[int, ...]
    dims: tuple[str, ...]  # dimension names (xarray reads them)
    dtype: str
    per_video: bool = True  # first axis is the video index: one chunk per row, sharded


@dataclass(frozen=True)
class Sizes:
    num_videos: int  # N
    num_frames: int  # L
    clip_dim: int  # Dc
    timesformer_dim: int  # Dv
    map_size: int  # h = w of the stored saliency map


def array_specs(sizes: Sizes, tasks: dict[str, tuple[int, bool]]) -> list[ArraySpec]:
    """Every array of a store; `tasks` maps task -> (number of classes, multi-label)."""
    n, ll, dc, dv, m = sizes.num_videos, sizes.num_frames, sizes.clip_dim, sizes.timesformer_dim, sizes.map_size
    vlf = ("video", "frame", "feature")
    specs = [
        ArraySpec(CLIP_FRAME, (n, ll, dc), vlf, "float16"),
        ArraySpec(CLIP_FG, (n, ll, dc), vlf, "float16"),
        ArraySpec(CLIP_BG, (n, ll, dc), vlf, "float16"),
        ArraySpec(SALIENCY, (n, ll, m, m), ("video", "frame", "map_y", "map_x"), "uint8"),
        ArraySpec(TSF_FRAME, (n, ll, dv), ("video", "frame", "timesformer_feature"), "float16"),
        ArraySpec(TSF_CLS, (n, dv), ("video", "timesformer_feature"), "float16"),
        ArraySpec(FRAME_MASK, (n, ll), ("video", "frame"), "bool"),
        ArraySpec(TIMESTAMPS, (n, ll), ("video", "frame"), "float32"),
        ArraySpec(FPS, (n,), ("video",), "float32"),
        ArraySpec(SEGMENT_MASK, (n, ll), ("video", "frame"), "bool"),
    ]
    for task, (c, multi) in sorted(tasks.items()):
        if multi:
            specs.append(ArraySpec(f"{LABELS}/{task}", (n, c), ("video", f"{task}_class"), "bool"))
        else:
            specs.append(ArraySpec(f"{LABELS}/{task}", (n,), ("video",), "int32"))
        specs.append(ArraySpec(f"{TEXT}/{task}", (c, dc), (f"{task}_class", "feature"), "float16", per_video=False))
    # the ids as xarray's coordinate, one whole chunk each (written once, at creation, never per row)
    specs += [ArraySpec(name, (n,), (VIDEO,), STRING, per_video=False) for name in VIDEO_COORDS]
    specs.append(ArraySpec(DONE, (n,), ("video",), "bool"))  # last: written after the row
    return specs


def store_path(cache_root: str | Path, dataset: str, fingerprint: str) -> Path:
    return Path(cache_root) / dataset / f"{fingerprint}.zarr"


def store_shard_videos(group: Any) -> int:
    """Videos per shard of an existing store (its `done` array's shard shape): what decides its groups."""
    done = group[DONE]
    return int(done.shards[0]) if done.shards else int(done.shape[0])


@dataclass
class CacheInfo:
    """What a reader needs to know about a store, from its attributes."""

    path: Path
    attrs: dict[str, Any]

    @property
    def video_ids(self) -> list[str]:
        return list(self.attrs["video_ids"])

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def vocabularies(self) -> dict[str, dict]:
        return dict(self.attrs["vocabularies"])

    @property
    def failures(self) -> dict[str, str]:
        return dict(self.attrs.get("failures", {}))

    @property
    def annotated_segments(self) -> bool:
        """`segment_mask` holds the dataset's annotated action segments (False: it annotates none)."""
        return bool(self.attrs.get("annotated_segments", False))

    @property
    def same_set_pairs(self) -> list[tuple[str, str]]:
        """Pairs of activity classes made of the same actions in another order (the dataset's; [] = none)."""
        return [(a, b) for a, b in self.attrs.get("same_set_pairs", [])]

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)


def open_cache(path: str | Path, mode: str = "r") -> tuple[Any, CacheInfo]:
    """Open a store and check its schema version; returns (zarr group, CacheInfo)."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CacheError(f"{path} is not a cache store; run `ltar extract` to create it")
    group = zarr.open_group(str(path), mode=mode)
    attrs = dict(group.attrs)
    version = attrs.get("schema_version")
    if version in UPGRADABLE:
        raise CacheError(
            f"{path} was written with cache schema version {version}; this causal-ltar reads version "
            f"{SCHEMA_VERSION}, which adds what stage 2 used to read from the dataset (annotated-segment masks, "
            "same-set pairs). Run `ltar extract` with the config that made it: it upgrades the store in place "
            "(no feature is recomputed)"
        )
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{path} was written with cache schema version {version}, this causal-ltar reads version "
            f"{SCHEMA_VERSION}; re-extract into a new store (delete it or change cache.root) or use the "
            "causal-ltar release that wrote it"
        )
    return group, CacheInfo(path, attrs)


# ---------------------------------------------------------------------------------------------
# Dictionaries (`ltar dictionaries`, extract/dictionaries.py), written into a finished store; the
# feature arrays above are never rewritten. One group per configured name, not per video:
#     dictionaries/<name>/centroids      (K, D) float32  entries in the source array's space: what heads use
#     dictionaries/<name>/prior          (K,) float32    p(z_i) = N_i / N over every point of the split; sums to 1
#   only when the dictionary was clustered after PCA to P dims (heads working in that space project
#   features with `(x - pca_mean) @ pca_matrix.T`, (..., D) -> (..., P)):
#     dictionaries/<name>/pca_centroids  (K, P) float32  the k-means centroids in the PCA space
#     dictionaries/<name>/pca_matrix     (P, D) float32  rows are the principal directions
#     dictionaries/<name>/pca_mean       (D,) float32
# Group attributes: DICTIONARY_ATTRS; `params_hash` is written last, so an interrupted write is redone.
# ---------------------------------------------------------------------------------------------

DICTIONARIES = "dictionaries"
DICT_CENTROIDS, DICT_PRIOR = "centroids", "prior"
DICT_PCA_CENTROIDS, DICT_PCA_MATRIX, DICT_PCA_MEAN = "pca_centroids", "pca_matrix", "pca_mean"
DICTIONARY_SOURCES = (CLIP_BG, CLIP_FG, CLIP_FRAME, TSF_FRAME)  # per-frame (N, L, D) arrays a dictionary reads
DICTIONARY_ATTRS = (
    "source",  # the cache array the points came from
    "split",  # the split whose real frames were used
    "size",  # K written (average: the number of classes)
    "size_requested",  # the configured size
    "variant",  # kmeans | random | average
    "task",  # average: the label task (null otherwise)
    "pca",  # P, or null
    "spherical",
    "init",  # kmeans: random | kmeans++ (null otherwise)
    "seed",
    "niter",  # kmeans only (null otherwise), as are nredo and max_points
    "nredo",
    "max_points",
    "iterations",  # k-means iterations run (niter x nredo), 0 for random / average
    "objective",  # mean squared L2 distance of the split's points to their nearest entry (clustering space)
    "points_used",  # points the entries were computed from (the k-means subsample)
    "points_total",  # real frames of the split's finished videos: what the prior counts
    "videos",  # finished videos of the split used
    "skipped_failed",  # videos of the split skipped because extraction recorded a failure
    "empty_classes",  # average: classes without a video in the split (zero entry, prior 0)
    "faiss_version",
    "device",  # where k-means ran: cpu (T threads) or gpu (G GPUs)
    "seconds",
    "built_from_split",  # the split it was built from ...
    "rows_done_digest",  # ... and its finished rows then (rows_digest): train refuses it once they change
    "params_hash",  # hash of the parameters and the rows used: equal hash = nothing to do (written last)
)


def distinct_frames(timestamps: Any, mask: Any) -> Any:
    """Distinct sampled frames per video: (N, L) timestamps, (N, L) frame mask -> (N,) counts. A video with fewer
    decodable frames than the L slots repeats frames (equal timestamps, every slot real); fewer than L here marks
    it (`ltar extract` and `ltar inspect` report them)."""
    import numpy as np

    t = np.where(mask, timestamps, np.nan)  # (N, L)
    s = np.sort(t, axis=1)
    new = np.isfinite(s) & np.concatenate([np.ones((len(s), 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    return new.sum(1)


def rows_digest(rows: Any) -> str:
    """A dictionary's record of the store state it was built from: the hash of the split's finished rows (attrs
    `rows_done_digest`, with `split`); a reader whose store now finishes other rows of that split has a stale
    dictionary."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def dictionary_path(name: str, array: str | None = None) -> str:
    """`dictionaries/<name>` or `dictionaries/<name>/<array>`."""
    return f"{DICTIONARIES}/{name}" + (f"/{array}" if array else "")


def dictionary_specs(name: str, k: int, d: int, feature_dim: str, pca: int | None) -> list[ArraySpec]:
    """The arrays of one dictionary; `feature_dim` is the source array's last dimension name."""
    entry = f"{name}_entry"
    specs = [
        ArraySpec(dictionary_path(name, DICT_CENTROIDS), (k, d), (entry, feature_dim), "float32", per_video=False),
        ArraySpec(dictionary_path(name, DICT_PRIOR), (k,), (entry,), "float32", per_video=False),
    ]
    if pca:
        specs += [
            ArraySpec(dictionary_path(name, DICT_PCA_CENTROIDS), (k, pca), (entry, "pca_component"), "float32", False),
            ArraySpec(
                dictionary_path(name, DICT_PCA_MATRIX), (pca, d), ("pca_component", feature_dim), "float32", False
            ),
            ArraySpec(dictionary_path(name, DICT_PCA_MEAN), (d,), (feature_dim,), "float32", per_video=False),
        ]
    return specs
