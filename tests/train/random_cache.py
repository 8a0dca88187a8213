"""A cache store made through the contract from random arrays: what stage 2 reads, with no encoder, no video and
no extraction (`extract.contract.schema.array_specs` + `extract.contract.store.create_store` + `write_rows`).

The world it holds is small and known, so a test can ask whether training learns and check it against the answer:
    A = 4 activities, each a fixed order of M = 6 atomic actions; `tea` and `tea_reversed` are the same set of
    actions in the other order (the store's `same_set_pairs`, the labels/atomic rows of both are equal);
    S = 4 scenes, scene s the usual one of activity s: P(usual scene) = `rho` in train and test_iid (and the
    `test_ood_cooccur` split, whose confounder is not planted here), uniform in test_ood, test_ood_scene and
    train_oracle (the unconfounded split of the oracle row).
Each video has `num_real` ≤ L real frames (the rest padded, `frame_mask` False): the first and last real frames
are idle, the frames between are its actions' segments in order (`segment_mask` True there). Features are sums of
random prototypes plus Gaussian noise, unit vectors as CLIP's are (padded slots hold zeros):
    clip/frame (VP)       action frame: atom[m] + 0.5 act[y] + 0.5 scene[s]; idle frame: scene[s]
    clip/fg   (FG)        action frame: atom[m] + 0.5 act[y]; idle frame: noise only
    clip/bg   (BG)        scene[s] (the confounder: nothing of the action)
    timesformer/frame (V) in its own space (Dv): atom_v[m] + 0.5 act_v[y] on action frames, noise on idle ones,
                          at the scale of TimeSformer's LayerNorm outputs (norm 0.75 √Dv; v_cls √Dv), as stored
    text/<task> (T0)      act[c] (activity) or atom[c] (atomic) plus a little noise: the class texts agree with VP
so the activity is in VP, FG and V (a head learns it), and BG alone predicts only the scene: a BG-only head scores
about `rho` on test_iid and chance (1 / A) on test_ood. fps is 8, timestamps the slot centres, the saliency maps
random bytes (no head reads them).

Dictionaries (`dictionaries/<name>`, every one pipeline.yaml's heads read), with the attrs train's reader checks:
    confounder, confounder_paper   the mean BG of the train split's real frames per scene (what k-means finds on
                                   these well-separated scenes), prior = each scene's share of those frames;
                                   confounder_paper adds its PCA arrays, as `pca` writes them
    confounder_random              K seeded real BG frames of train, uniform prior
    confounder_noise               K seeded unit Gaussian vectors, uniform prior
    confounder_average(_frame)     the activity means of BG (VP), prior = the activities' frame shares
    global, global_video           seeded k-means (Lloyd) over train's real VP (V) frames, prior N_i / N
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.store import create_array, create_store, write_rows

ACTIVITIES = {  # activity -> its atomic actions, in order
    "tea": ("boil", "pour", "stir"),
    "tea_reversed": ("stir", "pour", "boil"),  # the same set as tea: an order-only pair
    "salad": ("cut", "wash", "mix"),
    "soup": ("cut", "boil", "mix"),
}
ATOMIC = ("boil", "pour", "stir", "cut", "wash", "mix")
SAME_SET_PAIRS = [["tea", "tea_reversed"]]
UNCONFOUNDED = ("test_ood", "test_ood_scene", "train_oracle")  # splits whose scene is independent of the activity
DATASET = "manifest"  # a registered adapter name: `dataset.name` finds its pointers (cache.root/<name>/)


@dataclass(frozen=True)
class RandomWorld:
    """What the store holds; equal worlds write equal stores (and one fingerprint)."""

    videos: dict[str, int] = field(default_factory=lambda: {"train": 16, "test_iid": 8, "test_ood": 8})
    num_frames: int = 8  # L
    min_real: int = 6  # real frames per video drawn in [min_real, L]
    clip_dim: int = 16  # Dc
    video_dim: int = 24  # Dv (another width than Dc: a head mixing them up fails)
    map_size: int = 4
    scenes: int = 4  # S
    rho: float = 0.85  # P(the activity's usual scene) where the scene is confounded
    noise: float = 0.3  # std of the Gaussian noise per dimension before normalising
    kmeans_size: int = 8  # K of global and global_video
    random_size: int = 6  # K of confounder_random and confounder_noise
    pca: int = 4  # P of confounder_paper
    shard_videos: int = 16  # several shards along the video axis
    annotated_segments: bool = True
    seed: int = 0


@dataclass
class RandomCache:
    """The store and the ground truth it was drawn from (per store row)."""

    store: Path
    world: RandomWorld
    splits: np.ndarray  # (N,) str
    activity: np.ndarray  # (N,) int
    scene: np.ndarray  # (N,) int
    mask: np.ndarray  # (N, L) bool, real frames
    segments: np.ndarray  # (N, L) bool, action frames
    act: np.ndarray  # (A, Dc) activity prototypes
    atom: np.ndarray  # (M, Dc) atomic-action prototypes
    scene_protos: np.ndarray  # (S, Dc)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Lloyd iterations: x (P, D) -> centroids (K, D), prior (K,) = each cluster's share of the points."""
    c = x[rng.choice(len(x), k, replace=False)]  # (K, D)
    for _ in range(iters):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)  # (P,)
        c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c, np.bincount(assign, minlength=k) / len(x)


