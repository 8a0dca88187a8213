"""`ltar dictionaries`: FAISS k-means / random / average dictionaries written into the cache store."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zarr

from extract.config import DictionarySpec
from extract.contract import schema
from extract.contract.config import from_dict
from extract.contract.store import create_store
from extract.dictionaries import DictionaryError, build_dictionaries, build_dictionary, load_dictionary

D, L = 16, 10
N_TRAIN, N_TEST = 40, 10
PROPS = np.array([0.4, 0.3, 0.2, 0.1])  # planted cluster proportions in train
ACTIVITIES, ATOMIC = 3, 4


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(path: Path, arrays: dict[str, np.ndarray], splits: list[str], failures: dict | None = None) -> Path:
    """A store built through the real schema: `arrays` maps schema names to values; feature arrays
    left out of `arrays` are left out of the store; the others keep their fill value."""
    n, ll, d = arrays[schema.CLIP_BG if schema.CLIP_BG in arrays else schema.CLIP_FRAME].shape
    tasks = {"activity": (ACTIVITIES, False), "atomic": (ATOMIC, True)}
    specs = [
        s
        for s in schema.array_specs(schema.Sizes(n, ll, d, d, 2), tasks)
        if s.name in arrays or s.name not in schema.DICTIONARY_SOURCES
    ]
    attrs = {
        "fingerprint": "test",
        "video_ids": [f"{s}_{i:03d}" for i, s in enumerate(splits)],
        "splits": splits,
        "vocabularies": {
            "activity": {"names": [f"act{c}" for c in range(ACTIVITIES)], "multi_label": False},
            "atomic": {"names": [f"atom{c}" for c in range(ATOMIC)], "multi_label": True},
        },
        "failures": failures or {},
    }
    group = create_store(path, specs, attrs)
    arrays = {schema.DONE: np.ones(n, bool), schema.FRAME_MASK: np.ones((n, ll), bool), **arrays}
    for name, value in arrays.items():
        group[name][:] = value
    return path


@pytest.fixture(scope="module")
def blobs():
    """Train frames from 4 planted unit-norm centres (PROPS); test frames from a 5th, distinct centre;
    masked-out slots hold a 6th vector that must never be used. Labels: 3 activities, 4 atomic."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(6, D)))  # (6, D): 0-3 train, 4 test, 5 padding
    n = N_TRAIN + N_TEST
    which = np.concatenate(
        [rng.choice(4, size=(N_TRAIN, L), p=PROPS), np.full((N_TEST, L), 4)]
    )  # (N, L) planted centre per frame
    mask = np.ones((n, L), bool)
    mask[np.arange(0, n, 3), -3:] = False  # every third video has 7 real frames
    which[~mask] = 5
    feats = _unit(centres[which] + 0.02 * rng.normal(size=(n, L, D)))  # (N, L, D)
    activity = rng.integers(-1, ACTIVITIES, size=n).astype(np.int32)  # -1 = unlabelled
    activity[:ACTIVITIES] = np.arange(ACTIVITIES)
    atomic = rng.random((n, ATOMIC)) < 0.4
    atomic[0] = True
    arrays = {
        schema.CLIP_BG: feats,
        schema.CLIP_FRAME: _unit(rng.normal(size=(n, L, D))),
        schema.FRAME_MASK: mask,
        "labels/activity": activity,
        "labels/atomic": atomic,
    }
    splits = ["train"] * N_TRAIN + ["test_iid"] * N_TEST
    return {"centres": centres, "which": which, "arrays": arrays, "splits": splits, "mask": mask}


@pytest.fixture
def store(blobs, tmp_path):
    return make_store(tmp_path / "s.zarr", blobs["arrays"], blobs["splits"])


