"""The fast table paths of `ltar ablate` (seeds stacked, train/stacked.py; runs in worker processes,
`train.workers`, or as dask tasks, `train.scheduler`) against the one-at-a-time path they stand beside."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from extract.contract.config import from_dict, to_dict
from train.engine import train
from train.stacked import NotStackable, clip_per_seed, train_stacked

REPO = Path(__file__).resolve().parents[2]
HEADS = ("baseline", "cmdcl", "pcmci", "ecrl")
# PCMCI's default ICH keeps dataset-level strata updated in the forward pass (not stackable, tested below); its
# other stages stack, checked with the memoryless ICH form
STACKABLE = {"pcmci": {"ich_form": "mean_vp"}}


def _cfgs(cfg, head: str, seeds=(0, 1), epochs: int = 3, dropout: float = 0.0, **heads):
    data = to_dict(cfg)
    data["heads"] = {head: {"dropout": dropout, **heads}}
    data["train"].update(head=head, epochs=epochs, eval_every=1)
    base = from_dict(data)
    return [replace(base, train=replace(base.train, seed=s)) for s in seeds]


@pytest.mark.parametrize("head", HEADS)
def test_stacked_seeds_equal_one_at_a_time_without_dropout(random_cache, tmp_path, head):
    """Without dropout the two paths compute the same thing: each seed's own init, data order, gradient
    (clipped on its own), AdamW state; only the floating-point order of the batched kernels differs."""
    cfg, store = random_cache
    cfgs = _cfgs(cfg, head, **STACKABLE.get(head, {}))
    seq = [train(c, store=store, progress=False, run_dir=tmp_path / f"seq{c.train.seed}") for c in cfgs]
    stacked = train_stacked(cfgs, store, [tmp_path / f"st{c.train.seed}" for c in cfgs])
    for a, b in zip(seq, stacked, strict=True):
        assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-4)
        ka = torch.load(a.run_dir / "last.pt", weights_only=True)
        kb = torch.load(b.run_dir / "last.pt", weights_only=True)
        assert kb["stacked_seeds"] == [0, 1] and "stacked_seeds" not in ka
        for name, w in ka["state_dict"].items():
            torch.testing.assert_close(kb["state_dict"][name], w, atol=2e-3, rtol=1e-3, msg=name)
        assert ka["optimizer"]["state"].keys() == kb["optimizer"]["state"].keys()
        for i, st in ka["optimizer"]["state"].items():  # the seed's own Adam moments, in the one-seed layout
            torch.testing.assert_close(
                kb["optimizer"]["state"][i]["exp_avg_sq"], st["exp_avg_sq"], atol=1e-6, rtol=1e-2
            )
            assert float(kb["optimizer"]["state"][i]["step"]) == float(st["step"])
        for split in a.metrics:
            assert a.metrics[split] == pytest.approx(b.metrics[split], abs=1e-6), split
        assert (b.run_dir / "predictions-test_ood.npz").exists() and (b.run_dir / "metrics.csv").exists()


def test_stacked_seeds_differ_in_dropout_and_resume_to_the_same_bytes(random_cache, tmp_path, monkeypatch):
    """With dropout each seed draws its own masks (the seeds' runs differ from the sequential ones, not from
    each other in kind); a stacked run killed after an epoch resumes, stacked, to the uninterrupted bytes."""
    import train.stacked as stacked_mod

    cfg, store = random_cache
    cfgs = _cfgs(cfg, "baseline", dropout=0.3)
    full = train_stacked(cfgs, store, [tmp_path / f"full{c.train.seed}" for c in cfgs])
    dirs = [tmp_path / f"cut{c.train.seed}" for c in cfgs]
    real, calls = stacked_mod.end_epoch, []

    def end_then_die(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == len(cfgs):  # every seed's epoch 0 is written
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(stacked_mod, "end_epoch", end_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_stacked(cfgs, store, dirs)
    monkeypatch.setattr(stacked_mod, "end_epoch", real)
    resumed = train_stacked(cfgs, store, dirs)
    for a, b in zip(full, resumed, strict=True):
        ka = torch.load(a.run_dir / "last.pt", weights_only=True)["state_dict"]
        kb = torch.load(b.run_dir / "last.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(ka[n], kb[n]) for n in ka)
    one = torch.load(full[0].run_dir / "last.pt", weights_only=True)["state_dict"]
    two = torch.load(full[1].run_dir / "last.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(one[n], two[n]) for n in one)  # two seeds, two models


def test_a_stacked_checkpoint_continues_one_at_a_time(random_cache, tmp_path, monkeypatch):
    """Each seed's checkpoint is an ordinary run's: a stacked run stopped after its second of three epochs is
    resumed by the sequential path (its optimizer state loads) to the end of its own schedule."""
    import train.stacked as stacked

    cfg, store = random_cache
    cfgs = _cfgs(cfg, "ecrl", epochs=3)
    dirs = [tmp_path / f"s{c.train.seed}" for c in cfgs]
    real = stacked.end_epoch

    def stops_after_epoch_1(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[9]["epoch"] == 1 and args[8] == dirs[-1]:  # row, run_dir: every seed's epoch 1 is written
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(stacked, "end_epoch", stops_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_stacked(cfgs, store, dirs)
    monkeypatch.undo()
    res = train(cfgs[1], store=store, resume=True, progress=False, run_dir=dirs[1])
    assert [h["epoch"] for h in res.history] == [0, 1, 2] and res.steps_run == res.steps // 3


def test_what_cannot_stack_says_why(random_cache, tmp_path):
    cfg, store = random_cache
    memory = _cfgs(cfg, "cmdcl", tci_form="memory")
    with pytest.raises(NotStackable, match="dataset-level memory"):
        train_stacked(memory, store, [tmp_path / f"m{c.train.seed}" for c in memory])
    strata = _cfgs(cfg, "pcmci")  # the default ICH's strata H̄
    with pytest.raises(NotStackable, match="dataset-level memory"):
        train_stacked(strata, store, [tmp_path / f"p{c.train.seed}" for c in strata])
    other = _cfgs(cfg, "baseline")
    other[1] = replace(other[1], train=replace(other[1].train, lr=0.5))
    with pytest.raises(NotStackable, match="more than their seed"):
        train_stacked(other, store, [tmp_path / f"o{c.train.seed}" for c in other])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_clip_per_seed_equals_clip_grad_norm_on_each_seed():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, 5, generator=g) * 3, torch.randn(3, 7, generator=g) * torch.tensor([[0.01], [1], [5]])]
    expect = []
    for s in range(3):
        ps = [torch.nn.Parameter(torch.zeros_like(x[s])) for x in grads]
        for p, x in zip(ps, grads, strict=True):
            p.grad = x[s].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        expect.append([p.grad for p in ps])
    clip_per_seed(grads, 1.0)
    for s in range(3):
        for x, e in zip(grads, expect[s], strict=True):
            torch.testing.assert_close(x[s], e)


def test_ablate_stacks_the_seeds_of_a_row_and_falls_back_for_the_rest(random_cache, tmp_path):
    from train.ablate import run_table

    cfg, store = random_cache
    data = to_dict(cfg)
    data["train"].update(runs_root=str(tmp_path / "runs"), epochs=2, stack_seeds=True)
    data["ablations"] = {"t": {"rows": ["cmdcl", "cmdcl:tci_memory"], "tasks": ["activity"], "seeds": 2}}
    res = run_table(from_dict(data), "t", store=store, progress=False)
    assert res.runs == 4 and res.files[0].exists()
    ckpts = {p.parent.name: torch.load(p, weights_only=True) for p in (tmp_path / "runs").rglob("last.pt")}
    assert len(ckpts) == 4
    assert all(("stacked_seeds" in c) == ("tci_memory" not in name) for name, c in ckpts.items())


def test_sequential_switch_keeps_one_run_at_a_time(random_cache, tmp_path):
    """`train.stack_seeds: false` (the default) is the path the tables used before: its runs equal plain `train`
    runs bitwise, also with the splits read once per table."""
    from train.ablate import run_table

    cfg, store = random_cache
    data = to_dict(cfg)
    data["train"].update(runs_root=str(tmp_path / "runs"), epochs=2, stack_seeds=False)
    data["ablations"] = {"t": {"rows": ["baseline"], "tasks": ["activity"], "seeds": 2}}
    run_table(from_dict(data), "t", store=store, progress=False)
    plain = replace(from_dict(data), train=replace(from_dict(data).train, seed=1))
    ref = train(plain, store=store, progress=False, run_dir=tmp_path / "plain")
    got = next((tmp_path / "runs").rglob("baseline-activity-s1/last.pt"))
    a = torch.load(got, weights_only=True)
    b = torch.load(ref.run_dir / "last.pt", weights_only=True)
    assert "stacked_seeds" not in a
    assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in b["state_dict"])


def test_worker_processes_train_the_runs_of_one_at_a_time_at_their_thread_count(random_cache, tmp_path):
    """`train.workers: 2`: every run (dropout on) equals bitwise a plain `train` run at the worker's thread
    count; finished runs are reused on a second call; with `stack_seeds` a worker trains a row's seeds stacked."""
    from train.ablate import run_table

    cfg, store = random_cache
    data = to_dict(cfg)
    data["train"].update(runs_root=str(tmp_path / "runs"), epochs=2, workers=2)
    data["ablations"] = {"t": {"rows": ["baseline", "cmdcl"], "tasks": ["activity"], "seeds": 2}}
    table = from_dict(data)
    res = run_table(table, "t", store=store, progress=False)
    assert res.runs == 4 and res.files[0].exists()
    threads = max(1, torch.get_num_threads() // 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for head in ("baseline", "cmdcl"):
            plain = replace(table, train=replace(table.train, head=head, seed=1, workers=1))
            ref = train(plain, store=store, progress=False, run_dir=tmp_path / f"plain-{head}")
            a = torch.load(next((tmp_path / "runs").rglob(f"{head}-activity-s1/last.pt")), weights_only=True)
            b = torch.load(ref.run_dir / "last.pt", weights_only=True)
            assert a["history"] == b["history"]
            assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in b["state_dict"])
    finally:
        torch.set_num_threads(before)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("last.pt")}
    again = run_table(table, "t", store=store, progress=False)  # finished runs are reused, not retrained
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [c.values for c in again.cells] == [c.values for c in res.cells]

    data["train"].update(runs_root=str(tmp_path / "stacked"), stack_seeds=True)
    run_table(from_dict(data), "t", store=store, progress=False)
    ckpts = [torch.load(p, weights_only=True) for p in (tmp_path / "stacked").rglob("last.pt")]
    assert len(ckpts) == 4 and all(c["stacked_seeds"] == [0, 1] for c in ckpts)


