"""CMDCL head: the paper's TCI and VCI against explicit sums, per-video T', our memory and bank variants,
the module switches (Table 3), H (Fig. 7a) and the frame-entropy helper."""

import dataclasses
import math

import pytest
import torch

from extract.contract.config import from_dict
from tests.train.conftest import explicit_class_attention, explicit_readout, random_batch
from train.heads import Batch, HeadContext, build_head, required_dictionaries
from train.heads.cmdcl import (
    CMDCLOptions,
    MemoryTextualIntervention,
    TextualIntervention,
    VisualIntervention,
    frame_entropy_ratio,
)

B, L, DC, DV, C, K = 3, 6, 16, 20, 4, 5


def _context() -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    prior = torch.arange(1, K + 1, dtype=torch.float32)
    dicts = {
        "confounder": (unit(K, DC), prior / prior.sum()),
        "global": (unit(K + 2, DC), torch.full((K + 2,), 1 / 7)),
        "global_video": (unit(K + 3, DV), torch.full((K + 3,), 1 / 8)),
    }
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


def test_paper_tci_is_per_video_h_of_text_and_bias_with_gradients():
    torch.manual_seed(0)
    ctx, batch = _context(), _batch(_context())
    tci = TextualIntervention(_opts(), ctx)
    assert not hasattr(tci, "memory") and not hasattr(tci, "prior_logits")  # P(B) is fitted by h alone
    vp, t = batch.vp.float().requires_grad_(), torch.randn(C, DC)
    t_prime, S = tci(t, vp, batch.mask)
    assert t_prime.shape == (B, C, 16) and S.shape == (B, C, L)
    assert not torch.allclose(t_prime[0], t_prime[1]) and not torch.allclose(t_prime[1], t_prime[2])
    b = tci.bias(S, vp)  # b_c
    explicit = torch.stack([tci.h(torch.cat([t[c], b[i, c]])) for i in range(B) for c in range(C)]).view(B, C, 16)
    assert torch.allclose(t_prime, explicit, atol=1e-5)  # t'_c = h([t_c, b_c]) of each video
    t_prime.square().sum().backward()
    assert tci.h.weight.grad[:, DC:].abs().sum() > 0  # h's b_c half trains
    assert vp.grad.abs().sum() > 0  # and the gradient reaches VP through b_c (and S)


def test_memory_tci_expectation_is_the_prior_weighted_memory_sum():
    torch.manual_seed(0)
    ctx = _context()
    t = torch.randn(C, DC)
    flat = MemoryTextualIntervention(_opts(tci_form="memory", tci_attention=False), ctx)
    p = flat.prior()
    assert torch.allclose(p, ctx.dictionaries["confounder"][1], atol=1e-5)  # initialised from p(z)
    explicit = sum(p[i] * flat.memory[i] for i in range(K))
    assert torch.allclose(flat.expectation(t), explicit.expand(C, DC), atol=1e-6)
    tci = MemoryTextualIntervention(_opts(tci_form="memory"), ctx)
    lam = tci.attn.weights(t, tci.memory)  # λ (C, K)
    w = lam * tci.prior()
    explicit = torch.stack([sum(w[c, i] * tci.memory[i] for i in range(K)) / w[c].sum() for c in range(C)])
    assert torch.allclose(tci.expectation(t), explicit, atol=1e-6)
    with torch.no_grad():  # a one-hot prior picks one memory entry, with or without λ
        for m in (flat, tci):
            m.prior_logits.fill_(-torch.inf)
            m.prior_logits[2] = 0.0
            assert torch.allclose(m.expectation(t), m.memory[2].expand(C, DC), atol=1e-6)


