"""PCMCI head: known answers for ICH (Sinkhorn plan vs POT, NWGM), ICI (one basis = single-head attention),
stage switches and stage order."""

import dataclasses
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

import train.heads.pcmci as pcmci
from extract.contract.config import ConfigError
from tests.train.conftest import explicit_class_attention, explicit_readout, random_batch
from train.heads import Batch, HeadContext, head_entry
from train.heads.causal import marginal_error
from train.heads.common import masked_mean
from train.heads.pcmci import PCMCI, PCMCIOptions, RelationBases

B, L, DC, DV, C = 3, 6, 16, 12, 5


def _context() -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    prior = torch.arange(1.0, 8.0)
    dicts = {"global": (unit(7, DC), prior / prior.sum()), "global_video": (unit(7, DV), prior / prior.sum())}
    return HeadContext(DC, DV, L, C, False, unit(C, DC), dicts)


def _batch(ctx: HeadContext, seed: int = 1) -> Batch:
    batch = random_batch(ctx, B, seed)
    return dataclasses.replace(batch, vp=F.normalize(batch.vp.float(), dim=-1).half())  # unit VP, as CLIP writes it


def _head(seed: int = 0, **options) -> PCMCI:
    torch.manual_seed(seed)
    base = {"dim": 16, "layers": 1, "attention_heads": 2, "dropout": 0.0, "relation_dim": 8}
    return PCMCI(PCMCIOptions(**{**base, **options}), _context()).eval()


def _cosines(ctx: HeadContext, batch: Batch) -> torch.Tensor:
    """S = <T0, VP>: (B, C, L), cosines in CLIP space."""
    return torch.einsum("cd,bld->bcl", F.normalize(ctx.t0, dim=-1), F.normalize(batch.vp.float(), dim=-1))


def test_an_unconverged_plan_is_logged_once_per_run(caplog):
    ctx = _context()
    batch = _batch(ctx)
    with caplog.at_level("WARNING", logger="train.heads.pcmci"):
        head = _head(sinkhorn_iters=2, sinkhorn_tol=1e-12, sinkhorn_eps=0.01)
        head(batch), head(batch)
        assert [r.message.count("has not reached the tolerance") for r in caplog.records] == [1]  # 2 steps, 1 warning
        assert "budget of 2 iterations" in caplog.records[0].message
        caplog.clear()
        _head()(batch)  # the default budget converges: nothing to say
        assert not caplog.records


def test_ich_plan_is_converged_sinkhorn_of_the_scaled_clip_cost_with_the_frame_mask(monkeypatch):
    calls, sinkhorn = [], pcmci.sinkhorn

    def spy(cost, eps, iters, mask=None, tol=None, unconverged=None, grad="implicit"):
        plan = sinkhorn(cost, eps, iters, mask, tol, unconverged, grad)
        calls.append((cost.detach(), eps, mask, plan.detach()))
        return plan

    monkeypatch.setattr(pcmci, "sinkhorn", spy)
    ctx = _context()
    head = _head(sinkhorn_eps=0.2)
    batch = _batch(ctx)
    head(batch)
    (cost, eps, mask, plan) = calls[0]
    assert len(calls) == 1 and eps == 0.2 and torch.equal(mask, batch.mask)
    # the cost: 1 - cos(T0, VP) in CLIP space (no learned map), over the spread of its doubly centred part
    raw = 1 - _cosines(ctx, batch)
    for b in range(B):
        n = int(batch.mask[b].sum())
        real = raw[b, :, :n].double()
        centred = real - real.mean(1, keepdim=True) - real.mean(0, keepdim=True) + real.mean()
        assert torch.allclose(cost[b, :, :n].double(), real / centred.square().mean().sqrt(), atol=1e-5)
    # converged marginals: rows 1/C, real columns 1/L_valid, padded columns no mass
    assert marginal_error(plan, batch.mask) < 1e-5
    assert torch.allclose(plan.sum(2), torch.full((B, C), 1 / C), atol=1e-6)
    for b in range(B):
        n = int(batch.mask[b].sum())
        assert torch.allclose(plan[b, :, :n].sum(0), torch.full((n,), 1 / n), atol=1e-6)
        assert torch.all(plan[b, :, n:] == 0)
    # the plan agrees with POT on the shorter video's real frames
    n = int(batch.mask[0].sum())
    ref = ot.sinkhorn(
        np.full(C, 1 / C), np.full(n, 1 / n), cost[0, :, :n].double().numpy(), reg=0.2, numItermax=10000, stopThr=1e-12
    )
    assert np.allclose(plan[0, :, :n].double().numpy(), ref, atol=1e-6)
    # the plan ignores row and column shifts of the cost: it is the doubly centred cost's plan
    n = int(batch.mask[1].sum())
    c = cost[1:2, :, :n]
    shifted = c + torch.randn(1, C, 1) + torch.randn(1, 1, n)
    assert torch.allclose(sinkhorn(c, 0.2, 1000, tol=1e-7), sinkhorn(shifted, 0.2, 1000, tol=1e-7), atol=1e-5)
    # cost_scale minmax: [0, 1] over each video's real entries
    calls.clear()
    _head(cost_scale="minmax")(batch)
    for b in range(B):
        n = int(batch.mask[b].sum())
        real = raw[b, :, :n]
        assert torch.allclose(calls[0][0][b, :, :n], (real - real.min()) / (real.max() - real.min()), atol=1e-6)
    # cost_scale none: the cost is 1 - S as it is
    calls.clear()
    _head(cost_scale="none")(batch)
    for b in range(B):
        n = int(batch.mask[b].sum())
        assert torch.allclose(calls[0][0][b, :, :n], raw[b, :, :n], atol=1e-6)


