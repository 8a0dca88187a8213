"""Foreground/background split of frames from a saliency map, vectorised over the frame batch.

Four sources of saliency (`saliency.method`), none with extra weights: CLIP's last-block CLS→patch attention,
CLIP Surgery's value-value path (Li et al., 2023), the spectral residual of Hou & Zhang (2007), and motion (the
difference of each sampled frame's neighbours). From a map, `foreground_box` finds a tight box holding a
share of the salient mass; `foreground_background` crops that box from the frame at its own resolution
(foreground, `crop_boxes`) and fills it in the view the encoder sees (background, `fill_box`). Every function
takes a batch of frames and runs on the batch's device without Python loops over frames.

Conventions: frames are uint8 (N, H, W, 3); maps are float (N, h, w) over a `region` of the frame
(relative (x0, y0, x1, y1); the whole frame by default, CLIP's centre crop for attention maps, see
`ClipEncoder.view_box`); boxes are relative (x0, y0, x1, y1) with x to the right and y down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

Fill = Literal["mean", "blur", "zero"]

_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as OpenCV's RGB2GRAY
_EPS = 1e-8


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _frames(frames: Any) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 array of shape (N, H, W, 3); got {tuple(x.shape)} {x.dtype}")
    return x


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; (N, h, w) -> (N, h, w). A flat map carries no preference: all ones."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)  # (N, 1, 1)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo  # (N, 1, 1)
    out = (maps - lo) / span.clamp_min(_EPS)
    return torch.where(span > _EPS, out, torch.ones_like(out))


def _gaussian_kernel(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()  # (2 * radius + 1,)


def _gaussian_blur(x: torch.Tensor, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) float; `padding` is reflect or zeros (for normalised convolution)."""
    B, C, H, W = x.shape
    radius = math.ceil(3.0 * sigma)
    if padding == "reflect":
        radius = min(radius, H - 1, W - 1)  # reflect padding must stay inside the image
    if radius <= 0:
        return x
    k = _gaussian_kernel(sigma, radius, x.device)
    y = x.reshape(B * C, 1, H, W)  # (B*C, 1, H, W)
    if padding == "reflect":
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        pad = 0
    else:
        pad = radius
    y = F.conv2d(y, k.view(1, 1, 1, -1), padding=(0, pad))  # blur along x
    y = F.conv2d(y, k.view(1, 1, -1, 1), padding=(pad, 0))  # blur along y
    return y.reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Saliency maps
# ---------------------------------------------------------------------------------------------


def clip_attention_saliency(attention: torch.Tensor) -> torch.Tensor:
    """CLS→patch attention (N, h, w) -> saliency (N, h, w) float32 in [0, 1], min-max per frame."""
    return _normalise(attention.float())


