"""CMDCL head: TCI and VCI against explicit sums, the bias memory, the module switches and H."""

import dataclasses

import pytest
import torch

from extract.config import from_dict
from tests.conftest import random_batch
from train.heads import Batch, HeadContext, build_head, required_dictionaries
from train.heads.cmdcl import CMDCLOptions, TextualIntervention, VisualIntervention

B, L, DC, DV, C, K = 3, 6, 16, 20, 4, 5


def _context() -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    prior = torch.arange(1, K + 1, dtype=torch.float32)
    dicts = {"confounder": (unit(K, DC), prior / prior.sum()), "global": (unit(K + 2, DC), torch.full((K + 2,), 1 / 7))}
    return HeadContext(DC, DV, L, C, False, unit(C, DC), dicts)


def _batch(ctx: HeadContext, seed: int = 1) -> Batch:
    return random_batch(ctx, B, seed)


def _opts(**kw) -> CMDCLOptions:
    return dataclasses.replace(CMDCLOptions(dim=16, attention_heads=2, vci_layers=2), **kw)


def test_tci_scores_and_bias_embeddings_are_the_explicit_sums():
    torch.manual_seed(0)
    ctx, batch = _context(), _batch(_context())
    tci = TextualIntervention(_opts(), ctx)
    vp, t = batch.vp.float(), torch.randn(C, DC)
    S = tci.scores(t, vp, batch.mask)  # (B, C, L)
    assert S.shape == (B, C, L)
    assert torch.allclose(S.sum(-1), torch.ones(B, C))  # over real frames
    assert torch.all(S[0, :, -2:] == 0)  # masked frames carry no weight
    ref = torch.softmax(torch.nn.functional.cosine_similarity(vp[1], t[3][None], dim=-1) / 0.1, 0)  # S_{c=3} of video 1
    assert torch.allclose(S[1, 3], ref, atol=1e-6)
    b = tci.bias(S, vp)
    explicit = torch.stack(
        [torch.stack([sum(S[i, c, j] * vp[i, j] for j in range(L)) for c in range(C)]) for i in range(B)]
    )
    assert torch.allclose(b, explicit, atol=1e-5)


def test_tci_expectation_is_the_prior_weighted_memory_sum():
    torch.manual_seed(0)
    ctx = _context()
    t = torch.randn(C, DC)
    flat = TextualIntervention(_opts(tci_attention=False), ctx)
    p = flat.prior()
    assert torch.allclose(p, ctx.dictionaries["confounder"][1], atol=1e-5)  # initialised from p(z)
    explicit = sum(p[i] * flat.memory[i] for i in range(K))
    assert torch.allclose(flat.expectation(t), explicit.expand(C, DC), atol=1e-6)
    tci = TextualIntervention(_opts(), ctx)
    lam = tci.attn.weights(t, tci.memory)  # λ (C, K)
    w = lam * tci.prior()
    explicit = torch.stack([sum(w[c, i] * tci.memory[i] for i in range(K)) / w[c].sum() for c in range(C)])
    assert torch.allclose(tci.expectation(t), explicit, atol=1e-6)
    with torch.no_grad():  # a one-hot prior picks one memory entry, with or without λ
        for m in (flat, tci):
            m.prior_logits.fill_(-torch.inf)
            m.prior_logits[2] = 0.0
            assert torch.allclose(m.expectation(t), m.memory[2].expand(C, DC), atol=1e-6)


def test_bias_memory_is_an_ema_of_the_batch_bias_and_not_the_output():
    torch.manual_seed(0)
    ctx, batch = _context(), _batch(_context())
    tci = TextualIntervention(_opts(memory_momentum=0.9), ctx)
    old = tci.memory.clone()
    b = old[3].mul(2.0).expand(1, 1, DC)  # nearest to entry 3
    tci.update_memory(b, torch.tensor([True]))
    assert torch.allclose(tci.memory[3], 0.9 * old[3] + 0.1 * 2 * old[3])
    assert torch.equal(tci.memory[[0, 1, 2, 4]], old[[0, 1, 2, 4]])
    tci.update_memory(b, torch.tensor([False]))  # a video without real frames changes nothing
    assert torch.allclose(tci.memory[3], 0.9 * old[3] + 0.1 * 2 * old[3])
    # the current batch enters only through the memory: in eval T' does not depend on the frames
    tci.eval()
    t = torch.randn(C, DC)
    other = _batch(ctx, 7)
    assert torch.equal(tci(t, batch.vp.float(), batch.mask), tci(t, other.vp.float(), other.mask))
    before = tci.memory.clone()
    tci.train()
    tci(t, batch.vp.float(), batch.mask)
    assert not torch.equal(tci.memory, before)  # training moved the memory
    tci(t, batch.vp.float(), batch.mask).sum().backward()  # the learned prior P(b) trains by gradient
    assert tci.prior_logits.grad.abs().sum() > 0
    frozen = TextualIntervention(_opts(memory_momentum=1.0), ctx)
    kept = frozen.memory.clone()
    frozen(t, batch.vp.float(), batch.mask)
    assert torch.equal(frozen.memory, kept)


