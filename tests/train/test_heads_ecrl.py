"""The ECRL head against known answers: BD's explicit expectation, GLCA over all of G, switches, masks."""

import dataclasses

import pytest
import torch

from tests.train.conftest import random_batch
from train.heads import Batch, HeadContext
from train.heads.ecrl import VARIANTS, Ecrl, EcrlOptions

B, L, DC, DV, C, KZ, KG = 3, 6, 16, 20, 4, 5, 7


def _setup(seed: int = 0, **opts) -> tuple[Ecrl, Batch]:
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    prior_z = torch.softmax(torch.randn(KZ, generator=g), 0)
    prior_g = torch.softmax(torch.randn(KG, generator=g), 0)
    dicts = {"confounder": (unit(KZ, DC), prior_z), "global": (unit(KG, DC), prior_g)}
    ctx = HeadContext(DC, DV, L, C, False, unit(C, DC), dicts)
    batch = random_batch(ctx, B, seed=seed + 1)
    torch.manual_seed(seed)
    opts = {"confounder_dictionary": "confounder", **opts}  # Z under one name in these tests
    head = Ecrl(EcrlOptions(dim=16, layers=1, attention_heads=2, **opts), ctx)
    return head.eval(), batch


def _capture(module: torch.nn.Module) -> dict:
    seen = {}
    module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    return seen


@pytest.mark.parametrize("mode", ["dot", "additive"])
def test_bd_expectation_is_the_explicit_sum_from_the_heads_weights(mode):
    head, batch = _setup(bd_attention=mode)
    seen = _capture(head.bd)
    head(batch)
    j = seen["args"][0]  # J (B, D)
    z, p = batch.dictionaries["confounder"]
    bd = head.bd
    d = bd.w_c.out_features
    lam = []
    for b in range(B):  # explicit, one sample and one entry at a time
        if mode == "dot":
            s = torch.stack([(bd.w_c(j[b]) @ bd.w_d(z[i])) / d**0.5 for i in range(KZ)])
        else:
            s = torch.stack([bd.w_a(torch.tanh(bd.w_c(j[b]) + bd.w_d(z[i])))[0] for i in range(KZ)])
        lam.append(torch.softmax(s, 0))
    explicit = torch.stack([sum(lam[b][i] * z[i] * p[i] for i in range(KZ)) for b in range(B)])
    assert torch.allclose(seen["out"], explicit, atol=1e-6)


def test_uniform_prior_equals_an_explicit_uniform_prior():
    uniform, batch = _setup(prior="uniform")
    empirical, _ = _setup(prior="empirical")
    empirical.load_state_dict(uniform.state_dict())
    z, p = batch.dictionaries["confounder"]
    flat = dataclasses.replace(
        batch, dictionaries={**batch.dictionaries, "confounder": (z, torch.full_like(p, 1 / KZ))}
    )
    assert not torch.allclose(uniform(batch), empirical(batch))
    assert torch.allclose(uniform(batch), empirical(flat), atol=1e-6)


def test_glca_attends_over_all_of_g_and_every_scorer_and_g_get_gradient():
    head, batch = _setup()
    seen = _capture(head.glca)
    head(batch)
    f_l = seen["args"][0]  # F_L (B, L, D)
    w, _ = head.glca.local_global.weights(f_l, head.G, log_prior=head.g_log_prior)
    assert w.shape == (B, L, KG) and torch.allclose(w.sum(-1), torch.ones(B, L))
    assert w.std() > 0  # not a constant (the size-1 softmax of the public code gives all ones)
    ll, _ = head.glca.local_local.weights(f_l, f_l, key_mask=batch.mask)
    assert torch.all(ll[0, :, -2:] == 0) and torch.allclose(ll.sum(-1), torch.ones(B, L))
    head.train()
    torch.nn.functional.cross_entropy(head(batch), batch.labels).backward()
    scorers = {n: p for n, p in head.named_parameters() if n.startswith(("glca.", "bd.", "w_a.", "w_b.", "G"))}
    assert "G" in scorers and "bd.w_c.weight" in scorers and "glca.local_global.w_h.weight" in scorers
    # a bias that shifts every score of a softmax alike cancels in it: no gradient by design (Eq. 15's b_a)
    cancel = ("bd.w_d.bias", "glca.local_global.w_a.bias", "glca.local_local.w_a.bias")
    for name, p in scorers.items():
        if name not in cancel:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_additive_bd_scorer_gets_gradient():
    head, batch = _setup(bd_attention="additive")
    torch.nn.functional.cross_entropy(head(batch), batch.labels).backward()
    for name in ("bd.w_a.weight", "bd.w_c.weight", "bd.w_d.weight"):
        assert head.get_parameter(name).grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_g_starts_at_the_dictionary_and_trains():
    head, batch = _setup()
    with torch.no_grad():
        assert torch.equal(head(batch), head(batch))
    assert torch.equal(head.G, batch.dictionaries["global"][0])
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(head(batch), batch.labels).backward()
    opt.step()
    assert not torch.equal(head.G, batch.dictionaries["global"][0])


