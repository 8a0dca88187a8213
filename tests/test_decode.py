"""Decoding: exact frames (every frame shows its index), seek == sequential, regions, failures, resizing."""

from __future__ import annotations

import os
import pickle

import av
import numpy as np
import pytest

from bench._videos import read_index, render_video
from extract.decode import KINDS, VideoError, decode_frames, probe, sample_timestamps

FPS = 30
NAMES = ["h264.mp4", "mpeg4.avi", "mpeg4-bframes.avi", "h264.ts", "h264.mkv"]


def indices(clip) -> list[int]:
    return [read_index(f) for f in clip.frames]


def expected(ts, num_frames: int) -> np.ndarray:
    """Index of the frame on screen at each time of a constant-rate video starting at 0."""
    return np.clip(np.floor(np.asarray(ts) * FPS + 1e-6).astype(int), 0, num_frames - 1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Long videos (900 frames = 30 s, keyframe every 30 frames) in the containers that matter."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "h264.mp4": render_video(root / "h264.mp4", 900),  # B-frames: pts != dts, keyframes indexed by dts
        "mpeg4.avi": render_video(root / "mpeg4.avi", 900, codec="mpeg4"),  # Breakfast's container and codec
        # AVI keeps no pts: with B-frames FFmpeg makes the first frame's pts 1 tick while start_time says 0.
        "mpeg4-bframes.avi": render_video(root / "mpeg4-bframes.avi", 900, codec="mpeg4", bframes=2),
        "h264.ts": render_video(root / "h264.ts", 900),  # start_time != 0, no index: seeks by bisection
        "h264.mkv": render_video(root / "h264.mkv", 900),  # no stream duration, index read lazily
    }


@pytest.mark.parametrize("name", NAMES)
def test_probe(videos, name):
    info = probe(videos[name])
    assert info.duration == pytest.approx(30.0, abs=1 / FPS)
    assert info.fps == pytest.approx(FPS)
    assert info.num_frames == 900
    assert (info.width, info.height) == (64, 48)
    assert info.keyframe_interval == pytest.approx(1.0, abs=0.01)
    assert info.codec == ("mpeg4" if name.endswith("avi") else "h264")
    assert info.start_time >= 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_frames", [4, 16, 64, 300])
