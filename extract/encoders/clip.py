"""Frozen open_clip encoder: per-frame image embeddings plus the last block's CLS→patch attention.

Weights are resolved in this order (`encoders.clip`):
1. `weights`: a local checkpoint (.pt / .bin / .pth / .safetensors).
   - Architecture: an open_clip JSON config beside it (`<stem>.json`, else `open_clip_config.json` or
     `config.json` in its folder) names it, its `quick_gelu` included; otherwise `model` does.
   - Preprocessing and activation: the JSON's `preprocess_cfg` when it has one; else the tag in `pretrained`
     (which must be a tag of the architecture) gives the file that tag's mean/std, interpolation, resize mode
     and fill colour, and QuickGELU when the tag was trained with it (`openai`, `dfn2b`, `metaclip_*`, ...).
     A JSON that disagrees with a named tag wins, with a warning. With neither JSON nor tag, open_clip's
     defaults (OpenAI mean/std, shortest-side resize + centre crop, GELU) are assumed, loudly.
2. `pretrained`: an open_clip tag for `model`, loaded from open_clip's cache, with the tag's preprocessing and
   (forced, since open_clip only warns) QuickGELU when the tag needs it and `model` is not a `-quickgelu`
   name. When the weights cannot be reached the encoder falls back to random weights of `preset`, loudly,
   and says so in its provenance.
3. Neither: random weights of `preset` (`tiny` = `ltar-tiny-vit` below, `base` = `model`), loudly.

The provenance records which source decided the preprocessing (`preprocess_source`: json / tag /
open_clip defaults / preset) and the activation read back from the built model (`activation`).

The attention comes from the same forward pass as the embedding: a pre-hook on the last residual block
recomputes only that block's CLS query against all keys (open_clip runs `nn.MultiheadAttention` with
`need_weights=False`, so the weights are never materialised otherwise). Image towers whose embedding is not
the CLS token's (attentional poolers, CLIPA's average pooling, ResNets, timm towers) have no such map.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torchvision.transforms import InterpolationMode

from extract.contract.config import Config, ConfigError
from extract.contract.store import sha256_of

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "ltar-tiny-vit"

# The `tiny` preset: CLIP's ViT layout (CLS token pooling, pre-LN blocks, projection heads) at toy size, in
# open_clip's own config format so `create_model`, `ClipLoss` training and checkpoints work unchanged.
# 64 px images in 8 px patches give an 8x8 attention grid; two heads of width 32 in both towers.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}

_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# CLIP Surgery (Li et al., arXiv 2304.05653) applies its architecture surgery to the last 6 blocks of a ViT
# (`clip_surgery_model.py`: `for i in range(1, 7)`); all blocks of a shallower tower.
SURGERY_BLOCKS = 6
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The parts of a pretrained tag's settings that define its eval preprocessing (the size comes from the model).
_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


def register_model_config(name: str, model_cfg: dict) -> str:
    """Make `model_cfg` (open_clip's `{embed_dim, vision_cfg, text_cfg, ...}`) creatable as `name`."""
    # open_clip only scans JSON files into this dict; registering in memory avoids writing files at import.
    open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(model_cfg)
    return name


register_model_config(TINY_MODEL_NAME, TINY_MODEL_CFG)


def save_checkpoint(
    model: torch.nn.Module, path: str | Path, model_cfg: dict, preprocess_cfg: dict | None = None
) -> Path:
    """Write `model`'s state dict to `path` (.pt or .safetensors) and an open_clip config to `<stem>.json`.

    The JSON uses open_clip's `open_clip_config.json` layout (`model_cfg`, `preprocess_cfg`), so the pair
    loads back through `encoders.clip.weights` and through open_clip's own `local-dir:` loader.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    if preprocess_cfg is None:
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
    meta = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def _loud(message: str, title: str = "RANDOM CLIP WEIGHTS") -> None:
    bar = "!" * 100
    log.warning("\n%s\n!! %s: %s\n%s", bar, title, message, bar)


def _find_json_config(weights: Path) -> tuple[Path, dict, dict] | None:
    """The open_clip config beside a checkpoint: (json path, model_cfg, preprocess_cfg), or None."""
    for candidate in (
        weights.with_suffix(".json"),
        weights.parent / "open_clip_config.json",
        weights.parent / "config.json",
    ):
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(
                f"encoders.clip.weights: the config {candidate} beside the checkpoint is not valid JSON ({e})"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
            return candidate, data["model_cfg"], data.get("preprocess_cfg") or {}
        if isinstance(data, dict) and all(k in data for k in _CONFIG_KEYS):
            return candidate, data, {}
        # A Hugging Face `config.json` (or any other JSON) is not an open_clip config: keep looking.
        log.debug("%s is not an open_clip model config; ignoring it", candidate)
    return None


def _name_for_config(model_cfg: dict) -> str:
    """A registered name whose config equals `model_cfg`, or a new content-addressed one."""
    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
    return register_model_config(f"ltar-local-{digest}", model_cfg)


def _check_arch(name: str, key: str) -> None:
    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}" if close else ""
        raise ConfigError(
            f"{key}: {name!r} is not an open_clip architecture{hint}; `open_clip.list_models()` lists them "
            f"(the tiny preset is {TINY_MODEL_NAME!r})"
        )


RANDOM_SEED = 0  # random-weight presets are seeded: one fingerprint must always mean the same numbers


def _create(name: str, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream untouched
        torch.manual_seed(RANDOM_SEED)
        return open_clip.create_model(name, precision="fp32", device=device, **kwargs)


def _resolve_device(device: Any) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pretrained_cfg(archs: list[str], tag: str, hint: str) -> tuple[str, dict]:
    """(architecture, open_clip's settings for `tag`) for the first of `archs` that has the tag, else a ConfigError."""
    for arch in archs:
        pcfg = open_clip.get_pretrained_cfg(arch, tag)
        if pcfg:
            return arch, pcfg
    arch = next((a for a in archs if open_clip.list_pretrained_tags_by_model(a)), archs[0])
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ConfigError(
        f"encoders.clip.pretrained: {tag!r} is not a pretrained tag of {arch!r}; choose from {tags}, {hint}"
    )


def _tag_preprocess(pcfg: dict) -> dict:
    """The eval preprocessing a pretrained tag was trained with (mean, std, interpolation, resize mode, fill)."""
    return {k: list(pcfg[k]) if isinstance(pcfg[k], tuple) else pcfg[k] for k in _TAG_PREPROCESS_KEYS if k in pcfg}


def _preprocess_differences(a: dict, b: dict) -> list[str]:
    """The preprocessing keys on which two (partial) open_clip preprocess configs disagree, defaults filled in."""
    full_a, full_b = merge_preprocess_dict(PreprocessCfg(), a), merge_preprocess_dict(PreprocessCfg(), b)

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, (list, tuple, int, float)) and isinstance(y, (list, tuple, int, float)):
            xs = list(x) if isinstance(x, (list, tuple)) else [x] * 3
            ys = list(y) if isinstance(y, (list, tuple)) else [y] * 3
            return len(xs) == len(ys) and all(math.isclose(u, v, abs_tol=1e-7) for u, v in zip(xs, ys, strict=True))
        return x == y

    return [key for key in _TAG_PREPROCESS_KEYS if not same(full_a[key], full_b[key])]


def _arch_quick_gelu(name: str) -> bool:
    """Whether the registered architecture `name` already builds QuickGELU (the `-quickgelu` configs)."""
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def build_clip_encoder(cfg: Config, device: Any) -> ClipEncoder:
    """Build the frozen CLIP encoder from `cfg.encoders.clip` (see the module docstring for the order)."""
    c = cfg.encoders.clip
    device = _resolve_device(device)
    preset_name = TINY_MODEL_NAME if c.preset == "tiny" else c.model
    info: dict[str, Any] = {"weights": None, "weights_sha256": None, "pretrained": None, "model_config": None}
    fallback_reason = None

    if c.weights:
        weights = Path(c.weights).expanduser()
        if not weights.is_file():
            raise ConfigError(
                f"encoders.clip.weights: the checkpoint {weights} does not exist; give the path of a local "
                ".pt/.bin/.safetensors file, or unset encoders.clip.weights to use a pretrained tag or random weights"
            )
        found = _find_json_config(weights)
        json_preprocess: dict = {}
        if found is not None:
            json_path, model_cfg, json_preprocess = found
            name = _name_for_config(model_cfg)
            info["model_config"] = str(json_path)
        else:
            name = c.model
            _check_arch(name, "encoders.clip.model")
        preprocess: dict = dict(json_preprocess)
        quick_gelu = False
        if c.pretrained:
            # A JSON registered under a new name has no tags: then the tag is looked up for encoders.clip.model.
            archs = [name] + ([c.model] if found and c.model != name and open_clip.get_model_config(c.model) else [])
            tag_arch, pcfg = _pretrained_cfg(
                archs,
                c.pretrained,
                "or unset encoders.clip.pretrained (it names the tag the local weights come from, "
                "for their preprocessing and activation)",
            )
            info["pretrained"] = c.pretrained
            tag_preprocess = _tag_preprocess(pcfg)
            if json_preprocess:
                differ = _preprocess_differences(json_preprocess, tag_preprocess)
                if differ:
                    log.warning(
                        "encoders.clip.weights: the preprocessing in %s (%s) disagrees with that of the tag "
                        "encoders.clip.pretrained=%r of %s (%s) on %s; using the JSON's. Fix the JSON or the tag "
                        "if the weights do not come from where it says.",
                        info["model_config"],
                        {k: json_preprocess.get(k) for k in differ},
                        c.pretrained,
                        tag_arch,
                        {k: tag_preprocess.get(k) for k in differ},
                        ", ".join(differ),
                    )
                preprocess_source = "json"
            else:
                preprocess, preprocess_source = tag_preprocess, "tag"
            tag_quick_gelu = bool(pcfg.get("quick_gelu", False))
            if found is not None:
                activation_source = "json"
                if tag_quick_gelu != _arch_quick_gelu(name):
                    log.warning(
                        "encoders.clip.weights: the model config in %s builds %s but the tag encoders.clip.pretrained"
                        "=%r was trained with %s; using the JSON's. Set `quick_gelu` in the JSON's model_cfg if the "
                        "weights come from that tag.",
                        info["model_config"],
                        "QuickGELU" if _arch_quick_gelu(name) else "GELU",
                        c.pretrained,
                        "QuickGELU" if tag_quick_gelu else "GELU",
                    )
            else:
                activation_source = "tag"
                quick_gelu = tag_quick_gelu and not _arch_quick_gelu(name)
        elif found is not None:
            activation_source = "json"
            preprocess_source = "json" if json_preprocess else "open_clip defaults"
            if not json_preprocess:
                log.warning(
                    "encoders.clip.weights: %s has no preprocess_cfg and encoders.clip.pretrained names no tag, so "
                    "open_clip's default preprocessing (OpenAI mean/std, shortest-side resize, centre crop) is "
                    "assumed; set encoders.clip.pretrained to the tag the weights come from or add a preprocess_cfg.",
                    info["model_config"],
                )
        else:
            preprocess_source = activation_source = "open_clip defaults"
            _loud(
                f"encoders.clip.weights: {weights} has no open_clip JSON config beside it and encoders.clip.pretrained "
                "names no tag, so open_clip's default preprocessing (OpenAI mean/std, shortest-side resize, centre "
                f"crop, bicubic) and {name!r}'s {'QuickGELU' if _arch_quick_gelu(name) else 'GELU'} are ASSUMED. "
                "Wrong settings degrade every CLIP feature silently: set encoders.clip.pretrained to the tag the "
                "weights come from (e.g. `openai`, which needs QuickGELU) or put the model's open_clip_config.json "
                "beside the file.",
                title="CLIP PREPROCESSING ASSUMED",
            )
        try:
            model = _create(
                name,
                device,
                pretrained=str(weights),
                force_preprocess_cfg=preprocess or None,
                force_quick_gelu=quick_gelu,
            )
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(
                f"encoders.clip.weights: could not load {weights} into the open_clip architecture {name!r} ({e}); "
                "put the model's open_clip JSON config beside the checkpoint or set encoders.clip.model"
            ) from None
        info.update(weights=str(weights), weights_sha256=sha256_of(weights))
        source = "weights"
    elif c.pretrained:
        _check_arch(c.model, "encoders.clip.model")
        _, pcfg = _pretrained_cfg([c.model], c.pretrained, "or give a local checkpoint as encoders.clip.weights")
        quick_gelu = bool(pcfg.get("quick_gelu", False)) and not _arch_quick_gelu(c.model)
        try:
            name, model = c.model, _create(c.model, device, pretrained=c.pretrained, force_quick_gelu=quick_gelu)
            info["pretrained"] = c.pretrained
            source, preprocess_source, activation_source = "pretrained", "tag", "tag"
        except (RuntimeError, OSError) as e:
            fallback_reason = f"pretrained weights {c.model}/{c.pretrained} could not be loaded: {e}"
            _loud(
                f"{fallback_reason}. Falling back to RANDOM weights of preset {c.preset!r} ({preset_name}); "
                "every CLIP feature in this cache is meaningless for recognition. Put the weights in open_clip's "
                "cache or set encoders.clip.weights to a local checkpoint."
            )
            name, source = preset_name, "random"
            preprocess_source = activation_source = "preset"
            _check_arch(name, "encoders.clip.model")
            model = _create(name, device)
    else:
        name, source = preset_name, "random"
        preprocess_source = activation_source = "preset"
        _check_arch(name, "encoders.clip.model")
        fallback_reason = "neither encoders.clip.weights nor encoders.clip.pretrained is set"
        _loud(
            f"{fallback_reason}; using RANDOM weights of preset {c.preset!r} ({name}). Fine for tests and the "
            "synthetic demo's plumbing, meaningless for recognition; recorded in the cache provenance."
        )
        model = _create(name, device)

    encoder = ClipEncoder(
        model,
        name,
        device=device,
        precision=cfg.encoders.precision,
        compile_batch=cfg.encoders.batch_frames if cfg.encoders.compile else None,
        provenance={
            "source": source,
            "preset": c.preset,
            "random_weights": source == "random",
            "fallback_reason": fallback_reason,
            "preprocess_source": preprocess_source,
            "activation_source": activation_source,
            **info,
        },
    )
    if cfg.saliency.method in ("clip-attention", "clip-surgery") and not encoder.supports_attention:
        raise ConfigError(
            f"saliency.method: {cfg.saliency.method} needs a ViT CLIP with a CLS token, and {name!r} is not one "
            f"({encoder.attention_unsupported}); set saliency.method: spectral-residual or motion"
        )
    return encoder


class ClipEncoder:
    """A frozen open_clip model with on-device preprocessing.

    Attributes: `dim` (Dc), `image_size` (h, w) in pixels, `grid` (h, w) of the attention map (None when
    the architecture has no CLS→patch attention), `device`, `model`, `tokenizer`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_name: str,
        device: Any = "cpu",
        precision: str = "fp32",
        provenance: dict | None = None,
        compile_batch: int | None = None,
    ):
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        # encoders.compile: the image tower compiled for chunks of compile_batch images (extract/encoders/compiled.py)
        self._image = self.model.encode_image
        if compile_batch is not None:
            from extract.encoders.compiled import FixedBatch

            self._image = FixedBatch(self.model.encode_image, compile_batch)
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.precision = precision
        # CPU always runs fp32 (config contract); autocast only on CUDA.
        self._autocast_dtype = _AUTOCAST.get(precision) if self.device.type == "cuda" else None

        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.resize_mode: str = pp.get("resize_mode", "shortest")
        self.interpolation: str = pp.get("interpolation", "bicubic")
        self.fill_color: int = int(pp.get("fill_color", 0))
        self.mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), device=self.device).view(1, 3, 1, 1)

        self.activation, activation_at = _activation(model)  # "quick_gelu" / "gelu" as built
        self.attention_unsupported = _attention_problem(model.visual)
        self.supports_attention = self.attention_unsupported is None
        self.grid: tuple[int, int] | None = tuple(model.visual.grid_size) if self.supports_attention else None
        # open_clip's towers keep the joint width as `output_dim`, except timm towers: then the config's embed_dim.
        self.dim = int(
            getattr(model, "embed_dim", 0)
            or getattr(model.visual, "output_dim", 0)
            or (open_clip.get_model_config(model_name) or {})["embed_dim"]
        )
        self._provenance = {
            "encoder": "clip",
            "model": model_name,
            "model_cfg": open_clip.get_model_config(model_name),
            "image_size": list(self.image_size),
            "grid": list(self.grid) if self.grid else None,
            "embed_dim": self.dim,
            "precision": precision if self._autocast_dtype is not None else "fp32",
            "compiled": compile_batch is not None,
            "preprocess": {
                "resize_mode": self.resize_mode,
                "interpolation": self.interpolation,
                "mean": [float(v) for v in self.mean.flatten()],
                "std": [float(v) for v in self.std.flatten()],
                "fill_color": self.fill_color,
            },
            "activation": self.activation,
            "activation_read_from": activation_at,
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
            "random_weights": False,
            **(provenance or {}),
        }

    # -----------------------------------------------------------------------------------------
    # Images
    # -----------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def view_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The part of a `height`x`width` frame the model sees after preprocessing, relative (x0, y0, x1, y1).

        The attention grid covers exactly this box (a centre crop for `shortest`; beyond the frame for `longest`).
        """
        th, tw = self.image_size
        if self.resize_mode == "squash":
            return (0.0, 0.0, 1.0, 1.0)
        nh, nw = self._resized_size(height, width)
        # The crop/pad window, in resized pixels, mapped back to relative frame coordinates.
        top, left = round((nh - th) / 2.0), round((nw - tw) / 2.0)
        return (left / nw, top / nh, (left + tw) / nw, (top + th) / nh)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        th, tw = self.image_size
        if self.resize_mode == "shortest" and th == tw:
            # torchvision's Resize(int): the short side becomes th, the long one int(th * long / short).
            if height <= width:
                return th, int(th * width / height)
            return int(th * height / width), th
        scale = max(th / height, tw / width) if self.resize_mode == "shortest" else min(th / height, tw / width)
        return round(height * scale), round(width * scale)

    def view(self, frames: Any) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) of any size -> what the model sees of them, uint8 (N, h, w, 3) on the device.

        The geometric half of open_clip's eval transform (resize mode and interpolation from the model's
        preprocess config), batched on the device; resizing happens in uint8 like the PIL pipeline. A frame
        already at the input size passes unchanged, so `preprocess(view(x)) == preprocess(x)`.
        """
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be a uint8 array of shape (N, H, W, 3); got {tuple(x.shape)} {x.dtype}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, H, W)
        N, _, H, W = x.shape
        th, tw = self.image_size
        interp = _INTERPOLATION.get(self.interpolation, InterpolationMode.BICUBIC)
        if N == 0:
            return torch.zeros(0, th, tw, 3, dtype=torch.uint8, device=self.device)
        if self.resize_mode == "squash":
            if (H, W) != (th, tw):
                x = TF.resize(x, [th, tw], interpolation=interp, antialias=True)  # (N, 3, th, tw)
        else:
            nh, nw = self._resized_size(H, W)
            if (nh, nw) != (H, W):
                x = TF.resize(x, [nh, nw], interpolation=interp, antialias=True)  # (N, 3, nh, nw)
            if nh < th or nw < tw:  # `longest`: pad to the target with the fill colour, centred
                ph, pw = max(th - nh, 0), max(tw - nw, 0)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=self.fill_color)
            x = TF.center_crop(x, [th, tw])  # (N, 3, th, tw)
        return x.permute(0, 2, 3, 1)  # (N, th, tw, 3)

    def preprocess(self, frames: Any) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) of any size -> normalised model input (N, 3, h, w) float32 on the device:
        `view`, then (x / 255 - mean) / std with the model's preprocess config."""
        x = self.view(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, h, w)
        return (x - self.mean) / self.std

    def encode(self, frames: Any, attention: bool = True, surgery: bool = False) -> dict[str, torch.Tensor]:
        """One forward pass over uint8 frames (N, H, W, 3).

        Returns, on the encoder's device:
        - `embedding`: (N, Dc) float32, L2-normalised pooled projected image embedding (`encode_image`);
        - `attention`: (N, h, w) float32, the last block's CLS→patch attention averaged over heads (the
          CLS→CLS entry is dropped, so a row sums to 1 minus it); only when `attention` is true;
        - `surgery`: (N, h, w) float32 in [-1, 1], CLIP Surgery's patch map (`_surgery_tokens`): the cosine of each
          patch's v-v path embedding with the image embedding; only when `surgery` is true.
        """
        if (attention or surgery) and not self.supports_attention:
            raise RuntimeError(
                f"clip-attention and clip-surgery saliency need a ViT CLIP with a CLS token; {self.model_name!r} is "
                f"not one ({self.attention_unsupported}); set saliency.method: spectral-residual"
            )
        pixels = self.preprocess(frames)  # (N, 3, h, w)
        if pixels.shape[0] == 0:  # open_clip cannot reshape an empty batch
            out = {"embedding": torch.zeros(0, self.dim, device=self.device)}
            for name, wanted in (("attention", attention), ("surgery", surgery)):
                if wanted:
                    out[name] = torch.zeros(0, *self.grid, device=self.device)
            return out
        visual = self.model.visual
        blocks = visual.transformer.resblocks if (attention or surgery) else []  # (a ViT: checked above)
        batch_first = visual.transformer.batch_first if (attention or surgery) else True
        captured: list[torch.Tensor] = []
        inputs: dict[int, torch.Tensor] = {}  # block index -> its input (N, T, D), the original path
        handles = []

        def attention_hook(module: ResidualAttentionBlock, args: tuple) -> None:
            x = args[0] if batch_first else args[0].transpose(0, 1)  # (N, T, D)
            captured.append(_cls_attention(module, x))

        def keep_input(i: int):
            def hook(module: ResidualAttentionBlock, args: tuple) -> None:
                inputs[i] = args[0] if batch_first else args[0].transpose(0, 1)  # (N, T, D)

            return hook

        if attention:
            handles.append(blocks[-1].register_forward_pre_hook(attention_hook))
        if surgery:
            first = max(len(blocks) - SURGERY_BLOCKS, 0)
            handles += [blocks[i].register_forward_pre_hook(keep_input(i)) for i in range(first, len(blocks))]
        try:
            with torch.inference_mode(), self._autocast():
                image = self.model.encode_image if handles else self._image  # hooks: eager (see compiled.py)
                emb = image(pixels)  # (N, Dc)
        finally:
            for handle in handles:
                handle.remove()
        out = {"embedding": F.normalize(emb.float(), dim=-1)}
        gh, gw = self.grid or (0, 0)
        if attention:
            att = captured[0]  # (N, T) with T = 1 + gh * gw
            out["attention"] = att[:, 1:].reshape(-1, gh, gw)  # (N, h, w)
        if surgery:
            with torch.inference_mode():
                tokens = _surgery_tokens(
                    visual, [blocks[i] for i in sorted(inputs)], [inputs[i] for i in sorted(inputs)]
                )
            # tokens: (N, P, Dc) L2-normalised
            out["surgery"] = (tokens @ out["embedding"][:, :, None])[..., 0].reshape(-1, gh, gw)  # (N, h, w)
        return out

    def encode_images(self, images: Any) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> (N, Dc) L2-normalised embeddings, no attention (fg/bg crops)."""
        return self.encode(images, attention=False)["embedding"]

    # -----------------------------------------------------------------------------------------
    # Text
    # -----------------------------------------------------------------------------------------

    def encode_text(self, class_names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """Zero-shot class embeddings (C, Dc): each template filled with each name, encoded in one batch,
        L2-normalised, averaged over templates and renormalised."""
        templates = tuple(templates)
        if not templates:
            raise ConfigError("encoders.clip.prompts: give at least one template such as 'a video of {}.'")
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ConfigError(
                f"encoders.clip.prompts: every template needs a '{{}}' for the class name; {bad} has none"
            )
        C, T = len(class_names), len(templates)
        if C == 0:
            return torch.zeros(0, self.dim, device=self.device)
        texts = [t.replace("{}", name) for name in class_names for t in templates]  # class-major, C * T
        tokens = self.tokenizer(texts).to(self.device)  # (C * T, context)
        with torch.inference_mode(), self._autocast():
            emb = self.model.encode_text(tokens)  # (C * T, Dc)
        emb = F.normalize(emb.float(), dim=-1).view(C, T, -1).mean(dim=1)  # (C, Dc)
        return F.normalize(emb, dim=-1)

    def provenance(self) -> dict:
        """What made these features: architecture, weights source, preset, sizes, library versions."""
        return copy.deepcopy(self._provenance)


# Where open_clip's transformer blocks keep their MLP activation: the image tower (VisionTransformer), else the
# text tower (CustomTextCLIP's `text`, CLIP's own `transformer`). timm image towers ignore `quick_gelu`.
_ACTIVATION_PATHS = (
    "visual.transformer.resblocks.0.mlp.gelu",
    "text.transformer.resblocks.0.mlp.gelu",
    "transformer.resblocks.0.mlp.gelu",
)


def _activation(model: torch.nn.Module) -> tuple[str, str | None]:
    """("quick_gelu" | "gelu" | another class name | "unknown", the module path it was read from)."""
    for path in _ACTIVATION_PATHS:
        try:
            act = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(act, QuickGELU):
            return "quick_gelu", path
        if isinstance(act, torch.nn.GELU):
            return "gelu", path
        return type(act).__name__.lower(), path
    return "unknown", None


def _attention_problem(visual: torch.nn.Module) -> str | None:
    """Why CLS→patch attention cannot be read from this image tower, or None when it can."""
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, not an open_clip VisionTransformer"
    if visual.attn_pool is not None:
        return "its ViT pools with an attentional pooler instead of the CLS token"
    if visual.pool_type != "tok":
        pooled = "the mean of the patch tokens (CLIPA-style)" if visual.pool_type == "avg" else "not pooled"
        return (
            f"its ViT pools with pool_type={visual.pool_type!r}, so the embedding is {pooled}, not the CLS token, "
            "and the CLS token's attention does not show what the embedding looked at"
        )
    blocks = visual.transformer.resblocks
    if not all(
        isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, torch.nn.MultiheadAttention) for b in blocks
    ):
        return "its ViT uses custom attention blocks (qk-norm / scaled cosine attention)"
    attn = blocks[-1].attn
    if attn.bias_k is not None or attn.add_zero_attn:
        return "its last attention block adds key biases or zero attention"
    return None


def _cls_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of the CLS query over all tokens in `block`.

    x: (N, T, D) the block's input. Returns (N, T) float32, rows summing to 1. Only the CLS row is
    computed (one query), so this costs a key projection, not a second pass through the block.
    """
    mha = block.attn
    N, T, D = x.shape
    nh = mha.num_heads
    hd = D // nh
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = block.ln_1(x.float())  # (N, T, D)
        if mha._qkv_same_embed_dim:
            wq, wk = mha.in_proj_weight[:D], mha.in_proj_weight[D : 2 * D]
        else:
            wq, wk = mha.q_proj_weight, mha.k_proj_weight
        bq = bk = None
        if mha.in_proj_bias is not None:
            bq, bk = mha.in_proj_bias[:D].float(), mha.in_proj_bias[D : 2 * D].float()
        q = F.linear(y[:, :1], wq.float(), bq).view(N, 1, nh, hd).transpose(1, 2)  # (N, nh, 1, hd)
        k = F.linear(y, wk.float(), bk).view(N, T, nh, hd).transpose(1, 2)  # (N, nh, T, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (N, nh, 1, T)
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]  # (N, T)


