"""The shared back-door / front-door / Sinkhorn helpers against independent answers (POT, explicit sums)."""

import math

import numpy as np
import ot
import pytest
import torch

from train.heads.causal import BackdoorAttention, SampleBankAttention, marginal_error, nwgm_expectation, sinkhorn


def test_sinkhorn_matches_pot_and_its_marginals():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    plan = sinkhorn(cost, eps=0.1, iters=500)
    assert torch.allclose(plan.sum(2), torch.full((2, 5), 1 / 5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(plan.sum(1), torch.full((2, 7), 1 / 7, dtype=torch.float64), atol=1e-9)
    for b in range(2):
        ref = ot.sinkhorn(
            np.full(5, 1 / 5), np.full(7, 1 / 7), cost[b].numpy(), reg=0.1, numItermax=5000, stopThr=1e-12
        )
        assert np.allclose(plan[b].numpy(), ref, atol=1e-8)


def test_sinkhorn_masks_frames_and_is_differentiable():
    cost = torch.rand(1, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, True, False, False]])
    plan = sinkhorn(cost, eps=0.2, iters=300, mask=mask)
    assert torch.all(plan[0, :, 4:] == 0)
    ref = ot.sinkhorn(
        np.full(3, 1 / 3), np.full(4, 1 / 4), cost[0, :, :4].detach().numpy(), reg=0.2, numItermax=5000, stopThr=1e-12
    )
    assert np.allclose(plan[0, :, :4].detach().numpy(), ref, atol=1e-8)
    (plan * cost).sum().backward()
    assert torch.isfinite(cost.grad).all() and cost.grad[0, :, :4].abs().sum() > 0


def test_converged_sinkhorn_stops_at_its_tolerance_and_keeps_a_last_step_gradient():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    plan = sinkhorn(cost, eps=0.05, iters=100000, mask=mask, tol=1e-10)
    assert marginal_error(plan, mask) < 1e-10
    for b, n in ((0, 9), (1, 6)):
        ref = ot.sinkhorn(
            np.full(4, 1 / 4),
            np.full(n, 1 / n),
            cost[b, :, :n].detach().numpy(),
            reg=0.05,
            numItermax=100000,
            stopThr=1e-13,
        )
        assert np.allclose(plan[b, :, :n].detach().numpy(), ref, atol=1e-9)
    (plan * cost).sum().backward()  # through the last iteration only
    assert torch.isfinite(cost.grad).all() and cost.grad[0].abs().sum() > 0
    # a marginal error by hand: rows off by +0.1 and -0.1 in one video
    p = torch.full((1, 2, 2), 0.25)
    p[0, 0] += torch.tensor([0.05, 0.05])
    p[0, 1] -= torch.tensor([0.05, 0.05])
    assert abs(marginal_error(p) - 0.2) < 1e-7


def test_backdoor_expectation_is_the_explicit_weighted_sum():
    torch.manual_seed(0)
    for mode in ("dot", "additive"):
        bd = BackdoorAttention(6, 4, 8, mode=mode)
        q, z, prior = torch.randn(3, 6), torch.randn(5, 4), torch.softmax(torch.randn(5), 0)
        lam = bd.weights(q, z)
        explicit = torch.stack([sum(lam[b, i] * z[i] * prior[i] for i in range(5)) for b in range(3)])
        assert torch.allclose(bd(q, z, prior), explicit, atol=1e-6)
        assert torch.allclose(lam.sum(-1), torch.ones(3))
    # Table 4's rows remove a factor of Eq. 7 (set it to 1): the factor left is a distribution
    no_lambda = BackdoorAttention(6, 4, 8, use_lambda=False)
    assert torch.allclose(no_lambda(q, z, prior), (prior[:, None] * z).sum(0).expand(3, 4), atol=1e-6)  # Σ p_i z_i
    no_prior = BackdoorAttention(6, 4, 8, use_prior=False)
    assert torch.allclose(no_prior(q, z, prior), no_prior.weights(q, z) @ z, atol=1e-6)  # Σ λ_i z_i
    flat = BackdoorAttention(6, 4, 8, use_lambda=False, use_prior=False)
    assert torch.allclose(flat(q, z, prior), z.sum(0).expand(3, 4), atol=1e-6)  # Σ z_i


def test_nwgm_with_a_one_hot_prior_is_the_single_entry_term():
    feats = torch.randn(2, 5, 3)
    onehot = torch.zeros(5)
    onehot[2] = 1
    assert torch.equal(nwgm_expectation(feats, onehot), feats[:, 2])
    uniform = torch.full((5,), 0.2)
    assert torch.allclose(nwgm_expectation(feats, uniform), feats.mean(1))


