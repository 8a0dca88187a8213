"""Stage 2: every registered head and variant, metrics against scikit-learn, checkpoints, the CLI."""

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, top_k_accuracy_score
from typer.testing import CliRunner

from extract.contract.config import ConfigError
from extract.contract.schema import CacheError
from tests.train.conftest import random_batch, with_train
from train.data import CacheReader, iterate_batches
from train.engine import RunError, evaluate, resume_mismatch, train
from train.heads import Batch, HeadContext, build_head, head_entry, head_names, head_options, variant_names
from train.main import app
from train.metrics import average_precision, compute_metrics, mean_average_precision, topk_accuracy

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Metrics: known answers from scikit-learn
# ------------------------------------------------------------------------------------------------


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(80, 7)), 1)  # rounded: many ties
    labels = rng.integers(0, 7, 80)
    assert topk_accuracy(scores, labels, 1) == pytest.approx(accuracy_score(labels, scores.argmax(1)))
    for k in (2, 5):
        assert topk_accuracy(scores, labels, k) == pytest.approx(top_k_accuracy_score(labels, scores, k=k))
    targets = rng.random((80, 7)) < 0.25
    targets[:, 3] = False  # a class with no positive is left out of the mean
    ap = average_precision(scores, targets)
    ref = [average_precision_score(targets[:, c], scores[:, c]) for c in range(7) if targets[:, c].any()]
    assert np.isnan(ap[3]) and np.allclose(ap[np.isfinite(ap)], ref)
    valid = targets.any(0)
    sk_macro = average_precision_score(targets[:, valid], scores[:, valid], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(sk_macro)
    # a hand-computed ranking: positives at ranks 1 and 3 of 4 -> AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([[0.9], [0.8], [0.7], [0.1]]), np.array([[1], [0], [1], [0]], bool))[
        0
    ] == pytest.approx((1 + 2 / 3) / 2)
    m = compute_metrics(scores, labels, multi_label=False)
    assert set(m) == {"acc1", "acc5", "map"}


# ------------------------------------------------------------------------------------------------
# Every registered head and variant, on random tensors
# ------------------------------------------------------------------------------------------------

B, L, DC, DV, C = 4, 8, 32, 48, 5


