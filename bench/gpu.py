"""The GPU bench: where extraction and training spend a GPU box's time, in one run of at most ~5 minutes on one H100.

It renders its own dataset: the synthetic world at Breakfast's size and rate (320x240, 15 fps, 20-40 s videos,
H.264), half of the videos re-encoded with a keyframe every 30 frames and half every 250 (long keyframe intervals
are what make sampled decoding slow). The encoders are the `base` presets (CLIP ViT-B/16, TimeSformer-B 8x224,
random weights: speed does not depend on the weights) at `encoders.precision` (fp16 autocast by default).

- decode: sampled frames/s of the extractor's decoding workers (no encoders) by worker count, and for each
  keyframe interval at the most workers (`decode_fps_w{N}`, `decode_fps_gop{30,250}`);
- encode split: milliseconds per group in each stage of `encode_on_device`, the device synchronised around each
  (upload + gathers, CLIP's views, CLIP on the frames, saliency, fg/bg crops, CLIP on the crops, TimeSformer);
- write: milliseconds per group to write the encoded arrays into a store (zstd and chunk files);
- encoders alone: CLIP frames/s on a batch of `encoders.batch_frames` 224x224 frames (the target is >= 4,000 on an
  H100) and TimeSformer frames/s; the pipeline's own ceiling from them: 1 / (3 / clip_fps + T / tsf_fps) sampled
  frames/s (CLIP on the frame, its foreground and its background; T clip frames through the TimeSformer);
- end to end: `ltar extract` sampled frames/s, with the GPU's utilisation sampled every 0.1 s meanwhile
  (`e2e_over_ceiling`: the target is >= 0.8);
- compiled: CLIP's image tower and the TimeSformer eager against `torch.compile` (a fixed batch shape), seconds per
  batch and the largest embedding difference;
- stage 2: training steps/s of one head, one seed at a time against three seeds stacked (train/stacked.py), on the
  cache this run extracted, after its dictionaries (k-means on the GPU with faiss-gpu);
- k-means: FAISS on the same job as bench/dictionaries.py (100k x 512 into 512, 20 iterations), on the GPU when
  faiss-gpu sees one.

`--smoke` runs every step on the CPU in seconds (tiny presets, 8 small videos, dynamo's `eager` backend for the
compile step: the graph capture is what breaks, not the code generation); `make test` runs it.

Usage: python bench/gpu.py [--videos 128] [--frames 16] [--smoke]
The last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.extract import decode_only, end_to_end, write_only  # noqa: E402
from extract.contract.config import Config, from_dict  # noqa: E402

GOPS = (30, 250)  # keyframe intervals of the two halves of the videos


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def world_config(root: Path, cache: Path, videos: int, frames: int, smoke: bool) -> Config:
    """The bench's dataset and encoders: Breakfast-like videos, the `base` presets (tiny in the smoke run)."""
    preset = "tiny" if smoke else "base"
    test = max(1, videos // 8)
    return from_dict(
        {
            "dataset": {"root": str(root)},
            "synthetic": {
                "videos": {"train": videos - 2 * test, "test_iid": test, "test_ood": test},
                "height": 48 if smoke else 240,
                "width": 64 if smoke else 320,
                "fps": 15,
                "min_seconds": 3.0 if smoke else 20.0,
                "max_seconds": 4.0 if smoke else 40.0,
                "codec": "libx264",
            },
            "frames": {"num_frames": frames},
            "encoders": {
                "clip": {"weights": None, "preset": preset},
                "timesformer": {"weights": None, "preset": preset},
            },
            "cache": {"root": str(cache)},
            "dictionaries": {
                "confounder": {"size": 16 if smoke else 64},
                "global": {"size": 16 if smoke else 64},
            },
            # 30 epochs of ~3 steps, evaluated once at the end: steps/s of what `ltar ablate` runs, per-run costs in
            "train": {"epochs": 2 if smoke else 30, "batch_size": 8 if smoke else 32, "eval_every": 30},
        }
    )


def reencode(path: Path, gop: int) -> None:
    """Rewrite a video in place as H.264 with a keyframe exactly every `gop` frames (no scene cuts)."""
    import av

    tmp = path.with_name(f".{path.name}.gop.mp4")
    with av.open(str(path)) as src, av.open(str(tmp), "w") as dst:
        s = src.streams.video[0]
        out = dst.add_stream("libx264", rate=s.average_rate)
        out.width, out.height, out.pix_fmt = s.codec_context.width, s.codec_context.height, "yuv420p"
        out.codec_context.gop_size = gop
        out.codec_context.options = {
            "preset": "veryfast",
            "crf": "23",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
        }
        for frame in src.decode(s):
            frame.pts = None
            dst.mux(out.encode(frame))
        dst.mux(out.encode())
    os.replace(tmp, path)


def render(cfg: Config, root: Path, workers: int) -> dict[int, list[int]]:
    """The synthetic world rendered, then re-encoded: even rows every 30 frames, odd rows every 250. Returns the rows
    of each keyframe interval."""
    from concurrent.futures import ThreadPoolExecutor

    from extract.datasets import load_dataset
    from extract.synthetic import write_dataset

    write_dataset(cfg.synthetic, root, progress=False, workers=workers)
    items = load_dataset(cfg).items
    gop_of = [GOPS[r % 2] for r in range(len(items))]
    with ThreadPoolExecutor(workers) as pool:  # PyAV releases the GIL while it codes
        list(pool.map(lambda r: reencode(Path(items[r].path), gop_of[r]), range(len(items))))
    return {g: [r for r in range(len(items)) if gop_of[r] == g] for g in GOPS}


class Split:
    """Exclusive wall time per stage: a stage's time excludes the stages timed inside it; the device is
    synchronised at every boundary so the time is the stage's own kernels."""

    def __init__(self, device: str):
        self.device, self.seconds, self.stack, self.names = device, defaultdict(float), [], []

    @contextmanager
    def stage(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        self.stack.append(0.0)
        self.names.append(name)
        try:
            yield
        finally:
            self.names.pop()
            _sync(self.device)
            elapsed = time.perf_counter() - t0
            inner = self.stack.pop()
            self.seconds[name] += elapsed - inner
            if self.stack:
                self.stack[-1] += elapsed

    def wrap(self, owner, attr: str, name: str, inside: str | None = None):
        """Time every call of owner.attr as stage `name`, but as part of the enclosing stage when that is
        `inside` (CLIP's `encode` called by `encode_images` counts as the crops' pass)."""
        real = getattr(owner, attr)

        def timed(*args, **kwargs):
            if inside is not None and self.names and self.names[-1] == inside:
                return real(*args, **kwargs)
            with self.stage(name):
                return real(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, real)


def encode_split(cfg: Config, enc, decoded: list) -> dict[str, float]:
    """Milliseconds per group of each stage of `encode_on_device` over the decoded groups."""
    import extract.pipeline as pipeline
    import extract.saliency as saliency

    split = Split(enc.device)
    undo = [
        split.wrap(pipeline, "_upload", "upload"),
        split.wrap(pipeline, "_gathered", "upload"),
        split.wrap(enc.clip, "view", "clip_view"),
        split.wrap(enc.clip, "encode_images", "clip_crops"),
        split.wrap(enc.clip, "encode", "clip_frames", inside="clip_crops"),
        split.wrap(saliency, "foreground_background", "crops"),
        split.wrap(enc.timesformer, "encode", "timesformer"),
    ]
    undo += [split.wrap(saliency, f, "saliency") for f in ("motion_saliency", "clip_attention_saliency")]
    undo += [split.wrap(saliency, f, "saliency") for f in ("clip_surgery_saliency", "spectral_residual_saliency")]
    groups = [[v for v in g["videos"] if "frames" in v] for g in decoded]
    try:
        pipeline.encode_on_device(groups[0], cfg, enc)  # warm-up
        split.seconds.clear()
        with split.stage("other"):  # what no stage above holds: the outputs' assembly, index arithmetic
            for videos in groups:
                pipeline.encode_on_device(videos, cfg, enc)
    finally:
        for u in reversed(undo):
            u()
    out = {k: 1000 * v / len(groups) for k, v in split.seconds.items()}
    out["group"] = sum(out.values())  # the whole group, stage by stage
    return out


def encoders_alone(cfg: Config, enc, batch: int, repeats: int) -> dict[str, float]:
    """Frames/s of CLIP and of the TimeSformer on their own, on random 224x224 uint8 frames already on the
    device (views: no resize), `batch` frames per call."""
    device, T = enc.device, enc.timesformer.sampling["clip_frames"]
    size = enc.clip.image_size
    frames = torch.randint(0, 255, (batch, *size, 3), dtype=torch.uint8, device=device)  # (N, h, w, 3)
    s = enc.timesformer.image_size
    clips = torch.randint(0, 255, (max(1, batch // T), T, s, s, 3), dtype=torch.uint8, device=device)  # (n, T, s, s, 3)
    out = {}
    for name, fn, n in (
        ("clip_fps", lambda: enc.clip.encode(frames, attention=False), batch),
        ("tsf_fps", lambda: enc.timesformer.encode(clips), clips.shape[0] * T),
    ):
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        out[name] = repeats * n / (time.perf_counter() - t0)
    # per sampled frame: CLIP on the frame, its foreground and its background; T frames of TimeSformer clips
    out["ceiling_fps"] = 1.0 / (3.0 / out["clip_fps"] + T / out["tsf_fps"])
    return out


class Utilisation:
    """The GPU's utilisation (%) sampled every `every` seconds in a thread, while the block runs."""

    def __init__(self, device: str, every: float = 0.1):
        self.device, self.every, self.samples = device, every, []
        self.stop = threading.Event()

    def _sample(self) -> float:
        """NVML through torch (needs pynvml), else `nvidia-smi`'s query of the same counter."""
        try:
            return float(torch.cuda.utilization(torch.device(self.device)))
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            import subprocess

            index = torch.device(self.device).index or 0
            out = subprocess.run(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            return float(out.stdout.strip().splitlines()[0])

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.samples.append(self._sample())
            except Exception:  # noqa: BLE001 - neither NVML nor nvidia-smi: no samples, reported as none
                return

    def __enter__(self):
        if self.device.startswith("cuda"):
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    @property
    def mean(self) -> str:
        return f"{np.mean(self.samples):.0f}" if self.samples else "none"


def compiled(enc, batch: int, backend: str, repeats: int) -> dict[str, float]:
    """Eager against `torch.compile` (fixed shapes) for CLIP's image tower and the TimeSformer: seconds per call
    and the largest absolute difference of the outputs."""
    device, T = enc.device, enc.timesformer.sampling["clip_frames"]
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, 3, *enc.clip.image_size, generator=g).to(device)  # (N, 3, h, w) normalised
    s = enc.timesformer.image_size
    clips = torch.randn(max(1, batch // T), T, 3, s, s, generator=g).to(device)  # (n, T, 3, s, s) normalised
    autocast = torch.autocast(device.split(":")[0], enabled=device.startswith("cuda"))

    def timed(fn, x) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), autocast:
            first = fn(x)  # warm-up (for the compiled one: the compile itself)
            first = first[0] if isinstance(first, tuple) else first  # the TimeSformer: (cls, tokens)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn(x)
            _sync(device)
        return (time.perf_counter() - t0) / repeats, first.float()

    # every eager timing before any compiled object exists (on a CPU, one slows eager oneDNN convolutions)
    models = (("clip", enc.clip.model.visual, pixels), ("tsf", enc.timesformer.model, clips))
    eager = {name: timed(module, x) for name, module, x in models}
    out = {}
    for name, module, x in models:
        seconds, y = timed(torch.compile(module, backend=backend, dynamic=False), x)
        out[f"{name}_eager_ms"] = 1000 * eager[name][0]
        out[f"{name}_compiled_ms"] = 1000 * seconds
        out[f"{name}_compiled_maxdiff"] = float((y - eager[name][1]).abs().max())
    return out


def stage2(cfg: Config, store: Path, runs: Path) -> dict[str, float]:
    """Steps/s of the baseline head: one seed at a time (3 runs) against the 3 seeds stacked."""
    from train.engine import train
    from train.stacked import train_stacked

    base = replace(cfg, train=replace(cfg.train, head="baseline", task="activity"))
    cfgs = [replace(base, train=replace(base.train, seed=s)) for s in range(3)]
    t0 = time.perf_counter()
    steps = sum(train(c, store=store, progress=False, run_dir=runs / f"one-{i}").steps for i, c in enumerate(cfgs))
    one = steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    stacked = train_stacked(cfgs, store, [runs / f"stacked-{i}" for i in range(3)])
    return {"steps_s_one": one, "steps_s_stacked": sum(r.steps for r in stacked) / (time.perf_counter() - t0)}


def kmeans(smoke: bool) -> dict[str, str]:
    """FAISS k-means on bench/dictionaries.py's job, on the GPU when faiss-gpu sees one."""
    import faiss

    from bench.dictionaries import blobs, run_faiss

    n, d, k = (2_000, 32, 16) if smoke else (100_000, 512, 512)
    x = blobs(n, d, k)
    init = x[np.random.default_rng(1).choice(n, size=k, replace=False)]
    gpu = faiss.get_num_gpus() > 0
    run_faiss(x, init, 1, gpu=gpu)  # warm-up
    return {"kmeans_s": f"{run_faiss(x, init, 20, gpu=gpu)[1]:.2f}", "kmeans_device": "gpu" if gpu else "cpu"}


def main(argv: list[str] | None = None) -> None:
    from extract.datasets import load_dataset
    from extract.devices import resolve_device
    from extract.dictionaries import build_dictionaries
    from extract.pipeline import _groups, build_encoders, group_bytes, resolve_decode_workers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU in seconds (tiny presets)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.videos, args.frames = 8, 4
    logging.basicConfig(level=logging.ERROR)
    cores = len(os.sched_getaffinity(0))
    t_start = time.perf_counter()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = world_config(tmp / "data", tmp / "cache", args.videos, args.frames, args.smoke)
        rows = render(cfg, tmp / "data", max(1, cores))
        index = load_dataset(cfg)
        device = resolve_device(cfg)
        enc = build_encoders(cfg, device)
        n = len(index.items)
        groups = _groups(np.arange(n), n, max(1, cfg.encoders.batch_frames // args.frames))
        auto = resolve_decode_workers(cfg, group_bytes(cfg, index.items, groups, enc))
        figures.update(device=device, gpu=torch.cuda.get_device_name() if device.startswith("cuda") else "none")
        figures.update(cores=cores, decode_workers=auto, render_s=f"{time.perf_counter() - t_start:.0f}")

        # Decoding alone, by worker count and by keyframe interval.
        counts = sorted({0, 1} if args.smoke else {1, 2, 4, 8, auto} - {0})
        decoded = None
        for w in counts:
            seconds, frames, got = decode_only(cfg, enc, index.items, groups, w)
            figures[f"decode_fps_w{w}"] = f"{frames / seconds:.0f}"
            decoded = got
        for gop, members in rows.items():
            sub = [np.asarray(members[i : i + len(groups[0])]) for i in range(0, len(members), len(groups[0]))]
            seconds, frames, _ = decode_only(cfg, enc, index.items, sub, max(counts))
            figures[f"decode_fps_gop{gop}"] = f"{frames / seconds:.0f}"

        # Encoding, stage by stage; writing.
        split = encode_split(cfg, enc, decoded)
        figures.update({f"enc_{k}_ms": f"{v:.1f}" for k, v in sorted(split.items())})
        from bench.extract import encode_only

        _, _, encoded = encode_only(cfg, enc, decoded)
        figures["write_ms_per_group"] = (
            f"{1000 * write_only(cfg, enc, index, decoded, encoded, tmp / 'w.zarr') / len(groups):.1f}"
        )
        del decoded, encoded

        # The encoders alone, and the pipeline's ceiling from them.
        alone = encoders_alone(cfg, enc, cfg.encoders.batch_frames, 2 if args.smoke else 10)
        figures.update({k: f"{v:.0f}" for k, v in alone.items()})

        # End to end, the GPU's utilisation sampled meanwhile.
        with Utilisation(device) as util:
            e2e_s, summary = end_to_end(cfg, index, tmp / "cache", "auto")
        e2e_fps = summary.frames / e2e_s
        figures.update(e2e_fps=f"{e2e_fps:.0f}", e2e_over_ceiling=f"{e2e_fps / alone['ceiling_fps']:.2f}")
        figures["gpu_util_mean"] = util.mean

        # Eager against compiled encoders.
        backend = "inductor" if device.startswith("cuda") else "eager"
        figures["compile_backend"] = backend
        comp = compiled(
            enc, min(cfg.encoders.batch_frames, 16 if args.smoke else 256), backend, 2 if args.smoke else 10
        )
        figures.update({k: (f"{v:.2e}" if k.endswith("maxdiff") else f"{v:.1f}") for k, v in comp.items()})

        # Stage 2 on this cache: dictionaries (k-means on the GPU with faiss-gpu), then steps/s.
        build_dictionaries(cfg, summary.store, progress=False)
        figures.update({k: f"{v:.1f}" for k, v in stage2(cfg, summary.store, tmp / "runs").items()})
        figures.update(kmeans(args.smoke))
    figures["total_s"] = f"{time.perf_counter() - t_start:.0f}"
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
