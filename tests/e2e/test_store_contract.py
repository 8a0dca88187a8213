"""What stage 1 hands stage 2 through the contract: the store pointer, the annotated-segment masks and same-set
pairs (schema version 2), and the in-place upgrade of a version-1 store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from extract.contract import schema
from extract.contract.locate import find_store, pointer_path
from extract.contract.schema import CacheError
from extract.pipeline import extract
from tests.conftest import tiny_config


def _files(store: Path) -> dict[str, str]:
    return {
        str(f.relative_to(store)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(store.rglob("*"))
        if f.is_file() and f.name != schema.LOCK_FILE
    }


def test_stage_two_finds_the_store_through_the_pointer_and_refuses_changed_files(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(world, root)
    cfg = tiny_config(root, tmp_path / "cache")
    with pytest.raises(CacheError, match="no cache store recorded.*run `ltar extract`"):
        find_store(cfg)
    store = extract(cfg, progress=False).store
    assert find_store(cfg) == store and pointer_path(cfg).exists()
    # a training setting is no stage-1 setting: the same store
    assert find_store(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5))) == store
    # a stage-1 setting is: another key, not found until extracted
    other = dataclasses.replace(cfg, frames=dataclasses.replace(cfg.frames, num_frames=4))
    with pytest.raises(CacheError, match="no cache store recorded"):
        find_store(other)
    # a video file replaced since its row was written: refused (the store would serve the old file's features)
    shutil.copy(root / "videos" / "train" / "train_00002.mp4", root / "videos" / "train" / "train_00001.mp4")
    with pytest.raises(CacheError, match="1 video file\\(s\\) changed.*train_00001.*ltar extract"):
        find_store(cfg)
    assert extract(cfg, progress=False).done == 1 and find_store(cfg) == store


def test_segment_mask_and_same_set_pairs_are_the_datasets(tiny_cache):
    """segment_mask against a frame-by-frame loop over the manifest's segments and the stored timestamps; the
    pairs against world.json."""
    cfg, store = tiny_cache
    group, info = schema.open_cache(store)
    lines = [json.loads(x) for x in (Path(cfg.dataset.root) / "manifest.jsonl").read_text().splitlines() if x]
    segments = {x["id"]: x.get("segments", []) for x in lines}
    times, valid = np.asarray(group[schema.TIMESTAMPS][:]), np.asarray(group[schema.FRAME_MASK][:])
    expected = np.zeros_like(valid)
    for r, vid in enumerate(info.video_ids):
        for slot in range(times.shape[1]):
            expected[r, slot] = valid[r, slot] and any(s[0] <= times[r, slot] < s[1] for s in segments[vid])
    mask = np.asarray(group[schema.SEGMENT_MASK][:])
    np.testing.assert_array_equal(mask, expected)
    assert info.annotated_segments and 0 < mask.sum() < valid.sum()  # idle frames between actions exist
    world = json.loads((Path(cfg.dataset.root) / "world.json").read_text())
    assert info.same_set_pairs == [tuple(p) for p in world["world"]["same_set_pairs"]] != []


def test_a_version_1_store_is_refused_then_upgraded_in_place_without_recomputing(tiny_cache, tmp_path):
    cfg, store = tiny_cache
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=str(tmp_path / "cache")))
    old = tmp_path / "cache" / store.parent.name / store.name
    shutil.copytree(store, old)
    before = _files(store)
    # make it what a version-1 extraction wrote: no segment_mask, none of the new attributes
    shutil.rmtree(old / schema.SEGMENT_MASK)
    group = zarr.open_group(str(old), mode="r+")
    attrs = dict(group.attrs)
    for key in ("annotated_segments", "same_set_pairs", "file_paths"):
        attrs.pop(key)
    attrs["schema_version"] = 1
    group.attrs.clear()
    group.attrs.update(attrs)
    with pytest.raises(CacheError, match="schema version 1.*Run `ltar extract`.*upgrades the store in place"):
        schema.open_cache(old)
    features = {k: v for k, v in _files(old).items() if not k.endswith("zarr.json")}
    summary = extract(cfg, progress=False)
    assert summary.store == old and summary.done == 0  # no row recomputed
    after = _files(old)
    assert {k: v for k, v in after.items() if k in features} == features  # every array's bytes as they were
    new, info = schema.open_cache(old)
    np.testing.assert_array_equal(
        np.asarray(new[schema.SEGMENT_MASK][:]), np.asarray(schema.open_cache(store)[0][schema.SEGMENT_MASK][:])
    )
    assert info.attrs["same_set_pairs"] == schema.open_cache(store)[1].attrs["same_set_pairs"]
    assert {k: v for k, v in after.items() if k.startswith(schema.SEGMENT_MASK)} == {
        k: v for k, v in before.items() if k.startswith(schema.SEGMENT_MASK)
    }  # the upgrade writes the mask a version-2 extraction writes, to the byte
