"""Grounding interventions (IGV, EIGV, STR rationales, the uniform prior) around every head."""

import csv
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from extract.contract.config import ConfigError, from_dict
from extract.contract.schema import FRAME_MASK
from tests.train.conftest import random_batch
from train.engine import RunError, loss_fn, training_loss
from train.grounding import (
    GROUND_KEYS,
    Grounded,
    causal_split,
    derangement,
    derangements,
    eigv_mixed_batch,
    frame_relevance,
    frozen_memories,
    grounding_options,
    grounding_scores,
    hard_top_k,
    perturbed_top_k,
    swapped_view,
    top_k_frames,
    wrap,
)
from train.heads import HeadContext, build_head, head_names, required_dictionaries

B, L, DC, DV, C = 6, 8, 32, 48, 5
GROUNDINGS = {
    "igv": {"method": "igv"},
    "eigv": {"method": "eigv"},
    "igv_frame": {"method": "igv", "indicator": "per_frame"},  # IGV's code's indicator (empty side: zeros)
    "igv_frame_whole": {"method": "igv", "indicator": "per_frame", "empty_side": "whole_video"},  # ours, earlier
    "eigv_paper": {"method": "eigv", "indicator": "per_frame", "igv_terms": False, "predict": "video"},
    "eigv_code": {  # EIGV's code's values and its label-grounded indicator
        "method": "eigv",
        "indicator": "per_frame",
        "indicator_query": "label",
        "igv_terms": False,
        "predict": "video",
        "mix_alpha": 0.1,
        "env_mix_alpha": 1.0,
        "contrast_weight": 0.0125,
        "tau": 0.9,
    },
    "rationale": {"rationale_frames": 4},
    "rationale_igv": {"method": "igv", "rationale_frames": 6},
    "eigv_video": {"method": "eigv", "mix": "video"},
    "rationale_st": {"rationale_frames": 4, "rationale_selector": "straight_through"},
}


def _context(multi_label: bool) -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    dicts = {}
    names = (("confounder", 6, DC), ("confounder_paper", 6, DC), ("global", 7, DC), ("global_video", 7, DV))
    for name, k, dim in names:
        prior = torch.arange(1, k + 1, dtype=torch.float32)
        dicts[name] = (unit(k, dim), prior / prior.sum())
    return HeadContext(DC, DV, L, C, multi_label, unit(C, DC), dicts)


def _cfg():
    return from_dict({"grounding": GROUNDINGS})


def _grounded(head_name: str, grounding: str, ctx: HeadContext, variant=None) -> Grounded:
    cfg = _cfg()
    assert set(required_dictionaries(cfg, head_name, variant)) <= set(ctx.dictionaries)
    return Grounded(build_head(head_name, cfg, ctx, variant), grounding_options(cfg, grounding), ctx)


CASES = [
    ("igv", False),
    ("igv", True),
    ("eigv", False),
    ("eigv", True),
    ("igv_frame", False),
    ("eigv_paper", False),
    ("eigv_paper", True),
    ("eigv_code", False),
    ("eigv_code", True),
    ("rationale", False),
    ("rationale_igv", True),
]


@pytest.mark.parametrize("grounding,multi_label", CASES, ids=[f"{g}-{'atomic' if m else 'activity'}" for g, m in CASES])
@pytest.mark.parametrize("head_name", head_names())
def test_every_grounding_with_every_head(head_name, grounding, multi_label):
    torch.manual_seed(0)
    ctx = _context(multi_label)
    model = _grounded(head_name, grounding, ctx)
    batches = [random_batch(ctx, B, seed) for seed in (1, 2)]
    model.train()
    logits = model(batches[0])
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    if model.indicator is not None:
        assert model.aux_loss is not None and torch.isfinite(model.aux_loss)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(60):
        batch = batches[step % 2]
        logits = model(batch)
        loss = loss_fn(logits, batch.labels, multi_label)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        training_loss(model, logits, batch.labels, multi_label).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = np.mean([float(loss_fn(model(b), b.labels, multi_label)) for b in batches])
        assert model.aux_loss is None  # auxiliary views only in training
    assert final < 0.7 * first, (first, final)


def _toy_grounding_batch(ctx: HeadContext, shortcut: float):
    """48 videos of 8 frames: in each, 4 random frames show the class (its text embedding plus noise); the other 4
    show `shortcut` × the text embedding of the next class (as predictive in training as the action) plus noise."""
    g = torch.Generator().manual_seed(3)
    n = 48
    labels = torch.randint(0, C, (n,), generator=g)
    relevant = torch.rand(n, L, generator=g).argsort(1) < L // 2  # (n, L): the frames that carry the action
    noise = lambda *s: 0.1 * torch.randn(*s, generator=g)  # noqa: E731
    env = shortcut * ctx.t0[(labels + 1) % C].unsqueeze(1)  # (n, 1, Dc)
    vp = torch.where(relevant.unsqueeze(-1), ctx.t0[labels].unsqueeze(1) + noise(n, L, DC), env + noise(n, L, DC))
    batch = random_batch(ctx, n, seed=4, short=0)
    mask = torch.ones(n, L, dtype=torch.bool)
    return dataclasses.replace(batch, vp=vp, fg=vp, mask=mask, labels=labels, ids=torch.arange(n)), relevant