def test_ich_proxies_are_the_explicit_sum_of_frames_weighted_by_the_plan():
    ctx = _context()
    head = _head()
    batch = _batch(ctx)
    vp = batch.vp.float()
    plan, h = head.ich.hallucinate(ctx.t0.expand(B, -1, -1), vp, batch.mask)
    assert h.shape == (B, C, DC)
    for b in range(B):
        for c in range(C):
            explicit = sum(C * plan[b, c, j] * vp[b, j] for j in range(L))  # h_c = Σ_l C π_cl VP_l
            assert torch.allclose(h[b, c], explicit, atol=1e-5)
    assert torch.all(h.norm(dim=-1) <= 1 + 1e-5)  # convex combinations of unit-norm frames (rows of C·π sum to 1)


def test_a_frame_aligned_with_one_class_dominates_that_class_plan_row():
    ctx = _context()
    head = _head()
    batch = _batch(ctx)
    vp = batch.vp.float().clone()
    vp[1, 2] = ctx.t0[3]  # frame 2 of video 1 is class 3's text itself
    plan = head.ich.plan(ctx.t0.expand(B, -1, -1), vp, batch.mask)  # (B, C, L)
    row = plan[1, 3] * C  # class 3's plan row, summing to 1
    assert row.argmax() == 2 and row[2] > 0.5
    assert plan[1, :, 2].argmax() == 3  # and the frame sends its mass to class 3
    report = head.transport_report(dataclasses.replace(batch, vp=vp.half()))
    assert 1.0 <= report["effective_frames_min"] <= report["effective_frames"] <= L
    assert report["marginal_error"] < 1e-5


def test_mean_vp_ich_adds_the_frame_mean_of_vp_to_every_class_without_a_plan(monkeypatch):
    """Σ_c P(h_c) h_c with P(h_c) = 1/C = Σ_c Σ_l π_cl VP_l = mean_l VP_l: the plan cancels (docstring), so
    `mean_vp` computes the mean and never runs Sinkhorn; the converged plan's proxies give the same term."""
    ctx = _context()
    head = _head(ich_form="mean_vp")
    batch = _batch(ctx)
    vp = batch.vp.float()
    t = ctx.t0.expand(B, -1, -1)
    _, h = head.ich.hallucinate(t, vp, batch.mask)  # the converged plan's proxies h_c = C Σ_l π_cl VP_l
    plans = []
    monkeypatch.setattr(pcmci, "sinkhorn", lambda *a, **k: plans.append(1))
    out = head.ich(t, vp, batch.mask)  # T' (B, C, Dc)
    assert plans == []  # no transport computed
    mean_vp = masked_mean(vp, batch.mask)  # (B, Dc)
    assert torch.allclose(out, t + head.ich.w_h(mean_vp)[:, None], atol=1e-5)
    assert torch.allclose(h.mean(1), mean_vp, atol=1e-5)  # Σ_c (1/C) h_c: the same vector
    term = out - t  # it varies across videos but not across classes
    assert torch.allclose(term, term[:, :1].expand_as(term), atol=1e-6)
    assert not torch.allclose(term[0], term[1], atol=1e-3)