def _context(multi_label: bool, names=("confounder", "global")) -> HeadContext:
    """Random unit-norm T0 and one random dictionary (K = 6 + i, prior ∝ 1..K) per name."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    dicts = {}
    for i, name in enumerate(sorted(set(names))):
        k = 6 + i
        prior = torch.arange(1, k + 1, dtype=torch.float32)
        dicts[name] = (unit(k, DC), prior / prior.sum())
    return HeadContext(DC, DV, L, C, multi_label, unit(C, DC), dicts)


def _batch(ctx: HeadContext, seed: int) -> Batch:
    return random_batch(ctx, B, seed, short=3)


def _all_variants():
    from extract.contract.config import from_dict

    cfg = from_dict({})
    return [(h, v) for h in head_names() for v in [None, *variant_names(cfg, h)]]


def _table_row_pairs() -> list[tuple[str, str]]:
    """Every pair of rows of one head that some table of pipeline.yaml compares (the oracle row aside)."""
    from itertools import combinations

    from extract.contract.config import load_config
    from train.heads import ORACLE_ROW, parse_row

    cfg = load_config(REPO / "pipeline.yaml", [])
    pairs = set()
    for table in cfg.ablations.values():
        rows = [r for r in table.rows if r != ORACLE_ROW]
        pairs |= {tuple(sorted(p)) for p in combinations(rows, 2) if parse_row(p[0])[0] == parse_row(p[1])[0]}
    return sorted(pairs)


def test_two_rows_of_a_table_start_from_the_same_weights_in_every_module_they_share():
    """At one seed, every module two compared rows both hold (same qualified name, same parameter shapes) starts
    from identical parameters and buffers: a paired Δ measures the mechanism, not an initialisation. Without
    `initialise` (one global stream, modules built only when switched on) 135 parameter names differ over these
    pairs, ECRL's `w_a` between `ecrl` and `ecrl:bd_lambda_off` among them."""
    from extract.contract.config import load_config
    from train.engine import new_model
    from train.heads import parse_row, required_dictionaries

    cfg = load_config(REPO / "pipeline.yaml", [])
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    pairs = _table_row_pairs()
    needed = {d for p in pairs for r in p for d in required_dictionaries(cfg, *parse_row(r)[:2])}
    dicts = {n: (unit(6, DC), torch.full((6,), 1 / 6)) for n in needed | {"confounder", "global"}}
    ctx = HeadContext(DC, DV, 16, C, False, unit(C, DC), dicts)  # 16 frames: STR keeps 8
    built: dict[str, torch.nn.Module] = {}

    def model(row: str) -> torch.nn.Module:
        if row not in built:
            head, variant, grounding = parse_row(row)
            c = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, head=head, variant=variant, grounding=grounding)
            )
            built[row] = new_model(c, ctx, seed=0)
        return built[row]

    def state(m: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:  # module name -> its own tensors
        return {
            name: {**dict(mod.named_parameters(recurse=False)), **dict(mod.named_buffers(recurse=False))}
            for name, mod in m.named_modules()
        }

    assert len(pairs) > 150  # every paper table's rows, the grounding tables' and the cross-head tables'
    compared = 0
    for a, b in pairs:
        sa, sb = state(model(a)), state(model(b))
        for name in sa.keys() & sb.keys():
            ta, tb = sa[name], sb[name]
            if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
                continue  # not the same module: another input width, another form
            for k in ta:
                assert torch.equal(ta[k], tb[k]), f"{a} vs {b}: {name}.{k} starts from other weights"
                compared += 1
    assert compared > 5_000
    # the parent's init keeps the last word: attention's output bias starts at 0, as nn.MultiheadAttention sets it
    baseline = model("baseline")
    attn = [m for m in baseline.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attn and all(torch.equal(m.out_proj.bias, torch.zeros_like(m.out_proj.bias)) for m in attn)


@pytest.fixture(scope="module")
def store_inputs(random_cache):
    """Per task: the random store's HeadContext (its T0, every dictionary pipeline.yaml's heads read, L = 8,
    Dc = 16 != Dv = 24) and its first two training batches of B videos as train.data reads them."""
    _, store = random_cache
    out = {}
    for task in ("activity", "atomic"):
        reader = CacheReader(store, task)
        ctx = reader.context()
        batches = iterate_batches(reader.load_split("train"), B, ctx.t0, ctx.dictionaries, "cpu")
        out[task] = (ctx, [b for _, b in itertools.islice(batches, 2)])
    return out


def _copies(ctx: HeadContext, batches: list[Batch]) -> tuple[HeadContext, list[Batch]]:
    """Fresh tensors for one test: a head that wrote into its inputs must not reach the next test."""
    dicts = {k: (c.clone(), p.clone()) for k, (c, p) in ctx.dictionaries.items()}
    ctx = dataclasses.replace(ctx, t0=ctx.t0.clone(), dictionaries=dicts)
    fields = ("vp", "v", "fg", "bg", "mask", "labels")
    return ctx, [
        dataclasses.replace(b, t0=ctx.t0, dictionaries=dicts, **{f: getattr(b, f).clone() for f in fields})
        for b in batches
    ]


@pytest.mark.parametrize("multi_label", [False, True], ids=["activity", "atomic"])
@pytest.mark.parametrize("head_name,variant", _all_variants())
def test_every_head_and_variant(head_name, variant, multi_label):
    from extract.contract.config import from_dict
    from train.engine import loss_fn
    from train.heads import required_dictionaries

    torch.manual_seed(0)
    cfg = from_dict({})
    ctx = _context(multi_label, ("confounder", "global", *required_dictionaries(cfg, head_name, variant)))
    head = build_head(head_name, cfg, ctx, variant)
    batches = [_batch(ctx, 1), _batch(ctx, 2)]
    logits = head(batches[0])
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    # one backward step touches only head parameters; the cached inputs and T0 stay as they were
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    t0 = batches[0].t0.clone()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    loss = loss_fn(head(batches[0]), batches[0].labels, multi_label)
    loss.backward()
    assert all(p.grad is None for p in (batches[0].vp, batches[0].v))
    opt.step()
    assert torch.equal(batches[0].t0, t0)
    changed = [n for n, p in head.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter moved"
    # overfits two batches: the loss falls clearly. PCMCI's IVC alone (V5) is front-door over the frozen T0: the
    # video reaches the readout only through each frame's C-way mixture of class texts, and learns more slowly
    slow = head_name == "pcmci" and variant in ("stages_v5", "stages_v5_cosine")
    head.train()
    first = None
    for step in range(240 if slow else 80):
        batch = batches[step % 2]
        loss = loss_fn(head(batch), batch.labels, multi_label)
        opt.zero_grad()
        (loss + (getattr(head, "aux_loss", None) or 0)).backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    head.eval()
    with torch.no_grad():
        final = np.mean([float(loss_fn(head(b), b.labels, multi_label)) for b in batches])
    assert final < 0.5 * first, (first, final)


@pytest.mark.parametrize("multi_label", [False, True], ids=["activity", "atomic"])
@pytest.mark.parametrize("head_name,variant", _all_variants())
def test_every_head_and_variant_reads_the_store(store_inputs, head_name, variant, multi_label):
    """Built from the random store's context (T0, every dictionary pipeline.yaml's heads read, L = 8, Dc = 16 and
    Dv = 24) on two of its training batches: finite (B, C) logits that the padded frames do not reach (those slots
    refilled with noise change nothing); a step on the store's labels moves head parameters only, and the inputs,
    T0 and the dictionaries stay as read."""
    from extract.contract.config import from_dict
    from train.engine import loss_fn

    torch.manual_seed(0)
    cfg = from_dict({})
    ctx, batches = _copies(*store_inputs["atomic" if multi_label else "activity"])
    assert all(not b.mask.all() for b in batches)  # padded frames in each batch
    read = {k: (c.clone(), p.clone()) for k, (c, p) in ctx.dictionaries.items()}
    features = [(b.vp.clone(), b.v.clone(), b.fg.clone(), b.bg.clone()) for b in batches]
    head = build_head(head_name, cfg, ctx, variant).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for b in batches:
            logits = head(b)
            assert logits.shape == (B, ctx.num_classes) and torch.isfinite(logits).all()
            pad = ~b.mask[..., None]  # (B, L, 1)
            noisy = {
                f: torch.where(pad, torch.randn(getattr(b, f).shape, generator=g).half(), getattr(b, f))
                for f in ("vp", "v", "fg", "bg")
            }
            torch.testing.assert_close(head(dataclasses.replace(b, **noisy)), logits)
    head.train()
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    loss = loss_fn(head(batches[0]), batches[0].labels, multi_label)
    (loss + (getattr(head, "aux_loss", None) or 0)).backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in head.named_parameters()), "no parameter moved"
    for b, kept in zip(batches, features, strict=True):
        assert all(torch.equal(x, y) for x, y in zip((b.vp, b.v, b.fg, b.bg), kept, strict=True))
    for name, (c, p) in read.items():  # a head trains a copy of a dictionary (ECRL's G), never the one read
        assert torch.equal(ctx.dictionaries[name][0], c) and torch.equal(ctx.dictionaries[name][1], p), name


def test_unknown_head_and_variant_are_sentences():
    from extract.contract.config import from_dict

    with pytest.raises(KeyError, match="unknown head 'nope'; choose from"):
        head_entry("nope")
    with pytest.raises(ConfigError, match="unknown variant 'x'"):
        build_head("baseline", from_dict({}), _context(False), "x")


def test_frozen_text_keeps_t0_and_clip_only_reads_vp():
    from extract.contract.config import from_dict

    ctx = _context(False)
    frozen = build_head("baseline", from_dict({}), ctx, "frozen_text")
    assert not any("text.text" in n for n, _ in frozen.named_parameters())
    clip_only = build_head("baseline", from_dict({}), ctx, "clip_only")
    batch = _batch(ctx, 3)
    out = clip_only(dataclasses.replace(batch, v=torch.full_like(batch.v, float("nan"))))
    assert torch.isfinite(out).all()  # V is not read at all


# ------------------------------------------------------------------------------------------------
# On the random store (tests/train/random_cache.py)
# ------------------------------------------------------------------------------------------------


def test_streamed_split_equals_in_memory(random_cache):
    cfg, store = random_cache
    reader = CacheReader(store, "activity")
    mem = reader.load_split("train")
    streamed = reader.stream_split("train", block_rows=2)
    got = {}
    for pos, batch in iterate_batches(streamed, 3, mem.vp[:0], {}, "cpu", torch.Generator().manual_seed(0)):
        for p, row in zip(pos, batch.vp, strict=True):
            got[int(p)] = row
    assert sorted(got) == list(range(len(mem))) and all(torch.equal(got[i], mem.vp[i]) for i in got)


def test_resume_gives_the_same_next_epoch(random_cache, tmp_path):
    cfg, store = random_cache
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, runs_root=str(tmp_path)))
    full = train(cfg, store=store, progress=False, run_dir=tmp_path / "full")
    steps_per_epoch = full.steps // 3
    cut = train(cfg, store=store, progress=False, run_dir=tmp_path / "cut", max_steps=steps_per_epoch)
    assert cut.steps == steps_per_epoch
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        train(cfg, store=store, progress=False, run_dir=tmp_path / "cut")
    # a resume with other settings than the run began with is refused, naming them (and leaves the run as it was)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 10, epochs=5))
    with pytest.raises(RunError, match=r"other settings than these: train\.epochs, train\.lr differ"):
        train(other, store=store, progress=False, run_dir=tmp_path / "cut", resume=True)
    where = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=2))  # how it is read: allowed
    assert not resume_mismatch(torch.load(tmp_path / "cut" / "last.pt", weights_only=True), where)
    resumed = train(cfg, store=store, progress=False, run_dir=tmp_path / "cut", resume=True)
    assert resumed.steps == full.steps and resumed.steps_run == full.steps - steps_per_epoch  # what this call ran
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.metrics == full.metrics
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    assert (tmp_path / "cut" / "metrics.csv").read_text().count("\n") == 4


