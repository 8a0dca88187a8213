"""Stage 1 end to end on a few tiny synthetic videos: schema, resume, failures, fingerprint."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from extract.contract import schema
from extract.contract.schema import CacheError
from extract.contract.store import ExtractError
from extract.datasets import load_dataset
from extract.pipeline import extract, fingerprint
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
FEATURES = [
    schema.CLIP_FRAME,
    schema.CLIP_FG,
    schema.CLIP_BG,
    schema.SALIENCY,
    schema.TSF_FRAME,
    schema.TSF_CLS,
    schema.FRAME_MASK,
    schema.TIMESTAMPS,
    schema.FPS,
    schema.DONE,
]


def _config(root: Path, cache_root: Path, **sections):
    return tiny_config(root, cache_root, **sections)


@pytest.fixture(scope="module")
def extracted(tiny_cache):
    cfg, store = tiny_cache
    return cfg, extract(cfg, progress=False)  # a no-op re-run: its summary names the store


def test_every_array_has_its_schema_shape_dtype_and_dims(extracted):
    cfg, summary = extracted
    group, info = schema.open_cache(summary.store)
    n, L = 12, 8
    assert summary.done + summary.skipped == n and not summary.failures
    assert summary.store.parent.name == "synthetic" and summary.store.stem == info.attrs["fingerprint"]
    dc, dv, m = group[schema.CLIP_FRAME].shape[2], group[schema.TSF_FRAME].shape[2], group[schema.SALIENCY].shape[2]
    specs = {
        s.name: s
        for s in schema.array_specs(schema.Sizes(n, L, dc, dv, m), {"activity": (8, False), "atomic": (16, True)})
    }
    for name, spec in specs.items():
        arr = group[name]
        assert arr.shape == spec.shape and str(arr.dtype) == spec.dtype, name
        assert tuple(arr.metadata.dimension_names) == spec.dims, name
    assert np.asarray(group[schema.DONE][:]).all() and np.asarray(group[schema.FRAME_MASK][:]).all()
    vp = np.asarray(group[schema.CLIP_FRAME][:], dtype=np.float32)
    assert np.allclose(np.linalg.norm(vp, axis=-1), 1, atol=1e-2)  # VP is L2-normalised
    assert np.isfinite(np.asarray(group[schema.TSF_CLS][:], dtype=np.float32)).all()
    ts = np.asarray(group[schema.TIMESTAMPS][:])
    assert (np.diff(ts, axis=1) > 0).all() and (np.asarray(group[schema.FPS][:]) == 8).all()
    assert np.allclose(np.linalg.norm(np.asarray(group["text/activity"][:], dtype=np.float32), axis=-1), 1, atol=1e-2)
    # labels agree with the manifest
    index = load_dataset(cfg)
    act = np.asarray(group["labels/activity"][:])
    names = info.vocabularies["activity"]["names"]
    assert [names[a] for a in act] == [it.labels["activity"] for it in index.items]
    hot = np.asarray(group["labels/atomic"][:])
    atomic = info.vocabularies["atomic"]["names"]
    assert [set(np.asarray(atomic)[h]) for h in hot] == [set(it.labels["atomic"]) for it in index.items]
    assert info.video_ids == [it.id for it in index.items] and info.splits.count("test_ood") == 3
    prov = info.attrs["provenance"]
    assert prov["clip"]["random_weights"] and prov["timesformer"]["weights"] == "random"
    assert info.attrs["config"]["frames"]["num_frames"] == 8


def test_xarray_sees_named_dimensions(extracted):
    xr = pytest.importorskip("xarray")
    clip = xr.open_zarr(extracted[1].store, group="clip", consolidated=False)
    assert clip["frame"].dims == ("video", "frame", "feature") and clip["bg"].shape[:2] == (12, 8)
    root = xr.open_zarr(extracted[1].store, consolidated=False)
    assert root["saliency"].dims == ("video", "frame", "map_y", "map_x") and root["done"].dims == ("video",)


def test_rerun_is_a_no_op_that_rewrites_no_chunk(extracted):
    cfg, summary = extracted
    before = {p: p.stat().st_mtime_ns for p in summary.store.rglob("*") if p.is_file() and p.name != "zarr.json"}
    again = extract(cfg, progress=False)
    assert again.store == summary.store and again.done == 0 and again.skipped == 12
    after = {p: p.stat().st_mtime_ns for p in summary.store.rglob("*") if p.is_file() and p.name != "zarr.json"}
    assert before == after


def test_fingerprint_tracks_what_changes_the_numbers_and_nothing_else(world, tmp_path):
    base = _config(world, tmp_path)
    index = load_dataset(base)
    fp = fingerprint(base, index, "cpu")
    assert fp == fingerprint(_config(world, tmp_path), index, "cpu")
    same = [
        {"train": {"lr": 0.5, "epochs": 3}},
        {"frames": {"decode_workers": 2}},
        {"encoders": {"batch_frames": 8}},
        {"cache": {"root": str(tmp_path / "elsewhere")}},
    ]
    for override in same:
        assert fingerprint(_config(world, tmp_path, **override), index, "cpu") == fp, override
    different = [
        {"frames": {"num_frames": 16}},
        {"frames": {"sampling": "region"}},
        {"saliency": {"method": "spectral-residual"}},
        {"saliency": {"mass": 0.5}},
        {"saliency": {"crop": "squash"}},
        {"encoders": {"precision": "bf16"}},
        {"frames": {"max_short_side": None}},
        {"frames": {"pixel_aspect": "apply"}},
        {"encoders": {"timesformer": {"sampling": "spread"}}},
        {"encoders": {"timesformer": {"clip_frames": 4}}},
        {"encoders": {"timesformer": {"sampling_rate": 2}}},
        {"encoders": {"timesformer": {"target_fps": 25.0}}},
        {"encoders": {"clip": {"pretrained": "openai"}}},
    ]
    for override in different:
        assert fingerprint(_config(world, tmp_path, **override), index, "cuda") != fingerprint(base, index, "cuda")
    assert fingerprint(base, index, "cuda") != fp  # fp16 on GPU is not fp32 on CPU
    clip = {"encoders": {"clip": {"preset": "base"}}}
    assert fingerprint(_config(world, tmp_path, **clip), index, "cpu") != fp
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"one")
    with_w = _config(world, tmp_path, encoders={"timesformer": {"weights": str(weights)}})
    fp_w = fingerprint(with_w, index, "cpu")
    weights.write_bytes(b"two")  # same path, other contents
    assert fingerprint(with_w, index, "cpu") != fp_w


def _broken_world(world: Path, tmp: Path) -> Path:
    root = tmp / "broken"
    shutil.copytree(world, root)
    videos = sorted((root / "videos" / "train").glob("*.mp4"))
    videos[0].write_bytes(b"")  # zero-length
    videos[1].write_text("this is not a video\n")  # wrong content for its extension
    data = videos[2].read_bytes()
    videos[2].write_bytes(data[: len(data) // 3])  # truncated
    videos[3].unlink()  # missing
    from extract.synthetic import write_video

    write_video(videos[4], np.zeros((1, 48, 48, 3), np.uint8), fps=8)  # a single frame: too short
    return root


def test_bad_videos_are_recorded_and_skipped(world, tmp_path):
    root = _broken_world(world, tmp_path)
    cfg = _config(root, tmp_path / "cache")
    summary = extract(cfg, progress=False)
    kinds = {vid: reason.split(":")[0] for vid, reason in summary.failures.items()}
    assert kinds == {
        "train_00000": "empty",
        "train_00001": "unreadable",
        "train_00002": "truncated",
        "train_00003": "missing",
        "train_00004": "too_short",
    }
    assert summary.done == 7
    group, info = schema.open_cache(summary.store)
    assert info.failures == summary.failures
    assert np.asarray(group[schema.DONE][:]).sum() == 7
    assert any("train_00002" in line and "truncated" in line for line in summary.lines())
    # the user restores a file and re-runs: only that row is filled, the failure is cleared
    shutil.copy(world / "videos" / "train" / "train_00003.mp4", root / "videos" / "train" / "train_00003.mp4")
    again = extract(cfg, progress=False)
    assert again.store == summary.store and again.done == 1 and "train_00003" not in again.failures
    assert "train_00003" not in schema.open_cache(summary.store)[1].failures


def test_non_finite_features_are_caught_before_writing(world, tmp_path, monkeypatch):
    import extract.pipeline as pipeline

    real, calls = pipeline.encode_on_device, []

    def poisoned(videos, cfg, enc):  # the first video of the first group comes out NaN
        out = real(videos, cfg, enc)
        if not calls:
            out[schema.TSF_CLS][0, 0] = float("nan")
        calls.append(len(videos))
        return out

    monkeypatch.setattr(pipeline, "encode_on_device", poisoned)
    summary = extract(_config(world, tmp_path), progress=False)
    assert summary.failures == {"train_00000": "non-finite: the encoders produced NaN or inf"}
    assert not schema.open_cache(summary.store)[0][schema.DONE][0]


class _FullDisk:
    """A store whose every write fails as a full disk does."""

    store = "a full disk"

    def __getitem__(self, name):
        return self

    def __setitem__(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_stops_with_a_sentence_and_keeps_finished_rows(world, tmp_path, monkeypatch):
    import extract.contract.store as store

    calls = []

    def fill_up(group, start, values):  # the first group lands, then the disk is full
        calls.append(start)
        return store.write_rows(group if len(calls) == 1 else _FullDisk(), start, values)

    monkeypatch.setattr("extract.pipeline.write_rows", fill_up)
    with pytest.raises(ExtractError, match="is full; finished videos are kept and marked done.*resume"):
        extract(_config(world, tmp_path, encoders={"batch_frames": 8}), progress=False)
    store_path = next((tmp_path / "synthetic").glob("*.zarr"))
    assert np.asarray(zarr.open_group(str(store_path))[schema.DONE][:]).sum() == 1


def test_store_of_another_schema_version_is_refused(extracted, tmp_path):
    copy = tmp_path / "old.zarr"
    shutil.copytree(extracted[1].store, copy)
    zarr.open_group(str(copy), mode="r+").attrs["schema_version"] = 0
    with pytest.raises(CacheError, match="written with cache schema version 0.*re-extract"):
        schema.open_cache(copy)


def _run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "train.main", "-q", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _arrays(store: Path) -> dict:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]) for name in FEATURES}


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_identical_arrays(world, tmp_path):
    """A run killed by SIGKILL at two different points resumes and ends byte-equal to a clean run."""
    sets = [
        "encoders.clip.weights=null",
        "encoders.timesformer.weights=null",
        f"dataset.root={world}",
        "frames.num_frames=8",
        "frames.decode_workers=0",
        "encoders.batch_frames=8",
        f"cache.root={tmp_path / 'killed'}",
    ]
    args = ["extract", "--config", str(REPO / "pipeline.yaml")] + [a for s in sets for a in ("--set", s)]
    store = None
    for kill_after in (2, 6):  # rows done before the kill, in two successive interrupted runs
        proc = _run_cli(args, tmp_path)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            stores = list((tmp_path / "killed" / "synthetic").glob("*.zarr"))
            if stores and (stores[0] / schema.DONE / "zarr.json").exists():
                store = stores[0]
                try:
                    done = int(np.asarray(zarr.open_group(str(store), mode="r")[schema.DONE][:]).sum())
                except Exception:  # noqa: BLE001 - a shard mid-replace; look again
                    done = 0
                if done >= kill_after:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert store is not None
        assert int(np.asarray(zarr.open_group(str(store), mode="r")[schema.DONE][:]).sum()) < 12, "finished early"
    finished = _run_cli(args, tmp_path)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err.decode()
    assert not list(store.rglob("*.partial"))
    clean_cfg = _config(world, tmp_path / "clean", encoders={"batch_frames": 8})
    clean = extract(clean_cfg, progress=False)
    assert clean.store.name == store.name
    got, want = _arrays(store), _arrays(clean.store)
    for name in FEATURES:
        assert np.array_equal(got[name], want[name]), name


def test_cli_extract_and_inspect(world, tmp_path):
    sets = [f"dataset.root={world}", "frames.num_frames=8", "frames.decode_workers=1", f"cache.root={tmp_path}"]
    sets += [
        "encoders.clip.weights=null",
        "encoders.timesformer.weights=null",
    ]  # random tiny encoders, as the session cache
    args = [a for s in sets for a in ("--set", s)]
    proc = _run_cli(["extract", "--config", str(REPO / "pipeline.yaml"), *args], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "videos: 12 extracted, 0 already done, 0 failed (of 12)" in text and "frames/s" in text
    assert "MiB on disk vs" in text
    proc = _run_cli(["inspect", "--config", str(REPO / "pipeline.yaml"), *args], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert "split train: 6 videos, 6 done" in out.decode() and "clip/frame" in out.decode()
    png = tmp_path / "v.png"
    proc = _run_cli(
        ["inspect", "train_00001", "--out", str(png), "--config", str(REPO / "pipeline.yaml"), *args], tmp_path
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = _run_cli(["inspect", "nope", "--config", str(REPO / "pipeline.yaml"), *args], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "video 'nope' is not in" in err.decode()
    # the saliency methods side by side: the stored map, and each method computed now; a video file, before any
    # extraction (its own footage), every method
    from extract.inspect import inspect_video
    from tests.conftest import tiny_config

    cfg = tiny_config(world, tmp_path)
    store = next(tmp_path.rglob("*.zarr"))
    sides = inspect_video(cfg, store, "train_00001", tmp_path / "s.png", methods=("spectral-residual",))
    assert sides.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    video = next(world.rglob("*.mp4"))
    proc = _run_cli(
        ["inspect", str(video), "--out", str(tmp_path / "f.png"), "--config", str(REPO / "pipeline.yaml"), *args],
        tmp_path,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG", err.decode()
    proc = _run_cli(
        ["inspect", "train_00001", "--saliency", "nope", "--config", str(REPO / "pipeline.yaml"), *args], tmp_path
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--saliency: unknown method 'nope'" in err.decode()


def test_another_synthetic_world_at_the_same_paths_is_another_store(tmp_path):
    from extract.synthetic import write_dataset

    small = {"videos": {"train": 2, "test_iid": 0, "test_ood": 0}}
    cfg = _config(tmp_path / "w", tmp_path / "cache", synthetic=small)
    write_dataset(cfg.synthetic, tmp_path / "w", progress=False)
    before = fingerprint(cfg, load_dataset(cfg), "cpu")
    other = _config(tmp_path / "w", tmp_path / "cache", synthetic={**small, "rho": 0.5})
    write_dataset(other.synthetic, tmp_path / "w", progress=False)  # same video paths, other videos
    index = load_dataset(other)
    assert [it.path for it in index.items] == [it.path for it in load_dataset(cfg).items]
    assert index.source["synthetic_world"] != before and fingerprint(other, index, "cpu") != before


def test_a_changed_video_file_is_extracted_again_and_never_served_stale(world, tmp_path):
    from extract.inspect import locate_store

    root = tmp_path / "copy"
    shutil.copytree(world, root)
    cfg = _config(root, tmp_path / "cache")
    first = extract(cfg, progress=False)
    group, info = schema.open_cache(first.store)
    stamps = info.attrs["file_stamps"]
    assert set(stamps) == set(info.video_ids) and all(len(s) == 2 for s in stamps.values())
    row = info.video_ids.index("train_00001")
    old = np.asarray(group[schema.CLIP_FRAME][row])
    # the user replaces one file by another video at the same path
    shutil.copy(root / "videos" / "train" / "train_00002.mp4", root / "videos" / "train" / "train_00001.mp4")
    with pytest.raises(CacheError, match="train_00001.*ltar extract"):
        locate_store(cfg)  # training would read the old file's features: refused
    again = extract(cfg, progress=False)
    assert again.store == first.store and again.done == 1 and again.skipped == len(info.video_ids) - 1
    group = schema.open_cache(first.store)[0]
    new = np.asarray(group[schema.CLIP_FRAME][row])
    assert not np.array_equal(new, old)
    np.testing.assert_array_equal(new, np.asarray(group[schema.CLIP_FRAME][info.video_ids.index("train_00002")]))
    assert locate_store(cfg) == first.store
    # a file deleted once cached keeps its row (the features are still those of the file they came from)
    (root / "videos" / "train" / "train_00003.mp4").unlink()
    assert extract(cfg, progress=False).done == 0 and locate_store(cfg) == first.store


def test_videos_shorter_than_the_frame_slots_are_reported(world, tmp_path):
    """3-4 s at the world's frame rate into 40 slots: frames repeat. The summary names those videos with their
    distinct frame counts (as counted here from the stored timestamps with np.unique), and `ltar inspect` lists
    them from the store."""
    import zarr

    from extract.contract import schema
    from extract.inspect import cache_summary
    from extract.pipeline import extract
    from tests.conftest import tiny_config

    cfg = tiny_config(world, tmp_path / "cache", frames={"num_frames": 40, "decode_workers": 0})
    summary = extract(cfg, progress=False)
    group = zarr.open_group(str(summary.store), mode="r")
    stamps, mask = np.asarray(group[schema.TIMESTAMPS][:]), np.asarray(group[schema.FRAME_MASK][:])
    counts = [len(np.unique(t[m])) for t, m in zip(stamps, mask, strict=True)]
    assert any(c < m.sum() for c, m in zip(counts, mask, strict=True))  # the premise: some frames repeat
    assert np.array_equal(schema.distinct_frames(stamps, mask), counts)
    assert sorted(summary.short.values()) == sorted(c for c, m in zip(counts, mask, strict=True) if c < m.sum())
    assert any(line.startswith(f"short: {len(summary.short)} video(s)") for line in summary.lines())
    assert f"short: {len(summary.short)} video(s) repeat frames" in cache_summary(summary.store)


@pytest.mark.parametrize("method", ["motion", "clip-surgery"])
def test_every_saliency_method_reaches_the_store(world, tmp_path, method):
    """The stored map is the method's own, computed from what CLIP sees: motion from the frames one native frame
    before and after each sampled one (decoded independently here), clip-surgery from the encoder's v-v path."""
    import torch

    from extract.decode import decode_frames, probe
    from extract.pipeline import _GroupDecoder, build_encoders, decode_cap, encode_group, map_size
    from extract.saliency import clip_surgery_saliency, motion_saliency, saliency_to_uint8

    cfg = _config(world, tmp_path, saliency={"method": method})
    index = load_dataset(cfg)
    enc = build_encoders(cfg, "cpu")
    item = index.items[0]
    video = _GroupDecoder([item], [np.array([0])], cfg, decode_cap(cfg, enc), enc.timesformer.sampling)
    decoded = video.decode_video(item)
    stored = encode_group([decoded], cfg, enc)[schema.SALIENCY][0]  # (L, m, m) uint8
    m = map_size(cfg, enc)
    ts = decoded["pts"].astype(np.float64)
    views = enc.clip.view(torch.from_numpy(decode_frames(item.path, ts).frames))  # (L, h, w, 3)
    if method == "motion":
        info = probe(item.path)
        step = 1.0 / info.fps
        near = [decode_frames(item.path, np.clip(ts + d, 0, info.duration)).frames for d in (-step, step)]
        expected = motion_saliency(*(enc.clip.view(torch.from_numpy(f)) for f in near), m)
    else:
        expected = clip_surgery_saliency(enc.clip.encode(views, attention=False, surgery=True)["surgery"])
    np.testing.assert_array_equal(stored, saliency_to_uint8(expected, m).numpy())
    summary = extract(cfg, progress=False)  # and the whole run takes it
    assert summary.done == len(index.items) and not summary.failures