def test_the_default_ich_changes_with_the_plan_not_only_its_column_sums():
    """The default (`memory`): replace π by another plan with the same row and column sums (π + ε·D, D with zero
    row and column sums on real frames): T' changes, where P(h) = 1/C's term could not (it reads column sums).
    The term is the explicit λ·P sum over the strata H̄ with λ from each class's proxy."""
    ctx = _context()
    head = _head()
    assert head.opts.ich_form == "memory"
    batch = _batch(ctx)
    vp, mask = batch.vp.float(), batch.mask
    t = ctx.t0.expand(B, -1, -1)
    plan, h = head.ich.hallucinate(t, vp, mask)
    n = int(mask[0].sum())
    d = torch.zeros(C, L)
    d[0, 0], d[0, 1], d[1, 0], d[1, 1] = 1, -1, -1, 1  # zero row and column sums
    other = plan.clone()
    other[0] += 0.5 * plan[0, :2, :2].min() * d  # still non-negative, the same marginals
    assert torch.allclose(other.sum(1), plan.sum(1)) and torch.allclose(other.sum(2), plan.sum(2)) and n >= 2
    h_other = torch.einsum("bcl,bld->bcd", other * C, vp)
    with torch.no_grad():
        a, b = head.ich.backdoor(t, h), head.ich.backdoor(t, h_other)
        assert (a - b)[0].abs().max() > 1e-6 and torch.equal(a[1:], b[1:])
        ich = head.ich  # the explicit sum for video 0, class 2
        memory = ich.memory
        lam = torch.stack([ich.w_q(h[0, 2]) @ ich.w_k(memory[j]) * ich.scale for j in range(C)])
        w = torch.softmax(lam + ich.prior_logits.log_softmax(0), 0)
        assert torch.allclose(a[0, 2], t[0, 2] + ich.w_h(sum(w[j] * memory[j] for j in range(C))), atol=1e-5)


def test_ich_attention_is_the_explicit_renormalised_sum_over_the_video_proxies():
    ctx = _context()
    head = _head(ich_form="attention")
    batch = _batch(ctx)
    t = torch.randn(B, C, DC)
    _, h = head.ich.hallucinate(t, batch.vp.float(), batch.mask)
    out = head.ich.backdoor(t, h)
    q, k = head.ich.w_q(t), head.ich.w_k(h)  # (B, C, d_k), (B, C, d_k)
    for b in range(B):
        for c in range(C):
            lam = torch.exp(q[b, c] @ k[b].T / math.sqrt(8))  # λ_cj (C,)
            w = lam * (1 / C) / (lam * (1 / C)).sum()  # λ_j P(h_j) / Σ_i λ_i P(h_i)
            expected = t[b, c] + head.ich.w_h((w[:, None] * h[b]).sum(0))
            assert torch.allclose(out[b, c], expected, atol=1e-5)
    term = out - t
    assert not torch.allclose(term[:, 0], term[:, 1], atol=1e-4)  # per class, unlike the paper's form


def test_ich_memory_nwgm_with_a_one_hot_prior_is_the_single_entry_term():
    head = _head(ich_form="memory")
    k = 3
    with torch.no_grad():
        head.ich.prior_logits.fill_(-1e4)
        head.ich.prior_logits[k] = 0.0
    t = torch.randn(B, C, DC)
    h = torch.randn(B, C, DC)
    expected = t + head.ich.w_h(head.ich.memory[k])  # T' = T + W_H h̄_k
    assert torch.allclose(head.ich.backdoor(t, h), expected, atol=1e-6)
    assert head.ich.prior_logits.requires_grad  # a learned class prior


def test_ich_memory_is_a_training_set_running_mean_and_only_in_its_form():
    ctx = _context()
    assert not hasattr(_head(ich_form="mean_vp").ich, "memory")  # P(h) = 1/C: no strata
    head = _head(ich_form="memory", memory_momentum=0.75)
    batch = _batch(ctx)
    before = head.ich.memory.clone()
    head(batch)  # eval: the memory stays
    assert torch.equal(head.ich.memory, before)
    head.train()
    _, h = head.ich.hallucinate(ctx.t0.expand(B, -1, -1), batch.vp.float(), batch.mask)
    head(batch)
    assert torch.allclose(head.ich.memory, 0.75 * before + 0.25 * h.detach().mean(0), atol=1e-6)
    assert "ich.memory" in head.state_dict()