def test_a_kill_while_writing_a_checkpoint_leaves_the_old_one(random_cache, tmp_path, monkeypatch):
    import train.engine as engine

    cfg, store = random_cache
    train(cfg, store=store, progress=False, run_dir=tmp_path)
    good = torch.load(tmp_path / "last.pt", weights_only=True)
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt  # the process dies here, mid-write

    monkeypatch.setattr(engine.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        engine.atomic_save({"x": 1}, tmp_path / "last.pt")
    monkeypatch.setattr(engine.torch, "save", real_save)
    again = torch.load(tmp_path / "last.pt", weights_only=True)
    assert again["epoch"] == good["epoch"] and again["step"] == good["step"]


def test_evaluate_refuses_a_checkpoint_from_another_cache(random_cache, tmp_path):
    cfg, store = random_cache
    result = train(cfg, store=store, progress=False, run_dir=tmp_path / "run")
    ev = evaluate(tmp_path / "run" / "best.pt", "test_ood", store=store)
    assert ev.metrics == pytest.approx(result.metrics["test_ood"])
    assert json.loads(ev.metrics_json.read_text())["metrics"] == pytest.approx(result.metrics["test_ood"])
    assert ev.confusion_png.read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["fingerprint"] = "0" * 16
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CacheError, match="was trained on cache 0000000000000000, but"):
        evaluate(tmp_path / "other.pt", "test_ood", store=store)


