"""cmdcl: Cross-Modal Dual-Causal Learning for long-term action recognition (seed paper 000, CMDCL).

Three modules on the shared trunk (learnable class texts T from T0, per-class readout):

- TCI, textual causal intervention (back-door, Eq. 2-3). Bias-aware scores `S = softmax_l(VP_l · t_c / τ_t)`
  `(B, C, L)` and bias embeddings `b_c = Σ_l S_cl VP_l` `(B, C, Dc)` (Eq. 2) describe what the frames
  co-occurring with a class text look like. The bias set is dataset-level: a memory of M bias prototypes
  `B_mem (M, Dc)` with a learned prior `P(b) = softmax(π)`. The debiased text is
  `t'_c = h([t_c, E_P(b)[b]])` (Eq. 3) with the expectation taken inside the network (NWGM) over the memory,
  weighted by the prior and by an attention λ from t_c: `E_c = Σ_i w_ci b_i`, `w_ci ∝ λ_ci P(b_i)`.
  The current batch's `b_c` enter only through the memory update (an EMA of the bias embeddings assigned to
  their nearest prototype, i.e. online k-means), never the expectation itself; T' is therefore a property
  of the classes, not of the sample.
- VCI, visual causal intervention (front-door with mediator M = T', Eq. 4-8). `H` self-attention layers over
  V and a layer norm (Eq. 4); per-dimension scores `s_cld = softmax_l(v_ld t'_cd / τ_v)` and
  `v̂_c = Σ_l s_cld v_ld` (Eq. 5-6); the learned `P(M = t'_c | V)` (Eq. 7) and the sample-bank term
  `x̂_c = Σ_g P(g | v̂_c) g` over the global dictionary G with its prior (cross-sample attention, Eq. 8) are
  combined as `v'_c = LN(g([C·P(M = t'_c | V) t'_c, v̂_c, x̂_c]))`.
- Classifier (Eq. 9): a Q-Former-lite cross-attention of T' over V' (the per-class `v'_c` with VCI, the
  frames without), plus `v'_c` itself, read out per class `Σ_d w_cd f_cd + b_c`.

`tci` and `vci` switch the modules (the paper's Table 3: variant1-3); off removes their parameters.
`vci_layers` is H (the paper's Fig. 7a: 2, 4, 6, 8; 6 by default). Beyond the paper: `visual: clip`
(variant `clip_only`) feeds CLIP's VP instead of TimeSformer's V, and `prior: uniform` (variant
`prior_uniform`, IVRD-style) fixes P(b) at 1/M instead of learning it from Z's p(z), and weights the
sample bank G uniformly instead of by p(g).

Where we were unsure (the paper could not be consulted; this follows DESIGN.md and the issue):
- Equation numbers follow the issue's grouping (TCI Eq. 2-3, VCI Eq. 4-8, classifier Eq. 9); which of
  Eq. 4-8 is which term is our best mapping.
- The bias memory: we keep M prototypes updated by EMA of the batch bias embeddings (closest to "the bias
  set observed over the training data"), initialised from the confounder dictionary Z (background
  prototypes, the same CLIP space as b) or randomly; the prior P(b) is learned (softmax of a vector,
  initialised from Z's p(z) or uniform). The expectation weights are normalised (`w ∝ λ p`, summing to 1),
  unlike ECRL's unnormalised `Σ λ_i p_i z_i`, so a one-hot prior picks one memory entry.
- S uses cosine similarity (VP is L2-normalised in the cache, T drifts from unit norm while it learns) so τ_t
  keeps its meaning. t' is projected to V's width by a linear map before the per-dimension scores.
- How the front-door terms are combined: P(M = t'_c | V) is a softmax over the mediator values (the classes)
  from the frame mean of V; it is multiplied by C so a uniform P weights t'_c by 1. The sample-bank query
  is v̂_c (cross-sample attention as in front-door/causal attention).
- Without VCI the H self-attention layers go too (they belong to VCI, so Fig. 7a varies them); the frames
  are then only projected (plus positions and a layer norm), and the classifier attends over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extract.config import bounds
from train.heads import Batch, HeadContext, register_head
from train.heads.causal import BackdoorAttention, SampleBankAttention, dictionary_prior, masked_softmax
from train.heads.common import ClassCrossAttention, ClassReadout, TemporalEncoder, masked_mean


@dataclass(frozen=True)
class CMDCLOptions:
    dim: int = field(default=64, metadata=bounds(8))  # head width (T', V', the classifier); 64 keeps 6 VCI layers fast
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of every attention layer
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    visual: Literal["timesformer", "clip"] = "timesformer"  # V: TimeSformer features, or CLIP's VP (`clip_only`)
    tci: bool = True  # textual causal intervention (back-door over the bias memory)
    vci: bool = True  # visual causal intervention (front-door, mediator T')
    vci_layers: int = field(default=6, metadata=bounds(1, 24))  # H: self-attention layers over V in VCI
    tau_text: float = field(default=0.1, metadata=bounds(1e-3))  # τ of the bias-aware scores S (cosine / τ)
    tau_visual: float = field(default=1.0, metadata=bounds(1e-3))  # τ of the per-dimension VCI scores
    memory_init: Literal["confounder", "random"] = "confounder"  # bias memory from Z (and p(z)) or random
    memory_size: int | None = field(default=None, metadata=bounds(1))  # M; null = Z's K (random: 32)
    memory_momentum: float = field(default=0.99, metadata=bounds(0.0, 1.0))  # EMA of the memory; 1 = frozen
    tci_attention: bool = True  # λ from t_c over the memory (False: the prior alone weights the entries)
    # dictionary priors: empirical N_i/N (Z's p(z) starts P(b), G's p(g) weights the bank) | uniform 1/K (IVRD-style)
    prior: Literal["empirical", "uniform"] = "empirical"


def visual_dim(opts: CMDCLOptions, ctx: HeadContext) -> int:
    """Width of the visual input V: Dv (TimeSformer) or Dc (CLIP frames)."""
    return ctx.video_dim if opts.visual == "timesformer" else ctx.clip_dim


class TextualIntervention(nn.Module):
    """TCI (Eq. 2-3): T (C, Dc) -> debiased T' (C, dim) by back-door over a dataset-level bias memory."""

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        Dc = ctx.clip_dim
        self.tau, self.momentum = opts.tau_text, opts.memory_momentum
        if opts.memory_init == "confounder":
            z, p = ctx.dictionaries["confounder"]  # Z (K, Dz), p(z) (K,)
            if z.shape[1] != Dc:
                raise ValueError(f"cmdcl: the confounder dictionary has D = {z.shape[1]}, TCI needs Dc = {Dc}")
            if opts.memory_size not in (None, z.shape[0]):
                raise ValueError(
                    f"cmdcl: memory_size = {opts.memory_size} but memory_init = confounder gives K = {z.shape[0]}; "
                    "set memory_size to null or use memory_init = random"
                )
            memory = z.detach().float().clone()
            # P(b) starts at Z's p(z) (and is learned), or is uniform (IVRD-style uniform prototype prior)
            prior_logits = dictionary_prior(p.detach().float(), opts.prior).clamp_min(1e-6).log()
        else:
            M = opts.memory_size or 32
            memory, prior_logits = F.normalize(torch.randn(M, Dc), dim=-1), torch.zeros(M)
        self.register_buffer("memory", memory)  # B_mem (M, Dc): bias prototypes, EMA-updated
        # π: P(b) = softmax(π), the learned approximator of P(B); with `prior: uniform` fixed at 1/M (IVRD-style)
        self.prior_logits = nn.Parameter(prior_logits, requires_grad=opts.prior == "empirical")
        self.attn = BackdoorAttention(Dc, Dc, opts.dim) if opts.tci_attention else None  # λ from t_c
        self.h = nn.Linear(2 * Dc, opts.dim)  # h in Eq. 3
        self.memory_updates = True  # False while auxiliary views pass through the head (train.grounding)

    def prior(self) -> torch.Tensor:
        """P(b) over the memory entries -> (M,)."""
        return self.prior_logits.softmax(0)

    def scores(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S = softmax_l(VP_l · t_c / τ) (Eq. 2): t (C, Dc), vp (B, L, Dc), mask (B, L) -> (B, C, L)."""
        sim = torch.einsum("bld,cd->bcl", F.normalize(vp, dim=-1), F.normalize(t, dim=-1))  # (B, C, L)
        return masked_softmax(sim / self.tau, mask.unsqueeze(1))  # masked frames get 0

    @staticmethod
    def bias(scores: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        """b_c = Σ_l S_cl VP_l (Eq. 2): scores (B, C, L), vp (B, L, Dc) -> (B, C, Dc)."""
        return scores @ vp  # (B, C, Dc)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w_ci ∝ λ_ci P(b_i), normalised over the memory: t (C, Dc) -> (C, M)."""
        p = self.prior()  # (M,)
        if self.attn is None:
            return p.expand(t.shape[0], -1)  # (C, M)
        w = self.attn.weights(t, self.memory) * p  # λ (C, M) × P(b)
        return w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    def expectation(self, t: torch.Tensor) -> torch.Tensor:
        """E_P(b)[b] by NWGM over the memory (Eq. 3): t (C, Dc) -> (C, Dc)."""
        return self.weights(t) @ self.memory  # Σ_i w_ci b_i, (C, Dc)

    @torch.no_grad()
    def update_memory(self, bias: torch.Tensor, valid: torch.Tensor) -> None:
        """EMA (online k-means) of the bias embeddings b (B, C, Dc) of videos with real frames (B,) into the memory."""
        b = bias[valid].reshape(-1, bias.shape[-1]).float()  # (N, Dc)
        if b.numel() == 0 or self.momentum >= 1.0:
            return
        with torch.autocast(b.device.type, enabled=False):  # the memory stays fp32 under AMP
            sim = F.normalize(b, dim=-1) @ F.normalize(self.memory, dim=-1).T  # (N, M)
            onehot = F.one_hot(sim.argmax(1), self.memory.shape[0]).to(b.dtype)  # (N, M)
            counts = onehot.sum(0)  # (M,)
            means = (onehot.T @ b) / counts.clamp_min(1).unsqueeze(1)  # mean b per nearest entry, (M, Dc)
            ema = self.momentum * self.memory + (1 - self.momentum) * means  # (M, Dc)
            self.memory.copy_(torch.where((counts > 0).unsqueeze(1), ema, self.memory))  # unchosen entries stay

    def forward(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """t (C, Dc), vp (B, L, Dc), mask (B, L) -> T' (C, dim); training also updates the memory."""
        if self.training and self.memory_updates:
            with torch.no_grad():  # b_c reach the output only through the memory
                bias = self.bias(self.scores(t, vp, mask), vp)  # b_c, (B, C, Dc)
            self.update_memory(bias, mask.any(1))
        return self.h(torch.cat([t, self.expectation(t)], -1))  # t'_c = h([t_c, E[b]]), (C, dim)


class VisualIntervention(nn.Module):
    """VCI (Eq. 4-8): V (B, L, Dv), T' (C, dim), G (K, Dg) -> V' (B, C, dim), front-door with mediator T'."""

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        dim = opts.dim
        self.tau = opts.tau_visual
        self.encoder = TemporalEncoder(  # H self-attention layers + layer norm (Eq. 4)
            visual_dim(opts, ctx), dim, opts.vci_layers, opts.attention_heads, ctx.num_frames, opts.dropout
        )
        self.mediator = nn.Linear(dim, dim)  # t' projected to V's width (Eq. 5)
        self.p_m = nn.Linear(dim, dim)  # P(M = t'_c | V) (Eq. 7): softmax_c(<W v̄, t'_c> / √d)
        bank_dim = ctx.dictionaries["global"][0].shape[1]
        self.bank = SampleBankAttention(dim, bank_dim, dim)  # Σ_g P(g | v̂) g over G (Eq. 8)
        self.g = nn.Linear(3 * dim, dim)  # g in Eq. 8
        self.norm = nn.LayerNorm(dim)

    def scores(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s_cld = softmax_l(v_ld t'_cd / τ) (Eq. 5): x (B, L, D), t (C, D), mask (B, L) -> (B, C, L, D)."""
        logits = torch.einsum("bld,cd->bcld", x, t) / self.tau  # (B, C, L, D)
        # a finite fill instead of masked_softmax's -inf + nan_to_num: two fewer passes over (B, C, L, D);
        # a video without a real frame then gets uniform weights instead of zeros (it has no evidence anyway)
        return logits.masked_fill(~mask[:, None, :, None], torch.finfo(logits.dtype).min).softmax(2)

    @staticmethod
    def attend(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """v̂_c = Σ_l s_cld v_ld (Eq. 6): scores (B, C, L, D), x (B, L, D) -> (B, C, D)."""
        return torch.einsum("bcld,bld->bcd", scores, x)

    def mediator_prob(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(M = t'_c | V) (Eq. 7): x (B, L, D), t (C, D), mask (B, L) -> (B, C), summing to 1 over c."""
        q = self.p_m(masked_mean(x, mask))  # (B, D)
        return (q @ t.T * t.shape[1] ** -0.5).softmax(-1)  # (B, C)

    def forward(
        self, v: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, bank: torch.Tensor, bank_prior: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> V' (B, C, dim) and the encoded frames (B, L, dim)."""
        C = t.shape[0]
        x = self.encoder(v, mask)  # V after H self-attention layers, (B, L, dim)
        tm = self.mediator(t)  # t' at V's width, (C, dim)
        v_hat = self.attend(self.scores(x, tm, mask), x)  # v̂_c, (B, C, dim)
        p_m = self.mediator_prob(x, tm, mask)  # P(M = t'_c | V), (B, C)
        x_hat = self.bank(v_hat, bank.float(), bank_prior.float())  # Σ_g P(g | v̂_c) g, (B, C, dim)
        med = (C * p_m).unsqueeze(-1) * t  # P(M = t'_c | V) t'_c, uniform P -> weight 1, (B, C, dim)
        return self.norm(self.g(torch.cat([med, v_hat, x_hat], -1))), x  # v'_c, (B, C, dim)


@register_head(
    "cmdcl",
    config=CMDCLOptions,
    variants={
        "variant1": {"tci": False, "vci": False},
        "variant2": {"tci": True, "vci": False},
        "variant3": {"tci": False, "vci": True},
        **{f"vci_layers{h}": {"vci_layers": h} for h in (2, 4, 6, 8)},
        "clip_only": {"visual": "clip"},  # VP as V, as the baseline's variant of that name
        "prior_uniform": {"prior": "uniform"},  # every dictionary prior 1/K (IVRD-style, the grounding table)
    },
)
class CMDCL(nn.Module):
    """batch -> logits (B, C): T' = TCI(T), V' = VCI(V, T', G), logits = readout(f(T', V'))."""

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        self.opts = opts
        dim = opts.dim
        self.text = nn.Parameter(ctx.t0.detach().float().clone())  # T (C, Dc), learnable from T0
        if opts.tci:
            self.tci = TextualIntervention(opts, ctx)
        else:
            self.text_proj = nn.Linear(ctx.clip_dim, dim)  # T' = W T without TCI
        if opts.vci:
            self.vci = VisualIntervention(opts, ctx)
        else:  # frames only projected: the self-attention layers belong to VCI
            self.visual = TemporalEncoder(
                visual_dim(opts, ctx), dim, 0, opts.attention_heads, ctx.num_frames, opts.dropout
            )
        self.interact = ClassCrossAttention(dim, opts.attention_heads, opts.dropout)  # f(T', V') (Eq. 9)
        self.readout = ClassReadout(ctx.num_classes, dim)  # Σ_d w_cd f_cd + b_c (Eq. 9)

    @staticmethod
    def required_dictionaries(opts: CMDCLOptions) -> tuple[str, ...]:
        needs = ("confounder",) if opts.tci and opts.memory_init == "confounder" else ()
        return needs + (("global",) if opts.vci else ())

    def forward(self, batch: Batch) -> torch.Tensor:
        vp, mask = batch.vp.float(), batch.mask  # (B, L, Dc), (B, L)
        v = (batch.v if self.opts.visual == "timesformer" else batch.vp).float()  # V (B, L, Dv or Dc)
        B, L, _ = v.shape
        t = self.tci(self.text, vp, mask) if self.opts.tci else self.text_proj(self.text)  # T' (C, dim)
        if self.opts.vci:
            bank, bank_prior = batch.dictionaries["global"]  # G (K, Dg), P(g) (K,)
            v_prime, _ = self.vci(v, mask, t, bank, dictionary_prior(bank_prior, self.opts.prior))  # V' (B, C, dim)
            f = self.interact(t, v_prime, torch.ones(v_prime.shape[:2], dtype=torch.bool, device=v.device))
            f = f + v_prime  # each class also reads its own intervened feature, (B, C, dim)
        else:
            frames = self.visual(v, mask)  # (B, L, dim)
            f = self.interact(t, frames, mask)  # (B, C, dim)
        return self.readout(f)  # (B, C)
