"""Benchmark the foreground/background split against ground truth: where is the acting object?

ECRL's streams, the `fg_only` / `bg_only` bounds and the background dictionaries rest on the saliency split, so
it is measured where the truth is known: frames of the synthetic world rendered with their layers
(`extract.synthetic.render_layers`: the acting object's pixels and the visible non-causal objects' pixels), on
frames that show an action. For every saliency method and CLIP weights:
- `object`: the share of the acting object's pixels inside the foreground box (`saliency.mass` of the map),
- `area`: the box's share of the frame (a box as large as the frame holds everything and separates nothing),
- `distractor`: the share of the non-causal objects' pixels inside the box (lower is better),
- `object_random`: the object share of a box of the same size placed at random (the floor a map must beat).
Methods: `clip-attention` (the last block's CLS→patch attention) and `clip-surgery` (CLIP Surgery's value-value
path) with the demo's trained CLIP (`encoders.clip.weights: vlm`, when `ltar pretrain-vlm` has run) and with random
weights of the same preset (a method that works only with weights trained on this world is not a default for real
footage), `spectral-residual` and `motion` (the frames before and after, no weights). Two worlds: the configured
one, and the same with its distractor switched on (`synthetic.distractor: true`: a non-causal object beside the
acting one, moving with it; keys prefixed `dw_`), where every method also says how much of the distractor its box
takes in; the CLIP weights are those of the configured world. Prints a table per world, then one line of
key=value pairs.

Run from the repository root: `.venv/bin/python bench/saliency.py` (`--smoke`: a few frames, for the tests).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# The repository root first: bench/extract.py would otherwise shadow the `extract` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.contract.config import Config, load_config
from extract.saliency import (  # noqa: E402
    box_mask,
    clip_attention_saliency,
    clip_surgery_saliency,
    foreground_box,
    motion_saliency,
    spectral_residual_saliency,
)
from extract.synthetic import plan_split, render_layers  # noqa: E402

VIDEOS, FRAMES_PER_VIDEO = 48, 6  # 288 action frames of test_iid
SMOKE_VIDEOS, SMOKE_FRAMES = 2, 2


def action_frames(
    cfg: Config, videos: int, per_video: int, distractor: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 frames that show an action, with the acting object's mask and the distractors' (N, H, W)
    bool, `per_video` evenly spaced action frames of each of the first `videos` test_iid videos (of the world with
    its distractor on when `distractor`); and the frames before and after each (2, N, H, W, 3), clamped at the
    video's ends."""
    world = replace(cfg.synthetic, distractor=distractor)
    frames, objects, others, around = [], [], [], []
    for spec in plan_split(world, "test_iid")[:videos]:
        f, obj, spurious = render_layers(spec, world)  # (T, H, W, 3), (T, H, W), (T, H, W)
        shown = np.flatnonzero(obj.reshape(len(obj), -1).any(1))  # frames with the acting object
        pick = shown[np.linspace(0, len(shown) - 1, per_video).round().astype(int)]
        frames.append(f[pick])
        objects.append(obj[pick])
        others.append(spurious[pick])
        around.append(np.stack([f[np.maximum(pick - 1, 0)], f[np.minimum(pick + 1, len(f) - 1)]]))
    return np.concatenate(frames), np.concatenate(objects), np.concatenate(others), np.concatenate(around, axis=1)