def test_a_failing_run_in_a_worker_is_reported_and_the_others_finish(random_cache, tmp_path):
    """`train.workers: 2`, one run's folder held by another host: that run fails with its sentence, the other seed
    trains to its last epoch, and the table raises one RunError naming the failed run."""
    from train.ablate import run_table
    from train.data import CacheReader
    from train.engine import RunError

    cfg, store = random_cache
    data = to_dict(cfg)
    data["train"].update(runs_root=str(tmp_path / "runs"), epochs=2, workers=2)
    data["ablations"] = {"t": {"rows": ["baseline"], "tasks": ["activity"], "seeds": 2}}
    table = from_dict(data)
    held = tmp_path / "runs" / "ablations" / CacheReader(store, "activity").fingerprint / "baseline-activity-s0"
    held.mkdir(parents=True)
    (held / "ltar.lock").write_text('{"host": "elsewhere", "pid": 1, "pid_start": 0}')  # held by another host
    with pytest.raises(RunError, match=r"table t: 1 of 2 runs failed \(baseline-activity-s0: .* another run") as e:
        run_table(table, "t", store=store, progress=False)
    assert "s1:" not in str(e.value) and not (held / "last.pt").exists()
    other = torch.load(held.parent / "baseline-activity-s1" / "last.pt", weights_only=True)
    assert other["epoch"] == 1  # the other run finished (epochs=2)