def test_text_is_frozen_clip_text_by_default():
    head = _head()
    assert not head.text.text.requires_grad and torch.equal(head.text.text, _context().t0)
    assert "text.text" not in {n for n, _ in head.named_parameters()}
    assert _head(learn_text=True).text.text.requires_grad


def test_ivc_bank_is_the_video_feature_dictionary_not_clip_frames():
    ctx = _context()
    head = _head()
    assert head.ivc.bank.w_k.in_features == DV  # the bank holds V (timesformer/frame) entries
    assert PCMCI.required_dictionaries(head.opts) == ("global_video",)
    batch = _batch(ctx)
    g = torch.Generator().manual_seed(5)
    prior = batch.dictionaries["global"][1]
    other_clip = {**batch.dictionaries, "global": (torch.randn(7, DC, generator=g), prior)}
    other_video = {**batch.dictionaries, "global_video": (torch.randn(7, DV, generator=g), prior)}
    with torch.no_grad():
        out = head(batch)
        assert torch.equal(out, head(dataclasses.replace(batch, dictionaries=other_clip)))  # CLIP frames: unused
        assert not torch.allclose(out, head(dataclasses.replace(batch, dictionaries=other_video)), atol=1e-5)
    clip_bank = _head(ivc_dictionary="global")
    assert clip_bank.ivc.bank.w_k.in_features == DC and PCMCI.required_dictionaries(clip_bank.opts) == ("global",)


def test_aligned_frame_relations_are_ici_relations_over_each_frame_text():
    ctx = _context()
    head = _head()
    assert not hasattr(head.ivc, "frame_relations") and head.ivc.w_v.shape == (8, 16, 16)
    seen = []
    handle = head.ici.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    calls = []
    real = head.ici.relations
    head.ici.relations = lambda x, mask=None: calls.append((x.detach(), mask)) or real(x, mask)
    batch = _batch(ctx)
    with torch.no_grad():
        head(batch)
    handle.remove()
    # the second call to ICI's relations is IVC's: over (B, L, Dc) frame counterparts, with the frame mask
    (x_text, mask_text), (x_frames, mask_frames) = calls
    assert mask_text is None and x_text.shape == (B, C, DC)
    assert x_frames.shape == (B, L, DC) and torch.equal(mask_frames, batch.mask)
    t_star = seen[0]  # T* (B, C, Dc): each counterpart is a convex combination of T*'s rows
    weights = torch.linalg.lstsq(t_star.transpose(1, 2), x_frames.transpose(1, 2)).solution  # (B, C, L)
    assert torch.allclose(weights.sum(1), torch.ones(B, L), atol=1e-3)
    off = _head(ivc_alignment=False)
    assert hasattr(off.ivc, "frame_relations")
    v5 = _head(ich=False, ici=False, order=("ivc",))
    assert hasattr(v5.ivc, "frame_relations")  # no ICI: F's own bases


def test_multiscale_mediator_attends_within_each_window_and_over_real_frames():
    torch.manual_seed(0)
    layer = pcmci.MultiScaleAttention(6)
    v = torch.randn(1, 9, 6)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 7:] = False
    out = layer(v, mask)
    q, k, val = layer.w_q(v)[0], layer.w_k(v)[0], layer.w_v(v)[0]
    frame = 4
    expected = torch.zeros(6)
    for r in pcmci.SCALES:
        js = [j for j in range(9) if abs(j - frame) <= r and mask[0, j]]
        w = torch.softmax(torch.stack([q[frame] @ k[j] / math.sqrt(6) for j in js]), 0)
        expected += sum(wi * val[j] for wi, j in zip(w, js, strict=True)) / len(pcmci.SCALES)
    assert torch.allclose(out[0, frame], expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["mediator_memory", "mediator_multiscale", "alignment_off", None])