def test_memory_tci_is_an_ema_of_the_batch_bias_and_not_the_output():
    torch.manual_seed(0)
    ctx, batch = _context(), _batch(_context())
    tci = MemoryTextualIntervention(_opts(tci_form="memory", memory_momentum=0.9), ctx)
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
    out = tci(t, batch.vp.float(), batch.mask)[0]
    assert out.shape == (C, 16) and torch.equal(out, tci(t, other.vp.float(), other.mask)[0])
    before = tci.memory.clone()
    tci.train()
    tci(t, batch.vp.float(), batch.mask)
    assert not torch.equal(tci.memory, before)  # training moved the memory
    tci.memory_updates = False  # grounding's auxiliary views
    moved = tci.memory.clone()
    tci(t, batch.vp.float(), batch.mask)
    assert torch.equal(tci.memory, moved)
    tci(t, batch.vp.float(), batch.mask)[0].sum().backward()  # the learned prior P(b) trains by gradient
    assert tci.prior_logits.grad.abs().sum() > 0
    frozen = MemoryTextualIntervention(_opts(tci_form="memory", memory_momentum=1.0), ctx)
    kept = frozen.memory.clone()
    frozen(t, batch.vp.float(), batch.mask)
    assert torch.equal(frozen.memory, kept)


def test_random_memory_its_size_and_the_dictionaries_each_form_needs():
    ctx = _context()
    mem = {"tci_form": "memory"}
    assert MemoryTextualIntervention(_opts(**mem, memory_init="random", memory_size=9), ctx).memory.shape == (9, DC)
    assert MemoryTextualIntervention(_opts(**mem, memory_init="random"), ctx).memory.shape == (32, DC)
    with pytest.raises(ValueError, match="memory_size"):
        MemoryTextualIntervention(_opts(**mem, memory_size=K + 1), ctx)
    assert required_dictionaries(from_dict({}), "cmdcl") == ()  # the paper's forms need no dictionary
    assert required_dictionaries(from_dict({}), "cmdcl", "tci_memory") == ("confounder",)
    # VCI's bank holds samples of its own input V: TimeSformer's dictionary, CLIP's only when V is CLIP's VP
    assert required_dictionaries(from_dict({}), "cmdcl", "vci_bank") == ("global_video",)
    assert required_dictionaries(from_dict({}), "cmdcl", "memory_bank") == ("confounder", "global_video")
    assert required_dictionaries(from_dict({}), "cmdcl", "prior_uniform") == ("confounder", "global_video")
    cfg = from_dict({"heads": {"cmdcl": {"memory_init": "random"}}})
    assert required_dictionaries(cfg, "cmdcl", "memory_bank") == ("global_video",)
    clip = from_dict({"heads": {"cmdcl": {"visual": "clip", "vci_form": "bank"}}})
    assert required_dictionaries(clip, "cmdcl") == ("global",)
    assert required_dictionaries(from_dict({}), "cmdcl", "variant1") == ()


def test_vci_per_dimension_scores_and_v_hat_are_the_explicit_sums():
    torch.manual_seed(0)
    ctx = _context()
    vci = VisualIntervention(_opts(tau=0.5), ctx)
    x, t = torch.randn(B, L, 16), torch.randn(B, C, 16)  # per-video t'
    mask = _batch(ctx).mask
    s = vci.scores(x, t, mask)  # (B, C, L, D)
    assert s.shape == (B, C, L, 16)
    assert torch.allclose(s.sum(2), torch.ones(B, C, 16), atol=1e-6)  # per (c, d), over real frames
    assert torch.all(s[0, :, -2:] == 0)
    ref = torch.softmax(x[2, :, 5] * t[2, 1, 5] / 0.5, 0)  # s_{c=1, l, d=5} of video 2 with its own t'
    assert torch.allclose(s[2, 1, :, 5], ref, atol=1e-6)
    v_hat = vci.attend(s, x)
    explicit = torch.zeros(B, C, 16)
    for b in range(B):
        for c in range(C):
            for d in range(16):
                explicit[b, c, d] = sum(s[b, c, j, d] * x[b, j, d] for j in range(L))
    assert torch.allclose(v_hat, explicit, atol=1e-5)
    v_prime, s = vci(x, mask, t)  # the paper's form on V^(H): v'_c = g([t'_c, v̂_c])
    v_hat = vci.attend(vci.scores(x, vci.mediator(t), mask), x)
    assert v_prime.shape == (B, C, 16)
    assert torch.allclose(v_prime, vci.g(torch.cat([t, v_hat], -1)), atol=1e-6)
    bank = VisualIntervention(_opts(vci_form="bank"), ctx)
    p = bank.mediator_prob(x, t, mask)
    assert torch.allclose(p.sum(-1), torch.ones(B))
    G, pg = ctx.dictionaries["global_video"]
    assert bank(x, mask, t, G, pg)[0].shape == (B, C, 16)


