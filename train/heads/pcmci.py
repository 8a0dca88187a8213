"""pcmci: Progressive Cross-Modal Causal Intervention (PCMCI) for long-term action recognition.

"Progressive Cross-Modal Causal Intervention for Long-Term Action Recognition", CVPR 2026 (CVF Open
Access); code https://github.com/xushaowu/PCMCI. Paper map (we worked from a detailed summary whose displayed
equations were lost, so the map names sections and symbols). Symbols: T0 (C, Dc) frozen CLIP class text,
VP (B, L, Dc) CLIP frames (the visual prompts), V (B, L, Dv) TimeSformer frames (the VLM-independent
encoder), d the head width.

The text state T (B, C, Dc) lives in CLIP's text space through the two text stages and starts as T0
(frozen: `learn_text: false`, the paper trains only the video side and the three modules); it is
projected to d (`TextQueries.proj`) where it meets the video: IVC's mediator and the inference queries.
The visual state V (B, L, d) is the temporal encoder's output over TimeSformer's V.

- Key design 1, **ICH**, the intervention on the co-occurrence *Hallucination* H (back-door on T):
  `S = <T, VP>` (B, C, L), cosines in CLIP space, and the entropic OT plan π (B, C, L) with uniform
  marginals on the cost 1 - S: `HallucinationIntervention.plan`; the proxies `H = C·π·VP` (B, C, Dc),
  one per class, the frames its text is (overly) aligned with: `HallucinationIntervention.hallucinate`;
  `P(Y | V, do(T)) ≈ Σ_h P(Y | V, do(T), h) P(h)` by NWGM, `T' = T + W_H Σ_h P(h) h`:
  `HallucinationIntervention.backdoor`. The summary leaves P(h) open; the default is a choice under which the
  plan can act (`ich_form: memory`, below); the reading P(h_c) = 1/C is `ich_form: mean_vp`, because that is
  what it computes.
- Key design 2, **ICI**, the intervention on the codependency *Illusion* I (back-door on T): the
  relation-aware transformer R with K relation bases `G_k = softmax(T W_q^k (T W_k^k)^T / √d_k)`
  (B, K, C, C), the proxies of I, and `T* = T' + Σ_k p_k G_k T' W_v^k` by NWGM with p = softmax(φ) over the
  K strata: `IllusionIntervention` (`RelationBases.relations` for G_k, `IllusionIntervention.strata` for p).
- Key design 3, **IVC**, the intervention on the *Visual Confounder* C (front-door on V, mediator M = T*):
  `P(Y | do(V)) = Σ_m P(m | V) Σ_v' P(v') P(Y | v', m)`. The hierarchical relation encoder F (isomorphic
  to R): frame relations, structurally aligned with the text's relations (below), `V_r = V + Σ_k p_k G^V_k V
  W_v^k`; `P(M = t*_c | v_l) = softmax_c(v_rl · t*_c / √d)` and the mediator `m_l = Σ_c P(t*_c | v_l) t*_c`
  (B, L, d); the sample term Σ_v' P(v') by attention from m over a dictionary of **V** (the VLM-independent
  features: `dictionaries.global_video`, source `timesformer/frame`) with its prior, x̂ = Σ_v' P(v' | m) v';
  by NWGM `V* = LN(m + x̂)` (`ivc_form: front_door`): the video's own V reaches Y only through the mediator,
  P(M | V), as the front-door formula has it: `VisualConfounderIntervention`.
- Loss & training, the cross-modal inference operator: attention with T* as queries and V* as keys/values,
  then a per-class readout (`ClassCrossAttention`, `ClassReadout`); the engine adds CE / BCE.
- The progressive order ICH -> ICI -> IVC is `order`; switched-off stages are not built (no parameters).

Deviations, each with its reason:
- **ICH with P(h) = 1/C is inert with respect to the plan.** With uniform marginals, Σ_c (1/C) h_c =
  Σ_c Σ_l π_cl VP_l = Σ_l (1/L) VP_l: the expectation over the proxies is the frame mean of VP, whatever π
  (exactly, at convergence: a column sum of the plan, which the last Sinkhorn update makes exact). The term
  varies across videos (it is the video's mean CLIP frame, re-injecting the VLM's features) but is the same
  for every class, ignores the transport, and takes no expectation over anything but the sample itself. That
  reading is kept as `ich_form: mean_vp` (variant `ich_mean_vp`), computed as what it is, the masked mean of
  VP, without running Sinkhorn. The default is a form in which π matters and the expectation runs over strata
  other than the sample:
  - `ich_form: memory` (default): a dataset-level set of hallucination strata H̄ (C, Dc), row j the running
    mean of class j's proxy over training batches (EMA, initialised to T0), a learned prior P(h̄_j) =
    softmax(θ)_j, and λ from the video's proxy of each class over the strata:
    `T'_c = T_c + W_H Σ_j w_cj h̄_j`, `w_cj ∝ λ_cj P(h̄_j)`, `log λ_cj = q(h_c) · k(h̄_j) / √d_k` (the
    λ·P form of ECRL's Eq. 6-7, renormalised). π enters through h_c = C Σ_l π_cl VP_l, which a different
    plan with the same column sums changes (tested).
  - `ich_form: attention` (variant `ich_attention`, ours): each class attends over the video's own proxies,
    `T'_c = T_c + W_H Σ_j w_cj h_j`, `w_cj = softmax_j(q(t_c) · k(h_j) / √d_k + log P(h_j))`, P(h_j) = 1/C:
    the plan acts, but the expectation stays within the sample.
- H: the summary writes `H = S VP` after solving OT on S; we read S there as the plan (the OT step is what
  exposes the "overly aligned" features) and scale by C so each h_c is a convex combination of frames.
  We do not renormalise π's rows: at convergence they sum to 1/C (the marginal error is reported).
- The cost scale and ε (the summary states neither): with fixed marginals the plan ignores any constant
  added to a row or a column of the cost, so only its doubly centred (interaction) part matters, and on
  CLIP cosines that part is small (on the demo cache its spread is ~0.1 while 1 - S spans ~1): 1 - S with
  ε = 0.1 spreads each class over 12.5 of 16 frames, min-max scaling to [0, 1] over 12.6 (flat, as the
  head before this change: 14-16). We divide the cost by the spread of its interaction part
  (`cost_scale: interaction`; `minmax` and `none` remain), so ε is in units of that spread, and take
  ε = 0.25: measured at initialisation on the demo cache's test_iid (C = 8 activities, L = 16, so L/C = 2
  frames per class is the hard-assignment bound), ε = 1 spreads a class over 12.3 frames, 0.5 over 9.0,
  0.25 over 6.1 (min 2.2) with marginal error 4e-6, 0.1 over 3.9 but Sinkhorn has not converged after 1000
  iterations (error 2e-4). ε was chosen on these diagnostics of the mechanism, never on accuracy. In the
  `mean_vp` form there is no plan (above); ε matters for `memory` and `attention`.
  `PCMCI.transport_report(batch)` gives the effective frames per class (exp of the entropy of C·π's rows)
  and the marginal error.
- Sinkhorn converges (`sinkhorn_tol` on the L1 marginal error, at most `sinkhorn_iters` iterations) without
  a graph. In the default order S has no gradient at all (frozen T0, cached VP). Where the cost is trainable
  (after ICI, order ICI -> ICH, or `learn_text`) π is differentiated implicitly through its marginal
  constraints (`sinkhorn_grad: implicit`, `train.heads.causal.implicit_plan`; equal to the gradient
  unrolled through every iteration, tested); `last_step` keeps the gradient of one Sinkhorn step from the
  converged potentials, the earlier form (cosine 0.85 to the converged gradient at ε = 0.05, 0.95 at 0.1 on
  a random cost, tests/train/test_causal.py). A plan returned at the iteration budget above `sinkhorn_tol` is
  logged once per run, with its marginal error.
- ICI's and ICH's maps act in CLIP's text space (width Dc) so that S = <T, VP> is the CLIP cosine whatever
  stage ran before; the paper's √d in G_k is our √d_k (`relation_dim`, the width of queries and keys).
- **Structural alignment** (`ivc_alignment: true`, our reading; the summary says F aligns visual relation
  structures with the text side and reports a gain from "structural alignment between visual and text
  relations"): F's frame relations are computed by ICI's relation bases (W_q^k, W_k^k, p) over each frame's
  text counterpart `Σ_c P(t_c | v_l) t_c` in CLIP space, so two frames relate as their texts relate under
  R; F keeps its own W_v^k. Without ICI in the head (V5) or with `ivc_alignment: false` F's relations come
  from the frames alone with F's own bases.
- **IVC's V* without the sample's own V** (`ivc_form: front_door`, the default): the front-door estimate
  `Σ_m P(m | V) Σ_v' P(v') P(Y | v', m)` lets the sample's V act on Y only by choosing the mediator; the
  NWGM form is `V* = LN(m + x̂(m))`, m = E_{m|v}[m] per frame, x̂ the bank's expectation queried by m (the
  summary prints the formula, not V*'s form). Our earlier reading `V* = LN(V_r + m + x̂)` (`ivc_form: residual`,
  variant `ivc_residual`) also gives Y the sample's V_r directly, a path the adjustment is meant to close;
  a run saved before the option existed is read back as `residual`. Measured (10 seeds, README): with ICH's
  T* the same for every video, the front-door V* is a bottleneck (each frame's mixture over C class vectors):
  −21.6 atomic iid mAP on the benchmark against the baseline; `ivc_residual` sits at the baseline. The
  summary's "V' = T(V, M)", a transformation of V conditioned on M, also reads as the residual form; we keep
  the formula's reading as the default and both as rows.
- **Mediator choice** (the paper's ablation, `ivc_mediator`): `text` (T*, the paper's), `memory` (a visual
  memory bank: the frames attend over the V dictionary's entries), `multiscale` (multi-scale temporal
  attention: frames attend within windows of ±1, ±2, ±4 frames, averaged over scales). The summary names
  these alternatives without their form; ours are the plainest instances.
- The paper trains TimeSformer with the stages; the cache freezes it (stage 2 never runs an encoder). Our
  trunk has one temporal layer by default (baseline: two): IVC's frame relations add a second.
- The same K (`relation_bases`) is used for ICI and F; the paper's K ablation may concern ICI only.
- **The paper's ICI is inert on frozen text where it runs first.** ICI reads only T: over the frozen T0 (V3, or
  any order that puts ICI before ICH) T* is one vector per class, the same for every video, a re-parametrised
  class embedding (`tests/train/test_heads_pcmci.py` checks it; its variation over test videos is 0). We keep the
  paper's form (`ici_form: paper`, strata weights p_k) and add ours beside it: `ici_form: video` (variants
  `ici_video`, `stages_v3_video`): the strata weights ∝ λ_bk p_k, renormalised, with log λ_bk = u_k · v̄P_b
  from the video's mean CLIP frame (the normalised λ·P form of ECRL's Eq. 6-7): R and its relation bases
  unchanged, the mixture over strata follows the video; IVC's aligned frame relations use the same weights.
  Measured on the benchmark cache (3 seeds, seed-0 diagnosis): alone (V3) its variation is 0.11 with knock-out
  0; in the full head it is -2.1 [-3.3, -0.7] atomic test_ood mAP against the paper's form.
- **IVC's sample term is flat at our scale.** With dot-product scores q·k/√d the bank attention stays at its
  prior for every video (on the benchmark cache, V5: entropy 0.965 of log K, variation 1e-4 of the term,
  knock-out 0): the weights sum to 1 over K entries and each one's gradient is ~1/K. The default keeps the
  plain scores (the summary gives the term no form beyond attention with the bank's prior); ours beside it:
  `ivc_bank_score: cosine` (variants `ivc_bank_cosine`, `stages_v5_cosine`), cos(q, k)/τ with a learned τ
  from 0.1, the renormalised cosine form of ECRL's `bd_normalised`. Measured: alone (V5) its variation is
  still 0.001; in the full head 0.56 (activity, seed 0), with no resolvable change in accuracy.

Beyond the paper: `visual: clip` (variant `clip_only`) feeds VP to the trunk instead of TimeSformer's V;
`ivc_dictionary: global` (variant `ivc_bank_clip`) runs IVC's sample bank over CLIP frames (which reopens the
VLM path IVC is meant to cut; the head before this change); `prior: uniform` (variant `prior_uniform`,
IVRD-style) weights IVC's bank uniformly; `learn_text: true` (variant `learn_text`) frees T.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extract.contract.config import ConfigError, bounds, predating
from train.heads.batch import Batch, HeadContext
from train.heads.causal import (
    SampleBankAttention,
    dictionary_prior,
    marginal_error,
    masked_softmax,
    nwgm_expectation,
    sinkhorn,
)
from train.heads.common import ClassCrossAttention, ClassReadout, TemporalEncoder, TextQueries, masked_mean
from train.heads.registry import CausalTerm, register_head

log = logging.getLogger(__name__)

Stage = Literal["ich", "ici", "ivc"]
SCALES = (1, 2, 4)  # the multi-scale mediator's temporal windows ±r (frames)


@dataclass(frozen=True)
class PCMCIOptions:
    dim: int = field(default=128, metadata=bounds(8))  # head width d of the visual state and the projected text
    layers: int = field(default=1, metadata=bounds(0, 24))  # temporal transformer layers over V (trunk; IVC adds F)
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of the trunk and the inference attention
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    learn_text: bool = False  # the paper: T = frozen CLIP text T0 (True: T learnable from T0, variant learn_text)
    visual: Literal["timesformer", "clip"] = "timesformer"  # V: TimeSformer features, or CLIP's VP (`clip_only`)
    ich: bool = True  # ICH: OT hallucination proxies + back-door on the text side
    ici: bool = True  # ICI: relation-aware layer over the C label embeddings
    ivc: bool = True  # IVC: frame relations + front-door with the text as mediator (needs `ivc_dictionary`)
    order: tuple[Stage, ...] = ("ich", "ici", "ivc")  # run order: a permutation of the enabled stages
    # memory: λ·P over dataset-level strata H̄ | mean_vp: P(h) = 1/C, i.e. the mean CLIP frame | attention (ours)
    ich_form: Literal["memory", "mean_vp", "attention"] = "memory"
    ici_form: Literal["paper", "video"] = "paper"  # strata weights p_k | ∝ λ_bk p_k from the video (ours)
    # OT cost 1 - S divided by the spread of its interaction part (what the plan sees) | min-max to [0, 1] | as is
    cost_scale: Literal["interaction", "minmax", "none"] = "interaction"
    sinkhorn_eps: float = field(default=0.25, metadata=bounds(1e-3))  # ε of the entropic OT plan π (cost units)
    sinkhorn_tol: float = field(default=1e-5, metadata=bounds(0.0))  # stop at this L1 marginal error
    sinkhorn_iters: int = field(default=1000, metadata=bounds(1, 100000))  # at most this many iterations
    # π's gradient where the cost is trainable: implicit (the converged plan's) | last_step (one Sinkhorn step's)
    sinkhorn_grad: Literal["implicit", "last_step"] = field(default="implicit", metadata=predating("last_step"))
    memory_momentum: float = field(default=0.9, metadata=bounds(0.0, 1.0))  # ich_form memory: EMA of H̄
    relation_bases: int = field(default=8, metadata=bounds(1, 64))  # K relation bases of ICI and of IVC's F
    relation_dim: int = field(default=32, metadata=bounds(1))  # d_k: width of each basis's queries and keys
    ivc_dictionary: str = "global_video"  # IVC's bank P(v'): a cache dictionary of V (timesformer/frame)
    ivc_mediator: Literal["text", "memory", "multiscale"] = "text"  # M: T* | visual memory bank | multi-scale
    # V* = LN(m + x̂(m)): V reaches Y only through M (front-door) | LN(v_r + m + x̂): also directly (ours, earlier)
    ivc_form: Literal["front_door", "residual"] = field(default="front_door", metadata=predating("residual"))
    ivc_alignment: bool = True  # F's frame relations through ICI's bases (structural alignment; needs ICI)
    prior: Literal["empirical", "uniform"] = "empirical"  # IVC's P(v') over its bank: N_i/N | 1/K (IVRD-style)
    ivc_bank_score: Literal["dot", "cosine"] = "dot"  # IVC's bank attention: q·k/√d | cos/τ, learned τ (ours)

    def __post_init__(self) -> None:
        enabled = [s for s in ("ich", "ici", "ivc") if getattr(self, s)]
        if sorted(self.order) != sorted(enabled):
            raise ConfigError(
                f"pcmci order {list(self.order)} must name each enabled stage exactly once, and no other: "
                f"the enabled stages are {enabled} (switch a stage off with `<stage>: false` and drop it from order)"
            )


def intervention(x: torch.Tensor, g: torch.Tensor, prior: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """Σ_k p_k G_k x W_v^k: x (B, N, d), G (B, K, N, N), p (K,) or per video (B, K), W_v (K, d, d) -> (B, N, d)."""
    xv = torch.einsum("bmd,kde->bkme", x, w_v)  # x W_v^k, (B, K, N, d)
    p = prior.to(x.dtype).expand(x.shape[0], -1)  # (B, K)
    return torch.einsum("bk,bknm,bkme->bne", p, g, xv)  # (B, N, d)


def propagate(x: torch.Tensor, g: torch.Tensor, prior: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """x + Σ_k p_k G_k x W_v^k (B, N, d); arguments as `intervention`'s."""
    return x + intervention(x, g, prior, w_v)


