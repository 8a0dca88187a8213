"""Saliency: spectral residual finds a bright square, `foreground_box` on planted maps with known mass,
the background loses the square under every fill, shapes/dtypes, and batch == one frame at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from extract.saliency import (
    clip_attention_saliency,
    crop_boxes,
    foreground_background,
    foreground_box,
    motion_saliency,
    saliency_to_uint8,
    spectral_residual_saliency,
)

torch.set_num_threads(1)

BG, FG = 90, 250  # background and square grey levels


def _square(x0: int, y0: int, size: int = 24, H: int = 96, W: int = 96, seed: int = 0) -> torch.Tensor:
    """A flat, slightly noisy frame (H, W, 3) uint8 with a bright square at (x0, y0)."""
    g = torch.Generator().manual_seed(seed)
    frame = (torch.full((H, W, 3), BG, dtype=torch.int32) + torch.randint(-3, 4, (H, W, 3), generator=g)).clamp(0, 255)
    frame[y0 : y0 + size, x0 : x0 + size] = FG
    return frame.to(torch.uint8)


SQUARES = [(30, 40, 24), (10, 10, 24), (60, 50, 30), (40, 20, 16)]


@pytest.fixture(scope="module")
def squares() -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.stack([_square(x, y, s, seed=i) for i, (x, y, s) in enumerate(SQUARES)])  # (N, 96, 96, 3)
    boxes = torch.tensor([[x, y, x + s, y + s] for x, y, s in SQUARES], dtype=torch.float32) / 96  # (N, 4)
    return frames, boxes


def test_spectral_residual_finds_the_square(squares):
    frames, true = squares
    sal = spectral_residual_saliency(frames, 96)  # (N, 96, 96)
    assert sal.shape == (4, 96, 96) and sal.dtype == torch.float32
    assert sal.min() >= 0 and sal.max() <= 1
    peak = sal.flatten(1).argmax(dim=1)  # (N,)
    py, px = (peak // 96).float() / 96, (peak % 96).float() / 96
    assert ((px >= true[:, 0]) & (px < true[:, 2]) & (py >= true[:, 1]) & (py < true[:, 3])).all()
    boxes = foreground_box(spectral_residual_saliency(frames, 12), mass=0.6)
    assert (box_iou(boxes, true).diag() > 0.5).all()


def test_foreground_box_on_planted_maps():
    m = torch.zeros(4, 8, 8)
    m[0, 2:6, 3:7] = 1.0  # uniform block: rows 2..5, columns 3..6
    m[1, 2:6, 3:7] = 1.0
    m[2, 5, 2] = 3.0  # one hot cell
    m[3, 0, 0] = 1.0  # a hot corner cell
    boxes = foreground_box(m, mass=1.0)
    assert boxes[0].tolist() == pytest.approx([3 / 8, 2 / 8, 7 / 8, 6 / 8], abs=1e-6)
    assert boxes[2].tolist() == pytest.approx([2 / 8, 5 / 8, 3 / 8, 6 / 8], abs=1e-6)
    assert boxes[3].tolist() == pytest.approx([0, 0, 1 / 8, 1 / 8], abs=1e-6)
    # 0.64 of a uniform block: 0.8 per axis, 0.1 of the block's 4 cells trimmed from each side.
    b = foreground_box(m[1:2], mass=0.64)[0]
    assert b.tolist() == pytest.approx([3.4 / 8, 2.4 / 8, 6.6 / 8, 5.6 / 8], abs=1e-5)
    inside = (b[2] - b[0]) * 8 / 4 * (b[3] - b[1]) * 8 / 4  # share of the block's mass in the box
    assert float(inside) == pytest.approx(0.64, abs=1e-5)
    # A one-cell map still gives a one-cell box at lower mass, and a flat map a central box.
    assert foreground_box(m[2:3], mass=0.3)[0].tolist() == pytest.approx([2 / 8, 5 / 8, 3 / 8, 6 / 8], abs=1e-6)
    assert foreground_box(torch.zeros(1, 8, 8), mass=0.64)[0].tolist() == pytest.approx([0.1, 0.1, 0.9, 0.9], abs=1e-5)


def test_foreground_box_is_valid_on_random_maps():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(64, 7, 9, generator=g) ** 4
    boxes = foreground_box(maps, mass=0.5)
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 1 / 9 - 1e-6).all() and (boxes[:, 3] - boxes[:, 1] >= 1 / 7 - 1e-6).all()
    with pytest.raises(ValueError, match="mass"):
        foreground_box(maps, mass=0.0)


@pytest.mark.parametrize("fill,expected", [("mean", BG), ("blur", BG), ("zero", 0)])
def test_background_loses_the_square(fill, expected):
    frame = _square(24, 48, size=24)[None]  # square on cells 3..5 (x) and 6..8 (y) of a 12x12 map
    sal = torch.zeros(1, 12, 12)
    sal[0, 6:9, 3:6] = 1.0
    fg, bg = foreground_background(frame, sal, mass=1.0, fill=fill, out_size=48)
    assert fg.shape == bg.shape == (1, 48, 48, 3) and fg.dtype == bg.dtype == torch.uint8
    # The crop is the square (its outer pixel row blends across the box edge when zooming in).
    assert (fg[:, 1:-1, 1:-1].int() - FG).abs().max() <= 2
    hole = bg[0, 24:36, 12:24].float()  # the square, at half scale
    assert (hole - expected).abs().max() <= 4
    assert (bg[0, :20].float() - BG).abs().max() <= 4  # the scene above is untouched


def test_region_maps_back_to_the_frame():
    frame = torch.zeros(1, 64, 96, 3, dtype=torch.uint8)
    frame[:, :, 24:48] = 200  # the left half of the central 64x64 view
    frame[:, :, 48:72] = 100  # its right half
    sal = torch.zeros(1, 8, 8)
    sal[0, :, :4] = 1.0  # the map covers the view; its left half is salient
    fg, bg = foreground_background(frame, sal, mass=1.0, fill="zero", out_size=16, region=(0.25, 0.0, 0.75, 1.0))
    assert (fg[:, 1:-1, 1:-1] == 200).all()
    assert (bg[0, :, :8] == 0).all() and (bg[0, :, 9:] == 100).all()  # the view: the zeroed box, then the rest


def _blocks(img: np.ndarray, k: int) -> np.ndarray:
    """(H, W, 3) -> (H/k, W/k, 3) means of k x k blocks: an independent area resize."""
    H, W, _ = img.shape
    return img.reshape(H // k, k, W // k, k, 3).astype(np.float64).mean(axis=(1, 3))


@pytest.mark.parametrize("crop", ["pad", "squash", "center"])
def test_crop_modes_against_slicing(crop):
    """A 64x32 box of a 96x128 native frame into a 16x16 input, each mode against numpy slicing + block means."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)  # (H, W, 3)
    box = torch.tensor([[32 / 128, 16 / 96, 96 / 128, 48 / 96]])  # x 32..96, y 16..48 in pixels: 64 wide, 32 high
    out = crop_boxes(torch.from_numpy(frame)[None], box, 16, crop, pad_value=7.0)[0].permute(1, 2, 0).numpy()
    if crop == "pad":  # the whole box at 4:1, centred, with 4 rows of padding above and below
        expected = np.full((16, 16, 3), 7.0)
        expected[4:12] = _blocks(frame[16:48, 32:96], 4)
    elif crop == "squash":  # 64x32 -> 16x16: x by 4, y by 2
        expected = frame[16:48, 32:96].astype(np.float64).reshape(16, 2, 16, 4, 3).mean(axis=(1, 3))
    else:  # the central 32x32 of the box
        expected = _blocks(frame[16:48, 48:80], 2)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_pipeline_crop_keeps_the_whole_object():
    """A wide object: `pad` keeps all of it at its aspect, `center` cuts its ends, `squash` stretches it."""
    frame = torch.zeros(1, 60, 120, 3, dtype=torch.uint8)
    frame[:, 20:40, 10:110] = 255  # a 100x20 bar
    sal = torch.zeros(1, 6, 12)
    sal[0, 2:4, 1:11] = 1.0  # the map marks the bar
    share = {}
    for crop in ("pad", "squash", "center"):
        fg, _ = foreground_background(frame, sal, mass=1.0, fill="zero", out_size=40, crop=crop)
        share[crop] = float((fg[0, ..., 0] > 127).float().mean())
    assert share["pad"] == pytest.approx(0.2, abs=0.03)  # 100x20 bar letterboxed: a fifth of the square
    assert share["squash"] > 0.9 and share["center"] > 0.9  # stretched, or its middle only


