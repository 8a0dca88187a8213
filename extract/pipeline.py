"""Stage 1: decode every video, encode it with the frozen encoders, write it into the cache store.

Decoding runs in DataLoader worker processes and overlaps the encoders. Videos are encoded in
fixed groups of consecutive rows (`encoders.batch_frames // L` videos, restarting at every shard of
the store, whose shard size is fixed at creation), so a video's features never depend on which run
or which cluster worker encoded it: a resumed run recomputes whole groups and ends with the same
bytes as an uninterrupted one. `extract_groups` is the one writer loop: the single-process run
hands it every shard, a dask worker one shard (extract/scale.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.config import Config, ConfigError, to_dict
from extract.contract.schema import CacheError
from extract.contract.store import contiguous_runs, create_store, open_for_writing, sha256_of, store_bytes, write_rows
from extract.datasets import DatasetIndex, VideoItem, annotated_segments, load_dataset, segment_mask
from extract.devices import resolve_device, usable_cores

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Fingerprint: everything that changes the numbers, nothing else
# ---------------------------------------------------------------------------------------------


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    if not Path(path).exists():
        return f"missing:{path}"  # the encoder builder reports it with the key to fix
    return sha256_of(Path(path))


VLM_WEIGHTS = "vlm"  # encoders.clip.weights: vlm = the checkpoint `ltar pretrain-vlm` writes for this config
# encoders.timesformer.weights: video = the official-layout checkpoint `ltar pretrain-video` writes for this config
VIDEO_WEIGHTS = "video"


def resolve_weights(cfg: Config) -> Config:
    """Replace `encoders.clip.weights: vlm` by the path of the tiny CLIP trained on the synthetic world, and
    `encoders.timesformer.weights: video` by the tiny TimeSformer's; each then loads through the same
    local-checkpoint path as any other weights file."""
    from dataclasses import replace

    if cfg.encoders.clip.weights == VLM_WEIGHTS:
        from extract.vlm import vlm_checkpoint

        path = vlm_checkpoint(cfg)
        if not path.exists():
            raise CacheError(
                f"encoders.clip.weights is 'vlm' but {path} does not exist; run `ltar pretrain-vlm` "
                "(or `make demo`) first, or set encoders.clip.weights to a checkpoint or null"
            )
        cfg = replace(cfg, encoders=replace(cfg.encoders, clip=replace(cfg.encoders.clip, weights=str(path))))
    if cfg.encoders.timesformer.weights == VIDEO_WEIGHTS:
        from extract.video_pretrain import video_checkpoint

        path = video_checkpoint(cfg)
        if not path.exists():
            raise CacheError(
                f"encoders.timesformer.weights is 'video' but {path} does not exist; run `ltar pretrain-video` "
                "(or `make demo`) first, or set encoders.timesformer.weights to a checkpoint or null"
            )
        tsf = replace(cfg.encoders.timesformer, weights=str(path))
        cfg = replace(cfg, encoders=replace(cfg.encoders, timesformer=tsf))
    return cfg


def file_stamp(path: Path) -> list[int] | None:
    """[size in bytes, modification time in ns] of a video file (how make judges a file), None when absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def stale_rows(group: Any, index: DatasetIndex) -> np.ndarray:
    """Rows written from a file that has changed since (its size or modification time differ from the
    store's `file_stamps`), as row indices. A file absent now keeps its row: the features stay valid for
    the file they came from, and a user may delete videos once they are cached."""
    recorded = dict(group.attrs.get("file_stamps", {}))
    rows = [
        r
        for r, it in enumerate(index.items)
        if it.id in recorded and (now := file_stamp(it.path)) is not None and now != recorded[it.id]
    ]
    return np.asarray(rows, dtype=np.int64)


def upgrade_store(group: Any, index: DatasetIndex) -> None:
    """A store of cache schema version 1 made version 2 in place: `segment_mask` of every finished row from its
    timestamps and the dataset's annotated segments, `annotated_segments` and `same_set_pairs` (what stage 2 read
    from the dataset before). No feature is recomputed; `schema_version` is written last, so an interrupted
    upgrade is redone."""
    from extract.contract.store import create_array

    ids = list(group.attrs["video_ids"])
    if ids != [it.id for it in index.items]:
        raise schema.CacheError(f"{group.store}: its videos are not the dataset's now; it cannot be upgraded")
    n, num_frames = group[schema.FRAME_MASK].shape
    if schema.SEGMENT_MASK not in group:
        spec = schema.ArraySpec(schema.SEGMENT_MASK, (n, num_frames), ("video", "frame"), "bool")
        create_array(group, spec, schema.store_shard_videos(group))
    done = np.asarray(group[schema.DONE][:])  # (N,)
    valid = np.asarray(group[schema.FRAME_MASK][:])  # (N, L)
    inside = segment_mask(index.items, np.asarray(group[schema.TIMESTAMPS][:]))  # (N, L)
    group[schema.SEGMENT_MASK][:] = inside & valid & done[:, None]
    group.attrs["annotated_segments"] = annotated_segments(index)
    group.attrs["same_set_pairs"] = [list(p) for p in index.same_set_pairs]
    old = group.attrs["schema_version"]
    group.attrs["schema_version"] = schema.SCHEMA_VERSION
    log.warning(
        "%s: upgraded in place from cache schema version %s to %s (segment_mask, annotated_segments, "
        "same_set_pairs); no feature was recomputed",
        group.store,
        old,
        schema.SCHEMA_VERSION,
    )