KMEANS = DictionarySpec(source="clip/bg", size=4, init="kmeans++", nredo=3, max_points=None, spherical=True)


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a (M, D): index of and distance to its nearest row of b (K, D)."""
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)  # (M, K)
    return dist.argmin(1), dist.min(1)


def test_kmeans_recovers_planted_clusters_from_the_training_split_only(blobs, store):
    res = build_dictionary(store, "z", KMEANS)
    z = load_dictionary(store, "z")
    assert z.centroids.shape == (4, D) and z.prior.shape == (4,) and z.centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(z.centroids, axis=1), 1, atol=1e-5)
    match, dist = _nearest(blobs["centres"][:4], z.centroids)
    assert dist.max() < 0.05 and len(set(match)) == 4  # every planted centre has its own centroid
    train = blobs["which"][:N_TRAIN][blobs["mask"][:N_TRAIN]]  # planted centre of every real train frame
    assert res.points_total == train.size == z.attrs["points_total"]
    assert np.allclose(z.prior[match], np.bincount(train, minlength=4) / train.size, atol=1e-6)
    assert np.allclose(z.prior[match], PROPS, atol=0.06) and np.isclose(z.prior.sum(), 1)
    # neither the test split's centre nor the masked-out slots' vector is a centroid
    assert _nearest(blobs["centres"][4:], z.centroids)[1].min() > 0.5
    assert z.attrs["split"] == "train" and z.attrs["videos"] == N_TRAIN and z.attrs["iterations"] == 20 * 3
    assert res.status == "written" and "z: kmeans K=4 points=" in str(res) and "written" in str(res)
    from extract.dictionaries import faiss_build

    assert z.attrs["faiss_build"] == faiss_build()  # which FAISS ran, recorded with the dictionary
    assert next(iter(faiss_build()["distributions"])) in res.device  # and said in the summary line


def test_seeded_runs_are_identical_and_the_subsample_is_seeded(blobs, tmp_path):
    spec = DictionarySpec(source="clip/bg", size=4, max_points=200, seed=3)
    stores = [make_store(tmp_path / f"{i}.zarr", blobs["arrays"], blobs["splits"]) for i in range(2)]
    a, b = (build_dictionary(s, "z", spec) for s in stores)
    assert a.points_used == 200 and a.points_total > 200
    za, zb = (load_dictionary(s, "z") for s in stores)
    assert np.array_equal(za.centroids, zb.centroids) and np.array_equal(za.prior, zb.prior)
    assert a.objective == b.objective


@pytest.mark.parametrize("variant, k", [("kmeans", 4), ("random", 5), ("average", ACTIVITIES)])
def test_variants_write_the_same_format(store, variant, k):
    res = build_dictionary(store, variant, DictionarySpec(size=5 if variant != "kmeans" else 4, variant=variant))
    d = load_dictionary(store, variant)
    assert d.centroids.shape == (k, D) and d.prior.shape == (k,) and res.size == k == d.attrs["size"]
    assert d.prior.dtype == np.float32 and np.isclose(d.prior.sum(), 1, atol=1e-6) and (d.prior >= 0).all()
    assert np.allclose(np.linalg.norm(d.centroids, axis=1), 1, atol=1e-5)  # spherical by default
    assert set(schema.DICTIONARY_ATTRS) <= set(d.attrs) and d.attrs["variant"] == variant
    assert np.isfinite(d.attrs["objective"]) and d.pca_matrix is None


def test_random_entries_are_seeded_training_points_with_a_uniform_prior(blobs, store):
    build_dictionary(store, "r", DictionarySpec(size=6, variant="random", seed=1))
    r = load_dictionary(store, "r")
    train = blobs["arrays"][schema.CLIP_BG][:N_TRAIN][blobs["mask"][:N_TRAIN]].astype(np.float16).astype(np.float32)
    assert _nearest(r.centroids, _unit(train))[1].max() < 1e-6  # each entry is a real training frame
    assert np.allclose(r.prior, 1 / 6)
    build_dictionary(store, "r2", DictionarySpec(size=6, variant="random", seed=2))
    assert not np.array_equal(load_dictionary(store, "r2").centroids, r.centroids)


@pytest.mark.parametrize("task", ["activity", "atomic"])
def test_average_is_the_class_mean_of_the_training_frames(blobs, store, task):
    build_dictionary(store, task, DictionarySpec(variant="average", task=task, spherical=False, size=99))
    a = load_dictionary(store, task)
    labels = blobs["arrays"][f"labels/{task}"][:N_TRAIN]
    hot = (labels[:, None] == np.arange(ACTIVITIES) if labels.ndim == 1 else labels).astype(np.float64)  # (V, C)
    x = blobs["arrays"][schema.CLIP_BG][:N_TRAIN].astype(np.float16).astype(np.float64)  # (V, L, D) as stored
    m = blobs["mask"][:N_TRAIN, :, None].astype(np.float64)  # (V, L, 1)
    sums = np.einsum("vc,vld->cd", hot, x * m)  # (C, D)
    frames = np.einsum("vc,vl->c", hot, m[..., 0])  # (C,)
    assert np.allclose(a.centroids, sums / frames[:, None], atol=1e-5)
    assert np.allclose(a.prior, hot.sum(0) / hot.sum(), atol=1e-6)
    assert a.attrs["size"] == hot.shape[1] and a.attrs["size_requested"] == 99 and a.attrs["empty_classes"] == []


def test_streaming_in_small_blocks_equals_one_block_and_numpy(blobs, tmp_path):
    stores = [make_store(tmp_path / f"{i}.zarr", blobs["arrays"], blobs["splits"]) for i in range(2)]
    small = build_dictionary(stores[0], "z", KMEANS, block_rows=3)
    whole = build_dictionary(stores[1], "z", KMEANS, block_rows=10_000)
    zs, zw = load_dictionary(stores[0], "z"), load_dictionary(stores[1], "z")
    assert np.array_equal(zs.centroids, zw.centroids) and np.array_equal(zs.prior, zw.prior)
    assert np.isclose(small.objective, whole.objective, rtol=1e-6)
    x = blobs["arrays"][schema.CLIP_BG][:N_TRAIN][blobs["mask"][:N_TRAIN]].astype(np.float16).astype(np.float32)
    nearest, dist = _nearest(x, zs.centroids)  # every training point, in memory
    assert np.allclose(zs.prior, np.bincount(nearest, minlength=4) / len(x), atol=1e-6)
    assert np.isclose(small.objective, np.mean(dist**2), rtol=1e-4)


def test_pca_entries_are_the_cluster_means_of_every_point_in_its_own_space(blobs, store):
    """With PCA, each entry is the mean, in D, of the split's points nearest (in the PCA space) to its PCA-space
    centroid (ECRL Sec. 4.2.1), and the prior their share: recomputed here with numpy from the stored projection."""
    build_dictionary(store, "p", DictionarySpec(size=4, pca=6, spherical=False, init="kmeans++", nredo=3))
    p = load_dictionary(store, "p")
    assert p.pca_centroids.shape == (4, 6) and p.pca_matrix.shape == (6, D) and p.pca_mean.shape == (D,)
    assert p.centroids.shape == (4, D) and p.attrs["pca"] == 6
    x = blobs["arrays"][schema.CLIP_BG][:N_TRAIN][blobs["mask"][:N_TRAIN]]  # the train split's real frames (M, D)
    z = (x - p.pca_mean) @ p.pca_matrix.T  # (M, 6)
    nearest = ((z[:, None] - p.pca_centroids[None]) ** 2).sum(-1).argmin(1)  # (M,)
    means = np.stack([x[nearest == k].mean(0) for k in range(4)])  # (4, D), by hand
    assert np.allclose(p.centroids, means, atol=1e-4)
    assert np.allclose(p.prior, np.bincount(nearest, minlength=4) / len(x))
    # in the PCA space they are the k-means centroids: a converged centroid is its cluster's mean there
    assert np.allclose(p.project(p.centroids), p.pca_centroids, atol=1e-3)
    assert _nearest(blobs["centres"][:4], p.centroids)[1].max() < 0.1  # 6 dims keep the 4 clusters apart


def _mtimes(path: Path) -> dict:
    return {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()}


def test_rerun_is_a_no_op_and_a_changed_spec_rewrites_only_that_dictionary(store):
    build_dictionary(store, "z", KMEANS)
    build_dictionary(store, "g", DictionarySpec(source="clip/frame", size=3))
    before = _mtimes(store)
    again = build_dictionary(store, "z", KMEANS)
    assert again.status == "unchanged (same parameters)" and _mtimes(store) == before
    changed = build_dictionary(store, "z", DictionarySpec(source="clip/bg", size=5))
    assert changed.status == "rewritten (parameters changed)" and "rewritten" in str(changed)
    assert load_dictionary(store, "z").centroids.shape == (5, D)
    after = _mtimes(store)
    touched = {f for f in after if after[f] != before.get(f)}
    assert touched and all(f.is_relative_to(store / "dictionaries" / "z") for f in touched)
    assert {f for f in before if f not in after} <= {f for f in before if f.is_relative_to(store / "dictionaries/z")}


def test_failed_videos_are_skipped_and_counted(blobs, tmp_path):
    arrays = {**blobs["arrays"], schema.DONE: np.arange(N_TRAIN + N_TEST) >= 2}
    failures = {"train_000": "empty: zero-length file", "train_001": "missing: no such file"}
    path = make_store(tmp_path / "f.zarr", arrays, blobs["splits"], failures)
    build_dictionary(path, "z", DictionarySpec(size=4))
    z = load_dictionary(path, "z")
    assert z.attrs["skipped_failed"] == 2 and z.attrs["videos"] == N_TRAIN - 2
    assert z.attrs["points_total"] == blobs["mask"][2:N_TRAIN].sum()


def _damaged(blobs, tmp_path, **change):
    arrays, splits, failures = dict(blobs["arrays"]), blobs["splits"], None
    if "drop" in change:
        arrays.pop(change["drop"])
    if "nan" in change:
        arrays[schema.CLIP_BG] = arrays[schema.CLIP_BG].copy()
        arrays[schema.CLIP_BG][5, 1, 0] = np.nan
    if "undone" in change:
        arrays[schema.DONE] = np.arange(N_TRAIN + N_TEST) >= change["undone"]
    return make_store(tmp_path / "bad.zarr", arrays, splits, failures)


@pytest.mark.parametrize(
    "change, spec, message",
    [
        ({}, {"size": 10_000}, r"dictionaries\.x\.size: K = 10000 is larger than the \d+ points .* lower"),
        ({}, {"size": 8, "max_points": 5}, r"dictionaries\.x\.max_points: .* smaller than K = 8; raise"),
        ({}, {"size": 10_000, "variant": "random"}, r"dictionaries\.x\.size: K = 10000 is larger"),
        ({"drop": schema.CLIP_BG}, {}, r"dictionaries\.x\.source: array 'clip/bg' is not in .*clip/frame"),
        ({"undone": 3}, {}, r"3 of the 40 videos of split 'train' are not extracted yet .* run `ltar extract`"),
        ({}, {"split": "val"}, r"dictionaries\.x\.split: split 'val' has no videos .*\['test_iid', 'train'\]"),
        ({"nan": True}, {}, r"clip/bg in .* holds NaN or inf in video\(s\) train_005; .*delete it"),
        ({"nan": True}, {"variant": "average"}, r"NaN or inf"),
        ({}, {"variant": "average", "task": "nope"}, r"dictionaries\.x\.task: .*no labels for task 'nope'"),
        ({}, {"pca": 32}, r"dictionaries\.x\.pca: 32 dims is more than the 16 .*at most 16"),
    ],
)
def test_errors_name_the_key_and_say_what_to_do(blobs, tmp_path, change, spec, message):
    path = _damaged(blobs, tmp_path, **change)
    with pytest.raises(DictionaryError, match=message) as err:
        build_dictionary(path, "x", DictionarySpec(**{"size": 4, **spec}))
    assert isinstance(err.value, RuntimeError)
    assert not (path / "dictionaries").exists()  # nothing written


def test_missing_dictionary_and_missing_store_are_sentences(store, tmp_path):
    with pytest.raises(DictionaryError, match="dictionary 'z' is not in .*run `ltar dictionaries`"):
        load_dictionary(store, "z")
    with pytest.raises(DictionaryError, match="is not a cache store; run `ltar extract`"):
        build_dictionary(tmp_path / "nothing.zarr", "z", KMEANS)


def test_a_store_being_written_is_refused_and_a_missing_one_is_not_created(store, tmp_path):
    import json
    import subprocess
    import sys

    from extract.contract.lock import _proc_start, acquire_lock, read_lock

    cfg = from_dict({"dictionaries": {"z": {"source": "clip/bg", "size": 4}}})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with acquire_lock(store) as mine:
            lock = store / schema.LOCK_FILE
            lock.write_text(json.dumps({**read_lock(lock), "pid": holder.pid, "pid_start": _proc_start(holder.pid)}))
            with pytest.raises(DictionaryError, match=f"being written by another run \\(pid {holder.pid} on "):
                build_dictionaries(cfg, store, progress=False)
            assert read_lock(lock)["token"] == mine.token
    finally:
        holder.kill()
        holder.wait()
    assert "dictionaries" not in zarr.open_group(str(store), mode="r")  # nothing was written
    assert [r.name for r in build_dictionaries(cfg, store, progress=False)] == ["z"]  # the lock is free again
    assert not (store / schema.LOCK_FILE).exists()
    with pytest.raises(DictionaryError, match="is not a cache store; run `ltar extract`"):
        build_dictionaries(cfg, tmp_path / "nothing.zarr", progress=False)
    assert not (tmp_path / "nothing.zarr").exists()


def test_end_to_end_on_an_extracted_synthetic_cache(tmp_path):
    """Render 8 tiny videos, extract them, build the configured dictionaries, re-run."""
    from extract.pipeline import extract
    from extract.synthetic import write_dataset

    cfg = from_dict(
        {
            "dataset": {"root": str(tmp_path / "synth")},
            "synthetic": {
                "videos": {"train": 4, "test_iid": 2, "test_ood": 2},
                "height": 48,
                "width": 48,
                "min_seconds": 2.0,
                "max_seconds": 3.0,
            },
            "frames": {"num_frames": 4, "decode_workers": 0},
            "cache": {"root": str(tmp_path / "cache")},
            "dictionaries": {
                "confounder": {"source": "clip/bg", "size": 4},
                "global": {"source": "timesformer/frame", "size": 6, "pca": 8, "init": "kmeans++"},
                "classes": {"source": "clip/frame", "variant": "average"},
            },
        }
    )
    write_dataset(cfg.synthetic, cfg.dataset.root, progress=False)
    store = extract(cfg, progress=False).store
    group = zarr.open_group(str(store), mode="r")
    features = {n: np.asarray(group[n][:]) for n in schema.DICTIONARY_SOURCES}
    results = build_dictionaries(cfg, progress=False)
    assert [r.name for r in results] == ["confounder", "global", "classes"]
    assert all(r.status == "written" and r.points_total == 16 and r.store == store for r in results)
    z, g, c = (load_dictionary(store, n) for n in ("confounder", "global", "classes"))
    assert z.centroids.shape == (4, group[schema.CLIP_BG].shape[2])
    assert g.centroids.shape == (6, group[schema.TSF_FRAME].shape[2]) and g.pca_matrix.shape[0] == 8
    assert c.centroids.shape[0] == len(schema.open_cache(store)[1].vocabularies["activity"]["names"])
    assert all(np.isclose(d.prior.sum(), 1) for d in (z, g, c))
    assert all(np.array_equal(np.asarray(group[n][:]), v) for n, v in features.items())  # features untouched
    again = build_dictionaries(cfg, progress=False)
    assert all(r.status.startswith("unchanged") for r in again) and len({str(r) for r in again}) == 3
    elsewhere = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=str(tmp_path / "empty")))
    with pytest.raises(DictionaryError, match="no cache store at .*run `ltar extract` first"):
        build_dictionaries(elsewhere, progress=False)


def test_noise_entries_are_seeded_unit_gaussian_vectors_whatever_the_data(blobs, store, tmp_path):
    """ECRL Table 5's Random Dictionary: random features, no data (against numpy's draw); the same entries on a
    store with other features; uniform prior; the objective still measured against the split's points."""
    spec = DictionarySpec(size=5, variant="noise", seed=7)
    build_dictionary(store, "n", spec)
    n = load_dictionary(store, "n")
    draw = np.random.default_rng(7).standard_normal((5, D)).astype(np.float32)
    assert np.allclose(n.centroids, draw / np.linalg.norm(draw, axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(n.prior, 0.2) and n.attrs["objective"] > 0
    other = {**blobs["arrays"], schema.CLIP_BG: -blobs["arrays"][schema.CLIP_BG]}
    elsewhere = make_store(tmp_path / "other.zarr", other, blobs["splits"])
    build_dictionary(elsewhere, "n", spec)
    assert np.array_equal(load_dictionary(elsewhere, "n").centroids, n.centroids)


def test_every_size_is_checked_before_any_dictionary_is_written(store):
    """A K too large for the split, late in the config, stops the command before the dictionaries ahead of it
    are written (a rerun then does not redo them for nothing)."""
    cfg = from_dict(
        {"dictionaries": {"a": {"source": "clip/bg", "size": 4}, "b": {"source": "clip/bg", "size": 10**6}}}
    )
    with pytest.raises(DictionaryError, match=r"dictionaries\.b\.size: K = 1000000 is larger than the \d+ points"):
        build_dictionaries(cfg, store, progress=False)
    assert "dictionaries" not in zarr.open_group(str(store), mode="r")  # `a` was not written either


def test_a_shadowed_faiss_install_is_refused_and_the_build_recorded(caplog):
    """faiss-cpu and a faiss-gpu wheel both install the module `faiss`: side by side, the one installed last runs."""
    import logging

    from extract.dictionaries import DictionaryError, check_faiss_build, faiss_build

    build = faiss_build()
    assert len(build["distributions"]) == 1  # `make setup` installs exactly one FAISS
    assert build["gpu_support"] == next(iter(build["distributions"])).startswith("faiss-gpu")
    build = {**build, "distributions": {"faiss-cpu": "1.15.1"}, "gpu_support": False, "gpus": 0}
    check_faiss_build(build, cuda_available=False)  # one CPU build, no GPU: fine, silent
    both = {**build, "distributions": {"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.15.1"}}
    with pytest.raises(DictionaryError, match=r"both a CPU and a GPU FAISS.*make setup FAISS=gpu"):
        check_faiss_build(both, cuda_available=True)
    with caplog.at_level(logging.WARNING, logger="extract.dictionaries"):
        check_faiss_build(build, cuda_available=True)  # a GPU the CPU build cannot use: said, not refused
    assert "CPU build" in caplog.text and "FAISS=gpu" in caplog.text
