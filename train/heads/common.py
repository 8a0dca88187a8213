"""Building blocks every head shares: the temporal encoder, text class queries, per-class readout, and the
initialisation that makes two rows of one head start from the same weights."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def initialise(model: nn.Module, seed: int) -> None:
    """Draw every submodule's initial weights from a generator seeded by (seed, its qualified name).

    Modules are built only when their switch is on, so with one global stream a row that adds a module shifts
    the draws of every module built after it: at one seed, the parameters two rows share would start from
    different weights, and their paired Δ would mix the mechanism with an initialisation effect. Here each
    module's `reset_parameters` (torch's layers; ours for the parameters they draw themselves) runs under its own
    seed, so a module's initial weights depend on the seed, its name and its shape only. Descendants are reset
    before their parents, so a parent that overrides a child's init (nn.MultiheadAttention zeroes its output
    bias) keeps the last word. `model.init_key(name)`, where defined, maps a name to the key it is seeded by
    (a grounding wrapper strips its `head.` prefix, so a head inside it starts as it does alone)."""
    key = getattr(model, "init_key", lambda name: name)
    modules = list(model.named_modules())
    for name, module in reversed(modules):  # every descendant before its ancestors
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if reset is None:
            continue
        digest = hashlib.blake2b(f"{seed}/{key(name)}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            reset()


class TemporalEncoder(nn.Module):
    """Project per-frame features, add learned temporal positions, self-attend with the frame mask."""

    def __init__(self, in_dim: int, dim: int, layers: int, heads: int, max_frames: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(max_frames, dim))
        self.reset_parameters()  # drawn here, before the layers, as a head built alone always drew it
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.norm = nn.LayerNorm(dim)

    def reset_parameters(self) -> None:
        """The temporal positions only (the layers reset themselves, `initialise`)."""
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, in_dim), mask: (B, L) True = real frame -> (B, L, dim)."""
        B, L, _ = x.shape
        h = self.proj(x) + self.pos[:L]  # (B, L, dim)
        if self.layers is not None:
            h = self.layers(h, src_key_padding_mask=~mask)  # (B, L, dim)
        return self.norm(h)


class TextQueries(nn.Module):
    """Class text embeddings T (learnable, initialised from T0, or frozen) projected to the head width."""

    def __init__(self, t0: torch.Tensor, dim: int, learnable: bool = True):
        super().__init__()
        if learnable:
            self.text = nn.Parameter(t0.detach().float().clone())  # T (C, Dc)
        else:
            self.register_buffer("text", t0.detach().float().clone())  # T = T0, frozen
        self.proj = nn.Linear(t0.shape[1], dim)

    def forward(self) -> torch.Tensor:
        """-> (C, dim)."""
        return self.proj(self.text)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D), mask: (B, L) -> (B, D), the mean over real frames."""
    w = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class ClassCrossAttention(nn.Module):
    """Each class query pools the frames: f_c = Attn(q = t_c, k = v = frames) -> (B, C, dim)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """queries: (C, dim) or (B, C, dim); frames: (B, L, dim); mask: (B, L) -> (B, C, dim)."""
        B = frames.shape[0]
        q = queries.expand(B, -1, -1) if queries.dim() == 2 else queries  # (B, C, dim)
        q = self.norm_q(q)
        out, _ = self.attn(q, frames, frames, key_padding_mask=~mask, need_weights=False)  # (B, C, dim)
        return self.norm_out(q + out)


class ClassReadout(nn.Module):
    """Per-class linear readout: logit_c = w_c · f_c + b_c, vectorised over classes."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=self.weight.shape[1] ** -0.5)
        nn.init.zeros_(self.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f: (B, C, dim) -> logits (B, C)."""
        return torch.einsum("bcd,cd->bc", f, self.weight) + self.bias