def test_cross_frame_weights_are_zero_on_masked_frames():
    head, batch = _setup()
    h = torch.randn(B, L, 16)
    alpha, c = head.cfm["fg"].weights(h, batch.mask)
    assert torch.all(alpha[0, -2:] == 0) and torch.allclose(alpha.sum(1), torch.ones(B))
    assert torch.allclose(c[0], h[0, :-2].mean(0), atol=1e-6)  # context = mean over the real frames only


FULL = {"fcm": True, "bcm": True, "tsc": True, "bd": True, "glca": True}


@pytest.mark.parametrize(
    "base, off, removed",
    [
        (FULL, {"fcm": False}, ("encoders.fg.", "cfm.fg.")),
        (FULL, {"bcm": False}, ("encoders.bg.", "cfm.bg.")),
        ({**FULL, "bd": False}, {"tsc": False}, ("cfm.fg.", "cfm.bg.")),
        (FULL, {"glca": False}, ("glca.", "G")),
        (
            {"fcm": True, "bcm": False, "tsc": False, "bd": False, "glca": False},
            {"fcm": False},
            ("cls_1.", "psi.", "encoders.fg."),
        ),
    ],
    ids=["fcm", "bcm", "tsc", "glca", "fcm_alone"],  # BD and its λ: the explicit-sum tests below
)
def test_switching_a_module_off_removes_its_parameters_and_changes_the_output(base, off, removed):
    on, batch = _setup(**base)
    reduced, _ = _setup(**{**base, **off})
    names_on, names_off = set(dict(on.named_parameters())), set(dict(reduced.named_parameters()))
    gone = names_on - names_off
    assert names_off < names_on and gone
    assert all(n.startswith(removed) for n in gone) and all(any(n.startswith(r) for n in gone) for r in removed)
    mine = reduced.state_dict()  # the same weights for what both have (Ψ's width follows the streams)
    reduced.load_state_dict(
        {k: v for k, v in on.state_dict().items() if k in mine and v.shape == mine[k].shape}, strict=False
    )
    with torch.no_grad():
        assert not torch.allclose(on(batch), reduced(batch))


@pytest.mark.parametrize(
    "opts, form",
    [({}, "full"), ({"use_lambda": False}, "no_lambda"), ({"use_prior": False}, "no_prior")],
    ids=["eq7", "w/o lambda", "w/o prior"],
)
def test_s1_reads_eq6_with_eq7_or_a_table4_row_by_explicit_sums(opts, form):
    """S1's input is W_a J + W_b E_z (Eq. 6) with E_z = Σ_i λ_i P(z_i) z_i (Eq. 7); Table 4's rows remove one
    factor (set it to 1): w/o λ gives Σ_i P(z_i) z_i, the same vector for every video; w/o P(z_i) Σ_i λ_i z_i.
    Each against a loop over the samples and entries; and W_b's term is not negligible beside W_a's."""
    head, batch = _setup(bd_attention="dot", glca=False, **opts)
    into_bd, into_cls = _capture(head.bd), _capture(head.cls_1)
    head(batch)
    j = into_bd["args"][0]  # J (B, D)
    z, p = batch.dictionaries["confounder"]
    bd, d = head.bd, 16
    e_z = []
    for b in range(B):
        if form == "no_lambda":
            lam = [1.0] * KZ
        else:
            lam = torch.softmax(torch.stack([(bd.w_c(j[b]) @ bd.w_d(z[i])) / d**0.5 for i in range(KZ)]), 0)
        prior = [1.0] * KZ if form == "no_prior" else p
        e_z.append(sum(lam[i] * prior[i] * z[i] for i in range(KZ)))
    e_z = torch.stack(e_z)  # (B, Dz)
    assert torch.allclose(into_bd["out"], e_z, atol=1e-6)
    if form == "no_lambda":
        assert torch.allclose(e_z, (p[:, None] * z).sum(0).expand(B, -1), atol=1e-6)  # one vector for all videos
    total = head.w_a(j) + head.w_b(e_z)
    assert torch.allclose(into_cls["args"][0], total, atol=1e-6)  # Eq. 6, what cls_1 reads
    bias_free = head.w_b(e_z) - head.w_b.bias  # W_b E_z without its bias
    assert bias_free.norm() > 0.01 * head.w_a(j).norm()  # the confounder term is there at init, not ~0


