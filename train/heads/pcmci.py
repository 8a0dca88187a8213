"""pcmci: Progressive Cross-Modal Causal Intervention (seed paper 001), three stages over a shared state.

The head is the baseline trunk (temporal transformer over the TimeSformer features V, learnable text
queries T from T0, class cross-attention, per-class readout) with three intervention stages run in a
configurable order between the trunk and the readout. Every stage reads and writes one state:

    T: (B, C, d)  the text side (class embeddings), starts as the projected T0
    V: (B, L, d)  the visual side (frames), starts as the temporal encoder's output

and the constant inputs VP (B, L, Dc) and the frame mask (B, L). Stage contracts:

- **ICH** (intra-class hallucination, back-door on the text side) reads T and VP, writes T.
  `S = <T, VP>` is the cosine between each class embedding and each frame, with VP brought into the
  text space by the text projection itself (T = T0 W_t + b, VP_t = VP W_t + b: T0 and VP share CLIP's
  space, and the shared linear map keeps their geometry at initialisation); cost = 1 - S, in [0, 2].
  `π = sinkhorn(1 - S)` with uniform marginals (rows 1/C, real frames 1/L), log domain, fixed
  iterations, padded frames carry no mass. `H = C · π · VP` (B, C, Dc): π's rows sum to 1/C, so C·π's
  rows sum to 1 and each proxy h_c is a weighted average of the video's CLIP frames (the visual content
  class c's text transports to: what it "hallucinates" in this video). After a fixed number of
  iterations (the last one a column update) the rows sum to 1/C only approximately, so we divide π by
  its row sums instead of multiplying by C: the same at convergence, exact weighted averages always.
  Back-door: `P(Y | do(T)) = Σ_h P(Y | T, h) P(h)`, by NWGM `T' = T + W_H E_h[h]`. The expectation is over
  a *dataset-level* hallucination set, never the current sample's proxies alone: a memory `H̄ (C, Dc)`
  whose row j is the running mean (EMA over the training set, updated from every training batch,
  detached) of class j's proxy — E_x[H_j(x)], the hallucination class j attracts across the dataset —
  initialised to T0. Its prior `P(h̄_j) = softmax(θ)_j` is learned (a learned class prior over the set).
  As in ECRL's Eq. 6 the weights also carry a data-dependent attention λ (the sample's proxy h_bc as the
  query, the memory as keys), normalised with the prior in the NWGM form
  `w_j = λ_j P(h̄_j) / Σ_i λ_i P(h̄_i) = softmax_j(q(h_bc) · k(h̄_j) / √d_k + log P(h̄_j))`, so a one-hot prior
  gives exactly the single-entry term `T' = T + W_H h̄_k`. The current sample enters only through λ (and
  through the memory after the step): the set and the prior are dataset-level.
- **ICI** (inter-class interaction) reads and writes T: a relation-aware layer with K relation bases,
  `G_k = softmax(T W_q^k (T W_k^k)^T / √d_k)` (K, C, C) per sample, `T* = T + Σ_k p_k G_k T W_v^k`,
  `p = softmax(φ)` a learned prior over the K relation strata; vectorised over k.
- **IVC** (intra-video causal, front-door with the current text as the mediator M) reads V and T, writes V.
  `P(Y | do(V)) = Σ_m P(m | V) Σ_v' P(v') P(Y | v', m)`: the hierarchical relation encoder F is
  (1) the same relation layer as ICI over the L frames (masked): `V_r = V + Σ_k p_k G_k V W_v^k`, then
  (2) the alignment of the visual relations to the text side, `P(M = t_c | v_l) = softmax_c(v_rl · t_c / √d)`
  and the in-sample mediator `m_l = Σ_c P(t_c | v_l) t_c` (B, L, d); the sample term Σ_v' P(v') is
  cross-sample attention from m over the global dictionary G with its prior (SampleBankAttention);
  `V* = LN(V_r + m + x̂)` (NWGM: the two expectations enter as averaged features, CATT's IS + CS).
- **inference**: class cross-attention with T as queries and V as keys/values, per-class readout; the
  engine adds CE (activity) or BCE (atomic).

Beyond the paper: `visual: clip` (variant `clip_only`) feeds CLIP's VP to the trunk instead of
TimeSformer's V; `prior: uniform` (variant `prior_uniform`, IVRD-style) weights IVC's sample bank G
uniformly instead of by p(g).

Because ICH and ICI write T and IVC reads T as its mediator, the order changes the computation: ICH
after ICI transports T* instead of T, IVC before the text stages mediates with the raw T.
A switched-off stage is not built (no parameters) and must not appear in `order`.

Where we differ from DESIGN.md / the paper, or were unsure (the paper could not be consulted):
- DESIGN writes S and H per video as (C, L), (C, Dc); we batch them, (B, C, L), (B, C, Dc).
- The paper's exact prior over H is not known to us; the dataset-level EMA memory with a learned class
  prior is our reading of "expectation over the hallucination set" under DESIGN's back-door rule, and
  the λ attention (ECRL-style) is our addition so that the sample's transport plan reaches its output.
- The paper's √d in G_k: we scale by √d_k, the width of the relation queries/keys (`relation_dim`).
- The same K (`relation_bases`) is used for ICI and for IVC's frame relations; the paper's K ablation
  may concern ICI only.
- The stage table follows the paper's: V1 none, V2 ICH, V4 ICH+ICI, V5 IVC only, PCMCI all three; V3
  (ICI only) is not in the paper's table but implied by its "Variant 2 consistently outperforms Variant 3".
- The paper trains TimeSformer with the stages; the cache freezes it (DESIGN, "Where we differ"). Our
  trunk has one temporal layer by default (baseline: two): IVC's frame relations F add a second, and
  one training step stays near 60 ms on one CPU core at B=32, L=16, C=16 (about 80 ms with two layers).
- Equation numbers of the paper are not cited (we could not consult it); the comments name its symbols
  (S, π, H, W_H, G_k, p_k, T', T*, V*) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extract.config import ConfigError, bounds
from train.heads import Batch, HeadContext, register_head
from train.heads.causal import SampleBankAttention, dictionary_prior, masked_softmax, nwgm_expectation, sinkhorn
from train.heads.common import ClassCrossAttention, ClassReadout, TemporalEncoder, TextQueries

Stage = Literal["ich", "ici", "ivc"]


@dataclass(frozen=True)
class PCMCIOptions:
    dim: int = field(default=128, metadata=bounds(8))  # head width d of the text and visual states
    layers: int = field(default=1, metadata=bounds(0, 24))  # temporal transformer layers over V (trunk; IVC adds F)
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of the trunk and the inference attention
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    learn_text: bool = True  # T learnable from T0 (False: T = T0 frozen)
    visual: Literal["timesformer", "clip"] = "timesformer"  # V: TimeSformer features, or CLIP's VP (`clip_only`)
    ich: bool = True  # ICH: Sinkhorn hallucination proxies + back-door on the text side
    ici: bool = True  # ICI: relation-aware layer over the C label embeddings
    ivc: bool = True  # IVC: frame relations + front-door with the text as mediator (needs dictionary "global")
    order: tuple[Stage, ...] = ("ich", "ici", "ivc")  # run order: a permutation of the enabled stages
    sinkhorn_eps: float = field(default=0.1, metadata=bounds(1e-3))  # ε of the entropic OT plan π (cost in [0, 2])
    sinkhorn_iters: int = field(default=20, metadata=bounds(1, 1000))  # fixed, unrolled Sinkhorn iterations
    memory_momentum: float = field(default=0.9, metadata=bounds(0.0, 1.0))  # EMA of the hallucination memory H̄
    relation_bases: int = field(default=8, metadata=bounds(1, 64))  # K relation bases of ICI and of IVC's F
    relation_dim: int = field(default=32, metadata=bounds(1))  # d_k: width of each basis's queries and keys
    prior: Literal["empirical", "uniform"] = "empirical"  # IVC's P(v') over G: its N_i/N | 1/K (IVRD-style)

    def __post_init__(self) -> None:
        enabled = [s for s in ("ich", "ici", "ivc") if getattr(self, s)]
        if sorted(self.order) != sorted(enabled):
            raise ConfigError(
                f"pcmci order {list(self.order)} must name each enabled stage exactly once, and no other: "
                f"the enabled stages are {enabled} (switch a stage off with `<stage>: false` and drop it from order)"
            )


class RelationBases(nn.Module):
    """x + Σ_k p_k G_k x W_v^k with G_k = softmax(x W_q^k (x W_k^k)^T / √d_k): ICI's T* and IVC's F.

    x (B, N, d) over N items (classes or frames), optional mask (B, N) True = real item; K bases
    vectorised on a K axis; p = softmax(φ) (K,) the learned prior over relation strata.
    """

    def __init__(self, dim: int, bases: int, key_dim: int):
        super().__init__()
        self.w_q = nn.Parameter(torch.randn(bases, dim, key_dim) * dim**-0.5)  # W_q^k (K, d, d_k)
        self.w_k = nn.Parameter(torch.randn(bases, dim, key_dim) * dim**-0.5)  # W_k^k (K, d, d_k)
        self.w_v = nn.Parameter(torch.randn(bases, dim, dim) * dim**-0.5)  # W_v^k (K, d, d)
        self.prior_logits = nn.Parameter(torch.zeros(bases))  # φ, p = softmax(φ): uniform at start
        self.scale = key_dim**-0.5

    def prior(self) -> torch.Tensor:
        """p: (K,), sums to 1."""
        return self.prior_logits.softmax(0)

    def relations(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """G: x (B, N, d), mask (B, N) -> (B, K, N, N), rows summing to 1 over real items."""
        q = torch.einsum("bnd,kde->bkne", x, self.w_q)  # x W_q^k, (B, K, N, d_k)
        k = torch.einsum("bnd,kde->bkne", x, self.w_k)  # x W_k^k, (B, K, N, d_k)
        scores = torch.einsum("bkne,bkme->bknm", q, k) * self.scale  # (B, K, N, N)
        if mask is None:
            return scores.softmax(-1)
        return masked_softmax(scores, mask[:, None, None, :])  # padded items are never attended

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d), mask (B, N) or None -> (B, N, d)."""
        g = self.relations(x, mask)  # G_k, (B, K, N, N)
        xv = torch.einsum("bmd,kde->bkme", x, self.w_v)  # x W_v^k, (B, K, N, d)
        message = torch.einsum("k,bknm,bkme->bne", self.prior().to(x.dtype), g, xv)  # Σ_k p_k G_k x W_v^k
        return x + message  # T* = T' + Σ_k p_k G_k T' W_v^k, (B, N, d)


