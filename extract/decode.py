"""Decoding and frame sampling for stage 1: the exact frame displayed at each requested time.

Time origin: t = 0 is the start of the video stream (its `start_time`), so timestamps, regions and
returned `pts` are seconds into the video whatever clock the container keeps (MPEG-TS starts at
1.4 s, mp4 edit lists shift B-frame streams). For each timestamp `t` we return the last frame whose
pts <= t (the frame on screen at t), or the first frame when t lies before it.

Two strategies give identical frames (a test checks it on a long video with known keyframes):
- `sequential` decodes every frame from the start (after one seek when the first timestamp is far in),
  keeping only the frames asked for;
- `seek` jumps to the keyframe at or before each timestamp and decodes forward to the wanted frame.
`auto` picks one per video from the gap between samples and the keyframe interval (see `_resolve_mode`).

Every failure is a `VideoError` whose message is a sentence naming the file, the reason and what to
do, with a machine-readable `kind`; no PyAV exception type leaves this module.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

log = logging.getLogger(__name__)

# Machine-readable failure kinds, in the order the checks run.
KINDS = ("missing", "empty", "unreadable", "no_video", "truncated", "too_short")

MODES = ("auto", "sequential", "seek")

# `auto` seeks when the typical gap between samples exceeds this many keyframe intervals (see _resolve_mode).
SEEK_GAP_FACTOR = 1.0

# Frames that stop short of the header's duration by more than this are a truncated file (VideoError); a
# smaller shortfall (headers counting dropped frames, rounding) leaves the last frame on screen until the end.
END_SLACK_S = 1.0
END_SLACK_SHARE = 0.05

INTERPOLATION = "BICUBIC"  # swscale filter for resizing (CLIP's preprocessing resizes bicubically too)

# Keyframe-interval probe without a demuxer index: stop demuxing after this many keyframes,
# packets or bytes, whichever comes first (packets are read, never decoded).
_PROBE_KEYFRAMES = 5
_PROBE_PACKETS = 1500
_PROBE_BYTES = 32 << 20
_ORIGIN_PACKETS = 32  # packets read for the first frame's pts (more than any B-frame reordering depth)
_INDEX_ENTRIES = 20000  # index entries read for the keyframe interval (about 11 min at 30 fps)

# Errors PyAV raises (all FFmpeg errors derive from av.FFmpegError; OSError covers file-system ones).
_AV_ERRORS = (av.FFmpegError, OSError, EOFError)

# Leading bytes of container formats: a file that starts like one but cannot be opened is
# truncated or corrupt, not "not a video".
_SIGNATURES = (
    ("an AVI", lambda b: b[:4] == b"RIFF" and b[8:12] == b"AVI "),
    ("an MP4/MOV", lambda b: b[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")),
    ("a Matroska/WebM", lambda b: b[:4] == b"\x1a\x45\xdf\xa3"),
    ("an MPEG-TS", lambda b: len(b) > 188 and b[0] == 0x47 and b[188] == 0x47),
    ("an MPEG-PS", lambda b: b[:4] == b"\x00\x00\x01\xba"),
    ("an FLV", lambda b: b[:3] == b"FLV"),
    ("an Ogg", lambda b: b[:4] == b"OggS"),
    ("an ASF/WMV", lambda b: b[:4] == b"\x30\x26\xb2\x75"),
)


class VideoError(Exception):
    """One video cannot be used; `kind` is one of KINDS, the message a sentence naming the file."""

    def __init__(self, path: str | os.PathLike, kind: str, reason: str):
        assert kind in KINDS, kind
        self.path = str(path)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable, so it crosses process boundaries (dask workers, DataLoader workers)
        return type(self), (self.path, self.kind, self.reason)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration: float  # seconds from the stream start to the end of its last frame (as the container declares it)
    fps: float  # average frame rate
    num_frames: int  # the container's frame count, or round(duration * fps) when it has none
    width: int  # coded width in pixels
    height: int  # coded height in pixels
    keyframe_interval: float  # seconds between keyframes: mean over the demuxer index or over the first keyframes
    codec: str  # decoder name, e.g. h264, mpeg4
    start_time: float  # seconds on the container's clock where t = 0 is: the pts of the first frame shown


@dataclass
class DecodedClip:
    """Frames at the requested timestamps, in the order they were requested.

    frames: (L, H', W', 3) uint8 RGB; zeros where `valid` is False.
    pts: (L,) float64 seconds (from the stream start) of the frame in each slot; NaN where `valid` is False.
    valid: (L,) bool. A slot is valid when the video shows a frame at its timestamp t: the last frame with
        pts <= t (the first frame for t before it), for t up to the end of the video, i.e. the later of the last
        frame's end (pts + duration) and the duration the header declares (a header up to END_SLACK longer than
        the frames keeps the last frame on screen; frames ending earlier than that raise VideoError "truncated").
        Repeated frames are valid: a video with fewer frames than L repeats them, as a player would show them.
        Only slots past the end of the video are zero-filled and invalid (`sample_timestamps` never asks for one).
    """

    frames: np.ndarray  # (L, H', W', 3) uint8
    pts: np.ndarray  # (L,) float64 seconds
    valid: np.ndarray  # (L,) bool
    info: VideoInfo
    mode: str  # strategy that ran: sequential or seek (auto resolved)
    frames_decoded: int  # frames the decoder produced, the cost of the call
    seeks: int  # container seeks made (back-offs included)


# ---------------------------------------------------------------------------------------------
# sampling


def sample_timestamps(
    duration: float,
    num_frames: int,
    region: tuple[float, float] | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Centres of `num_frames` equal segments over [0, duration] or over `region` (clamped to the video).

    With `rng`, each timestamp is drawn uniformly inside its segment instead (training-time jitter).
    A region that lies entirely outside the video collapses onto the nearest end.
    Returns (L,) float64 seconds, non-decreasing.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration}")
    start, end = 0.0, float(duration)
    if region is not None:
        a, b = float(region[0]), float(region[1])
        if not (math.isfinite(a) and math.isfinite(b)) or b < a:
            raise ValueError(f"region {tuple(region)} must be (start, end) seconds with start <= end")
        start = min(max(a, 0.0), end)
        end = min(max(b, start), end)
    offsets = np.full(num_frames, 0.5) if rng is None else rng.random(num_frames)  # (L,) in [0, 1)
    seg = (end - start) / num_frames
    return start + (np.arange(num_frames) + offsets) * seg  # (L,)


def clip_timestamps(
    centres, duration: float, fps: float, clip_frames: int, sampling_rate: int, target_fps: float
) -> np.ndarray:
    """One short clip per centre, sampled as facebookresearch/TimeSformer (and SlowFast) sample a test clip.

    The official loader spans `clip_size = sampling_rate * clip_frames / target_fps * fps` native frames and takes
    `linspace(start, start + clip_size - 1, clip_frames)` of them, clamped to the video (`decoder.py:
    get_start_end_idx`, `temporal_sampling`). In seconds: frames `delta = (clip_size - 1) / (clip_frames - 1) / fps`
    apart. We place frame `clip_frames // 2` exactly on each centre, so that the frame V_l keeps is the frame CLIP
    sees; the others clamp to [0, duration] (the first or last frame repeats near the ends, as in the official clamp).

    centres: (L,) seconds; fps: the video's frame rate (0 = unknown: target_fps is used). Returns (L, T) seconds.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1)  # (L,)
    fps = fps if fps > 0 else target_fps
    clip_size = sampling_rate * clip_frames / target_fps * fps  # native frames the clip spans
    delta = (clip_size - 1) / max(clip_frames - 1, 1) / fps  # seconds between the clip's frames
    offsets = (np.arange(clip_frames) - clip_frames // 2) * delta  # (T,)
    return np.clip(centres[:, None] + offsets[None, :], 0.0, max(float(duration), 0.0))  # (L, T)


# ---------------------------------------------------------------------------------------------
# opening and probing


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(path, "missing", "no such file; check dataset.root and the video's path in the manifest")
    if path.is_dir():
        raise VideoError(
            path, "unreadable", "is a directory, not a video file; point the manifest at the file inside it"
        )
    if path.stat().st_size == 0:
        raise VideoError(
            path, "empty", "the file is empty (0 bytes, an interrupted download or copy?); re-download or regenerate it"
        )


def _open_error(path: Path, err: BaseException) -> VideoError:
    """Classify a failure of av.open: unreadable content, or a container that starts right but is cut off."""
    if isinstance(err, PermissionError):
        return VideoError(path, "unreadable", "cannot be read (permission denied); fix the file's permissions")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return VideoError(path, "unreadable", f"cannot be read ({e.strerror}); check the file system")
    reason = getattr(err, "strerror", None) or str(err)
    for name, matches in _SIGNATURES:
        if matches(head):
            return VideoError(
                path,
                "truncated",
                f"the file starts like {name} container but FFmpeg cannot open it ({reason}); it is probably "
                "truncated (an interrupted download or copy) or corrupt; re-download it or re-encode it with ffmpeg",
            )
    ext = path.suffix.lower() or "(none)"
    return VideoError(
        path,
        "unreadable",
        f"not a video file FFmpeg can read ({reason}; the extension says {ext} but the content is no known "
        "container); check what the file is, or re-encode it with ffmpeg",
    )


def _video_stream(path: Path, container) -> av.VideoStream:
    attached = int(av.stream.Disposition.attached_pic)
    for stream in container.streams.video:
        if not int(stream.disposition) & attached:  # cover art in audio files is a one-picture "video" stream
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["no"]
    raise VideoError(
        path,
        "no_video",
        f"no video stream found (the container holds {', '.join(kinds)} streams only; is this an audio file?); "
        "there is nothing to decode",
    )


def _open(path: Path, threads: int | None = 0):
    """Open `path` read-only and pick its video stream; returns (container, stream). The caller closes it."""
    _check_file(path)
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except _AV_ERRORS as e:
        raise _open_error(path, e) from e
    try:
        stream = _video_stream(path, container)
        if threads is not None:
            # Frame + slice threading; frames are bit-identical to single-threaded decoding (tested).
            stream.codec_context.thread_type = "AUTO" if threads != 1 else "NONE"
            stream.codec_context.thread_count = threads
    except BaseException:
        container.close()
        raise
    return container, stream


def _ticks_per_second(stream) -> Fraction:
    return 1 / Fraction(stream.time_base)


def _demux_scan(container, stream, max_packets: int, max_keyframes: int) -> dict:
    """Read (never decode) packets from the start: the first frame's pts and the first keyframes' pts.

    first_pts is the smallest pts among the first _ORIGIN_PACKETS packets from the first keyframe on: with
    B-frames the frame shown first is not the first packet (AVI even gives it pts 1 with start_time 0).
    """
    keys, first_pts, n_packets, n_bytes, lo, hi, exhausted = [], None, 0, 0, None, None, True
    since_key = 0  # packets read since the first keyframe, that one included
    for packet in container.demux(stream):
        if packet.size == 0:  # the end-of-stream flush packet
            continue
        pts = packet.pts if packet.pts is not None else packet.dts
        n_packets += 1
        n_bytes += packet.size
        if pts is not None:
            if packet.is_keyframe:
                keys.append(pts)
            since_key += bool(keys)
            if 0 < since_key <= _ORIGIN_PACKETS:  # packets before the first keyframe are never shown
                first_pts = pts if first_pts is None else min(first_pts, pts)
            lo = pts if lo is None else min(lo, pts)
            hi = pts if hi is None else max(hi, pts)
        if len(keys) >= max_keyframes or n_packets >= max_packets or n_bytes >= _PROBE_BYTES:
            exhausted = False
            break
    return {"first_pts": first_pts, "keys": keys, "exhausted": exhausted, "lo": lo, "hi": hi}


def _keyframe_interval(stream, scan: dict | None, duration: float) -> float:
    """Mean seconds between keyframes, from the demuxer index when it has one, else from demuxed packets."""
    per_s = _ticks_per_second(stream)
    entries = stream.index_entries
    if len(entries) >= 2:
        keys = [e.timestamp for e in entries[:_INDEX_ENTRIES] if e.is_keyframe]
        if len(keys) >= 2:
            return float((max(keys) - min(keys)) / (len(keys) - 1) / per_s)
        if len(keys) == 1 and len(entries) > 2 * _PROBE_KEYFRAMES:  # a full index with a single keyframe
            return max(duration, 0.0)
    keys = scan["keys"] if scan else []
    if len(keys) >= 2:
        return float((max(keys) - min(keys)) / (len(keys) - 1) / per_s)
    if not scan or scan["exhausted"] or scan["lo"] is None:
        return max(duration, 0.0)  # one keyframe in the whole video: seeking never helps
    return float((scan["hi"] - scan["lo"]) / per_s)  # a lower bound: no second keyframe within the probe


def _stream_end(container, stream, start_ticks: int, duration: float) -> int | None:
    """Ticks at the end of the last packet, read from the file's tail (for containers without a stream duration)."""
    try:
        per_s = _ticks_per_second(stream)
        container.seek(start_ticks + int(duration * per_s) + 1, stream=stream, backward=True, any_frame=False)
        end = None
        for packet in container.demux(stream):
            if packet.pts is not None:
                stop = packet.pts + max(packet.duration or 0, 0)
                end = stop if end is None else max(end, stop)
        return end
    except _AV_ERRORS:
        return None


def _probe(path: Path, container, stream) -> VideoInfo:
    per_s = _ticks_per_second(stream)
    stream_start = stream.start_time if stream.start_time is not None else 0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    has_index = sum(1 for e in stream.index_entries[: 4 * _PROBE_KEYFRAMES] if e.is_keyframe) >= 2
    # With an index only the first packets are read (for the origin); without, enough for the keyframe interval.
    if has_index:
        scan = _demux_scan(container, stream, _ORIGIN_PACKETS, 2)
    else:
        scan = _demux_scan(container, stream, _PROBE_PACKETS, _PROBE_KEYFRAMES)
    origin = scan["first_pts"] if scan["first_pts"] is not None else stream_start  # t = 0: the first frame
    if stream.duration:
        duration = float(stream.duration / per_s)
    elif container.duration:
        duration = container.duration / av.time_base - float(origin / per_s)
        if container.start_time is not None:
            duration += container.start_time / av.time_base
    else:
        duration = 0.0
    num_frames = stream.frames or 0
    if num_frames <= 0 and fps > 0:
        num_frames = round(duration * fps)
    if fps <= 0 and num_frames > 0 and duration > 0:
        fps = num_frames / duration
    keyframe_interval = _keyframe_interval(stream, scan, duration)
    if not stream.duration:  # Matroska/WebM: the container duration may be the audio's; the video's tail says
        end = _stream_end(container, stream, origin, duration)
        if end is not None and end > origin:
            duration = float((end - origin) / per_s)
            num_frames = stream.frames or (round(duration * fps) if fps > 0 else num_frames)
    return VideoInfo(
        path=str(path),
        duration=max(duration, 0.0),
        fps=fps,
        num_frames=int(num_frames),
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        keyframe_interval=keyframe_interval,
        codec=stream.codec_context.name,
        start_time=float(origin / per_s),
    )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Duration, rate, size, frame count and keyframe interval of a video, without decoding a frame."""
    path = Path(path)
    container, stream = _open(path, threads=None)
    try:
        return _probe(path, container, stream)
    except VideoError:
        raise
    except _AV_ERRORS as e:
        raise VideoError(
            path,
            "truncated",
            f"reading the container failed ({e}); the file is probably truncated or corrupt; "
            "re-download it or re-encode it with ffmpeg",
        ) from e
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------
# decoding


class _Reader:
    """Frames of one video stream in presentation order, with seeking; owns (and closes) its container."""

    def __init__(self, path: Path, threads: int, start_time: float):
        self.path, self.threads, self.start_time = path, threads, start_time
        self.decoded = 0  # frames produced by the decoder over the reader's life
        self.since_start = 0  # frames produced since the last (re)start, if no seek happened since
        self.seeks = 0
        self.last_pts: int | None = None  # of the most recent frame, for error messages
        self._open()

    def _open(self) -> None:
        self.container, self.stream = _open(self.path, self.threads)
        self.per_s = _ticks_per_second(self.stream)
        self.start_ticks = round(self.start_time * self.per_s)  # t = 0: the first frame (VideoInfo.start_time)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_ticks = max(1, round(self.per_s / rate)) if rate else 1  # nominal frame duration
        self._frames = self.container.decode(self.stream)

    def close(self) -> None:
        self.container.close()

    def restart(self) -> None:
        """Back to the very first frame; reopening is the one way to get there in every container."""
        self.container.close()
        self._open()
        self.seeks += 1
        self.since_start = 0

    def seek(self, ticks: int) -> None:
        """Jump to the keyframe at or before `ticks` (as the demuxer understands it; callers verify)."""
        self.container.seek(int(ticks), stream=self.stream, backward=True, any_frame=False)
        self._frames = self.container.decode(self.stream)  # a fresh generator: nothing buffered from before
        self.seeks += 1

    def next(self):
        """The next frame with `frame.pts` filled in, or None at the end of the stream."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        self.decoded += 1
        self.since_start += 1
        if frame.pts is None:  # some AVI/raw streams: fall back to dts, then to the nominal rate
            if frame.dts is not None:
                frame.pts = frame.dts
            else:
                frame.pts = self.start_ticks if self.last_pts is None else self.last_pts + self.frame_ticks
        self.last_pts = frame.pts
        return frame


def _resolve_mode(mode: str, ticks: np.ndarray, start_ticks: int, keyframe_ticks: float) -> str:
    """Pick `seek` or `sequential` for `auto` from the sample gap and the keyframe interval.

    Decoding forward costs the whole gap g between two samples. Seeking costs the decode from the keyframe
    before the sample up to it (K/2 frames on average, K at worst, K = keyframe interval) plus a fixed price:
    the keyframe itself (an I-frame costs several P/B-frames), the B-frame reordering delay and the flush of
    the threading pipeline, together ~15-20 frames' worth at 320x240 H.264. So seeking pays from g ~ K/2 + 20
    frames on; we seek when g > SEEK_GAP_FACTOR * K with g the median gap (uniform sampling has equal gaps, so
    this is one choice per video). bench/_videos.py measured, at K = 30 frames, CPU seek/sequential = 0.78 at
    g = 1.03 K, 0.55 at 1.5 K, 0.28 at 3 K; factor 1 keeps a margin for content whose keyframes are cheap.
    """
    if mode != "auto":
        return mode
    points = np.unique(np.concatenate([[start_ticks], ticks]))
    if len(points) < 2:
        return "sequential"
    gap = float(np.median(np.diff(points)))
    return "seek" if gap > SEEK_GAP_FACTOR * keyframe_ticks else "sequential"


def _output_size(stream, info: VideoInfo, size: int | None, pixel_aspect: bool = False) -> tuple[int, int]:
    """(H', W'): the coded size, or short side = size with the aspect kept. `pixel_aspect` stretches the width by
    the sample aspect ratio first (the display size of anamorphic video; official loaders keep the coded grid)."""
    width, height = info.width, info.height
    sar = stream.sample_aspect_ratio if pixel_aspect else None
    display_w = width * (float(sar) if sar else 1.0)
    if size is None:
        return height, max(1, round(display_w))
    if display_w <= height:
        return max(1, round(height * size / display_w)), size
    return size, max(1, round(display_w * size / height))


def decode_frames(
    path: str | os.PathLike,
    timestamps,
    size: int | None = None,
    mode: str = "auto",
    min_frames: int = 1,
    info: VideoInfo | None = None,
    threads: int = 0,
    pixel_aspect: bool = False,
) -> DecodedClip:
    """The frame on screen at each timestamp (seconds from the stream start; any order, repeats allowed).

    timestamps: (L,) seconds. size: resize so the short side equals `size` (aspect kept), None = native size;
    frames are converted to RGB at their coded size first and resized in RGB (swscale), so chroma is never
    resampled twice. mode: auto | sequential | seek (identical frames; a speed choice). min_frames: fewer
    decodable frames than this raises VideoError(kind="too_short"). info: a `probe` result to reuse (else the
    file is probed). threads: decoder threads, 0 = FFmpeg's choice, 1 = single-threaded. pixel_aspect: apply
    the sample aspect ratio (the display size, see `_output_size`).
    Returns a DecodedClip with frames (L, H', W', 3) uint8, pts (L,), valid (L,).
    """
    path = Path(path)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)  # (L,)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"{path}: timestamps must be finite seconds, got {ts}")
    if info is None:
        info = probe(path)
    if info.num_frames < min_frames:
        raise VideoError(
            path,
            "too_short",
            f"the video has {info.num_frames} frame(s), fewer than min_frames={min_frames}; it is too short to sample",
        )
    reader = _Reader(path, threads, info.start_time)
    try:
        return _decode(reader, info, ts, size, mode, min_frames, pixel_aspect)
    except VideoError:
        raise
    except _AV_ERRORS as e:
        seconds = None if reader.last_pts is None else float((reader.last_pts - reader.start_ticks) / reader.per_s)
        at = "" if seconds is None else f" after {seconds:.2f} s"
        raise VideoError(
            path,
            "truncated",
            f"decoding failed{at} of a {info.duration:.2f} s video ({e}); the file is probably "
            "truncated or corrupt; re-download it or re-encode it with ffmpeg",
        ) from e
    finally:
        reader.close()