def _surgery_tokens(visual: VisionTransformer, blocks: list, inputs: list[torch.Tensor]) -> torch.Tensor:
    """CLIP Surgery's architecture surgery, read from the original path of one forward pass (no extra weights).

    Li et al., "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks" (arXiv 2304.05653;
    code xmed-lab/CLIP_Surgery): from the first surgered block on, a second path accumulates, per block, the block's
    attention with value-value self-attention (q = k = v, the block's own value and output projections, scale
    head_dim ** -0.5) applied to the ORIGINAL path's normalised tokens, and skips the MLP; its patch tokens go through
    `ln_post` and `proj`. blocks: the surgered blocks; inputs: their original-path inputs (N, T, D), in order.
    Returns the patch tokens (N, P, Dc), L2-normalised.
    """
    x = inputs[0].float()  # (N, T, D): the new path starts as the original one
    with torch.autocast(device_type=x.device.type, enabled=False):
        for block, x_ori in zip(blocks, inputs, strict=True):
            mha = block.attn
            N, T, D = x_ori.shape
            nh = mha.num_heads
            y = block.ln_1(x_ori.float())  # (N, T, D)
            wv = mha.in_proj_weight[2 * D :] if mha._qkv_same_embed_dim else mha.v_proj_weight
            bv = mha.in_proj_bias[2 * D :].float() if mha.in_proj_bias is not None else None
            v = F.linear(y, wv.float(), bv).view(N, T, nh, D // nh).transpose(1, 2)  # (N, nh, T, hd)
            a = F.scaled_dot_product_attention(v, v, v)  # (N, nh, T, hd): softmax(v v^T / sqrt(hd)) v
            a = a.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
            bo = mha.out_proj.bias.float() if mha.out_proj.bias is not None else None
            x = x + F.linear(a, mha.out_proj.weight.float(), bo)  # (N, T, D), no MLP on the new path
        tokens = visual.ln_post(x[:, 1:])  # (N, P, D)
        if visual.proj is not None:
            tokens = tokens @ visual.proj.float()  # (N, P, Dc)
    return F.normalize(tokens, dim=-1)