def test_the_text_reaches_v_star_only_where_the_row_says(variant):
    """IVC with T* perturbed alone (its CLIP-space T and its projection t, everything else fixed): V* must not
    move in the memory and multi-scale mediator rows (T* is neither their mediator nor, without the alignment,
    their frame relations' source), and must move with T* as the mediator and in the aligned full head."""
    overrides = head_entry("pcmci").builtin_variants[variant] if variant else {}
    head, batch = _head(**overrides), _batch(_context())
    seen = {}
    head.ivc.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        head(batch)
        (v, t_clip, t, *rest), before = seen["args"], seen["out"]
        moved = head.ivc(v, t_clip + 0.5 * torch.randn_like(t_clip), t + 0.5 * torch.randn_like(t), *rest)
    change = (moved - before).abs().max().item()
    if variant in ("mediator_memory", "mediator_multiscale"):
        assert change == 0.0
    else:
        assert change > 1e-3


def test_one_relation_basis_is_single_head_attention():
    torch.manual_seed(0)
    layer = RelationBases(dim=10, bases=1, key_dim=4)
    x = torch.randn(2, 5, 10)
    wq, wk, wv = layer.w_q[0], layer.w_k[0], layer.w_v[0]
    single = x + torch.softmax((x @ wq) @ (x @ wk).transpose(1, 2) / math.sqrt(4), -1) @ x @ wv
    assert torch.allclose(layer(x), single, atol=1e-5)
    assert torch.allclose(layer.prior(), torch.ones(1))
    # masked items are never attended: the real items' outputs ignore them
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x2 = x.clone()
    x2[1, 3:] = 100.0
    assert torch.allclose(layer(x, mask)[1, :3], layer(x2, mask)[1, :3], atol=1e-5)
    ref = x[1:, :3] + torch.softmax((x[1:, :3] @ wq) @ (x[1:, :3] @ wk).transpose(1, 2) / 2, -1) @ x[1:, :3] @ wv
    assert torch.allclose(layer(x, mask)[1:, :3], ref, atol=1e-5)


def test_relation_bases_are_vectorised_and_their_prior_sums_to_one():
    torch.manual_seed(0)
    layer = RelationBases(dim=10, bases=8, key_dim=4)
    with torch.no_grad():
        layer.prior_logits.copy_(torch.randn(8))
    p = layer.prior()
    assert p.shape == (8,) and torch.allclose(p.sum(), torch.tensor(1.0))
    x = torch.randn(2, 5, 10)
    g = layer.relations(x)  # (B, K, N, N)
    assert g.shape == (2, 8, 5, 5) and torch.allclose(g.sum(-1), torch.ones(2, 8, 5))
    explicit = x + sum(p[k] * g[:, k] @ x @ layer.w_v[k] for k in range(8))
    assert torch.allclose(layer(x), explicit, atol=1e-5)
    head = _head(ivc_alignment=False)
    assert head.ici.prior().shape == (8,) and head.ivc.frame_relations.prior().shape == (8,)  # K = 8 by default


@pytest.mark.parametrize("stage", ["ich", "ici", "ivc"])
def test_switching_a_stage_off_removes_its_parameters_and_changes_the_output(stage):
    full = _head(ivc_alignment=False)  # without ICI, IVC's F has its own bases: keep them in both heads
    order = tuple(s for s in ("ich", "ici", "ivc") if s != stage)
    off = _head(**{stage: False, "order": order, "ivc_alignment": False})
    assert getattr(off, stage) is None
    names = {n for n, _ in off.named_parameters()}
    assert not any(n.startswith(f"{stage}.") for n in names) and any(
        n.startswith(f"{stage}.") for n, _ in full.named_parameters()
    )
    assert sum(p.numel() for p in off.parameters()) < sum(p.numel() for p in full.parameters())
    off.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(f"{stage}.")})
    batch = _batch(_context())
    with torch.no_grad():
        assert not torch.allclose(full(batch), off(batch), atol=1e-4)
    assert PCMCI.required_dictionaries(off.opts) == (() if stage == "ivc" else ("global_video",))


def _trace(head: PCMCI) -> list[str]:
    calls = []
    for stage in ("ich", "ici", "ivc"):
        module = getattr(head, stage)
        if module is not None:
            module.register_forward_hook(lambda m, i, o, s=stage: calls.append(s))
    return calls


