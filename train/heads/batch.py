"""What every head reads: the batch (B videos, L frames, C classes) and the context it sizes itself from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class HeadContext:
    """What a head may size and initialise itself from: read from the store, never from an encoder."""

    clip_dim: int  # Dc
    video_dim: int  # Dv
    num_frames: int  # L
    num_classes: int  # C
    multi_label: bool
    t0: torch.Tensor  # T0 (C, Dc): initial class text embeddings
    dictionaries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (K, D), (K,)


@dataclass
class Batch:
    """One batch as every head sees it (B videos, L frames, C classes)."""

    vp: torch.Tensor  # VP (B, L, Dc): CLIP frame embeddings
    v: torch.Tensor  # V (B, L, Dv): TimeSformer frame features
    fg: torch.Tensor  # FG (B, L, Dc): foreground crops
    bg: torch.Tensor  # BG (B, L, Dc): backgrounds
    mask: torch.Tensor  # (B, L) bool, True = real frame
    t0: torch.Tensor  # T0 (C, Dc): class-name text embeddings
    dictionaries: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (centroids (K, D), prior (K,))
    labels: torch.Tensor | None = None  # (B,) long or (B, C) float multi-hot
    ids: torch.Tensor | None = None  # (B,) long: each video's position in its split (None outside a split)

    def to(self, device: Any) -> Batch:
        move = lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return dataclasses.replace(
            self,
            vp=move(self.vp),
            v=move(self.v),
            fg=move(self.fg),
            bg=move(self.bg),
            mask=move(self.mask),
            t0=move(self.t0),
            dictionaries={k: (move(c), move(p)) for k, (c, p) in self.dictionaries.items()},
            labels=move(self.labels),
            ids=move(self.ids),
        )