def test_required_dictionaries_and_option_checks():
    assert Ecrl.required_dictionaries(EcrlOptions()) == ("confounder_paper", "global")  # Sec. 4.2.1's Z
    assert Ecrl.required_dictionaries(EcrlOptions(bd=False, confounder_dictionary="x")) == ("global",)
    assert Ecrl.required_dictionaries(EcrlOptions(glca=False, confounder_dictionary="x")) == ("x",)
    with pytest.raises(ValueError, match="turn on fcm or bcm"):
        EcrlOptions(fcm=False, bcm=False)
    # FCM / BCM rows are "without cross-frame modeling": stream self-attention there is refused, not slipped in
    with pytest.raises(ValueError, match="stream_layers = 1 gives the foreground/background streams"):
        EcrlOptions(tsc=False, bd=False, stream_layers=1)
    assert EcrlOptions(stream_layers=1).tsc  # with TSC the streams model across frames anyway


def test_eq15_scores_and_values_equal_an_explicit_loop():
    head, batch = _setup()
    att = head.glca.local_global
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 3, 16, generator=g), torch.randn(4, DC, generator=g)
    w, values = att.weights(q, keys)
    assert torch.equal(values, keys)  # Eq. 15's `⊙ F_G`: the weights apply to F_G itself
    explicit = torch.empty(2, 3, 4)
    for b in range(2):
        for t in range(3):
            for m in range(4):
                h = torch.cat([att.w_v(keys[m]), att.w_q(q[b, t]) * att.w_k(keys[m])])  # h = [W_v g, W_q f ⊙ W_k g]
                explicit[b, t, m] = att.w_a(torch.relu(att.w_h(h)))[0]  # ReLU(W_h h + b_h) W_a + b_a
    assert torch.allclose(w, explicit.softmax(-1), atol=1e-6)
    assert torch.allclose(att(q, keys), explicit.softmax(-1) @ keys, atol=1e-6)


def test_chunked_eq15_equals_the_unchunked_one_in_value_and_gradient():
    full, batch = _setup()
    chunked, _ = _setup(glca_chunk=3)  # KG = 7: chunks of 3, 3, 1
    chunked.load_state_dict(full.state_dict())
    full.train(), chunked.train()
    outs = []
    for head in (full, chunked):
        torch.manual_seed(5)  # the same dropout masks
        loss = torch.nn.functional.cross_entropy(head(batch), batch.labels)
        loss.backward()
        outs.append((loss.detach(), head.G.grad.clone(), head.glca.local_global.w_h.weight.grad.clone()))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_linear_scorer_variant_keeps_the_one_matmul_form():
    head, batch = _setup(glca_scorer="linear")
    att = head.glca.local_global
    q, keys = torch.randn(2, 3, 16), torch.randn(4, DC)
    w, values = att.weights(q, keys)
    D = att.dim
    explicit = torch.stack(
        [
            torch.stack([att.w_h(torch.cat([att.w_v(k), att.w_q(q[b, t]) * att.w_k(k)]))[0] for k in keys])
            for b in range(2)
            for t in range(3)
        ]
    ).reshape(2, 3, 4)
    assert torch.allclose(w, explicit.softmax(-1), atol=1e-5) and values.shape == (4, D)