def test_sample_bank_prior_weights_the_bank():
    torch.manual_seed(0)
    att = SampleBankAttention(4, 6, 8)
    q, bank = torch.randn(3, 4), torch.randn(5, 6)
    onehot = torch.zeros(5)
    onehot[1] = 1.0
    out = att(q, bank, onehot)
    assert torch.allclose(out, att.w_v(bank[1]).expand(3, 8), atol=1e-5)
    assert att(q, bank).shape == (3, 8)


def test_sample_bank_cosine_scores_are_the_explicit_renormalised_cosine_over_tau():
    torch.manual_seed(0)
    att = SampleBankAttention(4, 6, 8, score="cosine")
    with torch.no_grad():
        att.log_tau.fill_(math.log(0.3))
    q, bank = torch.randn(3, 4), torch.randn(5, 6)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    for b in range(3):
        qa = att.w_q(q[b])
        cos = torch.stack([torch.dot(qa, att.w_k(bank[k])) / (qa.norm() * att.w_k(bank[k]).norm()) for k in range(5)])
        w = torch.exp(cos / 0.3) * prior / (torch.exp(cos / 0.3) * prior).sum()  # ∝ exp(cos/τ) P(x'), renormalised
        assert torch.allclose(att.weights(q, bank, prior)[b], w, atol=1e-5)
        assert torch.allclose(att(q, bank, prior)[b], w @ att.w_v(bank), atol=1e-5)
    assert SampleBankAttention(4, 6, 8).log_tau is None  # the dot form has no temperature


@pytest.mark.parametrize("shape", [(2, 4, 6)])
def test_nwgm_shapes(shape):
    assert nwgm_expectation(torch.randn(*shape, 3), torch.full((shape[-1],), 1 / shape[-1])).shape == (*shape[:-1], 3)


def test_sinkhorn_reports_a_plan_returned_at_its_budget_unconverged():
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(2, 4, 9, generator=g, dtype=torch.float64)
    seen = []
    plan = sinkhorn(cost, eps=0.01, iters=3, tol=1e-12, unconverged=seen.append)
    # the error of the plan before its differentiable last iteration (which exactly fixes the columns)
    assert len(seen) == 1 and seen[0] > 1e-12 and marginal_error(plan) > 1e-12
    converged = []
    sinkhorn(cost, eps=0.5, iters=100000, tol=1e-8, unconverged=converged.append)
    assert converged == []  # within its budget: nothing to report


@pytest.mark.parametrize("eps", [0.25, 0.1, 0.05])
def test_implicit_sinkhorn_gradient_equals_the_gradient_unrolled_through_every_iteration(eps):
    """∂(Σ W ⊙ π)/∂cost at the converged plan, with padded frames: the implicit gradient against autograd
    through 5000 unrolled iterations (float64); the one-step stand-in is measurably off at small ε."""
    g = torch.Generator().manual_seed(3)
    cost0 = torch.rand(3, 6, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 6, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:], mask[2, 8:] = False, False

    def grad(**kw) -> torch.Tensor:
        cost = cost0.clone().requires_grad_()
        (sinkhorn(cost, eps, 5000, mask, **kw) * weight).sum().backward()
        return cost.grad

    unrolled = grad()
    implicit = grad(tol=1e-13)
    last = grad(tol=1e-13, grad="last_step")
    assert torch.allclose(implicit, unrolled, atol=1e-10 * unrolled.abs().max().item())
    assert (implicit[1, :, 6:] == 0).all()  # padded frames carry no mass and no gradient
    cosine = (last * unrolled).sum() / last.norm() / unrolled.norm()
    assert cosine < (0.995 if eps == 0.25 else 0.96)  # measured 0.986, 0.948, 0.848


def test_implicit_sinkhorn_gradient_under_vmap_equals_the_unrolled_one_per_seed():
    """train/stacked.py runs heads under torch.func.vmap: the implicit gradient of a vmapped plan (3 stacked
    seeds) equals each seed's gradient unrolled through 3000 iterations."""
    g = torch.Generator().manual_seed(5)
    cost0 = torch.rand(3, 2, 4, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    cost = cost0.clone().requires_grad_()
    plans = torch.func.vmap(lambda c: sinkhorn(c, 0.2, 3000, mask, tol=1e-12))(cost)
    (plans * weight).sum().backward()
    for seed in range(3):
        c = cost0[seed].clone().requires_grad_()
        (sinkhorn(c, 0.2, 3000, mask) * weight).sum().backward()
        assert torch.allclose(cost.grad[seed], c.grad, atol=1e-9 * c.grad.abs().max().item())