def test_shapes_and_storage():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (3, 50, 70, 3), generator=g, dtype=torch.uint8)
    sal = spectral_residual_saliency(frames, (6, 9))
    assert sal.shape == (3, 6, 9)
    fg, bg = foreground_background(frames, sal, mass=0.6, fill="blur", out_size=(32, 40))
    assert fg.shape == bg.shape == (3, 32, 40, 3)
    att = clip_attention_saliency(torch.rand(3, 8, 8, generator=g))
    assert att.amin(dim=(1, 2)).tolist() == [0, 0, 0] and att.amax(dim=(1, 2)).tolist() == [1, 1, 1]
    assert (clip_attention_saliency(torch.full((1, 8, 8), 0.01)) == 1).all()  # flat: no preference
    stored = saliency_to_uint8(att)
    assert stored.shape == (3, 8, 8) and stored.dtype == torch.uint8 and stored.max() == 255
    assert saliency_to_uint8(att, 16).shape == (3, 16, 16)
    empty_fg, empty_bg = foreground_background(frames[:0], sal[:0], 0.6, "mean", 8)
    assert empty_fg.shape == (0, 8, 8, 3)


def test_batch_equals_one_by_one(squares):
    frames, _ = squares
    sal = spectral_residual_saliency(frames, 12)
    singles = torch.cat([spectral_residual_saliency(f[None], 12) for f in frames])
    assert torch.allclose(sal, singles, atol=1e-5)
    boxes = foreground_box(sal, 0.6)
    assert torch.allclose(boxes, torch.cat([foreground_box(s[None], 0.6) for s in sal]), atol=1e-6)
    for fill in ("mean", "blur", "zero"):
        fg, bg = foreground_background(frames, sal, 0.6, fill, 32)
        one = [foreground_background(f[None], s[None], 0.6, fill, 32) for f, s in zip(frames, sal, strict=True)]
        assert (fg.int() - torch.cat([o[0] for o in one]).int()).abs().max() <= 1
        assert (bg.int() - torch.cat([o[1] for o in one]).int()).abs().max() <= 1