def _train_toy(grounding: str, batch, steps: int = 100) -> Grounded:
    torch.manual_seed(0)
    model = _grounded("baseline", grounding, _context(False), variant="clip_only")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits = model(batch)
        loss = training_loss(model, logits, batch.labels, False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("shortcut", [0.0, 0.5])
def test_budget_indicator_grounds_the_frames_that_carry_the_action(shortcut):
    """IGV's losses with the budget indicator (top half): on the toy batch it comes to pick the action frames, far
    above as many random frames, also when the environment frames carry a shortcut as predictive as the action
    (measured: IoU 0.91 without, 0.73 with the shortcut at 100 steps, random 0.36), and the prediction with another
    video's environment frames swapped in keeps the label."""
    ctx = _context(False)
    batch, relevant = _toy_grounding_batch(ctx, shortcut)
    model = _train_toy("igv", batch)
    with torch.no_grad():
        used = model.frames_used(batch)
        swapped = model.head(swapped_view(batch, used.float(), used, derangement(len(used), "cpu")))
    scores = grounding_scores(used.numpy(), relevant.numpy(), batch.mask.numpy())
    assert scores["ground_iou_random"] < 0.4, scores
    assert scores["ground_iou"] > (0.9 if shortcut == 0 else 0.65), scores
    assert float((swapped.argmax(-1) == batch.labels).float().mean()) > 0.75  # the label survives the swap


@pytest.mark.parametrize("grounding", ["igv_frame", "igv_frame_whole"])
def test_per_frame_indicator_without_a_budget_marks_every_frame_causal(grounding):
    """IGV's per-frame indicator on our (unbounded) frame scorer reaches the trivial split on the toy batch: every
    frame causal. Under our earlier empty side (`whole_video`: the empty environment reads as the whole video and
    sends the mask no gradient) its objective is then worse than the oracle's (the action frames causal) on the same
    head and interventions: an optimisation defect. Under IGV's code (`zeros`: the empty environment reads as zeroed
    frames, gradient live) the collapsed mask's objective is lower than the oracle's: the head maps the zeroed
    environment to the uniform prediction, so the environment term costs nothing there, and the collapse is the
    objective's own optimum on this batch, not a missing gradient (measured: learned 1.61 against oracle 2.80)."""
    from train.ground_check import objective_terms, weighted

    ctx = _context(False)
    batch, relevant = _toy_grounding_batch(ctx, 0.0)
    model = _train_toy(grounding, batch)
    with torch.no_grad():
        used = model.frames_used(batch)
        assert used.all()  # the trivial solution: no environment frame left
        objective = {}
        for name, hard in (("learned", used), ("oracle", relevant)):
            terms = objective_terms(model, batch, hard, torch.Generator().manual_seed(0))
            objective[name] = weighted(model, {k: float(v) for k, v in terms.items()})
    if grounding == "igv_frame_whole":
        assert objective["learned"] > objective["oracle"], objective
    else:
        assert objective["learned"] < objective["oracle"], objective


def _env_term(model: Grounded, batch, scores: torch.Tensor) -> torch.Tensor:
    """IGV's environment term of `model` with the indicator's scores given: CE(head(e), uniform)."""
    o = model.opts
    hard, g = causal_split(scores, batch.mask, o.causal_share, o.tau, False, o.indicator, 0.0, o.empty_side)
    from train.grounding import environment_view

    return soft_loss_of(model.head(environment_view(batch, g, hard, o.empty_side)), torch.full((len(hard), C), 1 / C))


@pytest.mark.parametrize("grounding", ["igv_frame", "igv_frame_whole"])
def test_the_environment_term_sends_a_gradient_at_an_empty_environment(grounding):
    """At the all-causal state (every frame's logit > 0, no environment frame) IGV's code reads the environment as
    the frames times the straight-through mask 1 - g, zeros in value: the environment term's gradient into the
    scores is, by the chain rule, ∂L/∂w_l · (-σ'(r_l / τ) / τ) with ∂L/∂w_l the term's gradient in the frame
    weights at w = 0 (computed here on its own). Our earlier form (`whole_video`) reads the whole video unweighted:
    exactly no gradient."""
    torch.manual_seed(0)
    ctx = _context(False)
    model = _grounded("baseline", grounding, ctx, variant="clip_only").eval()
    batch = random_batch(ctx, 4, short=0)
    scores = (2.0 + torch.rand(4, L)).requires_grad_()  # every logit > 0: all causal
    _env_term(model, batch, scores).backward()
    if grounding == "igv_frame_whole":
        assert torch.equal(scores.grad, torch.zeros_like(scores))
        return
    w = torch.zeros(4, L, requires_grad=True)  # the environment's frame weights, 0 in value
    from train.grounding import masked_view

    view = masked_view(batch, w, batch.mask)
    soft_loss_of(model.head(view), torch.full((4, C), 1 / C)).backward()
    s = torch.sigmoid(scores.detach() / model.opts.tau)
    expected = w.grad * (-s * (1 - s) / model.opts.tau)
    assert torch.allclose(scores.grad, expected, atol=1e-7), (scores.grad, expected)
    assert scores.grad.abs().max() > 1e-4  # (the head's gradient at zeros is not itself 0)


@pytest.mark.parametrize("detach", [True, False])
def test_the_swap_loss_trains_the_indicator_only_without_igvs_detach(detach):
    """IGV's code swaps on the detached mask (`bg_mask.bool()`): its swap loss sends the indicator no gradient.
    `swap_detach: false` (ours, earlier) reaches it through g: ∂L/∂r_l = (∂L/∂w_l) σ'(r_l / τ) / τ with w the kept
    frames' weight in v* = w ⊙ v + (1 - w) ⊙ v_π (its gradient taken on its own at the hard value)."""
    from train.grounding import swap_keep

    torch.manual_seed(0)
    ctx = _context(False)
    model = _grounded("baseline", "igv_frame", ctx, variant="clip_only").eval()
    batch = random_batch(ctx, 4, short=0)
    scores = torch.randn(4, L).requires_grad_()
    hard, g = causal_split(scores, batch.mask, 0.5, 1.0, False, "per_frame", 0.0, "zeros")
    perm = torch.tensor([1, 2, 3, 0])
    weight, keep = swap_keep(g, hard, batch.mask, detach)
    y = torch.eye(C)[batch.labels]
    soft_loss_of(model.head(swapped_view(batch, weight, keep, perm)), y).backward()
    if detach:
        assert scores.grad is None or torch.equal(scores.grad, torch.zeros_like(scores))
        return
    w = keep.float().requires_grad_()
    soft_loss_of(model.head(swapped_view(batch, w, keep, perm)), y).backward()
    sig = torch.sigmoid(scores.detach())
    assert torch.allclose(scores.grad, w.grad * sig * (1 - sig), atol=1e-7)
    assert w.grad.abs().max() > 1e-4


def test_swap_intervention_mixes_batch_members():
    for n in (2, 3, 7):
        perm = derangement(n, "cpu")
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()
        many = derangements(4, n, "cpu")  # several at once (EIGV's negatives)
        assert (many.sort(1).values == torch.arange(n)).all() and (many != torch.arange(n)).all()
    ctx = _context(False)
    batch = random_batch(ctx, B, short=0)
    ids = torch.arange(B, dtype=torch.float32)[:, None, None]  # video b's features are all b
    batch = dataclasses.replace(batch, vp=ids.expand(B, L, DC), v=ids.expand(B, L, DV))
    hard = torch.zeros(B, L, dtype=torch.bool)
    hard[:, :3] = True  # frames 0-2 causal, 3-7 environment
    perm = derangement(B, "cpu")
    out = swapped_view(batch, hard.float(), hard, perm)
    assert torch.equal(out.vp[:, :3, 0], ids[:, :, 0].expand(B, 3))  # own causal frames
    assert torch.equal(out.vp[:, 3:, 0], perm[:, None].float().expand(B, L - 3))  # environment of video perm[b]
    assert torch.equal(out.v[:, 3:, 0], perm[:, None].float().expand(B, L - 3))


def test_causal_split_keeps_a_budget_and_is_deterministic_in_eval():
    scores = torch.randn(5, L)
    mask = torch.ones(5, L, dtype=torch.bool)
    mask[1, 3:] = False  # 3 real frames
    mask[2, 1:] = False  # 1 real frame: it stays causal
    hard, g = causal_split(scores, mask, share=0.5, tau=1.0, noise=False)
    assert hard.sum(1).tolist() == [4, 2, 1, 4, 4]
    assert not (hard & ~mask).any()
    assert torch.allclose(g.detach(), hard.float())  # straight-through: the value is the hard mask
    top = scores.masked_fill(~mask, -torch.inf).topk(4, dim=1).indices
    assert hard[0, top[0]].all()  # without noise the highest scores are causal
    noisy = [causal_split(scores, mask, 0.5, 1.0, noise=True)[0] for _ in range(5)]
    assert any(not torch.equal(n, hard) for n in noisy)  # Gumbel noise explores in training


def test_per_frame_indicator_is_igvs_binary_gumbel_softmax_without_a_budget():
    """IGV's indicator: frame l causal iff its (noisy) logit > 0, the hard sample of the binary Gumbel-softmax whose
    straight-through gradient is that of sigmoid(z / tau); no budget; a video with no causal frame keeps them all."""
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-1.0, -2.0, -0.5, -4.0], [1.0, 1.0, -1.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    hard, g = causal_split(scores, mask, 0.5, tau=0.7, noise=False, indicator="per_frame")
    expected = [[True, False, True, False], [True, True, True, False], [True, True, False, False]]
    assert hard.tolist() == expected  # row 1: no logit > 0, every real frame causal; row 2: both real frames
    zeros = causal_split(scores, mask, 0.5, tau=0.7, noise=False, indicator="per_frame", empty_side="zeros")[0]
    assert zeros[1].tolist() == [False] * 4 and torch.equal(zeros[[0, 2]], hard[[0, 2]])  # IGV's code: none causal
    assert torch.allclose(g.detach(), hard.float())
    g.sum().backward()
    s = torch.sigmoid(scores.detach() / 0.7)
    assert torch.allclose(scores.grad, s * (1 - s) / 0.7)  # the binary Gumbel-softmax's gradient, frame by frame
    # the noise: logistic × noise_scale, so each frame is causal with P(r + noise > 0) (1/2 at r = 0), plus the
    # fallback of a video whose six frames all came out environment (2^-6); noise_scale 0: the noise-free decision
    wide = torch.zeros(2000, 6)
    m = torch.ones_like(wide, dtype=torch.bool)
    hard = causal_split(wide, m, 0.5, 1.0, True, "per_frame")[0]
    assert abs(float(hard.float().mean()) - (0.5 + 0.5**6)) < 0.01
    assert torch.equal(causal_split(wide + 0.1, m, 0.5, 1.0, True, "per_frame", noise_scale=0.0)[0], m)


def test_an_empty_side_reads_as_zeroed_frames_in_igvs_code_and_as_the_whole_video_in_ours():
    from train.grounding import causal_view, environment_view

    ctx = _context(False)
    batch = random_batch(ctx, 3, short=0)
    hard = torch.ones(3, L, dtype=torch.bool)
    hard[0, :3] = False  # video 0 has three environment frames; videos 1 and 2 none
    g = hard.float() * 0.9 + 0.05  # a weight whose complement is not 0 or 1, to see which one is used
    env = environment_view(batch, g, hard, "whole_video")
    assert env.mask[0].tolist() == [True] * 3 + [False] * (L - 3) and env.mask[1:].all()
    assert torch.allclose(env.vp[0], batch.vp[0].float() * (1 - g[0]).unsqueeze(-1))
    assert torch.allclose(env.vp[1:], batch.vp[1:].float())  # ours, earlier: the whole video, unweighted
    env = environment_view(batch, g, hard, "zeros")  # IGV's code: every real frame, times 1 - g
    assert env.mask[0].tolist() == [True] * 3 + [False] * (L - 3) and env.mask[1:].all()
    assert torch.allclose(env.vp, batch.vp.float() * (1 - g).unsqueeze(-1))
    none = torch.zeros(3, L, dtype=torch.bool)
    none[0, 2] = True  # video 0 has one causal frame; videos 1 and 2 none
    causal = causal_view(batch, none.float(), none)
    assert causal.mask[0].tolist() == none[0].tolist() and causal.mask[1:].all()  # every real frame, ...
    assert torch.equal(causal.vp[1:], torch.zeros_like(causal.vp[1:]))  # ... zeroed


def test_eigv_paper_objective_is_its_mixup_and_contrast_and_it_predicts_from_the_whole_video():
    """EIGV's code: training loss = soft-target CE of the mixed video + the contrastive term (no IGV terms, no task
    loss on the returned logits); at test time the head's prediction on the whole video."""
    torch.manual_seed(0)
    ctx = _context(False)
    model = _grounded("baseline", "eigv_paper", ctx)
    assert model.owns_loss
    batch = random_batch(ctx, B, 1)
    model.train()
    model.mix_lambdas = (0.7, 0.2)
    torch.manual_seed(5)
    logits = model(batch)
    rec = model.mix_record
    eye = torch.eye(C)
    assert torch.allclose(rec["target"], 0.7 * eye[batch.labels] + 0.3 * eye[batch.labels[rec["perm"]]])
    assert training_loss(model, logits, batch.labels, False) is model.aux_loss  # the whole objective
    mix_term = model.opts.mix_weight * soft_loss_of(logits, rec["target"])  # the returned logits: the mixed video's
    expected = mix_term + model.opts.contrast_weight * rec["contrast"]  # (the disruptor: its own known-answer test)
    assert torch.allclose(model.aux_loss, expected) and float(rec["contrast"]) > 0
    plain = _grounded("baseline", "eigv_paper", ctx)
    plain.opts = dataclasses.replace(plain.opts, contrast_weight=0.0)
    plain.load_state_dict(model.state_dict())
    plain.train()
    plain.mix_lambdas = (0.7, 0.2)
    torch.manual_seed(5)
    out = plain(batch)
    assert torch.allclose(plain.aux_loss, plain.opts.mix_weight * soft_loss_of(out, plain.mix_record["target"]))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch), model.head(batch))  # the whole video at test time
    one = dataclasses.replace(batch, **{k: getattr(batch, k)[:1] for k in ("vp", "v", "fg", "bg", "mask", "labels")})
    one = dataclasses.replace(one, ids=None)
    model.train()
    logits = model(one)  # a single video: nothing to mix with, its own loss
    assert torch.allclose(model.aux_loss, loss_fn(logits, one.labels, False))