@pytest.mark.parametrize("order", [("ivc", "ich", "ici"), ("ici", "ich", "ivc"), ("ich", "ivc", "ici")])
def test_stage_order_changes_the_computation_graph_and_the_output(order):
    default, other = _head(), _head(order=order)
    other.load_state_dict(default.state_dict())  # the same weights: only the order differs
    calls_default, calls_other = _trace(default), _trace(other)
    batch = _batch(_context())
    out_default, out_other = default(batch), other(batch)
    assert calls_default == ["ich", "ici", "ivc"] and calls_other == list(order)
    assert not torch.allclose(out_default, out_other, atol=1e-4)
    # the gradient of the output w.r.t. ICH's W_H differs (a different graph, not just other numbers)
    g_default = torch.autograd.grad(out_default.sum(), default.ich.w_h.weight)[0]
    g_other = torch.autograd.grad(out_other.sum(), other.ich.w_h.weight)[0]
    assert not torch.allclose(g_default, g_other, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"order": ("ich", "ici")},  # an enabled stage missing
        {"order": ("ich", "ici", "ivc", "ich")},  # a stage twice
        {"ivc": False},  # a disabled stage still in the order
    ],
)
def test_order_must_be_a_permutation_of_the_enabled_stages(options):
    with pytest.raises(ConfigError, match="must name each enabled stage exactly once"):
        PCMCIOptions(**options)


def test_order_is_checked_by_the_config_loader():
    from extract.contract.config import from_dict

    with pytest.raises(ConfigError, match="must name each enabled stage exactly once"):
        from_dict({"heads": {"pcmci": {"ici": False}}})
    with pytest.raises(ConfigError, match="heads.pcmci.order\\[1\\]: 'icc' is not accepted"):
        from_dict({"heads": {"pcmci": {"order": ["ich", "icc", "ivc"]}}})


def test_paper_ici_over_frozen_text_is_one_term_for_every_video_and_ici_video_varies():
    ctx = _context()
    seen = {}
    for form in ("paper", "video"):
        head = _head(ich=False, ivc=False, order=("ici",), ici_form=form)
        handle = head.ici.register_forward_hook(lambda m, i, o, f=form: seen.__setitem__(f, o.detach()))  # T*
        with torch.no_grad():
            head(_batch(ctx, seed=1))
        handle.remove()
    paper, video = seen["paper"], seen["video"]
    assert torch.allclose(paper, paper[:1].expand_as(paper))  # frozen T0 in, the same T* out for every video
    assert (video - video[:1]).abs().amax() > 1e-3  # the strata weights follow the video


def test_ici_video_is_the_explicit_renormalised_sum_over_strata():
    torch.manual_seed(0)
    layer = pcmci.IllusionIntervention(dim=DC, bases=4, key_dim=4, form="video")
    with torch.no_grad():
        layer.prior_logits.copy_(torch.randn(4))
    x = torch.randn(2, C, DC)
    vp = torch.randn(2, L, DC)
    mask = torch.tensor([[True] * L, [True] * 3 + [False] * (L - 3)])
    vp_pad = vp.clone()
    vp_pad[1, 3:] = 50.0  # padded frames never count
    p, g = layer.prior(), layer.relations(x)  # (K,), (B, K, C, C)
    for b, n in ((0, L), (1, 3)):
        mean = F.normalize(F.normalize(vp[b, :n], dim=-1).mean(0), dim=-1)  # v̄P_b
        lam = torch.exp(layer.w_lambda.weight @ mean)  # λ_bk (K,)
        w = lam * p / (lam * p).sum()  # ∝ λ_bk p_k, renormalised
        explicit = x[b] + sum(w[k] * g[b, k] @ x[b] @ layer.w_v[k] for k in range(4))
        assert torch.allclose(layer(x, vp_pad, mask)[b], explicit, atol=1e-4)
        assert torch.allclose(layer.strata(vp_pad, mask)[b], w, atol=1e-6)
    paper = pcmci.IllusionIntervention(dim=DC, bases=4, key_dim=4)
    assert paper.w_lambda is None and paper.strata(vp, mask).shape == (4,)  # the paper's p_k, no new parameters