def test_partial_store_is_refused_unless_allowed(random_cache, tmp_path):
    import shutil

    import zarr

    cfg, store = random_cache
    copy = tmp_path / "partial.zarr"
    shutil.copytree(store, copy)
    zarr.open_group(str(copy), mode="r+")["done"][0] = False
    total = len(CacheReader(store, "activity").done)
    with pytest.raises(CacheError, match=f"1 of {total} videos have no features.*--allow-partial"):
        CacheReader(copy, "activity")
    reader = CacheReader(copy, "activity", allow_partial=True)
    assert 0 not in reader.split_rows("train")
    with pytest.raises(CacheError, match="no label task 'verbs'"):
        CacheReader(copy, "verbs")


def test_cli_train_evaluate_ablate(random_cache, tmp_path, monkeypatch):
    cfg, store = random_cache
    monkeypatch.chdir(tmp_path)
    sets = [
        f"dataset.name={cfg.dataset.name}",
        f"dataset.root={cfg.dataset.root}",
        f"cache.root={cfg.cache.root}",
        "train.epochs=2",
        "train.batch_size=4",
        f"train.runs_root={tmp_path / 'runs'}",
    ]
    common = ["--config", str(REPO / "pipeline.yaml")] + [a for s in sets for a in ("--set", s)]
    runner = CliRunner()
    res = runner.invoke(app, ["-q", "train", "--task", "atomic", *common, "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert "test_ood: map=" in res.output
    run = tmp_path / "runs" / "baseline-atomic-s0"
    assert (run / "best.pt").exists() and (run / "config.resolved.yaml").exists()
    res = runner.invoke(
        app, ["-q", "evaluate", str(run / "last.pt"), "--split", "test_iid", "--store", str(store), *common]
    )
    assert res.exit_code == 0 and "test_iid: map=" in res.output, res.output
    res = runner.invoke(app, ["-q", "ablate", "--table", "baseline", "--seeds", "2", "--store", str(store), *common])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "runs" / "ablations" / "baseline-seeds2.md").read_text()  # not the table's own 3 seeds
    assert not (tmp_path / "runs" / "ablations" / "baseline.md").exists()
    assert "| baseline:clip_only |" in md and "activity Acc@1 test_ood" in md and "atomic mAP test_iid" in md
    assert "Training recipe: ours (pipeline.yaml `train`)." in md
    # the family: the 4 rows besides the reference x 2 tasks x 2 splits
    assert "95% interval counting test videos (jackknife) and training seeds" in md and "| baseline | " in md
    assert " | ref | " in md and "over the table's 16 Δ cells" in md
    assert all((r.parent / "predictions-test_ood.npz").exists() for r in (tmp_path / "runs").rglob("last.pt"))
    res = runner.invoke(  # the finished runs are reused; --diagnose adds each row's causal-term headline
        app, ["-q", "ablate", "--table", "baseline", "--seeds", "2", "--diagnose", "--store", str(store), *common]
    )
    assert res.exit_code == 0, res.output
    md = (tmp_path / "runs" / "ablations" / "baseline-seeds2.md").read_text()
    assert "activity diagnosis (test_ood, seed 0)" in md and "| baseline | " in md
    csv_lines = (tmp_path / "runs" / "ablations" / "baseline-seeds2.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 * 2 * 2  # rows x tasks x eval splits
    assert (tmp_path / "runs" / "ablations" / "baseline-seeds2.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["-q", "ablate", "--table", "nope", *common])
    assert res.exit_code == 2 and "no ablation table(s) ['nope']" in res.output
    res = runner.invoke(app, ["-q", "train", "--head", "nope", *common])
    assert res.exit_code == 2 and "train.head: unknown head 'nope'" in res.output


def test_a_checkpoint_is_read_as_data_and_a_bad_one_is_a_sentence(random_cache, tmp_path):
    """Every checkpoint is read with torch.load(weights_only=True): a file whose pickle would create a file when
    read is refused with exit 2 and the file never appears; an empty, truncated or garbage file is a sentence
    with exit 2; a checkpoint holding a harmless object beyond plain data needs --trust-checkpoint."""
    import fractions

    class Planted:
        def __reduce__(self):  # what a shared checkpoint could carry: unpickling it opens (creates) a file
            return (open, (str(tmp_path / "planted"), "w"))

    cfg, store = random_cache
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    run = train(cfg, store=store, progress=False, run_dir=tmp_path / "run").run_dir
    good = torch.load(run / "last.pt", weights_only=True)  # what ltar writes reads as plain data
    torch.save({**good, "extra": Planted()}, tmp_path / "planted.pt")
    torch.save({**good, "extra": fractions.Fraction(1, 3)}, tmp_path / "fraction.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 8)
    whole = (run / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    common = ["--split", "test_iid", "--store", str(store), "--config", str(REPO / "pipeline.yaml")]
    common += ["--set", f"cache.root={cfg.cache.root}", "--set", f"dataset.root={cfg.dataset.root}"]
    runner = CliRunner()

    def evaluate(path, *extra):
        return runner.invoke(app, ["-q", "evaluate", str(path), *common, *extra])

    res = evaluate(tmp_path / "planted.pt")
    assert res.exit_code == 2 and "planted.pt holds Python objects beyond tensors" in res.output, res.output
    assert "--trust-checkpoint" in res.output and not (tmp_path / "planted").exists()
    for name in ("empty", "garbage", "truncated"):
        res = evaluate(tmp_path / f"{name}.pt")
        assert res.exit_code == 2 and f"{name}.pt is not a readable checkpoint" in res.output, (name, res.output)
        assert "Traceback" not in res.output
    res = evaluate(tmp_path / "fraction.pt")
    assert res.exit_code == 2 and "holds Python objects beyond tensors" in res.output
    res = evaluate(tmp_path / "fraction.pt", "--trust-checkpoint")
    assert res.exit_code == 0 and "test_iid: acc1=" in res.output, res.output
    res = evaluate(run)  # a run folder reads its last.pt, as diagnose does
    assert res.exit_code == 0 and "test_iid: acc1=" in res.output, res.output


def test_a_run_whose_saved_tables_name_a_removed_variant_still_loads(random_cache, tmp_path):
    """A run records the whole config, ablation tables included; a table row naming a variant since removed
    (ECRL's `dict_paper` became the default Z) must not make the run unreadable for evaluate / diagnose."""
    from train.engine import load_run

    cfg, store = random_cache
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    run = train(cfg, store=store, progress=False, run_dir=tmp_path / "run").run_dir
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["config"]["ablations"]["old"] = {"rows": ["ecrl:no_such_variant"], "tasks": ["activity"]}
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(ConfigError, match="no variant 'no_such_variant'"):
        from extract.contract.config import from_dict

        from_dict(ckpt["config"])  # the saved config as a whole no longer validates
    loaded = load_run(run / "last.pt", store)
    assert loaded.cfg.train == cfg.train and loaded.model is not None


def test_fewer_frames_from_one_cache_are_its_uniformly_spaced_slots(random_cache, tmp_path):
    from train.engine import run_name

    cfg, store = random_cache  # L = 8 cached slots
    full, four = CacheReader(store, "activity"), CacheReader(store, "activity", num_frames=4)
    assert four.slots.tolist() == [1, 3, 5, 7]  # the centre of each quarter of the 8 slots
    assert four.context().num_frames == 4 and full.context().num_frames == 8
    a, b = full.load_split("train"), four.load_split("train")
    assert torch.equal(b.vp, a.vp[:, [1, 3, 5, 7]]) and torch.equal(b.mask, a.mask[:, [1, 3, 5, 7]])
    assert torch.equal(b.v, a.v[:, [1, 3, 5, 7]]) and torch.equal(b.labels, a.labels)
    with pytest.raises(CacheError, match="train.num_frames = 9.*at most 8"):
        CacheReader(store, "activity", num_frames=9)
    fewer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_frames=4, epochs=1))
    assert run_name(fewer).endswith("-f4-activity-s0") and "-f" not in run_name(cfg)
    result = train(fewer, store=store, progress=False, run_dir=tmp_path / "f4")
    assert result.steps > 0 and np.isfinite(result.history[-1]["loss"])


def test_a_frames_row_trains_on_its_frames_of_the_same_cache(random_cache, tmp_path):
    """A row `<row>/f<L'>` (Fig. 7b's frames on one cache): its runs see L' uniformly spaced slots of the cache's
    L, as train.num_frames does, and keep their own run folders; a malformed suffix is a sentence naming it."""
    from extract.contract.config import from_dict
    from train.ablate import run_table
    from train.config import AblationTable
    from train.heads import parse_row, row_frames

    row = "cmdcl:variant2+igv/f8"
    assert parse_row(row) == ("cmdcl", "variant2", "igv") and row_frames(row) == 8
    assert row_frames("cmdcl") is None
    with pytest.raises(ValueError, match="'cmdcl/8': the frames suffix is /f<L'>"):
        row_frames("cmdcl/8")
    with pytest.raises(ConfigError, match=r"ablations.t.rows\[1\]: row 'baseline/f0'"):
        from_dict({"ablations": {"t": {"rows": ["baseline", "baseline/f0"]}}})
    cfg, store = random_cache  # L = 8
    table = AblationTable(rows=("baseline/f4", "baseline"), tasks=("activity",), seeds=1, reference="baseline")
    cfg = dataclasses.replace(
        cfg, ablations={"frames": table}, train=dataclasses.replace(cfg.train, epochs=1, runs_root=str(tmp_path))
    )
    result = run_table(cfg, "frames", store=store, progress=False)
    runs = {p.parent.name: p for p in (tmp_path / "ablations").rglob("last.pt")}
    assert set(runs) == {"baseline-f4-activity-s0", "baseline-activity-s0"}
    saved = torch.load(runs["baseline-f4-activity-s0"], map_location="cpu", weights_only=True)
    assert saved["config"]["train"]["num_frames"] == 4
    full = torch.load(runs["baseline-activity-s0"], map_location="cpu", weights_only=True)
    assert full["config"]["train"]["num_frames"] is None
    assert {c.row for c in result.cells} == {"baseline/f4", "baseline"}


def test_step_schedule_and_adam_as_the_recipes_ask():
    from extract.contract.config import from_dict
    from train.engine import make_optimizer, schedule_lambda

    tc = from_dict({"train": {"schedule": "step", "step_epochs": 4, "step_gamma": 0.5, "warmup_epochs": 0.0}}).train
    f = schedule_lambda(tc, steps_per_epoch=10)
    assert [f(s) for s in (0, 39, 40, 79, 80, 125)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]  # × γ every 4 epochs
    warm = dataclasses.replace(tc, warmup_epochs=1.0)
    assert schedule_lambda(warm, 10)(4) == 0.5  # linear warm-up first (step 5 of 10)
    # ECRL's two-step training (frame_epochs 4, its recipe's decay 0.1 every 4 epochs): the fine-tune step starts
    # its own schedule at epoch 4, so epochs 4-7 train at the full rate, 8-11 at 0.1, ... (one schedule over both
    # steps began the fine-tune at 0.1 and ended at 1e-7; the recipe's 30 epochs are ours, the paper states none)
    paper = from_dict({"train": {"schedule": "step", "step_epochs": 4, "step_gamma": 0.1, "warmup_epochs": 0.0}}).train
    two = schedule_lambda(paper, steps_per_epoch=10, restart_epoch=4)
    epochs = [two(10 * e) for e in (0, 3, 4, 7, 8, 12, 29)]
    assert epochs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.01, 0.1**6])  # epoch 29: step 2's epoch 25
    cosine = from_dict({"train": {"schedule": "cosine", "warmup_epochs": 0.0, "epochs": 10}}).train
    c = schedule_lambda(cosine, steps_per_epoch=10, restart_epoch=4)
    assert c(39) < 0.01 and c(40) == 1.0 and c(70) == pytest.approx(0.5)  # each step its own cosine
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(tc, params)) is torch.optim.AdamW
    assert type(make_optimizer(dataclasses.replace(tc, optimizer="adam"), params)) is torch.optim.Adam