def test_info_nce_negatives_pairs_each_anchor_with_its_own_negatives():
    """EIGV's InfoNCE by hand, anchor by anchor: -log(e^{cos(a, p)/τ} / (e^{cos(a, p)/τ} + Σ_j e^{cos(a, n_j)/τ}))
    with n_j anchor b's own j-th negative (row j of the (N, B, D) stack), averaged over anchors."""
    from train.grounding import info_nce_negatives

    g = torch.Generator().manual_seed(0)
    a, p, n = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    tau, total = 0.3, 0.0
    for b in range(4):
        pos = np.exp(cos(a[b], p[b]) / tau)
        negs = sum(np.exp(cos(a[b], n[j, b]) / tau) for j in range(3))
        total += -np.log(pos / (pos + negs))
    assert float(info_nce_negatives(a, p, n, tau)) == pytest.approx(total / 4, rel=1e-5)


def test_eigv_disruptor_swaps_the_environment_for_the_positive_and_the_causal_frames_for_the_negatives(monkeypatch):
    """EIGV's contrastive disruptor on the mixed videos, with every draw fixed: the positive keeps the mixed video's
    causal slots and takes its environment slots from the substituted environment (EIGV's `mem_swap(bg_mask, v)`),
    negative j keeps the environment slots and takes the causal slots from the j-th substitute; the InfoNCE pairs
    anchor b with copies j·B + b; the objective is the mixup CE plus contrast_weight × that InfoNCE, by hand."""
    import train.grounding as grounding

    torch.manual_seed(0)
    ctx = _context(False)
    cfg = from_dict(
        {
            "grounding": {
                "e": {
                    "method": "eigv",
                    "indicator": "per_frame",
                    "igv_terms": False,
                    "predict": "video",
                    "contrast_negatives": 2,
                    "contrast_weight": 0.5,
                }
            }
        }
    )
    model = Grounded(build_head("baseline", cfg, ctx, "clip_only"), grounding_options(cfg, "e"), ctx).train()
    nb = 3
    batch = random_batch(ctx, nb, short=0)
    frame = torch.arange(L, dtype=torch.float32)[None, :, None]  # video b's frame l carries b + l / 10
    feats = {
        k: (torch.arange(nb)[:, None, None] + frame / 10).expand(nb, L, getattr(batch, k).shape[-1]).clone()
        for k in ("vp", "v", "fg", "bg")
    }
    batch = dataclasses.replace(batch, **feats, labels=torch.tensor([0, 1, 2]))
    source = dataclasses.replace(batch, **{k: 100.0 + v for k, v in feats.items()})  # substitutes: 100 + ...
    subs = {1: torch.tensor([[1, 2, 0]]), 2: torch.tensor([[1, 2, 0], [2, 0, 1]])}
    monkeypatch.setattr(model, "environments", lambda b, n, avoid=None: (source, subs[n]))
    monkeypatch.setattr(grounding, "derangement", lambda n, device: torch.tensor([2, 0, 1]))
    own = torch.zeros(nb, L, dtype=torch.bool)
    own[:, :3] = True  # every video: frames 0-2 causal
    mixed_causal = torch.zeros(nb, L, dtype=torch.bool)
    mixed_causal[:, 5:] = True  # the mixed videos: slots 5-7 causal
    splits = iter([(own, own.float()), (mixed_causal, mixed_causal.float())])
    monkeypatch.setattr(model, "ground", lambda b, query=None: next(splits))
    seen, outs = [], []  # the head's inputs and outputs, in call order (its dropout draws are its own)
    monkeypatch.setattr(
        model.head, "forward", lambda b, _f=model.head.forward: seen.append(b) or outs.append(_f(b)) or outs[-1]
    )
    model.mix_lambdas = (0.7, 0.2)
    logits = model(batch)
    mixed, pos, negs = seen[0], seen[1], seen[2]
    lam1, lam2 = 0.7, 0.2
    v, perm = feats["vp"], torch.tensor([2, 0, 1])
    c = own.float()[..., None]
    want_mixed = lam1 * c * v + lam2 * (1 - c) * v + ((1 - lam1) * c * v + (1 - lam2) * (1 - c) * v)[perm]
    assert torch.allclose(mixed.vp, want_mixed)
    s0, s1 = source.vp[[1, 2, 0]], source.vp[[2, 0, 1]]  # the substitutes of copy 0 and copy 1
    keep = mixed_causal[..., None]
    assert torch.allclose(pos.vp, torch.where(keep, want_mixed, s0))  # environment swapped
    assert negs.vp.shape[0] == 2 * nb
    assert torch.allclose(negs.vp[:nb], torch.where(keep, s0, want_mixed))  # copy 0: causal slots swapped
    assert torch.allclose(negs.vp[nb:], torch.where(keep, s1, want_mixed))  # copy 1, row j·B + b
    assert outs[0] is logits
    with torch.no_grad():
        z = model.project(torch.cat([outs[0], outs[1], outs[2]]).float())
    tau, total = model.opts.contrast_tau, 0.0
    for b in range(nb):
        sims = [torch.cosine_similarity(z[b], z[nb + b], 0)] + [
            torch.cosine_similarity(z[b], z[2 * nb + j * nb + b], 0) for j in range(2)
        ]
        e = torch.exp(torch.stack(sims) / tau)
        total += float(-torch.log(e[0] / e.sum()))
    y = torch.eye(C)[batch.labels]
    target = lam1 * y + (1 - lam1) * y[perm]
    assert torch.allclose(target[0], torch.tensor([0.7, 0.0, 0.3, 0.0, 0.0]))  # video 0 mixed with video 2
    expected = soft_loss_of(logits, target) + 0.5 * total / nb
    assert float(model.aux_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_perturbed_top_k_backward_is_berthets_jacobian_and_the_diagonal_is_transtrs():
    """The perturbed top-k's backward against E[Y Zᵀ] / σ computed on its own from the same Gaussian draws (the
    forward's first RNG call), for an upstream gradient G: ∇r = E[⟨G, Y⟩ Z] / σ (`full`), and TranSTR's code's
    E[Y_kl Z_l] / σ contracted with G (`diagonal`); and the full form against the closed form for k = 1 of two
    frames, y_00 = Φ((r_0 - r_1) / (σ√2)), whose derivative in r_1 the diagonal misses entirely."""
    from scipy.stats import norm

    B_, L_, k, n, sigma = 2, 5, 2, 4000, 0.7
    scores = torch.randn(B_, L_, dtype=torch.float64)
    mask = torch.ones(B_, L_, dtype=torch.bool)
    G = torch.randn(B_, k, L_, dtype=torch.float64)
    torch.manual_seed(11)
    noise = torch.randn(B_, n, L_, dtype=torch.float64).numpy()
    Y = np.zeros((B_, n, k, L_))
    for b in range(B_):
        for i in range(n):
            top = np.sort(np.argsort(-(scores[b].numpy() + sigma * noise[b, i]), kind="stable")[:k])
            Y[b, i, np.arange(k), top] = 1
    jac = np.einsum("bnkl,bnm->bklm", Y, noise) / (n * sigma)  # E[Y Zᵀ] / σ, (B, k, L, L)
    full = np.einsum("bkl,bklm->bm", G.numpy(), jac)
    diagonal = np.einsum("bkl,bkll->bl", G.numpy(), jac)
    for form, want in (("full", full), ("diagonal", diagonal)):
        r = scores.clone().requires_grad_()
        torch.manual_seed(11)
        ind, _ = perturbed_top_k(r, mask, k, n, sigma, training=True, grad_form=form)
        assert np.allclose(ind.detach().numpy(), Y.mean(1))
        (ind * G).sum().backward()
        assert np.allclose(r.grad.numpy(), want, atol=1e-10), form
    # the closed form: k = 1 of two frames, a loss on y_00 alone
    r = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    for form in ("full", "diagonal"):
        r.grad = None
        torch.manual_seed(0)
        ind, _ = perturbed_top_k(r, torch.ones(1, 2, dtype=torch.bool), 1, 200_000, 0.5, True, form)
        ind[0, 0, 0].backward()
        dens = norm.pdf(0.2 / (0.5 * np.sqrt(2))) / (0.5 * np.sqrt(2))  # ∂y_00/∂r_0 = -∂y_00/∂r_1
        if form == "full":
            assert np.allclose(r.grad.numpy(), [[dens, -dens]], atol=0.02), r.grad
        else:
            assert abs(float(r.grad[0, 1])) < 0.02 < abs(float(r.grad[0, 0]))  # the r_1 term is missing


def test_label_conditioned_indicator_scores_frames_against_the_queried_class_text():
    """EIGV's indicator grounded on the label: r_l = w · tanh(W_f vp_l + Σ_c q_c W_v t_c) with q the label's class
    distribution (by hand, against the module's linear maps); in training the video is grounded on its label and the
    mixed video on the λ1-mixed labels; at test (only the grounding scores need it) on the head's own prediction;
    a label query with a test-time prediction that would read it is refused."""
    from train.grounding import FrameScorer, label_query

    torch.manual_seed(0)
    scorer = FrameScorer(DC, 16)
    vp, t0 = torch.randn(2, L, DC), torch.randn(C, DC)
    q = label_query(torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.3, 0.0, 0.0]]))
    text = q @ (t0 @ scorer.w_v.weight.T + scorer.w_v.bias)  # (2, 16)
    want = torch.tanh(vp @ scorer.w_f.weight.T + scorer.w_f.bias + text[:, None]) @ scorer.w.weight.T + scorer.w.bias
    assert torch.allclose(scorer(vp, t0, q), want.squeeze(-1), atol=1e-6)
    multi = label_query(torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(multi, torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0]]))  # multi-label: the positives' mean text
    ctx = _context(False)
    model = _grounded("baseline", "eigv_code", ctx)
    queries = []
    real = model.indicator.forward
    model.indicator.forward = lambda vp, t0, query=None: queries.append(query) or real(vp, t0, query)
    batch = random_batch(ctx, B, 1)
    model.train()
    model.mix_lambdas = (0.7, 0.2)
    model(batch)
    y = torch.eye(C)[batch.labels]
    perm = model.mix_record["perm"]
    assert torch.equal(queries[0], y) and torch.allclose(queries[1], 0.7 * y + 0.3 * y[perm])
    model.eval()
    with torch.no_grad():
        model.frames_used(batch)
        assert torch.allclose(queries[2], model.head(batch).softmax(-1))  # no label at test time
    with pytest.raises(ConfigError, match=r"grounding\.x\.indicator_query: label .* predict: video"):
        from_dict({"grounding": {"x": {"method": "igv", "indicator_query": "label"}}})