class IntraClassHallucination(nn.Module):
    """ICH: Sinkhorn plan π between classes and frames, proxies H = C·π·VP, NWGM back-door T' = T + W_H E[h]."""

    def __init__(self, t0: torch.Tensor, dim: int, key_dim: int, eps: float, iters: int, momentum: float):
        super().__init__()
        C, Dc = t0.shape
        self.eps, self.iters, self.momentum = eps, iters, momentum
        # H̄ (C, Dc): dataset-level hallucination set, row j = running mean of class j's proxy; starts at T0
        self.register_buffer("memory", t0.detach().float().clone())
        self.prior_logits = nn.Parameter(torch.zeros(C))  # θ, P(h̄_j) = softmax(θ)_j: learned class prior
        self.w_q = nn.Linear(Dc, key_dim)  # λ's query from the sample's proxy h_bc
        self.w_k = nn.Linear(Dc, key_dim)  # λ's key from the memory entry h̄_j
        self.w_h = nn.Linear(Dc, dim)  # W_H: the hallucination term into the text space
        self.scale = key_dim**-0.5
        self.memory_updates = True  # False while auxiliary views pass through the head (train.grounding)

    def prior(self) -> torch.Tensor:
        """P(h̄): (C,), sums to 1."""
        return self.prior_logits.softmax(0)

    def hallucinate(
        self, t: torch.Tensor, vp: torch.Tensor, vp_t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, C, d), vp (B, L, Dc), vp_t (B, L, d) = VP W_t + b, mask (B, L) -> π (B, C, L), H (B, C, Dc)."""
        s = torch.einsum("bcd,bld->bcl", F.normalize(t, dim=-1), F.normalize(vp_t, dim=-1))  # S = <T, VP>, (B, C, L)
        plan = sinkhorn((1.0 - s).float(), self.eps, self.iters, mask)  # π, cost 1 - S (fp32: log-domain), (B, C, L)
        rows = plan / plan.sum(2, keepdim=True).clamp_min(1e-12)  # C·π at convergence; exact row sums 1, (B, C, L)
        h = torch.einsum("bcl,bld->bcd", rows.to(vp.dtype), vp)  # H = C·π·VP: weighted averages of frames, (B, C, Dc)
        return plan, h

    def backdoor(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """T' = T + W_H Σ_j w_j h̄_j (NWGM): t (B, C, d), h (B, C, Dc) the sample's proxies -> (B, C, d)."""
        memory = self.memory.to(h.dtype)  # H̄ (C, Dc)
        lam = torch.einsum("bce,je->bcj", self.w_q(h), self.w_k(memory)) * self.scale  # log λ, (B, C, C)
        w = (lam + self.prior_logits.log_softmax(0).to(lam.dtype)).softmax(-1)  # ∝ λ_j P(h̄_j), (B, C, C)
        expectation = nwgm_expectation(memory, w)  # E_h[h] over the dataset-level set, (B, C, Dc)
        return t + self.w_h(expectation)  # T' = T + W_H E[h], (B, C, d)

    @torch.no_grad()
    def update_memory(self, h: torch.Tensor) -> None:
        """H̄ <- m H̄ + (1 - m) mean_b H_b: h (B, C, Dc). Out of place: the old H̄ is saved for backward."""
        self.memory = torch.lerp(self.memory, h.detach().float().mean(0), 1.0 - self.momentum)

    def forward(self, t: torch.Tensor, vp: torch.Tensor, vp_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """t (B, C, d), vp (B, L, Dc), vp_t (B, L, d), mask (B, L) -> T' (B, C, d)."""
        _, h = self.hallucinate(t, vp, vp_t, mask)
        t_new = self.backdoor(t, h)
        if self.training and self.memory_updates:
            self.update_memory(h)
        return t_new


