"""ecrl: Event-level Causal Representation Learning (seed paper 002), on cached features.

Three parts, each an options switch (the paper's Table 3); the output is `S1 + S2`:

- *F2VCM* (frame-to-video modelling): three streams, frame (`VP`, or `V` with `visual: timesformer`),
  foreground `FG` (`F_s`) and background `BG` (`F_c`). Each stream: a small temporal encoder (the cache
  freezes the paper's fine-tuned UniFormerV2, so this takes its adaptive role), then cross-frame
  modelling (Eq. 2): context `c = masked mean`, frame weights `α_l = softmax_l(w · tanh(W_f h_l + W_c c))`
  over real frames, `F = LN(W_o [Σ_l α_l h_l, c])`, `(B, D)`.
  Table 3 switches, as we map them: the baseline row is the frame stream alone (its own cross-frame
  modelling and classifier); `fcm` adds the FG stream, `bcm` the BG stream; without `tsc` the FG/BG
  streams are summed (`J = F_s + F_c`, no parameters), with `tsc` (three-stream combination) they are
  fused by a learned `J = Ψ([F_s, F_c])` (concat + linear), and the two branches `S1` (FG/BG) and
  `S2` (frame) add up. `tsc` and `bd` act on the FG/BG branch, so they need `fcm` or `bcm`.
- *BD* (back-door on the background, Eq. 6–7): `E_z[g(z)] = Σ_i λ_i z_i p(z_i)` over the confounder
  dictionary `Z` (cache dictionary `confounder_dictionary`: k-means background prototypes; `random` /
  `average` for Table 5) with `λ = softmax_i((W_c J)·(W_d z_i)/√d)` (or additive attention);
  `S1 = cls(W_a J + W_b E_z)`. `use_lambda: false` puts λ = 1/K, `prior: uniform` puts p(z_i) = 1/K (the
  IVRD-style uniform prototype prior; Table 4's "prior off"). Without `bd`: `S1 = cls(J)`. Variant
  `prior_uniform` makes every dictionary prior uniform (BD's p(z) and GLCA's p(g), `global_prior: false`).
- *GLCA* (global-local causal attention, front-door): local features `F_L (B, L, D)` (the frame stream
  before its temporal pooling) and global features `F_G = G`, a **trainable** dictionary initialised
  from the cache dictionary "global". Local-global: `h_lk = [W_v g_k, W_q f_l ⊙ W_k g_k]`,
  `α_lk = softmax_k(w_h · h_lk + log p(g_k))` over ALL `Kg` entries (the Σ_x' P(x') term),
  `lg_l = Σ_k α_lk W_v g_k`; local-local: the same form over the real frames of the video (the
  mediator term), `ll_l`; `z_l = LN(W_o [ll_l, lg_l])`, pooled by the frame stream's cross-frame
  modelling → `S2` (Eq. 15). Without `glca`: `S2 = cls(F_v)`.

Classifiers `cls` are text-initialised (the baseline trunk's `TextQueries`): `logit_c = x · t_c + b_c`.

Deviations from the public code (wyqcrystal/ECRL), on purpose: its GLCA takes a softmax over a size-1
axis (every weight is 1, its scorers get no gradient), draws one random dictionary row per sample even
at test time and never trains the dictionary; ours attends over all of `G` (vectorised `(B, L, Kg)`
scores), is deterministic, and `G` trains. Its BD returns a tuple used as a tensor; ours follows
Eq. 6–7. Its "dictionary" is one class-average background per class; ours is the cache's k-means one.
Our additions / unsure points: the mapping of FCM/BCM/TSC onto switches above is ours (the paper's
Table 3 names the modules, not how a row without TSC combines the streams); the equation numbers
between Eq. 7 and Eq. 15 (GLCA's scorer) are not cited because we could not check them; GLCA scores
`h` linearly (`w_h · h`, the equation as written) where the public code puts a hidden `2D → D` layer
and an ELU in between: linear, the `(B, L, Kg)` scores are one matmul and the `(B, L, Kg, D)` tensor
`h` is never built (with the ELU, a step at Kg = 512 cost 10× more on CPU); the `log p(g_k)` prior
term on GLCA's global attention is ours (DESIGN.md: front-door terms weight the sample bank by P(x')),
switch `global_prior`. The paper gives every stream its own backbone; by default only the frame stream
has temporal transformer layers (`layers`), the FG/BG streams rely on Eq. 2 (`stream_layers: 0`), which
keeps a CPU step near the baseline's cost; `stream_layers: 1` gives the symmetric layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from extract.config import ConfigError, bounds
from train.heads import Batch, HeadContext, register_head
from train.heads.causal import BackdoorAttention, masked_softmax
from train.heads.common import TemporalEncoder, TextQueries, masked_mean

GLOBAL_DICTIONARY = "global"  # the cache dictionary that initialises G


@dataclass(frozen=True)
class EcrlOptions:
    dim: int = field(default=128, metadata=bounds(8))  # D: head width of every stream
    layers: int = field(default=1, metadata=bounds(0, 24))  # temporal transformer layers of the frame stream
    # ... of the FG and BG streams (0: projection + positions, Eq. 2 is their temporal model; keeps a step cheap)
    stream_layers: int = field(default=0, metadata=bounds(0, 24))
    attention_heads: int = field(default=4, metadata=bounds(1))  # heads of every temporal attention layer
    dropout: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    visual: Literal["clip", "timesformer"] = "clip"  # frame stream: VP (CLIP) or V (TimeSformer)
    learn_text: bool = True  # classifier text T learnable from T0 (False: T = T0 frozen)
    fcm: bool = True  # FCM: foreground stream FG with cross-frame modelling (Table 3)
    bcm: bool = True  # BCM: background stream BG with cross-frame modelling (Table 3)
    tsc: bool = True  # TSC: learned fusion J = Ψ([F_s, F_c]); off: J = F_s + F_c (Table 3)
    bd: bool = True  # BD: back-door over the confounder dictionary, S1 = cls(W_a J + W_b E_z) (Eq. 6-7)
    glca: bool = True  # GLCA: front-door global-local attention over the trainable G (Eq. 15)
    bd_attention: Literal["dot", "additive"] = "dot"  # λ: scaled dot product or additive attention
    use_lambda: bool = True  # λ from J (False: λ_i = 1/K), Table 4
    prior: Literal["empirical", "uniform"] = "empirical"  # p(z_i): the dictionary's N_i/N or 1/K, Table 4
    confounder_dictionary: str = "confounder"  # cache dictionary Z of BD (Table 5: confounder_random, ...)
    global_prior: bool = True  # GLCA's global attention weighted by G's prior p(g_k) (ours, P(x'))

    def __post_init__(self) -> None:
        if (self.tsc or self.bd) and not (self.fcm or self.bcm):
            raise ConfigError(
                "heads.ecrl: tsc and bd act on the foreground/background streams; turn on fcm or bcm "
                "(or turn tsc and bd off, as the baseline row does)"
            )


class CrossFrameModelling(nn.Module):
    """Eq. 2: context from the masked temporal mean, attention frame weights, `W_o [Σ α h, c]` → (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w_f = nn.Linear(dim, dim)  # frame term of the score
        self.w_c = nn.Linear(dim, dim, bias=False)  # context term of the score
        self.w_s = nn.Linear(dim, 1, bias=False)  # score vector
        self.w_o = nn.Linear(2 * dim, dim)  # projection of [weighted sum, context]
        self.norm = nn.LayerNorm(dim)

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, D), mask (B, L) -> frame weights α (B, L) (0 on masked frames), context c (B, D)."""
        c = masked_mean(h, mask)  # context vector, (B, D)
        scores = self.w_s(torch.tanh(self.w_f(h) + self.w_c(c).unsqueeze(1))).squeeze(-1)  # (B, L)
        return masked_softmax(scores, mask), c

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, D), mask (B, L) -> (B, D)."""
        alpha, c = self.weights(h, mask)
        pooled = torch.einsum("bl,bld->bd", alpha, h)  # Σ_l α_l h_l, (B, D)
        return self.norm(self.w_o(torch.cat([pooled, c], -1)))  # (B, D)