def test_diagnosed_ici_term_is_the_intervention_alone_not_t_star():
    """`ltar diagnose` measures ICI by `ici.term` = T* - T': T* itself carries ICH's variation in T', so knocking
    T* out would also knock ICH out (the two knock-outs were the same number in every table row)."""
    ctx = _context()
    head = _head()  # ICH -> ICI -> IVC
    assert [t.module for t in head_entry("pcmci").terms if t.name == "ici"] == ["ici.term"]
    seen = {}
    hooks = [
        head.ici.register_forward_hook(lambda m, i, o: seen.update(t_prime=i[0].detach(), t_star=o.detach())),
        head.ici.term.register_forward_hook(lambda m, i, o: seen.update(term=o.detach())),
    ]
    with torch.no_grad():
        head(_batch(ctx, seed=1))
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["term"], seen["t_star"] - seen["t_prime"], atol=1e-5)  # Σ_k p_k G_k T' W_v^k
    assert (seen["t_prime"] - seen["t_prime"][:1]).abs().amax() > 1e-3  # T' varies: ICH is on


def test_each_table_row_builds_the_stages_and_bases_its_caption_names():
    """The built models, not the variant dicts: Table V1-V5 hold exactly their stages, the bases rows K bases in
    ICI and in IVC's frame relations, and the full head runs ICH -> ICI -> IVC with K = 8."""
    present = lambda h: tuple(s for s in ("ich", "ici", "ivc") if getattr(h, s) is not None)  # noqa: E731
    variants = head_entry("pcmci").builtin_variants
    expected = {"stages_v1": (), "stages_v2": ("ich",), "stages_v3": ("ici",), "stages_v4": ("ich", "ici")}
    for name, stages in {**expected, "stages_v5": ("ivc",)}.items():
        assert present(_head(**variants[name])) == stages, name
    full = _head()
    assert present(full) == ("ich", "ici", "ivc") and full.opts.order == ("ich", "ici", "ivc")
    assert full.ici.w_q.shape[0] == 8
    for k in (1, 4, 8, 16):
        head = _head(**variants[f"bases{k}"])
        assert head.ici.w_q.shape[0] == k and head.ivc.w_v.shape[0] == k, k


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean, var = x.mean(), ((x - x.mean()) ** 2).mean()
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("form", ["front_door", "residual"])
def test_ivc_is_the_explicit_sum_of_relations_mediator_and_sample_bank(form, aligned):
    """V* of IVC one frame, class, basis and bank entry at a time: v_r = v + Σ_k p_k Σ_m G_k[l, m] v_m W_v^k
    (G from ICI's bases over each frame's text counterpart when aligned, else F's own bases over the frames),
    m_l = Σ_c P(t*_c | v_r,l) t*_c, x̂_l = Σ_i P(v'_i | m_l) W_v v'_i with P ∝ exp(q·k/√d) P(v'_i);
    front_door: V* = LN(m + x̂), residual: LN(v_r + m + x̂)."""
    head, batch = _head(ivc_form=form, ivc_alignment=aligned), _batch(_context())
    seen = {}
    head.ivc.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        head(batch)
    v, t_clip, t, mask, bank, prior, bases, vp = seen["args"]
    ivc, d = head.ivc, v.shape[-1]
    rel = bases if aligned else ivc.frame_relations
    w_v = ivc.w_v if aligned else ivc.frame_relations.w_v
    p = rel.prior()  # the paper's strata weights (K,)
    K = p.shape[0]
    expected = torch.zeros_like(v)
    with torch.no_grad():
        for b in range(B):
            frames = [m for m in range(L) if mask[b, m]]
            if aligned:  # each frame's text counterpart in CLIP space, Σ_c P(t_c | v_l) t_c
                src = []
                for f in range(L):
                    w = torch.softmax(torch.stack([v[b, f] @ t[b, c] / math.sqrt(d) for c in range(C)]), 0)
                    src.append(sum(w[c] * t_clip[b, c] for c in range(C)))
            else:
                src = [v[b, f] for f in range(L)]
            for f in range(L):
                v_r = v[b, f].clone()
                for k in range(K):
                    q = src[f] @ rel.w_q[k]
                    s = torch.stack([q @ (src[m] @ rel.w_k[k]) * rel.scale for m in frames])
                    g = torch.softmax(s, 0)
                    v_r += p[k] * sum(g[i] * (v[b, m] @ w_v[k]) for i, m in enumerate(frames))
                pm = torch.softmax(torch.stack([v_r @ t[b, c] / math.sqrt(d) for c in range(C)]), 0)
                med = sum(pm[c] * t[b, c] for c in range(C))
                q = ivc.bank.w_q(med)
                s = torch.stack([q @ ivc.bank.w_k(bank[i]) / math.sqrt(d) + prior[i].log() for i in range(len(bank))])
                w = torch.softmax(s, 0)
                x_hat = sum(w[i] * ivc.bank.w_v(bank[i]) for i in range(len(bank)))
                inner = med + x_hat if form == "front_door" else v_r + med + x_hat
                expected[b, f] = _layer_norm(inner, ivc.norm)
    assert torch.allclose(seen["out"], expected, atol=1e-5)


