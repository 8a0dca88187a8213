"""Stage 1: decode every video, encode it with the frozen encoders, write it into the cache store.

Decoding runs in DataLoader worker processes and overlaps the encoders. Videos are encoded in
fixed groups of consecutive rows (`encoders.batch_frames // L` videos, never crossing a shard), so
a video's features never depend on which run encoded it: a resumed run recomputes whole groups
and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract import schema
from extract.config import Config, to_dict
from extract.datasets import DatasetIndex, VideoItem, load_dataset
from extract.store import contiguous_runs, create_store, open_for_writing, store_bytes, write_rows

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Fingerprint: everything that changes the numbers, nothing else
# ---------------------------------------------------------------------------------------------


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        return f"missing:{path}"  # the encoder builder reports it with the key to fix
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def resolve_device(cfg: Config) -> str:
    import torch

    if cfg.encoders.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.encoders.device


def fingerprint(cfg: Config, index: DatasetIndex, device: str) -> str:
    """Hash of the dataset index (ids, paths relative to dataset.root, splits, labels, regions),
    sampling, encoders, weights (file contents), saliency and effective precision.

    Training settings, worker counts and batch sizes are left out: they do not change the cache.
    """
    root = Path(cfg.dataset.root)
    items = []
    for it in index.items:
        rel = it.path.relative_to(root) if it.path.is_relative_to(root) else it.path
        items.append(
            [
                it.id,
                str(rel),
                it.split,
                {k: list(v) if isinstance(v, tuple) else v for k, v in it.labels.items()},
                it.region,
            ]
        )
    enc = cfg.encoders
    payload = {
        "schema": schema.SCHEMA_VERSION,
        "dataset": cfg.dataset.name,
        "items": items,
        "vocabularies": {t: list(v.names) for t, v in index.vocabularies.items()},
        "frames": {
            "num_frames": cfg.frames.num_frames,
            "sampling": cfg.frames.sampling,
            "min_frames": cfg.frames.min_frames,
        },
        "clip": {**to_dict(enc.clip), "weights": _file_digest(enc.clip.weights)},
        "timesformer": {**to_dict(enc.timesformer), "weights": _file_digest(enc.timesformer.weights)},
        "precision": enc.precision if device.startswith("cuda") else "fp32",
        "saliency": to_dict(cfg.saliency),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Decoding (worker processes)
# ---------------------------------------------------------------------------------------------


def _center_square(frames: np.ndarray, size: int) -> np.ndarray:
    """(L, H, W, 3) with short side `size` -> (L, size, size, 3) centre crop."""
    _, h, w, _ = frames.shape
    y, x = (h - size) // 2, (w - size) // 2
    return frames[:, y : y + size, x : x + size]


class _GroupDecoder:
    """Map-style dataset over groups of rows: item g = every video of group g, decoded."""

    def __init__(self, items: list[VideoItem], groups: list[np.ndarray], cfg: Config, size: int):
        self.items, self.groups, self.cfg, self.size = items, groups, cfg, size

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> dict[str, Any]:
        from extract.decode import VideoError, decode_frames, probe, sample_timestamps

        frames_cfg = self.cfg.frames
        out: dict[str, Any] = {"rows": self.groups[g], "videos": []}
        for row in self.groups[g]:
            item = self.items[row]
            try:
                info = probe(item.path)
                region = item.region if frames_cfg.sampling == "region" else None
                ts = sample_timestamps(info.duration, frames_cfg.num_frames, region)
                clip = decode_frames(
                    item.path, ts, size=self.size, min_frames=frames_cfg.min_frames, info=info, threads=1
                )
                out["videos"].append(
                    {
                        "row": int(row),
                        "frames": _center_square(clip.frames, self.size),  # (L, S, S, 3) uint8
                        "valid": clip.valid,  # (L,) bool
                        "pts": clip.pts.astype(np.float32),  # (L,) seconds
                        "fps": float(info.fps),
                    }
                )
            except VideoError as e:
                out["videos"].append({"row": int(row), "error": f"{e.kind}: {e}"})
            except Exception as e:  # noqa: BLE001 - one bad video must never stop the run
                out["videos"].append({"row": int(row), "error": f"unexpected: {type(e).__name__}: {e}"})
        return out


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding workers leave the cores to the encoders


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoders:
    clip: Any
    timesformer: Any
    device: str

    def provenance(self) -> dict[str, Any]:
        return {"clip": self.clip.provenance(), "timesformer": self.timesformer.provenance(), "device": self.device}


def build_encoders(cfg: Config, device: str) -> Encoders:
    from extract.encoders import build_encoder

    return Encoders(build_encoder("clip", cfg, device), build_encoder("timesformer", cfg, device), device)


def decode_size(enc: Encoders) -> int:
    """Side of the square frames handed to the encoders: the larger of their input sizes."""
    clip = enc.clip.image_size
    return max(max(clip) if isinstance(clip, tuple) else int(clip), int(enc.timesformer.image_size))


def map_size(cfg: Config, encoders: Encoders) -> int:
    """Side of the stored saliency map: configured, else CLIP's patch grid (14 for ViT-B/16 at 224)."""
    return cfg.saliency.map_size or (int(encoders.clip.grid[0]) if encoders.clip.grid else 14)