def test_a_paper_recipe_replaces_its_keys_and_names_its_runs():
    from extract.contract.config import load_config
    from train.engine import run_name

    cfg = load_config(REPO / "pipeline.yaml", ["train.recipe=ecrl_paper", "train.head=ecrl"])
    t = cfg.train
    assert (t.optimizer, t.lr, t.schedule, t.step_epochs, t.step_gamma) == ("adam", 1e-4, "step", 4, 0.1)
    assert t.batch_size == 8
    assert t.epochs == 30 and cfg.heads["ecrl"]["frame_epochs"] == 4  # unstated epochs stay ours; the two steps
    assert run_name(cfg) == "ecrl@ecrl_paper-activity-s0"
    ours = load_config(REPO / "pipeline.yaml", ["train.head=ecrl"])
    assert ours.train.optimizer == "adamw" and head_options(ours, "ecrl").frame_epochs == 0  # the default, in code
    assert "@" not in run_name(ours)
    with pytest.raises(ConfigError, match="train.recipe: no recipe 'nope'; pipeline.yaml defines recipes: "):
        load_config(REPO / "pipeline.yaml", ["train.recipe=nope"])
    with pytest.raises(ConfigError, match="recipes.mine.train.lrr: unknown key"):
        load_config(REPO / "pipeline.yaml", ["recipes.mine.train.lrr=1"])
    with pytest.raises(ConfigError, match="recipes.mine.train: a recipe sets how a run trains, not which run"):
        load_config(REPO / "pipeline.yaml", ["recipes.mine.train.head=ecrl"])