def test_front_door_v_reaches_v_star_only_through_the_mediator():
    """F's relation term zeroed (v_r = v), v moved along a direction orthogonal to every t*_c: P(M | v) and so
    the mediator are unchanged. The front-door V* does not move; the residual form (v_r added) does."""
    outs = {}
    for form in ("front_door", "residual"):
        head, batch = _head(ivc_form=form, ivc_alignment=False), _batch(_context())
        torch.nn.init.zeros_(head.ivc.frame_relations.w_v)  # v_r = v exactly
        seen = {}
        head.ivc.register_forward_hook(lambda m, args, out, seen=seen: seen.update(args=args, out=out))
        with torch.no_grad():
            head(batch)
            (v, t_clip, t, *rest), before = seen["args"], seen["out"]
            null = torch.linalg.svd(t, full_matrices=True).Vh[:, C:]  # (B, d - C, d): rows orthogonal to every t_c
            u = 3.0 * null[:, :1]  # (B, 1, d), one direction per video, every frame
            assert (torch.einsum("bld,bcd->blc", u, t)).abs().max() < 1e-5
            outs[form] = (head.ivc(v + u, t_clip, t, *rest) - before).abs().max().item()
    assert outs["front_door"] < 1e-5 and outs["residual"] > 1e-2


def test_a_trainable_ot_cost_gets_the_gradient_unrolled_through_every_sinkhorn_iteration(monkeypatch):
    """Where T carries a gradient (order ICI -> ICH, learn_text), ICH's cost does: the gradient of the proxies
    H = C·π·VP with respect to T (through the head's scaled cost and its plan; the default, implicit) equals the
    one with Sinkhorn unrolled for 3000 differentiable iterations; the one-step stand-in does not."""
    ctx, batch = _context(), _batch(_context())
    vp, mask = batch.vp.float(), batch.mask
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(B, C, DC, generator=g)

    def grad(unrolled: bool = False, **options) -> torch.Tensor:
        head = _head(sinkhorn_eps=0.1, sinkhorn_tol=1e-6, sinkhorn_iters=5000, **options)
        if unrolled:
            real = pcmci.sinkhorn
            monkeypatch.setattr(pcmci, "sinkhorn", lambda c, e, i, m, **k: real(c.double(), e, 3000, m).float())
        t = ctx.t0.expand(B, -1, -1).clone().requires_grad_()  # T (B, C, Dc), trainable
        _, h = head.ich.hallucinate(t, vp, mask)
        (h * weight).sum().backward()
        monkeypatch.undo()
        return t.grad

    implicit, unrolled, last = grad(), grad(unrolled=True), grad(sinkhorn_grad="last_step")
    scale = unrolled.abs().max().item()
    assert scale > 0
    assert torch.allclose(implicit, unrolled, atol=1e-3 * scale)
    assert (last - unrolled).abs().max() > 0.05 * scale


def test_the_full_forward_is_the_readout_of_t_star_attending_over_v_star_by_explicit_sums():
    """logit_c = w_c · f_c + b_c with f_c = LN(q_c + Σ_h W_o^h Σ_l a^h_cl W_v^h V*_l), q = LN(proj(T*)),
    a^h_cl = softmax over real frames of (W_q^h q_c) · (W_k^h V*_l) / √(d / heads): the inference operator
    (T* as queries, V* as keys and values) and the per-class readout, one class, head and frame at a time."""
    head, batch = _head(), _batch(_context())
    seen = {}
    head.ivc.register_forward_hook(lambda m, a, o: seen.update(v_star=o))
    head.ici.register_forward_hook(lambda m, a, o: seen.update(t_star=o))
    with torch.no_grad():
        out = head(batch)
        f = explicit_class_attention(head.pool, head.text.proj(seen["t_star"]), seen["v_star"], batch.mask)
        assert torch.allclose(out, explicit_readout(head.readout, f), atol=1e-5)