def test_separate_clipping_clips_the_head_as_its_ungrounded_row():
    """`clip: separate`: the head's gradient is clipped by its own norm, exactly as train.engine clips the ungrounded
    head, whatever the grounding modules' gradients; `joint` (ours, earlier) clips all by one norm."""
    torch.manual_seed(0)
    ctx = _context(False)
    model = _grounded("baseline", "eigv_code", ctx)
    head_params = list(model.head.parameters())
    groups = model.clip_groups()
    assert [id(p) for p in groups[0]] == [id(p) for p in head_params]
    assert {id(p) for p in groups[1]} == {id(p) for p in model.parameters()} - {id(p) for p in head_params}
    for p in model.parameters():
        p.grad = torch.randn_like(p) * (10.0 if any(p is q for q in head_params) else 1000.0)
    alone = [p.grad.clone() for p in head_params]
    torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(g.clone()) for g in alone], 1.0)  # (norm only)
    norm = torch.sqrt(sum((g**2).sum() for g in alone))
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, 1.0)
    for p, g in zip(head_params, alone, strict=True):
        assert torch.allclose(p.grad, g / (norm + 1e-6), rtol=1e-5)  # its own norm: the grounding's is 100× larger
    model.opts = dataclasses.replace(model.opts, clip="joint")
    assert len(model.clip_groups()) == 1


def soft_loss_of(logits, target):
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def test_pcmci_takes_a_one_frame_video_with_finite_gradients():
    """A grounded view may keep a single frame (IGV's per-frame indicator): PCMCI's interaction cost has no spread
    there, and its gradient must stay finite."""
    torch.manual_seed(0)
    ctx = _context(False)
    head = build_head("pcmci", _cfg(), ctx)
    batch = random_batch(ctx, 3, 1)
    mask = torch.zeros(3, L, dtype=torch.bool)
    mask[:, 0] = True
    batch = dataclasses.replace(batch, mask=mask)
    head.train()
    loss_fn(head(batch), batch.labels, False).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_top_k_returns_exactly_k_frames_with_gradients_to_the_scores():
    scores = torch.randn(3, L, requires_grad=True)
    mask = torch.ones(3, L, dtype=torch.bool)
    mask[2, 2:] = False  # a video shorter than K keeps its real frames
    idx, weight = top_k_frames(scores, mask, 4, tau=1.0)
    assert idx.shape == (3, 4) and torch.equal(idx, idx.sort(1).values)  # K frames, in temporal order
    assert set(idx[0].tolist()) == set(scores[0].topk(4).indices.tolist())
    assert set(idx[2, :2].tolist()) == {0, 1} and not mask[2].gather(0, idx[2, 2:]).any()
    assert torch.allclose(weight, torch.ones_like(weight))
    ctx = _context(False)
    model = _grounded("baseline", "rationale", ctx)
    batch = random_batch(ctx, B)
    view, chosen = model.select(batch)
    assert view.vp.shape == (B, 4, DC) and view.mask.shape == (B, 4) and chosen.shape == (B, 4)
    loss_fn(model(batch), batch.labels, False).backward()
    grads = [p.grad for p in model.rationale.parameters()]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    assert model.frames_used(batch).sum(1).tolist() == [4] * B


def _two_videos(ctx: HeadContext):
    """Two full-length videos of classes 0 and 1; video b's features are all b + 1 (one value per video)."""
    batch = random_batch(ctx, 2, short=0)
    ids = torch.tensor([1.0, 2.0])[:, None, None]
    feats = {k: ids.expand(2, L, getattr(batch, k).shape[-1]).clone() for k in ("vp", "v", "fg", "bg")}
    return dataclasses.replace(batch, **feats, labels=torch.tensor([0, 1]))