def _fingerprint(world: RandomWorld) -> str:
    return hashlib.sha256(json.dumps(asdict(world), sort_keys=True).encode()).hexdigest()[:16]


def write_random_cache(root: Path, world: RandomWorld | None = None) -> RandomCache:
    """The world's store at `<root>/<DATASET>/<fingerprint>.zarr`, written through the contract, and its truth."""
    w = world or RandomWorld()
    rng = np.random.default_rng(w.seed)
    names = list(ACTIVITIES)
    A, M, S, L, Dc, Dv = len(names), len(ATOMIC), w.scenes, w.num_frames, w.clip_dim, w.video_dim
    act, atom, scene_p = (
        _unit(rng.normal(size=(A, Dc))),
        _unit(rng.normal(size=(M, Dc))),
        _unit(rng.normal(size=(S, Dc))),
    )
    act_v, atom_v = _unit(rng.normal(size=(A, Dv))), _unit(rng.normal(size=(M, Dv)))

    splits = np.asarray([s for s, n in w.videos.items() for _ in range(n)])
    N = len(splits)
    activity = np.concatenate([rng.permutation(np.arange(n) % A) for n in w.videos.values()])  # balanced per split
    usual = rng.random(N) < w.rho
    other = (activity + rng.integers(1, S, N)) % S  # a scene other than the usual one
    scene = np.where(usual, activity % S, other)
    free = np.isin(splits, UNCONFOUNDED)
    scene[free] = rng.integers(0, S, int(free.sum()))

    num_real = rng.integers(w.min_real, L + 1, N)  # (N,)
    slot = np.arange(L)
    mask = slot[None] < num_real[:, None]  # (N, L)
    segments = mask & (slot[None] > 0) & (slot[None] < num_real[:, None] - 1)  # idle first and last real frames
    atom_of = np.full((N, L), -1)  # (N, L) the atomic action shown, -1 = idle or padding
    for i in range(N):
        inner = np.flatnonzero(segments[i])
        for j, part in enumerate(np.array_split(inner, len(ACTIVITIES[names[activity[i]]]))):
            atom_of[i, part] = ATOMIC.index(ACTIVITIES[names[activity[i]]][j])

    def noise(d: int) -> np.ndarray:
        return w.noise * rng.normal(size=(N, L, d))

    acting = (atom_of >= 0)[..., None]  # (N, L, 1)
    a, s, m = act[activity][:, None], scene_p[scene][:, None], atom[np.maximum(atom_of, 0)]  # (N, 1|L, Dc)
    vp = _unit(np.where(acting, m + 0.5 * a + 0.5 * s, s) + noise(Dc))  # (N, L, Dc)
    fg = _unit(np.where(acting, m + 0.5 * a, 0.0) + noise(Dc))
    bg = _unit(np.broadcast_to(s, (N, L, Dc)) + noise(Dc))
    v = _unit(np.where(acting, atom_v[np.maximum(atom_of, 0)] + 0.5 * act_v[activity][:, None], 0.0) + noise(Dv))
    v = 0.75 * np.sqrt(Dv) * v  # the extracted tiny cache's V: norm 5.8 at Dv = 64
    pad = ~mask[..., None]
    vp, fg, bg, v = (np.where(pad, 0.0, x) for x in (vp, fg, bg, v))  # padded slots hold zeros
    cls = np.sqrt(Dv) * _unit(v.sum(1) + w.noise * rng.normal(size=(N, Dv)))  # (N, Dv)
    fps = np.full(N, 8.0, np.float32)
    timestamps = np.where(mask, (slot[None] + 0.5) / fps[:, None], 0.0).astype(np.float32)  # (N, L) seconds
    saliency = rng.integers(0, 256, (N, L, w.map_size, w.map_size), dtype=np.uint8)
    atomic_hot = np.zeros((N, M), bool)
    for i in range(N):
        atomic_hot[i, [ATOMIC.index(x) for x in ACTIVITIES[names[activity[i]]]]] = True

    fp = _fingerprint(w)
    ids = [f"{sp}_{i:05d}" for i, sp in enumerate(splits)]
    vocab = {
        "activity": {"names": names, "multi_label": False, "prompts": [n.replace("_", " ") for n in names]},
        "atomic": {"names": list(ATOMIC), "multi_label": True, "prompts": list(ATOMIC)},
    }
    attrs = {  # the keys of extract.pipeline.store_attrs
        "fingerprint": fp,
        "dataset": DATASET,
        "video_ids": ids,
        "video_paths": [f"/nonexistent/{i}.mp4" for i in ids],
        "decode_size": 0,
        "splits": splits.tolist(),
        "vocabularies": vocab,
        "provenance": {"random_cache": asdict(w)},
        "config": {},
        "shard_videos": w.shard_videos,
        "failures": {},
        "file_stamps": {},
        "file_paths": {},
        "annotated_segments": w.annotated_segments,
        "same_set_pairs": SAME_SET_PAIRS,
    }
    sizes = schema.Sizes(N, L, Dc, Dv, w.map_size)
    specs = schema.array_specs(sizes, {"activity": (A, False), "atomic": (M, True)})
    path = schema.store_path(Path(root), DATASET, fp)
    group = create_store(path, specs, attrs, w.shard_videos)
    for name in schema.VIDEO_COORDS:
        group[name][:] = np.asarray(ids, dtype=np.dtypes.StringDType())
    group[f"{schema.LABELS}/activity"][:] = activity.astype(np.int32)
    group[f"{schema.LABELS}/atomic"][:] = atomic_hot
    group[f"{schema.TEXT}/activity"][:] = _unit(act + 0.1 * rng.normal(size=act.shape)).astype(np.float16)
    group[f"{schema.TEXT}/atomic"][:] = _unit(atom + 0.1 * rng.normal(size=atom.shape)).astype(np.float16)
    rows = {
        schema.CLIP_FRAME: vp.astype(np.float16),
        schema.CLIP_FG: fg.astype(np.float16),
        schema.CLIP_BG: bg.astype(np.float16),
        schema.SALIENCY: saliency,
        schema.TSF_FRAME: v.astype(np.float16),
        schema.TSF_CLS: cls.astype(np.float16),
        schema.FRAME_MASK: mask,
        schema.TIMESTAMPS: timestamps,
        schema.FPS: fps,
        schema.SEGMENT_MASK: segments if w.annotated_segments else np.zeros_like(segments),
    }
    for start in range(0, N, w.shard_videos):  # one shard per call, as the extractor's groups write them
        write_rows(group, start, {k: x[start : start + w.shard_videos] for k, x in rows.items()})
    truth = RandomCache(path, w, splits, activity, scene, mask, segments, act, atom, scene_p)
    write_dictionaries(group, truth, {"bg": bg, "vp": vp, "v": v}, rng)
    return truth


