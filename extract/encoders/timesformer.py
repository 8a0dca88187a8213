"""TimeSformer video encoder (Bertasius et al., ICML 2021): divided space-time attention, ViT-B/16 layout.

The network is written here on timm's building blocks (`PatchEmbed`, `Attention`, `Mlp`, `DropPath`); the maths and
the parameter names follow facebookresearch/TimeSformer `timesformer/models/vit.py` (`VisionTransformer`, `Block`),
so a module of ours holds exactly the keys of the official model minus its `model.` wrapper prefix and its `head`.

Three checkpoint layouts load into it, with strict key checking:
- `official`: the `.pyth` files of facebookresearch/TimeSformer (`{"model_state": {"model.blocks.0.attn.qkv.weight":
  ...}, "optimizer_state": ..., "cfg": ...}`, written by `timesformer/utils/checkpoint.py:save_checkpoint`), or the
  bare state dict with or without the `model.` prefix. `model.head.*` (the K400 classifier) is ignored.
- `hf`: Hugging Face transformers `TimesformerModel` / `TimesformerForVideoClassification` (`embeddings.cls_token`,
  `encoder.layer.N.temporal_attention.attention.qkv`, ..., optional `timesformer.` prefix; `classifier.*` ignored),
  either a folder with `config.json` + `model.safetensors` / `pytorch_model.bin`, or one such file.
- `ours`: `{"format": FORMAT, "arch": {...}, "state_dict": {...}}`, written by `save_checkpoint`.

Frames: extraction feeds clips in the checkpoint's own setting (`encoders.timesformer.sampling: clips`): the official
cfg stored in the `.pyth` (`DATA.NUM_FRAMES`, `DATA.SAMPLING_RATE`, `DATA.TARGET_FPS`, `DATA.MEAN`, `DATA.STD`) decides
them, else the K400 release's 8 frames 32 apart at 30 fps; a Hugging Face folder's `preprocessor_config.json` gives
the mean and std. A clip of another length still runs: like the official forward, the time embeddings are resampled
with nearest-neighbour interpolation (and the position embeddings to the patch grid for another image size).

Token order: the official code keeps the patch tokens as `(h w t)` (patch-major); we keep `(t h w)` (frame-major),
which makes the per-frame reshapes contiguous. Attention is order-free within each group (a frame's patches, a
patch's frames), so the numbers are the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp, PatchEmbed
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "causal-ltar/timesformer-v1"  # the `format` tag of our own checkpoint files

# DATA.MEAN / DATA.STD of facebookresearch/TimeSformer `timesformer/config/defaults.py` (RGB, pixels scaled to [0, 1]).
MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
# The released K400 models' test clip (configs/Kinetics/TimeSformer_divST_8x32_224.yaml): 8 frames, 32 apart at 30 fps.
K400_SAMPLING = {"clip_frames": 8, "sampling_rate": 32, "target_fps": 30.0}
RANDOM_SEED = 0  # random-weight presets are built under this seed, so a rerun gives the same features


@dataclass(frozen=True)
class TimesformerArch:
    image_size: int = 224  # the square input side the position embeddings were trained for
    patch_size: int = 16
    dim: int = 768  # Dv, the token width
    depth: int = 12  # number of divided space-time blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    num_frames: int = 8  # number of time embeddings stored (T of the checkpoint; any L runs)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


PRESETS: dict[str, TimesformerArch] = {
    # TimeSformer K400 (`vit_base_patch16_224` in vit.py: embed_dim 768, depth 12, heads 12, mlp 4, 8 frames).
    "base": TimesformerArch(),
    # Same layout, small, for tests and the demo.
    "tiny": TimesformerArch(image_size=64, patch_size=16, dim=64, depth=2, heads=2, mlp_ratio=4.0, num_frames=8),
}


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class DividedSpaceTimeBlock(nn.Module):
    """One TimeSformer block: temporal attention, then spatial attention, then the MLP (all pre-norm)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        norm = dict(eps=1e-6)  # vit.py builds the ViT-B model with partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = nn.LayerNorm(dim, **norm)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)  # spatial attention
        self.temporal_norm1 = nn.LayerNorm(dim, **norm)
        self.temporal_attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **norm)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """x: (B, 1 + T*N, D), the CLS token then patch tokens in (t h w) order -> same shape."""
        B, S, D = x.shape
        N = (S - 1) // T
        cls, tok = x[:, :1], x[:, 1:]  # (B, 1, D), (B, T*N, D)

        # Temporal attention: each patch position attends over its T frames (CLS takes no part).
        xt = tok.reshape(B, T, N, D).transpose(1, 2).reshape(B * N, T, D)  # (B*N, T, D)
        rt = self.drop_path(self.temporal_attn(self.temporal_norm1(xt)))  # (B*N, T, D)
        rt = rt.reshape(B, N, T, D).transpose(1, 2).reshape(B, T * N, D)  # (B, T*N, D)
        tok = tok + self.temporal_fc(rt)  # (B, T*N, D)

        # Spatial attention: each frame's N patches plus a copy of the CLS token.
        cls_bt = cls.expand(B, T, D).reshape(B * T, 1, D)  # (B*T, 1, D)
        xs = torch.cat([cls_bt, tok.reshape(B * T, N, D)], dim=1)  # (B*T, 1+N, D)
        rs = self.drop_path(self.attn(self.norm1(xs)))  # (B*T, 1+N, D)
        cls_res = rs[:, 0].reshape(B, T, D).mean(dim=1, keepdim=True)  # (B, 1, D): the CLS update, averaged over frames
        tok_res = rs[:, 1:].reshape(B, T * N, D)  # (B, T*N, D)

        x = torch.cat([cls + cls_res, tok + tok_res], dim=1)  # (B, 1+T*N, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, 1+T*N, D)