def box_scores(boxes: torch.Tensor, objects: np.ndarray, others: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Boxes (N, 4) relative -> object / distractor share inside, the box area, and the object share of a box of
    the same size at a random place (seeded)."""
    N, H, W = objects.shape
    inside = box_mask(boxes, (H, W)).cpu().numpy()  # (N, H, W) bool
    obj, oth = torch.from_numpy(objects), torch.from_numpy(others)
    g = torch.Generator().manual_seed(seed)
    size = boxes[:, 2:] - boxes[:, :2]  # (N, 2) width, height
    start = torch.rand(N, 2, generator=g) * (1 - size).clamp_min(0)
    random_inside = box_mask(torch.cat([start, start + size], 1), (H, W)).cpu().numpy()

    def share(mask: np.ndarray, of: torch.Tensor) -> float:
        of = of.numpy()
        return float((mask & of).sum() / max(of.sum(), 1))

    return {
        "object": share(inside, obj),
        "area": float(inside.mean()),
        "distractor": share(inside, oth) if oth.any() else float("nan"),
        "object_random": share(random_inside, obj),
    }


def measure(
    cfg: Config, frames: np.ndarray, objects: np.ndarray, others: np.ndarray, around: np.ndarray
) -> dict[str, dict[str, float]]:
    """method label -> box_scores, for every method and CLIP weights available."""
    from extract.encoders.clip import build_clip_encoder
    from extract.pipeline import resolve_weights

    x = torch.from_numpy(frames)
    out: dict[str, dict[str, float]] = {}
    mass = cfg.saliency.mass
    encoders = {"random": replace(cfg.encoders.clip, weights=None, pretrained=None)}
    try:
        trained = resolve_weights(cfg).encoders.clip
        if trained.weights:  # (`--smoke`: random weights only)
            encoders = {"demo VLM": trained, **encoders}
    except Exception as e:  # noqa: BLE001 - the trained CLIP is optional here; say why it is missing
        logging.warning("no demo VLM weights (%s): only random CLIP weights are measured", e)
    for label, clip_cfg in encoders.items():
        enc = build_clip_encoder(replace(cfg, encoders=replace(cfg.encoders, clip=clip_cfg)), "cpu")
        with torch.no_grad():
            maps = enc.encode(x, attention=True, surgery=True)  # (N, h, w) each, over the (square) frame
        out[f"clip-attention ({label})"] = box_scores(
            foreground_box(clip_attention_saliency(maps["attention"]), mass), objects, others
        )
        out[f"clip-surgery ({label})"] = box_scores(
            foreground_box(clip_surgery_saliency(maps["surgery"]), mass), objects, others
        )
        grid = maps["attention"].shape[-1]
    size = cfg.saliency.map_size or grid
    sal = spectral_residual_saliency(x, size)
    out["spectral-residual"] = box_scores(foreground_box(sal, mass), objects, others)
    moving = motion_saliency(torch.from_numpy(around[0]), torch.from_numpy(around[1]), size)
    out["motion"] = box_scores(foreground_box(moving, mass), objects, others)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(Path(__file__).resolve().parents[1] / "pipeline.yaml")
    if smoke:
        cfg = replace(cfg, encoders=replace(cfg.encoders, clip=replace(cfg.encoders.clip, weights=None)))
    videos, per = (SMOKE_VIDEOS, SMOKE_FRAMES) if smoke else (VIDEOS, FRAMES_PER_VIDEO)
    key = {
        "clip-attention (demo VLM)": "clip_vlm",
        "clip-attention (random)": "clip_random",
        "clip-surgery (demo VLM)": "surgery_vlm",
        "clip-surgery (random)": "surgery_random",
        "spectral-residual": "spectral",
        "motion": "motion",
    }
    pairs = []
    for distractor, prefix in ((False, ""), (True, "dw_")):
        frames, objects, others, around = action_frames(cfg, videos, per, distractor)
        scores = measure(cfg, frames, objects, others, around)
        size = f"{frames.shape[1]}x{frames.shape[2]}"
        world = "with the distractor on" if distractor else "as configured"
        print(f"saliency on {len(frames)} action frames of test_iid ({size}), world {world}, mass {cfg.saliency.mass}")
        print(f"{'method':<28} {'object in box':>14} {'box area':>9} {'random box':>11} {'distractor':>11}")
        for name, s in scores.items():
            shown = f"{s['distractor']:.3f}" if s["distractor"] == s["distractor"] else "—"  # (none rendered)
            print(f"{name:<28} {s['object']:>14.3f} {s['area']:>9.3f} {s['object_random']:>11.3f} {shown:>11}")
        for n, s in scores.items():
            pairs += [f"{prefix}{key[n]}_{m}={v:.3f}" for m, v in s.items() if m != "distractor" or v == v]
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