class IntraVideoCausal(nn.Module):
    """IVC: F = frame relations + alignment to the text mediator, sample-bank term over G, V* by NWGM."""

    def __init__(self, dim: int, bases: int, key_dim: int, bank_dim: int):
        super().__init__()
        self.frame_relations = RelationBases(dim, bases, key_dim)  # F, level 1: relations among the L frames
        self.bank = SampleBankAttention(dim, bank_dim, dim)  # Σ_v' P(v') over the global dictionary G
        self.norm = nn.LayerNorm(dim)
        self.scale = dim**-0.5

    def forward(
        self, v: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, bank: torch.Tensor, bank_prior: torch.Tensor
    ) -> torch.Tensor:
        """v (B, L, d), t (B, C, d) the mediator, mask (B, L), bank G (Kg, Dg), prior (Kg,) -> V* (B, L, d)."""
        v_r = self.frame_relations(v, mask)  # F level 1, (B, L, d)
        p_m = torch.einsum("bld,bcd->blc", v_r, t).mul(self.scale).softmax(-1)  # P(M = t_c | v_l), (B, L, C)
        m = torch.einsum("blc,bcd->bld", p_m, t)  # F level 2: E_{m|v}[m], frames in the text's relations (B, L, d)
        x_hat = self.bank(m, bank.to(v.dtype), bank_prior)  # Σ_v' P(v' | m) v', cross-sample, (B, L, d)
        return self.norm(v_r + m + x_hat)  # V* (NWGM: in-sample + cross-sample expectations), (B, L, d)