def test_eigv_soft_target_follows_lambda1_only():
    ctx = _context(False)
    model = _grounded("baseline", "eigv", ctx)
    model.train()
    batch = _two_videos(ctx)
    seen = []
    for seed in range(6):  # sampled: λ1 and λ2 drawn independently, the target reads λ1 only
        torch.manual_seed(seed)
        model(batch)
        rec = model.mix_record
        lam1, lam2 = rec["lam1"], rec["lam2"]
        assert rec["perm"].tolist() == [1, 0]  # two videos: each mixes with the other
        assert rec["target"][0, 0] == lam1 and rec["target"][1, 1] == lam1  # each video's own class: λ1
        assert rec["target"][0, 1] == 1 - lam1 and rec["target"][1, 0] == 1 - lam1  # its partner's: 1 - λ1
        seen.append((float(lam1), float(lam2)))
    assert all(a != b for a, b in seen) and len({b for _, b in seen}) == len(seen)
    model.mix_lambdas = (0.3, 0.9)  # injected: the same λ1 with another λ2 gives the same target
    model(batch)
    first = model.mix_record["target"]
    assert first[0, 0] == torch.tensor(0.3) and first[0, 1] == 1 - torch.tensor(0.3)
    model.mix_lambdas = (0.3, 0.1)
    model(batch)
    assert torch.equal(model.mix_record["target"], first) and model.mix_record["lam2"] == torch.tensor(0.1)
    assert model.aux_loss is not None and torch.isfinite(model.aux_loss)
    model.aux_loss.backward()
    assert all(p.grad is not None for p in model.project.parameters())  # the disruptor's projection head learns


def test_eigv_mixup_mixes_causal_frames_by_lambda1_and_environments_by_lambda2():
    ctx = _context(False)
    batch = _two_videos(ctx)  # video 0 is all 1, video 1 all 2
    g = torch.zeros(2, L)
    g[0, :4] = 1  # video 0: frames 0-3 causal
    g[1, 2:5] = 1  # video 1: frames 2-4 causal
    lam1, lam2 = torch.tensor(0.7), torch.tensor(0.2)
    out = eigv_mixed_batch(batch, g, torch.tensor([1, 0]), lam1, lam2)
    c0, c1 = g[0], g[1]
    # slot by slot: λ1·c_0 + λ2·e_0 for video 0's frame, (1 - λ1)·c_1 + (1 - λ2)·e_1 for video 1's
    want0 = (lam1 * c0 + lam2 * (1 - c0)) * 1 + ((1 - lam1) * c1 + (1 - lam2) * (1 - c1)) * 2
    want1 = (lam1 * c1 + lam2 * (1 - c1)) * 2 + ((1 - lam1) * c0 + (1 - lam2) * (1 - c0)) * 1
    assert torch.allclose(out.vp[0, :, 0], want0) and torch.allclose(out.v[1, :, 0], want1)
    assert torch.allclose(out.vp[0, 0, 0], lam1 * 1 + (1 - lam2) * 2)  # causal in 0, environment in 1
    assert torch.allclose(out.vp[0, 2, 0], lam1 * 1 + (1 - lam1) * 2)  # causal in both
    assert torch.allclose(out.vp[0, 7, 0], lam2 * 1 + (1 - lam2) * 2)  # environment in both


def test_perturbed_top_k_is_the_hard_top_k_at_eval():
    torch.manual_seed(0)
    scores = torch.randn(3, L)
    mask = torch.ones(3, L, dtype=torch.bool)
    mask[2, 2:] = False  # shorter than K: its real frames, then padded slots
    ind, idx = perturbed_top_k(scores, mask, 4, samples=50, sigma=0.05, training=False)
    assert torch.equal(idx, hard_top_k(scores, mask, 4)) and torch.equal(idx, idx.sort(1).values)
    assert set(idx[0].tolist()) == set(scores[0].topk(4).indices.tolist())
    assert torch.equal(ind, torch.nn.functional.one_hot(idx, L).float())  # exactly K-hot, no noise
    ctx = _context(False)
    model = _grounded("baseline", "rationale", ctx)  # rationale_selector: perturbed (the default)
    assert model.opts.rationale_selector == "perturbed"
    batch = random_batch(ctx, B)
    model.eval()
    view, chosen = model.select(batch)
    scores = model.rationale(batch.vp.float(), batch.t0.float())
    assert torch.equal(chosen, hard_top_k(scores, batch.mask, 4))
    gathered = batch.vp.float().gather(1, chosen.unsqueeze(-1).expand(-1, -1, DC))
    assert torch.equal(view.vp, gathered) and torch.equal(view.mask, batch.mask.gather(1, chosen))
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))  # deterministic at eval


def test_perturbed_top_k_sends_a_gradient_to_every_frame_score():
    torch.manual_seed(0)
    scores = (0.1 * torch.randn(2, L)).requires_grad_()
    mask = torch.ones(2, L, dtype=torch.bool)
    ind, idx = perturbed_top_k(scores, mask, 3, samples=2000, sigma=0.5, training=True)
    assert ind.shape == (2, 3, L) and torch.allclose(ind.sum(-1), torch.ones(2, 3))  # each slot: a distribution
    assert torch.allclose(ind.sum(1).sum(-1), torch.full((2,), 3.0))  # K frames in all
    frames = torch.randn(2, L, 16)
    (torch.einsum("bkl,bld->bkd", ind, frames) * torch.randn(2, 3, 16)).sum().backward()
    assert (scores.grad != 0).all(), scores.grad  # every one of the L frame scores gets a gradient
    # in the wrapper: training mixes the frames by the mean indicators, and the scorer learns from the head's loss
    ctx = _context(False)
    model = _grounded("baseline", "rationale", ctx)
    model.train()
    batch = random_batch(ctx, B)
    view, chosen = model.select(batch)
    assert view.vp.shape == (B, 4, DC) and torch.equal(view.mask, batch.mask.gather(1, chosen))
    loss_fn(model(batch), batch.labels, False).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.rationale.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.rationale.parameters())


@pytest.mark.parametrize("grounding", ["eigv_video", "rationale_st"])
def test_earlier_forms_stay_available(grounding):
    torch.manual_seed(0)
    ctx = _context(False)
    model = _grounded("baseline", grounding, ctx)
    assert model.project is None  # only EIGV's paper form has the disruptor's projection head
    model.train()
    batch = random_batch(ctx, B)
    loss = loss_fn(model(batch), batch.labels, False)
    if model.aux_loss is not None:
        loss = loss + model.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert model(batch).shape == (B, C)


def test_pipeline_yaml_groundings_build():
    from pathlib import Path

    from extract.contract.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "pipeline.yaml")
    # EIGV's code, train.py lines 27-32 (yl3800/EIGV): -a 0.1 (λ1 ~ Beta(a, a)), -a2 1 (λ2 ~ Beta(a2, a2)), -neg 5,
    # -b 0.0125 (the InfoNCE's weight), -tau 0.1 (its temperature), -tau_gumbel 0.9; network.py lines 199-203: the
    # indicator grounded on the ground-truth question-answer; eval: the whole video (lines 192-194)
    eigv_code = {
        "mix_alpha": 0.1,
        "env_mix_alpha": 1.0,
        "contrast_negatives": 5,
        "contrast_weight": 0.0125,
        "contrast_tau": 0.1,
        "tau": 0.9,
        "indicator_query": "label",
        "predict": "video",
        "igv_terms": False,
        "indicator": "per_frame",
        "mix": "paper",
    }
    eigv = dataclasses.asdict(grounding_options(cfg, "eigv"))
    assert {k: eigv[k] for k in eigv_code} == eigv_code
    # IGV's code, run.py lines 25-29 (-tau 1, -a 1 and -b 1: the swap and environment terms' weights), hga.py lines
    # 199-211 (per-frame Gumbel-softmax, zeroed empty sides, the intervention on the detached mask)
    igv_code = {
        "tau": 1.0,
        "swap_weight": 1.0,
        "env_weight": 1.0,
        "indicator": "per_frame",
        "empty_side": "zeros",
        "swap_detach": True,
        "indicator_query": "classes",
        "predict": "causal",
        "igv_terms": True,
    }
    igv = dataclasses.asdict(grounding_options(cfg, "igv"))
    assert {k: igv[k] for k in igv_code} == igv_code
    # TranSTR's selector (next/networks/topk.py PerturbedTopK defaults: 500 samples, σ 0.05)
    rationale = grounding_options(cfg, "rationale")
    assert (rationale.rationale_selector, rationale.perturb_samples, rationale.perturb_sigma) == (
        "perturbed",
        500,
        0.05,
    )
    # the control of igv_oracle differs from it in IGV's two losses alone
    a, b = (dataclasses.asdict(grounding_options(cfg, n)) for n in ("igv_oracle", "igv_oracle_frames"))
    assert {k for k in a if a[k] != b[k]} == {"swap_weight", "env_weight"} and b["swap_weight"] == b["env_weight"] == 0
    # table grounding_eigv: each row one named change from the row above
    rows = [r.split("+")[1] for r in cfg.ablations["grounding_eigv"].rows]
    changed = {
        "eigv_values_ours": {"mix_alpha", "env_mix_alpha", "contrast_weight", "tau"},
        "eigv_unlabelled": {"indicator_query"},
        "eigv_budget_indicator": {"indicator"},
        "eigv_igv_terms": {"igv_terms"},
        "eigv_budget": {"predict"},
    }
    assert rows == ["eigv", *changed] and cfg.ablations["grounding_eigv"].reference == "previous"
    for above, row in itertools.pairwise(rows):
        x, y = (dataclasses.asdict(grounding_options(cfg, n)) for n in (above, row))
        assert {k for k in x if x[k] != y[k]} == changed[row], row


