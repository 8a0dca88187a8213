"""HDF5 import/export of cache arrays, and xarray's view of a store (named dims, video ids as coordinate)."""

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from extract.contract import schema
from extract.interop import H5Error, import_h5, resample_slots
from tests.conftest import tiny_config
from train.main import app

REPO = Path(__file__).resolve().parents[2]
FEATURES = [schema.CLIP_FRAME, schema.CLIP_FG, schema.CLIP_BG, schema.TSF_FRAME, schema.TSF_CLS]
EXACT = [schema.FRAME_MASK, schema.TIMESTAMPS, schema.FPS, schema.DONE, "labels/activity", "labels/atomic", "video"]


def _cli(*args: str):
    return CliRunner().invoke(app, [*args])


def _sets(world: Path, cache_root: Path) -> list[str]:
    sets = ["--config", str(REPO / "pipeline.yaml")]
    for s in (
        f"dataset.root={world}",
        f"cache.root={cache_root}",
        "frames.num_frames=8",
        "encoders.clip.weights=null",
        "encoders.timesformer.weights=null",
    ):
        sets += ["--set", s]
    return sets


def test_xarray_shows_every_array_with_the_video_ids_as_coordinate(tiny_cache):
    xr = pytest.importorskip("xarray")
    _, store = tiny_cache
    ids = schema.open_cache(store)[1].video_ids
    root = xr.open_zarr(store, consolidated=False)
    assert "video" in root.indexes and list(root["video"].values) == ids
    assert root["saliency"].dims == ("video", "frame", "map_y", "map_x") and root["fps"].dims == ("video",)
    assert root["frame_mask"].sel(video="train_00003").shape == (8,)
    clip = xr.open_zarr(store, group="clip", consolidated=False)
    assert list(clip["video"].values) == ids
    for name in ("frame", "fg", "bg"):  # `frame` shows among coordinates: it shares its name with a dimension
        assert clip[name].dims == ("video", "frame", "feature"), name
    assert clip["bg"].sel(video="test_ood_00001").shape[0] == 8
    tsf = xr.open_zarr(store, group="timesformer", consolidated=False)
    assert list(tsf["video"].values) == ids
    assert tsf["frame"].dims == ("video", "frame", "timesformer_feature")
    assert tsf["cls"].dims == ("video", "timesformer_feature")
    labels = xr.open_zarr(store, group="labels", consolidated=False)
    assert labels["activity"].dims == ("video",) and list(labels["video"].values) == ids