def test_normalised_bd_equals_the_explicit_renormalised_sum():
    head, batch = _setup(bd_form="normalised")
    seen = _capture(head.bd)
    head(batch)
    j, z, p = seen["args"]
    bd = head.bd
    explicit = []
    for b in range(B):
        scores = []
        for i in range(KZ):
            cos = torch.nn.functional.cosine_similarity(bd.w_c(j[b]), bd.w_d(z[i]), dim=0)
            scores.append(cos / bd.log_tau.exp() + p[i].log())
        w = torch.softmax(torch.stack(scores), 0)  # ∝ exp(cos / τ) P(z_i), summing to 1
        explicit.append(sum(w[i] * z[i] for i in range(KZ)))
    assert torch.allclose(seen["out"], torch.stack(explicit), atol=1e-5)
    assert torch.allclose(bd.weights(j, z, p).sum(-1), torch.ones(B))


def test_the_classifier_is_linear_by_default_and_text_on_request():
    linear, batch = _setup()
    assert isinstance(linear.cls_2, torch.nn.Linear) and not any("text" in n for n, _ in linear.named_parameters())
    text, _ = _setup(classifier="text")
    assert any(n.startswith("cls_2.text.") for n, _ in text.named_parameters())
    assert linear(batch).shape == text(batch).shape == (B, C)


def test_each_table_row_switches_what_its_caption_says():

    table3 = {
        "modules_base": set(),
        "modules_fcm": {"fcm"},
        "modules_bcm": {"bcm"},
        "modules_fcm_bcm": {"fcm", "bcm"},
        "modules_fcm_bcm_tsc": {"fcm", "bcm", "tsc"},
        "modules_fcm_bcm_bd": {"fcm", "bcm", "bd"},
        "modules_fcm_bcm_tsc_bd": {"fcm", "bcm", "tsc", "bd"},
    }
    for name, on in table3.items():
        head, batch = _setup(**VARIANTS[name])
        params = {
            n.split(".")[0] + ("." + n.split(".")[1] if n.startswith(("encoders", "cfm")) else "")
            for n, _ in head.named_parameters()
        }
        assert ("encoders.fg" in params) == ("fcm" in on) and ("encoders.bg" in params) == ("bcm" in on), name
        # TSC is cross-frame modelling over the foreground/background streams; without it they are mean-pooled
        assert ("cfm.fg" in params or "cfm.bg" in params) == ("tsc" in on), name
        assert ("bd" in params) == ("bd" in on) and "glca" not in params and "cfm.frame" in params, name
        head(batch)
    assert VARIANTS["bd_prior_off"]["use_prior"] is False and "prior" not in VARIANTS["bd_prior_off"]  # removed
    for name in ("bd_lambda_off", "bd_prior_off", "bd_additive", "bd_normalised", "dict_random", "dict_average"):
        assert VARIANTS[name]["glca"] is False and VARIANTS[name]["bd"] is True, name  # Tables 4-5: without GLCA
    assert VARIANTS["dict_average"]["confounder_dictionary"] == "confounder_average_frame"
    assert VARIANTS["dict_background"]["confounder_dictionary"] == "confounder_average"


def test_two_step_training_trains_the_frame_stream_alone_first():
    head, batch = _setup(frame_epochs=2)
    head.set_epoch(0)  # step 1: the base model on the raw frames
    mask = batch.mask
    with torch.no_grad():
        f_l = head.encoders["frame"](batch.vp.float(), mask)
        assert torch.allclose(head(batch), head.cls_2(head.cfm["frame"](f_l, mask)), atol=1e-6)
    head.train()
    head(batch).sum().backward()
    step1 = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert step1 and all(n.split(".")[0] in ("encoders", "cfm", "cls_2") for n in step1)
    assert not any(n.startswith(("encoders.fg", "encoders.bg", "glca", "bd", "G")) for n in step1)
    head.zero_grad(set_to_none=True)
    head.set_epoch(2)  # step 2: every module fine-tunes
    head(batch).sum().backward()
    step2 = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"G", "bd.w_c.weight"} <= step2 and any(n.startswith("encoders.bg") for n in step2)
    one_stage, _ = _setup()
    one_stage.set_epoch(0)
    assert not one_stage.frame_only  # frame_epochs 0: one stage, the default


