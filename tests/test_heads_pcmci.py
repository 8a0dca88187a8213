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
from extract.config import ConfigError
from tests.conftest import random_batch
from train.heads import Batch, HeadContext, head_entry
from train.heads.pcmci import PCMCI, PCMCIOptions, RelationBases

B, L, DC, DV, C = 3, 6, 16, 12, 5


def _context() -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    prior = torch.arange(1.0, 8.0)
    return HeadContext(DC, DV, L, C, False, unit(C, DC), {"global": (unit(7, DC), prior / prior.sum())})


def _batch(ctx: HeadContext, seed: int = 1) -> Batch:
    batch = random_batch(ctx, B, seed)
    return dataclasses.replace(batch, vp=F.normalize(batch.vp.float(), dim=-1).half())  # unit VP, as CLIP writes it


def _head(seed: int = 0, **options) -> PCMCI:
    torch.manual_seed(seed)
    base = {"dim": 16, "layers": 1, "attention_heads": 2, "dropout": 0.0, "relation_dim": 8}
    return PCMCI(PCMCIOptions(**{**base, **options}), _context()).eval()


def test_ich_plan_is_sinkhorn_of_one_minus_cosine_with_the_frame_mask(monkeypatch):
    calls, sinkhorn = [], pcmci.sinkhorn

    def spy(cost, eps, iters, mask=None):
        plan = sinkhorn(cost, eps, iters, mask)
        calls.append((cost.detach(), eps, iters, mask, plan.detach()))
        return plan

    monkeypatch.setattr(pcmci, "sinkhorn", spy)
    head = _head(order=("ich", "ici", "ivc"), sinkhorn_eps=0.2, sinkhorn_iters=300)
    batch = _batch(_context())
    head(batch)
    (cost, eps, iters, mask, plan) = calls[0]
    assert len(calls) == 1 and eps == 0.2 and iters == 300 and torch.equal(mask, batch.mask)
    # the cost the head passed: 1 - cos(T, VP) with VP through the text projection (ICH runs first: T = T0 W + b)
    with torch.no_grad():
        t, vp_t = head.text(), head.text.proj(batch.vp.float())  # (C, d), (B, L, d)
        s = torch.einsum("cd,bld->bcl", F.normalize(t, dim=-1), F.normalize(vp_t, dim=-1))
    assert torch.allclose(cost, 1 - s, atol=1e-6)
    # marginals: rows 1/C, real columns 1/L_valid, padded columns no mass
    assert torch.allclose(plan.sum(2), torch.full((B, C), 1 / C), atol=1e-5)
    for b in range(B):
        n = int(batch.mask[b].sum())
        assert torch.allclose(plan[b, :, :n].sum(0), torch.full((n,), 1 / n), atol=1e-5)
        assert torch.all(plan[b, :, n:] == 0)
    # the plan agrees with POT on the shorter video's real frames
    n = int(batch.mask[0].sum())
    ref = ot.sinkhorn(
        np.full(C, 1 / C),
        np.full(n, 1 / n),
        (1 - s[0, :, :n]).double().numpy(),
        reg=0.2,
        numItermax=10000,
        stopThr=1e-12,
    )
    assert np.allclose(plan[0, :, :n].double().numpy(), ref, atol=1e-6)


def test_ich_proxies_are_weighted_averages_of_frames():
    head = _head()
    batch = _batch(_context())
    vp = batch.vp.float()
    t = head.text().expand(B, -1, -1)
    plan, h = head.ich.hallucinate(t, vp, head.text.proj(vp), batch.mask)
    assert h.shape == (B, C, DC)
    assert torch.allclose((C * plan).sum(2), torch.ones(B, C), atol=2e-2)  # 20 iterations: rows ≈ 1/C
    rows = plan / plan.sum(2, keepdim=True)  # C·π up to the residual of the fixed iterations, rows sum to 1
    assert torch.allclose(h, torch.einsum("bcl,bld->bcd", rows, vp), atol=1e-6)  # H = C·π·VP
    assert torch.all(h.norm(dim=-1) <= 1 + 1e-5)  # weighted averages of unit-norm frames


def test_nwgm_with_a_one_hot_prior_is_the_single_entry_term():
    head = _head()
    k = 3
    with torch.no_grad():
        head.ich.prior_logits.fill_(-1e4)
        head.ich.prior_logits[k] = 0.0
    t = torch.randn(B, C, 16)
    h = torch.randn(B, C, DC)
    expected = t + head.ich.w_h(head.ich.memory[k])  # T' = T + W_H h̄_k
    assert torch.allclose(head.ich.backdoor(t, h), expected, atol=1e-6)
    assert torch.allclose(head.ich.prior().sum(), torch.tensor(1.0))


def test_hallucination_memory_is_a_training_set_running_mean():
    head = _head(memory_momentum=0.75)
    batch = _batch(_context())
    before = head.ich.memory.clone()
    head(batch)  # eval: the memory stays
    assert torch.equal(head.ich.memory, before)
    head.train()
    vp = batch.vp.float()
    _, h = head.ich.hallucinate(head.text().expand(B, -1, -1), vp, head.text.proj(vp), batch.mask)
    head(batch)
    assert torch.allclose(head.ich.memory, 0.75 * before + 0.25 * h.detach().mean(0), atol=1e-6)
    assert "ich.memory" in head.state_dict()


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
    head = _head()
    assert head.ici.prior().shape == (8,) and head.ivc.frame_relations.prior().shape == (8,)  # K = 8 by default


@pytest.mark.parametrize("stage", ["ich", "ici", "ivc"])
def test_switching_a_stage_off_removes_its_parameters_and_changes_the_output(stage):
    full = _head()
    order = tuple(s for s in ("ich", "ici", "ivc") if s != stage)
    off = _head(**{stage: False, "order": order})
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
    assert PCMCI.required_dictionaries(off.opts) == (() if stage == "ivc" else ("global",))


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
    # the gradient of the output w.r.t. the text parameters differs (a different graph, not just other numbers)
    g_default = torch.autograd.grad(out_default.sum(), default.text.text)[0]
    g_other = torch.autograd.grad(out_other.sum(), other.text.text)[0]
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
    from extract.config import from_dict

    with pytest.raises(ConfigError, match="must name each enabled stage exactly once"):
        from_dict({"heads": {"pcmci": {"ici": False}}})
    with pytest.raises(ConfigError, match="heads.pcmci.order\\[1\\]: 'icc' is not accepted"):
        from_dict({"heads": {"pcmci": {"order": ["ich", "icc", "ivc"]}}})


def test_builtin_variants_are_the_papers_tables():
    variants = head_entry("pcmci").builtin_variants
    stages = lambda v: tuple(s for s in ("ich", "ici", "ivc") if variants[v].get(s, True))  # noqa: E731
    assert stages("stages_v1") == () and stages("stages_v2") == ("ich",)
    assert stages("stages_v3") == ("ici",) and stages("stages_v4") == ("ich", "ici")
    assert stages("stages_v5") == ("ivc",)
    for overrides in variants.values():
        PCMCIOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})  # all valid
    assert [variants[f"bases{k}"]["relation_bases"] for k in (1, 4, 8, 16)] == [1, 4, 8, 16]
    assert PCMCIOptions().relation_bases == 8 and PCMCIOptions().order == ("ich", "ici", "ivc")