def test_frame_epochs_must_leave_a_second_step(random_cache, tmp_path):
    cfg, store = random_cache
    bad = dataclasses.replace(
        cfg,
        heads={"ecrl": {"frame_epochs": 2}},
        train=dataclasses.replace(cfg.train, head="ecrl", epochs=2, runs_root=str(tmp_path)),
    )
    with pytest.raises(ConfigError, match="heads.ecrl.frame_epochs = 2 leaves no epoch of the second training step"):
        train(bad, store=store, progress=False, run_dir=tmp_path / "r")


def test_the_oracle_row_trains_on_the_unconfounded_split_and_gives_the_gap_closed(random_cache, tmp_path):
    """Also the `confounders` table's parts: every named confounder's ood split is evaluated, gets its gap
    closed, and the same-set pairs' order confusion is reported (checked against the saved predictions)."""
    from tests.train.random_cache import ACTIVITIES, RandomWorld, write_random_cache
    from train.ablate import Cell, MissingSplit, gap_closed, ood_gaps, run_table
    from train.config import AblationTable
    from train.engine import run_predictions
    from train.stats import Replicates

    cfg, store = random_cache
    table = AblationTable(rows=("baseline", "oracle"), tasks=("activity", "atomic"), seeds=1, order_confusion=True)
    plain = dataclasses.replace(
        cfg, ablations={"bounds": table}, train=dataclasses.replace(cfg.train, epochs=1, runs_root=str(tmp_path))
    )
    with pytest.raises(MissingSplit, match="has no train_oracle split; render it with synthetic.videos.train_oracle"):
        run_table(plain, "bounds", store=store, progress=False)
    ood = ("test_ood", "test_ood_cooccur", "test_ood_distractor", "test_ood_scene")
    videos = {"train": 16, "test_iid": 8, "train_oracle": 16, **dict.fromkeys(ood, 8)}
    oracle_store = write_random_cache(tmp_path / "cache", RandomWorld(videos=videos)).store
    cfg = plain
    result = run_table(cfg, "bounds", store=oracle_store, progress=False)
    runs = {p.parent.name for p in (tmp_path / "ablations").rglob("last.pt")}
    assert runs == {f"baseline{o}-{t}-s0" for o in ("", "-train_oracle") for t in ("activity", "atomic")}
    primary = {(c.task, c.split) for c in result.cells if c.metric in ("acc1", "map")}
    assert primary == {(t, s) for t in ("activity", "atomic") for s in ("test_iid", *ood)}
    # the order confusion: activity only, on the videos of the same-set pairs, as counted from the predictions
    assert {(c.task, c.split) for c in result.cells if c.metric == "order"} == {
        ("activity", s) for s in ("test_iid", *ood)
    }
    scores, labels, _ = run_predictions(
        next((tmp_path / "ablations").rglob("baseline-activity-s0")), "test_ood", oracle_store
    )
    names = list(ACTIVITIES)  # by hand: the store's one same-set pair, tea <-> tea_reversed
    partner = np.full(len(names), -1)
    partner[names.index("tea")], partner[names.index("tea_reversed")] = names.index("tea_reversed"), names.index("tea")
    paired = partner[labels] >= 0
    cell = next(
        c for c in result.cells if (c.row, c.task, c.split, c.metric) == ("baseline", "activity", "test_ood", "order")
    )
    assert paired.any() and cell.values == [pytest.approx(np.mean(scores[paired].argmax(1) == partner[labels[paired]]))]
    assert cell.diff is not None and cell.diff.estimate == 0.0  # the reference row against itself
    assert "activity order confusion test_ood" in result.files[0].read_text()
    oracle_run = next((tmp_path / "ablations").rglob("baseline-train_oracle-activity-s0"))
    saved = torch.load(oracle_run / "last.pt", weights_only=True)
    assert saved["config"]["train"]["train_split"] == "train_oracle"
    assert not (oracle_run / "predictions-train_oracle.npz").exists()  # a training split is never evaluated
    md = result.files[0].read_text()
    assert repr(result.gap) == repr(ood_gaps(result.cells))  # repr: an unstable gap's NaN bounds compare equal
    for task, split in {(t, s) for _, t, s in result.gap}:  # defined unless the oracle is not above the baseline
        assert result.gap[("baseline", task, split)].estimate == 0.0
        assert result.gap[("oracle", task, split)].estimate == pytest.approx(1.0)
        assert f"{task} gap closed ({split})" in md
    assert repr(gap_closed(result.cells)) == repr({(r, t): v for (r, t, s), v in result.gap.items() if s == "test_ood"})
    assert f"Holm's correction over the table's {result.family} Δ cells" in md
    # the family: every Δ cell of the non-reference rows; a star is a Holm-adjusted p below 0.05
    family = [c for c in result.cells if c.diff is not None and c.row != result.reference]
    assert result.family == len(family) and all(c.p_holm >= c.diff.p for c in family)

    # by hand: the share of the ood gap a row closes, with Fieller's interval where the gap is resolved
    rng = np.random.default_rng(0)

    def cell(row, split, per_seed, spread=1e-4):
        per_seed = np.array(per_seed)
        rep = Replicates(per_seed, per_seed.mean() + spread * rng.standard_normal(400))
        return Cell(row, "atomic", split, "map", per_seed.tolist(), rep=rep)

    cells = [
        cell(r, "test_ood", v) for r, v in (("baseline", [0.3, 0.31]), ("oracle", [0.7, 0.71]), ("x", [0.4, 0.41]))
    ]
    g = gap_closed(cells)[("x", "atomic")]
    assert g.estimate == pytest.approx(0.25) and g.status == "resolved" and g.low < 0.25 < g.high
    scene = [
        cell(r, "test_ood_scene", v) for r, v in (("baseline", [0.2] * 2), ("oracle", [0.6] * 2), ("x", [0.5] * 2))
    ]
    iid = [cell(r, "test_iid", [0.9, 0.9]) for r in ("baseline", "oracle", "x")]
    gaps = ood_gaps(cells + scene + iid)  # every ood split, never test_iid
    assert gaps[("x", "atomic", "test_ood")].estimate == pytest.approx(0.25)
    assert gaps[("x", "atomic", "test_ood_scene")].estimate == pytest.approx(0.75)
    assert {s for _, _, s in gaps} == {"test_ood", "test_ood_scene"}
    # no gap to close: the oracle at or below the baseline
    below = [
        cell(r, "test_ood_cooccur", v) for r, v in (("baseline", [0.6] * 2), ("oracle", [0.5] * 2), ("x", [0.7] * 2))
    ]
    assert ("x", "atomic", "test_ood_cooccur") not in ood_gaps(cells + below)
    # a gap the seeds do not resolve (the oracle's two seeds straddle the baseline's): unstable, no interval
    noisy = [cell(r, "test_ood", v) for r, v in (("baseline", [0.3, 0.31]), ("oracle", [0.2, 0.8]), ("x", [0.4, 0.41]))]
    g = gap_closed(noisy)[("x", "atomic")]
    assert g.status == "unstable" and np.isnan(g.low) and g.estimate == pytest.approx(0.1 / 0.195)