class TimeSformer(nn.Module):
    """The TimeSformer backbone without its classifier head; parameter names as in the official `VisionTransformer`."""

    def __init__(self, arch: TimesformerArch, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.arch = arch
        D = arch.dim
        self.patch_embed = PatchEmbed(
            img_size=arch.image_size, patch_size=arch.patch_size, in_chans=3, embed_dim=D, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.grid**2 + 1, D))  # (1, 1+N, D), shared by every frame
        self.time_embed = nn.Parameter(torch.zeros(1, arch.num_frames, D))  # (1, T0, D), added to patch tokens only
        dpr = torch.linspace(0, drop_path_rate, arch.depth).tolist()
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(D, arch.heads, arch.mlp_ratio, drop_path=dpr[i]) for i in range(arch.depth)
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # As vit.py: truncated normal (std .02) for embeddings and linears, zero time embeddings, and temporal_fc
        # zeroed in every block but the first, so that a fresh model starts as a per-frame ViT.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in list(self.blocks)[1:]:
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings for a (gh, gw) patch grid: (1, 1 + gh*gw, D); nearest resampling as in vit.py."""
        pos = self.pos_embed
        if pos.shape[1] == gh * gw + 1:
            return pos
        D, P = pos.shape[2], math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].transpose(1, 2).reshape(1, D, P, P)  # (1, D, P, P)
        grid = F.interpolate(grid, size=(gh, gw), mode="nearest")  # (1, D, gh, gw)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, 1+gh*gw, D)

    def _time_embed(self, T: int) -> torch.Tensor:
        """Time embeddings for T frames: (1, T, D); nearest resampling of the stored T0 as in vit.py."""
        te = self.time_embed
        if te.shape[1] == T:
            return te
        return F.interpolate(te.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)  # (1, T, D)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video: (B, T, 3, H, W) normalised -> cls (B, D), tokens (B, T, gh*gw, D), both after the final norm."""
        B, T, C, H, W = video.shape
        p = self.arch.patch_size
        gh, gw = H // p, W // p
        N, D = gh * gw, self.arch.dim
        x = self.patch_embed(video.reshape(B * T, C, H, W))  # (B*T, N, D)
        pos = self._pos_embed(gh, gw)  # (1, 1+N, D)
        cls = (self.cls_token + pos[:, :1]).expand(B, 1, D)  # (B, 1, D)
        x = (x + pos[:, 1:]).reshape(B, T, N, D) + self._time_embed(T)[:, :, None]  # (B, T, N, D)
        x = torch.cat([cls, x.reshape(B, T * N, D)], dim=1)  # (B, 1+T*N, D)
        for blk in self.blocks:
            x = blk(x, T)  # (B, 1+T*N, D)
        x = self.norm(x)  # (B, 1+T*N, D)
        return x[:, 0], x[:, 1:].reshape(B, T, N, D)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts: our key <-> the file's key
# ---------------------------------------------------------------------------------------------