RUN_FILES = ("metrics.jsonl", "metrics.csv", "predictions-test_iid.npz", "predictions-test_ood.npz")


@pytest.fixture(scope="module")
def dask_table(random_cache, tmp_path_factory):
    """The table rows baseline, cmdcl and ecrl (seeds 0 and 1) trained as dask tasks on `local:2`, where ecrl's
    options make its runs raise in the worker (`frame_epochs` = `epochs`: no epoch left for its second step)."""
    import train.main  # noqa: F401  (the console script registers stage 1's dask task farm, as `ltar` does)
    from train.ablate import run_table
    from train.engine import RunError

    cfg, store = random_cache
    tmp = tmp_path_factory.mktemp("dask")
    data = to_dict(cfg)
    data["train"].update(runs_root=str(tmp / "runs"), epochs=2, scheduler="local:2")
    data["heads"] = {"ecrl": {"frame_epochs": 2}}
    data["ablations"] = {"t": {"rows": ["baseline", "cmdcl", "ecrl"], "tasks": ["activity"], "seeds": 2}}
    table = from_dict(data)
    with pytest.raises(RunError) as e:
        run_table(table, "t", store=store, progress=False)
    return table, store, tmp, str(e.value)


def test_a_run_on_dask_is_the_same_bytes_as_alone_in_process(dask_table, tmp_path):
    """`--scheduler local:2`: each worker trains with cores // 2 torch threads; a run trained alone in this
    process at that thread count writes the same bytes of metrics and predictions."""
    table, store, tmp, _ = dask_table
    threads = max(1, (os.cpu_count() or 1) // 2)  # extract.scale.connect's share for local:2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for head in ("baseline", "cmdcl"):
            alone = replace(table, train=replace(table.train, head=head, seed=1, scheduler=None))
            ref = train(alone, store=store, progress=False, run_dir=tmp_path / head)
            got = next((tmp / "runs").rglob(f"{head}-activity-s1"))
            for name in RUN_FILES:
                assert (got / name).read_bytes() == (ref.run_dir / name).read_bytes(), f"{head}: {name}"
    finally:
        torch.set_num_threads(before)


def test_a_failing_row_on_dask_is_reported_the_others_finish_and_a_rerun_trains_only_it(dask_table):
    """ecrl's runs fail in the workers: the table's error names both with their sentence, baseline's and cmdcl's
    runs are finished; with the cause fixed, the table run again (in process) trains ecrl alone and writes its
    cells in the table's row order."""
    from train.ablate import run_table

    table, store, tmp, error = dask_table
    assert error.startswith("table t: 2 of 6 runs failed (")
    assert "ecrl-activity-s0" in error and "ecrl-activity-s1" in error and "baseline-activity" not in error
    assert "heads.ecrl.frame_epochs = 2 leaves no epoch of the second training step" in error
    assert "fix the cause and run the table again to train only the failed runs" in error
    done = {p.parent.name: p for p in (tmp / "runs").rglob("last.pt")}
    assert sorted(done) == [f"{h}-activity-s{s}" for h in ("baseline", "cmdcl") for s in (0, 1)]
    stamps = {p: p.stat().st_mtime_ns for p in done.values()}
    fixed = replace(table, heads={"ecrl": {"frame_epochs": 0}}, train=replace(table.train, scheduler=None))
    res = run_table(fixed, "t", store=store, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not retrained
    assert list(dict.fromkeys(c.row for c in res.cells)) == ["baseline", "cmdcl", "ecrl"]
    md = res.files[0].read_text()
    assert md.index("| baseline |") < md.index("| cmdcl |") < md.index("| ecrl |")


def test_a_bad_scheduler_is_a_sentence(random_cache, tmp_path):
    """`ltar ablate --scheduler` with neither local:N nor an address: exit 2 and the sentence, nothing trained."""
    from typer.testing import CliRunner

    from train.main import app

    cfg, store = random_cache
    sets = [f"dataset.name={cfg.dataset.name}", f"dataset.root={cfg.dataset.root}", f"cache.root={cfg.cache.root}"]
    sets += [f"train.runs_root={tmp_path / 'runs'}"]
    common = ["--config", str(REPO / "pipeline.yaml"), "--store", str(store), *[a for s in sets for a in ("--set", s)]]
    runner = CliRunner()
    for bad, said in [
        ("nope", "--scheduler 'nope' is neither local:N nor a scheduler address such as tcp://host:8786"),
        ("local:0", "local:N needs a number of workers N >= 1"),
    ]:
        res = runner.invoke(app, ["-q", "ablate", "--table", "main", "--seeds", "1", "--scheduler", bad, *common])
        assert res.exit_code == 2, res.output
        assert said in res.output and "(train.scheduler; null trains without dask)" in res.output
    assert not list(tmp_path.rglob("last.pt"))


def test_amp_dtype_decides_autocast_the_scaler_and_stacking(random_cache):
    """AMP is a CUDA option: bf16 (the default) autocasts without a loss scaler and stacks; float16 keeps its
    GradScaler and is the one form stacking refuses, with the reason; the CPU runs fp32 either way."""
    from train.engine import autocast_dtype, grad_scaler
    from train.stacked import stack_reason

    cfg, _ = random_cache
    tc = cfg.train
    assert autocast_dtype(tc, "cuda") is torch.bfloat16 and autocast_dtype(tc, "cuda:1") is torch.bfloat16
    assert autocast_dtype(replace(tc, amp_dtype="float16"), "cuda") is torch.float16
    assert autocast_dtype(tc, "cpu") is None and autocast_dtype(replace(tc, amp=False), "cuda") is None
    assert not grad_scaler(torch.bfloat16).is_enabled() and not grad_scaler(None).is_enabled()
    model = torch.nn.Linear(2, 2)
    assert stack_reason(cfg, model, "cuda") is None  # bf16 AMP: the seeds stack
    fp16 = replace(cfg, train=replace(tc, amp_dtype="float16"))
    assert "train.amp_dtype float16 on CUDA" in stack_reason(fp16, model, "cuda")
    assert stack_reason(fp16, model, "cpu") is None  # no AMP on the CPU


def test_stacked_seeds_under_bf16_autocast_equal_one_at_a_time(random_cache, tmp_path, monkeypatch):
    """The AMP path on the CPU (its bf16 autocast is the same code with another device kind): with the run's
    autocast forced to bf16, the stacked step and the one-at-a-time step agree per seed to bf16's tolerance, and
    both differ from fp32 (the autocast is on)."""
    import train.engine as engine
    import train.stacked as stacked

    cfg, store = random_cache
    cfgs = _cfgs(cfg, "baseline")
    fp32 = train(cfgs[0], store=store, progress=False, run_dir=tmp_path / "fp32")
    bf16 = lambda tc, device: torch.bfloat16  # noqa: E731
    monkeypatch.setattr(engine, "autocast_dtype", bf16)
    monkeypatch.setattr(stacked, "autocast_dtype", bf16)
    seq = [train(c, store=store, progress=False, run_dir=tmp_path / f"seq{c.train.seed}") for c in cfgs]
    both = train_stacked(cfgs, store, [tmp_path / f"st{c.train.seed}" for c in cfgs])
    loss = lambda r: [h["loss"] for h in r.history]  # noqa: E731
    assert loss(seq[0]) != pytest.approx(loss(fp32), rel=1e-4)  # bf16 arithmetic, not fp32, on both paths
    assert loss(both[0]) != pytest.approx(loss(fp32), rel=1e-4)
    for a, b in zip(seq, both, strict=True):
        assert loss(a) == pytest.approx(loss(b), rel=5e-3)  # measured: 1.3e-3 after 3 epochs
        ka = torch.load(a.run_dir / "last.pt", weights_only=True)["state_dict"]
        kb = torch.load(b.run_dir / "last.pt", weights_only=True)["state_dict"]
        for name, w in ka.items():
            torch.testing.assert_close(kb[name], w, atol=2e-2, rtol=2e-2, msg=name)  # measured: max 6.5e-3


def test_a_checkpoint_from_before_amp_dtype_resumes_as_it_trained(random_cache, tmp_path):
    """Checkpoints from before `train.amp_dtype` have no such key and a "scaler" state: an empty one (no scaler ran:
    CPU) resumes under today's default; a live one (float16 AMP on CUDA) is read as float16, so resuming it under
    bfloat16 is refused with the key named, and under float16 continues. A checkpoint without "scaler" loads."""
    from train.engine import RunError

    cfg, store = random_cache
    run = _cfgs(cfg, "baseline", epochs=2)[0]
    steps = train(run, store=store, progress=False, run_dir=tmp_path / "probe").steps // 2  # one epoch

    def stopped(name: str, **edit) -> Path:
        """A run stopped after its first epoch, its checkpoint edited to look older."""
        train(run, store=store, progress=False, run_dir=tmp_path / name, max_steps=steps)
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        del ckpt["config"]["train"]["amp_dtype"]
        ckpt.pop("scaler")
        torch.save({**ckpt, **edit}, tmp_path / name / "last.pt")
        return tmp_path / name

    done = train(run, store=store, resume=True, progress=False, run_dir=stopped("no-scaler"))
    assert [h["epoch"] for h in done.history] == [0, 1]
    train(run, store=store, resume=True, progress=False, run_dir=stopped("cpu", scaler={}))
    live = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    fp16 = stopped("fp16", scaler=live)
    with pytest.raises(RunError, match="train.amp_dtype differ"):
        train(run, store=store, resume=True, progress=False, run_dir=fp16)
    as_trained = replace(run, train=replace(run.train, amp_dtype="float16"))
    assert [h["epoch"] for h in train(as_trained, store=store, resume=True, progress=False, run_dir=fp16).history] == [
        0,
        1,
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_seeds_train_with_amp_on_cuda(random_cache, tmp_path):
    """On CUDA with `train.amp` on (bf16, the default) the seeds stack, and agree with one-at-a-time runs per seed."""
    cfg, store = random_cache
    cfgs = [replace(c, train=replace(c.train, device="cuda")) for c in _cfgs(cfg, "baseline")]
    seq = [train(c, store=store, progress=False, run_dir=tmp_path / f"seq{c.train.seed}") for c in cfgs]
    both = train_stacked(cfgs, store, [tmp_path / f"st{c.train.seed}" for c in cfgs])
    for a, b in zip(seq, both, strict=True):
        assert torch.load(b.run_dir / "last.pt", weights_only=True)["stacked_seeds"] == [0, 1]
        assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=2e-2)