def test_a_run_saved_before_an_option_existed_is_read_as_what_it_computed_then():
    """ablate's reuse check: a saved options dict without `ivc_form` (runs before the front-door form) was
    computed as `residual` (its `predating` value), so it matches the residual row and not today's default;
    a key without `predating` counts as its default."""
    from extract.contract.config import to_dict
    from train.ablate import _same
    from train.heads.pcmci import PCMCIOptions

    saved = {k: v for k, v in to_dict(PCMCIOptions()).items() if k not in ("ivc_form", "sinkhorn_grad")}
    saved["sinkhorn_grad"] = "last_step"  # recorded explicitly, as every run after the option does
    assert not _same(saved, PCMCIOptions())  # today's default: front_door
    assert _same(saved, PCMCIOptions(ivc_form="residual", sinkhorn_grad="last_step"))
    without_tol = {k: v for k, v in saved.items() if k != "sinkhorn_tol"}  # no `predating`: its default
    assert _same(without_tol, PCMCIOptions(ivc_form="residual", sinkhorn_grad="last_step"))
    assert not _same(without_tol, PCMCIOptions(ivc_form="residual", sinkhorn_grad="last_step", sinkhorn_tol=1e-3))


def test_a_dictionary_built_before_the_store_changed_is_refused(random_cache, tmp_path):
    """Each dictionary records its split's finished rows when it was built; once the store finishes other rows of
    that split (a video extracted again, or lost), training refuses it with a sentence instead of reading it."""
    import shutil

    import zarr

    from extract.contract import schema

    cfg, store = random_cache
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    reader = CacheReader(copy, "activity")
    assert len(reader.context().dictionaries) == 8  # as written: fresh
    train_rows = reader.info.split_indices("train")
    done = zarr.open_array(str(copy / schema.DONE), mode="r+")
    done[int(train_rows[0])] = False  # the store's finished rows of the split change after the build
    with pytest.raises(CacheError, match=r"dictionary '.+' was built from other finished videos of split 'train'"):
        CacheReader(copy, "activity", allow_partial=True).context()