def test_every_encoder_call_is_bounded_by_batch_frames(world, tmp_path):
    """Dense sampling (L far above encoders.batch_frames) runs every CLIP and TimeSformer call on at most
    batch_frames sampled frames (the crops call holds their foreground and background images together), so memory
    does not grow with L, and gives the numbers of one unbounded call."""
    import dataclasses

    from extract.pipeline import _GroupDecoder, build_encoders, decode_cap, encode_group

    cfg = _config(world, tmp_path, frames={"num_frames": 96, "decode_workers": 0}, encoders={"batch_frames": 16})
    enc = build_encoders(cfg, "cpu")
    item = load_dataset(cfg).items[0]
    video = _GroupDecoder([item], [np.array([0])], cfg, decode_cap(cfg, enc), enc.timesformer.sampling)
    decoded = video.decode_video(item)
    calls = []
    clip_encode, tsf_encode = enc.clip.encode, enc.timesformer.encode
    enc.clip.encode = lambda x, **kw: (calls.append(len(x)), clip_encode(x, **kw))[1]
    enc.timesformer.encode = lambda x: (calls.append(x.shape[0] * x.shape[1]), tsf_encode(x))[1]
    bounded = encode_group([decoded], cfg, enc)
    assert max(calls) <= 2 * 16 and len(calls) > 3 * 96 // 16  # frames, crops (fg + bg) and clips, all in pieces
    enc.clip.encode, enc.timesformer.encode = clip_encode, tsf_encode
    whole = encode_group(
        [decoded], dataclasses.replace(cfg, encoders=dataclasses.replace(cfg.encoders, batch_frames=4096)), enc
    )
    for name, array in bounded.items():
        np.testing.assert_allclose(array, whole[name], atol=2e-5, err_msg=name)