class RelationBases(nn.Module):
    """x + Σ_k p_k G_k x W_v^k with G_k = softmax(x W_q^k (x W_k^k)^T / √d_k): the relation transformer R.

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
        # the intervention Σ_k p_k G_k x W_v^k alone (B, N, d): the term `ltar diagnose` measures and knocks
        # out (the module's output x + ... also carries x, e.g. ICH's variation in T')
        self.term = nn.Identity()

    def reset_parameters(self) -> None:
        """The same draws as construction, for `initialise` (seeded by this module's name)."""
        d = self.w_q.shape[1]
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w, std=d**-0.5)
        nn.init.zeros_(self.prior_logits)

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
        return x + self.term(intervention(x, self.relations(x, mask), self.prior(), self.w_v))


class IllusionIntervention(RelationBases):
    """ICI: the back-door on the codependency illusion I, T* = T' + Σ_k w_k G_k T' W_v^k over the C labels.

    `paper`: w_k = p_k, the strata prior (the same for every video). `video` (ours): w_bk ∝ λ_bk p_k,
    renormalised, with log λ_bk = u_k · v̄P_b from the video's mean CLIP frame (unit norm): the strata are
    weighed per video as ECRL's Eq. 6-7 weighs its confounders, so the term varies where T' does not.
    """

    def __init__(self, dim: int, bases: int, key_dim: int, form: Literal["paper", "video"] = "paper"):
        super().__init__(dim, bases, key_dim)
        # log λ_k (u_k rows): a bias would shift every stratum's score equally and cancel in the softmax
        self.w_lambda = nn.Linear(dim, bases, bias=False) if form == "video" else None

    def strata(self, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The strata weights: vp (B, L, Dc), mask (B, L) -> p (K,) (paper) or ∝ λ_bk p_k (B, K) (video)."""
        p = self.prior()  # (K,)
        if self.w_lambda is None:
            return p
        w = mask.unsqueeze(-1).to(vp.dtype)  # (B, L, 1)
        mean = F.normalize((F.normalize(vp, dim=-1) * w).sum(1) / w.sum(1).clamp_min(1.0), dim=-1)  # v̄P (B, Dc)
        return (self.w_lambda(mean) + p.log()).softmax(-1)  # (B, K)

    def forward(self, x: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T' (B, C, Dc), the video's VP (B, L, Dc) and mask (B, L) -> T* (B, C, Dc)."""
        return x + self.term(intervention(x, self.relations(x), self.strata(vp, mask), self.w_v))


class HallucinationIntervention(nn.Module):
    """ICH: OT plan π between classes and frames on CLIP cosines, proxies H = C·π·VP, back-door on T by NWGM."""

    def __init__(self, t0: torch.Tensor, opts: PCMCIOptions):
        super().__init__()
        C, Dc = t0.shape
        self.opts = opts
        self.w_h = nn.Linear(Dc, Dc)  # W_H: the hallucination term into T's (CLIP text) space
        self.warned_unconverged = False  # `_unconverged` has logged
        self.scale = opts.relation_dim**-0.5
        if opts.ich_form in ("attention", "memory"):
            self.w_q = nn.Linear(Dc, opts.relation_dim)  # λ's query: t_c (attention) | the proxy h_bc (memory)
            self.w_k = nn.Linear(Dc, opts.relation_dim)  # λ's key: the proxy h_j (attention) | h̄_j (memory)
        if opts.ich_form == "memory":
            # H̄ (C, Dc): dataset-level hallucination set, row j = running mean of class j's proxy; starts at T0
            self.register_buffer("memory", t0.detach().float().clone())
            self.prior_logits = nn.Parameter(torch.zeros(C))  # θ, P(h̄_j) = softmax(θ)_j: learned class prior
            self.memory_updates = True  # False while auxiliary views pass through the head (train.grounding)

    def cost(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """1 - S, S = <T, VP> cosines: t (B, C, Dc), vp (B, L, Dc), mask (B, L) -> (B, C, L), fp32."""
        s = torch.einsum("bcd,bld->bcl", F.normalize(t.float(), dim=-1), F.normalize(vp.float(), dim=-1))  # S
        cost = 1.0 - s  # in [0, 2], (B, C, L)
        if self.opts.cost_scale == "none":
            return cost
        real = mask[:, None, :].expand_as(cost)  # (B, C, L)
        if self.opts.cost_scale == "minmax":
            low = cost.masked_fill(~real, torch.inf).amin((1, 2), keepdim=True)  # (B, 1, 1)
            high = cost.masked_fill(~real, -torch.inf).amax((1, 2), keepdim=True)  # (B, 1, 1)
            return ((cost - low) / (high - low).clamp_min(1e-6)).masked_fill(~real, 1.0)  # [0, 1] per video
        # interaction: with fixed marginals the plan ignores any constant added to a row or a column, so the
        # cost's scale is the spread of its doubly centred part; divide by it (ε is in units of that spread)
        w = real.to(cost.dtype)  # (B, C, L)
        n = mask.sum(1).clamp_min(1).to(cost.dtype)[:, None, None]  # L_valid (B, 1, 1)
        rows = (cost * w).sum(2, keepdim=True) / n  # (B, C, 1)
        cols = (cost * w).mean(1, keepdim=True)  # (B, 1, L)
        centred = (cost - rows - cols + rows.mean(1, keepdim=True)) * w  # (B, C, L)
        var = centred.square().sum((1, 2), keepdim=True) / (n * cost.shape[1])  # (B, 1, 1)
        # clamped before the root: a one-frame video has no spread, and sqrt's gradient at 0 is infinite
        spread = var.clamp_min(1e-12).sqrt()  # (B, 1, 1), the same values as sqrt(var).clamp_min(1e-6)
        return cost / spread  # the plan is that of the centred cost: same row/column shifts

    def plan(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """π: t (B, C, Dc), vp (B, L, Dc), mask (B, L) -> (B, C, L), rows 1/C, real columns 1/L_valid."""
        o = self.opts
        cost = self.cost(t, vp, mask)
        return sinkhorn(
            cost,
            o.sinkhorn_eps,
            o.sinkhorn_iters,
            mask,
            tol=o.sinkhorn_tol,
            unconverged=self._unconverged,
            grad=o.sinkhorn_grad,
        )

    def _unconverged(self, error: float) -> None:
        """Once per model (so once per run): the plan came back at the iteration budget, not converged."""
        if not self.warned_unconverged:
            self.warned_unconverged = True
            o = self.opts
            log.warning(
                "pcmci: Sinkhorn stopped at its budget of %d iterations with the plan's marginal error %.2g above "
                "sinkhorn_tol %.2g (ε = %g): π has not reached the tolerance; raise heads.pcmci.sinkhorn_iters or "
                "sinkhorn_eps if that error matters (warned once per run)",
                o.sinkhorn_iters,
                error,
                o.sinkhorn_tol,
                o.sinkhorn_eps,
            )

    def hallucinate(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, C, Dc), vp (B, L, Dc), mask (B, L) -> π (B, C, L), H = C·π·VP (B, C, Dc)."""
        plan = self.plan(t, vp, mask)  # (B, C, L)
        h = torch.einsum("bcl,bld->bcd", plan * plan.shape[1], vp.float())  # h_c: convex combination of frames
        return plan, h

    def backdoor(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """T' = T + W_H E_h[h] (NWGM): t (B, C, Dc), h (B, C, Dc) the video's proxies -> (B, C, Dc)."""
        B, C, _ = h.shape
        if self.opts.ich_form == "attention":  # ours: w_cj ∝ λ_cj P(h_j), λ from t_c over the video's proxies
            scores = torch.einsum("bce,bje->bcj", self.w_q(t), self.w_k(h)) * self.scale  # log λ, (B, C, C)
            w = (scores - torch.log(torch.tensor(float(C)))).softmax(-1)  # + log P(h_j) = log 1/C, (B, C, C)
            return t + self.w_h(nwgm_expectation(h.unsqueeze(1), w))  # Σ_j w_cj h_j, (B, C, Dc)
        memory = self.memory.to(h.dtype)  # ours: H̄ (C, Dc)
        lam = torch.einsum("bce,je->bcj", self.w_q(h), self.w_k(memory)) * self.scale  # log λ, (B, C, C)
        w = (lam + self.prior_logits.log_softmax(0).to(lam.dtype)).softmax(-1)  # ∝ λ_j P(h̄_j), (B, C, C)
        return t + self.w_h(nwgm_expectation(memory, w))  # T' = T + W_H E[h̄], (B, C, Dc)

    @torch.no_grad()
    def update_memory(self, h: torch.Tensor) -> None:
        """H̄ <- m H̄ + (1 - m) mean_b H_b: h (B, C, Dc). Out of place: the old H̄ is saved for backward."""
        self.memory = torch.lerp(self.memory, h.detach().float().mean(0), 1.0 - self.opts.memory_momentum)

    def forward(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """t (B, C, Dc), vp (B, L, Dc), mask (B, L) -> T' (B, C, Dc)."""
        if self.opts.ich_form == "mean_vp":  # Σ_c (1/C) h_c = the frame mean of VP for any plan: no Sinkhorn
            return t + self.w_h(masked_mean(vp.float(), mask)).unsqueeze(1)  # the same term for every class
        _, h = self.hallucinate(t, vp, mask)
        t_new = self.backdoor(t, h)
        if self.opts.ich_form == "memory" and self.training and self.memory_updates:
            self.update_memory(h)
        return t_new


class MultiScaleAttention(nn.Module):
    """The multi-scale mediator: frames attend within ±r frames for r in SCALES, averaged over the scales."""

    def __init__(self, dim: int):
        super().__init__()
        self.w_q, self.w_k, self.w_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """v (B, L, d), mask (B, L) -> (B, L, d)."""
        B, L, _ = v.shape
        pos = torch.arange(L, device=v.device)
        radius = torch.tensor(SCALES, device=v.device)  # (S,)
        window = (pos[:, None] - pos[None, :]).abs()[None] <= radius[:, None, None]  # (S, L, L)
        allowed = window[None] & mask[:, None, None, :]  # (B, S, L, L)
        scores = torch.einsum("bld,bmd->blm", self.w_q(v), self.w_k(v)) * self.scale  # (B, L, L)
        attn = masked_softmax(scores[:, None].expand(-1, len(SCALES), -1, -1), allowed)  # (B, S, L, L)
        return torch.einsum("bslm,bmd->bld", attn, self.w_v(v)) / len(SCALES)  # (B, L, d)


class VisualConfounderIntervention(nn.Module):
    """IVC: F = frame relations (aligned with the text's) + mediator, sample term over a V bank, V* by NWGM."""

    def __init__(self, opts: PCMCIOptions, bank_dim: int, aligned: bool):
        super().__init__()
        d, K = opts.dim, opts.relation_bases
        self.mediator_form = opts.ivc_mediator
        self.form = opts.ivc_form
        if aligned:  # relations from ICI's bases over the frames' text counterparts; F keeps its own W_v^k
            self.w_v = nn.Parameter(torch.randn(K, d, d) * d**-0.5)  # W_v^k (K, d, d), redrawn by reset_parameters
        else:
            self.frame_relations = RelationBases(d, K, opts.relation_dim)  # F, level 1: relations among frames
        if opts.ivc_mediator == "memory":
            self.memory_key, self.memory_value = nn.Linear(bank_dim, d), nn.Linear(bank_dim, d)
        elif opts.ivc_mediator == "multiscale":
            self.multiscale = MultiScaleAttention(d)
        self.bank = SampleBankAttention(d, bank_dim, d, opts.ivc_bank_score)  # Σ_v' P(v') over the V dictionary
        self.norm = nn.LayerNorm(d)
        self.scale = d**-0.5

    def reset_parameters(self) -> None:
        """F's own W_v^k when the relations are aligned (every submodule resets itself, `initialise`)."""
        if hasattr(self, "w_v"):
            nn.init.normal_(self.w_v, std=self.w_v.shape[1] ** -0.5)

    def mediator(self, v_r: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """m: v_r (B, L, d), t (B, C, d), mask (B, L), bank (Kg, Dg) -> (B, L, d)."""
        if self.mediator_form == "text":
            p_m = torch.einsum("bld,bcd->blc", v_r, t).mul(self.scale).softmax(-1)  # P(M = t*_c | v_l), (B, L, C)
            return torch.einsum("blc,bcd->bld", p_m, t)  # m_l = Σ_c P(t*_c | v_l) t*_c, (B, L, d)
        if self.mediator_form == "memory":
            keys, values = self.memory_key(bank), self.memory_value(bank)  # (Kg, d), (Kg, d)
            return torch.einsum("bld,kd->blk", v_r, keys).mul(self.scale).softmax(-1) @ values  # (B, L, d)
        return self.multiscale(v_r, mask)  # (B, L, d)

    def forward(
        self,
        v: torch.Tensor,
        t_clip: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor,
        bank: torch.Tensor,
        bank_prior: torch.Tensor,
        text_bases: IllusionIntervention | None,
        vp: torch.Tensor,
    ) -> torch.Tensor:
        """v (B, L, d), T (B, C, Dc) and its projection t (B, C, d), mask (B, L), bank (Kg, Dg), prior (Kg,),
        ICI's bases when aligned, the video's VP (B, L, Dc) for their strata weights -> V* (B, L, d)."""
        if text_bases is not None:
            p_t = torch.einsum("bld,bcd->blc", v, t).mul(self.scale).softmax(-1)  # P(t_c | v_l), (B, L, C)
            counterpart = torch.einsum("blc,bcd->bld", p_t, t_clip)  # each frame's text, CLIP space (B, L, Dc)
            g = text_bases.relations(counterpart, mask)  # G^V_k (B, K, L, L)
            p = text_bases.strata(vp, mask)  # R's strata weights, (K,) or per video (B, K)
            v_r = propagate(v, g, p, self.w_v)  # F level 1, aligned with R, (B, L, d)
        else:
            v_r = self.frame_relations(v, mask)  # F level 1 from the frames alone, (B, L, d)
        m = self.mediator(v_r, t, mask, bank)  # F level 2: E_{m|v}[m], (B, L, d)
        x_hat = self.bank(m, bank, bank_prior)  # Σ_v' P(v' | m) v', cross-sample, (B, L, d)
        if self.form == "front_door":  # Σ_m P(m | V) Σ_v' P(v') P(Y | v', m) by NWGM: V enters only through m
            return self.norm(m + x_hat)  # V* (B, L, d)
        return self.norm(v_r + m + x_hat)  # residual (ours): the sample's own v_r reaches Y directly, (B, L, d)


def _plan_rows(m: HallucinationIntervention, a: tuple, k: dict, o) -> tuple[torch.Tensor, torch.Tensor]:
    """ICH's plan π over the frames for each class: (B, C, L), real frames per video (B, 1); `mean_vp` weighs
    every real frame alike (its term is the frame mean), so its rows are uniform over the real frames."""
    t, vp, mask = a
    n = mask.sum(1, keepdim=True)  # (B, 1)
    if m.opts.ich_form == "mean_vp":
        return (mask / n.clamp_min(1)).unsqueeze(1).expand(-1, t.shape[1], -1).to(t.dtype), n
    return m.plan(t, vp, mask), n


TERMS = (
    CausalTerm("ich", "W_H Σ_h P(h) h", "ich.w_h", "ich", _plan_rows),
    CausalTerm("ici", "Σ_k p_k G_k T' W_v^k", "ici.term", "ici", lambda m, a, k, o: (m.relations(a[0]), None)),
    CausalTerm("ivc_bank", "Σ_v' P(v' | m) v'", "ivc.bank", "ivc.bank", lambda m, a, k, o: (m.weights(*a), None)),
)


@register_head(
    "pcmci",
    config=PCMCIOptions,
    terms=TERMS,
    variants={
        # the paper's stage table: V1 none, V2 ICH, V3 ICI (implied by "Variant 2 consistently outperforms
        # Variant 3"), V4 ICH+ICI, V5 IVC only; PCMCI = all three
        "stages_v1": {"ich": False, "ici": False, "ivc": False, "order": []},
        "stages_v2": {"ici": False, "ivc": False, "order": ["ich"]},
        "stages_v3": {"ich": False, "ivc": False, "order": ["ici"]},
        "stages_v4": {"ivc": False, "order": ["ich", "ici"]},
        "stages_v5": {"ich": False, "ici": False, "order": ["ivc"]},
        "stages_v3_video": {"ich": False, "ivc": False, "order": ["ici"], "ici_form": "video"},  # ours beside V3
        "stages_v5_cosine": {"ich": False, "ici": False, "order": ["ivc"], "ivc_bank_score": "cosine"},  # ours, V5
        # the paper's order table (ICH -> ICI -> IVC is the default)
        "order_ivc_ich_ici": {"order": ["ivc", "ich", "ici"]},
        "order_ici_ich_ivc": {"order": ["ici", "ich", "ivc"]},
        # the number of relation bases K
        "bases1": {"relation_bases": 1},
        "bases4": {"relation_bases": 4},
        "bases8": {"relation_bases": 8},
        "bases16": {"relation_bases": 16},
        # the paper's mediator choice: T* (the full head) vs a visual memory bank vs multi-scale attention,
        # and without the structural alignment of frame relations to text relations
        # the mediator rows read against `alignment_off`: with the alignment on, T* would still reach V* through
        # the aligned frame relations, and the row would not isolate the mediator
        "mediator_memory": {"ivc_mediator": "memory", "ivc_alignment": False},
        "mediator_multiscale": {"ivc_mediator": "multiscale", "ivc_alignment": False},
        "alignment_off": {"ivc_alignment": False},
        # ours, beside the paper's forms
        "ich_attention": {"ich_form": "attention"},  # each class attends over the video's proxies
        "ich_mean_vp": {"ich_form": "mean_vp"},  # P(h) = 1/C: T' = T + W_H mean_l VP_l, no plan
        "ici_video": {"ici_form": "video"},  # ICI's strata weighed per video (∝ λ_bk p_k): varies over frozen T0
        "ivc_bank_cosine": {"ivc_bank_score": "cosine"},  # IVC's bank by cosine / learned τ: its dot scores stay flat
        "ivc_bank_clip": {"ivc_dictionary": "global"},  # IVC's bank over CLIP frames (reopens the VLM path)
        "learn_text": {"learn_text": True},  # T learnable from T0
        "clip_only": {"visual": "clip"},  # VP as V, as the baseline's variant of that name
        "prior_uniform": {"prior": "uniform"},  # IVC's bank prior 1/K (IVRD-style, the grounding table)
        "ivc_residual": {"ivc_form": "residual"},  # V* = LN(v_r + m + x̂): the sample's V also reaches Y directly
    },
)
class PCMCI(nn.Module):
    """batch -> logits (B, C): T' = ICH(T0, VP), T* = ICI(T'), V* = IVC(V, T*), inference(T*, V*)."""

    @staticmethod
    def required_dictionaries(opts: PCMCIOptions) -> tuple[str, ...]:
        return (opts.ivc_dictionary,) if opts.ivc else ()

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
        self.text = TextQueries(ctx.t0, d, learnable=opts.learn_text)  # T (C, Dc) and its projection to d
        self.ich = HallucinationIntervention(ctx.t0, opts) if opts.ich else None
        self.ici = None
        if opts.ici:
            self.ici = IllusionIntervention(ctx.clip_dim, opts.relation_bases, opts.relation_dim, opts.ici_form)
        self.ivc = None
        if opts.ivc:
            bank = ctx.dictionaries.get(opts.ivc_dictionary)
            bank_dim = bank[0].shape[1] if bank is not None else ctx.video_dim
            self.ivc = VisualConfounderIntervention(opts, bank_dim, aligned=opts.ivc_alignment and opts.ici)
        self.pool = ClassCrossAttention(d, opts.attention_heads, opts.dropout)  # T* as queries, V* as keys/values
        self.readout = ClassReadout(ctx.num_classes, d)

    def forward(self, batch: Batch) -> torch.Tensor:
        B, L = batch.mask.shape
        vp, mask = batch.vp.float(), batch.mask  # VP (B, L, Dc)
        v = self.temporal((batch.v if self.opts.visual == "timesformer" else batch.vp).float(), mask)  # V (B, L, d)
        t = self.text.text.expand(B, -1, -1)  # T (B, C, Dc), CLIP text space
        for stage in self.opts.order:
            if stage == "ich":
                t = self.ich(t, vp, mask)  # T' (B, C, Dc)
            elif stage == "ici":
                t = self.ici(t, vp, mask)  # T* (B, C, Dc)
            else:
                bank, prior = batch.dictionaries[self.opts.ivc_dictionary]  # (Kg, Dg), P(v') (Kg,)
                prior = dictionary_prior(prior.float(), self.opts.prior)
                aligned = self.ici if self.opts.ivc_alignment else None
                v = self.ivc(v, t, self.text.proj(t), mask, bank.float(), prior, aligned, vp)  # V* (B, L, d)
        f = self.pool(self.text.proj(t), v, mask)  # inference: T* as queries over V*, (B, C, d)
        return self.readout(f)  # (B, C)

    @torch.no_grad()
    def transport_report(self, batch: Batch) -> dict[str, float]:
        """ICH's plan on T0 and a batch: effective frames per class (mean, min, of L_valid), marginal error."""
        if self.ich is None:
            return {}
        B = batch.mask.shape[0]
        plan = self.ich.plan(self.text.text.expand(B, -1, -1), batch.vp.float(), batch.mask)  # π (B, C, L)
        rows = plan / plan.sum(2, keepdim=True).clamp_min(1e-30)  # (B, C, L)
        entropy = -(rows * rows.clamp_min(1e-30).log()).sum(2)  # (B, C)
        frames = entropy.exp()  # effective number of frames each class's plan row spreads over
        return {
            "effective_frames": frames.mean().item(),
            "effective_frames_min": frames.min().item(),
            "frames": batch.mask.sum(1).float().mean().item(),
            "marginal_error": marginal_error(plan, batch.mask),
        }