@register_head(
    "pcmci",
    config=PCMCIOptions,
    variants={
        # the paper's stage table: V1 none, V2 ICH, V3 ICI (implied by "Variant 2 consistently outperforms
        # Variant 3"), V4 ICH+ICI, V5 IVC only; PCMCI = all three
        "stages_v1": {"ich": False, "ici": False, "ivc": False, "order": []},
        "stages_v2": {"ici": False, "ivc": False, "order": ["ich"]},
        "stages_v3": {"ich": False, "ivc": False, "order": ["ici"]},
        "stages_v4": {"ivc": False, "order": ["ich", "ici"]},
        "stages_v5": {"ich": False, "ici": False, "order": ["ivc"]},
        # the paper's order table (ICH -> ICI -> IVC is the default)
        "order_ivc_ich_ici": {"order": ["ivc", "ich", "ici"]},
        "order_ici_ich_ivc": {"order": ["ici", "ich", "ivc"]},
        # the number of relation bases K
        "bases1": {"relation_bases": 1},
        "bases4": {"relation_bases": 4},
        "bases8": {"relation_bases": 8},
        "bases16": {"relation_bases": 16},
        "clip_only": {"visual": "clip"},  # VP as V, as the baseline's variant of that name
        "prior_uniform": {"prior": "uniform"},  # G's prior 1/K (IVRD-style, the grounding table)
    },
)
class PCMCI(nn.Module):
    @staticmethod
    def required_dictionaries(opts: PCMCIOptions) -> tuple[str, ...]:
        return ("global",) if opts.ivc else ()

    def __init__(self, opts: PCMCIOptions, ctx: HeadContext):
        super().__init__()
        self.opts = opts
        d = opts.dim
        self.temporal = TemporalEncoder(
            ctx.video_dim if opts.visual == "timesformer" else ctx.clip_dim,
            d,
            opts.layers,
            opts.attention_heads,
            ctx.num_frames,
            opts.dropout,
        )
        self.text = TextQueries(ctx.t0, d, learnable=opts.learn_text)
        self.ich = (
            IntraClassHallucination(
                ctx.t0, d, opts.relation_dim, opts.sinkhorn_eps, opts.sinkhorn_iters, opts.memory_momentum
            )
            if opts.ich
            else None
        )
        self.ici = RelationBases(d, opts.relation_bases, opts.relation_dim) if opts.ici else None
        bank_dim = ctx.dictionaries["global"][0].shape[1] if opts.ivc and "global" in ctx.dictionaries else ctx.clip_dim
        self.ivc = IntraVideoCausal(d, opts.relation_bases, opts.relation_dim, bank_dim) if opts.ivc else None
        self.pool = ClassCrossAttention(d, opts.attention_heads, opts.dropout)  # T as queries, V as keys/values
        self.readout = ClassReadout(ctx.num_classes, d)

    def forward(self, batch: Batch) -> torch.Tensor:
        B, L = batch.mask.shape
        vp, mask = batch.vp.float(), batch.mask  # VP (B, L, Dc)
        v = self.temporal((batch.v if self.opts.visual == "timesformer" else batch.vp).float(), mask)  # V (B, L, d)
        t = self.text().expand(B, -1, -1)  # T (B, C, d)
        for stage in self.opts.order:
            if stage == "ich":
                t = self.ich(t, vp, self.text.proj(vp), mask)  # T' (B, C, d); VP in the text space (B, L, d)
            elif stage == "ici":
                t = self.ici(t)  # T* (B, C, d)
            else:
                bank, prior = batch.dictionaries["global"]  # G (Kg, Dg), P(v') (Kg,)
                v = self.ivc(v, t, mask, bank.float(), dictionary_prior(prior.float(), self.opts.prior))  # V* (B, L, d)
        f = self.pool(t, v, mask)  # inference: T as queries over V, (B, C, d)
        return self.readout(f)  # (B, C)
