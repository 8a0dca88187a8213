"""baseline: Text4Vis-like head, the common trunk of the paper heads.

After Wu, Sun, Ouyang, "Revisiting Classifier: Transferring Vision-Language Models for Video Recognition", AAAI
2023, https://arxiv.org/abs/2207.01297; code https://github.com/whwu95/Text4Vis (class text embeddings as the
classifier over temporally pooled frame features).

A temporal transformer over the TimeSformer frame features V (or the CLIP frame embeddings VP in the
`clip_only` variant; the foreground FG or the background BG CLIP features alone in `fg_only` / `bg_only`,
the bound rows: what the salient region alone, and the scene alone, predict), the class text embeddings T
(learnable, initialised from T0; frozen in `frozen_text`) as class queries that pool the frames by
cross-attention, and a per-class readout `logit_c = w_c · f_c + b_c`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from extract.contract.config import bounds
from train.heads.batch import Batch, HeadContext
from train.heads.common import ClassCrossAttention, ClassReadout, TemporalEncoder, TextQueries
from train.heads.registry import register_head


@dataclass(frozen=True)
class BaselineOptions:
    dim: int = field(default=128, metadata=bounds(8))  # head width
    layers: int = field(default=2, metadata=bounds(0, 24))  # temporal transformer layers
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of every attention layer
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    # frame features: V (TimeSformer), VP (CLIP), or only the foreground FG / background BG (CLIP; bound rows)
    visual: Literal["timesformer", "clip", "fg", "bg"] = "timesformer"
    learn_text: bool = True  # T learnable from T0 (False: T = T0 frozen)


@register_head(
    "baseline",
    config=BaselineOptions,
    variants={
        "frozen_text": {"learn_text": False},
        "clip_only": {"visual": "clip"},
        "fg_only": {"visual": "fg"},  # bound: the salient region alone
        "bg_only": {"visual": "bg"},  # bound: the scene alone (the shortcut's ceiling)
    },
)
class Baseline(nn.Module):
    def __init__(self, opts: BaselineOptions, ctx: HeadContext):
        super().__init__()
        self.opts = opts
        in_dim = ctx.video_dim if opts.visual == "timesformer" else ctx.clip_dim
        self.temporal = TemporalEncoder(
            in_dim, opts.dim, opts.layers, opts.attention_heads, ctx.num_frames, opts.dropout
        )
        self.text = TextQueries(ctx.t0, opts.dim, learnable=opts.learn_text)
        self.pool = ClassCrossAttention(opts.dim, opts.attention_heads, opts.dropout)
        self.readout = ClassReadout(ctx.num_classes, opts.dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = {"timesformer": batch.v, "clip": batch.vp, "fg": batch.fg, "bg": batch.bg}
        frames = inputs[self.opts.visual]  # (B, L, D)
        x = self.temporal(frames.float(), batch.mask)  # (B, L, dim)
        f = self.pool(self.text(), x, batch.mask)  # f_c: (B, C, dim)
        return self.readout(f)  # (B, C)