@pytest.mark.parametrize(
    "variant, reads",
    [
        ("dict_random", "confounder_noise"),
        ("dict_sampled", "confounder_random"),
        ("dict_spherical", "confounder"),
        ("modules_fcm_bcm_tsc_bd", "confounder_paper"),  # the reference: the default Z, Sec. 4.2.1's
    ],
)
def test_table5_rows_read_their_own_dictionary_and_no_other(variant, reads):
    """Each Table 5 row's BD reads its dictionary: replacing that one changes the logits, replacing another
    row's Z does not; the rest of the row is the +TSC+BD model without GLCA."""
    from extract.contract.config import from_dict
    from train.heads import head_options

    opts = head_options(from_dict({}), "ecrl", variant)
    assert not opts.glca and opts.bd and opts.tsc and opts.confounder_dictionary == reads
    _, batch = _setup()
    z, p = batch.dictionaries["confounder"]
    g = torch.Generator().manual_seed(9)
    own = torch.nn.functional.normalize(torch.randn(KZ, DC, generator=g), dim=-1)
    other = "confounder_noise" if reads != "confounder_noise" else "confounder"  # another row's Z
    batch = dataclasses.replace(batch, dictionaries={**batch.dictionaries, reads: (own, p), other: (z, p)})
    ctx = dataclasses.replace(_ctx_of(batch), num_frames=L)
    head = Ecrl(dataclasses.replace(opts, dim=16, layers=1, attention_heads=2), ctx).eval()
    with torch.no_grad():
        out = head(batch)
        other_row = {**batch.dictionaries, other: (-z, p)}
        assert torch.equal(head(dataclasses.replace(batch, dictionaries=other_row)), out)
        other_own = {**batch.dictionaries, reads: (-own, p)}
        assert (head(dataclasses.replace(batch, dictionaries=other_own)) - out).abs().max() > 1e-5


def test_ivrd_variant_is_an_intervention_over_class_prototypes_with_a_uniform_prior():
    """IVRD's form in BD's place: Z = the class means of the frame features (the cache's
    `confounder_average_frame`), P(z) = 1/K whatever the dictionary's own prior, λ attended from the video."""
    opts = EcrlOptions(**VARIANTS["ivrd"])
    assert Ecrl.required_dictionaries(opts) == ("confounder_average_frame", "global")
    assert opts.glca and opts.bd and opts.prior == "uniform"  # the full head with BD's set and prior replaced
    g = torch.Generator().manual_seed(3)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    protos = unit(C, DC)  # one prototype per class
    dicts = {
        "confounder_average_frame": (protos, torch.softmax(torch.randn(C, generator=g), 0)),  # a non-uniform prior
        "global": (unit(KG, DC), torch.full((KG,), 1 / KG)),
    }
    ctx = HeadContext(DC, DV, L, C, False, unit(C, DC), dicts)
    head = Ecrl(dataclasses.replace(opts, dim=16, layers=1, attention_heads=2), ctx).eval()
    batch = random_batch(ctx, B)
    seen = _capture(head.bd)
    head(batch)
    lam = head.bd.weights(seen["args"][0], protos)  # λ (B, C) from the video's J
    assert torch.allclose(seen["out"], lam @ protos / C, atol=1e-6)  # Σ_z λ_z z P(z), P(z) = 1/K


def test_eq2_scores_each_frame_by_its_inner_product_with_the_context_generators_vector():
    """w_l = softmax_l(⟨T_c(F̄), h_l⟩ / √D) over the real frames, F̄ their mean; F = LN(W_o [Σ w h, F̄]); by loops."""
    head, batch = _setup()
    cfm = head.cfm["fg"]
    h = torch.randn(B, L, 16)
    w, c = cfm.weights(h, batch.mask)
    for b in range(B):
        real = [i for i in range(L) if batch.mask[b, i]]
        ctx = sum(h[b, i] for i in real) / len(real)
        scores = torch.stack([cfm.t_c(ctx) @ h[b, i] / 4.0 for i in real])  # √D = 4
        assert torch.allclose(w[b, real], torch.softmax(scores, 0), atol=1e-6)
        pooled = sum(w[b, i] * h[b, i] for i in real)
        assert torch.allclose(cfm(h, batch.mask)[b], cfm.norm(cfm.w_o(torch.cat([pooled, ctx]))), atol=1e-5)
    additive = _setup(cfm_score="additive")[0].cfm["fg"]  # ours, the earlier form, kept as a variant
    assert not hasattr(additive, "t_c") and hasattr(additive, "w_s")