@pytest.mark.parametrize("method", ["igv", "eigv"])
@pytest.mark.parametrize("head_name,memory,variant", [("cmdcl", "tci", "tci_memory"), ("pcmci", "ich", None)])
def test_one_grounded_step_updates_a_memory_once(head_name, memory, variant, method, monkeypatch):
    ctx = _context(False)
    model = _grounded(head_name, method, ctx, variant)  # CMDCL's memory is our variant; PCMCI's ICH default
    module = getattr(model.head, memory)
    calls = []
    real = module.update_memory
    monkeypatch.setattr(module, "update_memory", lambda *a: calls.append(1) or real(*a))
    model.train()
    model(random_batch(ctx, B))  # the causal view, then the swapped, environment (and mixed) views
    assert len(calls) == 1


def test_auxiliary_views_never_update_the_heads_memories():
    ctx = _context(False)
    head = build_head("pcmci", _cfg(), ctx)  # ICH's default form holds the strata memory
    head.train()
    before = head.ich.memory.clone()
    with frozen_memories(head):
        head(random_batch(ctx, B))
    assert torch.equal(head.ich.memory, before)
    head(random_batch(ctx, B))
    assert not torch.equal(head.ich.memory, before)


def test_uniform_prior_variant_reaches_every_dictionary_prior():
    ctx = _context(False)
    cfg = _cfg()
    cmdcl = build_head("cmdcl", cfg, ctx, "prior_uniform")
    assert torch.allclose(cmdcl.tci.prior(), torch.full((6,), 1 / 6))
    assert not cmdcl.tci.prior_logits.requires_grad  # fixed at 1/M, not a starting point
    empirical = build_head("cmdcl", cfg, ctx, "memory_bank")  # CMDCL's priors live in our memory/bank forms
    assert torch.allclose(empirical.tci.prior(), ctx.dictionaries["confounder"][1])
    assert empirical.tci.prior_logits.requires_grad
    for name in ("cmdcl", "pcmci", "ecrl"):
        torch.manual_seed(0)
        a = build_head(name, cfg, ctx, "memory_bank" if name == "cmdcl" else None).eval()
        torch.manual_seed(0)
        b = build_head(name, cfg, ctx, "prior_uniform").eval()
        batch = random_batch(ctx, B)
        with torch.no_grad():
            assert not torch.allclose(a(batch), b(batch)), name  # the prior changes the computation


