"""The seeds of one table row trained as one stacked model: PyTorch's model-ensembling idiom.

`ltar ablate` trains rows × tasks × seeds from one cache. The heads are small, so on a CPU (and on a GPU, in
kernel launches) a step costs mostly per-operator overhead, not arithmetic; S seeds of one row share the same
operators and differ only in their numbers. `train_stacked` therefore builds each seed's model exactly as
`train.engine.train` does (its own seed, so its own initialisation), stacks their parameters and buffers
(`torch.func.stack_module_state`, a leading seed axis S), and runs one step for all of them with
`torch.func.vmap(functional_call(...))` over that axis:

- data: seed s draws its own batch order (the generator of (seed, epoch), as the sequential path) and the S
  batches go in as one (S, B, ...) input;
- loss: Σ_s loss_s, so each seed's parameters get exactly its own gradient;
- dropout: `randomness="different"`, an independent mask per seed (drawn from the process generator, so not
  the sequential path's masks: the one difference from it, and why the two agree in distribution, not bitwise);
- gradient clipping per seed (its own norm over its own parameters, as `clip_grad_norm_`); AdamW / Adam are
  elementwise, so one optimizer over the stacked tensors is S independent optimizers;
- AMP on CUDA: the same autocast as the sequential path (`train.engine.autocast_dtype`), bf16 by default, which
  needs no loss scaling, so the seeds stay independent;
- the step losses stay on the device (no host sync per step): one transfer per epoch for the logged losses, and
  every POSTFIX_EVERY steps for a shown progress bar, as the sequential path;
- evaluation, metrics, `last.pt` / `best.pt` per seed, in the seed's own run folder, written by the same
  `end_epoch` as the sequential path; each checkpoint holds the seed's own weights and optimizer state, so
  `ltar train --resume`, `ltar evaluate` and `ltar diagnose` read it as any other run's.

Not stackable, so trained one at a time (`NotStackable` says why, and the caller falls back): heads with a
dataset-level memory updated in the forward pass (`memory_updates`: a buffer written inside vmap would be
lost), grounding interventions (their custom autograd functions and batch permutations), float16 AMP on CUDA
(`train.amp_dtype: float16`: one GradScaler would skip every seed's step when one overflows), a set of seeds whose
checkpoints stand at different epochs.

Measured (bench/train.py, the main table's 4 rows × 3 seeds × 30 epochs on the demo-size cache, 2 CPU cores):
today's path 161.0 s, the splits read once per table 149.3 s (0.93), stacked 161.6 s (1.00); a second run
169.6 s, 155.6 s (0.92), 160.2 s (0.94) (the machine's run-to-run spread is about 5 %). The premise
fails on this CPU: a head's step is arithmetic-bound, not overhead-bound (matmuls are 28-47 % of a step's
self time, dropout's Bernoulli draws another 24 % in the baseline), and the stacked step of 3 seeds costs
3.5× one seed's (vmap turns each Linear into a `bmm` running at about half `mm`'s speed, and CPU attention has
no batching rule, so it loops over the seeds). Hence `train.stack_seeds: false` by default; on a GPU, where
these heads are launch-bound, it is the lever to measure first (no GPU was lent when this was written).
Agreement with the one-at-a-time path: without dropout every head's per-seed losses, weights, Adam moments
and metrics equal it to float tolerance (tests/train/test_stacked.py); with dropout the masks differ, drawn from
the same distribution.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from extract.contract.config import Config, ConfigError, write_resolved
from train.data import iterate_batches
from train.engine import (
    POSTFIX_EVERY,
    RunError,
    RunResult,
    _eval_splits,
    _load,
    autocast,
    autocast_dtype,
    end_epoch,
    find_store,
    loss_fn,
    make_optimizer,
    new_model,
    read_checkpoint,
    resolve_device,
    run_name,
    schedule_lambda,
)
from train.heads import Batch, head_options

log = logging.getLogger(__name__)

FEATURE_KEYS = ("vp", "v", "fg", "bg", "mask", "labels")  # the per-seed tensors of a Batch


class NotStackable(RunError):
    """These seeds cannot train as one stacked model (the sentence says why); train them one at a time."""


def stack_reason(cfg: Config, model: torch.nn.Module, device: str) -> str | None:
    """Why `model` cannot train stacked (None: it can)."""
    if cfg.train.grounding:
        return f"grounding {cfg.train.grounding!r} (custom autograd functions and batch permutations)"
    if any(getattr(m, "memory_updates", False) for m in model.modules()):
        return "a dataset-level memory updated in the forward pass"
    if autocast_dtype(cfg.train, device) == torch.float16:
        return (
            "train.amp_dtype float16 on CUDA (its GradScaler would couple the seeds: one seed's overflow skips every "
            "seed's step); bfloat16 needs no scaler and stacks"
        )
    return None


def _unstack_optimizer(state: dict, s: int) -> dict:
    """Seed s's slice of a stacked optimizer's state_dict: the layout a one-seed optimizer loads."""
    per = {i: {k: (v if k == "step" else v[s].clone()) for k, v in st.items()} for i, st in state["state"].items()}
    return {"state": per, "param_groups": copy.deepcopy(state["param_groups"])}


def _stack_optimizer(states: list[dict]) -> dict:
    """The stacked optimizer state of S one-seed state_dicts (the inverse of `_unstack_optimizer`)."""
    stacked = {
        i: {k: (v if k == "step" else torch.stack([sd["state"][i][k] for sd in states])) for k, v in st.items()}
        for i, st in states[0]["state"].items()
    }
    return {"state": stacked, "param_groups": copy.deepcopy(states[0]["param_groups"])}


def clip_per_seed(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` for each seed on its own: grads (S, ...) each; scales in place, returns the norms (S,)."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (S,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (S,)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


def train_stacked(
    cfgs: list[Config], store: Path | None, run_dirs: list[Path], progress: bool = False
) -> list[RunResult]:
    """Train the runs `cfgs` (equal but for `train.seed`) as one stacked model, each into its run folder."""
    from extract.contract.lock import StoreLocked, acquire_lock

    seeds = [c.train.seed for c in cfgs]
    if len({repr(_without_seed(c)) for c in cfgs}) != 1:
        raise NotStackable("the runs differ in more than their seed")
    try:
        with ExitStack() as stack:
            for run_dir in run_dirs:
                try:
                    kept = "its last checkpoint is kept; --resume continues it"
                    stack.enter_context(acquire_lock(run_dir, kind="training run", kept=kept))
                except StoreLocked as e:
                    raise RunError(str(e)) from None
            return _train_stacked(cfgs, seeds, store, run_dirs, progress)
    finally:
        for run_dir in run_dirs:  # runs that could not start leave no folder
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()


def _without_seed(cfg: Config):
    from dataclasses import replace

    return replace(cfg, train=replace(cfg.train, seed=0))


def _train_stacked(
    cfgs: list[Config], seeds: list[int], store: Path | None, run_dirs: list[Path], progress: bool
) -> list[RunResult]:
    from tqdm import tqdm

    from train.data import CacheReader

    t_start = time.perf_counter()
    cfg = cfgs[0]
    tc = cfg.train
    S = len(seeds)
    device = resolve_device(tc.device)
    store = find_store(cfg, store)
    reader = CacheReader(store, tc.task, num_frames=tc.num_frames)
    ctx = reader.context()
    frame_epochs = getattr(head_options(cfg, tc.head, tc.variant), "frame_epochs", 0)
    if frame_epochs >= tc.epochs:
        raise ConfigError(
            f"heads.{tc.head}.frame_epochs leaves no epoch of the second training step (train.epochs = {tc.epochs}): "
            "lower it or raise train.epochs"
        )
    ckpts = [
        read_checkpoint(d / "last.pt", map_location=device) if (d / "last.pt").exists() else None for d in run_dirs
    ]
    if any(c is not None for c in ckpts):
        epochs = {c["epoch"] if c is not None else None for c in ckpts}
        if len(epochs) != 1:
            raise NotStackable(f"the seeds' checkpoints stand at different epochs ({sorted(map(str, epochs))})")
        if any(c["fingerprint"] != reader.fingerprint for c in ckpts):
            raise RunError(f"{run_dirs[0]}: a checkpoint of these runs was trained on another cache")
    models = []
    for seed in seeds:  # each seed's initialisation exactly as the sequential path draws it
        models.append(new_model(cfg, ctx, seed).to(device))
    reason = stack_reason(cfg, models[0], device)
    if reason is not None:
        raise NotStackable(f"{run_name(cfg)}: {reason}")
    if tc.train_split not in reader.info.splits:
        raise ConfigError(f"train.train_split: the cache {store} has no split {tc.train_split!r}")
    train_data = _load(reader, tc.train_split, cfg, device)
    evals = {s: _load(reader, s, cfg, device) for s in _eval_splits(cfg, reader)}
    steps_per_epoch = math.ceil(len(train_data) / tc.batch_size)
    total = steps_per_epoch * tc.epochs

    start_epoch, step = 0, 0
    bests, histories = [-math.inf] * S, [[] for _ in range(S)]
    if ckpts[0] is not None:
        for model, ckpt in zip(models, ckpts, strict=True):
            model.load_state_dict(ckpt["state_dict"])
        start_epoch, step = ckpts[0]["epoch"] + 1, ckpts[0]["step"]
        bests, histories = [c["best"] for c in ckpts], [c["history"] for c in ckpts]
        torch.set_rng_state(ckpts[0]["rng"])
        log.info("resuming %d stacked seeds of %s at epoch %d", S, run_name(cfg), start_epoch)

    params, buffers = stack_module_state(models)  # name -> (S, ...) leaves
    trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]  # the sequential path's order
    for n, p in models[0].named_parameters():
        params[n].requires_grad_(p.requires_grad)
    opt = make_optimizer(tc, [params[n] for n in trainable])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(tc, steps_per_epoch, frame_epochs))
    if ckpts[0] is not None:
        opt.load_state_dict(_stack_optimizer([c["optimizer"] for c in ckpts]))
        sched.load_state_dict(ckpts[0]["scheduler"])
    template = copy.deepcopy(models[0]).to("meta")  # the module whose forward runs on the stacked weights
    t0_dev = ctx.t0.to(device)
    dicts = {k: (c.to(device), p.to(device)) for k, (c, p) in ctx.dictionaries.items()}

    def seed_loss(p, b, vp, v, fg, bg, mask, labels):  # one seed: its weights and its batch -> its loss
        batch = Batch(vp, v, fg, bg, mask, t0_dev, dicts, labels)
        logits = functional_call(template, (p, b), (batch,))  # (B, C)
        return loss_fn(logits, labels, ctx.multi_label)

    stacked_loss = vmap(seed_loss, randomness="different")
    dtype = autocast_dtype(tc, device)  # None on the CPU; never float16 here (stack_reason)
    for run_cfg, run_dir in zip(cfgs, run_dirs, strict=True):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(run_cfg, run_dir)
    relevance: dict = {}
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"{run_name(cfg)} ×{S} seeds", unit="step")
    phase = getattr(template, "set_epoch", None)
    for epoch in range(start_epoch, tc.epochs):
        template.train()
        if phase is not None:  # ECRL's two-step training: a function of the epoch, the same for every seed
            phase(epoch)
        gens = [torch.Generator().manual_seed(seed * 100_003 + epoch) for seed in seeds]  # each seed's data order
        streams = [iterate_batches(train_data, tc.batch_size, t0_dev, dicts, device, g) for g in gens]
        losses = []
        for batches in zip(*streams, strict=True):
            inputs = [torch.stack([getattr(b, k) for _, b in batches]) for k in FEATURE_KEYS]  # (S, B, ...)
            with autocast(device, dtype):
                loss = stacked_loss(params, buffers, *inputs)  # (S,)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            if tc.grad_clip > 0:
                clip_per_seed([params[n].grad for n in trainable if params[n].grad is not None], tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.detach())  # (S,) on the device: no host sync per step
            bar.update(1)
            if progress and step % POSTFIX_EVERY == 0:  # one sync every POSTFIX_EVERY steps for the bar
                bar.set_postfix(loss=f"{float(losses[-1].mean()):.3f}")
        per_step = torch.stack(losses).double().cpu().numpy()  # (steps, S): the epoch's one transfer
        per_seed = [float(np.mean(per_step[:, s])) for s in range(S)]  # each the sequential path's float64 mean
        last_epoch = epoch + 1 == tc.epochs
        opt_state = opt.state_dict()
        for s, (run_cfg, run_dir, model) in enumerate(zip(cfgs, run_dirs, models, strict=True)):
            with torch.no_grad():  # seed s's weights into its own module, for evaluation and its checkpoint
                for n, p in model.named_parameters():
                    p.copy_(params[n][s])
                for n, b in model.named_buffers():
                    b.copy_(buffers[n][s])
            if phase is not None:
                model.set_epoch(epoch)
            row = {"epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "loss": float(per_seed[s])}
            optim = (_unstack_optimizer(opt_state, s), sched.state_dict(), {})
            extra = {"stacked_seeds": seeds}
            bests[s] = end_epoch(
                run_cfg, model, reader, store, ctx, device, evals, relevance, run_dir, row, histories[s], bests[s],
                optim, last_epoch, extra,
            )  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - t_start
    results = []
    for run_dir, history in zip(run_dirs, histories, strict=True):
        final = history[-1] if history else {}
        metrics = {sp: {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{sp}/")} for sp in evals}
        results.append(RunResult(run_dir, metrics, seconds / S, step, history))
    return results
