"""`ltar inspect`: what a cache store holds, and what one video's confounder features are made of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.config import Config
from extract.contract.schema import CacheError


def locate_store(cfg: Config) -> Path:
    """The store the config names (same fingerprint as `ltar extract` would compute); refused while a
    video file has changed since its row was written (the store would serve the old file's features)."""
    from extract.datasets import load_dataset
    from extract.devices import resolve_device
    from extract.pipeline import fingerprint, resolve_weights, stale_rows

    cfg = resolve_weights(cfg)
    index = load_dataset(cfg)
    here = resolve_device(cfg)
    # this machine's device first; a store extracted on the other kind (GPU fp16 / CPU fp32) also serves
    for device in dict.fromkeys([here, "cpu", "cuda"]):
        path = schema.store_path(cfg.cache.root, cfg.dataset.name, fingerprint(cfg, index, device))
        if path.exists():
            stale = stale_rows(schema.open_cache(path)[0], index)
            if stale.size:
                first = index.items[int(stale[0])]
                raise CacheError(
                    f"{path}: {stale.size} video file(s) changed since they were extracted (first: {first.id} at "
                    f"{first.path}); run `ltar extract` to extract them again"
                )
            return path
    path = schema.store_path(cfg.cache.root, cfg.dataset.name, fingerprint(cfg, index, here))
    raise CacheError(f"no cache store at {path} for this configuration; run `ltar extract` first (or pass --store)")


def cache_summary(path: Path) -> str:
    """Arrays with shapes and dtypes, done/failed counts per split, encoder provenance."""
    import json

    group, info = schema.open_cache(path)
    done = np.asarray(group[schema.DONE][:])
    splits = np.asarray(info.splits)
    lines = [f"store: {path}", f"fingerprint: {info.attrs['fingerprint']}  schema: {info.attrs['schema_version']}"]
    for split in sorted(set(info.splits)):
        sel = splits == split
        lines.append(f"split {split}: {int(sel.sum())} videos, {int(done[sel].sum())} done")
    rows = np.flatnonzero(done)
    if rows.size:
        mask = np.asarray(group[schema.FRAME_MASK].get_orthogonal_selection((rows, slice(None))))  # (V, L)
        stamps = np.asarray(group[schema.TIMESTAMPS].get_orthogonal_selection((rows, slice(None))))
        short = rows[schema.distinct_frames(stamps, mask) < mask.sum(1)]
        if short.size:
            ids = ", ".join(info.video_ids[r] for r in short[:10]) + (", ..." if short.size > 10 else "")
            lines.append(f"short: {short.size} video(s) repeat frames in their slots (fewer frames than L): {ids}")
    lines.append(f"failed: {len(info.failures)}")
    lines += [f"  {vid}: {reason}" for vid, reason in sorted(info.failures.items())]
    lines.append("arrays:")
    for name, arr in sorted(_arrays(group)):
        dims = ", ".join(arr.metadata.dimension_names or ())
        lines.append(f"  {name:<20} {str(arr.shape):<22} {str(arr.dtype):<8} ({dims})")
    lines.append("provenance: " + json.dumps(info.attrs.get("provenance", {}), indent=2, sort_keys=True))
    return "\n".join(lines)


def _arrays(group, prefix: str = ""):
    import zarr

    for name, member in group.members():
        if isinstance(member, zarr.Group):
            yield from _arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


# what `ltar inspect --saliency` can draw: every `saliency.method`
SALIENCY_METHODS = ("clip-attention", "clip-surgery", "spectral-residual", "motion")


def _clip_encoder(cfg: Config) -> Any:
    """The configured CLIP encoder on the CPU (its `vlm` weights resolved as extraction resolves them)."""
    from extract.encoders.clip import build_clip_encoder
    from extract.pipeline import resolve_weights

    return build_clip_encoder(resolve_weights(cfg), "cpu")


def saliency_maps(
    cfg: Config, views: np.ndarray, method: str, size: int, encoder: Any = None, neighbours: Any = None
) -> Any:
    """Saliency of CLIP's views (K, h, w, 3) uint8 by `method`, computed now: (K, h', w') float in [0, 1].
    The CLIP methods read `encoder` (default: the configured CLIP encoder); motion reads `neighbours`, CLIP's
    views of the frames before and after each one ((K, h, w, 3) uint8 each)."""
    import torch

    from extract.saliency import (
        clip_attention_saliency,
        clip_surgery_saliency,
        motion_saliency,
        spectral_residual_saliency,
    )

    x = torch.from_numpy(np.ascontiguousarray(views))
    if method == "spectral-residual":
        return spectral_residual_saliency(x, size)
    if method == "motion":
        if neighbours is None:
            raise CacheError("motion saliency needs the frames before and after each sampled frame")
        return motion_saliency(*(torch.as_tensor(np.ascontiguousarray(n)) for n in neighbours), size)
    if method in ("clip-attention", "clip-surgery"):
        encoder = encoder or _clip_encoder(cfg)
        surgery = method == "clip-surgery"
        with torch.no_grad():
            out = encoder.encode(x, attention=not surgery, surgery=surgery)
        return clip_surgery_saliency(out["surgery"]) if surgery else clip_attention_saliency(out["attention"])
    raise CacheError(f"--saliency: unknown method {method!r}; choose from {', '.join(SALIENCY_METHODS)}")


def inspect_video(
    cfg: Config,
    path: Path | None,
    video_id: str,
    out: Path,
    max_frames: int = 8,
    methods: tuple[str, ...] = (),
) -> Path:
    """PNG: sampled frames and, per saliency method, the map, the foreground crop and the background frame, one row
    per frame. `video_id` is a video of the store at `path` (the stored saliency first, then `methods` computed
    now) or, with `path` None, a video file (each of `methods`, default every one, computed now: judge the split
    on your own footage before extracting a dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from extract.decode import decode_frames, probe, sample_timestamps
    from extract.saliency import foreground_background

    panels: dict[str, np.ndarray] = {}  # method label -> (K, h, w) map
    if path is None:  # a video file
        video_path = Path(video_id)
        if not video_path.is_file():
            raise CacheError(f"{video_path} is neither a video of the cache nor a video file; give an id or a path")
        video_info = probe(video_path)
        cap = cfg.frames.max_short_side
        size = cap if cap is not None and min(video_info.height, video_info.width) > cap else None
        ts = sample_timestamps(video_info.duration, max_frames)
        pick = np.arange(len(ts))
        title = video_path.name
        methods = methods or SALIENCY_METHODS
    else:
        group, info = schema.open_cache(path)
        if video_id not in info.video_ids:
            raise CacheError(f"video {video_id!r} is not in {path}; `ltar inspect` without an id lists the splits")
        row = info.video_ids.index(video_id)
        if not bool(group[schema.DONE][row]):
            reason = info.failures.get(video_id, "not extracted yet")
            raise CacheError(f"video {video_id!r} has no features in {path} ({reason})")
        mask = np.asarray(group[schema.FRAME_MASK][row])  # (L,)
        ts = np.asarray(group[schema.TIMESTAMPS][row])[mask]  # (L',) seconds
        sal = np.asarray(group[schema.SALIENCY][row])[mask]  # (L', h, w) uint8
        pick = np.unique(np.linspace(0, len(ts) - 1, min(max_frames, len(ts))).round().astype(int))
        ts = ts[pick]
        video_path = Path(info.attrs["video_paths"][row])
        cap = int(info.attrs.get("decode_size") or 0) or None  # extraction's short-side cap, 0 = native
        video_info = probe(video_path)
        size = cap if cap is not None and min(video_info.height, video_info.width) > cap else None
        stored = (info.attrs.get("config", {}).get("saliency") or {}).get("method", "as extracted")
        panels[f"stored ({stored})"] = sal[pick].astype(np.float32) / 255.0
        title = f"{video_id} ({info.splits[row]})"
    pixel_aspect = cfg.frames.pixel_aspect == "apply"
    native = decode_frames(video_path, ts, size=size, pixel_aspect=pixel_aspect).frames  # (K, H, W, 3)
    encoder = _clip_encoder(cfg)
    with torch.no_grad():
        frames = encoder.view(torch.from_numpy(native)).numpy()  # (K, h, w, 3): what CLIP sees of each frame
        neighbours = None
        if "motion" in methods:  # the frames one native frame before and after each sampled one
            step = 1.0 / video_info.fps if video_info.fps > 0 else 0.0
            around = np.clip(np.concatenate([ts - step, ts + step]), 0.0, video_info.duration)
            near = decode_frames(video_path, around, size=size, pixel_aspect=pixel_aspect).frames  # (2K, H, W, 3)
            neighbours = encoder.view(torch.from_numpy(near)).numpy().reshape(2, len(ts), *frames.shape[1:])
    grid = next(iter(panels.values())).shape[-1] if panels else (encoder.grid[0] if encoder.grid else 14)
    for method in methods:
        maps = saliency_maps(cfg, frames, method, cfg.saliency.map_size or grid, encoder, neighbours)
        panels[method] = maps.cpu().numpy()
    cols = ["frame"]
    images: list[list[np.ndarray]] = [[f] for f in frames]
    for label, maps in panels.items():
        fg, bg = foreground_background(
            torch.from_numpy(native),
            torch.from_numpy(maps).float(),
            cfg.saliency.mass,
            cfg.saliency.background_fill,
            encoder.image_size,
            region=encoder.view_box(*native.shape[1:3]),
            crop=cfg.saliency.crop,
            view=torch.from_numpy(frames),
            pad_value=encoder.fill_color,
        )
        cols += [f"{label}\nmap", "foreground", "background"]
        for r in range(len(frames)):
            images[r] += [maps[r], fg[r].numpy(), bg[r].numpy()]
    fig, axes = plt.subplots(len(frames), len(cols), figsize=(2 * len(cols), 2 * len(frames)), squeeze=False)
    for r in range(len(frames)):
        for c, img in enumerate(images[r]):
            ax = axes[r, c]
            ax.imshow(img, cmap="inferno" if img.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 0].set_ylabel(f"t={ts[r]:.2f}s")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
