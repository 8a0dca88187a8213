"""Causal-intervention building blocks shared by every head, each tested against a known answer.

Back-door adjustment replaces P(z | x) by the prior P(z): the confounder term is an expectation
over a dataset-level confounder set (a dictionary or a learned memory) weighted by its prior, never
computed from the current sample alone. NWGM (normalised weighted geometric mean) moves that
expectation inside the network: one forward pass over prior-weighted features.

Front-door adjustment P(Y | do(X)) = Σ_m P(m | x) Σ_x' P(x') P(Y | x', m): the inner Σ_x' P(x') is an
expectation over *other samples* — the global dictionary G or a memory bank — taken by attention
from the mediator (cross-sample attention), with P(x') as the bank's prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def dictionary_prior(prior: torch.Tensor, kind: Literal["empirical", "uniform"]) -> torch.Tensor:
    """A dictionary's prior (K,) as a head's `prior` option asks: its own N_i / N, or uniform 1/K (IVRD-style)."""
    return prior if kind == "empirical" else torch.full_like(prior, 1.0 / prior.numel())


def nwgm_expectation(features: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """E_{p(z)}[f(z)] ≈ Σ_k p_k f_k (NWGM): features (..., K, D), prior (K,) or (..., K) -> (..., D)."""
    return torch.einsum("...kd,...k->...d", features, prior.to(features.dtype))


class BackdoorAttention(nn.Module):
    """E_z[g(z)] = Σ_i λ_i z_i p(z_i) (ECRL Eq. 6): λ over the confounder set from the sample's query.

    `dot`: λ = softmax_i((W_c q) · (W_d z_i) / √d); `additive`: λ = softmax_i(w · tanh(W_c q + W_d z_i)).
    `use_lambda=False` removes the factor λ (λ_i = 1), `use_prior=False` removes p(z_i) (p(z_i) = 1): ECRL's
    Table 4 rows "w/o λ" and "w/o P(z_i)". Removing a factor of Eq. 7's product sets it to 1, so the factor left
    is a distribution and E_z a proper expectation (Σ_i p(z_i) z_i, or Σ_i λ_i z_i); setting it to 1/K instead
    would keep the full form's ~1/K scale twice over (1/K²) and make "w/o λ" a constant shrunk K-fold. The prior
    passed in is the dictionary's p(z_i) = N_i / N, or a uniform one (a head's `prior: uniform`).
    """

    def __init__(
        self,
        query_dim: int,
        z_dim: int,
        dim: int,
        mode: Literal["dot", "additive"] = "dot",
        use_lambda: bool = True,
        use_prior: bool = True,
    ):
        super().__init__()
        self.mode, self.use_lambda, self.use_prior = mode, use_lambda, use_prior
        # without λ there is nothing to score: the scorers do not exist (switching off removes parameters)
        self.w_c = nn.Linear(query_dim, dim) if use_lambda else None  # W_c
        # in dot mode a key bias shifts every score of a query equally and cancels in the softmax
        self.w_d = nn.Linear(z_dim, dim, bias=mode == "additive") if use_lambda else None  # W_d
        self.w_a = nn.Linear(dim, 1, bias=False) if use_lambda and mode == "additive" else None  # w (additive)
        self.scale = dim**-0.5

    def weights(self, query: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """λ: query (..., Dq), z (K, Dz) -> (..., K), each row summing to 1 (all ones without λ)."""
        K = z.shape[0]
        if not self.use_lambda:  # the factor removed: λ_i = 1
            return query.new_ones((*query.shape[:-1], K))
        q, k = self.w_c(query), self.w_d(z)  # (..., d), (K, d)
        if self.mode == "dot":
            scores = torch.einsum("...d,kd->...k", q, k) * self.scale  # (..., K)
        else:
            scores = self.w_a(torch.tanh(q.unsqueeze(-2) + k)).squeeze(-1)  # (..., K)
        return scores.softmax(-1)

    def forward(self, query: torch.Tensor, z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """query (..., Dq), z (K, Dz), prior (K,) -> E_z (..., Dz)."""
        lam = self.weights(query, z)  # λ (..., K)
        p = prior if self.use_prior else torch.ones_like(prior)  # without P(z_i): the factor removed
        return torch.einsum("...k,k,kd->...d", lam, p.to(lam.dtype), z.to(lam.dtype))  # Σ_i λ_i p(z_i) z_i


class SampleBankAttention(nn.Module):
    """Front-door sample term Σ_x' P(x' | m) x' with P(x' | m) ∝ exp(q(m) · k(x') / √d) · P(x').

    The mediator's query attends over a bank of other samples' features (the global dictionary G or
    a memory), each weighted by its prior P(x') (uniform without one): cross-sample attention.
    `score="dot"`: q · k / √d; `score="cosine"`: cos(q, k) / τ with a learned τ (starting at 0.1), so the
    weights' sharpness, and the term's dependence on the sample, can grow where dot scores stay flat.
    """

    def __init__(self, query_dim: int, bank_dim: int, dim: int, score: Literal["dot", "cosine"] = "dot"):
        super().__init__()
        self.w_q = nn.Linear(query_dim, dim)
        self.w_k = nn.Linear(bank_dim, dim)
        self.w_v = nn.Linear(bank_dim, dim)
        self.scale = dim**-0.5
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.1))) if score == "cosine" else None  # τ = exp(log τ)

    def weights(self, query: torch.Tensor, bank: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """P(x' | m): query (..., Dq), bank (K, Db), prior (K,) or None -> (..., K), summing to 1."""
        q, k = self.w_q(query), self.w_k(bank)  # (..., d), (K, d)
        if self.log_tau is None:
            scores = torch.einsum("...d,kd->...k", q, k) * self.scale  # (..., K)
        else:
            scores = torch.einsum("...d,kd->...k", F.normalize(q, dim=-1), F.normalize(k, dim=-1)) / self.log_tau.exp()
        if prior is not None:
            scores = scores + prior.clamp_min(1e-12).log().to(scores.dtype)  # × P(x'), renormalised
        return scores.softmax(-1)

    def forward(self, query: torch.Tensor, bank: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """query (..., Dq), bank (K, Db), prior (K,) or None -> (..., dim)."""
        return self.weights(query, bank, prior) @ self.w_v(bank)  # (..., dim)


_NEG = -1e9  # "log 0" of masked frames, kept finite: -inf would turn fully masked columns' gradients into NaN


def sinkhorn(
    cost: torch.Tensor,
    eps: float,
    iters: int,
    mask: torch.Tensor | None = None,
    tol: float | None = None,
    unconverged: Callable[[float], None] | None = None,
    grad: Literal["implicit", "last_step"] = "implicit",
) -> torch.Tensor:
    """Entropic optimal transport plan with uniform marginals, log domain.

    cost (B, C, L), mask (B, L) True = real frame (masked frames carry no mass) -> plan π (B, C, L)
    with rows summing to 1/C and real columns to 1/L_valid. Equals POT's `ot.sinkhorn(a, b, M, reg=eps)`
    at convergence.

    `tol=None`: exactly `iters` unrolled iterations, differentiable through all of them.
    `tol=t`: iterate without a graph until the plan's marginal error (`marginal_error`, L1) is below t or
    `iters` iterations have run; the plan is the converged one. Its gradient with respect to the cost:
    `grad="implicit"` differentiates the converged plan through its marginal constraints (implicit function
    theorem, `implicit_plan`: one (C + L)-square solve per video, the limit of the unrolled gradient);
    `grad="last_step"` is the gradient of one Sinkhorn step from the converged (detached) potentials, a cheap
    stand-in that is only approximate where the cost is trainable. Where the cost has no gradient (PCMCI's ICH
    on frozen T0 and cached VP) the two are the same computation.
    `unconverged(error)` is called when the budget ran out with the marginal error still above `tol`.
    """
    B, C, L = cost.shape
    neg = _NEG
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=cost.device)
    log_a = torch.full((B, C), -math.log(C), device=cost.device, dtype=cost.dtype)  # log 1/C
    n_valid = mask.sum(1, keepdim=True).clamp_min(1).to(cost.dtype)  # (B, 1)
    log_b = torch.where(mask, -n_valid.log(), torch.full_like(n_valid, neg).expand(B, L))  # (B, L)
    logk = -cost / eps  # log K, (B, C, L)
    logk = logk.masked_fill(~mask.unsqueeze(1), neg)
    log_u = torch.zeros(B, C, device=cost.device, dtype=cost.dtype)
    log_v = torch.zeros(B, L, device=cost.device, dtype=cost.dtype)

    def step(log_u, log_v, logk):  # one (u, v) update: a loop over iterations, not over classes or frames
        log_u = log_a - torch.logsumexp(logk + log_v.unsqueeze(1), dim=2)  # (B, C)
        log_v = log_b - torch.logsumexp(logk + log_u.unsqueeze(2), dim=1)  # (B, L)
        return log_u, log_v.masked_fill(~mask, neg)

    if tol is None:
        for _ in range(iters):
            log_u, log_v = step(log_u, log_v, logk)
    else:
        with torch.no_grad():
            fixed = logk.detach()
            plan = lambda: (log_u.unsqueeze(2) + fixed + log_v.unsqueeze(1)).exp()  # noqa: E731
            converged = False
            for i in range(iters - 1):
                log_u, log_v = step(log_u, log_v, fixed)
                if i % 10 == 9 and _largest(_marginal_errors(plan(), mask)) < tol:
                    converged = True
                    break
            if not converged and unconverged is not None:
                error = _largest(_marginal_errors(plan(), mask))
                if error >= tol:
                    unconverged(error)
        if grad == "implicit" and _requires_grad(cost) and torch.is_grad_enabled():
            log_u, log_v = step(log_u, log_v, fixed)  # the last column update: columns exact, as below
            return implicit_plan(cost, log_u, log_v, eps, mask)  # π (B, C, L)
        log_u, log_v = step(log_u, log_v, logk)  # the differentiable last iteration
    return (log_u.unsqueeze(2) + logk + log_v.unsqueeze(1)).exp()  # π = diag(u) K diag(v), (B, C, L)


def implicit_plan(
    cost: torch.Tensor, log_u: torch.Tensor, log_v: torch.Tensor, eps: float, mask: torch.Tensor
) -> torch.Tensor:
    """The converged plan π = exp((f ⊕ g - cost) / ε), carrying the implicit-function gradient of its marginals.

    Differentiating Σ_j π_ij = a_i, Σ_i π_ij = b_j gives H [df; dg] = [(π ⊙ dc) 1; (π ⊙ dc)ᵀ 1] with
    H = [[diag(a), π], [πᵀ, diag(b)]], and d log π_ij = (df_i + dg_j - dc_ij) / ε. We add that first-order
    correction with dc = cost - cost.detach(): zero in value (the plan is the converged one), and exactly the
    implicit gradient in the backward pass, with ordinary differentiable ops (so it runs under torch.func.vmap).
    H is singular along s = (1, -1) (a constant moved from f to g); the right side is orthogonal to s, so
    H + c s sᵀ has the same solution. Padded frames get an identity row (dg_j = 0; they carry no mass).
    cost (B, C, L), converged log u (B, C), log v (B, L), mask (B, L) -> π (B, C, L).
    """
    B, C, L = cost.shape
    logk = (-cost / eps).masked_fill(~mask.unsqueeze(1), _NEG)  # (B, C, L), with the cost's gradient
    pi = (log_u.unsqueeze(2) + logk + log_v.unsqueeze(1)).exp().detach().double()  # converged π (B, C, L)
    a, b = pi.sum(2), pi.sum(1)  # the plan's own marginals (B, C), (B, L): H s = 0 exactly
    rows = mask.any(1, keepdim=True).expand(B, C)  # a video without frames has no plan to differentiate
    real = torch.cat([rows, mask], 1)  # (B, C + L)
    s = torch.cat([torch.ones_like(a), -torch.ones_like(b)], 1) * real  # the null direction (B, C + L)
    diagonal = torch.where(real, torch.cat([a, b], 1), torch.ones_like(s))  # (B, C + L)
    top = torch.cat([torch.zeros_like(pi[:, :, :1]).expand(B, C, C), pi], 2)  # [0, π] (B, C, C + L)
    bottom = torch.cat([pi.transpose(1, 2), torch.zeros_like(pi[:, :1, :]).expand(B, L, L)], 2)  # [πᵀ, 0]
    h = torch.cat([top, bottom], 1) + torch.diag_embed(diagonal)  # H (B, C + L, C + L)
    h = h + a.mean(1)[:, None, None] * s.unsqueeze(2) * s.unsqueeze(1)  # H + c s sᵀ
    dc = (cost - cost.detach()).double() * pi  # π ⊙ dc: zero in value (B, C, L)
    rhs = torch.cat([dc.sum(2), dc.sum(1)], 1) * real  # (B, C + L), orthogonal to s
    dfg = torch.linalg.solve(h, rhs.unsqueeze(-1)).squeeze(-1).to(cost.dtype)  # [df; dg], zero in value
    df, dg = dfg[:, :C], dfg[:, C:]
    return (log_u.unsqueeze(2) + logk + log_v.unsqueeze(1) + (df.unsqueeze(2) + dg.unsqueeze(1)) / eps).exp()


def marginal_error(plan: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The largest L1 distance of a plan's marginals to the uniform ones over the batch: plan (B, C, L).

    Rows should sum to 1/C, real columns to 1/L_valid (padded columns to 0); after a column update the
    columns are exact and the error sits in the rows.
    """
    return _largest(_marginal_errors(plan, mask))


def _requires_grad(t: torch.Tensor) -> bool:
    """t.requires_grad, also inside `torch.func.vmap` (whose batched tensors report False): the physical
    tensor's. The implicit solve runs only where the cost is trainable, never on PCMCI's frozen default."""
    from torch._C import _functorch

    while _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t.requires_grad


def _largest(errors: torch.Tensor) -> float:
    """max of a tensor as a float, also inside `torch.func.vmap` (the stacked seeds of train/stacked.py):
    there the tensor is unwrapped to its physical (S, ...) one, so Sinkhorn stops when every seed's plan has
    converged (a seed converged earlier only runs more iterations, which lower its error further)."""
    from torch._C import _functorch

    while _functorch.is_batchedtensor(errors):
        errors = _functorch.get_unwrapped(errors)
    return float(errors.max())


def _marginal_errors(plan: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-video L1 marginal error of a plan (B, C, L) -> (B,)."""
    plan = plan.detach()
    B, C, L = plan.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=plan.device)
    n_valid = mask.sum(1, keepdim=True).clamp_min(1).to(plan.dtype)  # (B, 1)
    b = mask.to(plan.dtype) / n_valid  # (B, L)
    rows = (plan.sum(2) - 1.0 / C).abs().sum(1)  # (B,)
    cols = (plan.sum(1) - b).abs().sum(1)  # (B,)
    return torch.maximum(rows, cols)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax over `dim` with masked positions (False) at zero weight."""
    return scores.masked_fill(~mask, -torch.inf).softmax(dim).nan_to_num(0.0)