def test_export_then_import_gives_the_same_arrays(tiny_cache, world, tmp_path):
    cfg, store = tiny_cache
    out = tmp_path / "features.h5"
    for array in [*FEATURES, "text/activity", "text/atomic", "video"]:
        res = _cli("export-h5", str(store), array, str(out))
        assert res.exit_code == 0 and f"wrote /{array}:" in res.output, res.output
    with h5py.File(out, "r") as f:
        ds = f["clip/frame/train_00001"]
        assert ds.shape == (8, 64) and ds.dtype == np.float16 and ds.attrs["fps"] == 8
        assert len(ds.attrs["timestamps"]) == 8 and f.attrs["fingerprint"] == store.stem
        assert f.attrs["schema_version"] == schema.SCHEMA_VERSION
    res = _cli("import-h5", str(out), "--dataset", "synthetic", *_sets(world, tmp_path / "imported"))
    assert res.exit_code == 0, res.output
    assert "videos: 12 imported, 0 failed (of 12)" in res.output and "zero (not in the file): saliency" in res.output
    imported = Path(res.output.split("--store ")[-1].strip())
    want, got = zarr.open_group(str(store), mode="r"), zarr.open_group(str(imported), mode="r")
    for name in FEATURES + ["text/activity", "text/atomic"]:  # equal within fp16 (here: exactly)
        a, b = np.asarray(got[name][...], np.float32), np.asarray(want[name][...], np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3, err_msg=name)
    for name in EXACT:
        assert np.array_equal(np.asarray(got[name][...]), np.asarray(want[name][...])), name
    prov = got.attrs["provenance"]["imported"]
    assert prov["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and prov["source"] == str(out.resolve())
    assert prov["source_attrs"]["fingerprint"] == store.stem and prov["mapping"]["/clip/frame"] == "clip/frame"
    from train.data import CacheReader  # the heads can train on it

    split = CacheReader(imported, "activity").load_split("train")
    assert split.vp.shape == (6, 8, 64) and split.mask.all()
    # an unknown array, and a file of another store, are refused with a sentence
    res = _cli("export-h5", str(store), "clip/nope", str(out))
    assert res.exit_code == 2 and "has no array 'clip/nope'; choose from" in res.output
    res = _cli("export-h5", str(imported), "clip/frame", str(out))
    assert res.exit_code == 2 and "holds arrays of another store" in res.output


def _write(path: Path, datasets: dict[str, np.ndarray], **attrs) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def test_resampling_padding_unmatched_ids_and_missing_videos(world, tmp_path):
    cfg = tiny_config(world, tmp_path / "cache")
    ids = [f"train_{i:05d}" for i in range(6)] + [f"test_iid_{i:05d}" for i in range(3)]
    ids += [f"test_ood_{i:05d}" for i in range(2)]  # test_ood_00002 is not in the file
    rows = np.arange(20, dtype=np.float32)[:, None].repeat(6, 1)  # (T=20, D=6): row t holds t
    data = {vid: rows for vid in ids}
    data["train_00002"] = rows[:3]  # T = 3 < L = 8
    data["ghost"] = rows  # matches no video
    summary = import_h5(cfg, _write(tmp_path / "flat.h5", data, fps=10.0))
    assert summary.imported == 11 and set(summary.failures) == {"test_ood_00002"}
    assert (
        summary.failures["test_ood_00002"].startswith("missing:")
        and "/test_ood_00002" in summary.failures["test_ood_00002"]
    )
    assert summary.unmatched == {"/": ["ghost"]}
    assert {"timesformer/frame", "clip/fg", "clip/bg", "text/activity"} <= set(summary.zero)
    assert any("match no video of the dataset: 1 (ghost)" in line for line in summary.lines())
    group, info = schema.open_cache(summary.store)
    assert info.failures == summary.failures and not group[schema.DONE][11] and group[schema.DONE][:11].all()
    vp = np.asarray(group[schema.CLIP_FRAME][...], np.float32)  # (N, L, D)
    mask = np.asarray(group[schema.FRAME_MASK][...])
    picked = ((np.arange(8) + 0.5) * 20 / 8).astype(int)  # centre row of each of 8 segments: 1, 3, 6, 8, ...
    assert np.array_equal(vp[0, :, 0], picked) and mask[0].all()
    assert np.allclose(group[schema.TIMESTAMPS][0], picked / 10.0) and group[schema.FPS][0] == 10.0
    assert np.array_equal(vp[2, :3, 0], [0, 1, 2]) and not vp[2, 3:].any()  # padded
    assert mask[2].tolist() == [True] * 3 + [False] * 5
    assert not np.asarray(group[schema.TSF_FRAME][...]).any() and group[schema.TSF_FRAME].shape == (12, 8, 6)
    assert not np.asarray(group["text/activity"][...]).any()
    assert resample_slots(8, 8).tolist() == list(range(8))  # T == L: every row in its own slot


def test_a_kind_group_is_mapped_by_option(world, tmp_path):
    cfg = tiny_config(world, tmp_path / "cache")
    ids = [f"train_{i:05d}" for i in range(6)]
    file = _write(tmp_path / "feats.h5", {f"feats/{vid}": np.ones((8, 4), np.float32) for vid in ids})
    with pytest.raises(H5Error, match=r"has no datasets for clip/frame .*--map KIND=clip/frame"):
        import_h5(cfg, file)
    summary = import_h5(cfg, file, ["feats=clip/frame"])
    assert summary.imported == 6 and summary.provided == {"clip/frame": "feats"} and len(summary.failures) == 6


def test_malformed_files_are_one_sentence_naming_the_path_inside(world, tmp_path):
    vectors = {f"clip/train_{i:05d}": np.zeros((8, 6), np.float32) for i in range(3)}
    cases = {
        "not HDF5": (tmp_path / "notes.h5", "is not an HDF5 file"),
        "wrong rank": (_write(tmp_path / "rank.h5", {**vectors, "clip/train_00002": np.zeros(5)}), None),
        "mismatched D": (_write(tmp_path / "dims.h5", {**vectors, "clip/train_00001": np.zeros((8, 7))}), None),
        "truncated": (tmp_path / "cut.h5", "cannot be read as HDF5 (truncated or damaged?"),
        "missing": (tmp_path / "nowhere.h5", "does not exist"),
    }
    (tmp_path / "notes.h5").write_text("id,feature\n")
    whole = _write(tmp_path / "whole.h5", {f"clip/v{i}": np.random.rand(64, 32) for i in range(20)}).read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 2])
    expected = {
        "wrong rank": "/clip/train_00002 has shape (5,) (rank 1); datasets for clip/frame must be (T, D)",
        "mismatched D": "/clip/train_00001 has D=7 but /clip/train_00000 has D=6",
    }
    for case, (file, words) in cases.items():
        res = _cli("import-h5", str(file), *_sets(world, tmp_path / "cache"))
        assert res.exit_code == 2, (case, res.output)
        assert (words or expected[case]) in res.output, (case, res.output)
        assert res.output.startswith("error: ") and "Traceback" not in res.output, case
    res = _cli("import-h5", str(tmp_path / "dims.h5"), "--map", "clip=nope", *_sets(world, tmp_path / "cache"))
    assert res.exit_code == 2 and "unknown cache array 'nope'" in res.output


def test_a_file_whose_ids_match_no_video_writes_nothing(world, tmp_path):
    cfg = tiny_config(world, tmp_path / "cache")
    file = _write(tmp_path / "other.h5", {f"clip/vid_{i}": np.ones((8, 4), np.float32) for i in range(3)})
    with pytest.raises(H5Error, match=r"no video id in the file matches a video of dataset .* nothing was written"):
        import_h5(cfg, file)
    assert not any((tmp_path / "cache").rglob("*.zarr"))