def test_vci_bank_never_reads_the_clip_dictionary():
    """`vci_bank` on TimeSformer V: replacing the CLIP `global` dictionary leaves the logits unchanged, replacing
    `global_video` changes them (VCI does not re-open the VLM path)."""
    ctx = _context()
    batch = _batch(ctx)
    head = _head("vci_bank").eval()
    G, pg = batch.dictionaries["global"]
    Gv, pv = batch.dictionaries["global_video"]
    clip_swapped = dataclasses.replace(batch, dictionaries={**batch.dictionaries, "global": (G.flip(0) * 3, pg)})
    video_swapped = dataclasses.replace(batch, dictionaries={**batch.dictionaries, "global_video": (-Gv, pv)})
    with torch.no_grad():
        assert torch.equal(head(batch), head(clip_swapped))
        assert not torch.allclose(head(batch), head(video_swapped))


def _head(variant=None, **sets):
    torch.manual_seed(0)
    cfg = from_dict({"heads": {"cmdcl": {"dim": 16, "attention_heads": 2, "dropout": 0.0, "vci_layers": 2, **sets}}})
    return build_head("cmdcl", cfg, _context(), variant)


def test_vp_changes_t_prime_and_the_logits():
    ctx = _context()
    batch = _batch(ctx)
    other = dataclasses.replace(batch, vp=_batch(ctx, 7).vp)  # only VP differs
    for variant in (None, "variant2"):
        head = _head(variant).eval()
        with torch.no_grad():
            t1, _ = head.tci(head.text, batch.vp.float(), batch.mask)
            t2, _ = head.tci(head.text, other.vp.float(), other.mask)
            assert t1.shape == (B, C, 16) and not torch.allclose(t1, t2)
            assert not torch.allclose(head(batch), head(other)), variant
    memory = _head("tci_memory").eval()  # ours: T' is a property of the classes, VP does not reach the logits
    with torch.no_grad():
        assert torch.equal(memory(batch), memory(other))


def test_table3_switches_remove_exactly_their_modules_and_share_encoder_and_classifier():
    heads = {k: _head(v) for k, v in (("full", None), ("v1", "variant1"), ("v2", "variant2"), ("v3", "variant3"))}
    names = {k: set(m.state_dict()) for k, m in heads.items()}
    has = lambda k, p: any(n.startswith(p) for n in names[k])  # noqa: E731
    assert has("full", "tci.h.") and has("full", "vci.g.") and not has("full", "text_proj.")
    assert not has("v1", "tci.") and not has("v1", "vci.") and has("v1", "text_proj.") and has("v1", "frame_token.")
    assert has("v2", "tci.h.") and not has("v2", "vci.") and has("v2", "frame_token.")
    assert not has("v3", "tci.") and has("v3", "vci.") and has("v3", "text_proj.") and not has("v3", "frame_token.")
    for k in names:  # the paper's forms: no memory, no prior, no bank, no P(M|V) layer
        assert not any(w in n for n in names[k] for w in ("memory", "prior_logits", "bank", "p_m", "attn.w"))
    # every row: the same H-layer encoder and the same classifier, under the same names
    shared = ("visual.", "interact.", "readout.")
    for k in names:
        assert {n for n in names[k] if n.startswith(shared)} == {n for n in names["full"] if n.startswith(shared)}
    assert all(len(m.visual.layers.layers) == 2 for m in heads.values())