def test_a_run_without_a_store_finds_the_one_its_stage_1_sections_point_to(random_cache, tmp_path):
    """No --store: stage 2 reads the pointer `ltar extract` writes under cache.root, keyed by the config's stage-1
    sections (extract/contract/locate.py); none for other sections is a sentence, and a store whose video file
    changed since its row was written is refused."""
    import shutil

    import zarr

    from extract.contract.locate import write_pointer

    cfg, store = random_cache
    root = tmp_path / "cache"
    copy = root / cfg.dataset.name / store.name
    shutil.copytree(store, copy)
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=str(root)))
    cfg = with_train(cfg, epochs=1, runs_root=str(tmp_path / "runs"))
    with pytest.raises(CacheError, match="no cache store recorded in .*or pass --store"):
        train(cfg, progress=False)
    write_pointer(cfg, copy, "cpu", "a test")
    run = train(cfg, progress=False).run_dir
    assert torch.load(run / "last.pt", weights_only=True)["store"] == str(copy)
    frames = dataclasses.replace(cfg.frames, num_frames=cfg.frames.num_frames * 2)
    other = dataclasses.replace(cfg, frames=frames)  # other stage-1 sections: no store recorded for them
    with pytest.raises(CacheError, match="no cache store recorded"):
        train(with_train(other, runs_root=str(tmp_path / "other")), progress=False)
    video = tmp_path / "video.mp4"
    video.write_bytes(b"frames")
    group = zarr.open_group(str(copy), mode="r+")
    vid = group.attrs["video_ids"][0]
    group.attrs.update(file_paths={vid: str(video)}, file_stamps={vid: [6, video.stat().st_mtime_ns]})
    train(with_train(cfg, runs_root=str(tmp_path / "same")), progress=False)  # the file as its row was written
    video.write_bytes(b"other frames")
    with pytest.raises(CacheError, match=f"1 video file\\(s\\) changed since they were extracted \\(first: {vid}\\)"):
        train(with_train(cfg, runs_root=str(tmp_path / "changed")), progress=False)
    assert not (tmp_path / "changed").exists() or not any((tmp_path / "changed").rglob("*.pt"))