def test_random_memory_and_its_size():
    ctx = _context()
    assert TextualIntervention(_opts(memory_init="random", memory_size=9), ctx).memory.shape == (9, DC)
    assert TextualIntervention(_opts(memory_init="random"), ctx).memory.shape == (32, DC)
    with pytest.raises(ValueError, match="memory_size"):
        TextualIntervention(_opts(memory_size=K + 1), ctx)
    cfg = from_dict({"heads": {"cmdcl": {"memory_init": "random"}}})
    assert required_dictionaries(cfg, "cmdcl") == ("global",)
    assert required_dictionaries(from_dict({}), "cmdcl") == ("confounder", "global")
    assert required_dictionaries(from_dict({}), "cmdcl", "variant1") == ()


def test_vci_per_dimension_scores_and_v_hat_are_the_explicit_sums():
    torch.manual_seed(0)
    ctx = _context()
    vci = VisualIntervention(_opts(tau_visual=0.5), ctx)
    x, t = torch.randn(B, L, 16), torch.randn(C, 16)
    mask = _batch(ctx).mask
    s = vci.scores(x, t, mask)  # (B, C, L, D)
    assert s.shape == (B, C, L, 16)
    assert torch.allclose(s.sum(2), torch.ones(B, C, 16), atol=1e-6)  # per (c, d), over real frames
    assert torch.all(s[0, :, -2:] == 0)
    ref = torch.softmax(x[2, :, 5] * t[1, 5] / 0.5, 0)  # s_{c=1, l, d=5} of video 2
    assert torch.allclose(s[2, 1, :, 5], ref, atol=1e-6)
    v_hat = vci.attend(s, x)
    explicit = torch.zeros(B, C, 16)
    for b in range(B):
        for c in range(C):
            for d in range(16):
                explicit[b, c, d] = sum(s[b, c, j, d] * x[b, j, d] for j in range(L))
    assert torch.allclose(v_hat, explicit, atol=1e-5)
    p = vci.mediator_prob(x, t, mask)
    assert torch.allclose(p.sum(-1), torch.ones(B))


def _head(variant=None, **sets):
    torch.manual_seed(0)
    cfg = from_dict({"heads": {"cmdcl": {"dim": 16, "attention_heads": 2, "dropout": 0.0, **sets}}})
    return build_head("cmdcl", cfg, _context(), variant)


def test_switches_remove_parameters_and_change_the_output():
    batch = _batch(_context())
    full, v1, v2, v3 = _head(), _head("variant1"), _head("variant2"), _head("variant3")
    names = {k: set(m.state_dict()) for k, m in (("full", full), ("v1", v1), ("v2", v2), ("v3", v3))}
    assert any(n.startswith("tci.") for n in names["full"]) and any(n.startswith("vci.") for n in names["full"])
    assert not any(n.startswith(("tci.", "vci.")) for n in names["v1"])
    assert not any(n.startswith("vci.") for n in names["v2"]) and any(n.startswith("tci.") for n in names["v2"])
    assert not any(n.startswith("tci.") for n in names["v3"]) and any(n.startswith("vci.") for n in names["v3"])
    assert "tci.memory" in names["full"] and "tci.prior_logits" in names["full"]
    # same seed, same shared modules: switching a module off changes the logits
    for m in (full, v1, v2, v3):
        m.eval()
    with torch.no_grad():
        outs = [m(batch) for m in (full, v1, v2, v3)]
    for i in range(4):
        assert outs[i].shape == (B, C) and torch.isfinite(outs[i]).all()
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j])


def test_vci_layers_sets_the_number_of_self_attention_layers():
    for h in (2, 4, 6, 8):
        head = _head(f"vci_layers{h}")
        assert len(head.vci.encoder.layers.layers) == h
    assert len(_head().vci.encoder.layers.layers) == 6  # the paper's default