def write_dictionaries(group: Any, truth: RandomCache, feats: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Every dictionary pipeline.yaml's heads read, as `ltar dictionaries` lays them out (module docstring)."""
    w = truth.world
    rows = np.flatnonzero(truth.splits == "train")  # every train row is done
    real = truth.mask[rows]  # (n, L)
    points = {k: x[rows][real].astype(np.float32) for k, x in feats.items()}  # (P, D) real train frames
    frame_scene = np.broadcast_to(truth.scene[rows][:, None], real.shape)[real]  # (P,)
    frame_act = np.broadcast_to(truth.activity[rows][:, None], real.shape)[real]  # (P,)

    def means(x: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        c = np.stack([x[groups == j].mean(0) if (groups == j).any() else np.zeros(x.shape[1]) for j in range(k)])
        return c, np.bincount(groups, minlength=k) / len(groups)

    A, S = len(ACTIVITIES), w.scenes
    uniform = np.full(w.random_size, 1 / w.random_size)
    drawn = points["bg"][rng.choice(len(points["bg"]), w.random_size, replace=False)]  # real frames: unit already
    noise = _unit(rng.normal(size=(w.random_size, w.clip_dim)))
    built = {  # name -> (source, variant, task, centroids, prior)
        "confounder": (schema.CLIP_BG, "kmeans", None, *means(points["bg"], frame_scene, S)),
        "confounder_paper": (schema.CLIP_BG, "kmeans", None, *means(points["bg"], frame_scene, S)),
        "confounder_random": (schema.CLIP_BG, "random", None, drawn, uniform),
        "confounder_noise": (schema.CLIP_BG, "noise", None, noise, uniform),
        "confounder_average": (schema.CLIP_BG, "average", "activity", *means(points["bg"], frame_act, A)),
        "confounder_average_frame": (schema.CLIP_FRAME, "average", "activity", *means(points["vp"], frame_act, A)),
        "global": (schema.CLIP_FRAME, "kmeans", None, *_kmeans(points["vp"], w.kmeans_size, rng)),
        "global_video": (schema.TSF_FRAME, "kmeans", None, *_kmeans(points["v"], w.kmeans_size, rng)),
    }
    source_points = {schema.CLIP_BG: points["bg"], schema.CLIP_FRAME: points["vp"], schema.TSF_FRAME: points["v"]}
    for name, (source, variant, task, centroids, prior) in built.items():
        spherical = name != "confounder_paper"  # as pipeline.yaml builds them (ECRL's Z: cluster means as they are)
        centroids = _unit(centroids) if spherical else centroids
        pca = w.pca if name == "confounder_paper" else None
        K, D = centroids.shape
        values = {schema.DICT_CENTROIDS: centroids, schema.DICT_PRIOR: prior}
        if pca:
            x = source_points[source]
            mean = x.mean(0)  # (D,)
            matrix = np.linalg.svd(x - mean, full_matrices=False)[2][:pca]  # (P, D) principal directions
            values.update({schema.DICT_PCA_MATRIX: matrix, schema.DICT_PCA_MEAN: mean})
            values[schema.DICT_PCA_CENTROIDS] = (centroids - mean) @ matrix.T  # (K, P)
        feature_dim = group[source].metadata.dimension_names[-1]
        for spec in schema.dictionary_specs(name, K, D, feature_dim, pca):
            create_array(group, spec)
            group[spec.name][...] = np.asarray(values[spec.name.rsplit("/", 1)[1]], dtype=np.float32)
        x = source_points[source]
        objective = float(((x[:, None] - centroids[None]) ** 2).sum(-1).min(1).mean())
        attrs = {
            "source": source,
            "split": "train",
            "size": K,
            "size_requested": K,
            "variant": variant,
            "task": task,
            "pca": pca,
            "spherical": spherical,
            "init": "random" if variant == "kmeans" else None,
            "seed": w.seed,
            "niter": 10 if variant == "kmeans" else None,
            "nredo": 1 if variant == "kmeans" else None,
            "max_points": None,
            "iterations": 10 if variant == "kmeans" else 0,
            "objective": objective,
            "points_used": len(x),
            "points_total": len(x),
            "videos": len(rows),
            "skipped_failed": 0,
            "empty_classes": [],
            "faiss_version": None,
            "device": "cpu",
            "seconds": 0.0,
            "built_from_split": "train",
            "rows_done_digest": schema.rows_digest(rows),
        }
        sub = group[schema.dictionary_path(name)]
        sub.attrs.update(attrs)
        digest = hashlib.sha256(json.dumps({"name": name, **attrs}, sort_keys=True).encode()).hexdigest()[:16]
        sub.attrs["params_hash"] = digest  # last, as extract/dictionaries.py writes it