def test_without_vci_each_class_reads_the_frame_mean_token_through_the_same_classifier():
    """Variant 2 (no VCI): V' = W x̄ for every class, x̄ the masked mean of V^(H); the logits are the shared
    classifier's on (T', V'), by hand."""
    head = _head("variant2").eval()
    batch = _batch(_context())
    seen = {}
    head.visual.register_forward_hook(lambda m, a, o: seen.update(x=o))
    head.tci.register_forward_hook(lambda m, a, o: seen.update(t=o[0]))
    with torch.no_grad():
        out = head(batch)
        x, t = seen["x"], seen["t"]
        real = batch.mask.unsqueeze(-1).float()
        token = head.frame_token((x * real).sum(1) / real.sum(1))  # (B, dim)
        v_prime = token[:, None].expand(-1, C, -1)
        f = head.interact(t, v_prime, torch.ones(B, C, dtype=torch.bool)) + v_prime
        assert torch.allclose(out, head.readout(f), atol=1e-6)


@pytest.mark.parametrize("control, module", [("tci_uniform", "tci"), ("vci_uniform", "vci")])
def test_the_controls_make_one_attention_uniform_and_change_nothing_else(control, module):
    """tci_uniform: S_cl = 1/L_real, so b_c is the frame mean of VP for every class; vci_uniform: s_cld = 1/L_real,
    so v̂_c is the frame mean of V^(H). Same parameters as the full head; by hand against the masked mean."""
    from train.heads.common import initialise

    ctx, batch = _context(), _batch(_context())
    full, uniform = _head().eval(), _head(control).eval()
    initialise(full, 0), initialise(uniform, 0)
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in uniform.state_dict().items()}
    assert all(torch.equal(v, uniform.state_dict()[k]) for k, v in full.state_dict().items())
    real = batch.mask.float()  # (B, L)
    with torch.no_grad():
        if module == "tci":
            s = uniform.tci.scores(ctx.t0, batch.vp.float(), batch.mask)  # (B, C, L)
            assert torch.allclose(s, (real / real.sum(1, keepdim=True))[:, None].expand(-1, C, -1), atol=1e-6)
            b = uniform.tci.bias(s, batch.vp.float())
            mean_vp = (batch.vp.float() * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            assert torch.allclose(b, mean_vp[:, None].expand(-1, C, -1), atol=1e-5)
        else:
            x = torch.randn(B, L, 16)
            t = torch.randn(B, C, 16)
            v_prime, _ = uniform.vci(x, batch.mask, t)
            x_bar = (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            assert torch.allclose(
                v_prime, uniform.vci.g(torch.cat([t, x_bar[:, None].expand(-1, C, -1)], -1)), atol=1e-5
            )
        assert (full(batch) - uniform(batch)).abs().max() > 1e-5  # the attention was doing something


@pytest.mark.parametrize("without, with_tci", [("variant1", "variant2"), ("variant3", None)], ids=["v1-v2", "v3-full"])
def test_tci_differs_from_its_row_without_it_only_by_its_bias_term(without, with_tci):
    """Rows initialised by name share every common module. With TCI's h set to [W_T, 0] (text_proj's map on
    t_c, nothing on b_c) the TCI row equals the row without TCI exactly; with h's b_c block back it does not:
    TCI acts through b_c(V) alone (Table 3's TCI switch changes one term)."""
    from train.heads.common import initialise

    batch = _batch(_context())
    off, on = _head(without).eval(), _head(with_tci).eval()
    initialise(off, 0), initialise(on, 0)
    shared = off.state_dict().keys() & on.state_dict().keys()
    assert all(torch.equal(off.state_dict()[k], on.state_dict()[k]) for k in shared) and len(shared) > 20
    h, w_t = on.tci.h, off.text_proj
    b_block = h.weight.data[:, DC:].clone()
    with torch.no_grad():
        h.weight[:, :DC] = w_t.weight
        h.weight[:, DC:] = 0
        h.bias.copy_(w_t.bias)
        assert torch.allclose(on(batch), off(batch), atol=1e-6)
        h.weight[:, DC:] = b_block  # W_b b_c(V) back in
        assert (on(batch) - off(batch)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["tci_memory", "vci_bank", "memory_bank", "prior_uniform"])
def test_our_variants_build_and_run(variant):
    head = _head(variant)
    names = set(head.state_dict())
    memory = variant != "vci_bank"
    assert ("tci.memory" in names) == memory and ("tci.prior_logits" in names) == memory
    assert any(n.startswith("vci.bank.") for n in names) == (variant != "tci_memory")
    head.eval()
    batch = _batch(_context())
    out = head(batch)
    assert out.shape == (B, C) and torch.isfinite(out).all()
    with torch.no_grad():  # the same model with its own term changed: the memory, or the bank's samples
        if memory:
            head.tci.memory.copy_(torch.roll(head.tci.memory, 1, 0) * 2)
            changed = head(batch)
        else:
            Gv, pv = batch.dictionaries["global_video"]
            changed = head(dataclasses.replace(batch, dictionaries={**batch.dictionaries, "global_video": (-Gv, pv)}))
    assert (changed - out).abs().max() > 1e-4


def test_vci_layers_sets_the_number_of_self_attention_layers():
    for h in (2, 4, 6, 8, 10):
        head = _head(f"vci_layers{h}")
        assert len(head.visual.layers.layers) == h
    flat = _head("vci_layers0")  # Fig. 7a's H = 0: no self-attention over V, the rest of VCI unchanged
    assert flat.visual.layers is None and flat(_batch(_context())).shape == (B, C)
    torch.manual_seed(0)
    assert len(build_head("cmdcl", from_dict({}), _context()).visual.layers.layers) == 6  # the paper's default


def test_frame_entropy_ratio_on_constructed_scores():
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False  # video 1 has 2 real frames
    uniform = torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]).view(2, 1, 4)  # (B, C, L)
    assert torch.allclose(frame_entropy_ratio(uniform, mask), torch.ones(2, 1))
    onehot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).view(2, 1, 4)
    assert torch.allclose(frame_entropy_ratio(onehot, mask), torch.zeros(2, 1))
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 4)
    assert math.isclose(frame_entropy_ratio(half, mask[:1]).item(), math.log(2) / math.log(4), rel_tol=1e-6)
    per_dim = uniform.unsqueeze(-1).expand(2, 1, 4, 3)  # VCI's s (B, C, L, D): frames on axis 2
    assert torch.allclose(frame_entropy_ratio(per_dim, mask, 2), torch.ones(2, 1, 3))
    ent = _head().frame_entropies(_batch(_context()))
    assert set(ent) == {"tci", "vci"} and all(0.0 <= e <= 1.0 + 1e-6 for e in ent.values())


@pytest.mark.parametrize("variant", [None, "variant2"])
def test_eq9_classifier_is_the_explicit_sum_over_t_prime_and_v_prime(variant):
    """Eq. 9 on the full head (and on Variant 2, whose V' is the frame-mean token): logit_c = Σ_d w_cd f_cd + b_c,
    f_c = LN(q_c + W_o Σ_k a_ck W_v v'_k) + v'_c with q = LN(t'_c), a attention over the C tokens of V', one
    class, head and token at a time (tests/conftest.py)."""
    head = _head(variant).eval()
    batch = _batch(_context())
    seen = {}
    head.tci.register_forward_hook(lambda m, a, o: seen.update(t=o[0]))
    if variant is None:
        head.vci.register_forward_hook(lambda m, a, o: seen.update(v=o[0]))
    else:
        head.frame_token.register_forward_hook(lambda m, a, o: seen.update(v=o.unsqueeze(1).expand(-1, C, -1)))
    with torch.no_grad():
        out = head(batch)
        t, v = seen["t"], seen["v"]
        f = explicit_class_attention(head.interact, t, v, torch.ones(B, C, dtype=torch.bool)) + v
        assert torch.allclose(out, explicit_readout(head.readout, f), atol=1e-5)
