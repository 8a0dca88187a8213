"""Encoder registry: `name -> builder`, modules imported lazily (torch, open_clip and timm are heavy).

Every encoder is frozen and exposes `encode(frames) -> dict of tensors` plus `provenance() -> dict`
(architecture, weights, preset, library versions), which the cache records.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:builder"; a builder takes the resolved `Config` and a torch device.
_ENCODERS: dict[str, str] = {
    "clip": "extract.encoders.clip:build_clip_encoder",
    "timesformer": "extract.encoders.timesformer:build_timesformer_encoder",
}


def encoder_names() -> list[str]:
    return sorted(_ENCODERS)


def build_encoder(name: str, cfg: Any, device: Any) -> Any:
    """Build a registered encoder; unknown names list the registered ones."""
    if name not in _ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; choose from {encoder_names()}")
    module, builder = _ENCODERS[name].split(":")
    return getattr(importlib.import_module(module), builder)(cfg, device)