def encode_group(frames: np.ndarray, valid: np.ndarray, cfg: Config, enc: Encoders) -> dict[str, np.ndarray]:
    """Encode one group of videos.

    frames: (B, L, S, S, 3) uint8; valid: (B, L) bool. Returns the per-video schema arrays, each
    with leading axis B, features zeroed where the slot holds no frame.
    """
    import torch

    from extract.saliency import (
        clip_attention_saliency,
        foreground_background,
        saliency_to_uint8,
        spectral_residual_saliency,
    )

    B, L = frames.shape[:2]
    flat = torch.from_numpy(frames.reshape(B * L, *frames.shape[2:])).to(enc.device)  # (BL, S, S, 3)
    out = enc.clip.encode(flat)
    vp, attn = out["embedding"], out["attention"]  # (BL, Dc), (BL, h, w)
    m = map_size(cfg, enc)
    if cfg.saliency.method == "clip-attention":
        sal = clip_attention_saliency(attn)  # (BL, h, w) in [0, 1]
    else:
        sal = spectral_residual_saliency(flat, m)  # (BL, m, m) in [0, 1]
    fg, bg = foreground_background(flat, sal, cfg.saliency.mass, cfg.saliency.background_fill, enc.clip.image_size)
    # fg, bg: (BL, S_clip, S_clip, 3) uint8
    crops = enc.clip.encode_images(torch.cat([fg, bg]))  # (2BL, Dc)
    tsf = enc.timesformer.encode(torch.from_numpy(frames).to(enc.device))  # frame (B, L, Dv), cls (B, Dv)
    keep = torch.from_numpy(valid).to(enc.device).reshape(B, L, 1)

    def per_frame(x: torch.Tensor) -> np.ndarray:  # (BL, D) -> (B, L, D), zero where no frame
        return (x.reshape(B, L, -1).float() * keep).cpu().numpy()

    return {
        schema.CLIP_FRAME: per_frame(vp),
        schema.CLIP_FG: per_frame(crops[: B * L]),
        schema.CLIP_BG: per_frame(crops[B * L :]),
        schema.SALIENCY: saliency_to_uint8(sal, m).reshape(B, L, m, m).cpu().numpy(),
        schema.TSF_FRAME: (tsf["frame"].float() * keep).cpu().numpy(),
        schema.TSF_CLS: tsf["cls"].float().cpu().numpy(),
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtractSummary:
    store: Path
    total: int
    done: int = 0  # rows written by this run
    skipped: int = 0  # rows already done before this run
    failures: dict[str, str] = field(default_factory=dict)  # video id -> reason (this run)
    seconds: float = 0.0
    frames: int = 0
    store_bytes: int = 0
    raw_fp32_bytes: int = 0

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds else 0.0
        fps = self.frames / self.seconds if self.seconds else 0.0
        ratio = self.raw_fp32_bytes / self.store_bytes if self.store_bytes else 0.0
        out = [
            f"store: {self.store}",
            f"videos: {self.done} extracted, {self.skipped} already done, {len(self.failures)} failed "
            f"(of {self.total})",
            f"time: {self.seconds:.1f} s, {rate:.2f} videos/s, {fps:.1f} frames/s",
            f"size: {self.store_bytes / 2**20:.1f} MiB on disk vs {self.raw_fp32_bytes / 2**20:.1f} MiB as raw fp32 "
            f"({ratio:.1f}x smaller)",
        ]
        out += [f"failed: {vid}: {reason}" for vid, reason in sorted(self.failures.items())]
        return out


def _labels(index: DatasetIndex) -> dict[str, np.ndarray]:
    """labels/<task>: (N,) int32 class ids (-1 = none) or (N, C) bool multi-hot, vectorised per task."""
    out = {}
    for task, vocab in index.vocabularies.items():
        pos = {name: i for i, name in enumerate(vocab.names)}
        if vocab.multi_label:
            hot = np.zeros((len(index.items), len(vocab.names)), dtype=bool)
            pairs = [(r, pos[n]) for r, it in enumerate(index.items) for n in it.labels.get(task, ()) if n in pos]
            if pairs:
                rows, cols = np.asarray(pairs).T
                hot[rows, cols] = True
            out[f"{schema.LABELS}/{task}"] = hot
        else:
            out[f"{schema.LABELS}/{task}"] = np.asarray(
                [pos.get(it.labels.get(task), -1) for it in index.items], dtype=np.int32
            )
    return out


def _groups(todo_rows: np.ndarray, n: int, group: int) -> list[np.ndarray]:
    """Fixed groups of `group` consecutive rows, restarting at each shard (a group never crosses a
    shard, so one writer owns it); only the groups that hold a row still to do."""
    todo = np.zeros(n, dtype=bool)
    todo[todo_rows] = True
    out = []
    for shard_start in range(0, n, schema.SHARD_VIDEOS):
        shard_stop = min(shard_start + schema.SHARD_VIDEOS, n)
        for s in range(shard_start, shard_stop, group):
            rows = np.arange(s, min(s + group, shard_stop))
            if todo[rows].any():
                out.append(rows)
    return out


def extract(cfg: Config, progress: bool = True, index: DatasetIndex | None = None) -> ExtractSummary:
    """Run stage 1 for the configured dataset; resumes an interrupted run of the same fingerprint."""
    import torch
    from tqdm import tqdm

    t0 = time.perf_counter()
    index = index or load_dataset(cfg)
    if not index.items:
        raise schema.CacheError(f"dataset {cfg.dataset.name!r} at {cfg.dataset.root} has no videos to extract")
    device = resolve_device(cfg)
    fp = fingerprint(cfg, index, device)
    path = schema.store_path(cfg.cache.root, cfg.dataset.name, fp)
    enc = build_encoders(cfg, device)
    n, L = len(index.items), cfg.frames.num_frames
    sizes = schema.Sizes(n, L, enc.clip.dim, enc.timesformer.dim, map_size(cfg, enc))
    tasks = {t: (len(v.names), v.multi_label) for t, v in index.vocabularies.items()}
    specs = schema.array_specs(sizes, tasks)

    group = open_for_writing(path, fp)
    if group is None:
        attrs = {
            "fingerprint": fp,
            "dataset": cfg.dataset.name,
            "video_ids": [it.id for it in index.items],
            "video_paths": [str(it.path) for it in index.items],
            "decode_size": decode_size(enc),
            "splits": [it.split for it in index.items],
            "vocabularies": {
                t: {
                    "names": list(v.names),
                    "multi_label": v.multi_label,
                    "prompts": [v.prompt_name(i) for i in range(len(v.names))],
                }
                for t, v in index.vocabularies.items()
            },
            "provenance": enc.provenance(),
            "config": to_dict(cfg),
            "failures": {},
        }
        group = create_store(path, specs, attrs)
        for name, value in _labels(index).items():
            group[name][:] = value
        for task, vocab in index.vocabularies.items():
            prompts = [vocab.prompt_name(i) for i in range(len(vocab.names))]
            text = enc.clip.encode_text(prompts, cfg.encoders.clip.prompts)  # T0: (C, Dc)
            group[f"{schema.TEXT}/{task}"][:] = text.float().cpu().numpy()
        log.info("created %s", path)
    else:
        log.info("resuming %s", path)

    done = np.asarray(group[schema.DONE][:])
    todo = np.flatnonzero(~done)
    summary = ExtractSummary(path, total=n, skipped=int(done.sum()))
    per_group = max(1, cfg.encoders.batch_frames // L)
    groups = _groups(todo, n, per_group)
    previous_failures = dict(group.attrs.get("failures", {}))
    size = decode_size(enc)
    decoder = _GroupDecoder(index.items, groups, cfg, size)
    workers = cfg.frames.decode_workers
    loader = torch.utils.data.DataLoader(
        decoder,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(todo), unit="video", disable=not progress, desc="extract")
    try:
        for batch in loader:
            ok = [v for v in batch["videos"] if "error" not in v]
            for v in batch["videos"]:
                if "error" in v:
                    summary.failures[index.items[v["row"]].id] = v["error"]
            if ok:
                frames = np.stack([v["frames"] for v in ok])  # (B, L, S, S, 3)
                valid = np.stack([v["valid"] for v in ok])  # (B, L)
                arrays = encode_group(frames, valid, cfg, enc)
                finite = np.ones(len(ok), dtype=bool)
                for name in (schema.CLIP_FRAME, schema.CLIP_FG, schema.CLIP_BG, schema.TSF_FRAME, schema.TSF_CLS):
                    finite &= np.isfinite(arrays[name].reshape(len(ok), -1)).all(1)
                arrays[schema.FRAME_MASK] = valid
                arrays[schema.TIMESTAMPS] = np.stack([v["pts"] for v in ok])
                arrays[schema.FPS] = np.asarray([v["fps"] for v in ok], dtype=np.float32)
                rows = np.asarray([v["row"] for v in ok])
                for b in np.flatnonzero(~finite):
                    summary.failures[index.items[rows[b]].id] = "non-finite: the encoders produced NaN or inf"
                write = finite & ~done[rows]  # rows done by an earlier run are never rewritten
                for start, stop in contiguous_runs(rows[write]):  # one slice write per run of rows
                    a = int(np.searchsorted(rows, start))
                    write_rows(group, start, {k: v[a : a + stop - start] for k, v in arrays.items()})
                summary.done += int(write.sum())
                summary.frames += int(valid[write].sum())
            bar.update(len(batch["rows"]) - int(done[batch["rows"]].sum()))
            bar.set_postfix(frames_s=f"{summary.frames / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        bar.close()
        done_now = np.asarray(group[schema.DONE][:])
        row_of = {it.id: r for r, it in enumerate(index.items)}
        failures = {vid: r for vid, r in previous_failures.items() if vid in row_of and not done_now[row_of[vid]]}
        failures.update(summary.failures)
        group.attrs["failures"] = failures
    summary.seconds = time.perf_counter() - t0
    summary.store_bytes = store_bytes(path)
    summary.raw_fp32_bytes = sum(4 * int(np.prod(s.shape)) for s in specs)
    return summary