def test_grounding_scores_known_answers():
    mask = np.ones((2, 4), bool)
    mask[1, 3] = False
    used = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
    relevant = np.array([[1, 0, 1, 0], [1, 0, 1, 1]], bool)  # video 1's relevant frame 3 is padding
    s = grounding_scores(used, relevant, mask)
    assert s["ground_iou"] == pytest.approx((1 / 3 + 2 / 2) / 2)
    assert s["ground_precision"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    # the random expectation by enumerating every subset of the same size
    expected_iou, expected_prec = [], []
    for b in range(2):
        real = np.flatnonzero(mask[b])
        rel = set(np.flatnonzero(relevant[b] & mask[b]))
        k = used[b].sum()
        subsets = [set(c) for c in itertools.combinations(real, k)]
        expected_iou.append(np.mean([len(s_ & rel) / len(s_ | rel) for s_ in subsets]))
        expected_prec.append(np.mean([len(s_ & rel) / k for s_ in subsets]))
    assert s["ground_iou_random"] == pytest.approx(np.mean(expected_iou))
    assert s["ground_precision_random"] == pytest.approx(np.mean(expected_prec))
    # a video that uses no frame (IGV's indicator can leave none causal): IoU 0 against its annotated frames, no
    # precision; a selection that uses no frame anywhere has IoU 0 and no precision at all
    none = used.copy()
    none[1] = False
    s = grounding_scores(none, relevant, mask)
    assert s["ground_iou"] == pytest.approx((1 / 3 + 0) / 2) and s["ground_precision"] == pytest.approx(1 / 2)
    s = grounding_scores(np.zeros_like(used), relevant, mask)
    assert s["ground_iou"] == 0.0 and s["ground_iou_random"] == 0.0 and np.isnan(s["ground_precision"])


def test_frame_relevance_is_the_stores_segment_mask_at_the_frames_the_heads_see(random_cache, random_store, tmp_path):
    """`frame_relevance` reads `segment_mask` (what stage 1 wrote from the dataset's segments): at the slots a head
    sees (all 8, or 4 of them) it is the truth the random store was drawn from; None (no grounding score) where the
    store annotates no segments."""
    from tests.train.random_cache import RandomWorld, write_random_cache
    from train.data import CacheReader

    cfg, store = random_cache
    reader = CacheReader(store, "activity")
    rows = reader.split_rows("test_ood")
    got = frame_relevance(cfg, reader, rows)
    assert np.array_equal(got, random_store.segments[rows]) and got.any() and not got.all()
    four = CacheReader(store, "activity", num_frames=4)
    assert np.array_equal(frame_relevance(cfg, four, rows), random_store.segments[rows][:, [1, 3, 5, 7]])
    plain = write_random_cache(tmp_path, RandomWorld(annotated_segments=False)).store
    assert frame_relevance(cfg, CacheReader(plain, "activity"), rows) is None


def test_config_names_and_checks_groundings():
    with pytest.raises(ConfigError, match=r"grounding\.g\.method: 'igvv'"):
        from_dict({"grounding": {"g": {"method": "igvv"}}})
    with pytest.raises(ConfigError, match=r"grounding\.g\.causal_shar: unknown key; did you mean 'causal_share'"):
        from_dict({"grounding": {"g": {"causal_shar": 0.4}}})
    with pytest.raises(ConfigError, match=r"ablations\.t\.rows\[0\]: no grounding 'nope'"):
        from_dict({"ablations": {"t": {"rows": ["baseline+nope"]}}})
    with pytest.raises(ConfigError, match="train.grounding: no grounding 'x'"):
        from_dict({"train": {"grounding": "x"}})
    with pytest.raises(ConfigError, match="grounding.g: turns nothing on"):
        from_dict({"grounding": {"g": {"method": "none"}}})
    with pytest.raises(ConfigError, match=r"grounding\.g\.igv_terms: false leaves 'igv' no training objective"):
        from_dict({"grounding": {"g": {"method": "igv", "igv_terms": False}}})
    with pytest.raises(ConfigError, match=r"grounding\.g\.predict: video needs an indicator"):
        from_dict({"grounding": {"g": {"rationale_frames": 4, "predict": "video"}}})
    with pytest.raises(ConfigError, match=r"grounding\.g\.indicator: 'top'"):
        from_dict({"grounding": {"g": {"method": "igv", "indicator": "top"}}})
    ctx = _context(False)  # L = 8 frames
    too_many = grounding_options(from_dict({"grounding": {"g": {"rationale_frames": 8}}}), "g")
    with pytest.raises(ConfigError, match=r"grounding.g.rationale_frames: 8 keeps every one of the 8 frames"):
        wrap(build_head("baseline", _cfg(), ctx), too_many, ctx, "g")


def test_grounding_table_end_to_end_and_stale_runs_refused(random_cache, tmp_path, monkeypatch):
    from train.ablate import run_table

    cfg, store = random_cache
    grounding = {
        "igv": {"method": "igv"},
        "rationale": {"rationale_frames": 4},
        "igv_oracle": {"method": "igv", "indicator": "oracle"},
    }
    rows = ["baseline", "baseline+igv", "baseline+rationale", "baseline+igv_oracle"]
    chain = {"rows": rows, "reference": "previous", "seeds": 1}  # each row against the row above it
    tables = {"g": {"rows": rows, "ground_check": True, "seeds": 1}, "chain": chain, "g2": {"rows": rows, "seeds": 2}}
    table = from_dict({"grounding": grounding, "ablations": tables}).ablations
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, runs_root=str(tmp_path)), grounding=grounding, ablations=table
    )
    result = run_table(cfg, "g", seeds=1, store=store, progress=False)
    md = (tmp_path / "ablations" / "g.md").read_text()
    assert "| baseline+igv |" in md and "activity frame IoU test_ood" in md and "frame IoU random" in md
    baseline_line = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "—" in baseline_line  # no grounding: no frame IoU
    assert {c.metric for c in result.cells} == {"acc1", "ground_iou", "ground_iou_random"}
    # the fixed-mask objectives of the rows with an indicator (igv only), seed 0, as `ltar ground-check` writes them
    check = (tmp_path / "ablations" / "g-ground-check.md").read_text().splitlines()
    checked = [line.split(" | ")[:2] for line in check if line.startswith("| baseline")]
    # the learned indicator's row, and the oracle's (its learned mask is the annotation: no decisiveness)
    assert [r[0] for r in checked] == ["| baseline+igv", "| baseline+igv_oracle"] and checked[1][1] == "—"
    # reference: previous, on the same runs: each Δ is the row's paired difference to the row above it
    chained = run_table(cfg, "chain", seeds=1, store=store, progress=False)
    by = {(c.row, c.split): c for c in chained.cells if c.metric == "acc1"}
    for above, row in itertools.pairwise(rows):
        for split in ("test_iid", "test_ood"):
            d = by[(row, split)].diff
            assert d.estimate == pytest.approx(by[(row, split)].mean - by[(above, split)].mean), (row, split)
    assert by[("baseline", "test_iid")].diff.estimate == 0.0  # the first row is its own reference
    assert chained.family == 2 * (len(rows) - 1)  # every row but the first, two splits
    chain_md = (tmp_path / "ablations" / "chain.md").read_text()
    assert "the paired difference to the row above it" in chain_md
    refs = {(r["row"], r["reference"]) for r in csv.DictReader((tmp_path / "ablations" / "chain.csv").open())}
    assert refs == {("baseline", "baseline"), *((b, a) for a, b in itertools.pairwise(rows))}
    # another seed count than the table's own writes its own files; a table of that name with other rows is kept
    run_table(cfg, "g2", seeds=1, store=store, progress=False)
    assert (tmp_path / "ablations" / "g2-seeds1.md").exists() and not (tmp_path / "ablations" / "g2.md").exists()
    fewer = dataclasses.replace(cfg, ablations={**table, "chain": dataclasses.replace(table["chain"], rows=rows[:2])})
    run_table(fewer, "chain", seeds=1, store=store, progress=False)
    kept = sorted(p.name for p in (tmp_path / "ablations").glob("chain.before-*"))
    assert [k.split(".", 2)[2] for k in kept] == ["csv", "md", "png"]
    assert (tmp_path / "ablations" / kept[1]).read_text() == chain_md  # the earlier table, as it was
    assert "baseline+igv_oracle" not in (tmp_path / "ablations" / "chain.md").read_text()
    from train.ground_check import mask_objectives

    expected = {
        r.mask: r.objective for r in mask_objectives(tmp_path / "ablations" / result_dir(tmp_path), "train", store)[0]
    }
    written = {
        r["mask"]: float(r["objective"])
        for r in csv.DictReader((tmp_path / "ablations" / "g-ground-check.csv").open())
        if r["row"] == "baseline+igv"
    }
    assert written == pytest.approx(expected, rel=1e-5)
    run_dirs = sorted(p.name for p in (tmp_path / "ablations").glob("*/*") if p.is_dir())
    assert "baseline+igv-activity-s0" in run_dirs
    again = run_table(cfg, "g", seeds=1, store=store, progress=False)  # finished runs are reused
    assert [c.values for c in again.cells] == [c.values for c in result.cells]
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.01))
    with pytest.raises(RunError, match="holds a run trained with other `train` settings"):
        run_table(changed, "g", seeds=1, store=store, progress=False)
    read_only = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=3, memory_budget_mb=1))
    run_table(read_only, "g", seeds=1, store=store, progress=False)  # where and how runs are read: not refused
    monkeypatch.setattr("train.ablate.dictionary_hashes", lambda cfg, reader: {"global": "rebuilt"})
    with pytest.raises(RunError, match="other `dictionaries` settings"):
        run_table(cfg, "g", seeds=1, store=store, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr("train.ablate.INIT_SCHEME", "drawn-otherwise")  # a run from before `initialise`
    with pytest.raises(RunError, match="other `initialisation` settings"):
        run_table(cfg, "g", seeds=1, store=store, progress=False)
    monkeypatch.undo()
    run_table(cfg, "g", seeds=1, store=store, progress=False)  # the same form: reused
    # the head's form changed since (a module added): its saved predictions must not be read as this row's
    from train.heads.baseline import Baseline

    real_init = Baseline.__init__

    def grown(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.extra = torch.nn.Linear(2, 2)

    monkeypatch.setattr(Baseline, "__init__", grown)
    with pytest.raises(RunError, match="other `architecture` settings"):
        run_table(cfg, "g", seeds=1, store=store, progress=False)
    assert set(GROUND_KEYS) <= _last_metrics(tmp_path)  # every grounding score in the run history


def result_dir(root):
    return next((root / "ablations").glob("*/baseline+igv-activity-s0")).relative_to(root / "ablations")


def _last_metrics(root):
    run = next((root / "ablations").glob("*/baseline+igv-activity-s0"))
    ckpt = torch.load(run / "last.pt", weights_only=False)
    return {k.split("/", 1)[1] for k in ckpt["history"][-1] if k.startswith("test_ood/")}


@pytest.mark.parametrize("source", ["batch", "bank"])
def test_grounded_run_resumes_exactly_and_evaluates_from_its_checkpoint(random_cache, tmp_path, source):
    """Also with the environment bank: it is in the checkpoint, so the resumed run draws from the same bank."""
    from train.engine import evaluate, train

    cfg, store = random_cache
    cfg = dataclasses.replace(
        cfg,
        grounding={"eigv": {"method": "eigv", "env_source": source, "env_bank": 4}},
        train=dataclasses.replace(cfg.train, epochs=3, grounding="eigv", runs_root=str(tmp_path)),
    )
    full = train(cfg, store=store, progress=False, run_dir=tmp_path / "full")
    cut = train(cfg, store=store, progress=False, run_dir=tmp_path / "cut", max_steps=full.steps // 3)
    assert cut.steps == full.steps // 3
    resumed = train(cfg, store=store, progress=False, run_dir=tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.metrics == full.metrics and "ground_iou" in full.metrics["test_ood"]
    ev = evaluate(tmp_path / "full" / "last.pt", "test_ood", store=store)
    assert ev.metrics == pytest.approx(full.metrics["test_ood"])
    saved = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["state_dict"]
    assert ("bank_ids" in saved) == (source == "bank")
    if source == "bank":
        assert (saved["bank_ids"] >= 0).all()  # filled with the training videos' split positions


def test_a_run_folder_takes_one_process_at_a_time(random_cache, tmp_path):
    import json
    import subprocess
    import sys

    from extract.contract.lock import _proc_start, acquire_lock, read_lock
    from train.engine import train

    cfg, store = random_cache
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with acquire_lock(tmp_path / "run") as lock:
            info = {**read_lock(lock.path), "pid": holder.pid, "pid_start": _proc_start(holder.pid)}
            lock.path.write_text(json.dumps(info))  # as if `holder` were training this run
            with pytest.raises(RunError, match="being written by another run .* a training run takes one run"):
                train(cfg, store=store, progress=False, run_dir=tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / "last.pt").exists()
    keeps_all = dataclasses.replace(
        cfg,
        grounding={"all": {"rationale_frames": 8}},  # the random store holds 8 frames per video
        train=dataclasses.replace(cfg.train, grounding="all"),
    )
    with pytest.raises(ConfigError, match="keeps every one of the 8 frames"):
        train(keeps_all, store=store, progress=False, run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()  # a run that could not start leaves no folder


CHECKED = {
    "budget": {"method": "eigv", "indicator": "budget", "env_source": "bank", "env_bank": 4},  # from its saved bank
    "per_frame": {"method": "igv", "indicator": "per_frame"},
    "eigv_paper": {"method": "eigv", "indicator": "per_frame", "igv_terms": False, "predict": "video"},
}


@pytest.mark.parametrize("form", list(CHECKED))
def test_ground_check_evaluates_every_fixed_mask_on_the_runs_own_objective(random_cache, tmp_path, form):
    """`ltar ground-check`: the learned mask's causal term is the run's own eval loss (where it predicts from the
    causal frames), the objective is the weighted sum of the terms the run trains, the other masks have the learned
    mask's size video by video (the budget, or the per-frame indicator's own choice), and at that size no mask has a
    higher frame IoU than the oracle's (it maximises the IoU per video); a run without an indicator is refused."""
    from typer.testing import CliRunner

    from train.data import iterate_batches
    from train.engine import _load, load_run, train
    from train.ground_check import MASKS, ground_check
    from train.grounding import one_hot_targets, soft_loss
    from train.main import app

    cfg, store = random_cache
    cfg = dataclasses.replace(
        cfg,
        grounding={"g": CHECKED[form]},
        train=dataclasses.replace(cfg.train, epochs=1, grounding="g", runs_root=str(tmp_path)),
    )
    train(cfg, store=store, progress=False, run_dir=tmp_path / "run")
    rows, decisive, files = ground_check(tmp_path / "run", "train", store=store)
    by = {r.mask: r for r in rows}
    assert list(by) == list(MASKS) and all(f.exists() for f in files)
    model = by["learned"]
    igv = 0.0 if form == "eigv_paper" else 1.0  # EIGV's paper objective: its mixup and disruptor alone
    weights = {"causal": igv, "swapped": igv, "env": igv, "mix": 1.0, "contrast": 0.1}  # the sections' defaults
    for r in rows:
        eigv = {"mix", "contrast"} if CHECKED[form]["method"] == "eigv" else set()
        assert set(r.terms) == {"causal", "swapped", "env"} | eigv
        assert r.objective == pytest.approx(sum(weights[k] * v for k, v in r.terms.items()))
    sized = ("oracle", "idle_first", "random", "untrained") + (("learned_noisy",) if form == "budget" else ())
    for name in sized:  # (a per-frame indicator's noisy draw chooses its own size)
        assert by[name].causal_share == pytest.approx(model.causal_share)
        assert by[name].ground["ground_iou"] <= by["oracle"].ground["ground_iou"] + 1e-9
    assert by["idle_first"].ground["ground_precision"] <= by["oracle"].ground["ground_precision"]
    # by hand: the learned mask's causal term is the eval loss of the run's own prediction
    run = load_run(tmp_path / "run" / "last.pt", store)
    run.model.eval()
    data = _load(run.reader, "train", run.cfg, run.device)
    losses, spreads = [], []
    with torch.no_grad():
        for _, batch in iterate_batches(data, cfg.train.batch_size, run.ctx.t0, run.ctx.dictionaries, "cpu"):
            y = one_hot_targets(batch.labels, run.ctx.num_classes, run.ctx.multi_label)
            losses.append(float(soft_loss(run.model(batch), y, run.ctx.multi_label)))
            scores = run.model.indicator(batch.vp.float(), batch.t0.float()).numpy()
            spreads += [np.std(s[m], ddof=1) for s, m in zip(scores, batch.mask.numpy(), strict=True)]
    if form != "eigv_paper":  # (EIGV's paper predicts from the whole video)
        assert model.terms["causal"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert decisive["score_spread"] == pytest.approx(np.mean(spreads), rel=1e-4)
    result = CliRunner().invoke(app, ["ground-check", str(tmp_path / "run"), "--store", str(store)])
    assert result.exit_code == 0 and "oracle_unbudgeted" in result.output
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grounding=None))
    train(plain, store=store, progress=False, run_dir=tmp_path / "plain")
    with pytest.raises(RunError, match="needs a run with a grounding indicator"):
        ground_check(tmp_path / "plain", "train", store=store)


def test_environments_come_from_the_bank_never_the_video_itself():
    """IGV / EIGV's memory of training videos: filled first in first out after each step; each environment frame is
    drawn among the real frames of filled entries holding another video (checked by split position), as IGV's
    memory bank samples; the swapped view's environment slots are those bank frames; until the bank can serve
    every video, the batch's derangement stands in."""
    ctx = _context(False)
    cfg = from_dict({"grounding": {"igv_bank": {"method": "igv", "env_source": "bank", "env_bank": 8}}})
    model = Grounded(build_head("baseline", cfg, ctx), grounding_options(cfg, "igv_bank"), ctx).train()
    assert model.banked and (model.bank_ids == -1).all()
    batch = dataclasses.replace(random_batch(ctx, B), ids=torch.arange(B))  # positions 0..5; video 0 is short
    source, idx = model.environments(batch, 1)
    assert source is batch and (idx[0] != torch.arange(B)).all()  # empty bank: a derangement of the batch
    model(batch)  # one step: its videos enter the bank afterwards
    assert model.bank_ids.tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and int(model.bank_next) == 6
    torch.testing.assert_close(model.bank_vp[:B].float(), batch.vp.float(), atol=1e-3, rtol=1e-3)
    assert torch.equal(model.bank_mask[:B], batch.mask)
    # the same videos again (a new epoch): every frame drawn is a real frame of another, filled entry
    entry, frame = model.bank_frames(batch.ids, 40, L)  # (40·B, L) each
    own = batch.ids.repeat(40)[:, None]  # row j·B + b is a copy of video b
    assert entry.shape == (40 * B, L) and (model.bank_ids[entry] != own).all() and (model.bank_ids[entry] >= 0).all()
    assert model.bank_mask[entry, frame].all()  # never a padded frame (video 0's last two are)
    assert len(set(entry.flatten().tolist())) == B and len(set(frame.flatten().tolist())) == L  # all of them used
    later = dataclasses.replace(random_batch(ctx, B, seed=7), ids=torch.arange(10, 10 + B))
    model(later)  # wraps around: the oldest four entries are overwritten
    assert model.bank_ids.tolist() == [12, 13, 14, 15, 4, 5, 10, 11] and int(model.bank_next) == 4
    hard, g = model.ground(batch)
    torch.manual_seed(3)
    source, idx = model.environments(batch, 1)
    torch.manual_seed(3)
    entry, frame = model.bank_frames(batch.ids, 1, L)
    torch.testing.assert_close(source.vp, model.bank_vp[entry, frame])  # the assembled environments
    view = swapped_view(batch, g, hard, idx[0], source=source)
    env = ~hard  # every environment slot gets a real bank frame
    torch.testing.assert_close(view.vp[env], source.vp[idx[0]].float()[env])
    assert view.mask[env].all()
    one = Grounded(build_head("baseline", cfg, ctx), grounding_options(cfg, "igv_bank"), ctx)
    one.bank_ids[:] = torch.tensor([0, 0, 0, 0, 0, 0, 0, -1])  # only video 0 itself is banked
    one.bank_mask[:] = True
    assert one.bank_frames(torch.tensor([0, 1]), 1, L) is None  # video 0 has no other video: the batch stands in
    plain = _grounded("baseline", "igv", ctx)
    assert not plain.banked and "bank_ids" not in plain.state_dict()  # env_source: batch keeps no bank


def test_oracle_indicator_grounds_on_the_annotated_frames_in_training_and_at_test(random_cache, tmp_path):
    """`indicator: oracle` (a diagnostic): the causal frames are the annotated action frames of the split being
    read, so the run's frame grounding on every split is exactly the annotation's (a video without one keeps every
    frame); it is refused where it means nothing (EIGV)."""
    from train.data import CacheReader
    from train.engine import _load, train

    cfg, store = random_cache
    cfg = dataclasses.replace(
        cfg,
        grounding={"o": {"method": "igv", "indicator": "oracle"}},
        train=dataclasses.replace(cfg.train, epochs=1, grounding="o", runs_root=str(tmp_path)),
    )
    result = train(cfg, store=store, progress=False, run_dir=tmp_path / "run")
    reader = CacheReader(store, cfg.train.task, allow_partial=True)
    for split in ("test_iid", "test_ood"):
        data = _load(reader, split, cfg, "cpu")
        relevant = frame_relevance(cfg, reader, data.rows)
        mask = np.asarray(reader.group[FRAME_MASK].get_orthogonal_selection(data.rows)).astype(bool)
        used = np.where((relevant & mask).any(1, keepdims=True), relevant & mask, mask)
        expected = grounding_scores(used, relevant, mask)
        assert result.metrics[split]["ground_iou"] == pytest.approx(expected["ground_iou"])
        assert expected["ground_iou"] > expected["ground_iou_random"]
    with pytest.raises(ConfigError, match=r"grounding\.e\.indicator: oracle .* is a diagnostic for method igv"):
        from_dict({"grounding": {"e": {"method": "eigv", "indicator": "oracle"}}})
