"""Test and benchmark videos whose every frame shows its own index, plus a decode timing helper.

A frame's index is written as 16 black/white cells (2 rows x 8 columns, bit b in row b // 8, column b % 8)
filling the frame, or its top half when `texture` adds a moving picture below (so the bitrate, and the
decode cost, look like real footage). `read_index` reads it back through any codec noise.
Used by tests/extract/test_decode.py and bench/extract.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np

BITS = 16  # indices up to 65535


def index_image(i: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: the 16-cell code of index `i`."""
    img = np.zeros((height, width, 3), np.uint8)
    cw, ch = width // 8, height // 2
    for b in range(BITS):
        if (i >> b) & 1:
            r, c = divmod(b, 8)
            img[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] = 255
    return img


def read_index(rgb: np.ndarray, band: float = 1.0) -> int:
    """Index encoded in an (H, W, 3) frame; `band` = share of the height holding the code (0.5 with texture)."""
    H, W = rgb.shape[:2]
    height = round(H * band)
    cw, ch = W / 8, height / 2
    luma = rgb.mean(axis=2)  # (H, W)
    value = 0
    for b in range(BITS):
        r, c = divmod(b, 8)
        # The centre of the cell only: edges blur under chroma subsampling and block transforms.
        y0, y1 = int(r * ch + ch / 4), int((r + 1) * ch - ch / 4)
        x0, x1 = int(c * cw + cw / 4), int((c + 1) * cw - cw / 4)
        if luma[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].mean() > 128:
            value |= 1 << b
    return value


def render_video(
    path: str | Path,
    num_frames: int,
    fps: int = 30,
    size: tuple[int, int] = (64, 48),
    gop: int = 30,
    codec: str = "libx264",
    bframes: int | None = None,
    texture: bool = False,
    container_options: dict[str, str] | None = None,
    crf: int = 18,
) -> Path:
    """Write a video whose frame i shows index i; keyframes exactly every `gop` frames (no scene cuts).

    size: (width, height). codec: libx264 (B-frames unless bframes=0) or mpeg4 (no B-frames unless bframes>0).
    container_options: muxer options, e.g. {"movflags": "faststart"} to put an mp4's index first.
    """
    path = Path(path)
    width, height = size
    rng = np.random.default_rng(0)
    # Smooth noise twice the frame's size, panned one pixel per frame: motion a codec predicts, as in footage.
    base = rng.integers(0, 256, (height, 2 * width + num_frames, 3), dtype=np.uint8)
    base = (base.astype(np.uint16) + np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, 2, 1)) // 4
    base = base.astype(np.uint8)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        options = {}
        if codec == "libx264":
            params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
            if bframes is not None:
                params += f":bframes={bframes}"
            options = {"preset": "veryfast", "crf": str(crf), "x264-params": params}
        elif codec == "mpeg4":
            options = {"bf": str(bframes or 0), "sc_threshold": "1000000000", "qmax": "4"}
        stream.codec_context.options = options
        for i in range(num_frames):
            if texture:
                img = np.ascontiguousarray(base[:, i : i + width])
                img[: height // 2] = index_image(i, width, height // 2)
            else:
                img = index_image(i, width, height)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def render_long_video(path: str | Path, num_frames: int = 3000, fps: int = 30, size=(320, 240), gop: int = 30) -> Path:
    """The benchmark video: textured, H.264 with B-frames, keyframe every `gop` frames."""
    return render_video(path, num_frames, fps=fps, size=size, gop=gop, texture=True, crf=23)


def time_decode(
    path: str | Path, num_frames: int = 32, repeats: int = 3, size: int | None = None, threads: int = 0
) -> dict:
    """Decode `num_frames` uniformly sampled frames in each mode, and every frame; best of `repeats` runs.

    Returns wall and CPU seconds and sampled frames/s per mode, the seek speed-up over sequential (wall),
    and the throughput of a plain decode-every-frame loop (frames/s).
    """
    from extract.decode import decode_frames, probe, sample_timestamps

    info = probe(path)
    ts = sample_timestamps(info.duration, num_frames)
    result: dict = {
        "video": str(path),
        "num_frames": num_frames,
        "frames_in_video": info.num_frames,
        "keyframe_interval_s": info.keyframe_interval,
        "fps": info.fps,
    }
    clips = {}
    for mode in ("sequential", "seek", "auto"):
        best, cpu = float("inf"), float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            clips[mode] = decode_frames(path, ts, size=size, mode=mode, info=info, threads=threads)
            best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        result[mode] = {
            "seconds": best,
            "cpu_seconds": cpu,
            "sampled_frames_per_s": num_frames / best,
            "decoded": clips[mode].frames_decoded,
            "seeks": clips[mode].seeks,
            "ran": clips[mode].mode,
        }
    result["identical"] = bool(np.array_equal(clips["seek"].frames, clips["sequential"].frames))
    result["seek_speedup"] = result["sequential"]["seconds"] / result["seek"]["seconds"]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO" if threads != 1 else "NONE"
            stream.codec_context.thread_count = threads
            n = sum(1 for _ in container.decode(stream))
        best = min(best, time.perf_counter() - t0)
    result["every_frame"] = {"frames": n, "seconds": best, "frames_per_s": n / best}
    return result


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
        t0 = time.perf_counter()
        video = render_long_video(Path(tmp) / "long.mp4", n)
        print(f"rendered {n} frames in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for L in (8, 32, 128):
            print(json.dumps(time_decode(video, L), indent=1))
