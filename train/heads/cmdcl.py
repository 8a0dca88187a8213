"""cmdcl: Cross-Modal Dual-Causal Learning (CMDCL) for long-term action recognition.

Xu, Jia, Gao, Sun, Chang, Fan, "Cross-Modal Dual-Causal Learning for Long-Term Action Recognition",
arXiv:2507.06603 (2025), https://arxiv.org/abs/2507.06603; code https://github.com/xushaowu/CMDCL.

Paper map (Sec. 3.2). Symbols: T (C, Dc) learnable class texts from T0,
VP (B, L, Dc) CLIP frames, V (B, L, Dv) TimeSformer frames, τ one temperature for TCI and VCI.

- Eq. 2, bias-aware scores `S = softmax_l(v^P_l · t_c / τ)` (B, C, L): `TextualIntervention.scores`;
  bias embeddings `b_c = Σ_l S_cl v^P_l` (B, C, Dc), per video, with gradients: `TextualIntervention.bias`.
- Eq. 3, NWGM back-door as printed: `t'_c = h([t_c, b_c])` per video, T' (B, C, dim):
  `TextualIntervention.forward`. With h one linear map this is `t'_c = W_t t_c + W_b b_c(V)`: a function of the
  video's own bias embedding, with no expectation over a bias distribution, so nothing in it adjusts for P(B)
  (the paper calls h the approximator of P(B); no term of the printed form realises that). The form that does
  take an expectation over strata other than the sample is ours, `tci_form: memory` (below).
- Eq. 4-5 (and the V̂ of Eq. 5-6), H self-attention layers + LN over V: `VisualIntervention.encoder`
  (`TemporalEncoder`, `vci_layers` = H, Fig. 7a: 0, 2, 4, 6, 8, 10; H = 0 is projection, positions and LN);
  per-dimension scores `s_cld = softmax_l(v_ld t'_cd / τ)` (B, C, L, D) from each video's own t'_c:
  `VisualIntervention.scores`;
  `v̂_c = Σ_l s_cld v_ld` (B, C, D): `VisualIntervention.attend`.
- Eq. 6-8, front-door by NWGM as printed: `v'_c = g([t'_c, v̂_c])` (B, C, dim): `VisualIntervention.forward`.
  With g one linear map this is `v'_c = W_1 t'_c + W_2 v̂_c`: no P(M = t'_c | V) and no sum over other samples'
  V, so it is the video's own attended feature plus its text state (the paper calls g the approximator of
  P(M | V) and P(V = v̂); the printed form has neither). Ours, `vci_form: bank`, adds both explicitly.
- Eq. 9, classifier `Σ_d w_cd f(T', V')_cd + b_c`: `CMDCL.forward` with `ClassCrossAttention` (f; per-video
  queries T' (B, C, dim)) and `ClassReadout` (w, b).
- `frame_entropy_ratio`: entropy of S or s over the frames divided by log L (1 = uniform, 0 = one frame),
  for reports; `CMDCL.frame_entropies(batch)` gives both means.

Deviations from the paper, each with its reason:
- S uses cosine similarity (VP and T L2-normalised): VP is unit-norm in the cache but T drifts from unit
  norm while it learns, so a raw dot product would change τ's meaning during training.
- τ: the paper states no value. We keep today's TCI value 0.1 for both (on cosines it spreads S over a few
  frames; S and s share it as in the paper). For VCI the products v_ld t'_cd are small at initialisation
  (V is layer-normed, the mediator map starts small), so s starts close to uniform and sharpens as t' grows.
  Measured on the test's random batch at initialisation (L = 6): `frame_entropy_ratio` ≈ 0.50 for S and
  ≈ 0.87 for s. Runs can report both with `CMDCL.frame_entropies`; change `tau` if they sit near 0 or 1.
- t' (B, C, dim) is projected by a linear map (`VisualIntervention.mediator`) before the per-dimension
  scores: the paper multiplies t'_cd with v_ld directly, which needs T' and V in one space; the map lets
  the two modalities' coordinates align (both have width `dim` here).
- h and g are single linear maps on the concatenations (the paper leaves their form open).
- The Q-Former of the paper's classifier is replaced by one cross-attention layer of T' over V'
  (`ClassCrossAttention`), and f also adds v'_c itself (each class reads its own intervened feature).
- The input widths are projected to `dim` (T' = h(...) in R^dim; V through the encoder's projection).
- **One classifier in every Table 3 row.** Every row encodes V with the same H self-attention layers (one
  module, `visual`, so rows start from the same weights) and classifies with the same f: T' attends over the
  C tokens of V' and each class adds its own token. Without VCI (variant1/variant2) V' is one frame-mean token
  for every class, `v'_c = W x̄`; without TCI (variant1/variant3) T' = W T (a linear map), the same for every
  video. A row switched from its reference therefore changes its module and nothing else (before, VCI also
  changed the classifier from attending over L frames to attending over C tokens plus the `+ v'` skip).
- **Controls** (rows of table `cmdcl`): `tci_uniform` keeps TCI with S uniform over the real frames (b_c is the
  frame mean of VP for every class: VP enters, but not by class-conditioned attention); `vci_uniform` keeps
  VCI with s uniform (v̂_c is the frame mean: t'_c enters g, but the attention is not class-conditioned).
  TCI against `tci_uniform` measures the class-conditioned attention over VP; `tci_uniform` against Variant 3
  the extra input VP; likewise for VCI.
- Ours, not the paper's, as labelled variants:
  - `tci_form: memory` (variant `tci_memory`): a dataset-level bias memory of M prototypes (EMA / online
    k-means of the batch b_c, initialised from the confounder dictionary Z or randomly), a learned prior
    P(b) = softmax(π), `t'_c = h([t_c, Σ_i w_ci b_i])`, `w ∝ λ_ci P(b_i)`; T' is then the same for every
    video and VP enters only through the memory update. Needs the `confounder` dictionary (memory_init
    confounder). `memory_*`, `tci_attention` and `prior` act on it.
  - `vci_form: bank` (variant `vci_bank`): an explicit `P(M = t'_c | V)` softmax over classes from the
    frame mean and a cross-sample bank term `Σ_g P(g | v̂_c) g` over a dictionary G of VCI's own input V (with
    its prior), `v'_c = LN(g([C·P(M = t'_c | V) t'_c, v̂_c, x̂_c]))`. Needs `global_video` (TimeSformer V; `global`,
    CLIP frames, with `visual: clip`): a CLIP dictionary would re-open the VLM path VCI does not read.
  - `memory_bank` = both (the head before it was held to the paper); `prior_uniform` = both with every
    dictionary prior 1/K (IVRD-style; `prior` has no effect on the paper forms).
  - `visual: clip` (variant `clip_only`) feeds VP instead of TimeSformer's V.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extract.contract.config import bounds
from train.heads.batch import Batch, HeadContext
from train.heads.causal import BackdoorAttention, SampleBankAttention, dictionary_prior, masked_softmax
from train.heads.common import ClassCrossAttention, ClassReadout, TemporalEncoder, masked_mean
from train.heads.registry import CausalTerm, register_head


@dataclass(frozen=True)
class CMDCLOptions:
    dim: int = field(default=64, metadata=bounds(8))  # head width (T', V', the classifier); 64 keeps 6 VCI layers fast
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of every attention layer
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    visual: Literal["timesformer", "clip"] = "timesformer"  # V: TimeSformer features, or CLIP's VP (`clip_only`)
    tci: bool = True  # textual causal intervention (back-door, Eq. 2-3)
    vci: bool = True  # visual causal intervention (front-door, mediator T', Eq. 4-8)
    # controls (Table 3's rows read against them): the same module with its class-conditioned attention replaced
    # by a uniform one over the real frames: TCI's S (b_c = the frame mean of VP), VCI's s (v̂_c = the frame mean)
    tci_attention_uniform: bool = False
    vci_attention_uniform: bool = False
    vci_layers: int = field(default=6, metadata=bounds(0, 24))  # H: self-attention layers over V (also without VCI)
    tau: float = field(default=0.1, metadata=bounds(1e-3))  # τ of S (cosine / τ) and of s (v_ld t'_cd / τ)
    tci_form: Literal["paper", "memory"] = "paper"  # paper: t'_c = h([t_c, b_c]) per video | memory: ours
    vci_form: Literal["paper", "bank"] = "paper"  # paper: v'_c = g([t'_c, v̂_c]) | bank: ours (P(M|V), G)
    # the options below act on the `memory` / `bank` forms only (ours)
    memory_init: Literal["confounder", "random"] = "confounder"  # bias memory from Z (and p(z)) or random
    memory_size: int | None = field(default=None, metadata=bounds(1))  # M; null = Z's K (random: 32)
    memory_momentum: float = field(default=0.99, metadata=bounds(0.0, 1.0))  # EMA of the memory; 1 = frozen
    tci_attention: bool = True  # λ from t_c over the memory (False: the prior alone weights the entries)
    # dictionary priors: empirical N_i/N (Z's p(z) starts P(b), G's p(g) weights the bank) | uniform 1/K (IVRD-style)
    prior: Literal["empirical", "uniform"] = "empirical"


def visual_dim(opts: CMDCLOptions, ctx: HeadContext) -> int:
    """Width of the visual input V: Dv (TimeSformer) or Dc (CLIP frames)."""
    return ctx.video_dim if opts.visual == "timesformer" else ctx.clip_dim


def bank_dictionary(opts: CMDCLOptions) -> str:
    """The cache dictionary of `vci_form: bank`'s sample bank: samples of VCI's own input V (TimeSformer's
    `global_video`, or CLIP's `global` for `visual: clip`), so VCI never re-opens the CLIP path it does not read."""
    return "global_video" if opts.visual == "timesformer" else "global"


def frame_entropy_ratio(p: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy over the frames of a softmax over frames, divided by log L_b (L_b: video b's real frames).

    p: (B, ...) with the frame axis at `dim` (TCI's S (B, C, L): dim=-1; VCI's s (B, C, L, D): dim=2),
    mask (B, L) -> p's shape without `dim`; 1 = uniform over the real frames, 0 = one frame (and for
    videos with at most one real frame).
    """
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim)  # H(p) per distribution
    n = mask.sum(1).to(ent.dtype)  # (B,) real frames
    log_l = n.clamp_min(1).log().view(-1, *([1] * (ent.dim() - 1)))  # log L_b, broadcast over (B, ...)
    return torch.where(log_l > 0, ent / log_l.clamp_min(1e-12), torch.zeros_like(ent))


class TextualIntervention(nn.Module):
    """TCI (Eq. 2-3), the paper's form: T (C, Dc), VP (B, L, Dc) -> T' (B, C, dim), per video.

    `t'_c = h([t_c, b_c])` with `b_c = Σ_l S_cl v^P_l` of the same video, computed with gradients; h linear, so
    `t'_c = W_t t_c + W_b b_c(V)` (no expectation over P(B): see the paper map). No memory, prior or dictionary.
    """

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        Dc = ctx.clip_dim
        self.tau, self.uniform = opts.tau, opts.tci_attention_uniform
        self.h = nn.Linear(2 * Dc, opts.dim)  # h in Eq. 3

    def scores(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S = softmax_l(v^P_l · t_c / τ) (Eq. 2), cosine: t (C, Dc), vp (B, L, Dc), mask (B, L) -> (B, C, L);
        `tci_attention_uniform` (the control): S_cl = 1 / L_real, so b_c is the frame mean of VP for every c."""
        sim = torch.einsum("bld,cd->bcl", F.normalize(vp, dim=-1), F.normalize(t, dim=-1))  # (B, C, L)
        if self.uniform:
            sim = torch.zeros_like(sim)
        return masked_softmax(sim / self.tau, mask.unsqueeze(1))  # masked frames get 0

    @staticmethod
    def bias(scores: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        """b_c = Σ_l S_cl v^P_l (Eq. 2): scores S (B, C, L), vp (B, L, Dc) -> B (B, C, Dc)."""
        return scores @ vp  # (B, C, Dc)

    def forward(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (C, Dc), vp (B, L, Dc), mask (B, L) -> T' (B, C, dim) and S (B, C, L)."""
        s = self.scores(t, vp, mask)  # S (B, C, L)
        b = self.bias(s, vp)  # b_c (B, C, Dc), with gradients
        tc = t.unsqueeze(0).expand(b.shape[0], -1, -1)  # t_c per video, (B, C, Dc)
        return self.h(torch.cat([tc, b], -1)), s  # t'_c = h([t_c, b_c]), (B, C, dim)


class MemoryTextualIntervention(TextualIntervention):
    """TCI, ours (`tci_form: memory`), not the paper's: back-door over a dataset-level bias memory.

    T (C, Dc) -> T' (C, dim), the same for every video: `t'_c = h([t_c, Σ_i w_ci b_i])`, `w ∝ λ_ci P(b_i)`
    over M prototypes with a learned prior P(b) = softmax(π); the batch's b_c enter only through the EMA
    memory update (online k-means), never the expectation.
    """

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__(opts, ctx)
        Dc = ctx.clip_dim
        self.momentum = opts.memory_momentum
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
        self.random_memory = opts.memory_init != "confounder"  # drawn, not read from the cache: reset redraws it
        # π: P(b) = softmax(π); with `prior: uniform` fixed at 1/M (IVRD-style)
        self.prior_logits = nn.Parameter(prior_logits, requires_grad=opts.prior == "empirical")
        self.attn = BackdoorAttention(Dc, Dc, opts.dim) if opts.tci_attention else None  # λ from t_c
        self.memory_updates = True  # False while auxiliary views pass through the head (train.grounding)

    def reset_parameters(self) -> None:
        """A randomly initialised memory is redrawn (`initialise`); one read from the cache stays."""
        if self.random_memory:
            self.memory.copy_(F.normalize(torch.randn_like(self.memory), dim=-1))

    def prior(self) -> torch.Tensor:
        """P(b) over the memory entries -> (M,)."""
        return self.prior_logits.softmax(0)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w_ci ∝ λ_ci P(b_i), normalised over the memory: t (C, Dc) -> (C, M)."""
        p = self.prior()  # (M,)
        if self.attn is None:
            return p.expand(t.shape[0], -1)  # (C, M)
        w = self.attn.weights(t, self.memory) * p  # λ (C, M) × P(b)
        return w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    def expectation(self, t: torch.Tensor) -> torch.Tensor:
        """E_P(b)[b] by NWGM over the memory: t (C, Dc) -> (C, Dc)."""
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

    def forward(self, t: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (C, Dc), vp (B, L, Dc), mask (B, L) -> T' (C, dim) and S (B, C, L); training updates the memory."""
        with torch.no_grad():  # b_c reach the output only through the memory
            s = self.scores(t, vp, mask)  # S (B, C, L)
            if self.training and self.memory_updates:
                self.update_memory(self.bias(s, vp), mask.any(1))
        return self.h(torch.cat([t, self.expectation(t)], -1)), s  # t'_c = h([t_c, E[b]]), (C, dim)


class VisualIntervention(nn.Module):
    """VCI (Eq. 4-8): V (B, L, Dv), T' (B, C, dim) -> V' (B, C, dim), front-door with mediator M = T'.

    The paper's form: `v'_c = g([t'_c, v̂_c])`. `vci_form: bank` (ours, not the paper's) adds the explicit
    P(M = t'_c | V) softmax and the cross-sample bank term over the global dictionary G.
    """

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        dim = opts.dim
        self.tau, self.form, self.uniform = opts.tau, opts.vci_form, opts.vci_attention_uniform
        self.mediator = nn.Linear(dim, dim)  # t' projected to V's coordinates (ours) before s_cld
        if self.form == "bank":
            self.p_m = nn.Linear(dim, dim)  # P(M = t'_c | V): softmax_c(<W v̄, t'_c> / √d)
            bank_dim = ctx.dictionaries[bank_dictionary(opts)][0].shape[1]
            self.bank = SampleBankAttention(dim, bank_dim, dim)  # Σ_g P(g | v̂) g over G
            self.g = nn.Linear(3 * dim, dim)
            self.norm = nn.LayerNorm(dim)
        else:
            self.g = nn.Linear(2 * dim, dim)  # g in Eq. 8: v'_c = W_1 t'_c + W_2 v̂_c (see the paper map)

    def scores(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s_cld = softmax_l(v_ld t'_cd / τ) (Eq. 5): x (B, L, D), t (B, C, D), mask (B, L) -> (B, C, L, D)."""
        logits = torch.einsum("bld,bcd->bcld", x, t) / self.tau  # (B, C, L, D)
        if self.uniform:  # the control: s_cld = 1 / L_real, so v̂_c is the frame mean for every c
            logits = torch.zeros_like(logits)
        # a finite fill instead of masked_softmax's -inf + nan_to_num: two fewer passes over (B, C, L, D);
        # a video without a real frame then gets uniform weights instead of zeros (it has no evidence anyway)
        return logits.masked_fill(~mask[:, None, :, None], torch.finfo(logits.dtype).min).softmax(2)

    @staticmethod
    def attend(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """v̂_c = Σ_l s_cld v_ld (Eq. 5): scores s (B, C, L, D), x (B, L, D) -> V̂ (B, C, D)."""
        return torch.einsum("bcld,bld->bcd", scores, x)

    def mediator_prob(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(M = t'_c | V) (bank form, ours): x (B, L, D), t (B, C, D), mask (B, L) -> (B, C), summing to 1."""
        q = self.p_m(masked_mean(x, mask))  # (B, D)
        return (torch.einsum("bd,bcd->bc", q, t) * t.shape[-1] ** -0.5).softmax(-1)  # (B, C)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor,
        bank: torch.Tensor | None = None,
        bank_prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x = V^(H) (B, L, dim) (the head's H self-attention layers over V), mask (B, L), t = T' (B, C, dim)
        [, G (K, Dg), P(g) (K,)] -> V' (B, C, dim), s (B, C, L, D)."""
        tm = self.mediator(t)  # t' at V's coordinates, (B, C, dim)
        s = self.scores(x, tm, mask)  # s_cld, (B, C, L, dim)
        v_hat = self.attend(s, x)  # v̂_c, (B, C, dim)
        if self.form == "paper":
            return self.g(torch.cat([t, v_hat], -1)), s  # v'_c = g([t'_c, v̂_c]) (Eq. 8), (B, C, dim)
        C = t.shape[1]
        p_m = self.mediator_prob(x, tm, mask)  # P(M = t'_c | V), (B, C)
        x_hat = self.bank(v_hat, bank.float(), bank_prior.float())  # Σ_g P(g | v̂_c) g, (B, C, dim)
        med = (C * p_m).unsqueeze(-1) * t  # P(M = t'_c | V) t'_c, uniform P -> weight 1, (B, C, dim)
        return self.norm(self.g(torch.cat([med, v_hat, x_hat], -1))), s  # v'_c, (B, C, dim)


def _tci_scores(m, a: tuple, k: dict, o) -> tuple[torch.Tensor, torch.Tensor]:
    """TCI's S over the frames: (B, C, L), real frames per video (B, 1)."""
    return o[1], a[2].sum(1, keepdim=True)


def _vci_scores(m, a: tuple, k: dict, o) -> tuple[torch.Tensor, torch.Tensor]:
    """VCI's per-dimension scores s over the frames: (B, C, D, L), real frames per video (B, 1, 1)."""
    return o[1].movedim(2, -1), a[1].sum(1)[:, None, None]


TERMS = (
    CausalTerm("tci", "t'_c = h([t_c, b_c])", "tci.h", "tci", _tci_scores),
    CausalTerm("vci", "v'_c = g([t'_c, v̂_c])", "vci.g", "vci", _vci_scores),
)


@register_head(
    "cmdcl",
    terms=TERMS,
    config=CMDCLOptions,
    variants={
        "variant1": {"tci": False, "vci": False},
        "variant2": {"tci": True, "vci": False},
        "variant3": {"tci": False, "vci": True},
        # Table 3's controls: the module kept, its class-conditioned attention made uniform over the real frames
        "tci_uniform": {"tci_attention_uniform": True},  # b_c = the frame mean of VP: VP as an extra input only
        "vci_uniform": {"vci_attention_uniform": True},  # v̂_c = the frame mean: t' as g's extra input only
        **{f"vci_layers{h}": {"vci_layers": h} for h in (0, 2, 4, 6, 8, 10)},  # Fig. 7a's sweep
        "tci_memory": {"tci_form": "memory"},  # ours: the dataset-level bias memory in TCI
        "vci_bank": {"vci_form": "bank"},  # ours: P(M|V) softmax and the sample bank G in VCI
        "memory_bank": {"tci_form": "memory", "vci_form": "bank"},  # both of ours (the head before the paper form)
        "clip_only": {"visual": "clip"},  # VP as V, as the baseline's variant of that name
        # every dictionary prior 1/K (IVRD-style, the grounding table); priors exist in our forms only
        "prior_uniform": {"prior": "uniform", "tci_form": "memory", "vci_form": "bank"},
    },
)
class CMDCL(nn.Module):
    """batch -> logits (B, C): T' = TCI(T, VP), V' = VCI(V, T'), logits = readout(f(T', V')) (Eq. 9)."""

    def __init__(self, opts: CMDCLOptions, ctx: HeadContext):
        super().__init__()
        self.opts = opts
        dim = opts.dim
        self.text = nn.Parameter(ctx.t0.detach().float().clone())  # T (C, Dc), learnable from T0
        if opts.tci:
            tci = MemoryTextualIntervention if opts.tci_form == "memory" else TextualIntervention
            self.tci = tci(opts, ctx)
        else:
            self.text_proj = nn.Linear(ctx.clip_dim, dim)  # T' = W T without TCI
        # H self-attention layers + LN over V (Eq. 5's V^(H)), in every row under one name: Table 3's rows isolate
        # the modules, not depth, and start from the same encoder weights
        self.visual = TemporalEncoder(
            visual_dim(opts, ctx), dim, opts.vci_layers, opts.attention_heads, ctx.num_frames, opts.dropout
        )
        if opts.vci:
            self.vci = VisualIntervention(opts, ctx)
        else:  # V' without VCI: each class reads the same frame-mean token, v'_c = W x̄ (no t', no attention)
            self.frame_token = nn.Linear(dim, dim)
        self.interact = ClassCrossAttention(dim, opts.attention_heads, opts.dropout)  # f(T', V') (Eq. 9)
        self.readout = ClassReadout(ctx.num_classes, dim)  # Σ_d w_cd f_cd + b_c (Eq. 9)

    @staticmethod
    def required_dictionaries(opts: CMDCLOptions) -> tuple[str, ...]:
        memory = opts.tci and opts.tci_form == "memory" and opts.memory_init == "confounder"
        needs = ("confounder",) if memory else ()
        return needs + ((bank_dictionary(opts),) if opts.vci and opts.vci_form == "bank" else ())

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> logits (B, C), TCI's S (B, C, L) or None, VCI's s (B, C, L, D) or None."""
        vp, mask = batch.vp.float(), batch.mask  # VP (B, L, Dc), (B, L)
        v = (batch.v if self.opts.visual == "timesformer" else batch.vp).float()  # V (B, L, Dv or Dc)
        B = v.shape[0]
        S = s = None
        if self.opts.tci:
            t, S = self.tci(self.text, vp, mask)  # T' (B, C, dim) paper, (C, dim) memory
        else:
            t = self.text_proj(self.text)  # T' = W T, (C, dim)
        if t.dim() == 2:
            t = t.unsqueeze(0).expand(B, -1, -1)  # the same T' for every video, (B, C, dim)
        x = self.visual(v, mask)  # V^(H), (B, L, dim)
        if self.opts.vci:
            bank = bank_prior = None
            if self.opts.vci_form == "bank":
                bank, bank_prior = batch.dictionaries[bank_dictionary(self.opts)]  # G (K, Dg), P(g) (K,)
                bank_prior = dictionary_prior(bank_prior, self.opts.prior)
            v_prime, s = self.vci(x, mask, t, bank, bank_prior)  # V' (B, C, dim)
        else:
            v_prime = self.frame_token(masked_mean(x, mask)).unsqueeze(1).expand(-1, t.shape[1], -1)  # (B, C, dim)
        # f(T', V') (Eq. 9), the same classifier in every row: T' attends over the C tokens of V', and each class
        # also reads its own token
        f = self.interact(t, v_prime, torch.ones(v_prime.shape[:2], dtype=torch.bool, device=v.device)) + v_prime
        return self.readout(f), S, s  # (B, C)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch)[0]

    @torch.no_grad()
    def frame_entropies(self, batch: Batch) -> dict[str, float]:
        """Mean `frame_entropy_ratio` of TCI's S and VCI's s on a batch (the modules present), for reports."""
        _, S, s = self._forward(batch)
        out = {}
        if S is not None:
            out["tci"] = frame_entropy_ratio(S, batch.mask, -1).mean().item()
        if s is not None:
            out["vci"] = frame_entropy_ratio(s, batch.mask, 2).mean().item()
        return out