def test_seek_equals_sequential_and_truth(videos, name, num_frames):
    info = probe(videos[name])
    ts = sample_timestamps(info.duration, num_frames)
    clips = {mode: decode_frames(videos[name], ts, mode=mode, info=info) for mode in ("sequential", "seek", "auto")}
    truth = expected(ts, 900)
    for mode, clip in clips.items():
        assert clip.frames.shape == (num_frames, 48, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.valid.all()
        assert indices(clip) == truth.tolist(), mode
        np.testing.assert_allclose(clip.pts, truth / FPS, atol=1e-3)  # Matroska keeps milliseconds
    np.testing.assert_array_equal(clips["seek"].frames, clips["sequential"].frames)
    np.testing.assert_array_equal(clips["seek"].pts, clips["sequential"].pts)
    if num_frames <= 16:  # samples several keyframe intervals apart: seeking skips most of the video
        assert clips["seek"].seeks >= num_frames - 1
        assert clips["seek"].frames_decoded < clips["sequential"].frames_decoded / 2
        assert clips["auto"].mode == "seek"
    if num_frames == 300:  # a sample every 3 frames: decoding through is cheaper
        assert clips["auto"].mode == "sequential" and clips["sequential"].seeks == 0


@pytest.mark.parametrize("name", [n for n in NAMES if not n.endswith(".mkv")])  # Matroska rounds pts to ms
def test_exact_on_frame_boundaries(videos, name):
    """t exactly on a frame's pts returns that frame (float noise absorbed), also the frame just before a keyframe,
    where a demuxer's seek may land one GOP too late (MPEG-TS bisects; AVI with B-frames shifts pts by a frame)."""
    wanted = [29, 90, 179, 270, 359, 450, 539, 630, 719, 810, 899]  # keyframes and the frames just before them
    for mode in ("seek", "sequential"):
        clip = decode_frames(videos[name], np.array(wanted) / FPS, mode=mode)
        assert indices(clip) == wanted, mode
        assert mode == "sequential" or clip.seeks >= len(wanted) - 1


def test_threads_give_identical_frames(videos):
    ts = sample_timestamps(30.0, 12)
    single = decode_frames(videos["h264.mp4"], ts, mode="seek", threads=1)
    threaded = decode_frames(videos["h264.mp4"], ts, mode="seek", threads=0)
    np.testing.assert_array_equal(single.frames, threaded.frames)


def test_unordered_and_repeated_timestamps(videos):
    ts = [5.0, 1.0, 5.0, -2.0, 29.99]
    for mode in ("sequential", "seek"):
        clip = decode_frames(videos["h264.ts"], ts, mode=mode)
        assert indices(clip) == [150, 30, 150, 0, 899]  # before the first frame: the first frame
        assert clip.valid.all()


def test_region_sampling_stays_inside(videos):
    info = probe(videos["mpeg4.avi"])
    region = (10.0, 12.5)
    ts = sample_timestamps(info.duration, 8, region=region)
    assert np.all((ts > region[0]) & (ts < region[1]))
    clip = decode_frames(videos["mpeg4.avi"], ts, info=info)
    idx = np.array(indices(clip))
    assert np.all((idx >= region[0] * FPS) & (idx <= region[1] * FPS))
    assert np.all((clip.pts >= region[0] - 1 / FPS) & (clip.pts <= region[1]))


def test_fewer_frames_than_samples(tmp_path):
    path = render_video(tmp_path / "five.mp4", 5)
    info = probe(path)
    clip = decode_frames(path, sample_timestamps(info.duration, 16), info=info)
    idx = indices(clip)
    assert clip.frames.shape[0] == 16 and clip.valid.all()
    assert idx == sorted(idx) and set(idx) == {0, 1, 2, 3, 4}  # each frame repeated over the time it is shown


def test_past_the_end_is_invalid(videos):
    clip = decode_frames(videos["h264.mp4"], [29.9, 31.0, 100.0])
    assert clip.valid.tolist() == [True, False, False]
    assert read_index(clip.frames[0]) == 897
    assert not clip.frames[1:].any() and np.isnan(clip.pts[1:]).all()


def test_header_slightly_longer_than_content(tmp_path):
    """An AVI cut in half loses its index; FFmpeg estimates 5 s, 139 frames (4.63 s) decode: within the slack,
    the last frame stays on screen. (Frames ending far before the header's duration: see cut_index_first.)"""
    cut = _cut(render_video(tmp_path / "full.avi", 300, codec="mpeg4"), tmp_path / "cut.avi")
    info = probe(cut)
    ts = sample_timestamps(info.duration, 16)
    for mode in ("sequential", "seek"):
        clip = decode_frames(cut, ts, info=info, mode=mode)
        last = max(indices(clip))
        assert clip.valid.all() and 100 < last < 150
        assert indices(clip) == np.minimum(expected(ts, 300), last).tolist()


def test_resize_keeps_aspect(videos, tmp_path):
    clip = decode_frames(videos["h264.mp4"], [1.0, 2.0], size=24)
    assert clip.frames.shape == (2, 24, 32, 3)
    portrait = render_video(tmp_path / "portrait.mp4", 10, size=(48, 64))
    clip = decode_frames(portrait, [0.1], size=24)
    assert clip.frames.shape == (1, 32, 24, 3)
    big = decode_frames(videos["h264.mp4"], [1.0], size=96)  # upscaling is allowed too
    assert big.frames.shape == (1, 96, 128, 3) and read_index(big.frames[0]) == 30


def test_sample_timestamps():
    ts = sample_timestamps(10.0, 5)
    np.testing.assert_allclose(ts, [1, 3, 5, 7, 9])
    np.testing.assert_allclose(sample_timestamps(10.0, 2, region=(4.0, 8.0)), [5, 7])
    np.testing.assert_allclose(sample_timestamps(10.0, 2, region=(8.0, 20.0)), [8.5, 9.5])  # clamped to the video
    np.testing.assert_allclose(sample_timestamps(10.0, 3, region=(12.0, 15.0)), [10, 10, 10])  # outside: the end
    jittered = sample_timestamps(10.0, 5, rng=np.random.default_rng(0))
    assert np.all(np.diff(jittered) > 0) and np.all((jittered >= [0, 2, 4, 6, 8]) & (jittered < [2, 4, 6, 8, 10]))
    again = sample_timestamps(10.0, 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(jittered, again)
    for L in (1, 7, 64):
        assert np.all(np.diff(sample_timestamps(3.3, L)) >= 0)
    with pytest.raises(ValueError):
        sample_timestamps(10.0, 0)
    with pytest.raises(ValueError):
        sample_timestamps(10.0, 4, region=(5.0, 1.0))


# ---------------------------------------------------------------------------------------------
# failures: one VideoError kind each, the path in the message, never a PyAV exception


def _audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _cut(src, dst, keep=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    moov_last = render_video(root / "whole.mp4", 300)
    faststart = render_video(root / "faststart.mp4", 300, container_options={"movflags": "faststart"})
    return {
        "missing": root / "missing.mp4",
        "empty": root / "empty.mp4",
        "text": root / "text.mp4",
        "directory": root,
        "audio": _audio_only(root / "audio.mp4"),
        "cut_index_last": _cut(moov_last, root / "cut_index_last.mp4"),  # the index (moov) is gone
        "cut_index_first": _cut(faststart, root / "cut_index_first.mp4"),  # index intact, data cut: fails mid-decode
        "one_frame": render_video(root / "one.mp4", 1),
    }


@pytest.mark.parametrize(
    "name, kind",
    [
        ("missing", "missing"),
        ("empty", "empty"),
        ("text", "unreadable"),
        ("directory", "unreadable"),
        ("audio", "no_video"),
        ("cut_index_last", "truncated"),
        ("cut_index_first", "truncated"),
    ],
)
def test_failures(broken, name, kind):
    path = broken[name]
    with pytest.raises(VideoError) as err:
        decode_frames(path, sample_timestamps(10.0, 8), mode="sequential")
    assert err.value.kind == kind and kind in KINDS
    assert str(path) in str(err.value) and err.value.path == str(path)
    if name != "cut_index_first":  # its header is intact: probing succeeds, decoding fails
        with pytest.raises(VideoError) as err:
            probe(path)
        assert err.value.kind == kind


def test_truncated_fails_in_seek_mode_too(broken):
    with pytest.raises(VideoError) as err:
        decode_frames(broken["cut_index_first"], sample_timestamps(10.0, 4), mode="seek")
    assert err.value.kind == "truncated" and "truncated" in str(err.value)


def test_too_short(broken):
    path = broken["one_frame"]
    assert decode_frames(path, [0.0, 1.0], min_frames=1).valid.tolist() == [True, False]
    with pytest.raises(VideoError) as err:
        decode_frames(path, [0.0, 1.0], min_frames=2)
    assert err.value.kind == "too_short" and str(path) in str(err.value)


def test_error_pickles(broken):
    """Workers in other processes report failures: the error must survive pickling with its kind."""
    with pytest.raises(VideoError) as err:
        probe(broken["missing"])
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.kind, back.path, str(back)) == ("missing", str(broken["missing"]), str(err.value))


def test_messages_are_sentences(broken):
    with pytest.raises(VideoError) as err:
        probe(broken["text"])
    message = str(err.value)
    assert message.startswith(f"{broken['text']}: ") and ".mp4" in message and "re-encode" in message


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_no_file_handles_leak(videos, broken):
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    decode_frames(videos["h264.mp4"], [1.0])  # warm-up: the first call may open lasting handles (logging, libs)
    before = open_files()
    for _ in range(10):
        decode_frames(videos["h264.ts"], sample_timestamps(30.0, 4), mode="seek")
        probe(videos["mpeg4.avi"])
        for name in ("text", "audio", "cut_index_last", "cut_index_first", "one_frame"):
            with pytest.raises(VideoError):
                decode_frames(broken[name], sample_timestamps(10.0, 4), min_frames=2)
    assert open_files() == before