class GlcaAttention(nn.Module):
    """GLCA's attention: `h_lm = [W_v k_m, W_q q_l ⊙ W_k k_m]`, weights softmax_m(w_h · h_lm), values W_v k_m."""

    def __init__(self, query_dim: int, key_dim: int, dim: int):
        super().__init__()
        self.w_q = nn.Linear(query_dim, dim, bias=False)  # W_q
        self.w_k = nn.Linear(key_dim, dim, bias=False)  # W_k
        self.w_v = nn.Linear(key_dim, dim, bias=False)  # W_v
        self.w_h = nn.Linear(2 * dim, 1, bias=False)  # scorer w_h over h (a bias would cancel in the softmax)
        self.dim = dim

    def weights(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        log_prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, L, Dq); keys (M, Dk) shared or (B, M, Dk); key_mask (B, M); log_prior (M,)
        -> weights (B, L, M) summing to 1 over the (real) keys, values W_v keys (M, D) or (B, M, D)."""
        D = self.dim
        v = self.w_v(keys)  # W_v F_G, (M, D) or (B, M, D)
        w_val, w_qk = self.w_h.weight[0, :D], self.w_h.weight[0, D:]  # w_h split over the two halves of h
        # w_h · h_lm = w_val · W_v k_m + Σ_d w_qk,d (W_q q_l)_d (W_k k_m)_d: the (B, L, M, D) tensor h is
        # never built, the scores are one matmul
        qk = torch.matmul(self.w_q(q) * w_qk, self.w_k(keys).transpose(-1, -2))  # (B, L, D) @ (.., D, M) -> (B, L, M)
        scores = qk + (v @ w_val).unsqueeze(-2)  # (B, L, M)
        if log_prior is not None:
            scores = scores + log_prior  # × P(x'), renormalised by the softmax
        if key_mask is None:
            return scores.softmax(-1), v
        return masked_softmax(scores, key_mask.unsqueeze(1)), v

    def forward(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        log_prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> Σ_m weight_lm W_v k_m, (B, L, D)."""
        w, v = self.weights(q, keys, key_mask, log_prior)
        return w @ v  # (B, L, M) @ (M, D) or (B, M, D) -> (B, L, D)


