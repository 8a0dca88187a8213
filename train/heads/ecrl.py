"""ecrl: Event-level Causal Representation Learning (ECRL), on cached features.

"Modeling Event-level Causal Representation for Video Classification", ACM Multimedia 2024,
https://doi.org/10.1145/3664647.3681547; code https://github.com/wyqcrystal/ECRL.

Paper map (Sec. 4, Eq. 1-15, Tables 3-5); the output is `S = S1 + S2` (Sec. 4.3):

- F2VCM (Sec. 4.1): three streams, frame (`VP`, or `V` with `visual: timesformer`), foreground `FG` (`s`)
  and background `BG` (`c`), each a small temporal encoder (`TemporalEncoder`: the cache freezes the paper's
  fine-tuned UniformerV2, so this takes its adaptive role). Cross-frame modelling (Eq. 2,
  `CrossFrameModelling`): context `F̄ = masked mean`, `w_l = softmax_l(⟨T_c(F̄), h_l⟩ / √D)` (H, the Hadamard
  inner product of the context generator's vector with each frame), `F = LN(W_o [Σ_l w_l h_l, F̄])`; the
  additive `softmax_l(w · tanh(W_f h_l + W_c F̄))` of earlier runs is `cfm_score: additive` (variant
  `cfm_additive`). The frame stream always has it (the base model's own temporal model).
- Table 3 (caption: "FCM: foreground only, without cross-frame modeling. BCM: background only, without
  cross-frame modeling; TSC: cross-frame modeling with background and foreground"): `fcm` adds the FG stream,
  `bcm` the BG stream, each pooled by the plain masked mean; `tsc` gives them Eq. 2's cross-frame modelling.
  Their fusion `J = Ψ([s, c])` (Eq. 6's `J = Ψ(s, c)`, a linear map over the streams present) gives
  `S1 = cls(J)`, added to the frame branch's `S2`. Rows: `modules_base`, `modules_fcm`, `modules_bcm`,
  `modules_fcm_bcm`, `modules_fcm_bcm_tsc`, `modules_fcm_bcm_bd`, `modules_fcm_bcm_tsc_bd`, `ecrl`.
- BD (Eq. 5-7, `BackdoorAttention` in train/heads/causal.py): `E_z[g1(z)] = Σ_i λ_i z_i P(z_i)` (Eq. 7) over
  the confounder dictionary Z with `P(z_i) = N_i / N`, `λ = softmax_i((W_c J)ᵀ(W_d z_i)/√d)` (dot product) or
  `softmax_i(w_tᵀ tanh(W_c J + W_d z_i))` (additive); `P(Y | do(V)) = W_a J + W_b E_z` (Eq. 6) -> `S1`.
  Table 4 (run, as in the paper, on the model without GLCA: its BD row equals Table 3's +TSC+BD row):
  `bd_lambda_off` (w/o λ: λ_i = 1), `bd_prior_off` (w/o P(z_i): P(z_i) = 1), `bd_additive`, reference
  `modules_fcm_bcm_tsc_bd`. Removing a factor sets it to 1 (`BackdoorAttention` says why, not 1/K). Without λ,
  E_z = Σ_i P(z_i) z_i is one vector for every video, so W_b E_z is a constant bias and the row is the +TSC row
  plus a bias: table `ecrl_lambda_tsc` reads it against `modules_fcm_bcm_tsc` too.
  Table 5 (without GLCA): `dict_random` (random features, no data: the cache dictionary `confounder_noise`;
  `dict_sampled`, ours, samples real backgrounds), `dict_average` (class means of *frame*
  features, the cache dictionary `confounder_average_frame`), `dict_background` (class-average backgrounds,
  `confounder_average`, what the public code ships), and the reference: Sec. 4.2.1's construction of Z
  (k-means++ and PCA over the background pool, each z_i its cluster's mean at the features' natural scale, the
  cache dictionary `confounder_paper`; deviations: the pool is every real frame's background, not one feature
  per training video; the paper states no PCA width (ours: `dictionaries.confounder_paper.pca`); the clusters
  are found in the PCA space and each z_i is its cluster's mean feature in Dc, as Sec. 4.2.1 defines it).
  Table 5's Background row scores what Table 3's +TSC+BD does, so it is the main model's Z: this construction
  is the head's default (`confounder_dictionary: confounder_paper`) and the reference row is
  `modules_fcm_bcm_tsc_bd`. Our k-means `confounder` (spherical, random seeding, no PCA: the features are
  L2-normalised), the head's Z before, is a labelled row (`dict_spherical`).
- GLCA (Eq. 8-15, `GlobalLocalCausalAttention`): local features `F_L` (the frame stream before pooling), global
  features `F_G` = a k-means-initialised, **trainable** dictionary G. Fusion `h = [W_v F_G, W_q F_L ⊙ W_k F_G]`
  and Eq. 15 `F_LG = φ(ReLU(W_h h + b_h) W_a + b_a) ⊙ F_G` (`GlcaAttention`, `scorer: mlp`): φ a softmax over
  the entries, the weights applied to F_G itself. Local-local `F_LL` has the same form over the video's own
  frames (the mediator estimate M, Eq. 14's f); local-global the Σ_v P(V = v | h(V)) term.
  `z_l = LN(W_o [F_L, F_LL, F_LG])` (F_LL "combined with F_L and F_LG", Sec. 4.2.2; without F_L, the earlier
  form, is `glca_combine: ll_lg`, variant `glca_ll_lg`), pooled by the frame stream's Eq. 2 -> `S2 = cls(F_VG)`.
- Classifier: a plain linear layer (`classifier: linear`; ECRL does not use label text). `classifier: text`
  (ours) scores `x · t_c + b_c` against class texts learnable from T0.

Variants of ours, beside the paper's form (never in place of it):
- `bd_form: normalised` (variant `bd_normalised`, a Table 4 row): Eq. 7's weights λ_i P(z_i) sum to ~1/K, so at
  our scale `E_z` is nearly the same vector for every video; normalised, `w_i = softmax_i(cos(W_c J, W_d z_i)/τ +
  log P(z_i))` (τ learned) and `E_z = Σ_i w_i z_i`, so the weights can concentrate with the video.
- `glca_scorer: linear` (variant `glca_linear`): `w_h · h` without the hidden ReLU layer and with values
  `W_v F_G`, the form this file had before; the `(B, L, Kg, D)` tensor `h` is never built (one matmul).
- `global_prior: true`: GLCA's global weights also multiplied by G's prior p(g_k) (off by default: not in Eq. 15).
- `prior_uniform`: every dictionary prior 1/K on the full head (the prior replaced, not Table 4's removal);
  `ivrd`: IVRD's intervention over class prototypes (the class means of the frame features) with a uniform
  P(z), attended from the video, in BD's place (the grounding table's IVRD row).

Deviations, on purpose: the frozen encoder (above); our saliency (CLIP attention, README "The cache");
GLCA's combination `W_o [F_L, F_LL, F_LG]` is our reading of F_LL "combined with" F_L and F_LG; `glca_chunk`
computes Eq. 15's scores over chunks of G's entries (recomputed in the backward pass) so the `(B, L, Kg, D)`
hidden tensor stays bounded at COIN scale; the result equals the unchunked one.
Two-step training (Sec. 4.3, "pre-train on raw video frames ..., then fine-tune the causal intervention
framework"): `frame_epochs: N` trains the frame stream and its classifier alone for N epochs (`set_epoch`,
called by the engine), then every module; the paper states no N, so one stage (0) is our default and the
`ecrl_paper` recipe (pipeline.yaml `recipes`) sets it.
From the public code (wyqcrystal/ECRL) we differ where it contradicts the paper: its GLCA takes a softmax over
a size-1 axis (every weight 1), draws one random dictionary row per sample even at test time and never trains
G; ours attends over all of G, is deterministic, and G trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from extract.contract.config import ConfigError, bounds
from train.heads.batch import Batch, HeadContext
from train.heads.causal import BackdoorAttention, dictionary_prior, masked_softmax
from train.heads.common import TemporalEncoder, TextQueries, masked_mean
from train.heads.registry import CausalTerm, register_head

GLOBAL_DICTIONARY = "global"  # the cache dictionary that initialises G


@dataclass(frozen=True)
class EcrlOptions:
    dim: int = field(default=128, metadata=bounds(8))  # D: head width of every stream
    layers: int = field(default=1, metadata=bounds(0, 24))  # temporal transformer layers of the frame stream
    # ... of the FG and BG streams (0: projection + positions; keeps a step cheap)
    stream_layers: int = field(default=0, metadata=bounds(0, 24))
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of every temporal attention layer
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    visual: Literal["clip", "timesformer"] = "clip"  # frame stream: VP (CLIP) or V (TimeSformer)
    classifier: Literal["linear", "text"] = "linear"  # the paper's linear layer | ours: scores against class texts
    learn_text: bool = True  # classifier: text only: T learnable from T0 (False: T = T0 frozen)
    fcm: bool = True  # FCM: foreground stream FG, pooled without cross-frame modelling (Table 3)
    bcm: bool = True  # BCM: background stream BG, pooled without cross-frame modelling (Table 3)
    tsc: bool = True  # TSC: cross-frame modelling (Eq. 2) over the foreground and background streams (Table 3)
    cfm_score: Literal["paper", "additive"] = "paper"  # Eq. 2's frame score: ⟨T_c(F̄), h_l⟩ | ours: additive tanh
    bd: bool = True  # BD: back-door over the confounder dictionary, S1 = cls(W_a J + W_b E_z) (Eq. 6-7)
    glca: bool = True  # GLCA: front-door global-local attention over the trainable G (Eq. 15)
    # Eq. 6-7 as printed | ours: renormalised, cosine / learned τ | Eq. 4 exactly over the K strata
    bd_form: Literal["paper", "normalised", "stratified"] = "paper"
    bd_attention: Literal["dot", "additive"] = "dot"  # λ: scaled dot product or additive attention (Table 4)
    use_lambda: bool = True  # λ from J (False: the factor removed, λ_i = 1), Table 4's "w/o λ"
    use_prior: bool = True  # Eq. 7's P(z_i) (False: the factor removed, P(z_i) = 1), Table 4's "w/o P(z_i)"
    prior: Literal["empirical", "uniform"] = "empirical"  # P(z_i): the dictionary's N_i/N or uniform 1/K (IVRD-style)
    # cache dictionary Z of BD: Sec. 4.2.1's (k-means++ and PCA, cluster means; Table 5: confounder_noise, ...)
    confounder_dictionary: str = "confounder_paper"
    glca_scorer: Literal["mlp", "linear"] = "mlp"  # Eq. 15's φ(ReLU(W_h h + b_h) W_a + b_a) | ours: w_h · h
    glca_chunk: int | None = field(default=None, metadata=bounds(1))  # Eq. 15 over this many G entries at a time
    global_prior: bool = False  # ours: GLCA's global weights also × G's prior p(g_k) (not in Eq. 15)
    glca_combine: Literal["paper", "ll_lg"] = "paper"  # F_VG from [F_L, F_LL, F_LG] (Sec. 4.2.2) | ours: [F_LL, F_LG]
    # the paper's two-step training: for the first N epochs only the frame stream trains (S = its classifier
    # on F_v, no GLCA, no FG/BG branch), then the whole model fine-tunes; 0 = one stage
    frame_epochs: int = field(default=0, metadata=bounds(0))

    def __post_init__(self) -> None:
        if self.bd and self.bd_form == "stratified" and not self.bcm:
            raise ConfigError(
                "heads.ecrl.bd_form = stratified sets the background stream to each confounder stratum (Eq. 4's "
                "C = f(V, z)); turn bcm on, it has no background to stratify without it"
            )
        if self.stream_layers > 0 and (self.fcm or self.bcm) and not self.tsc:
            raise ConfigError(
                f"heads.ecrl.stream_layers = {self.stream_layers} gives the foreground/background streams "
                "self-attention across frames, which Table 3's FCM / BCM rows exclude (\"without cross-frame "
                'modeling"); keep stream_layers: 0 for rows without tsc, or turn tsc on'
            )
        if (self.tsc or self.bd) and not (self.fcm or self.bcm):
            raise ConfigError(
                "heads.ecrl: tsc and bd act on the foreground/background streams; turn on fcm or bcm "
                "(or turn tsc and bd off, as the baseline row does)"
            )


class CrossFrameModelling(nn.Module):
    """Eq. 2: `w = φ(H(T_c(F̄), F_l))`, `F = ρ(Σ_l w_l F_l, F̄)` → (B, D).

    `score: paper`: the Hadamard inner product H of the context generator's vector T_c(F̄) (a linear map of the
    masked frame mean) with each frame, ⟨T_c(F̄), h_l⟩ / √D (the 1/√D is ours: it keeps the softmax φ out of
    saturation at any width); `score: additive` (ours, this file's earlier form): `w_s · tanh(W_f h_l + W_c F̄)`.
    ρ ("concat and linear") is `W_o [Σ w h, F̄]`, then LN."""

    def __init__(self, dim: int, score: Literal["paper", "additive"] = "paper"):
        super().__init__()
        self.score = score
        if score == "paper":
            self.t_c = nn.Linear(dim, dim)  # T_c: the context generator
        else:
            self.w_f = nn.Linear(dim, dim)  # frame term of the score
            self.w_c = nn.Linear(dim, dim, bias=False)  # context term of the score
            self.w_s = nn.Linear(dim, 1, bias=False)  # score vector
        self.w_o = nn.Linear(2 * dim, dim)  # ρ: projection of [weighted sum, context]
        self.norm = nn.LayerNorm(dim)

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, D), mask (B, L) -> frame weights w (B, L) (0 on masked frames), context F̄ (B, D)."""
        c = masked_mean(h, mask)  # F̄, (B, D)
        if self.score == "paper":
            scores = torch.einsum("bd,bld->bl", self.t_c(c), h) * h.shape[-1] ** -0.5  # ⟨T_c(F̄), h_l⟩, (B, L)
        else:
            scores = self.w_s(torch.tanh(self.w_f(h) + self.w_c(c).unsqueeze(1))).squeeze(-1)  # (B, L)
        return masked_softmax(scores, mask), c

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, D), mask (B, L) -> (B, D)."""
        alpha, c = self.weights(h, mask)
        pooled = torch.einsum("bl,bld->bd", alpha, h)  # Σ_l α_l h_l, (B, D)
        return self.norm(self.w_o(torch.cat([pooled, c], -1)))  # (B, D)


def _mlp_scores(qw: torch.Tensor, k: torch.Tensor, vw: torch.Tensor, w_h: nn.Linear, w_a: nn.Linear) -> torch.Tensor:
    """Eq. 15's scores `ReLU(W_h h + b_h) W_a + b_a` with `h_lm = [W_v k_m, W_q q_l ⊙ W_k k_m]`.

    qw = W_q q (B, L, D); k = W_k keys (M, D) or (B, M, D); vw = W_v keys, same shape -> (B, L, M).
    W_h h splits over h's halves: `W_h,v (W_v k_m)` is per key, only the Hadamard half is (B, L, M, D).
    """
    D = qw.shape[-1]
    w_v, w_qk = w_h.weight[:, :D], w_h.weight[:, D:]  # (H, D) each
    per_key = vw @ w_v.T + w_h.bias  # (M, H) or (B, M, H)
    had = qw.unsqueeze(-2) * k.unsqueeze(-3)  # W_q q_l ⊙ W_k k_m, (B, L, M, D)
    hidden = torch.relu(had @ w_qk.T + per_key.unsqueeze(-3))  # (B, L, M, H)
    return w_a(hidden).squeeze(-1)  # (B, L, M)


class GlcaAttention(nn.Module):
    """GLCA's attention unit (Eq. 15): weights `φ(ReLU(W_h h + b_h) W_a + b_a)` over the keys, applied to the
    keys themselves (`⊙ F_G`); `scorer: linear` (ours) scores `w_h · h` and weighs `W_v` keys instead."""

    def __init__(self, query_dim: int, key_dim: int, dim: int, scorer: str = "mlp", chunk: int | None = None):
        super().__init__()
        self.scorer, self.chunk, self.dim = scorer, chunk, dim
        self.w_q = nn.Linear(query_dim, dim, bias=False)  # W_q
        self.w_k = nn.Linear(key_dim, dim, bias=False)  # W_k
        self.w_v = nn.Linear(key_dim, dim, bias=False)  # W_v
        if scorer == "mlp":
            self.w_h = nn.Linear(2 * dim, dim)  # W_h, b_h: the hidden layer over h
            self.w_a = nn.Linear(dim, 1)  # W_a, b_a (b_a shifts every score alike: it cancels in φ, as printed)
        else:
            self.w_h = nn.Linear(2 * dim, 1, bias=False)  # w_h over h (a bias would cancel in the softmax)

    def scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q (B, L, Dq), keys (M, Dk) or (B, M, Dk) -> unnormalised scores (B, L, M)."""
        qw, k, vw = self.w_q(q), self.w_k(keys), self.w_v(keys)
        if self.scorer == "linear":
            D = self.dim
            w_val, w_qk = self.w_h.weight[0, :D], self.w_h.weight[0, D:]
            # w_h · h_lm = w_val · W_v k_m + Σ_d w_qk,d (W_q q_l)_d (W_k k_m)_d: one matmul, h never built
            return torch.matmul(qw * w_qk, k.transpose(-1, -2)) + (vw @ w_val).unsqueeze(-2)  # (B, L, M)
        M = keys.shape[-2]
        if self.chunk is None or self.chunk >= M:
            return _mlp_scores(qw, k, vw, self.w_h, self.w_a)
        parts = []
        for s in range(0, M, self.chunk):  # chunks of G's entries (not a loop over single entries)
            ks, vs = k[..., s : s + self.chunk, :], vw[..., s : s + self.chunk, :]
            if torch.is_grad_enabled():  # the (B, L, chunk, D) hidden tensor is recomputed in backward
                parts.append(checkpoint(_mlp_scores, qw, ks, vs, self.w_h, self.w_a, use_reentrant=False))
            else:
                parts.append(_mlp_scores(qw, ks, vs, self.w_h, self.w_a))
        return torch.cat(parts, -1)  # (B, L, M)

    def weights(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        log_prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, L, Dq); keys (M, Dk) shared or (B, M, Dk); key_mask (B, M); log_prior (M,)
        -> weights (B, L, M) summing to 1 over the (real) keys, and the values they weigh: the keys
        themselves (Eq. 15's `⊙ F_G`), or `W_v` keys with the linear scorer."""
        scores = self.scores(q, keys)  # (B, L, M)
        if log_prior is not None:
            scores = scores + log_prior  # × P(x'), renormalised by the softmax (ours, `global_prior`)
        values = keys if self.scorer == "mlp" else self.w_v(keys)  # (M, Dk | D) or (B, M, Dk | D)
        if key_mask is None:
            return scores.softmax(-1), values
        return masked_softmax(scores, key_mask.unsqueeze(1)), values

    def forward(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        log_prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> Σ_m weight_lm value_m, (B, L, Dk) (mlp) or (B, L, D) (linear)."""
        w, v = self.weights(q, keys, key_mask, log_prior)
        return w @ v  # (B, L, M) @ (M, Dv) or (B, M, Dv)


class GlobalLocalCausalAttention(nn.Module):
    """GLCA (front-door): local-local attention within the video (F_LL), local-global over all of G (F_LG)."""

    def __init__(
        self,
        dim: int,
        global_dim: int,
        scorer: str = "mlp",
        chunk: int | None = None,
        combine: Literal["paper", "ll_lg"] = "paper",
    ):
        super().__init__()
        self.local_local = GlcaAttention(dim, dim, dim, scorer)  # mediator estimate within the sample
        self.local_global = GlcaAttention(dim, global_dim, dim, scorer, chunk)  # Σ_v P(V = v | h(V)) over G
        lg_dim = global_dim if scorer == "mlp" else dim  # F_LG lives in G's space with Eq. 15's `⊙ F_G`
        self.combine = combine
        width = dim + lg_dim + (dim if combine == "paper" else 0)
        self.w_o = nn.Linear(width, dim)  # F_VG: [F_L, F_LL, F_LG] (Sec. 4.2.2) | ours: [F_LL, F_LG]
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, f_l: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, log_prior: torch.Tensor | None
    ) -> torch.Tensor:
        """f_l: F_L (B, L, D), g: G (Kg, Dg), mask (B, L), log_prior (Kg,) or None -> (B, L, D)."""
        ll = self.local_local(f_l, f_l, key_mask=mask)  # F_LL, (B, L, D)
        lg = self.local_global(f_l, g, log_prior=log_prior)  # F_LG, (B, L, Dg or D)
        parts = [f_l, ll, lg] if self.combine == "paper" else [ll, lg]  # F_LL "combined with F_L and F_LG"
        return self.norm(self.w_o(torch.cat(parts, -1)))  # F_VG, (B, L, D)


class NormalisedBackdoor(nn.Module):
    """Ours (`bd_form: normalised`): `E_z = Σ_i w_i z_i`, `w_i = softmax_i(cos(W_c J, W_d z_i) / τ + log P(z_i))`.

    Eq. 7's structure (attention weights × prior over Z) renormalised so the weights sum to 1, with a learned
    temperature so their sharpness, and so E_z's dependence on the video, can grow. `use_lambda: false` leaves
    the prior alone; `use_prior: false` a uniform prior."""

    def __init__(self, query_dim: int, z_dim: int, dim: int, use_lambda: bool = True, use_prior: bool = True):
        super().__init__()
        self.use_lambda, self.use_prior = use_lambda, use_prior
        self.w_c = nn.Linear(query_dim, dim) if use_lambda else None  # W_c
        self.w_d = nn.Linear(z_dim, dim, bias=False) if use_lambda else None  # W_d
        self.log_tau = nn.Parameter(torch.tensor(-2.3)) if use_lambda else None  # τ = exp(log τ), starts at 0.1

    def weights(self, query: torch.Tensor, z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """query (B, Dq), z (K, Dz), prior (K,) -> w (B, K) summing to 1."""
        p = prior if self.use_prior else torch.full_like(prior, 1.0 / prior.numel())
        scores = p.clamp_min(1e-12).log().expand(query.shape[0], -1)  # log P(z_i), (B, K)
        if self.use_lambda:
            cos = F.normalize(self.w_c(query), dim=-1) @ F.normalize(self.w_d(z), dim=-1).T  # (B, K)
            scores = scores + cos / self.log_tau.exp()
        return scores.softmax(-1)

    def forward(self, query: torch.Tensor, z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """query (B, Dq), z (K, Dz), prior (K,) -> E_z (B, Dz)."""
        return self.weights(query, z, prior) @ z  # Σ_i w_i z_i


class StratifiedBackdoor(nn.Module):
    """Ours (`bd_form: stratified`), Eq. 4 computed exactly over the K strata of Z, not through Eq. 7's NWGM:
    `P(Y | do(V)) = Σ_i P(Y | s, C = f(V, z_i)) P(z_i)` with `f(V, z_i) = W_z z_i`, the background stream's
    feature set to stratum i (the video's own background c does not reach S1; it is what is intervened on).
    `S1 = log Σ_i P(z_i) softmax(cls_1(Ψ([s, W_z z_i])))`: probabilities averaged outside the softmax, so S1 is a
    log-probability (single label; CE of S1 + S2 is that of their product). Multi-label: the per-class
    probabilities σ(·) are averaged and S1 is their logit. Vectorised over the strata (K ≤ 512 on cached
    features: a (B, K, C) tensor)."""

    def __init__(self, z_dim: int, dim: int, slot: int, multi_label: bool):
        super().__init__()
        self.w_z = nn.Linear(z_dim, dim)  # f: a stratum z_i as the background stream's feature
        self.slot, self.multi_label = slot, multi_label  # the background's position among the streams

    def forward(
        self, feats: list, z: torch.Tensor, prior: torch.Tensor, psi: nn.Module, cls: nn.Module
    ) -> torch.Tensor:
        """feats: the streams' features, each (B, D); z (K, Dz); prior (K,); Ψ and cls_1 -> S1 (B, C)."""
        B, K = feats[0].shape[0], z.shape[0]
        strata = self.w_z(z)  # f(·, z_i), (K, D)
        parts = [f.unsqueeze(1).expand(-1, K, -1) for f in feats]  # (B, K, D) each
        parts[self.slot] = strata.unsqueeze(0).expand(B, -1, -1)  # the background set to each stratum
        logits = cls(psi(torch.cat(parts, -1)))  # P(Y | s, z_i) as logits, (B, K, C)
        log_p = prior.clamp_min(1e-12).log().to(logits.dtype)[None, :, None]  # log P(z_i), (1, K, 1)
        if not self.multi_label:
            return torch.logsumexp(logits.log_softmax(-1) + log_p, dim=1)  # log Σ_i P(z_i) softmax(·), (B, C)
        log_pos = torch.logsumexp(F.logsigmoid(logits) + log_p, dim=1)  # log Σ_i P(z_i) σ(·), (B, C)
        log_neg = torch.logsumexp(F.logsigmoid(-logits) + log_p, dim=1)  # log Σ_i P(z_i) (1 − σ(·))
        return log_pos - log_neg  # the logit of the averaged probability, (B, C)


class TextClassifier(nn.Module):
    """Ours (`classifier: text`): logit_c = x · t_c + b_c with T learnable from T0 (the baseline trunk's queries)."""

    def __init__(self, t0: torch.Tensor, dim: int, learnable: bool):
        super().__init__()
        self.text = TextQueries(t0, dim, learnable=learnable)
        self.bias = nn.Parameter(torch.zeros(t0.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> logits (B, C)."""
        return x @ self.text().T + self.bias  # (B, D) @ (D, C)


def classifier(opts: EcrlOptions, ctx: HeadContext) -> nn.Module:
    """The paper's `classifier(·)`: a linear layer D -> C, or (ours) text-initialised class scores."""
    if opts.classifier == "linear":
        return nn.Linear(opts.dim, ctx.num_classes)
    return TextClassifier(ctx.t0, opts.dim, opts.learn_text)


MODULES = ("fcm", "bcm", "tsc", "bd", "glca")


def _modules(*on: str) -> dict[str, bool]:
    return {m: m in on for m in MODULES}


_NO_GLCA = _modules("fcm", "bcm", "tsc", "bd")  # Tables 4-5 run on this model (their BD row = Table 3's +TSC+BD)

VARIANTS = {
    # Table 3, its eight rows (the full head is `ecrl` itself)
    "modules_base": _modules(),
    "modules_fcm": _modules("fcm"),
    "modules_bcm": _modules("bcm"),
    "modules_fcm_bcm": _modules("fcm", "bcm"),
    "modules_fcm_bcm_tsc": _modules("fcm", "bcm", "tsc"),
    "modules_fcm_bcm_bd": _modules("fcm", "bcm", "bd"),
    "modules_fcm_bcm_tsc_bd": _NO_GLCA,
    # Table 4 (without GLCA): w/o λ, w/o P(z_i), additive attention; ours: the renormalised BD
    "bd_lambda_off": {**_NO_GLCA, "use_lambda": False},
    "bd_prior_off": {**_NO_GLCA, "use_prior": False},
    "bd_additive": {**_NO_GLCA, "bd_attention": "additive"},
    "bd_normalised": {**_NO_GLCA, "bd_form": "normalised"},
    "bd_stratified": {**_NO_GLCA, "bd_form": "stratified"},  # ours: Eq. 4 exactly over the strata
    # Table 5 (without GLCA): the confounder dictionary (reference: modules_fcm_bcm_tsc_bd, with the default Z)
    "dict_random": {**_NO_GLCA, "confounder_dictionary": "confounder_noise"},  # Table 5: random features
    "dict_sampled": {**_NO_GLCA, "confounder_dictionary": "confounder_random"},  # ours: sampled real backgrounds
    "dict_average": {**_NO_GLCA, "confounder_dictionary": "confounder_average_frame"},
    "dict_background": {**_NO_GLCA, "confounder_dictionary": "confounder_average"},
    "dict_spherical": {**_NO_GLCA, "confounder_dictionary": "confounder"},  # ours: spherical k-means (earlier Z)
    # ours on the full head
    "bd_normalised_full": {"bd_form": "normalised"},
    "bd_stratified_full": {"bd_form": "stratified"},
    "glca_linear": {"glca_scorer": "linear"},
    "cfm_additive": {"cfm_score": "additive"},  # Eq. 2 scored by additive attention (this head's earlier form)
    "glca_ll_lg": {"glca_combine": "ll_lg"},  # F_VG without F_L (this head's earlier form)
    "classifier_text": {"classifier": "text"},
    # a uniform prior 1/K on every dictionary the head reads (BD's p(z); GLCA's p(g) stays off), on the full head:
    # the prior replaced, not removed (Table 4's "w/o P(z_i)" is `bd_prior_off`); over our background k-means
    # prototypes, not IVRD's form (that is `ivrd`)
    "prior_uniform": {"prior": "uniform", "global_prior": False},
    # IVRD's intervention (the thesis, Mechanism 1: P(y | do(x)) ≈ Σ_z P(y | x, z) P(z) over class prototypes with
    # P(z) forced uniform, attended from the sample) in BD's place: Z = the class means of the frame features
    # (`confounder_average_frame`), P(z) = 1/K, λ from the video's J; GLCA as in the full head
    "ivrd": {"confounder_dictionary": "confounder_average_frame", "prior": "uniform", "global_prior": False},
}


def _bd_weights(m, a: tuple, k: dict, o) -> tuple[torch.Tensor, None]:
    """BD's weights over Z: λ (B, K) of Eq. 7 (the paper's form), or the renormalised w (ours)."""
    return (m.weights(*a) if isinstance(m, NormalisedBackdoor) else m.weights(a[0], a[1])), None


def _glca_weights(m, a: tuple, k: dict, o) -> tuple[torch.Tensor, None]:
    """GLCA's local-global weights φ(·) over the entries of G: (B, L, Kg)."""
    return m.weights(*a, **k)[0], None


TERMS = (
    CausalTerm("bd", "W_b Σ_i λ_i P(z_i) z_i (Eq. 6-7)", "w_b", "bd", _bd_weights),
    CausalTerm(
        "glca_global",
        "F_LG = φ(ReLU(W_h h + b_h) W_a + b_a) ⊙ F_G (Eq. 15)",
        "glca.local_global",
        "glca.local_global",
        _glca_weights,
    ),
    CausalTerm("s1", "S1 = cls(W_a J + W_b E_z)", "cls_1"),
    CausalTerm("bd_strata", "S1 = log Σ_i P(z_i) P(Y | s, C = f(V, z_i)) (Eq. 4, bd_form: stratified)", "strata_term"),
)


@register_head("ecrl", config=EcrlOptions, variants=VARIANTS, terms=TERMS)
class Ecrl(nn.Module):
    """F2VCM streams → S1 (FG/BG branch, BD) + S2 (frame branch, GLCA); forward(batch) -> logits (B, C)."""

    @staticmethod
    def required_dictionaries(opts: EcrlOptions) -> tuple[str, ...]:
        return ((opts.confounder_dictionary,) if opts.bd else ()) + ((GLOBAL_DICTIONARY,) if opts.glca else ())

    def __init__(self, opts: EcrlOptions, ctx: HeadContext):
        super().__init__()
        self.opts = opts
        D = opts.dim
        frame_dim = ctx.clip_dim if opts.visual == "clip" else ctx.video_dim
        self.side = [s for s, on in (("fg", opts.fcm), ("bg", opts.bcm)) if on]  # s, c streams
        in_dims = {"frame": frame_dim, **{s: ctx.clip_dim for s in self.side}}
        layers = {"frame": opts.layers, "fg": opts.stream_layers, "bg": opts.stream_layers}
        self.encoders = nn.ModuleDict(
            {
                s: TemporalEncoder(d, D, layers[s], opts.attention_heads, ctx.num_frames, opts.dropout)
                for s, d in in_dims.items()
            }
        )  # one temporal encoder per stream
        cfm_streams = ["frame"] + (self.side if opts.tsc else [])  # TSC: Eq. 2 over the FG/BG streams too
        self.cfm = nn.ModuleDict({s: CrossFrameModelling(D, opts.cfm_score) for s in cfm_streams})
        self.cls_2 = classifier(opts, ctx)  # S2 (frame branch)
        self.cls_1 = classifier(opts, ctx) if self.side else None  # S1 (FG/BG branch)
        self.psi = nn.Linear(len(self.side) * D, D) if self.side else None  # Ψ: J = Ψ([s, c]) (Eq. 6)
        self.strata_term = None
        if opts.bd:
            z_dim = ctx.dictionaries[opts.confounder_dictionary][0].shape[1]
            if opts.bd_form == "stratified":  # Eq. 4 over the strata: the background set to each z_i
                self.bd = StratifiedBackdoor(z_dim, D, self.side.index("bg"), ctx.multi_label)
                self.w_a = self.w_b = None
                self.strata_term = nn.Identity()  # S1 of Eq. 4: the term `ltar diagnose` measures
            else:
                if opts.bd_form == "paper":  # Eq. 7: Σ_i λ_i z_i P(z_i), λ by dot product or additive attention
                    self.bd = BackdoorAttention(D, z_dim, D, opts.bd_attention, opts.use_lambda, opts.use_prior)
                else:  # ours: renormalised weights, cosine scores with a learned τ
                    self.bd = NormalisedBackdoor(D, z_dim, D, opts.use_lambda, opts.use_prior)
                self.w_a = nn.Linear(D, D)  # W_a (Eq. 6)
                self.w_b = nn.Linear(z_dim, D)  # W_b (Eq. 6)
        else:
            self.bd = self.w_a = self.w_b = None
        if opts.glca:
            g, prior = ctx.dictionaries[GLOBAL_DICTIONARY]
            self.G = nn.Parameter(g.detach().float().clone())  # G (Kg, Dg): trainable, from the cache
            self.register_buffer("g_log_prior", prior.detach().float().clamp_min(1e-12).log())  # log p(g_k)
            self.glca = GlobalLocalCausalAttention(D, g.shape[1], opts.glca_scorer, opts.glca_chunk, opts.glca_combine)
        else:
            self.G = self.glca = None

    frame_only = False  # step 1 of the two-step training (`frame_epochs`): the frame stream alone

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine before every training epoch: step 1 while epoch < frame_epochs."""
        self.frame_only = epoch < self.opts.frame_epochs

    def pool(self, stream: str, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A stream's video feature: Eq. 2 where it has cross-frame modelling, else the masked mean (B, D)."""
        return self.cfm[stream](h, mask) if stream in self.cfm else masked_mean(h, mask)

    def forward(self, batch: Batch) -> torch.Tensor:
        mask = batch.mask  # (B, L)
        frames = batch.vp if self.opts.visual == "clip" else batch.v  # (B, L, Dc or Dv)
        f_l = self.encoders["frame"](frames.float(), mask)  # F_L, (B, L, D)
        if self.frame_only:  # two-step training, step 1: the base model on the raw frames
            return self.cls_2(self.pool("frame", f_l, mask))  # (B, C)
        if self.glca is not None:
            log_prior = self.g_log_prior if self.opts.global_prior else None
            f_l = self.glca(f_l, self.G, mask, log_prior)  # z_l from [F_LL, F_LG], (B, L, D)
        s2 = self.cls_2(self.pool("frame", f_l, mask))  # S2 = classifier(F_VG) (without GLCA: of F_v), (B, C)
        if not self.side:
            return s2
        inputs = {"fg": batch.fg, "bg": batch.bg}
        feats = [self.pool(s, self.encoders[s](inputs[s].float(), mask), mask) for s in self.side]  # s, c (B, D)
        if self.opts.bd and self.opts.bd_form == "stratified":
            z, p = batch.dictionaries[self.opts.confounder_dictionary]  # Z (K, Dz), P(z) (K,)
            p = dictionary_prior(p.float(), self.opts.prior)
            p = p if self.opts.use_prior else torch.full_like(p, 1.0 / p.numel())
            s1 = self.strata_term(self.bd(feats, z.float(), p, self.psi, self.cls_1))  # log Σ_i P(z_i) P(Y | s, z_i)
            return s1 + s2  # (B, C)
        j = self.psi(torch.cat(feats, -1))  # J = Ψ([s, c]), (B, D)
        if self.bd is not None:
            z, p = batch.dictionaries[self.opts.confounder_dictionary]  # Z (K, Dz), p(z) (K,)
            p = dictionary_prior(p.float(), self.opts.prior)  # N_i / N, or 1/K with `prior: uniform`
            e_z = self.bd(j, z.float(), p)  # E_z[g1(z)] (Eq. 7), (B, Dz)
            j = self.w_a(j) + self.w_b(e_z)  # W_a J + W_b E_z (Eq. 6), (B, D)
        return self.cls_1(j) + s2  # S = S1 + S2, (B, C)