def record_file_stamps(group: Any, index: DatasetIndex) -> None:
    """Write the `file_stamps` attribute {video_id: [size, mtime_ns]} of every row done, and `file_paths`
    {video_id: absolute path} (stage 2 checks the stamps through the contract, extract/contract/locate.py), once
    per run."""
    done = np.asarray(group[schema.DONE][:])  # (N,)
    stamps = {it.id: file_stamp(it.path) for r, it in enumerate(index.items) if done[r]}
    stamps = {vid: st for vid, st in stamps.items() if st is not None}
    group.attrs["file_stamps"] = stamps
    group.attrs["file_paths"] = {it.id: str(Path(it.path).absolute()) for it in index.items if it.id in stamps}


def fingerprint(cfg: Config, index: DatasetIndex, device: str) -> str:
    """Hash of the dataset index (ids, paths relative to dataset.root, splits, labels, regions, the
    adapter's source such as the synthetic world hash), sampling, encoders, weights (file contents),
    saliency and effective precision.

    What each video file holds is checked per row instead (`file_stamp`, `stale_rows`): a changed file
    re-extracts its own row, not the whole store, and a missing file restored later fills its row.

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
        "schema": schema.FEATURES_VERSION,  # not SCHEMA_VERSION: an upgraded store keeps its name
        "dataset": cfg.dataset.name,
        "items": items,
        "source": index.source,
        # class names and the prompts their text embeddings are made from
        "vocabularies": {
            t: [list(v.names), [v.prompt_name(i) for i in range(len(v.names))]] for t, v in index.vocabularies.items()
        },
        "frames": {
            "num_frames": cfg.frames.num_frames,
            "sampling": cfg.frames.sampling,
            "min_frames": cfg.frames.min_frames,
            "max_short_side": cfg.frames.max_short_side,
            "pixel_aspect": cfg.frames.pixel_aspect,
        },
        "clip": {**to_dict(enc.clip), "weights": _file_digest(enc.clip.weights)},
        "timesformer": {**to_dict(enc.timesformer), "weights": _file_digest(enc.timesformer.weights)},
        "precision": enc.precision if device.startswith("cuda") else "fp32",
        **({"compile": True} if enc.compile else {}),  # absent when off: stores from before the option keep their name
        "saliency": to_dict(cfg.saliency),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Decoding (worker processes)
# ---------------------------------------------------------------------------------------------


class _GroupDecoder:
    """Map-style dataset over groups of rows: item g = every video of group g, decoded.

    Each video's frames come at their native size in RGB (or short side `cap` when larger), once per distinct
    frame: `frames` (U, H, W, 3) uint8, `clip_index` (L,) the frame of each of CLIP's L slots, `tsf_index` (C, T)
    the frames of the TimeSformer's C clips of T frames (`sampling`: the encoder's clip setting, None = spread),
    `motion_index` (L, 2) the frames one native frame before and after each slot's (`saliency.method: motion`, else
    None)."""

    def __init__(
        self, items: list[VideoItem], groups: list[np.ndarray], cfg: Config, cap: int | None, sampling: dict | None
    ):
        self.items, self.groups, self.cfg, self.cap, self.sampling = items, groups, cfg, cap, sampling

    def __len__(self) -> int:
        return len(self.groups)

    def decode_video(self, item: VideoItem) -> dict[str, Any]:
        from extract.decode import clip_timestamps, decode_frames, probe, sample_timestamps

        frames_cfg = self.cfg.frames
        info = probe(item.path)
        region = item.region if frames_cfg.sampling == "region" else None
        ts = sample_timestamps(info.duration, frames_cfg.num_frames, region)  # (L,) CLIP's frames
        L = len(ts)
        if self.sampling is not None:  # one clip per frame, frame clip_frames // 2 of each on ts
            s = self.sampling
            clips = clip_timestamps(ts, info.duration, info.fps, s["clip_frames"], s["sampling_rate"], s["target_fps"])
        else:  # the L frames are one clip
            clips = ts[None]  # (1, L)
        parts = [ts, clips.ravel()]
        if self.cfg.saliency.method == "motion":  # the neighbours of each frame (native frame rate), clamped
            step = 1.0 / info.fps if info.fps > 0 else 0.0
            parts.append(np.clip(np.stack([ts - step, ts + step], 1), 0.0, info.duration).ravel())  # (L*2,)
        wanted = np.concatenate(parts)  # (L + C*T [+ 2L],)
        size = self.cap if self.cap is not None and min(info.height, info.width) > self.cap else None
        clip = decode_frames(
            item.path,
            wanted,
            size=size,
            min_frames=frames_cfg.min_frames,
            info=info,
            threads=1,
            pixel_aspect=frames_cfg.pixel_aspect == "apply",
        )
        key = np.where(clip.valid, clip.pts, -1.0)  # (L + C*T [+ 2L],) one key per distinct frame shown
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        n_tsf = L + clips.size
        return {
            "frames": clip.frames[first],  # (U, H, W, 3) uint8, each distinct frame once
            "clip_index": inverse[:L],  # (L,)
            "tsf_index": inverse[L:n_tsf].reshape(clips.shape),  # (C, T)
            "motion_index": inverse[n_tsf:].reshape(L, 2) if len(parts) == 3 else None,  # (L, 2) before, after
            "valid": clip.valid[:L],  # (L,) bool
            "pts": clip.pts[:L].astype(np.float32),  # (L,) seconds
            "fps": float(info.fps),
        }

    def __getitem__(self, g: int) -> dict[str, Any]:
        from extract.decode import VideoError

        out: dict[str, Any] = {"rows": self.groups[g], "videos": []}
        for row in self.groups[g]:
            try:
                out["videos"].append({"row": int(row), **self.decode_video(self.items[row])})
            except VideoError as e:
                out["videos"].append({"row": int(row), "error": f"{e.kind}: {e}"})
            except Exception as e:  # noqa: BLE001 - one bad video must never stop the run
                out["videos"].append({"row": int(row), "error": f"unexpected: {type(e).__name__}: {e}"})
        return out


SHM = Path("/dev/shm")  # where decoding processes hand their frames to the encoders (torch's shared memory)


def group_bytes(cfg: Config, items: Any, groups: list[np.ndarray], enc: Encoders) -> int:
    """Bytes of one group's decoded frames, the most a decoding process holds in shared memory at once: videos per
    group x distinct frames per video (CLIP's L, the TimeSformer's clip frames, motion's two neighbours each, at
    most the video's own frames) x the frame at its decoded size (`frames.max_short_side`), sized on the group's
    first video that probes."""
    from extract.decode import probe

    L = cfg.frames.num_frames
    s = enc.timesformer.sampling
    per_slot = 1 + (s["clip_frames"] if s else 0) + (2 if cfg.saliency.method == "motion" else 0)
    cap = decode_cap(cfg, enc)
    first = groups[0] if groups else np.zeros(0, dtype=int)
    for row in first:
        try:
            info = probe(items[int(row)].path)
        except Exception:  # noqa: BLE001 - a video that does not open is reported by the decoder
            continue
        h, w = info.height, info.width
        if cap is not None and min(h, w) > cap:
            h, w = (cap, round(w * cap / h)) if h <= w else (round(h * cap / w), cap)
        frames = min(L * per_slot, max(info.num_frames, 1))
        return len(first) * frames * h * w * 3
    return 0


def resolve_decode_workers(cfg: Config, per_group: int, cores: int | None = None) -> int:
    """`frames.decode_workers` as a number: `auto` = the cores (`cores`, else this process's) less one for the
    encoders and the writer, then as many as the shared memory holds (each process keeps one group of `per_group`
    bytes there, and the main process the one it encodes). A number is taken as given, but refused with a sentence
    when shared memory cannot hold its groups: the run would die mid-way with a bus error."""
    import shutil

    asked = cfg.frames.decode_workers
    if cores is None:
        cores = usable_cores()
    workers = max(cores - 1, 0) if asked == "auto" else int(asked)
    if workers == 0 or per_group <= 0 or not SHM.is_dir():
        return workers
    free = shutil.disk_usage(SHM).free
    fits = free // per_group - 1  # groups held by the decoding processes beside the one being encoded
    if workers <= fits:
        return workers
    need = (workers + 1) * per_group
    advice = (
        f"{SHM} has {free / 2**30:.2f} GiB free; {workers} decoding process(es) with groups of "
        f"{per_group / 2**30:.2f} GiB of frames need {need / 2**30:.2f} GiB"
    )
    fix = (
        "give the machine more shared memory (docker run --shm-size=...; a tmpfs remount), or lower "
        "encoders.batch_frames (smaller groups) or frames.max_short_side"
    )
    fits = max(int(fits), 0)
    if asked != "auto":
        raise ConfigError(f"frames.decode_workers={asked}: {advice}. Set frames.decode_workers: {fits} or {fix}.")
    log.warning("frames.decode_workers=auto: %s; decoding in %d process(es). To use more, %s.", advice, fits, fix)
    return fits


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
    """The larger of the encoders' input sides: no frame is decoded smaller than this."""
    clip = enc.clip.image_size
    return max(max(clip) if isinstance(clip, tuple) else int(clip), int(enc.timesformer.image_size))


def decode_cap(cfg: Config, enc: Encoders) -> int | None:
    """Short side above which a video is resized (in RGB) before the encoders: `frames.max_short_side`, never
    below an encoder's input side; None = always native."""
    cap = cfg.frames.max_short_side
    return None if cap is None else max(int(cap), decode_size(enc))


def map_size(cfg: Config, encoders: Encoders) -> int:
    """Side of the stored saliency map: configured, else CLIP's patch grid (14 for ViT-B/16 at 224)."""
    return cfg.saliency.map_size or (int(encoders.clip.grid[0]) if encoders.clip.grid else 14)


def _same_size(images: list[np.ndarray]) -> list[np.ndarray]:
    """Indices of the arrays (..., H, W, 3) grouped by (H, W): one batched resize per native size in a group
    (one group in a dataset of one size)."""
    shapes = [a.shape[-3:-1] for a in images]
    return [np.flatnonzero([sh == shape for sh in shapes]) for shape in dict.fromkeys(shapes)]


def _chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n): every encoder call is bounded by
    `encoders.batch_frames` sampled frames (the crops call holds their foreground and background images), so memory
    does not grow with L; a group of L <= batch_frames is one chunk, as before."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def _upload(frames: list[Any], device: str) -> tuple[Any, np.ndarray]:
    """The distinct frames of n videos of one native size on the device, in one tensor: (ΣU, H, W, 3) uint8, and
    each video's offset into it (n,). Each video's frames go up once (from pinned memory, `non_blocking`, when the
    loader pinned them on a CUDA run); every encoder then reads its frames from this tensor."""
    import torch

    parts = [torch.as_tensor(f).to(device, non_blocking=True) for f in frames]  # n x (U_b, H, W, 3)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])  # (n,)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), offsets


def _gathered(videos: list[dict[str, Any]], idx: np.ndarray, offsets: np.ndarray, key: str, device: str) -> Any:
    """videos[b][key] (index arrays into b's distinct frames) for b in idx, shifted by b's offset and stacked on
    the device: (n * rows, ...) int64."""
    import torch

    stacked = np.concatenate([o + np.asarray(videos[b][key]) for b, o in zip(idx, offsets, strict=True)])
    return torch.from_numpy(stacked.astype(np.int64)).to(device)


def encode_on_device(videos: list[dict[str, Any]], cfg: Config, enc: Encoders) -> dict[str, Any]:
    """Encode one group of decoded videos (`_GroupDecoder.decode_video` dicts; native sizes may differ).

    CLIP sees each of the L frames as its own preprocessing makes it (`view`: resize and crop of the native frame);
    the saliency map lies over that view, the foreground box is cut from the native frame (`saliency.crop`) and the
    background is the view with the box filled. The TimeSformer sees its clips (`encoders.timesformer.sampling`):
    V_l is the patch mean of frame l in its clip, v_cls the clips' CLS averaged over the valid frames.

    Each video's distinct frames go to the device once (`_upload`); everything after works in chunks of
    `encoders.batch_frames` sampled frames (views, CLIP, saliency, crops and their CLIP pass together; the
    TimeSformer's clips), so memory beyond the decoded frames does not grow with L. Returns the per-video schema
    arrays on the device, each with leading axis B, features zeroed where the slot holds no frame
    (`to_host` starts bringing them back; `encode_group` waits for them).
    """
    import torch

    from extract.saliency import (
        clip_attention_saliency,
        clip_surgery_saliency,
        foreground_background,
        motion_saliency,
        saliency_to_uint8,
        spectral_residual_saliency,
    )

    B, L = len(videos), len(videos[0]["valid"])
    C, T = np.asarray(videos[0]["tsf_index"]).shape
    dev, clip, tsf = enc.device, enc.clip, enc.timesformer
    chunk, method, m = cfg.encoders.batch_frames, cfg.saliency.method, map_size(cfg, enc)
    keep = torch.from_numpy(np.stack([np.asarray(v["valid"]) for v in videos])).to(dev).reshape(B * L, 1)  # (BL, 1)
    emb = torch.empty(3, B * L, clip.dim, device=dev)  # (3, BL, Dc): the frame, its foreground, its background
    sal_u8 = torch.empty(B * L, m, m, dtype=torch.uint8, device=dev)  # (BL, m, m)
    frame_tok = torch.empty(B * C, T, tsf.dim, device=dev)  # (BC, T, Dv)
    cls = torch.empty(B * C, tsf.dim, device=dev)  # (BC, Dv)

    for idx in _same_size([v["frames"] for v in videos]):  # videos of one native size (all of them, mostly)
        frames, offsets = _upload([videos[b]["frames"] for b in idx], dev)  # (ΣU, H, W, 3) uint8
        region = clip.view_box(*frames.shape[1:3])
        slot = _gathered(videos, idx, offsets, "clip_index", dev)  # (n*L,) each slot's frame
        rows = torch.from_numpy((idx[:, None] * L + np.arange(L)).ravel()).to(dev)  # (n*L,) rows of the group
        near = _gathered(videos, idx, offsets, "motion_index", dev) if method == "motion" else None  # (n*L, 2)
        for c in _chunks(len(slot), chunk):
            x = frames[slot[c]]  # (c, H, W, 3) native
            view = clip.view(x)  # (c, h, w, 3)
            out = clip.encode(view, attention=method == "clip-attention", surgery=method == "clip-surgery")
            if method == "clip-attention":
                sal = clip_attention_saliency(out["attention"])  # (c, gh, gw) in [0, 1]
            elif method == "clip-surgery":
                sal = clip_surgery_saliency(out["surgery"])  # (c, gh, gw) in [0, 1]
            elif method == "motion":
                sal = motion_saliency(clip.view(frames[near[c, 0]]), clip.view(frames[near[c, 1]]), m)  # (c, m, m)
            else:
                sal = spectral_residual_saliency(view, m)  # (c, m, m) in [0, 1]
            fg, bg = foreground_background(  # foreground cut from the native frame, background from the view
                x,
                sal,
                cfg.saliency.mass,
                cfg.saliency.background_fill,
                clip.image_size,
                region=region,
                crop=cfg.saliency.crop,
                view=view,
                pad_value=clip.fill_color,
            )
            crops = clip.encode_images(torch.cat([fg, bg]))  # (2c, Dc)
            r = rows[c]
            emb[0, r], emb[1, r], emb[2, r] = out["embedding"], crops[: len(x)], crops[len(x) :]
            sal_u8[r] = saliency_to_uint8(sal, m)

        # TimeSformer: the videos' clips, batch_frames // T clips per call.
        clips = _gathered(videos, idx, offsets, "tsf_index", dev)  # (n*C, T) frames of each clip
        clip_rows = torch.from_numpy((idx[:, None] * C + np.arange(C)).ravel()).to(dev)  # (n*C,)
        for c in _chunks(len(clips), max(1, chunk // T)):
            p = tsf.encode(frames[clips[c]])  # (c, T, H, W, 3) -> frame (c, T, Dv), cls (c, Dv)
            frame_tok[clip_rows[c]], cls[clip_rows[c]] = p["frame"], p["cls"]

    frame_tok, cls = frame_tok.reshape(B, C, T, -1), cls.reshape(B, C, -1)
    if tsf.sampling is not None:  # clips: slot l is frame T // 2 of clip l
        v_frame = frame_tok[:, :, T // 2]  # (B, L, Dv)
        w = keep.reshape(B, L, 1).float()  # (B, L, 1)
        v_cls = (cls * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, Dv): the clips' CLS averaged over real frames
    else:  # spread: slot l is frame l of the one clip
        v_frame, v_cls = frame_tok[:, 0], cls[:, 0]  # (B, L, Dv), (B, Dv)
    emb = emb * keep  # zero where the slot holds no frame
    return {
        schema.CLIP_FRAME: emb[0].reshape(B, L, -1),
        schema.CLIP_FG: emb[1].reshape(B, L, -1),
        schema.CLIP_BG: emb[2].reshape(B, L, -1),
        schema.SALIENCY: sal_u8.reshape(B, L, m, m),
        schema.TSF_FRAME: v_frame.float() * keep.reshape(B, L, 1),
        schema.TSF_CLS: v_cls.float(),
    }


def encode_group(videos: list[dict[str, Any]], cfg: Config, enc: Encoders) -> dict[str, np.ndarray]:
    """`encode_on_device`, its arrays brought to the host as numpy."""
    return host_arrays(to_host(encode_on_device(videos, cfg, enc)))


def to_host(arrays: dict[str, Any]) -> dict[str, Any]:
    """Start copying `encode_on_device`'s device arrays to the host: on CUDA into pinned memory without blocking (the
    writer waits for `ready`); the values become numpy with `host_arrays`."""
    import torch

    if not any(a.is_cuda for a in arrays.values()):
        return {"arrays": arrays, "ready": None}
    out = {k: a.to("cpu", non_blocking=True) for k, a in arrays.items()}
    ready = torch.cuda.Event()
    ready.record()
    return {"arrays": out, "ready": ready}


def host_arrays(pending: dict[str, Any]) -> dict[str, np.ndarray]:
    """Wait for a `to_host` copy; the arrays as numpy."""
    if pending["ready"] is not None:
        pending["ready"].synchronize()
    return {k: a.numpy() for k, a in pending["arrays"].items()}


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
    short: dict[str, int] = field(default_factory=dict)  # video id -> distinct frames, fewer than its real slots

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
            + (
                f"({ratio:.1f}x smaller)"
                if ratio >= 1
                else f"({1 / ratio:.1f}x larger: chunk overhead)"
                if ratio
                else ""
            ),
        ]
        if self.short:
            shown = ", ".join(f"{vid} ({n})" for vid, n in sorted(self.short.items())[:10])
            more = ", ..." if len(self.short) > 10 else ""
            out.append(
                f"short: {len(self.short)} video(s) hold fewer distinct frames than their frame slots, so frames "
                f"repeat (equal timestamps; distinct frames in brackets): {shown}{more}; lower frames.num_frames to "
                "avoid it"
            )
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


def _shard_groups(start: int, stop: int, group: int) -> list[np.ndarray]:
    """The fixed groups of one shard [start, stop): `group` consecutive rows each, restarting at `start`."""
    return [np.arange(s, min(s + group, stop)) for s in range(start, stop, group)]


def _groups(todo_rows: np.ndarray, n: int, group: int, shard: int = schema.SHARD_VIDEOS) -> list[np.ndarray]:
    """Fixed groups of `group` consecutive rows, restarting at each shard of `shard` rows (a group never
    crosses a shard, so one writer owns it); only the groups that hold a row still to do."""
    todo = np.zeros(n, dtype=bool)
    todo[todo_rows] = True
    out = []
    for shard_start in range(0, n, shard):
        out += [rows for rows in _shard_groups(shard_start, min(shard_start + shard, n), group) if todo[rows].any()]
    return out


def store_specs(cfg: Config, index: DatasetIndex, enc: Encoders) -> list[schema.ArraySpec]:
    """Every array of the store this configuration, dataset and encoders make."""
    sizes = schema.Sizes(len(index.items), cfg.frames.num_frames, enc.clip.dim, enc.timesformer.dim, map_size(cfg, enc))
    tasks = {t: (len(v.names), v.multi_label) for t, v in index.vocabularies.items()}
    return schema.array_specs(sizes, tasks)


def raw_fp32_bytes(specs: list[schema.ArraySpec]) -> int:
    """What the numeric arrays would take as raw fp32: the summary's size reference."""
    return sum(4 * int(np.prod(s.shape)) for s in specs if s.dtype != schema.STRING)


def write_video_coordinates(group: Any, index: DatasetIndex) -> None:
    """The `video` coordinate arrays (schema.VIDEO_COORDS); created first when an older store lacks them."""
    from extract.contract.store import create_array

    ids = np.asarray([it.id for it in index.items], dtype=np.dtypes.StringDType())  # (N,)
    for name in schema.VIDEO_COORDS:
        if name not in group:
            create_array(group, schema.ArraySpec(name, ids.shape, (schema.VIDEO,), schema.STRING, per_video=False))
        group[name][:] = ids


def store_attrs(cfg: Config, index: DatasetIndex, fp: str, provenance: dict, decode_size: int) -> dict[str, Any]:
    """The root attributes every store starts with (extracted or imported): what the rows are."""
    return {
        "fingerprint": fp,
        "dataset": cfg.dataset.name,
        "video_ids": [it.id for it in index.items],
        "video_paths": [str(it.path) for it in index.items],
        "decode_size": decode_size,
        "splits": [it.split for it in index.items],
        "vocabularies": {
            t: {
                "names": list(v.names),
                "multi_label": v.multi_label,
                "prompts": [v.prompt_name(i) for i in range(len(v.names))],
            }
            for t, v in index.vocabularies.items()
        },
        "provenance": provenance,
        "config": to_dict(cfg),
        "shard_videos": cfg.cache.shard_videos,
        "failures": {},
        "annotated_segments": annotated_segments(index),
        "same_set_pairs": [list(p) for p in index.same_set_pairs],
    }


def create_cache(cfg: Config, index: DatasetIndex, enc: Encoders, path: Path, fp: str) -> Any:
    """Create the store with its attributes, labels, text embeddings and video ids; rows stay to do.

    Runs where the encoders are: the single process, or one cluster worker (extract/scale.py)."""
    attrs = store_attrs(cfg, index, fp, provenance=enc.provenance(), decode_size=decode_cap(cfg, enc) or 0)
    group = create_store(path, store_specs(cfg, index, enc), attrs, cfg.cache.shard_videos)
    for name, value in _labels(index).items():
        group[name][:] = value
    for task, vocab in index.vocabularies.items():
        prompts = [vocab.prompt_name(i) for i in range(len(vocab.names))]
        text = enc.clip.encode_text(prompts, cfg.encoders.clip.prompts)  # T0: (C, Dc)
        group[f"{schema.TEXT}/{task}"][:] = text.float().cpu().numpy()
    write_video_coordinates(group, index)
    log.info("created %s", path)
    return group


def resume_store(group: Any, cfg: Config, index: DatasetIndex, path: Path) -> int:
    """An existing store about to be resumed: its shard size (which decides its groups), ids written, and
    the rows of changed video files marked to do again."""
    shard = schema.store_shard_videos(group)
    configured = min(cfg.cache.shard_videos, len(index.items))
    if shard != configured:
        log.warning(
            "%s keeps its shard size of %d videos (cache.shard_videos=%d applies to new stores only)",
            path,
            shard,
            cfg.cache.shard_videos,
        )
    if any(name not in group for name in schema.VIDEO_COORDS):
        write_video_coordinates(group, index)  # a store written before the coordinate existed
    stale = stale_rows(group, index)
    if stale.size:
        names = ", ".join(index.items[r].id for r in stale[:5]) + (" ..." if stale.size > 5 else "")
        log.warning("%d video file(s) changed since they were extracted (%s): extracting them again", stale.size, names)
        group[schema.DONE][stale] = False  # rows are rewritten only when not done
    log.info("resuming %s", path)
    return shard


@dataclass
class RowsResult:
    """What one writer did so far: rows written, real frames in them, failures {video_id: reason}."""

    done: int = 0
    frames: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)  # video id -> distinct frames, fewer than its real slots


class _Writer:
    """The writer thread of `extract_groups`: checks and writes each encoded group in order, while the main thread
    encodes the next (and, on CUDA, while the device-to-host copies land).

    At most `depth` groups wait (their arrays held in memory); `put` blocks beyond that. The first error in the
    thread (a full disk, a lost lock) stops the writes and is raised in the main thread at its next `put` or at
    `close`. Groups already handed over are written before `close` returns, even when the main thread stops on
    an error or an interrupt: they are finished work."""

    def __init__(self, write: Callable[..., int], depth: int = 2):
        import queue
        import threading

        self.write, self.error = write, None
        self.jobs: queue.Queue = queue.Queue(depth)
        self.landed: queue.Queue = queue.Queue()  # rows each written group finished, for the caller's progress
        self.thread = threading.Thread(target=self._run, name="ltar-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.landed.put(self.write(*job))
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def put(self, *job: Any) -> None:
        self.raise_error()
        self.jobs.put(job)

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def drain(self) -> list[int]:
        """Rows of the groups written since the last call."""
        out = []
        while not self.landed.empty():
            out.append(self.landed.get())
        return out

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def extract_groups(
    group: Any,
    items: Any,
    groups: list[np.ndarray],
    cfg: Config,
    enc: Encoders,
    done: np.ndarray,
    result: RowsResult,
    decode_workers: int,
    on_group: Callable[[int, RowsResult], None] | None = None,
    before_write: Callable[[], None] | None = None,
    mp_context: str | None = None,
) -> RowsResult:
    """Decode, encode and write fixed `groups` of rows that this writer owns: every shard in a
    single-process run, one shard per task on a cluster worker (extract/scale.py).

    Three things overlap: decoding (`decode_workers` processes, one group ahead each), encoding (this thread) and
    the checks and writes (`_Writer`, a thread, up to two groups behind). Writes land in group order and each
    marks its rows done after their arrays, so a killed run resumes to the same bytes.

    items[row] is the row's VideoItem (a list, or a dict of the owned rows); done: (N,) bool rows an
    earlier run finished (never rewritten); `result` is filled as groups land, so a caller still has
    it when a write fails; on_group(rows, result) after each group lands (in this thread); before_write() may
    refuse a write (a lost store lock); mp_context: how decoding processes start (None: multiprocessing's default).
    """
    import torch

    cuda = str(enc.device).startswith("cuda")
    loader = torch.utils.data.DataLoader(
        _GroupDecoder(items, groups, cfg, decode_cap(cfg, enc), enc.timesformer.sampling),
        batch_size=None,
        shuffle=False,
        num_workers=decode_workers,
        worker_init_fn=_worker_init if decode_workers else None,
        prefetch_factor=1 if decode_workers else None,  # native frames: one group ahead per worker bounds memory
        persistent_workers=False,
        multiprocessing_context=mp_context if decode_workers else None,
        pin_memory=cuda,  # staged in page-locked memory by the loader's thread: uploads do not block
    )

    def write(batch_rows: np.ndarray, ok: list[dict[str, Any]], pending: dict[str, Any] | None) -> int:
        if pending is not None:
            arrays = host_arrays(pending)
            valid = np.stack([np.asarray(v["valid"]) for v in ok])  # (B, L)
            finite = np.ones(len(ok), dtype=bool)
            for name in (schema.CLIP_FRAME, schema.CLIP_FG, schema.CLIP_BG, schema.TSF_FRAME, schema.TSF_CLS):
                finite &= np.isfinite(arrays[name].reshape(len(ok), -1)).all(1)
            arrays[schema.FRAME_MASK] = valid
            arrays[schema.TIMESTAMPS] = np.stack([np.asarray(v["pts"]) for v in ok])
            arrays[schema.FPS] = np.asarray([v["fps"] for v in ok], dtype=np.float32)
            rows = np.asarray([v["row"] for v in ok])
            in_segment = segment_mask([items[r] for r in rows], arrays[schema.TIMESTAMPS])  # (B, L)
            arrays[schema.SEGMENT_MASK] = in_segment & valid
            for b in np.flatnonzero(~finite):
                result.failures[items[rows[b]].id] = "non-finite: the encoders produced NaN or inf"
            keep = finite & ~done[rows]  # rows done by an earlier run are never rewritten
            for start, stop in contiguous_runs(rows[keep]):  # one slice write per run of rows
                if before_write is not None:
                    before_write()
                a = int(np.searchsorted(rows, start))
                write_rows(group, start, {k: v[a : a + stop - start] for k, v in arrays.items()})
            result.done += int(keep.sum())
            result.frames += int(valid[keep].sum())
            distinct = schema.distinct_frames(arrays[schema.TIMESTAMPS], valid)  # (B,)
            for b in np.flatnonzero(keep & (distinct < valid.sum(1))):  # frames repeat in the slots
                result.short[items[rows[b]].id] = int(distinct[b])
        return len(batch_rows) - int(done[batch_rows].sum())

    def landed() -> None:
        for rows in writer.drain():
            if on_group is not None:
                on_group(rows, result)

    writer = _Writer(write)
    try:
        for batch in loader:
            ok = [v for v in batch["videos"] if "error" not in v]
            for v in batch["videos"]:
                if "error" in v:
                    result.failures[items[v["row"]].id] = v["error"]
            pending = to_host(encode_on_device(ok, cfg, enc)) if ok else None
            meta = [{k: v[k] for k in ("row", "valid", "pts", "fps")} for v in ok]  # the frames are not held
            writer.put(np.asarray(batch["rows"]), meta, pending)
            landed()
    finally:
        writer.close()  # what was handed over lands, even on an error or an interrupt here
    writer.raise_error()
    landed()
    return result


def record_failures(group: Any, video_ids: list[str], previous: dict[str, str], new: dict[str, str]) -> dict:
    """Write the store's `failures` attribute once: earlier failures of rows still not done, then this run's."""
    done_now = np.asarray(group[schema.DONE][:])
    row_of = {vid: r for r, vid in enumerate(video_ids)}
    failures = {vid: r for vid, r in previous.items() if vid in row_of and not done_now[row_of[vid]]}
    failures.update(new)
    group.attrs["failures"] = failures
    return failures


def prepare_run(cfg: Config, index: DatasetIndex | None) -> tuple[Config, DatasetIndex]:
    """Checks and resolutions every extraction run starts with (single process or cluster)."""
    from extract.contract.locate import check_cache_root

    check_cache_root(cfg)
    cfg = resolve_weights(cfg)
    index = index or load_dataset(cfg)
    if not index.items:
        raise schema.CacheError(f"dataset {cfg.dataset.name!r} at {cfg.dataset.root} has no videos to extract")
    return cfg, index


def extract(cfg: Config, progress: bool = True, index: DatasetIndex | None = None) -> ExtractSummary:
    """Run stage 1 for the configured dataset; resumes an interrupted run of the same fingerprint.

    Takes the store's lock for the whole run (a second concurrent run is refused); `ltar extract
    --scheduler` runs the same groups on a dask cluster instead (extract/scale.py)."""
    from tqdm import tqdm

    from extract.contract.locate import write_pointer
    from extract.contract.lock import acquire_lock

    t0 = time.perf_counter()
    named, (cfg, index) = cfg, prepare_run(cfg, index)
    device = resolve_device(cfg)
    fp = fingerprint(cfg, index, device)
    path = schema.store_path(cfg.cache.root, cfg.dataset.name, fp)
    with acquire_lock(path):
        enc = build_encoders(cfg, device)
        n, L = len(index.items), cfg.frames.num_frames
        group = open_for_writing(path, fp, upgrade=lambda g: upgrade_store(g, index))
        if group is None:
            group = create_cache(cfg, index, enc, path, fp)
            shard = schema.store_shard_videos(group)
        else:
            shard = resume_store(group, cfg, index, path)
        write_pointer(named, path, device, "ltar extract")  # stage 2 finds the store by the config's sections

        done = np.asarray(group[schema.DONE][:])
        todo = np.flatnonzero(~done)
        summary = ExtractSummary(path, total=n, skipped=int(done.sum()))
        groups = _groups(todo, n, max(1, cfg.encoders.batch_frames // L), shard)
        previous_failures = dict(group.attrs.get("failures", {}))
        bar = tqdm(total=len(todo), unit="video", disable=not progress, desc="extract")

        def on_group(rows: int, result: RowsResult) -> None:
            bar.update(rows)
            bar.set_postfix(frames_s=f"{result.frames / max(time.perf_counter() - t0, 1e-9):.0f}")

        result = RowsResult(failures=summary.failures, short=summary.short)
        try:
            workers = resolve_decode_workers(cfg, group_bytes(cfg, index.items, groups, enc))
            log.info("decoding in %d process(es) beside the encoders", workers)
            extract_groups(group, index.items, groups, cfg, enc, done, result, workers, on_group=on_group)
        finally:
            bar.close()
            record_failures(group, [it.id for it in index.items], previous_failures, summary.failures)
            record_file_stamps(group, index)
    summary.done, summary.frames = result.done, result.frames
    summary.seconds = time.perf_counter() - t0
    summary.store_bytes = store_bytes(path)
    summary.raw_fp32_bytes = raw_fp32_bytes(store_specs(cfg, index, enc))
    return summary