def _decode(
    reader: _Reader, info: VideoInfo, ts: np.ndarray, size: int | None, mode: str, min_frames: int, pixel_aspect: bool
):
    L = len(ts)
    per_s, start = reader.per_s, reader.start_ticks
    # Integer ticks on the stream's clock; +1e-3 tick absorbs float error when t falls exactly on a frame's pts.
    ticks = start + np.floor(ts * float(per_s) + 1e-3).astype(np.int64)  # (L,)
    frame_ticks = max(1, round(float(per_s) / info.fps)) if info.fps > 0 else 1  # nominal frame duration
    key_ticks = max(float(info.keyframe_interval * per_s), float(frame_ticks))
    mode = _resolve_mode(mode, ticks, start, key_ticks)
    # Seek when the next sample lies beyond this many ticks ahead of the decoder; otherwise decode forward.
    # `sequential` seeks once at most, to the first sample (a region that starts far into the video).
    seek_ahead = key_ticks if mode == "seek" else SEEK_GAP_FACTOR * key_ticks
    H, W = _output_size(reader.stream, info, size, pixel_aspect)
    resize = (H, W) != (info.height, info.width)
    declared_end = start + round(info.duration * float(per_s))
    slack = max(END_SLACK_S, END_SLACK_SHARE * info.duration) * float(per_s)

    frames = np.zeros((L, H, W, 3), np.uint8)  # (L, H', W', 3)
    pts = np.full(L, np.nan)  # (L,)
    valid = np.zeros(L, bool)  # (L,)
    converted: dict[int, int] = {}  # frame pts -> slot already holding its pixels
    # One reformatter per call keeps swscale's context: 10x faster than frame.to_ndarray's fresh one per frame.
    # The colour conversion runs at the coded size; a resize, when asked for, runs on the RGB frame after it.
    to_rgb, rgb_resizer = VideoReformatter(), VideoReformatter()

    prev = None  # the last frame with pts <= the current sample
    ahead = None  # the next frame (pts > the current sample), already decoded
    eof = False
    from_start = True  # decoding began at the first frame (no seek since): every frame is accepted
    first_sample = True
    seekable = True  # cleared when seeking fails in this file; it is then decoded through

    def seek_to(t: int) -> None:
        """Position the decoder so that its first frame is a keyframe at or before t (or the video's start)."""
        nonlocal prev, ahead, eof, from_start, seekable
        target, back = t, max(key_ticks, frame_ticks)
        while True:
            if target <= start:
                # Backed off to the start: correct, but if t is far in, this file's seeks do not work; stop trying.
                seekable = t - start <= 4 * key_ticks
                reader.restart()
                prev, ahead, eof, from_start = None, None, False, True
                return
            try:
                reader.seek(target)
            except av.FFmpegError:
                target = start  # the demuxer cannot seek here: decode from the start instead
                continue
            frame = reader.next()
            # Start at a keyframe (open GOPs, inexact seeks); non-key frames before t are skipped, no further.
            while frame is not None and not frame.key_frame and frame.pts <= t:
                frame = reader.next()
            if frame is not None and frame.key_frame and frame.pts <= t:
                prev, ahead, eof, from_start = None, frame, False, False
                return
            # The demuxer landed past t (MPEG-TS seeks by bisection; AVI indexes by dts, one frame before the pts
            # of B-frame streams) or found no keyframe before t: back off by growing steps.
            target = min(target, frame.pts if frame is not None else target) - int(back)
            back *= 2

    for j in np.argsort(ticks, kind="stable"):
        t = int(ticks[j])
        position = ahead.pts if ahead is not None else (prev.pts if prev is not None else start)
        if (mode == "seek" or first_sample) and seekable and not eof and t - position > seek_ahead:
            seek_to(t)
        first_sample = False
        while True:  # decode forward until the next frame is past t
            if ahead is None:
                if eof:
                    break
                ahead = reader.next()
                if ahead is None:
                    eof = True
                    break
            if ahead.pts <= t:
                prev, ahead = ahead, None
            else:
                break
        if prev is not None:
            frame, ok = prev, True
            if ahead is None:  # the stream has ended: is t still inside the video?
                end = prev.pts + (prev.duration if prev.duration and prev.duration > 0 else frame_ticks)
                if end < t <= declared_end and declared_end - end > slack:
                    raise VideoError(
                        reader.path,
                        "truncated",
                        f"its frames end at {float((end - start) / per_s):.2f} s although "
                        f"the header declares {info.duration:.2f} s; the file is probably truncated (an interrupted "
                        "download or copy); re-download it or re-encode what is left with ffmpeg",
                    )
                # A header a little longer than the frames (within `slack`): the last frame stays on screen.
                ok = t <= max(end, declared_end)
        else:  # t precedes the first frame (only when decoding from the start): show the first frame
            frame, ok = ahead, ahead is not None
        if not ok:
            continue
        if frame.pts in converted:
            frames[j] = frames[converted[frame.pts]]
        else:
            rgb = to_rgb.reformat(frame, format="rgb24")  # (H, W) coded size
            if resize:
                rgb = rgb_resizer.reformat(rgb, W, H, interpolation=INTERPOLATION)  # (H', W') in RGB
            frames[j] = rgb.to_ndarray()  # (H', W', 3)
            converted[frame.pts] = j
        pts[j] = float((frame.pts - start) / per_s)
        valid[j] = True

    if from_start and eof and reader.since_start < max(min_frames, 1):  # the whole stream was decoded
        raise VideoError(
            reader.path,
            "too_short",
            f"only {reader.since_start} frame(s) could be decoded (the container lists {info.num_frames}), fewer "
            f"than min_frames={max(min_frames, 1)}; the video is too short to sample or its stream is corrupt",
        )
    if not valid.all() and L:
        log.warning(
            "%s: %d of %d requested timestamps lie past the end of the video (%.2f s); those slots are zero-filled "
            "and marked invalid",
            reader.path,
            int((~valid).sum()),
            L,
            info.duration,
        )
    return DecodedClip(frames, pts, valid, info, mode, reader.decoded, reader.seeks)