def spectral_residual_saliency(
    frames: Any, size: int | Sequence[int], work_width: int = 64, sigma: float = 1.5
) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of uint8 frames (N, H, W, 3) -> (N, h, w) in [0, 1].

    Grey frames are shrunk to `work_width` pixels wide (aspect kept); the log amplitude spectrum minus its
    3x3 average (the "spectral residual") is recombined with the original phase, transformed back, squared,
    blurred by a Gaussian of `sigma` working pixels (about OpenCV's 5x5 smoothing), resized to `size` and
    min-max normalised. The map covers the whole frame.
    """
    x = _frames(frames)
    N, H, W, _ = x.shape
    out_h, out_w = _pair(size)
    if N == 0:
        return torch.zeros(0, out_h, out_w, device=x.device)
    grey_w = torch.tensor(_GREY, device=x.device).view(1, 3, 1, 1)
    grey = (x.permute(0, 3, 1, 2).float() / 255.0 * grey_w).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    wh, ww = max(8, round(work_width * H / W)), work_width
    small = F.interpolate(grey, size=(wh, ww), mode="area")  # (N, 1, wh, ww)
    spectrum = torch.fft.fft2(small)  # (N, 1, wh, ww) complex
    log_amp = torch.log(spectrum.abs() + _EPS)  # (N, 1, wh, ww)
    # The spectrum is periodic, so its local average wraps around.
    smooth = F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="circular"), kernel_size=3, stride=1)  # (N, 1, wh, ww)
    residual = torch.polar(torch.exp(log_amp - smooth), torch.angle(spectrum))  # (N, 1, wh, ww) complex
    sal = torch.fft.ifft2(residual).abs() ** 2  # (N, 1, wh, ww)
    sal = _gaussian_blur(sal, sigma)  # (N, 1, wh, ww)
    sal = F.interpolate(sal, size=(out_h, out_w), mode="bilinear", align_corners=False)  # (N, 1, h, w)
    return _normalise(sal[:, 0])  # (N, h, w)


def clip_surgery_saliency(similarity: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's patch map (N, h, w) (`ClipEncoder.encode(surgery=True)`: each patch's v-v path embedding
    against the image embedding) -> saliency (N, h, w) float32 in [0, 1], min-max per frame."""
    return _normalise(similarity.float())


def motion_saliency(before: Any, after: Any, size: int | Sequence[int], sigma: float = 1.5) -> torch.Tensor:
    """Frame-difference energy around each sampled frame: uint8 neighbours (N, H, W, 3) before and after it ->
    (N, h, w) in [0, 1].

    The grey central difference |after - before|, squared, area-resized to `size` and blurred by a Gaussian of
    `sigma` map cells, min-max normalised: what moves between the two neighbours. A static shot (or a repeated
    frame at the video's ends) has no difference: its map is flat, which `foreground_box` reads as uniform (a
    centred box of `saliency.mass` of the frame).
    """
    a, b = _frames(before), _frames(after)
    if a.shape != b.shape:
        raise ValueError(f"neighbour frames differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    out_h, out_w = _pair(size)
    if a.shape[0] == 0:
        return torch.zeros(0, out_h, out_w, device=a.device)
    grey_w = torch.tensor(_GREY, device=a.device).view(1, 3, 1, 1)

    def grey(x: torch.Tensor) -> torch.Tensor:  # (N, H, W, 3) uint8 -> (N, 1, H, W) in [0, 1]
        return (x.permute(0, 3, 1, 2).float() / 255.0 * grey_w).sum(dim=1, keepdim=True)

    energy = (grey(b) - grey(a)) ** 2  # (N, 1, H, W)
    energy = F.interpolate(energy, size=(out_h, out_w), mode="area")  # (N, 1, h, w)
    return _normalise(_gaussian_blur(energy, sigma)[:, 0])  # (N, h, w)


# ---------------------------------------------------------------------------------------------
# Boxes and crops
# ---------------------------------------------------------------------------------------------


def _cdf_bounds(marginal: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval holding `share` of a 1-D mass, trimming (1 - share) / 2 from each end.

    marginal: (N, n) non-negative cell masses; cell i spans [i / n, (i + 1) / n] and its mass is spread
    uniformly inside it, so the bounds fall between cell edges. Returns (lo, hi), each (N,), relative.
    """
    N, n = marginal.shape
    cdf = marginal.cumsum(dim=-1)  # (N, n)
    total = cdf[:, -1:]  # (N, 1)
    trim = (1.0 - share) / 2.0
    zero = torch.zeros_like(total)

    def invert(target: torch.Tensor, right: bool) -> torch.Tensor:
        idx = torch.searchsorted(cdf, target, right=right).clamp(max=n - 1)  # (N, 1)
        prev = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), zero)  # (N, 1) mass before the cell
        cell = cdf.gather(1, idx) - prev  # (N, 1) mass of the cell
        frac = ((target - prev) / cell.clamp_min(_EPS)).clamp(0.0, 1.0)  # (N, 1)
        return ((idx + frac) / n)[:, 0]  # (N,)

    # lo: the first cell whose cumulative mass exceeds the trim; hi: the first that reaches total - trim.
    return invert(trim * total, right=True), invert((1.0 - trim) * total, right=False)


def foreground_box(saliency: torch.Tensor, mass: float) -> torch.Tensor:
    """Tight box (N, 4) relative (x0, y0, x1, y1) around `mass` of each map's salient mass; maps (N, h, w).

    The salient mass is the part of a map above its frame mean, so a diffuse floor (attention spread over
    the background, spectral noise) does not pull the box outwards. Each axis keeps sqrt(mass) of its
    marginal mass, trimmed equally from both ends, so the box holds exactly `mass` of a separable map (and
    about that for others). A map with no mass counts as uniform.
    The box is never smaller than one map cell along either axis.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1]; got {mass}")
    N, h, w = saliency.shape
    s = saliency.float()
    s = (s - s.mean(dim=(-2, -1), keepdim=True)).clamp_min(0.0)  # (N, h, w) mass above the frame's mean
    empty = s.sum(dim=(-2, -1), keepdim=True) <= _EPS  # (N, 1, 1)
    s = torch.where(empty, torch.ones_like(s), s)
    share = math.sqrt(mass)
    x0, x1 = _cdf_bounds(s.sum(dim=1), share)  # marginal over x: (N, w)
    y0, y1 = _cdf_bounds(s.sum(dim=2), share)  # marginal over y: (N, h)

    def at_least_one_cell(lo: torch.Tensor, hi: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        half = torch.maximum(hi - lo, torch.full_like(lo, 1.0 / n)) / 2  # (N,)
        start = torch.minimum((lo + hi) / 2 - half, 1.0 - 2 * half).clamp_min(0.0)  # keep inside [0, 1]
        return start, start + 2 * half

    x0, x1 = at_least_one_cell(x0, x1, w)
    y0, y1 = at_least_one_cell(y0, y1, h)
    return torch.stack([x0, y0, x1, y1], dim=-1)  # (N, 4)


def _region_tensor(region: Any, N: int, device: torch.device) -> torch.Tensor:
    if region is None:
        region = (0.0, 0.0, 1.0, 1.0)
    r = torch.as_tensor(region, dtype=torch.float32, device=device)
    return r.expand(N, 4) if r.ndim == 1 else r  # (N, 4)


def box_mask(boxes: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Boolean masks (N, h, w), true at pixels whose centres lie inside the relative boxes (N, 4)."""
    h, w = _pair(size)
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) / h  # (h,)
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) / w  # (w,)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))  # each (N, 1)
    inside_y = (ys >= y0) & (ys <= y1)  # (N, h)
    inside_x = (xs >= x0) & (xs <= x1)  # (N, w)
    return inside_y[:, :, None] & inside_x[:, None, :]  # (N, h, w)


Crop = Literal["pad", "squash", "center"]
CROPS: tuple[str, ...] = ("pad", "squash", "center")


def crop_boxes(
    frames: Any, boxes: torch.Tensor, out_size: int | Sequence[int], crop: Crop = "pad", pad_value: float = 0.0
) -> torch.Tensor:
    """Crops of uint8 frames (N, H, W, 3) at relative boxes (N, 4), resized to `out_size`: float (N, 3, S_h, S_w).

    `crop` says how a box of another aspect than the output fits it:
    - `pad`: the whole box, aspect kept, centred and letterboxed with `pad_value` (open_clip's `longest` mode fills
      with 0, black): every salient pixel is seen, none is stretched;
    - `squash`: the whole box stretched to the output;
    - `center`: the largest centred window of the output's aspect inside the box (open_clip's `shortest` mode on the
      cropped image): aspect kept, the box's ends cut off.
    RoIAlign in the frame's own pixels (averaging several samples per output pixel when shrinking), one call.
    """
    x = _frames(frames)
    N, H, W, _ = x.shape
    S_h, S_w = _pair(out_size)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}; got {crop!r}")
    scale = torch.tensor([W, H, W, H], device=x.device, dtype=torch.float32)
    px = boxes.to(x.device).float() * scale  # (N, 4) in pixels
    cx, cy = (px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2  # (N,)
    bw, bh = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]  # (N,)
    aspect = S_w / S_h
    if crop == "squash":
        rw, rh = bw, bh
    elif crop == "pad":  # the smallest window of the output's aspect holding the box
        rw = torch.maximum(bw, bh * aspect)
        rh = rw / aspect
    else:  # the largest window of the output's aspect inside the box
        rw = torch.minimum(bw, bh * aspect)
        rh = rw / aspect
    rois = torch.stack([cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2], dim=-1)  # (N, 4)
    index = torch.arange(N, device=x.device, dtype=torch.float32)[:, None]  # (N, 1)
    img = x.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    out = roi_align(img, torch.cat([index, rois], dim=1), output_size=(S_h, S_w), sampling_ratio=-1, aligned=True)
    if crop == "pad":  # letterbox: outside the box's own extent within the window
        inner = torch.stack([0.5 - bw / rw / 2, 0.5 - bh / rh / 2, 0.5 + bw / rw / 2, 0.5 + bh / rh / 2], dim=-1)
        keep = box_mask(inner, (S_h, S_w))[:, None]  # (N, 1, S_h, S_w)
        out = torch.where(keep, out, torch.full_like(out, float(pad_value)))
    return out  # (N, 3, S_h, S_w)


def fill_box(view: torch.Tensor, boxes: torch.Tensor, fill: Fill = "mean") -> torch.Tensor:
    """The background frame: float views (N, 3, h, w) with the relative boxes (N, 4) filled by `fill` (see
    `foreground_background`). Returns (N, 3, h, w)."""
    if fill not in ("mean", "blur", "zero"):
        raise ValueError(f"fill must be one of 'mean', 'blur', 'zero'; got {fill!r}")
    inside = box_mask(boxes.to(view.device), view.shape[-2:])[:, None]  # (N, 1, h, w)
    keep = (~inside).float()  # (N, 1, h, w)
    if fill == "zero":
        filler = torch.zeros_like(view)
    elif fill == "mean":
        kept = keep.sum(dim=(-2, -1), keepdim=True)  # (N, 1, 1, 1)
        outside_mean = (view * keep).sum(dim=(-2, -1), keepdim=True) / kept.clamp_min(1.0)  # (N, 3, 1, 1)
        frame_mean = view.mean(dim=(-2, -1), keepdim=True)  # (N, 3, 1, 1), when the box covers everything
        filler = torch.where(kept > 0, outside_mean, frame_mean).expand_as(view)
    else:
        filler = _normalised_blur(view, keep)
    return torch.where(inside, filler, view)  # (N, 3, h, w)


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, h, w, 3)


def foreground_background(
    frames: Any,
    saliency: torch.Tensor,
    mass: float,
    fill: Fill = "mean",
    out_size: int | Sequence[int] = 224,
    region: Any = None,
    crop: Crop = "squash",
    view: Any = None,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground crops and backgrounds of uint8 frames (N, H, W, 3) from maps (N, h, w).

    - fg (N, S, S, 3) uint8: the `foreground_box` of each map, cropped from the frame at its own resolution and
      resized to `out_size` as `crop` says (`crop_boxes`: pad, squash or center).
    - bg (N, S, S, 3) uint8: the map's `region` of the frame at `out_size` (`view`, when given: what the image
      encoder sees of the frame, (N, S, S, 3) uint8; else RoIAlign of the region), with the same box filled by
      `fill`: `mean` = the mean colour of the pixels outside the box, `blur` = a heavy normalised-convolution
      blur of the pixels outside the box (a smooth inpainting; no foreground colour leaks in), `zero` = black.

    The background masks the box rather than a thresholded map so that fg and bg partition the view
    exactly, and a speckled attention map does not punch scattered holes into the scene.
    `region`: relative (x0, y0, x1, y1) of the frame that the maps cover, (4,) or (N, 4); default whole frame.
    """
    x = _frames(frames)
    N, H, W, _ = x.shape
    S_h, S_w = _pair(out_size)
    if fill not in ("mean", "blur", "zero"):
        raise ValueError(f"fill must be one of 'mean', 'blur', 'zero'; got {fill!r}")
    if saliency.shape[0] != N:
        raise ValueError(f"got {N} frames but {saliency.shape[0]} saliency maps")
    if N == 0:
        empty = torch.zeros(0, S_h, S_w, 3, dtype=torch.uint8, device=x.device)
        return empty, empty.clone()
    saliency = saliency.to(x.device)
    boxes = foreground_box(saliency, mass)  # (N, 4) relative to the region
    region = _region_tensor(region, N, x.device)  # (N, 4) relative to the frame
    rx0, ry0, rx1, ry1 = region.unbind(-1)  # each (N,)
    rw, rh = rx1 - rx0, ry1 - ry0
    fg_frame = torch.stack(
        [rx0 + boxes[:, 0] * rw, ry0 + boxes[:, 1] * rh, rx0 + boxes[:, 2] * rw, ry0 + boxes[:, 3] * rh], dim=-1
    )  # (N, 4) relative to the frame
    fg = crop_boxes(x, fg_frame, (S_h, S_w), crop, pad_value)  # (N, 3, S_h, S_w)
    if view is None:
        view = crop_boxes(x, region, (S_h, S_w), "squash")  # (N, 3, S_h, S_w)
    else:
        view = _frames(view).to(x.device).permute(0, 3, 1, 2).float()  # (N, 3, S_h, S_w)
    bg = fill_box(view, boxes, fill)  # (N, 3, S_h, S_w)
    return _to_uint8(fg), _to_uint8(bg)


def _normalised_blur(image: torch.Tensor, keep: torch.Tensor, work: int = 32) -> torch.Tensor:
    """Heavy blur of the kept pixels only: blur(image * keep) / blur(keep), at a coarse working size.

    image: (N, 3, H, W) float; keep: (N, 1, H, W) in {0, 1}. Returns (N, 3, H, W). Pixels that no kept
    pixel reaches get the frame mean.
    """
    N, _, H, W = image.shape
    wh, ww = min(H, work), min(W, work)
    num = F.interpolate(image * keep, size=(wh, ww), mode="area")  # (N, 3, wh, ww)
    den = F.interpolate(keep, size=(wh, ww), mode="area")  # (N, 1, wh, ww)
    sigma = max(wh, ww) / 4.0  # reaches the middle of a box covering most of the view
    num = _gaussian_blur(num, sigma, padding="zeros")
    den = _gaussian_blur(den, sigma, padding="zeros")
    blurred = num / den.clamp_min(_EPS)  # (N, 3, wh, ww)
    blurred = torch.where(den > 1e-4, blurred, image.mean(dim=(-2, -1), keepdim=True))
    return F.interpolate(blurred, size=(H, W), mode="bilinear", align_corners=False)  # (N, 3, H, W)


def saliency_to_uint8(maps: torch.Tensor, size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Maps (N, h, w) in [0, 1] -> uint8 (N, size, size) for storage; `size` None keeps (h, w)."""
    m = maps.float()
    if size is not None and _pair(size) != tuple(m.shape[-2:]):
        m = F.interpolate(m[:, None], size=_pair(size), mode="bilinear", align_corners=False)[:, 0]  # (N, h', w')
    return (m.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