# Inside a block: our (= official) suffix -> transformers' `TimesformerLayer` suffix.
_HF_BLOCK = {
    "norm1": "layernorm_before",
    "attn.qkv": "attention.attention.qkv",
    "attn.proj": "attention.output.dense",
    "temporal_norm1": "temporal_layernorm",
    "temporal_attn.qkv": "temporal_attention.attention.qkv",
    "temporal_attn.proj": "temporal_attention.output.dense",
    "temporal_fc": "temporal_dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "time_embed": "embeddings.time_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK_INV = {v: k for k, v in _HF_BLOCK.items()}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_OURS_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")

LAYOUTS = ("official", "hf", "ours")
_HEAD_KEYS = {"official": ("head.weight", "head.bias"), "hf": ("classifier.weight", "classifier.bias")}


def to_layout_key(key: str, layout: str) -> str:
    """Our parameter name -> its name in `layout` (official: the `.pyth` `model_state` key; hf: `TimesformerModel`)."""
    if layout == "official":
        return "model." + key
    if layout == "hf":
        if key in _HF_TOP:
            return _HF_TOP[key]
        m = _OURS_BLOCK_RE.match(key)
        if m and m.group(2) in _HF_BLOCK:
            return f"encoder.layer.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"
        raise KeyError(f"no Hugging Face name for {key!r}")
    return key


def from_layout_key(key: str, layout: str) -> str | None:
    """A file key (prefixes already removed) -> our parameter name, or None when the layout has no such name."""
    if layout == "hf":
        if key in _HF_TOP_INV:
            return _HF_TOP_INV[key]
        m = _HF_BLOCK_RE.match(key)
        if m and m.group(2) in _HF_BLOCK_INV:
            return f"blocks.{m.group(1)}.{_HF_BLOCK_INV[m.group(2)]}.{m.group(3)}"
        return None
    return key


def export_state_dict(model: TimeSformer, layout: str, head_classes: int = 0) -> dict[str, torch.Tensor]:
    """The model's weights named as in `layout`; `head_classes > 0` adds a zero classifier head as the real files
    carry (K400: 400), which loading must ignore. Official: the `model_state` dict; hf: a TimesformerModel state dict
    (prefixed `timesformer.` when a head is added, as `TimesformerForVideoClassification` names it)."""
    sd = {to_layout_key(k, layout): v.detach().clone() for k, v in model.state_dict().items()}
    if head_classes and layout in _HEAD_KEYS:
        if layout == "hf":
            sd = {"timesformer." + k: v for k, v in sd.items()}
        w, b = _HEAD_KEYS[layout]
        prefix = "model." if layout == "official" else ""
        sd[prefix + w] = torch.zeros(head_classes, model.arch.dim)
        sd[prefix + b] = torch.zeros(head_classes)
    return sd


def save_checkpoint(model: TimeSformer, path: str | Path) -> Path:
    """Write our own layout: architecture and weights in one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "arch": dataclasses.asdict(model.arch), "state_dict": sd}, path)
    return path


class CheckpointError(ValueError):
    """A weights file that does not hold a TimeSformer our module can load; the message says what to fix."""


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors, numbers and strings, which torch.load(weights_only=True)"
            f" refuses ({str(e).splitlines()[0]}); if you trust the file, re-save its state dict once as "
            "{'model_state': ckpt['model_state']} and point encoders.timesformer.weights at the new file"
        ) from None


def checkpoint_data_cfg(obj: Any) -> dict:
    """The `DATA` settings an official `.pyth` records in its `cfg` (a YAML dump of the yacs CfgNode, or a dict):
    {clip_frames, sampling_rate, target_fps, mean, std}, only the keys present."""
    cfg = obj.get("cfg") if isinstance(obj, Mapping) else None
    if isinstance(cfg, str):
        import yaml

        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return {}
    data = cfg.get("DATA") if isinstance(cfg, Mapping) else None
    if not isinstance(data, Mapping):
        return {}
    names = {"NUM_FRAMES": "clip_frames", "SAMPLING_RATE": "sampling_rate", "TARGET_FPS": "target_fps"}
    out: dict[str, Any] = {ours: data[theirs] for theirs, ours in names.items() if data.get(theirs)}
    for key in ("MEAN", "STD"):
        value = data.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            out[key.lower()] = tuple(float(v) for v in value)
    return out


def _hf_preprocessor(path: Path) -> dict:
    """Mean and std from a Hugging Face folder's `preprocessor_config.json` (VideoMAEImageProcessor), when present."""
    pp_path = path / "preprocessor_config.json"
    if not pp_path.exists():
        return {}
    pp = json.loads(pp_path.read_text())
    out = {}
    for theirs, ours in (("image_mean", "mean"), ("image_std", "std")):
        value = pp.get(theirs)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            out[ours] = tuple(float(v) for v in value)
    return out


def _read_hf_folder(path: Path) -> tuple[dict, dict]:
    cfg_path = path / "config.json"
    hf_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return _read_file(path / name), hf_cfg
    raise CheckpointError(
        f"{path} is a folder without model.safetensors or pytorch_model.bin; encoders.timesformer.weights must name "
        "an official .pyth file, a Hugging Face TimesformerModel folder, or a checkpoint written by save_checkpoint"
    )


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _detect(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(layout, state dict with the layout's wrapper prefixes removed, extra architecture hints)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        return "ours", dict(obj["state_dict"]), dict(obj.get("arch", {}))
    if "model_state" in obj:  # facebookresearch/TimeSformer save_checkpoint; its loader strips the `model.` prefix
        return "official", _strip(obj["model_state"], "model."), {}
    keys = [k for k in obj if isinstance(k, str)]
    if any(k.startswith(("timesformer.embeddings.", "embeddings.")) for k in keys):
        sd = _strip(obj, "timesformer.")
        return "hf", sd, {}
    if any(k.startswith(("model.blocks.", "blocks.", "module.model.blocks.")) for k in keys):
        return "official", _strip(_strip(obj, "module."), "model."), {}
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise CheckpointError(
        f"{path}: not a TimeSformer checkpoint in a layout we know (official .pyth with 'model_state', Hugging Face "
        f"TimesformerModel, or ours); its first keys are [{shown}]"
    )


def _infer_arch(sd: Mapping[str, torch.Tensor], layout: str, hints: dict, path: Path) -> TimesformerArch:
    """Architecture from the tensors' shapes (heads from the HF config, a preset of the same width, or dim // 64)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "time_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise CheckpointError(
                f"{path}: {layout} checkpoint lacks {to_layout_key(key, layout)!r}, which every TimeSformer "
                "(divided space-time) checkpoint has; is this a TimeSformer file?"
            )
    if layout == "ours" and hints:
        return TimesformerArch(**hints)
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _OURS_BLOCK_RE.match(k)))
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    heads = hints.get("num_attention_heads")
    if heads is None:
        same_width = [a.heads for a in PRESETS.values() if a.dim == dim]
        heads = same_width[0] if same_width else dim // 64  # ViT convention: 64 channels per head
    if heads < 1 or dim % heads:
        raise CheckpointError(f"{path}: cannot tell the number of attention heads for width {dim}")
    return TimesformerArch(
        image_size=grid * patch,
        patch_size=patch,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_frames=sd["time_embed"].shape[1],
    )


def load_timesformer(path: str | Path) -> tuple[TimeSformer, dict]:
    """Build a TimeSformer from a checkpoint file or HF folder, with strict key checking.

    Returns the model and facts for provenance (layout, head classes ignored, `checkpoint_data`: the sampling and
    normalisation the file records, see `checkpoint_data_cfg`). Raises CheckpointError naming the
    file and its missing / unexpected / mis-shaped keys, in the file's own naming."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"TimeSformer weights {path} do not exist; fix encoders.timesformer.weights in pipeline.yaml "
            "(or --set encoders.timesformer.weights=PATH), or set it to null for random weights of the preset"
        )
    hints: dict = {}
    if path.is_dir():
        obj, hf_cfg = _read_hf_folder(path)
        layout, sd, _ = _detect(obj, path)
        hints = {k: hf_cfg[k] for k in ("num_attention_heads",) if k in hf_cfg}
        data_cfg = _hf_preprocessor(path)
        if hf_cfg.get("num_frames"):
            data_cfg["clip_frames"] = int(hf_cfg["num_frames"])
    else:
        obj = _read_file(path)
        layout, sd, hints = _detect(obj, path)
        data_cfg = checkpoint_data_cfg(obj)

    head = {}
    for k in _HEAD_KEYS.get(layout, ()):
        if k in sd:
            head[k] = sd.pop(k)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in sd.items():
        ours = from_layout_key(k, layout) if isinstance(k, str) else None
        if ours is None:
            unexpected.append(str(k))
        else:
            converted[ours] = v

    arch = _infer_arch(converted, layout, hints, path)
    model = TimeSformer(arch)
    expected = model.state_dict()
    missing = [to_layout_key(k, layout) for k in expected if k not in converted]
    unexpected += [to_layout_key(k, layout) for k in converted if k not in expected]
    shapes = [
        f"{to_layout_key(k, layout)} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else ""]
        parts.append(f"mis-shaped keys {shapes}" if shapes else "")
        raise CheckpointError(
            f"{path}: does not match a TimeSformer ({layout} layout, inferred {arch}): "
            + "; ".join(p for p in parts if p)
        )
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    head_classes = int(next(iter(head.values())).shape[0]) if head else 0
    return model, {"layout": layout, "head_classes_ignored": head_classes, "checkpoint_data": data_cfg}


# ---------------------------------------------------------------------------------------------
# Encoder: raw frames in, features out
# ---------------------------------------------------------------------------------------------


def preprocess(
    frames: torch.Tensor, size: int, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
) -> torch.Tensor:
    """uint8 frames (B, L, H, W, 3) of any size -> normalised (B, L, 3, size, size) float32, on the frames' device.

    As the official test-time pipeline (`datasets/utils.py:spatial_sampling` with a fixed scale, from the decoded
    native frames): bilinear resize of the short side to `size` (long side floored, align_corners False, no
    antialias), the centre crop (offsets ceiled, as `uniform_crop`), then (x/255 - mean) / std. The official code
    normalises before resizing; bilinear interpolation is affine-invariant, so the order does not change a number.
    """
    B, L, H, W, C = frames.shape
    x = frames.reshape(B * L, H, W, C).permute(0, 3, 1, 2).float()  # (B*L, 3, H, W)
    if W < H:
        nh, nw = int(math.floor(H / W * size)), size
    else:
        nh, nw = size, int(math.floor(W / H * size))
    if (nh, nw) != (H, W):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)  # (B*L, 3, nh, nw)
    y0, x0 = math.ceil((nh - size) / 2), math.ceil((nw - size) / 2)
    x = x[:, :, y0 : y0 + size, x0 : x0 + size]  # (B*L, 3, size, size)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std).reshape(B, L, 3, size, size)  # (B, L, 3, size, size)


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class TimesformerEncoder:
    """Frozen TimeSformer: `encode(frames) -> {"frame": (B, L, Dv), "cls": (B, Dv)}` float32 on `device`."""

    def __init__(
        self,
        model: TimeSformer,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        *,
        preset: str | None = None,
        weights: str | None = None,
        layout: str = "random",
        extra: dict | None = None,
        mean: tuple[float, ...] = MEAN,
        std: tuple[float, ...] = STD,
        sampling: dict | None = None,
        compile_batch: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        # {"clip_frames", "sampling_rate", "target_fps", "source"} of `sampling: clips`; None = `spread`
        self.sampling = dict(sampling) if sampling else None
        self.model = model.to(self.device).eval().requires_grad_(False)
        # encoders.compile: the forward compiled for chunks of compile_batch clips (extract/encoders/compiled.py)
        self._forward = self.model
        if compile_batch is not None:
            from extract.encoders.compiled import FixedBatch

            self._forward = FixedBatch(self.model, compile_batch)
        self.compiled = compile_batch is not None
        self.arch = model.arch
        self.dim = model.arch.dim  # Dv
        self.image_size = model.arch.image_size
        self.precision = precision
        self._preset, self._weights, self._layout, self._extra = preset, weights, layout, dict(extra or {})

    def encode(self, frames: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """frames: uint8 (B, L, H, W, 3), raw RGB -> {"frame": (B, L, Dv), "cls": (B, Dv)} float32.

        `frame` = final-normed patch tokens averaged per frame (V); `cls` = final-normed clip CLS (v_cls)."""
        frames = torch.as_tensor(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"TimeSformer.encode expects uint8 frames (B, L, H, W, 3); got {frames.dtype} {tuple(frames.shape)}"
            )
        dtype = _AUTOCAST[self.precision] if self.device.type == "cuda" else None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            x = preprocess(frames.to(self.device, non_blocking=True), self.image_size, self.mean, self.std)
            # x: (B, L, 3, S, S)
            cls, tokens = self._forward(x)  # (B, Dv), (B, L, N, Dv)
            frame = tokens.float().mean(dim=2)  # (B, L, Dv): V, spatial tokens averaged per frame
        return {"frame": frame, "cls": cls.float()}

    def provenance(self) -> dict:
        a = self.arch
        return {
            "architecture": "timesformer-divided-space-time",
            "preset": self._preset,
            "weights": self._weights or "random",
            "layout": self._layout,
            "image_size": a.image_size,
            "patch_size": a.patch_size,
            "dim": a.dim,
            "depth": a.depth,
            "heads": a.heads,
            "mlp_ratio": a.mlp_ratio,
            "time_embeddings": a.num_frames,
            "time_embedding_resampling": "nearest (as vit.py), to the clip's length",
            "compiled": self.compiled,
            "sampling": (
                {"mode": "clips", **self.sampling}
                if self.sampling
                else {"mode": "spread", "note": "the L sampled frames form one clip"}
            ),
            "preprocess": {
                "resize": "short side bilinear to image_size from the native frame, centre crop (ceil offsets)",
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "precision": self.precision if self.device.type == "cuda" else "fp32",
            "timm": timm.__version__,
            "torch": torch.__version__,
            **self._extra,
        }


def _resolve_device(device: Any) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def random_timesformer(preset: str, seed: int = RANDOM_SEED) -> TimeSformer:
    """A preset's architecture with the official initialisation under a fixed seed (global RNG left untouched)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown TimeSformer preset {preset!r}; choose from {sorted(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimeSformer(PRESETS[preset])


def clip_sampling(tcfg: Any, checkpoint: dict, arch: TimesformerArch) -> dict | None:
    """The clip setting of `sampling: clips`, each value from the config, else the checkpoint's cfg, else the K400
    release (clip_frames: the checkpoint's time embeddings); None for `sampling: spread`."""
    if tcfg.sampling == "spread":
        return None
    out, sources = {}, {}
    for key in ("clip_frames", "sampling_rate", "target_fps"):
        configured, recorded = getattr(tcfg, key), checkpoint.get(key)
        if configured is not None:
            out[key], sources[key] = configured, "config"
        elif recorded is not None:
            out[key], sources[key] = recorded, "checkpoint cfg"
        elif key == "clip_frames":
            out[key], sources[key] = arch.num_frames, "checkpoint time embeddings"
        else:
            out[key], sources[key] = K400_SAMPLING[key], "K400 release default"
    out["clip_frames"], out["sampling_rate"], out["target_fps"] = (
        int(out["clip_frames"]),
        int(out["sampling_rate"]),
        float(out["target_fps"]),
    )
    return {**out, "source": sources}


def _clip_length(sampling: dict | None, cfg: Any) -> int:
    """T, the frames of each clip extraction feeds: the clip setting's, or (`spread`) all L sampled frames."""
    return int(sampling["clip_frames"]) if sampling else int(cfg.frames.num_frames)


def build_timesformer_encoder(cfg: Any, device: Any) -> TimesformerEncoder:
    """Registry builder: `cfg.encoders.timesformer` names a weights path, or (weights null) a random-weight preset."""
    tcfg, device = cfg.encoders.timesformer, _resolve_device(device)
    precision = cfg.encoders.precision
    # clips per call in extraction: batch_frames // T (T from the clip setting, resolved once the model is known)
    clips_per_call = (lambda T: max(1, cfg.encoders.batch_frames // T)) if cfg.encoders.compile else (lambda T: None)
    if tcfg.weights is None:
        logger.warning(
            "TimeSformer: no weights given; using RANDOM weights of the %r preset — features carry no pretrained "
            "meaning",
            tcfg.preset,
        )
        model = random_timesformer(tcfg.preset)
        return TimesformerEncoder(
            model,
            device,
            precision,
            preset=tcfg.preset,
            layout="random",
            extra={"seed": RANDOM_SEED},
            sampling=(sampling := clip_sampling(tcfg, {}, model.arch)),
            compile_batch=clips_per_call(_clip_length(sampling, cfg)),
        )
    model, facts = load_timesformer(tcfg.weights)
    data = facts["checkpoint_data"]
    sampling = clip_sampling(tcfg, data, model.arch)
    logger.info("TimeSformer: loaded %s (%s layout, %s), clips %s", tcfg.weights, facts["layout"], model.arch, sampling)
    return TimesformerEncoder(
        model,
        device,
        precision,
        weights=str(tcfg.weights),
        layout=facts["layout"],
        extra=facts,
        mean=data.get("mean", MEAN),
        std=data.get("std", STD),
        sampling=sampling,
        compile_batch=clips_per_call(_clip_length(sampling, cfg)),
    )