def test_glca_combines_the_local_features_with_both_attentions_as_the_paper_says():
    """F_VG = LN(W_o [F_L, F_LL, F_LG]) (F_LL "combined with F_L and F_LG"); `glca_ll_lg`: [F_LL, F_LG]."""
    for combine, parts in (("paper", 3), ("ll_lg", 2)):
        head, batch = _setup(glca_combine=combine)
        glca = head.glca
        seen_ll, seen_lg, seen_o = _capture(glca.local_local), _capture(glca.local_global), _capture(glca.w_o)
        head(batch)
        f_l = seen_ll["args"][0]
        expected = [f_l, seen_ll["out"], seen_lg["out"]][3 - parts :]
        assert torch.equal(seen_o["args"][0], torch.cat(expected, -1)), combine


@pytest.mark.parametrize("multi_label", [False, True], ids=["activity", "atomic"])
def test_stratified_bd_is_eq4_summed_over_every_stratum(multi_label):
    """S1 = log Σ_i P(z_i) softmax(cls_1(Ψ([s, W_z z_i]))) (single label; multi-label: the logit of Σ_i P(z_i) σ(·)),
    against a loop over the strata; the video's own background does not reach S1; and knocking Z out (every
    stratum replaced by the prior-weighted mean of Z) moves S1 by Eq. 4's Jensen gap (floors below)."""
    head, batch = _setup(bd_form="stratified", glca=False)
    if multi_label:
        ctx = dataclasses.replace(_ctx_of(batch), multi_label=True)
        torch.manual_seed(0)
        opts = EcrlOptions(dim=16, layers=1, attention_heads=2, bd_form="stratified", glca=False)
        head = Ecrl(dataclasses.replace(opts, confounder_dictionary="confounder"), ctx).eval()
    s1_seen = _capture(head.strata_term)
    feats_seen = _capture(head.psi)
    head(batch)
    s1 = s1_seen["out"]  # (B, C)
    assert feats_seen["args"][0].shape == (B, KZ, 32)  # every stratum in one call: Ψ over (B, K, 2D)
    z, p = batch.dictionaries["confounder"]
    fg_seen = {}
    head.cfm["fg"].register_forward_hook(lambda m, a, o: fg_seen.update(out=o))
    head(batch)
    s = fg_seen["out"]  # the foreground stream's feature, (B, D)
    expected = []
    for b in range(B):
        probs = []
        for i in range(KZ):
            logits = head.cls_1(head.psi(torch.cat([s[b], head.bd.w_z(z[i])])))  # P(Y | s, z_i), (C,)
            probs.append(p[i] * (torch.sigmoid(logits) if multi_label else torch.softmax(logits, 0)))
        mix = sum(probs)
        expected.append(torch.log(mix / (1 - mix)) if multi_label else torch.log(mix))
    assert torch.allclose(s1, torch.stack(expected), atol=1e-5)
    other_bg = dataclasses.replace(batch, bg=torch.randn_like(batch.bg.float()).half())
    out = head(batch)
    assert torch.equal(head(other_bg), out)  # the background stream is what is intervened on
    # Z knocked out: every stratum the prior-weighted mean z̄. Ψ, cls_1 and W_z are affine, so this is Eq. 7's
    # NWGM (softmax of the mean logit), and S1 moves by Eq. 4's Jensen gap over the strata's predictions: small
    # while they barely differ (2e-4 / 6e-5 here at initialisation), large once they do (W_z scaled by 20)
    flat = (p[:, None] * z).sum(0, keepdim=True).expand_as(z)
    knocked = dataclasses.replace(batch, dictionaries={**batch.dictionaries, "confounder": (flat, p)})
    assert (head(knocked) - out).abs().max().item() > 1e-5
    with torch.no_grad():
        head.bd.w_z.weight.mul_(20)
    change = (head(knocked) - head(batch)).abs().max().item()
    assert change > 0.02, change  # measured 0.11 (activity), 0.037 (atomic)


def _ctx_of(batch: Batch) -> HeadContext:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return HeadContext(DC, DV, L, C, False, unit(C, DC), batch.dictionaries)
