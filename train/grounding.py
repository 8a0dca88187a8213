"""Grounding interventions from causal video question answering, as a wrapper around any head.

The causal video-QA line (the PhD thesis "Causality Model for Semantic Understanding on Videos",
arXiv:2503.12447 (2025), https://arxiv.org/abs/2503.12447: IGV, EIGV, STR, IVRD; IGV's code
https://github.com/yl3800/IGV, EIGV's https://github.com/yl3800/EIGV) grounds a prediction in the part of the
video that causes the answer and intervenes on the rest. On cached features these transfer to long-term action
recognition with the class text embeddings `T0` in the role of the question. `Grounded(head, options, ctx)`
wraps a registered head; `forward(batch) -> logits (B, C)` as every head, with the auxiliary losses left in
`aux_loss` during training (the engine adds them to the head's CE/BCE):

- **STR temporal rationales** (`rationale_frames: K`): a frame scorer (cross-attention of each frame's CLIP
  embedding over the class text embeddings) ranks the frames; K frames, kept in temporal order, are the only
  frames the head sees (its batch has `L = K`). `rationale_selector: perturbed` (default, TranSTR's selector): in
  training the differentiable perturbed top-K (Berthet et al. 2020; Cordonnier et al. 2021), slot j's frame is
  `Σ_l y_jl v_l` with `y = (1/n) Σ_s TopK(r + σ Z_s)` the mean K-hot indicators of `perturb_samples` Gaussian-
  perturbed scores (`perturb_sigma`), and the gradient `∂y/∂r ≈ (1/n) Σ_s TopK(r + σ Z_s) Z_s^T / σ` (Berthet et al.'s
  Jacobian, `perturb_grad: full`; TranSTR's code keeps only its diagonal terms, `perturb_grad: diagonal`); at eval the
  hard top-K. `straight_through` (ours, the earlier form): the hard top-K in training too, the gathered frames
  scaled by `1 + s_l - stopgrad(s_l)` (value exactly 1), `s = softmax_l(r_l / tau)`.
- **Invariant grounding, IGV** (`method: igv`): a grounding indicator (the same scorer form) splits each
  video's real frames into causal frames `c` and environment frames `e` with a binary Gumbel-softmax: logits
  `z = r + noise_scale · logistic noise` (training; `r` at test), straight-through with the gradient of
  `sigmoid(z / tau)`. `indicator: per_frame` (IGV's code, pipeline.yaml's igv / eigv): frame l is causal iff `z_l > 0`,
  no budget; a side of the split with no frame reads as the video's frames times the mask, zeros, with the
  straight-through gradient live (`empty_side: zeros`, IGV's code: hga.py lines 199-208 and EncoderVidHGA's
  fallback, lines 116-127); `empty_side: whole_video` (ours, earlier) keeps every frame causal and reads an empty
  environment as the whole video with no gradient to the mask. `indicator: budget` (ours, the earlier form and the
  dataclass default): the top `causal_share` of the video's real frames by `z` (at least one of each).
  `indicator: oracle` (a diagnostic, not a method): the annotated action frames of the split being read
  (`Grounded.oracle_split`; `train.engine.oracle_frames` sets them), IGV's losses on the true split. An intervener
  fills a video's environment slots with another video's frames at those slots (whatever that video's own
  grounding says of them), `v* = m ⊙ v + (1 - m) ⊙ v_π(b)` with `v_π(b)` an earlier training video drawn from the
  environment bank (`env_source: bank`; `batch`: a derangement of the batch) and m the causal mask detached
  (`swap_detach`, IGV's code: `intervene(self.memory_bank, bg_mask, ...)` after `bg_mask = 1 - fg_mask` of the
  encoder's bool mask, hga.py lines 206-211; `swap_detach: false`, ours, earlier: m = g, the swap loss trains the
  indicator). Losses: the head's loss on the causal frames alone (what is returned: the prediction at test time,
  with the noise-free indicator), `swap_weight · loss(head(v*), y)` (the label
  survives any environment), and `env_weight · CE(head(e), uniform)` (the environment alone carries no
  class information; for multi-label tasks the target is the batch's label frequency, the
  uninformative prediction).
- **Equivariant grounding, EIGV** (`method: eigv`, `mix: paper`, the default; EIGV's code yl3800/EIGV; its values
  in pipeline.yaml's eigv, from its `train.py` lines 27-32: λ1 ~ Beta(0.1, 0.1), λ2 ~ Beta(1, 1), contrast weight
  0.0125, InfoNCE temperature 0.1, 5 negatives, Gumbel temperature 0.9; `eigv_values_ours` keeps ours, 0.4 / 0.4 /
  0.1 / τ 1.0). Its indicator is grounded on the label (`indicator_query: label`: `frame_att(q_feat_gt_global, ...)`
  on the ground-truth question-answer, network.py lines 199-203; here the label's class text; the mixed video on
  the λ1-mixed labels, lines 210 and 226), allowed because its test-time prediction never reads the indicator;
  `indicator_query: classes` (ours) grounds on the class texts without the label.
  (1) the equivariant mixup: `λ1 ~ Beta(mix_alpha, mix_alpha)` and an independent `λ2 ~ Beta(a2, a2)`
  (`a2 = env_mix_alpha`, default `mix_alpha`), slot by slot `v_mix = λ1 c_b + (1 - λ1) c_π(b) + λ2 e_b +
  (1 - λ2) e_π(b)` (each video split by its own indicator); the head's prediction on `v_mix` must match
  `λ1 y_b + (1 - λ1) y_π(b)`: the target follows λ1 only (`mix_weight`, soft-target CE / BCE); (2) the
  contrastive disruptor: `v_mix` is grounded again; anchor = `v_mix`, positive = `v_mix` with its environment
  frames swapped for another video's, negatives = `contrast_negatives` copies with its causal frames swapped;
  InfoNCE (cosine / `contrast_tau`) on a projection head `Linear(C, dim) -> ReLU -> Linear(dim, dim)` applied to
  the head's class scores (`contrast_weight`). With `igv_terms: false` (EIGV's code, pipeline.yaml's eigv) these
  two are the whole training objective (`owns_loss`: the engine adds no task loss; the mixed video is the step's
  main view) and `predict: video` predicts from the whole video at test time, as EIGV's code does. `igv_terms:
  true` (ours, the earlier form, `eigv_budget`) keeps IGV's three losses beside them. `mix: video` keeps our earliest
  form: one `λ` over whole videos, the mixed video re-grounded and its causal-frame prediction against the λ-mixed
  labels, and a symmetric InfoNCE between the grounded and the swapped view's class scores across the batch.
- **IVRD** (an intervention over class prototypes with a uniform prior, attended from the sample) is a head
  variant, not a wrapper: `ecrl:ivrd` puts it in BD's place (Z = the class means of the frame features, P(z) =
  1/K). `prior: uniform` (variant `prior_uniform` of pcmci, ecrl, cmdcl's memory/bank forms) sets every
  dictionary prior 1/K over the heads' own prototypes: ECRL's Table 4 "w/o P(z_i)", not IVRD's form.

The views are batches of the same layout: environment/causal frames are removed by the frame mask (their
features also multiplied by the straight-through weight `g` or `1 - g`, which carries the gradient to the
indicator), so every head works unchanged. Dataset-level memories the heads keep (CMDCL's bias memory in
its `tci_memory` variant, PCMCI's hallucination memory) are updated by the main view only, never by the auxiliary views.

Paper map (equation -> function): IGV's indicator (Gumbel-softmax split) -> `causal_split` (its per-frame
decision -> `per_frame_causal`, its noise -> `logistic_noise`), scored by `FrameScorer`; the causal and environment
views -> `causal_view` / `environment_view` (an empty side read as zeroed frames -> `side_view`);
IGV's intervener `v* = c ⊕ e_π` -> `swapped_view` on the mask `swap_keep` gives (detached in IGV's code), its
memory of training videos -> `Grounded.bank_push` / `Grounded.bank_frames` / `Grounded.environments`;
EIGV's mixup `λ1 c_b + (1 - λ1) c_π + λ2 e_b + (1 - λ2) e_π` -> `eigv_mixed_batch`, its λ's ->
`Grounded.sample_lambdas`, its soft target and losses -> `Grounded.eigv_paper`;
EIGV's label-grounded indicator (the ground-truth question-answer; the mixed question) -> `label_query` /
`Grounded.query`; EIGV's contrastive disruptor (InfoNCE, anchor / positive / negatives) -> `info_nce_negatives` on
`Grounded.project`, its `mem_swap` views -> `Grounded.disrupted_views`;
IGV's losses -> `Grounded.igv_losses`; EIGV's objective without them -> `Grounded.owns_loss` +
`train.engine.training_loss`;
STR's TR top-K (perturbed optimiser forward `E[TopK(r + σZ)]`, backward `E[TopK(r + σZ) Z^T] / σ`) ->
`perturbed_top_k` (`_PerturbedTopK`), hard top-K -> `hard_top_k`; the straight-through form -> `top_k_frames`.

Where we depart from the papers, and why:
- the substituted environments (IGV's swap, EIGV's positive and negatives) come, as in the papers, from a bank of
  training videos (`env_source: bank`), each environment frame a random real frame of a random other video (as
  IGV's `MemBank` samples, never the video itself: the bank keeps each entry's split position). IGV's code reads a
  precomputed feature file of the whole training set; ours fills the bank from the training batches (`env_bank`
  videos, first in first out: with `env_bank` at least the training split, the whole split after one epoch), and
  until it can serve every video of a step (the first step) the batch's other videos stand in. `env_source: batch`
  (ours, the earlier form) swaps within the batch, slot by slot. The bank holds the frames as the indicator sees
  them (after STR's selection), in fp16, and is saved in the checkpoint, so a resumed run continues with it;
- IGV's indicator (its code's `Grounding_Indicator`) is a per-frame binary Gumbel-softmax whose two logits are
  attention probabilities over the frames (each in [0, 1], summing to 1 over the video): their difference is at
  most 1 against logistic noise of std 1.81, so its masks stay close to random by construction, and its code
  samples the noise at test time too. Ours (`per_frame`) takes the same decision on `FrameScorer`'s unbounded
  logit `r`, noise-free at test (a deterministic prediction). With unbounded logits the per-frame indicator can
  leave the noise. Under `empty_side: whole_video` (ours, earlier) it reaches the trivial split on a toy batch:
  every frame causal, where the environment term reads the whole video and sends the mask no gradient; under IGV's
  `zeros` the environment term keeps a gradient at that state (tested). `budget` (ours) forces the
  split with the hard top-`causal_share`; `ltar ground-check` measures what either choice costs against the
  oracle mask on a trained run;
- IGV's code matches the swapped video's prediction to the causal frames' (a KL to it); ours matches it to the
  label (the same invariance, the form of the paper's loss on the intervened video);
- EIGV's projection head reads the heads' class scores, the one representation every head shares (the paper
  projects its fused video-question representation); its question-swap negatives have no counterpart (the class
  texts `T0`, our "question", are the same for every video), so only the causal-swapped negatives are kept;
- EIGV's code mixes the question with λ1 as well; here there is no per-video question to mix;
- EIGV's code draws λ1, λ2 once per batch, as ours (`sample_lambdas`);
- EIGV's partner of each video is `torch.randperm(B)` (train.py line 62), which can pair a video with itself (a
  mixup that changes nothing); ours is a derangement;
- EIGV's code gathers the negatives with `torch.cat((out_neg1, out_neg3)).view(B, -1, D)` (network.py line 245):
  `out_neg1` is copy-major (row j·B + b is copy j of video b), so the view hands anchor b the rows b·2N..(b+1)·2N,
  mostly other videos' negatives; ours pairs every anchor with its own N copies (`info_nce_negatives`, tested);
- IGV's and EIGV's code clip no gradient; every row here clips at `train.grad_clip`, and a grounded head's
  parameters by their own norm (`clip: separate`), so the head's update follows the same rule as in its
  ungrounded row (`joint`: one norm over head and grounding modules, ours, earlier);
- with a single video in the batch EIGV's terms are skipped (nothing to mix or swap with);
- STR's perturbed top-K perturbs the frame scorer's raw scores `r` (TranSTR perturbs its cross-attention weights);
  its scorer is our `FrameScorer`, and objects (STR's SR step) do not exist on cached frame features;
- STR's selected frames get positions 0..K-1 of the head's temporal embedding (their order is kept, their gaps are
  not); a video with fewer than K real frames keeps them all and fills its remaining slots with padded (masked) frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.contract import schema
from extract.contract.config import Config, ConfigError, bounds, build_section, predating
from train.heads.batch import Batch, HeadContext
from train.heads.causal import masked_softmax

log = logging.getLogger(__name__)

FEATURES = ("vp", "v", "fg", "bg")  # the per-frame arrays of a Batch, (B, L, D) each
# grounding scores of a split (see grounding_scores), beside the classification metrics
GROUND_KEYS = ("ground_iou", "ground_iou_random", "ground_precision", "ground_precision_random")


@dataclass(frozen=True)
class GroundingOptions:
    method: Literal["none", "igv", "eigv"] = "none"  # none | igv (invariant) | eigv (equivariant grounding)
    rationale_frames: int | None = field(default=None, metadata=bounds(1))  # STR: K frames kept; null = off
    causal_share: float = field(default=0.5, metadata=bounds(0.05, 0.95))  # IGV/EIGV: share of frames marked causal
    tau: float = field(default=1.0, metadata=bounds(1e-3))  # temperature of the indicator and of the rationale scores
    dim: int = field(default=64, metadata=bounds(4))  # width of the frame scorers
    swap_weight: float = field(default=1.0, metadata=bounds(0.0))  # IGV: loss of causal + swapped environment
    env_weight: float = field(default=1.0, metadata=bounds(0.0))  # IGV: environment-only prediction -> uniform
    mix_weight: float = field(default=1.0, metadata=bounds(0.0))  # EIGV: mixup of two videos' grounded frames
    mix_alpha: float = field(default=0.4, metadata=bounds(1e-3))  # EIGV: λ (paper: λ1) ~ Beta(mix_alpha, mix_alpha)
    contrast_weight: float = field(default=0.1, metadata=bounds(0.0))  # EIGV: grounded vs perturbed InfoNCE
    contrast_tau: float = field(default=0.1, metadata=bounds(1e-3))  # EIGV: temperature of the InfoNCE
    # EIGV mixing: paper (λ1 on the causal frames, independent λ2 on the environment frames, target follows λ1,
    # contrastive disruptor with environment-swapped positive / causal-swapped negatives) | video (ours, earlier:
    # one λ over whole videos, re-grounded, InfoNCE grounded vs swapped view)
    mix: Literal["paper", "video"] = "paper"
    env_mix_alpha: float | None = field(default=None, metadata=bounds(1e-3))  # EIGV: λ2 ~ Beta(a2, a2); null=a
    contrast_negatives: int = field(default=5, metadata=bounds(1))  # EIGV paper: causal-swapped negatives per video
    # STR: perturbed (differentiable perturbed top-K, training; hard top-K at eval) | straight_through (ours, earlier)
    rationale_selector: Literal["perturbed", "straight_through"] = "perturbed"
    perturb_samples: int = field(default=500, metadata=bounds(1))  # STR perturbed top-K: n Gaussian samples
    perturb_sigma: float = field(default=0.05, metadata=bounds(1e-6))  # STR perturbed top-K: noise scale σ
    # STR perturbed top-K backward: full (Berthet et al. 2020's Jacobian E[Y Z^T] / σ) | diagonal (TranSTR's code:
    # E[Y_kl Z_l] / σ only, each score learns from its own frame's indicators). Runs before the option: diagonal.
    perturb_grad: Literal["full", "diagonal"] = field(default="full", metadata=predating("diagonal"))
    # IGV / EIGV: where substituted environments come from: bank (the papers: a memory of earlier training videos,
    # never the video itself) | batch (ours, the earlier form: another video of the same batch). The dataclass
    # default is `batch` so that runs written before the option read back as what they were; pipeline.yaml's
    # igv / eigv sections choose `bank`.
    env_source: Literal["bank", "batch"] = "batch"
    env_bank: int = field(default=256, metadata=bounds(2))  # bank: videos held (first in, first out)
    # IGV / EIGV indicator: per_frame (IGV's code: each frame causal iff its noisy logit > 0, no budget; a video with no
    # causal frame keeps every frame, an empty environment reads as the whole video) | budget (ours, the earlier form:
    # the top `causal_share` of the real frames by noisy logit, at least one of each). Dataclass default `budget`, so
    # runs written before the option read back as what they were; pipeline.yaml's igv / eigv choose `per_frame`.
    # oracle: a diagnostic, not a method: the annotated action frames are the causal frames (IGV's losses trained on
    # the true split, read from the dataset's segments in training and at test; igv only, without rationale_frames)
    indicator: Literal["per_frame", "budget", "oracle"] = "budget"
    noise_scale: float = field(default=1.0, metadata=bounds(0.0))  # IGV / EIGV: scale of the indicator's logistic noise
    # IGV's three losses (causal-only, swapped, environment-only). EIGV's paper trains only its mixup and contrastive
    # terms (false: they are then the whole objective, and the head's own loss is not added); true keeps them beside
    # (ours, the earlier form). Required true for igv.
    igv_terms: bool = True
    # the prediction returned at test time: causal (IGV: the causal frames') | video (EIGV's code: the whole video's)
    predict: Literal["causal", "video"] = "causal"
    # a side of the split with no frame (a video with no causal frame, or none in its environment): zeros (IGV's code,
    # hga.py: the encoder reads the L frames of `vid_feats * mask`, zeros, and the straight-through gradient into the
    # mask stays live) | whole_video (ours, earlier: the whole video at weight 1; the environment side then sends the
    # mask no gradient). Runs from before the option were computed as whole_video.
    empty_side: Literal["zeros", "whole_video"] = field(default="zeros", metadata=predating("whole_video"))
    # IGV's intervention on a detached mask (IGV's code: `bg_mask.bool()` before `intervene`, so the swap loss trains
    # the head and not the indicator) | false (ours, earlier: the swap loss reaches the indicator through g)
    swap_detach: bool = field(default=True, metadata=predating(False))
    # what the indicator grounds the frames on: classes (ours: each frame attends over every class text T0, no label)
    # | label (EIGV's code: the ground-truth question-answer, here the label's class text t_y, in training; the mixed
    # video on the λ1-mixed label texts; at test, where only the scores need it, the head's whole-video prediction)
    indicator_query: Literal["classes", "label"] = "classes"
    # train.grad_clip over: separate (the head's parameters by their own norm, as in the head's ungrounded row; the
    # grounding modules by theirs) | joint (ours, earlier: one norm over the head, the scorers and the projection).
    # IGV's and EIGV's code clip nothing; every row here clips at train.grad_clip.
    clip: Literal["separate", "joint"] = field(default="separate", metadata=predating("joint"))

    @property
    def active(self) -> bool:
        return self.method != "none" or self.rationale_frames is not None


def grounding_options(cfg: Config, name: str | None) -> GroundingOptions | None:
    """The named section `grounding.<name>` as typed options; None for no grounding."""
    if name is None:
        return None
    if name not in cfg.grounding:
        raise ConfigError(f"unknown grounding {name!r}; pipeline.yaml defines grounding: {sorted(cfg.grounding)}")
    return build_section(GroundingOptions, cfg.grounding[name] or {}, f"grounding.{name}")


def validate(cfg: Config) -> list[str]:
    """Every `grounding.<name>` section is typed and checked (called by the head registry's validator)."""
    errors = []
    for name, section in cfg.grounding.items():
        if section is not None and not isinstance(section, dict):
            errors.append(f"grounding.{name}: expected a mapping of options, got {section!r}")
            continue
        try:
            opts = grounding_options(cfg, name)
        except ConfigError as e:
            errors.append(str(e))
            continue
        if not opts.active:
            errors.append(f"grounding.{name}: turns nothing on; set method (igv | eigv) or rationale_frames")
        if not opts.igv_terms and opts.method != "eigv":
            errors.append(
                f"grounding.{name}.igv_terms: false leaves {opts.method!r} no training objective of its own; only eigv "
                "(its mixup and contrastive terms) trains without IGV's losses; set igv_terms: true"
            )
        if opts.indicator == "oracle" and (opts.method != "igv" or opts.rationale_frames is not None):
            errors.append(
                f"grounding.{name}.indicator: oracle (the annotated action frames) is a diagnostic for method igv "
                "without rationale_frames (EIGV re-grounds mixed videos, STR moves the frames); use method: igv"
            )
        if opts.predict == "video" and opts.method == "none":
            errors.append(f"grounding.{name}.predict: video needs an indicator (method igv | eigv) to choose against")
        if opts.indicator_query == "label" and (opts.method == "none" or opts.predict != "video"):
            errors.append(
                f"grounding.{name}.indicator_query: label grounds the frames on the label's class text, which a test "
                "video does not have; it needs an indicator (method igv | eigv) and predict: video (EIGV's code: the "
                "prediction at test time is the whole video's)"
            )
        if opts.indicator_query == "label" and opts.indicator == "oracle":
            errors.append(f"grounding.{name}.indicator_query: label has no indicator to query under indicator: oracle")
    return errors


class FrameScorer(nn.Module):
    """r_l: how much frame l speaks to the class vocabulary. Each frame's CLIP embedding attends over the class
    text embeddings T0 (cross-attention, frames as queries); r_l = w · tanh(W_f vp_l + Σ_c a_lc W_v t_c).

    With a query q (B, C), a distribution over the classes (EIGV's label-conditioned indicator: the label, or the
    λ1-mixed labels of a mixed video), the frame's attention a_l· is replaced by q: r_l = w · tanh(W_f vp_l +
    Σ_c q_c W_v t_c), the frame scored against the queried class text."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.w_q = nn.Linear(clip_dim, dim)  # frames as queries
        self.w_k = nn.Linear(clip_dim, dim)  # class texts as keys
        self.w_v = nn.Linear(clip_dim, dim)  # ... and values
        self.w_f = nn.Linear(clip_dim, dim)  # the frame's own term
        self.w = nn.Linear(dim, 1)
        self.scale = dim**-0.5

    def forward(self, vp: torch.Tensor, t0: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """vp (B, L, Dc), t0 (C, Dc), query (B, C) or None -> frame scores r (B, L)."""
        if query is None:
            a = torch.einsum("bld,cd->blc", self.w_q(vp), self.w_k(t0)).mul(self.scale).softmax(-1)  # (B, L, C)
        else:
            a = query.to(vp.dtype).unsqueeze(1)  # (B, 1, C): the queried classes, the same for every frame
        text = a @ self.w_v(t0)  # the class text each frame points to, (B, L, dim) or (B, 1, dim)
        return self.w(torch.tanh(self.w_f(vp) + text)).squeeze(-1)  # (B, L)


def ranks(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank of each frame by score within its video, 0 = highest; padded frames rank last. (B, L) -> (B, L)."""
    z = scores.detach().masked_fill(~mask, -torch.inf)
    return z.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def causal_budget(mask: torch.Tensor, share: float) -> torch.Tensor:
    """How many of each video's real frames the indicator marks causal: max(1, min(n - 1, round(share · n))) of its
    n real frames (a video with one real frame keeps it causal). mask (B, L) -> (B,)."""
    n = mask.sum(1)  # (B,)
    return (share * n.float()).round().long().clamp(max=(n - 1).clamp_min(1)).clamp_min(1)


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard logistic noise (std π/√3 ≈ 1.81), the difference of two Gumbels: the binary Gumbel-softmax's."""
    u = torch.rand_like(like).clamp(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()


def per_frame_causal(z: torch.Tensor, mask: torch.Tensor, fallback: bool = True) -> torch.Tensor:
    """IGV's per-frame decision: frame l is causal iff z_l > 0 (the binary Gumbel-softmax's hard sample: the first
    of the two classes wins). `fallback`: a video with no causal frame keeps every real frame (the frames its
    causal view reads: IGV's encoder falls back to every frame); else its causal frames stay empty (the views then
    read its zeroed frames, `empty_side: zeros`). (B, L) -> (B, L)."""
    hard = (z > 0) & mask
    return torch.where(hard.any(1, keepdim=True), hard, mask) if fallback else hard


def label_query(y: torch.Tensor) -> torch.Tensor:
    """EIGV's label-conditioned indicator: targets (B, C) (one-hot, multi-hot or a mixup's soft target) -> the
    distribution over classes whose text grounds the frames, (B, C) rows summing to 1 (0 for a video with none)."""
    y = y.float().clamp_min(0)
    return y / y.sum(1, keepdim=True).clamp_min(1e-12)


def causal_split(
    scores: torch.Tensor,
    mask: torch.Tensor,
    share: float,
    tau: float,
    noise: bool,
    indicator: str = "budget",
    noise_scale: float = 1.0,
    empty_side: str = "whole_video",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grounding indicator: scores (B, L), mask (B, L) -> hard causal mask (B, L) bool and the
    straight-through weight g (B, L) (value = hard, gradient of the binary Gumbel-softmax sigmoid(z / tau)).

    z = r + noise_scale · logistic noise (training) or r (eval). `per_frame` (IGV): frame l is causal iff z_l > 0,
    the hard decision of the same sigmoid (`per_frame_causal`); a video with none keeps every frame causal under
    `empty_side: whole_video` (ours, earlier), and none under `zeros` (IGV's code: its causal view is its zeroed
    frames, `side_view`). `budget` (ours): the top max(1, min(n - 1, round(share · n))) of a video's n real frames
    are causal (a video with one real frame keeps it causal)."""
    z = scores
    if noise and noise_scale > 0:
        z = scores + noise_scale * logistic_noise(scores)
    if indicator == "per_frame":
        hard = per_frame_causal(z, mask, fallback=empty_side == "whole_video")
    else:
        k = causal_budget(mask, share)  # (B,)
        hard = (ranks(z, mask) < k.unsqueeze(1)) & mask  # (B, L)
    soft = torch.sigmoid(z / tau)
    g = hard.to(soft.dtype) + soft - soft.detach()  # straight-through, (B, L)
    return hard, g


def top_k_frames(scores: torch.Tensor, mask: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """STR's selection: the top-k real frames of each video in temporal order.

    scores (B, L), mask (B, L) -> indices (B, k) into the frames, sorted in time, and straight-through weights
    (B, k): value 1, gradient of s = softmax_l(r_l / tau) at the chosen frames. A video with fewer than k
    real frames keeps all of them (its remaining slots point at padded frames, which stay masked)."""
    k = min(k, scores.shape[1])
    idx = ranks(scores, mask).argsort(dim=1)[:, :k].sort(1).values  # frame index of ranks 0..k-1, in time order
    soft = masked_softmax(scores / tau, mask)  # (B, L)
    s = soft.gather(1, idx)  # (B, k)
    return idx, 1.0 + s - s.detach()


def hard_top_k(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the top-k real frames of every row of scores (..., L), sorted in time. Padded frames rank
    last in index order (stable sort), so a video with fewer than k real frames keeps all of them and then the
    same padded slots whatever the scores."""
    z = scores.detach().masked_fill(~mask, -torch.inf)
    return z.argsort(dim=-1, descending=True, stable=True)[..., :k].sort(-1).values


class _PerturbedTopK(torch.autograd.Function):
    """Berthet et al. 2020 perturbed optimiser for top-k (as in Cordonnier et al. 2021 and TranSTR's `topk.py`).

    forward: y(r) = E_Z[Y*(r + σZ)], Y*(·) the K-hot indicators (k, L) of the hard top-k (slots in time order),
    estimated with n samples Z ~ N(0, I). backward (`full`, Berthet et al.'s Jacobian): ∂y_kl/∂r_m = E_Z[Y*_kl Z_m]
    / σ, so for an upstream gradient G (k, L) the scores get E_Z[⟨G, Y*⟩ Z] / σ (the same samples). `diagonal`
    (TranSTR's and Cordonnier et al.'s code, `einsum("bnkd,bnd->bkd")`): only the terms m = l, E_Z[Y*_kl Z_l] / σ,
    so a score learns only from its own frame's indicators."""

    @staticmethod
    def forward(ctx, scores, mask, k: int, samples: int, sigma: float, grad_form: str):  # noqa: ANN001, ANN205
        B, L = scores.shape
        noise = torch.randn(B, samples, L, dtype=scores.dtype, device=scores.device)  # torch RNG: resumable
        idx = hard_top_k(scores.unsqueeze(1) + sigma * noise, mask.unsqueeze(1), k)  # (B, n, k)
        hot = F.one_hot(idx, L).to(scores.dtype)  # (B, n, k, L)
        ctx.save_for_backward(hot, noise, mask)
        ctx.sigma, ctx.grad_form = sigma, grad_form
        return hot.mean(1)  # (B, k, L)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hot, noise, mask = ctx.saved_tensors  # (B, n, k, L), (B, n, L), (B, L)
        n = noise.shape[1]
        if ctx.grad_form == "full":
            inner = torch.einsum("bkl,bnkl->bn", grad, hot)  # ⟨G, Y*_s⟩ per sample, (B, n)
            out = torch.einsum("bn,bnl->bl", inner, noise) / (n * ctx.sigma)  # (B, L)
        else:
            out = (grad * torch.einsum("bnkl,bnl->bkl", hot, noise)).sum(1) / (n * ctx.sigma)  # (B, L)
        return out * mask, None, None, None, None, None  # padded frames: no gradient


def perturbed_top_k(
    scores: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    samples: int,
    sigma: float,
    training: bool,
    grad_form: str = "full",
) -> tuple[torch.Tensor, torch.Tensor]:
    """STR's differentiable top-k: scores (B, L), mask (B, L) -> indicators (B, k, L) and hard indices (B, k).

    Training: the mean K-hot indicators of the hard top-k of `samples` Gaussian-perturbed scores (σ = sigma), with
    the perturbed-optimiser gradient; eval: the hard top-k's one-hot indicators. Row j of the indicators weighs the
    frames for the j-th selected slot (slots in time order); the hard indices are the top-k of the scores."""
    k = min(k, scores.shape[1])
    idx = hard_top_k(scores, mask, k)
    if not training:
        return F.one_hot(idx, scores.shape[1]).to(scores.dtype), idx
    return _PerturbedTopK.apply(scores, mask, k, samples, sigma, grad_form), idx


def derangements(m: int, n: int, device: Any) -> torch.Tensor:
    """m random permutations without fixed points (n ≥ 2), (m, n), drawn at once: a single cycle each."""
    p = torch.rand(m, n, device=device).argsort(1)
    return torch.empty_like(p).scatter_(1, p, p.roll(-1, dims=1))


def derangement(n: int, device: Any) -> torch.Tensor:
    """A random permutation without fixed points (n ≥ 2): each video receives another video's frames."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long, device=device)
    p = torch.randperm(n, device=device)
    perm = torch.empty_like(p)
    perm[p] = p.roll(-1)  # a single cycle through a random order
    return perm


def masked_view(batch: Batch, weight: torch.Tensor, mask: torch.Tensor) -> Batch:
    """The same videos with frame features scaled by weight (B, L) and the frame mask replaced by mask (B, L)."""
    w = weight.unsqueeze(-1)
    return dataclasses.replace(batch, **{k: getattr(batch, k).float() * w for k in FEATURES}, mask=mask)


def side_view(batch: Batch, weight: torch.Tensor, side: torch.Tensor) -> Batch:
    """One side of the split: the frames `side` (B, L) bool, scaled by weight (B, L). A video whose side is empty
    reads as all its real frames scaled by weight, which is 0 there in value: zeros, with the straight-through
    gradient into the mask live (IGV's code, hga.py: the encoder reads `vid_feats * mask` and falls back to every
    frame when the mask keeps none)."""
    side = side & batch.mask
    empty = ~side.any(1, keepdim=True)  # (B, 1)
    return masked_view(batch, weight, torch.where(empty, batch.mask, side))


def causal_view(batch: Batch, g: torch.Tensor, hard: torch.Tensor) -> Batch:
    """The causal frames (weight g); a video with none: its zeroed frames (`side_view`). Under `empty_side:
    whole_video` the indicator already kept every frame of such a video (`causal_split`). g, hard (B, L)."""
    return side_view(batch, g, hard)


def environment_view(batch: Batch, g: torch.Tensor, hard: torch.Tensor, empty_side: str = "whole_video") -> Batch:
    """The environment frames alone (weight 1 - g). A video with none: `zeros` (IGV's code) its zeroed frames with
    the gradient live (`side_view`); `whole_video` (ours, earlier) its whole video, unweighted (no gradient to the
    mask). g, hard (B, L)."""
    env = batch.mask & ~hard  # (B, L)
    if empty_side == "zeros":
        return side_view(batch, 1 - g, env)
    empty = ~env.any(1, keepdim=True)  # (B, 1)
    return masked_view(batch, torch.where(empty, torch.ones_like(g), 1 - g), torch.where(empty, batch.mask, env))


def swap_keep(
    g: torch.Tensor, hard: torch.Tensor, mask: torch.Tensor, detach: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What IGV's intervention keeps of each video: -> (weight (B, L), kept frames (B, L) bool). The kept frames are
    the causal ones, every real frame for a video with none (IGV's code: its encoder's fallback mask, whose
    complement is the swapped part, so such a video is not swapped); weight is their indicator, detached (IGV's
    code: `bg_mask.bool()`) or straight-through with g's gradient (`swap_detach: false`, ours, earlier)."""
    keep = torch.where(hard.any(1, keepdim=True), hard, mask) & mask
    value = keep.to(g.dtype)
    return (value if detach else value + g - g.detach()), keep


def swapped_view(
    batch: Batch, g: torch.Tensor, hard: torch.Tensor, perm: torch.Tensor, source: Batch | None = None
) -> Batch:
    """IGV's intervention: video b's kept frames (weight g, slots `hard`), and in its other slots the frames of
    video perm[b] of `source` (default: the batch itself). perm may index a larger batch than `source`'s rows
    only through `source`; g, hard, perm are (B', L), (B', L), (B',) for a batch of B' videos."""
    source = batch if source is None else source
    w = g.unsqueeze(-1)
    mix = {k: w * getattr(batch, k).float() + (1 - w) * getattr(source, k)[perm].float() for k in FEATURES}
    return dataclasses.replace(batch, **mix, mask=torch.where(hard, batch.mask, source.mask[perm]))


def repeated(batch: Batch, n: int) -> Batch:
    """The batch's videos n times over (n·B videos, copy j of video b at row j·B + b)."""
    rep = {k: getattr(batch, k).repeat(n, *([1] * (getattr(batch, k).dim() - 1))) for k in (*FEATURES, "mask")}
    labels = None if batch.labels is None else batch.labels.repeat(n, *([1] * (batch.labels.dim() - 1)))
    return dataclasses.replace(batch, **rep, labels=labels)


def eigv_mixed_batch(
    batch: Batch, g: torch.Tensor, perm: torch.Tensor, lam1: torch.Tensor, lam2: torch.Tensor
) -> Batch:
    """EIGV's mixup (the paper's intervener): slot by slot,
    v_mix = λ1 c_b + (1 - λ1) c_perm[b] + λ2 e_b + (1 - λ2) e_perm[b], with c = g ⊙ v, e = (1 - g) ⊙ v on the real
    frames (each video split by its own grounding g (B, L), straight-through); labels left to the caller."""
    m = batch.mask.to(g.dtype)
    c, e = (g * m).unsqueeze(-1), ((1 - g) * m).unsqueeze(-1)  # (B, L, 1)
    own = lam1 * c + lam2 * e  # weight of video b's frame in its slot
    other = ((1 - lam1) * c + (1 - lam2) * e)[perm]  # weight of video perm[b]'s frame in the same slot
    mix = {k: own * getattr(batch, k).float() + other * getattr(batch, k)[perm].float() for k in FEATURES}
    return dataclasses.replace(batch, **mix, mask=batch.mask | batch.mask[perm])


def mixed_batch(batch: Batch, perm: torch.Tensor, lam: float) -> Batch:
    """EIGV's mixup: v_mix = λ v_b + (1 - λ) v_perm[b] (frame by frame); labels left to the caller."""
    mix = {k: lam * getattr(batch, k).float() + (1 - lam) * getattr(batch, k)[perm].float() for k in FEATURES}
    return dataclasses.replace(batch, **mix, mask=batch.mask | batch.mask[perm])


def gathered_view(batch: Batch, idx: torch.Tensor, weight: torch.Tensor) -> Batch:
    """The frames idx (B, k) of every video, scaled by weight (B, k): a batch with L = k."""

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    feats = {k: take(getattr(batch, k)).float() * weight.unsqueeze(-1) for k in FEATURES}
    return dataclasses.replace(batch, **feats, mask=batch.mask.gather(1, idx))


def soft_loss(logits: torch.Tensor, target: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Loss against soft targets (B, C): CE with a distribution, or BCE with probabilities."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return -(target.float() * logits.float().log_softmax(-1)).sum(-1).mean()


def one_hot_targets(labels: torch.Tensor, num_classes: int, multi_label: bool) -> torch.Tensor:
    """(B,) class ids or (B, C) multi-hot -> (B, C) float targets."""
    return labels.float() if multi_label else F.one_hot(labels, num_classes).float()


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views (B, C) of the same videos: row b of a matches row b of b."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    sim = a @ b.T / tau  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


def info_nce_negatives(anchor: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """EIGV's contrastive disruptor: InfoNCE of anchors (B, D) against their positives (B, D) and their own negatives
    (N, B, D), cosine similarity / tau, the positive the target class."""
    a, p, n = (F.normalize(x.float(), dim=-1) for x in (anchor, pos, neg))
    logits = torch.cat([(a * p).sum(-1, keepdim=True), torch.einsum("bd,nbd->bn", a, n)], 1) / tau  # (B, 1 + N)
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


@contextlib.contextmanager
def frozen_memories(module: nn.Module) -> Iterator[None]:
    """Within the block, heads' dataset-level memories (modules with `memory_updates`) are not updated."""
    holders = [m for m in module.modules() if hasattr(m, "memory_updates")]
    before = [m.memory_updates for m in holders]
    for m in holders:
        m.memory_updates = False
    try:
        yield
    finally:
        for m, b in zip(holders, before, strict=True):
            m.memory_updates = b


class Grounded(nn.Module):
    """A head behind STR rationales and/or IGV/EIGV grounding: forward(batch) -> logits (B, C)."""

    def __init__(self, head: nn.Module, opts: GroundingOptions, ctx: HeadContext):
        super().__init__()
        self.head, self.opts = head, opts
        self.num_classes, self.multi_label = ctx.num_classes, ctx.multi_label
        self.rationale = FrameScorer(ctx.clip_dim, opts.dim) if opts.rationale_frames is not None else None
        self.indicator = FrameScorer(ctx.clip_dim, opts.dim) if opts.method != "none" else None
        paper_eigv = opts.method == "eigv" and opts.mix == "paper"
        # EIGV's projection head of the contrastive disruptor, on the head's class scores (B, C) -> (B, dim)
        self.project = (
            nn.Sequential(nn.Linear(ctx.num_classes, opts.dim), nn.ReLU(), nn.Linear(opts.dim, opts.dim))
            if paper_eigv
            else None
        )
        if opts.method != "none" and opts.env_source == "bank":
            # the environment bank: earlier training videos' frames as the indicator sees them (after STR's selection),
            # with their split positions; persistent buffers, so a resumed run continues with the same bank
            M, Lv = opts.env_bank, opts.rationale_frames or ctx.num_frames
            dims = {"vp": ctx.clip_dim, "v": ctx.video_dim, "fg": ctx.clip_dim, "bg": ctx.clip_dim}
            for k in FEATURES:
                self.register_buffer(f"bank_{k}", torch.zeros(M, Lv, dims[k], dtype=torch.float16))  # (M, L, D)
            self.register_buffer("bank_mask", torch.zeros(M, Lv, dtype=torch.bool))  # (M, L)
            self.register_buffer("bank_ids", torch.full((M,), -1, dtype=torch.long))  # (M,), -1 = empty
            self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))  # the next slot to overwrite
        self.aux_loss: torch.Tensor | None = None
        self.oracle_frames: torch.Tensor | None = None  # `indicator: oracle`: (N, L) annotated frames of the split read
        self.mix_lambdas: tuple[float, float] | None = None  # EIGV: fixed (λ1, λ2) instead of sampling (tests)
        self.mix_record: dict[str, torch.Tensor] | None = None  # EIGV: the last step's λ1, λ2, perm, soft target

    @staticmethod
    def init_key(name: str) -> str:
        """The head's modules are seeded by their names in the head alone, so `x` and `x+igv` start alike
        (train.heads.common.initialise); the wrapper's own modules by names no head uses."""
        if name == "head":
            return ""
        return name.removeprefix("head.") if name.startswith("head.") else f"grounding/{name}"

    def select(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """STR's rationale frames: -> the head's batch and the frame indices (B, K) (or (B, L): every frame)."""
        B, L = batch.mask.shape
        if self.rationale is None:
            return batch, torch.arange(L, device=batch.mask.device).expand(B, L)
        o = self.opts
        scores = self.rationale(batch.vp.float(), batch.t0.float())  # (B, L)
        if o.rationale_selector == "straight_through":
            idx, weight = top_k_frames(scores, batch.mask, o.rationale_frames, o.tau)
            return gathered_view(batch, idx, weight), idx
        if not self.training:  # hard top-K at eval
            idx = hard_top_k(scores, batch.mask, min(o.rationale_frames, L))
            return gathered_view(batch, idx, torch.ones_like(idx, dtype=torch.float32)), idx
        ind, idx = perturbed_top_k(
            scores, batch.mask, o.rationale_frames, o.perturb_samples, o.perturb_sigma, True, o.perturb_grad
        )
        feats = {k: torch.einsum("bkl,bld->bkd", ind, getattr(batch, k).float()) for k in FEATURES}
        return dataclasses.replace(batch, **feats, mask=batch.mask.gather(1, idx)), idx

    @property
    def banked(self) -> bool:
        return hasattr(self, "bank_ids")

    def bank_frames(self, ids: torch.Tensor | None, n: int, L: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """n environments of L frames per video, as IGV's memory bank samples them: every frame a random real frame
        of a random filled entry that holds another video. ids (B,) or (B, S): the split positions each video's
        environments must avoid (a mixed video: both of its sources, as EIGV's `MemBank` excludes them). ->
        (entry, frame) indices into the bank, each (n·B, L), row j·B + b for copy j of video b; None while some
        video has no such frame (the batch stands in). Without split positions (`ids`, a batch built outside a
        split) only emptiness is checked."""
        B, (M, Lb) = (1 if ids is None else ids.shape[0]), self.bank_mask.shape
        ok = (self.bank_ids != -1).expand(B, M)  # (B, M) filled entries (-2: a video of unknown position)
        if ids is not None:
            avoid = ids.reshape(B, -1).to(self.bank_ids.device)  # (B, S)
            ok = ok & (self.bank_ids[None, :, None] != avoid[:, None, :]).all(-1)  # never the video itself
        weight = (ok[:, :, None] & self.bank_mask[None]).flatten(1).float()  # (B, M·Lb) real frames of those
        if not (weight.sum(1) > 0).all():
            return None
        pick = torch.multinomial(weight, n * L, replacement=True)  # (B, n·L), torch RNG: resumable
        pick = pick.view(B, n, L).transpose(0, 1).reshape(n * B, L)  # copy-major rows
        return pick // Lb, pick % Lb

    @torch.no_grad()
    def bank_push(self, batch: Batch) -> None:
        """The batch's videos into the bank (first in, first out), after the step has used the bank."""
        B, M = batch.mask.shape[0], self.bank_ids.shape[0]
        slots = (self.bank_next + torch.arange(B, device=self.bank_ids.device)) % M  # (B,)
        keep = slots if B <= M else slots[-M:]
        rows = torch.arange(B, device=keep.device)[-len(keep) :]
        for k in FEATURES:
            getattr(self, f"bank_{k}")[keep] = getattr(batch, k)[rows].detach().to(torch.float16)
        self.bank_mask[keep] = batch.mask[rows]
        ids = batch.ids if batch.ids is not None else torch.full((B,), -2, dtype=torch.long)  # -2: position unknown
        self.bank_ids[keep] = ids[rows].to(self.bank_ids.device)
        self.bank_next.copy_((self.bank_next + B) % M)

    def environments(self, batch: Batch, n: int, avoid: torch.Tensor | None = None) -> tuple[Batch, torch.Tensor]:
        """Where n substituted environments per video come from: (source batch, (n, B) indices into it). With the
        bank (`env_source: bank`, once it can serve every video), each environment frame is a random frame of a
        random other banked training video (`bank_frames`; `avoid` (B, S): the split positions to avoid, default
        the batch's own), assembled into n·B source videos; else derangements of the batch (the environment at a
        slot is another batch video's frame at that slot)."""
        B, L = batch.mask.shape
        if self.banked:
            drawn = self.bank_frames(batch.ids if avoid is None else avoid, n, L)
            if drawn is not None:
                entry, frame = drawn  # (n·B, L) each
                frames = {k: getattr(self, f"bank_{k}")[entry, frame] for k in FEATURES}  # (n·B, L, D) each
                real = torch.ones(n * B, L, dtype=torch.bool, device=batch.mask.device)  # drawn among real frames
                source = dataclasses.replace(batch, **frames, mask=real)
                return source, torch.arange(n * B, device=batch.mask.device).view(n, B)
        perms = derangement(B, batch.mask.device)[None] if n == 1 else derangements(n, B, batch.mask.device)
        return batch, perms

    def sample_lambdas(self, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """EIGV's λ1 ~ Beta(a, a) (causal frames) and an independent λ2 ~ Beta(a2, a2) (environment frames)."""
        if self.mix_lambdas is not None:
            return tuple(torch.tensor(x, dtype=torch.float32, device=device) for x in self.mix_lambdas)
        a1 = torch.tensor(self.opts.mix_alpha)
        a2 = torch.tensor(self.opts.env_mix_alpha if self.opts.env_mix_alpha is not None else self.opts.mix_alpha)
        lam1 = torch.distributions.Beta(a1, a1).sample()  # torch RNG: resumable
        lam2 = torch.distributions.Beta(a2, a2).sample()
        return lam1.to(device), lam2.to(device)

    def ground(self, batch: Batch, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The indicator's causal frames: -> hard (B, L) bool, straight-through g (B, L). query (B, C): the classes
        the frames are grounded on (`indicator_query: label`; None: each frame attends over every class text)."""
        o = self.opts
        if o.indicator == "oracle":
            return self.oracle_split(batch)
        scores = self.indicator(batch.vp.float(), batch.t0.float(), query)  # (B, L)
        return causal_split(
            scores, batch.mask, o.causal_share, o.tau, self.training, o.indicator, o.noise_scale, o.empty_side
        )

    def query(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The indicator's query for targets y (B, C): their class distribution under `indicator_query: label`,
        else None (the frames attend over the class texts themselves)."""
        return label_query(y) if self.opts.indicator_query == "label" and y is not None else None

    def oracle_split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`indicator: oracle`: the annotated action frames of the batch's videos (`oracle_frames`, (N, L) bool for
        the split being read, indexed by the batch's split positions) -> hard (B, L), g = hard (no gradient); a
        video with no annotated frame keeps every frame, as the per-frame indicator does."""
        if self.oracle_frames is None or batch.ids is None:
            raise RuntimeError(
                "indicator: oracle needs the annotated action frames of the split being read (train.engine sets "
                "`oracle_frames` from the dataset's segments); this dataset or call provides none"
            )
        hard = self.oracle_frames.to(batch.mask.device)[batch.ids.to(batch.mask.device)] & batch.mask  # (B, L)
        hard = torch.where(hard.any(1, keepdim=True), hard, batch.mask)
        return hard, hard.float()

    @property
    def owns_loss(self) -> bool:
        """In training, `aux_loss` is the whole objective (EIGV's paper: its mixup and contrastive terms only)."""
        return self.indicator is not None and not self.opts.igv_terms

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter groups train.grad_clip clips each by its own norm: the head's, then the grounding modules'
        (`clip: separate`), or all together (`clip: joint`, ours, earlier)."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        mine = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in mine]
        return [head, rest] if self.opts.clip == "separate" else [head + rest]

    def frames_used(self, batch: Batch) -> torch.Tensor:
        """Which of the batch's frames the prediction rests on, or (`predict: video`) which the indicator grounds:
        (B, L) bool (the grounding evaluation). A label-conditioned indicator is queried with the head's own
        whole-video prediction (no label at test time)."""
        view, idx = self.select(batch)
        used = view.mask
        if self.indicator is not None:
            query = None
            if self.opts.indicator_query == "label":
                logits = self.head(view).float()  # (B, C)
                query = label_query(logits.sigmoid() if self.multi_label else logits.softmax(-1))
            used = self.ground(view, query)[0]
        out = torch.zeros_like(batch.mask)
        return out.scatter(1, idx, used) & batch.mask

    def forward(self, batch: Batch) -> torch.Tensor:
        batch, _ = self.select(batch)
        if self.indicator is None:
            self.aux_loss = None
            return self.head(batch)
        o = self.opts
        if not self.training or batch.labels is None:
            self.aux_loss = None
            if o.predict == "video":  # EIGV's code: the whole video at test time
                return self.head(batch)
            hard, g = self.ground(batch)
            return self.head(causal_view(batch, g, hard))  # the prediction from the causal frames, (B, C)
        y = one_hot_targets(batch.labels, self.num_classes, self.multi_label)  # (B, C)
        hard, g = self.ground(batch, self.query(y))
        if not o.igv_terms:  # EIGV's paper: its mixup (the main view, memories updated) and contrastive terms alone
            self.aux_loss, logits = self.eigv_paper(batch, g, y, main=True)
        else:
            logits = self.head(causal_view(batch, g, hard))  # the prediction from the causal frames, (B, C)
            self.aux_loss = self.igv_losses(batch, g, hard, y, logits)
        if self.banked:
            self.bank_push(batch)  # after its use: the bank holds earlier videos only
        return logits

    def igv_losses(
        self, batch: Batch, g: torch.Tensor, hard: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """IGV's swapped and environment-only losses (the causal-only one is the head's own, on `logits`), and
        EIGV's terms beside them when `method: eigv` keeps `igv_terms` (ours)."""
        o, B = self.opts, hard.shape[0]
        source, perm = self.environments(batch, 1)
        with frozen_memories(self.head):
            # causal frames + another video's environment (from the bank, or the batch), on the detached mask
            # (IGV's code) or through g (`swap_detach: false`)
            weight, keep = swap_keep(g, hard, batch.mask, o.swap_detach)
            swapped = self.head(swapped_view(batch, weight, keep, perm[0], source=source))
            env = self.head(environment_view(batch, g, hard, o.empty_side))  # the environment frames alone
            # no class information: uniform over classes, or (multi-label) the batch's label frequency
            C = y.shape[1]
            uninformative = y.mean(0, keepdim=True).expand_as(y) if self.multi_label else torch.full_like(y, 1 / C)
            aux = o.swap_weight * soft_loss(swapped, y, self.multi_label)
            aux = aux + o.env_weight * soft_loss(env, uninformative, self.multi_label)
            if o.method == "eigv" and o.mix == "paper":
                aux = aux + self.eigv_paper(batch, g, y, main=False)[0]
            elif o.method == "eigv":
                a = torch.tensor(o.mix_alpha)
                lam = float(torch.distributions.Beta(a, a).sample()) if B > 1 else 1.0  # torch RNG: resumable
                mix_perm = derangement(B, hard.device)
                mixed = mixed_batch(batch, mix_perm, lam)
                target = lam * y + (1 - lam) * y[mix_perm]
                mix_hard, mix_g = self.ground(mixed, self.query(target))
                mix_logits = self.head(causal_view(mixed, mix_g, mix_hard))
                aux = aux + o.mix_weight * soft_loss(mix_logits, target, self.multi_label)
                aux = aux + o.contrast_weight * info_nce(logits, swapped, o.contrast_tau)
        return aux

    def eigv_paper(
        self, batch: Batch, g: torch.Tensor, y: torch.Tensor, main: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """EIGV's equivariance and contrastive-disruptor losses (training) -> (loss, the mixed video's logits).

        Mix two videos' causal frames with λ1 and their environments with λ2 (eigv_mixed_batch); the head's
        prediction on the mixed video must match λ1 y_b + (1 - λ1) y_perm[b] (λ2 does not enter the target). The
        mixed video is grounded again (a label-conditioned indicator on the λ1-mixed labels, EIGV's mixed
        question); anchor = its projected class scores, positive = the mixed video with its environment frames
        swapped for another video's, negatives = `contrast_negatives` copies with its causal frames swapped (InfoNCE,
        `contrast_tau`), the substituted frames never from either source video (EIGV's `MemBank` on the mixed
        video's two ids). `main`: the mixed video is the step's main view (EIGV's paper objective, `igv_terms:
        false`): the head's memories update on it, and with a single video in the batch (no other to mix with) the
        loss is the video's own (λ1 = λ2 = 1). Else the call runs under frozen memories."""
        o, B = self.opts, g.shape[0]
        if B < 2:  # no other video to mix or swap with
            self.mix_record = None
            if not main:
                return g.new_zeros(()), None
            logits = self.head(batch)  # the mixed video at λ1 = λ2 = 1 is the video itself
            return o.mix_weight * soft_loss(logits, y, self.multi_label), logits
        lam1, lam2 = self.sample_lambdas(g.device)
        perm = derangement(B, g.device)
        target = lam1 * y + (1 - lam1) * y[perm]  # the soft target follows λ1 only
        self.mix_record = {"lam1": lam1, "lam2": lam2, "perm": perm, "target": target.detach()}
        mixed = eigv_mixed_batch(batch, g, perm, lam1, lam2)
        mix_logits = self.head(mixed)  # (B, C); under frozen memories unless this is the main view
        aux = o.mix_weight * soft_loss(mix_logits, target, self.multi_label)
        if o.contrast_weight > 0:
            with frozen_memories(self.head):
                hard, mg = self.ground(mixed, self.query(target))
                avoid = None if batch.ids is None else torch.stack([batch.ids, batch.ids[perm]], 1)  # (B, 2)
                pos, negs = self.disrupted_views(batch, mixed, mg, hard, avoid)
                z = self.project(torch.cat([mix_logits, self.head(pos), self.head(negs)], 0).float())  # ((2+N)·B, D)
            N = o.contrast_negatives
            anchor, positive, negatives = z[:B], z[B : 2 * B], z[2 * B :].view(N, B, -1)
            contrast = info_nce_negatives(anchor, positive, negatives, o.contrast_tau)
            self.mix_record["contrast"] = contrast.detach()
            aux = aux + o.contrast_weight * contrast
        return aux, mix_logits

    def disrupted_views(
        self, batch: Batch, mixed: Batch, mg: torch.Tensor, hard: torch.Tensor, avoid: torch.Tensor | None
    ) -> tuple[Batch, Batch]:
        """EIGV's contrastive views of the mixed videos (B of them, grounded as `hard`, straight-through mg): the
        positive keeps the causal frames and takes its environment frames from elsewhere (EIGV's `mem_swap(bg_mask,
        v)`); the N = `contrast_negatives` negatives keep the environment frames and take their causal frames from
        elsewhere (`mem_swap(fg_mask.repeat(N))`), copy j of video b at row j·B + b. -> (positive (B videos),
        negatives (N·B videos))."""
        N = self.opts.contrast_negatives
        source, pos_idx = self.environments(batch, 1, avoid)
        pos = swapped_view(mixed, mg, hard, pos_idx[0], source=source)  # environment swapped
        source, neg_idx = self.environments(batch, N, avoid)
        env = mixed.mask & ~hard
        negs = swapped_view(repeated(mixed, N), (1 - mg).repeat(N, 1), env.repeat(N, 1), neg_idx.reshape(-1), source)
        return pos, negs


def wrap(head: nn.Module, opts: GroundingOptions | None, ctx: HeadContext, name: str = "") -> nn.Module:
    """The head itself without grounding, else the head behind its grounding `grounding.<name>`."""
    if opts is None or not opts.active:
        return head
    k = opts.rationale_frames
    if k is not None and k >= ctx.num_frames:
        raise ConfigError(
            f"grounding.{name}.rationale_frames: {k} keeps every one of the {ctx.num_frames} frames the cache "
            "holds per video; choose fewer"
        )
    return Grounded(head, opts, ctx)


# --------------------------------------------------------------------------------------------------
# Evaluation against annotated segments
# --------------------------------------------------------------------------------------------------


def frame_relevance(cfg: Config, reader: Any, rows: np.ndarray) -> np.ndarray | None:
    """(N, L') bool: the sampled frame lies inside an annotated action segment (the store's `segment_mask`, which
    stage 1 wrote from the dataset's segments), at the frames the heads see. None when the dataset annotates no
    segments (then no grounding score)."""
    if not reader.info.annotated_segments:
        log.warning("no grounding score: dataset %s annotates no action segments", reader.info.attrs.get("dataset"))
        return None
    inside = np.asarray(reader.group[schema.SEGMENT_MASK].get_orthogonal_selection(rows))  # (N, L)
    return inside[:, reader.slots]


def grounding_scores(used: np.ndarray, relevant: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Temporal IoU and precision of the frames used against the relevant frames, next to random frames.

    used, relevant, mask: (N, L) bool. `ground_iou` = mean over videos of |U ∩ R| / |U ∪ R| over real frames (a
    video that uses no frame scores 0 against its annotated ones: IGV's indicator can leave a video no causal
    frame); `ground_precision` = mean |U ∩ R| / |U| over the videos that use a frame (NaN when none does); the
    `_random` values are their exact expectations when the same number of frames is drawn uniformly at random from
    each video's real frames (hypergeometric overlap)."""
    from scipy.stats import hypergeom

    used, relevant = used & mask, relevant & mask
    n, k, g = mask.sum(1), used.sum(1), relevant.sum(1)  # real, used, relevant frames per video, (N,)
    inter = (used & relevant).sum(1)
    union = (used | relevant).sum(1)
    keep = k > 0  # videos that use a frame: precision is defined there
    scored = union > 0  # IoU is defined wherever a frame is used or annotated
    j = np.arange(mask.shape[1] + 1)[None, :]  # possible overlaps, (1, L + 1)
    pmf = hypergeom.pmf(j, n[:, None], g[:, None], k[:, None])  # P(|random ∩ R| = j), (N, L + 1)
    denom = k[:, None] + g[:, None] - j
    iou_random = np.where(denom > 0, pmf * j / np.maximum(denom, 1), 0.0).sum(1)

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if x.size else float("nan")

    return {
        "ground_iou": mean(inter[scored] / union[scored]),
        "ground_iou_random": mean(iou_random[scored]),
        "ground_precision": mean(inter[keep] / k[keep]),
        "ground_precision_random": mean(g[keep] / np.maximum(n[keep], 1)),
    }