_RSS_PROBE = """
import resource, sys
from pathlib import Path
import numpy as np, torch
from tests.conftest import tiny_config
from extract.datasets import load_dataset
from extract.pipeline import _GroupDecoder, build_encoders, decode_cap, encode_group
torch.set_num_threads(1)
L = int(sys.argv[1])
cfg = tiny_config(Path(sys.argv[2]), Path(sys.argv[3]), frames={"num_frames": L}, encoders={"batch_frames": 32})
enc = build_encoders(cfg, "cpu")
item = load_dataset(cfg).items[0]
decoded = _GroupDecoder([item], [np.array([0])], cfg, decode_cap(cfg, enc), enc.timesformer.sampling).decode_video(item)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
encode_group([decoded], cfg, enc)
print(len(decoded["frames"]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_dense_sampling_peak_memory_is_flat_in_L(world, tmp_path):
    """Peak resident memory of encoding one video, over what decoding it already held, at L = 64 and L = 1,024
    (the tiny videos have ~30 frames, so both decode the same distinct frames): every encoder call is bounded and
    each frame is gathered on the device per chunk, so nothing of size L x T x H x W is built. Before, L = 1,024
    grew the high-water mark by ~200 MiB against ~45 MiB at L = 64."""
    growth = {}
    for L in (64, 1024):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(L), str(world), str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        distinct, kib = map(int, out.stdout.split()[-2:])
        growth[L] = kib / 1024  # MiB
        assert distinct < 64  # the same decoded frames at both L
    assert growth[1024] <= growth[64] + 16, growth


def test_writes_overlap_the_next_groups_encoding(world, tmp_path, monkeypatch):
    """The checks and writes run in the writer thread: group 2 is encoded while group 1 is still being written,
    the writes land in group order, and the store matches a run whose writes are immediate."""
    import threading

    import extract.contract.store as store
    import extract.pipeline as pipeline

    events, first_write_started = [], threading.Event()
    real_encode = pipeline.encode_on_device

    def encode(videos, cfg, enc):
        events.append(("encode", threading.current_thread().name))
        return real_encode(videos, cfg, enc)

    def slow_write(group, start, values):
        events.append(("write", threading.current_thread().name, start))
        if not first_write_started.is_set():
            first_write_started.set()
            time.sleep(1.0)  # a slow disk: the main thread goes on encoding meanwhile
        events.append(("written", start))
        return store.write_rows(group, start, values)

    monkeypatch.setattr(pipeline, "encode_on_device", encode)
    monkeypatch.setattr(pipeline, "write_rows", slow_write)
    cfg = _config(world, tmp_path / "slow", encoders={"batch_frames": 16})  # 2 videos per group
    summary = extract(cfg, progress=False)
    writes = [e for e in events if e[0] == "write"]
    assert {e[1] for e in writes} == {"ltar-writer"} and {e[1] for e in events if e[0] == "encode"} == {"MainThread"}
    assert [e[2] for e in writes] == sorted(e[2] for e in writes)  # in group order
    first_done = events.index(("written", writes[0][2]))
    assert [e[0] for e in events[:first_done]].count("encode") >= 2  # the next group encoded meanwhile
    monkeypatch.undo()
    again = extract(_config(world, tmp_path / "plain", encoders={"batch_frames": 16}), progress=False)
    a, b = zarr.open_group(str(summary.store)), zarr.open_group(str(again.store))
    for name in FEATURES:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_the_writer_raises_its_error_in_the_main_thread_and_keeps_what_was_handed_over():
    from extract.pipeline import _Writer

    written = []

    def write(n):
        if n == 2:
            raise OSError("disk gone")
        written.append(n)
        return n

    writer = _Writer(write, depth=8)
    for n in (0, 1, 2, 3):
        writer.put(n)
    writer.close()  # 0 and 1 land; 2 fails; nothing after a failure is written
    assert written == [0, 1] and writer.drain() == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        writer.raise_error()


def test_decode_workers_auto_fits_the_cores_and_shared_memory(world, tmp_path, monkeypatch, caplog):
    import extract.pipeline as pipeline
    from extract.contract.config import ConfigError

    cfg = _config(world, tmp_path, frames={"decode_workers": "auto"})
    enc = pipeline.build_encoders(cfg, "cpu")
    items = load_dataset(cfg).items
    groups = pipeline._groups(np.arange(len(items)), len(items), 4)
    from extract.decode import probe

    # 4 videos of 48x48 (under every cap): 8 slots x (1 frame + T clip frames + 2 motion neighbours), at most the
    # first video's own frames
    frames = min(8 * (1 + enc.timesformer.sampling["clip_frames"] + 2), probe(items[0].path).num_frames)
    assert pipeline.group_bytes(cfg, items, groups, enc) == 4 * frames * 48 * 48 * 3
    per_group = pipeline.group_bytes(cfg, items, groups, enc)
    assert pipeline.resolve_decode_workers(cfg, per_group, cores=8) == 7  # plenty of shared memory here
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(pipeline, "SHM", shm)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 3 * 1000))
    with caplog.at_level("WARNING"):
        assert pipeline.resolve_decode_workers(cfg, 1000, cores=8) == 2  # 3 groups fit: 2 decoding + 1 encoding
    assert "frames.decode_workers=auto" in caplog.text and "--shm-size" in caplog.text
    explicit = _config(world, tmp_path, frames={"decode_workers": 4})
    with pytest.raises(ConfigError, match=r"frames.decode_workers=4: .* need 0.00 GiB.*Set frames.decode_workers: 2"):
        pipeline.resolve_decode_workers(explicit, 1000)
    assert pipeline.resolve_decode_workers(_config(world, tmp_path, frames={"decode_workers": 0}), 10**12) == 0


def test_compiled_encoders_give_eager_numbers_at_fixed_shapes(world, tmp_path, monkeypatch):
    """encoders.compile: every call pads to the chunk's shape (one compile per shape: CLIP's frames and crops
    chunks, the TimeSformer's clips chunk), the outputs equal the eager encoders', and the store is another store.
    Dynamo's `eager` backend stands in for inductor on this CPU: the graph capture and the padding are under test,
    not the code generation."""
    import functools

    import torch

    from extract.pipeline import _GroupDecoder, build_encoders, decode_cap, encode_group

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = _config(world, tmp_path, frames={"num_frames": 12}, encoders={"batch_frames": 10})
    compiled_cfg = _config(world, tmp_path, frames={"num_frames": 12}, encoders={"batch_frames": 10, "compile": True})
    eager, fast = build_encoders(cfg, "cpu"), build_encoders(compiled_cfg, "cpu")
    items = load_dataset(cfg).items[:2]
    decoder = _GroupDecoder(items, [np.array([0, 1])], cfg, decode_cap(cfg, eager), eager.timesformer.sampling)
    videos = decoder[0]["videos"]  # 2 videos x 12 slots = 24 frames: chunks of 10, 10, 4
    want, got = encode_group(videos, cfg, eager), encode_group(videos, compiled_cfg, fast)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    T = fast.timesformer.sampling["clip_frames"]
    assert {s[0] for s in fast.clip._image.shapes} == {10, 20}  # frames chunk; fg + bg crops chunk
    assert {s[0] for s in fast.timesformer._forward.shapes} == {max(1, 10 // T)}
    assert fast.provenance()["clip"]["compiled"] and not eager.provenance()["clip"]["compiled"]
    index = load_dataset(cfg)
    assert fingerprint(cfg, index, "cpu") != fingerprint(compiled_cfg, index, "cpu")