def test_spectral_residual_foreground_covers_the_moving_object_of_synthetic_videos():
    """On rendered synthetic frames (the generator knows the object's mask), the foreground box holds
    the object's centre far more often than a box of the same area placed at random would."""
    from extract.config import SyntheticConfig
    from extract.synthetic import plan_split, render_video

    cfg = SyntheticConfig()
    inside, areas = [], []
    for spec in plan_split(cfg, "test_iid")[:6]:
        frames, mask = render_video(spec, cfg)  # (T, H, W, 3), (T, H, W)
        has = mask.reshape(len(mask), -1).any(1)
        f, m = frames[has][::4], mask[has][::4]
        boxes = foreground_box(spectral_residual_saliency(torch.from_numpy(f), 24), 0.6).numpy()  # (N, 4)
        _, h, w = m.shape
        for (x0, y0, x1, y1), mk in zip(boxes, m, strict=True):
            ys, xs = np.nonzero(mk)
            cy, cx = ys.mean() / h, xs.mean() / w
            inside.append(x0 <= cx <= x1 and y0 <= cy <= y1)
            areas.append((x1 - x0) * (y1 - y0))
    assert np.mean(inside) > 0.85 and np.mean(areas) < 0.5, (np.mean(inside), np.mean(areas))


def test_motion_saliency_finds_what_moved_and_is_flat_on_a_static_shot():
    before = _square(10, 40, size=16)[None]  # the square at x = 10 .. 26
    after = _square(40, 40, size=16)[None]  # ... and at x = 40 .. 56 (same noise seed: only the square moved)
    sal = motion_saliency(before, after, 12)  # (1, 12, 12) over 96 px: 8 px cells
    box = foreground_box(sal, mass=0.9)[0] * 96  # pixels
    assert box[0] <= 12 and box[2] >= 54  # spans both places the square was
    assert box[1] >= 28 and box[3] <= 68  # and only their rows (40 .. 56, blurred by 1.5 cells)
    static = motion_saliency(before, before.clone(), 12)
    assert torch.equal(static, torch.ones_like(static))  # no difference: no preference (a centred box)
    with pytest.raises(ValueError, match="shape"):
        motion_saliency(before, after[:, :48], 12)