class GlobalLocalCausalAttention(nn.Module):
    """GLCA (front-door): local-local attention within the video, local-global over all of G → (B, L, D)."""

    def __init__(self, dim: int, global_dim: int):
        super().__init__()
        self.local_local = GlcaAttention(dim, dim, dim)  # mediator term within the sample
        self.local_global = GlcaAttention(dim, global_dim, dim)  # Σ_x' P(x') term over the dictionary G
        self.w_o = nn.Linear(2 * dim, dim)  # fuses [ll, lg] (Eq. 15's concatenation)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, f_l: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, log_prior: torch.Tensor | None
    ) -> torch.Tensor:
        """f_l: F_L (B, L, D), g: G (Kg, Dg), mask (B, L), log_prior (Kg,) or None -> (B, L, D)."""
        ll = self.local_local(f_l, f_l, key_mask=mask)  # local-local features, (B, L, D)
        lg = self.local_global(f_l, g, log_prior=log_prior)  # local-global features, (B, L, D)
        return self.norm(self.w_o(torch.cat([ll, lg], -1)))  # (B, L, D)


class TextClassifier(nn.Module):
    """`cls`: logit_c = x · t_c + b_c with T learnable from T0 (the baseline trunk's text queries)."""

    def __init__(self, t0: torch.Tensor, dim: int, learnable: bool):
        super().__init__()
        self.text = TextQueries(t0, dim, learnable=learnable)
        self.bias = nn.Parameter(torch.zeros(t0.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> logits (B, C)."""
        return x @ self.text().T + self.bias  # (B, D) @ (D, C)


MODULES = ("fcm", "bcm", "tsc", "bd", "glca")


def _modules(*on: str) -> dict[str, bool]:
    return {m: m in on for m in MODULES}


VARIANTS = {
    # Table 3: modules added cumulatively (the full head is `ecrl` itself)
    "modules_base": _modules(),
    "modules_fcm": _modules("fcm"),
    "modules_bcm": _modules("fcm", "bcm"),
    "modules_tsc": _modules("fcm", "bcm", "tsc"),
    "modules_bd": _modules("fcm", "bcm", "tsc", "bd"),
    # Table 4: λ and the prior on/off (the full head has both)
    "lambda_off_prior_off": {"use_lambda": False, "prior": "uniform"},
    "lambda_on_prior_off": {"prior": "uniform"},
    "lambda_off_prior_on": {"use_lambda": False},
    # Table 5: the confounder dictionary (the full head reads the k-means `confounder`)
    "dict_random": {"confounder_dictionary": "confounder_random"},
    "dict_average": {"confounder_dictionary": "confounder_average"},
    # IVRD-style uniform prototype prior on every dictionary the head reads (BD's p(z) and GLCA's p(g))
    "prior_uniform": {"prior": "uniform", "global_prior": False},
}


@register_head("ecrl", config=EcrlOptions, variants=VARIANTS)
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
        self.side = [s for s, on in (("fg", opts.fcm), ("bg", opts.bcm)) if on]  # F_s, F_c streams
        in_dims = {"frame": frame_dim, **{s: ctx.clip_dim for s in self.side}}
        layers = {"frame": opts.layers, "fg": opts.stream_layers, "bg": opts.stream_layers}
        self.encoders = nn.ModuleDict(
            {
                s: TemporalEncoder(d, D, layers[s], opts.attention_heads, ctx.num_frames, opts.dropout)
                for s, d in in_dims.items()
            }
        )  # one temporal encoder per stream
        self.cfm = nn.ModuleDict({s: CrossFrameModelling(D) for s in in_dims})  # Eq. 2 per stream
        self.cls_2 = TextClassifier(ctx.t0, D, opts.learn_text)  # S2 (frame branch)
        self.cls_1 = TextClassifier(ctx.t0, D, opts.learn_text) if self.side else None  # S1 (FG/BG branch)
        self.psi = nn.Linear(len(self.side) * D, D) if opts.tsc else None  # Ψ: J = Ψ([F_s, F_c])
        if opts.bd:
            z_dim = ctx.dictionaries[opts.confounder_dictionary][0].shape[1]
            self.bd = BackdoorAttention(
                D, z_dim, D, mode=opts.bd_attention, use_lambda=opts.use_lambda, use_prior=opts.prior == "empirical"
            )  # λ scorer W_c, W_d (Eq. 6); with use_lambda off (λ = 1/K) the scorers do not exist
            self.w_a = nn.Linear(D, D)  # W_a (Eq. 7)
            self.w_b = nn.Linear(z_dim, D)  # W_b (Eq. 7)
        else:
            self.bd = self.w_a = self.w_b = None
        if opts.glca:
            g, prior = ctx.dictionaries[GLOBAL_DICTIONARY]
            self.G = nn.Parameter(g.detach().float().clone())  # G (Kg, Dg): trainable, from the cache
            self.register_buffer("g_log_prior", prior.detach().float().clamp_min(1e-12).log())  # log p(g_k)
            self.glca = GlobalLocalCausalAttention(D, g.shape[1])
        else:
            self.G = self.glca = None

    def forward(self, batch: Batch) -> torch.Tensor:
        B, L = batch.mask.shape
        mask = batch.mask
        frames = batch.vp if self.opts.visual == "clip" else batch.v  # (B, L, Dc or Dv)
        f_l = self.encoders["frame"](frames.float(), mask)  # F_L, (B, L, D)
        if self.glca is not None:
            log_prior = self.g_log_prior if self.opts.global_prior else None
            f_l = self.glca(f_l, self.G, mask, log_prior)  # z_l from [ll_l, lg_l], (B, L, D)
        s2 = self.cls_2(self.cfm["frame"](f_l, mask))  # S2 (Eq. 15; without GLCA: cls(F_v)), (B, C)
        if not self.side:
            return s2
        inputs = {"fg": batch.fg, "bg": batch.bg}
        feats = [self.cfm[s](self.encoders[s](inputs[s].float(), mask), mask) for s in self.side]  # F_s, F_c (B, D)
        j = self.psi(torch.cat(feats, -1)) if self.psi is not None else torch.stack(feats).sum(0)  # J, (B, D)
        if self.bd is not None:
            z, p = batch.dictionaries[self.opts.confounder_dictionary]  # Z (K, Dz), p(z) (K,)
            e_z = self.bd(j, z.float(), p.float())  # E_z[g(z)] = Σ_i λ_i z_i p(z_i) (Eq. 6), (B, Dz)
            j = self.w_a(j) + self.w_b(e_z)  # W_a J + W_b E_z (Eq. 7), (B, D)
        return self.cls_1(j) + s2  # S1 + S2, (B, C)
