"""The random store stage 2's tests train on (tests/train/random_cache.py): the contract's schema, its dictionaries'
known answers, and a signal training learns, with the answer the world was drawn to give."""

import dataclasses

import numpy as np
import pytest
import zarr

from extract.contract import schema
from tests.train.conftest import random_config, with_train
from tests.train.random_cache import ACTIVITIES, ATOMIC, RandomWorld, write_random_cache
from train.data import CacheReader
from train.engine import train

# the root attributes every store starts with (extract.pipeline.store_attrs), and what the writer adds per row
STORE_ATTRS = {
    "fingerprint",
    "dataset",
    "video_ids",
    "video_paths",
    "decode_size",
    "splits",
    "vocabularies",
    "provenance",
    "config",
    "shard_videos",
    "failures",
    "annotated_segments",
    "same_set_pairs",
    "file_stamps",
    "file_paths",
    "schema_version",
}


def test_the_store_is_every_array_of_the_schema_and_finished(random_store):
    group, info = schema.open_cache(random_store.store)
    w = random_store.world
    n = sum(w.videos.values())
    specs = schema.array_specs(
        schema.Sizes(n, w.num_frames, w.clip_dim, w.video_dim, w.map_size),
        {"activity": (len(ACTIVITIES), False), "atomic": (len(ATOMIC), True)},
    )
    for spec in specs:
        arr = group[spec.name]
        assert arr.shape == spec.shape and tuple(arr.metadata.dimension_names) == spec.dims, spec.name
    assert set(info.attrs) == STORE_ATTRS and info.attrs["fingerprint"] == random_store.store.stem
    assert np.asarray(group[schema.DONE][:]).all() and schema.store_shard_videos(group) == w.shard_videos
    assert info.annotated_segments and info.same_set_pairs == [("tea", "tea_reversed")]
    ids = np.asarray(group[schema.VIDEO][:]).tolist()
    assert ids == info.video_ids and all(np.asarray(group[c][:]).tolist() == ids for c in schema.VIDEO_COORDS)
    mask = np.asarray(group[schema.FRAME_MASK][:])
    assert np.array_equal(mask, random_store.mask) and not mask.all() and mask.sum(1).min() >= w.min_real
    segments = np.asarray(group[schema.SEGMENT_MASK][:])
    assert np.array_equal(segments, random_store.segments) and not (segments & ~mask).any()
    vp = np.asarray(group[schema.CLIP_FRAME][:], np.float32)
    assert np.allclose(np.linalg.norm(vp[mask], axis=-1), 1, atol=1e-2) and not vp[~mask].any()  # CLIP: unit
    # the tea pair: the same atomic actions (labels/atomic rows equal), another activity
    names = info.vocabularies["activity"]["names"]
    hot = np.asarray(group["labels/atomic"][:])
    act = np.asarray(group["labels/activity"][:])
    tea, rev = np.flatnonzero(act == names.index("tea"))[0], np.flatnonzero(act == names.index("tea_reversed"))[0]
    assert np.array_equal(hot[tea], hot[rev]) and hot[tea].sum() == 3


def test_equal_worlds_write_equal_stores_and_another_seed_another(tmp_path):
    a = write_random_cache(tmp_path / "a")
    b = write_random_cache(tmp_path / "b")
    c = write_random_cache(tmp_path / "c", RandomWorld(seed=1))
    assert a.store.name == b.store.name != c.store.name
    ga, gb = zarr.open_group(str(a.store), mode="r"), zarr.open_group(str(b.store), mode="r")
    for name in (schema.CLIP_FRAME, schema.TSF_FRAME, "labels/activity", "dictionaries/global/centroids"):
        assert np.array_equal(np.asarray(ga[name][:]), np.asarray(gb[name][:])), name


def test_the_dictionaries_hold_their_known_answers(random_store):
    """confounder: one entry per scene, nearest to the scene's prototype (cosine > 0.9), its prior the scene's share
    of the train split's real frames; every dictionary passes the reader's freshness check and carries its hash."""
    reader = CacheReader(random_store.store, "activity")
    dicts = reader.context().dictionaries
    w = random_store.world
    assert set(dicts) == {
        "confounder",
        "confounder_paper",
        "confounder_random",
        "confounder_noise",
        "confounder_average",
        "confounder_average_frame",
        "global",
        "global_video",
    }
    assert dicts["global_video"][0].shape == (w.kmeans_size, w.video_dim)
    centroids, prior = (x.numpy() for x in dicts["confounder"])
    cos = centroids @ random_store.scene_protos.T  # (S, S)
    assert np.array_equal(cos.argmax(1), np.arange(w.scenes)) and np.all(np.diag(cos) > 0.9)
    train = random_store.splits == "train"
    frames = random_store.mask[train].sum(1)  # real frames per train video
    share = np.bincount(random_store.scene[train], weights=frames, minlength=w.scenes) / frames.sum()
    assert np.allclose(prior, share, atol=1e-6) and all(np.isclose(p.sum(), 1) for _, p in dicts.values())
    group = reader.group
    for name in dicts:
        attrs = dict(group[f"dictionaries/{name}"].attrs)
        assert set(schema.DICTIONARY_ATTRS) <= set(attrs), name
        assert (
            attrs["rows_done_digest"] == schema.rows_digest(np.flatnonzero(train)) and len(attrs["params_hash"]) == 16
        )
    pca = group["dictionaries/confounder_paper"]
    assert pca["pca_matrix"].shape == (w.pca, w.clip_dim) and pca["pca_centroids"].shape == (w.scenes, w.pca)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A larger random world (48 videos per split), for what a head learns from it."""
    root = tmp_path_factory.mktemp("learnable")
    world = RandomWorld(videos={"train": 48, "test_iid": 48, "test_ood": 48})
    return random_config(root / "runs"), write_random_cache(root, world).store


def test_training_learns_the_activity_and_the_atomic_actions(learnable, tmp_path):
    cfg, store = learnable
    cfg = with_train(cfg, epochs=6)
    activity = train(cfg, store=store, progress=False, run_dir=tmp_path / "activity").metrics
    assert all(activity[s]["acc1"] >= 0.85 for s in ("test_iid", "test_ood")), activity  # chance: 0.25
    atomic = train(with_train(cfg, task="atomic"), store=store, progress=False, run_dir=tmp_path / "atomic").metrics
    assert all(atomic[s]["map"] >= 0.9 for s in ("test_iid", "test_ood")), atomic


def test_the_background_alone_learns_the_scene_shortcut_and_falls_to_chance_out_of_distribution(learnable, tmp_path):
    """BG holds the scene only: a head reading BG alone scores about rho (0.85) where the scene follows the activity
    (test_iid) and about chance (1 / 4) where it does not (test_ood): the planted confounder, measured by stage 2."""
    cfg, store = learnable
    bg = with_train(cfg, epochs=6, variant="bg_only")
    m = train(bg, store=store, progress=False, run_dir=tmp_path / "bg").metrics
    assert m["test_iid"]["acc1"] >= 0.7 and m["test_ood"]["acc1"] <= 0.4, m
    assert dataclasses.replace(bg.train, variant=None) == with_train(cfg, epochs=6).train
