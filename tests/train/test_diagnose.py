"""`ltar diagnose`: known answers on toy heads (a constant term, a term that carries the label), the
registered heads' declared terms, and the CLI on a trained run of the random store."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from train.data import SplitTensors
from train.diagnose import _entropy_ratio, diagnose_model, head_terms
from train.heads import CausalTerm, HeadContext, build_head, head_entry, head_names

N, L, D, C = 40, 4, 6, 3
REPO = Path(__file__).resolve().parents[2]


def _toy_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    vp = torch.randn(N, L, D, generator=g)
    vp[:, :, :C] += 4.0 * nn.functional.one_hot(labels, C)[:, None, :].float()  # the label lives in vp's first dims
    data = SplitTensors(
        np.arange(N), [f"v{i}" for i in range(N)], vp.half(), vp.half(), vp.half(), vp.half(),
        torch.ones(N, L, dtype=torch.bool), labels,
    )  # fmt: skip
    ctx = HeadContext(D, D, L, C, False, torch.randn(C, D, generator=g), {})
    return data, ctx


class ConstantTerm(nn.Module):
    """A learned offset, the same for every video: `offset`'s output ignores its input."""

    def __init__(self):
        super().__init__()
        # small beside the label signal (4.0), and seeded: the toy head is right on every video by construction,
        # whatever the global RNG's state after other tests
        self.value = nn.Parameter(0.1 * torch.randn(C, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.value.expand(x.shape[0], -1)  # (B, C)


class ToyHead(nn.Module):
    """logits = read(mean frame) + offset: `read` carries the label, `offset` is constant by construction."""

    def __init__(self):
        super().__init__()
        self.read = nn.Linear(D, C, bias=False)
        with torch.no_grad():
            self.read.weight.copy_(torch.eye(C, D))
        self.offset = ConstantTerm()
        self.attend = nn.Linear(D, 5)  # scores over 5 entries, uniform by construction below
        nn.init.zeros_(self.attend.weight)
        nn.init.zeros_(self.attend.bias)

    def forward(self, batch):
        x = batch.vp.float().mean(1)  # (B, D)
        self.attend(x)
        return self.read(x) + self.offset(x)  # (B, C)


TERMS = (
    CausalTerm("offset", "b", "offset", "attend", lambda m, a, k, o: (o.softmax(-1), None)),
    CausalTerm("read", "W x", "read"),
)


def test_a_constant_term_has_zero_variation_and_zero_mean_knockout_and_a_label_term_a_large_one():
    data, ctx = _toy_data()
    head = ToyHead()
    rows = {r.term.name: r for r in diagnose_model(head, "toy", data, ctx, "cpu", 16, TERMS)}
    assert rows["offset"].variation == 0.0 and rows["offset"].ko_mean == 0.0
    assert rows["offset"].cosine == pytest.approx(1.0)
    assert rows["offset"].entropy == pytest.approx(1.0)  # uniform weights over the 5 entries
    assert rows["read"].metric == 1.0  # the toy head is right on every video
    assert rows["read"].variation > 0.5
    assert rows["read"].ko_mean == pytest.approx(100 * (1 / C - 1.0), abs=100 / N)  # mean replaces it: chance
    assert rows["read"].ko_zero < -50
    assert rows["read"].entropy is None


def test_entropy_ratio_known_answers():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    r = _entropy_ratio(p, torch.tensor([4, 4, 2]))
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)  # the third over its 2 valid entries


@pytest.mark.parametrize("name", head_names())
def test_every_declared_term_names_a_module_of_the_full_head(name):
    from extract.contract.config import from_dict
    from tests.train.test_train import _context

    entry = head_entry(name)
    ctx = _context(False, ("confounder", "confounder_paper", "global", "global_video"))
    ctx = dataclasses.replace(
        ctx,
        dictionaries={
            **ctx.dictionaries,
            "global_video": (torch.randn(6, ctx.video_dim), torch.full((6,), 1 / 6)),
        },
    )
    head = build_head(name, from_dict({}), ctx)
    found = {t.name for t, _ in head_terms(head, name)}
    only_in = {"bd_strata": "bd_stratified_full"}  # a term of another form: found in that form's variant
    assert found == {t.name for t in entry.terms} - set(only_in)  # the full head has every other term it declares
    for term, variant in only_in.items():
        if term in {t.name for t in entry.terms}:
            other = build_head(name, from_dict({}), ctx, variant)
            assert term in {t.name for t, _ in head_terms(other, name)}, (term, variant)
    if name != "baseline":
        assert entry.terms, "a causal head declares its causal terms"


def test_diagnose_cli_on_a_trained_run(random_cache, tmp_path):
    from train.engine import train
    from train.main import app

    cfg, store = random_cache
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, head="cmdcl", epochs=1, runs_root=str(tmp_path)),
    )
    run = train(cfg, store=store, progress=False, run_dir=tmp_path / "cmdcl").run_dir
    common = ["--config", str(REPO / "pipeline.yaml"), "--store", str(store)]
    res = CliRunner().invoke(app, ["-q", "diagnose", str(run), "--split", "test_ood", *common])
    assert res.exit_code == 0, res.output
    md = (run / "diagnose-test_ood.md").read_text()
    assert "| tci |" in md and "| vci |" in md
    lines = (run / "diagnose-test_ood.csv").read_text().splitlines()
    assert lines[0].startswith("term,symbol,module,variation") and len(lines) == 3
    assert (run / "diagnose-test_ood.png").read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["-q", "diagnose", str(tmp_path / "nope"), *common])
    assert res.exit_code != 0 and "does not exist" in res.output
