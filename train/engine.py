"""Train and evaluate one head on the cache: AdamW or Adam, warm-up + cosine or step decay, AMP on GPU (bf16
autocast by default, no loss scaling; `train.amp_dtype: float16` adds a GradScaler), atomic checkpoints.

A run lives in `<runs_root>/<head>[-<variant>][+<grounding>][-f<frames>][-<train_split>][@<recipe>]-<task>-s<seed>/`:
`config.resolved.yaml`, `metrics.jsonl` and `metrics.csv` (one row per epoch and split), `last.pt` and
`best.pt` (written to a temporary file and renamed, so a kill never leaves a truncated checkpoint). `--resume` continues
from `last.pt` with the same data order and RNG state (CPU and CUDA generators) as an uninterrupted
run. A run folder takes one process at a time (`ltar.lock` inside it, as a store's).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extract.contract.config import Config, ConfigError, from_dict, to_dict, write_resolved
from extract.contract.schema import FRAME_MASK, CacheError
from train.data import CacheReader, SplitTensors, StreamedSplit, iterate_batches
from train.grounding import GROUND_KEYS, frame_relevance, grounding_options, grounding_scores, wrap
from train.heads import build_head, head_options, required_dictionaries
from train.heads.common import initialise
from train.metrics import compute_metrics, primary_metric

log = logging.getLogger(__name__)
POSTFIX_EVERY = 20  # training steps between progress-bar loss updates (each one a host sync on GPU)


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (a sentence saying what to do)."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # train.amp_dtype -> the autocast dtype


def autocast_dtype(tc, device: str) -> torch.dtype | None:
    """The dtype a run of `tc` (the train section) autocasts to on `device`: `amp_dtype` with `amp` on CUDA; None
    (fp32, no autocast) otherwise: AMP is a GPU option, CPU runs stay fp32."""
    if not tc.amp or not device.startswith("cuda"):
        return None
    return AMP_DTYPES[tc.amp_dtype]


def autocast(device: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`'s kind (cuda, cpu); off where `dtype` is None."""
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler of a run autocasting to `dtype`: live for float16 (its 5-bit exponent underflows small
    gradients), disabled otherwise (bfloat16 has fp32's exponent range; a disabled scaler passes steps through)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def run_name(cfg: Config) -> str:
    t = cfg.train
    variant, grounding = f"-{t.variant}" if t.variant else "", f"+{t.grounding}" if t.grounding else ""
    frames = f"-f{t.num_frames}" if t.num_frames is not None else ""  # a frames ablation keeps its own runs
    recipe = f"@{t.recipe}" if t.recipe is not None else ""  # a paper recipe's runs beside ours
    data = f"-{t.train_split}" if t.train_split != "train" else ""  # the oracle: trained on another split
    return f"{t.head}{variant}{grounding}{frames}{data}{recipe}-{t.task}-s{t.seed}"


def build_model(cfg: Config, ctx, head: str, variant: str | None, grounding: str | None) -> torch.nn.Module:
    """The registered head, behind its grounding intervention when one is named."""
    return wrap(build_head(head, cfg, ctx, variant), grounding_options(cfg, grounding), ctx, grounding or "")


# how a run's initial weights were drawn, kept in its checkpoint: `ltar ablate` never reuses a run drawn otherwise
# (before it, every module drew from one global stream in construction order)
INIT_SCHEME = "by-name"


def architecture(model: torch.nn.Module) -> str:
    """A digest of the model's parameter and buffer names and shapes: a run whose checkpoint holds another one was
    trained by another form of its head (a module added, moved or resized), and `ltar ablate` never reuses it."""
    layout = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def new_model(cfg: Config, ctx, seed: int) -> torch.nn.Module:
    """A fresh model of `cfg.train`'s row at `seed`. Every submodule's initial weights are a function of (seed, its
    qualified name) (train.heads.common.initialise), so two rows of one head at one seed start identical in every
    parameter they share; the global generator then restarts at `seed`, so their first dropout draws match too."""
    t = cfg.train
    seed_everything(seed)
    model = build_model(cfg, ctx, t.head, t.variant, t.grounding)
    initialise(model, seed)
    seed_everything(seed)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_store(cfg: Config, store: Path | None) -> Path:
    """An explicit store, else the one `ltar extract` recorded for the config's stage-1 sections (the store of the
    device this run trains on first, if one was extracted on each)."""
    if store is not None:
        return Path(store)
    from extract.contract.locate import find_store

    here = "cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else cfg.train.device.split(":")[0]
    return find_store(cfg, prefer=(here,) if here in ("cuda", "cpu") else ())


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """CE for single-label tasks, BCE for multi-label tasks."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def training_loss(
    model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor, multi_label: bool
) -> torch.Tensor:
    """A training step's loss: the task loss on the returned logits plus the model's auxiliary losses (`aux_loss`,
    grounding); a model that `owns_loss` (EIGV's paper objective) returns its whole objective as `aux_loss`."""
    aux = getattr(model, "aux_loss", None)
    if aux is not None and getattr(model, "owns_loss", False):
        return aux
    loss = loss_fn(logits, labels, multi_label)
    return loss if aux is None else loss + aux


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_lambda(tc, steps_per_epoch: int, restart_epoch: int = 0) -> Any:
    """The learning-rate factor of a step: warm-up, then cosine (`schedule: cosine`) or × step_gamma every
    step_epochs epochs (`schedule: step`, e.g. ECRL's recipe).

    `restart_epoch` > 0 (a head's two-step training, ECRL's `frame_epochs`): the second step starts its own
    schedule there, as a fine-tune from the first step's weights does (ECRL Sec. 4.3 and its recipe, Sec. 5.1.3:
    "decay 0.1 every 4 epochs" for each step); one schedule over both began the fine-tune already decayed once."""
    boundary = restart_epoch * steps_per_epoch
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))

    def phase(s: int, total: int) -> float:  # s: the step within its phase of `total` steps
        if tc.schedule == "cosine":
            return lr_lambda(s, total, warmup)
        return (s + 1) / warmup if s < warmup else tc.step_gamma ** ((s // steps_per_epoch) // tc.step_epochs)

    total = steps_per_epoch * tc.epochs
    if boundary <= 0:
        return lambda s: phase(s, total)
    return lambda s: phase(s, boundary) if s < boundary else phase(s - boundary, total - boundary)


def make_optimizer(tc, params: list) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, ours) or Adam (the papers' recipes)."""
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tc.lr, weight_decay=tc.weight_decay)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, float]]  # split -> metric -> value, after the last epoch
    seconds: float
    steps: int  # the schedule's steps done, resumed ones included
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_run: int | None = None  # the steps this call ran (a resumed run: fewer than `steps`)


def _eval_splits(cfg: Config, reader: CacheReader) -> list[str]:
    training = {"train", "pretrain", "train_oracle", cfg.train.train_split}  # splits that train, never evaluate
    splits = list(cfg.train.eval_splits) or sorted(set(reader.info.splits) - training)
    if cfg.train.select_split and cfg.train.select_split not in splits:
        splits.append(cfg.train.select_split)
    return splits


_shared_splits: dict | None = None  # inside `shared_splits()`: (store, task, slots, split, device) -> SplitTensors


@contextmanager
def shared_splits() -> Iterator[None]:
    """Within the block, a split that fits the memory budget is read from the store once and shared by every
    run that asks for it (`ltar ablate`: a table's rows read the same cache); read-only for the runs."""
    global _shared_splits
    outer = _shared_splits
    _shared_splits = {} if outer is None else outer
    try:
        yield
    finally:
        _shared_splits = outer


def _load(reader: CacheReader, split: str, cfg: Config, device: str) -> SplitTensors | StreamedSplit:
    budget = cfg.train.memory_budget_mb * 2**20
    size = reader.split_bytes(split)
    if size <= budget:
        key = (str(reader.path), reader.fingerprint, reader.task, tuple(reader.slots.tolist()), split, device)
        if _shared_splits is not None and key in _shared_splits:
            return _shared_splits[key]
        data = reader.load_split(split)
        data = data.to(device) if device.startswith("cuda") else data
        if _shared_splits is not None:
            _shared_splits[key] = data
        return data
    rows_per_block = max(cfg.train.batch_size, int(len(reader.split_rows(split)) * budget / (4 * size)))
    log.info(
        "split %s (%.0f MiB) exceeds the memory budget; streaming blocks of %d rows",
        split,
        size / 2**20,
        rows_per_block,
    )
    return reader.stream_split(split, rows_per_block)


@torch.no_grad()
def predict(
    head: torch.nn.Module, data, ctx, device: str, batch_size: int, dtype: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores (N, C), labels and, for a grounded head, the frames its prediction rests on (N, L); split order.
    dtype: the autocast dtype (`autocast_dtype`), None = fp32."""
    head.eval()
    scores = np.zeros((len(data), ctx.num_classes), dtype=np.float32)
    grounded = hasattr(head, "frames_used")
    used = np.zeros((len(data), ctx.num_frames), dtype=bool) if grounded else None
    labels: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    dicts = {k: (c.to(device), p.to(device)) for k, (c, p) in ctx.dictionaries.items()}
    for pos, batch in iterate_batches(data, batch_size, ctx.t0.to(device), dicts, device):
        with autocast(device, dtype):
            logits = head(batch)
            if grounded:
                used[pos] = head.frames_used(batch).cpu().numpy()
        scores[pos] = logits.float().cpu().numpy()
        labels.append(batch.labels.cpu().numpy())
        positions.append(pos)
    order = np.argsort(np.concatenate(positions))
    return scores, np.concatenate(labels)[order], used


def split_metrics(
    head: torch.nn.Module, data, ctx, cfg: Config, reader: CacheReader, device: str, relevance: dict
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics, scores and labels of a split; a grounded head adds its grounding scores against the
    annotated segments. `relevance` caches each split's (relevant frames, frame mask) (None: no annotation)."""
    tc = cfg.train
    grounded = hasattr(head, "frames_used")
    key = tuple(data.rows)
    if grounded and key not in relevance:
        relevant = frame_relevance(cfg, reader, data.rows)
        mask = np.asarray(reader.group[FRAME_MASK].get_orthogonal_selection(data.rows)).astype(bool)
        relevance[key] = None if relevant is None else (relevant, mask)
    with oracle_frames(head, relevance.get(key)):  # `indicator: oracle` reads this split's annotated frames
        scores, labels, used = predict(head, data, ctx, device, tc.batch_size, autocast_dtype(tc, device))
    metrics = compute_metrics(scores, labels, ctx.multi_label)
    if used is not None and relevance[key] is not None:
        metrics.update(grounding_scores(used, *relevance[key]))
    return metrics, scores, labels


@contextlib.contextmanager
def oracle_frames(head: torch.nn.Module, relevance: tuple[np.ndarray, np.ndarray] | None) -> Iterator[None]:
    """Within the block, a grounded head with `indicator: oracle` reads these annotated frames ((N, L) bool of the
    split being read, with its frame mask); other heads are untouched."""
    uses = getattr(getattr(head, "opts", None), "indicator", None) == "oracle"
    before = getattr(head, "oracle_frames", None)
    if uses:
        head.oracle_frames = None if relevance is None else torch.from_numpy(relevance[0])
    try:
        yield
    finally:
        if uses:
            head.oracle_frames = before


def train(
    cfg: Config,
    store: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    allow_partial: bool = False,
    run_dir: Path | None = None,
    max_steps: int | None = None,
) -> RunResult:
    """Train `cfg.train.head` (variant `cfg.train.variant`) on `cfg.train.task`; evaluate every epoch."""
    from extract.contract.lock import StoreLocked, acquire_lock

    run_dir = Path(run_dir or Path(cfg.train.runs_root) / run_name(cfg))
    try:
        lock = acquire_lock(run_dir, kind="training run", kept="its last checkpoint is kept; --resume continues it")
    except StoreLocked as e:
        raise RunError(str(e)) from None
    try:
        with lock:
            return _train(cfg, store, resume, progress, allow_partial, run_dir, max_steps)
    finally:
        if run_dir.is_dir() and not any(run_dir.iterdir()):  # a run that could not start leaves no folder
            run_dir.rmdir()


def dictionary_hashes(cfg: Config, reader: CacheReader) -> dict[str, str]:
    """The `params_hash` of every cache dictionary the configured head reads (rebuilt dictionaries differ)."""
    names = required_dictionaries(cfg, cfg.train.head, cfg.train.variant)
    return {n: str(reader.group[f"dictionaries/{n}"].attrs.get("params_hash")) for n in names}


# train keys that decide where a run lives or how it is read, not what it computes
# stack_seeds, workers, scheduler: the same numbers in distribution (tests/train/test_stacked.py)
_NOT_RESULTS = ("runs_root", "memory_budget_mb", "eval_every", "stack_seeds", "workers", "scheduler")


def saved_train(ckpt: dict) -> dict:
    """A checkpoint's `train` settings as today's keys read them: a run from before `amp_dtype` whose checkpoint
    holds a live GradScaler's state trained with AMP on CUDA, which was float16 then (a disabled scaler's state is
    empty: a CPU run, autocast off, counts as today's default)."""
    saved = ckpt["config"]["train"]
    if "amp_dtype" not in saved and ckpt.get("scaler"):
        return {**saved, "amp_dtype": "float16"}
    return saved


def changed_keys(saved: dict, now: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys where a saved options dict differs from the dataclass `now` (a saved key `now` no longer has
    counts too); a key the saved run predates counts as what runs computed before it existed: its `predating`
    value where it has one (a new default that changes the result), else its default."""
    current, defaults = to_dict(now), to_dict(type(now)())
    before = {f.name: to_dict(f.metadata.get("predates", defaults[f.name])) for f in dataclasses.fields(now)}
    keys = set(current) - set(ignore)
    gone = sorted(set(saved) - set(current))
    return gone + sorted(k for k in keys if saved.get(k, before[k]) != current[k])


def resume_mismatch(ckpt: dict, cfg: Config) -> list[str]:
    """What a resumed run would change: `section.key` for every setting (train, the head's options, the grounding)
    that differs from the checkpoint's; empty when the run continues as it began."""
    t = cfg.train
    out = [f"train.{k}" for k in changed_keys(saved_train(ckpt), t, ignore=_NOT_RESULTS)]
    out += [
        f"heads.{t.head}.{k}" for k in changed_keys(ckpt.get("options") or {}, head_options(cfg, t.head, t.variant))
    ]
    if t.grounding:
        opts = grounding_options(cfg, t.grounding)
        out += [f"grounding.{t.grounding}.{k}" for k in changed_keys(ckpt.get("grounding_options") or {}, opts)]
    return out


def _train(
    cfg: Config,
    store: Path | None,
    resume: bool,
    progress: bool,
    allow_partial: bool,
    run_dir: Path,
    max_steps: int | None,
) -> RunResult:
    from tqdm import tqdm

    t0 = time.perf_counter()
    tc = cfg.train
    device = resolve_device(tc.device)
    store = find_store(cfg, store)
    reader = CacheReader(store, tc.task, allow_partial=allow_partial, num_frames=tc.num_frames)
    ctx = reader.context()
    last_path = run_dir / "last.pt"
    if last_path.exists() and not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or remove the folder")
    frame_epochs = getattr(head_options(cfg, tc.head, tc.variant), "frame_epochs", 0)
    if frame_epochs >= tc.epochs:
        raise ConfigError(
            f"heads.{tc.head}.frame_epochs = {frame_epochs} leaves no epoch of the second training step "
            f"(train.epochs = {tc.epochs}): lower it or raise train.epochs"
        )
    head = new_model(cfg, ctx, tc.seed).to(device)
    if tc.train_split not in reader.info.splits:
        raise ConfigError(
            f"train.train_split: the cache {store} has no split {tc.train_split!r} (it holds "
            f"{sorted(reader.info.splits)}); for the oracle row render it with synthetic.videos.{tc.train_split} "
            "(`make benchmark` does) and extract again"
        )
    train_data = _load(reader, tc.train_split, cfg, device)
    evals = {s: _load(reader, s, cfg, device) for s in _eval_splits(cfg, reader)}
    steps_per_epoch = math.ceil(len(train_data) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    params = [p for p in head.parameters() if p.requires_grad]
    opt = make_optimizer(tc, params)
    clip_groups = head.clip_groups() if hasattr(head, "clip_groups") else [params]  # train.grounding: per module
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(tc, steps_per_epoch, frame_epochs))
    dtype = autocast_dtype(tc, device)  # None on the CPU
    scaler = grad_scaler(dtype)
    start_epoch, best, history, step = 0, -math.inf, [], 0
    if resume and last_path.exists():
        ckpt = read_checkpoint(last_path, map_location=device)
        if ckpt["fingerprint"] != reader.fingerprint:
            raise RunError(f"{last_path} was trained on cache {ckpt['fingerprint']}, not {reader.fingerprint}")
        changed = resume_mismatch(ckpt, cfg)
        if changed:
            raise RunError(
                f"{run_dir} was trained with other settings than these: {', '.join(changed)} differ; --resume "
                "continues a run as it began (its schedule, its record), so set them back, or start a new run "
                "(another run folder, e.g. --set train.runs_root=runs/other)"
            )
        head.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # empty where no scaler ran (CPU, bfloat16, a stacked run); a disabled one ignores it
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start_epoch, best, history, step = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"], ckpt["step"]
        log.info("resuming %s at epoch %d", run_dir, start_epoch)
    first_step = step
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, run_dir)
    t0_dev = ctx.t0.to(device)
    dicts = {k: (c.to(device), p.to(device)) for k, (c, p) in ctx.dictionaries.items()}
    relevance: dict = {}  # split rows -> annotated frames, for a grounded head's grounding scores
    if getattr(getattr(head, "opts", None), "indicator", None) == "oracle":  # the diagnostic reads the train split's
        relevant = frame_relevance(cfg, reader, train_data.rows)
        head.oracle_frames = None if relevant is None else torch.from_numpy(relevant)
    bar = tqdm(total=total, initial=step, disable=not progress, desc=run_name(cfg), unit="step")
    phase = getattr(head, "set_epoch", None) or getattr(getattr(head, "head", None), "set_epoch", None)
    for epoch in range(start_epoch, tc.epochs):
        head.train()
        if phase is not None:  # a head's training schedule (ECRL's two-step training), a function of the epoch
            phase(epoch)
        gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)  # data order: a function of (seed, epoch)
        losses = []
        for _, batch in iterate_batches(train_data, tc.batch_size, t0_dev, dicts, device, gen):
            with autocast(device, dtype):
                logits = head(batch)  # (B, C)
                loss = training_loss(head, logits, batch.labels, ctx.multi_label)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip > 0:
                scaler.unscale_(opt)
                for group in clip_groups:  # each by its own norm: a grounded head's like its ungrounded row's
                    torch.nn.utils.clip_grad_norm_(group, tc.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            losses.append(loss.detach())  # on the device: no host sync per step
            bar.update(1)
            if progress and step % POSTFIX_EVERY == 0:  # one sync every POSTFIX_EVERY steps for the bar
                bar.set_postfix(loss=f"{float(losses[-1]):.3f}")
            if max_steps is not None and step >= max_steps:
                break
        epoch_loss = float(np.mean(torch.stack(losses).double().cpu().numpy())) if losses else float("nan")
        row = {"epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "loss": epoch_loss}
        last_epoch = epoch + 1 == tc.epochs or (max_steps is not None and step >= max_steps)
        optim = (opt.state_dict(), sched.state_dict(), scaler.state_dict())
        best = end_epoch(
            cfg, head, reader, store, ctx, device, evals, relevance, run_dir, row, history, best, optim, last_epoch
        )
        if last_epoch:
            break
    bar.close()
    final = history[-1] if history else {}  # the last epoch is always evaluated
    metrics = {s: {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{s}/")} for s in evals}
    return RunResult(run_dir, metrics, time.perf_counter() - t0, step, history, step - first_step)


def end_epoch(
    cfg: Config,
    head: torch.nn.Module,
    reader: CacheReader,
    store: Path,
    ctx,
    device: str,
    evals: dict,
    relevance: dict,
    run_dir: Path,
    row: dict[str, Any],
    history: list[dict[str, Any]],
    best: float,
    optim: tuple[dict, dict, dict],
    last_epoch: bool,
    extra: dict[str, Any] | None = None,
) -> float:
    """After a training epoch (`row` holds its epoch, step, lr and loss): evaluate when due, append the metrics,
    write `last.pt` (and `best.pt` when the selection score improved); the new best score. `optim`: the states
    of the optimizer, the scheduler and the grad scaler; `last_epoch`: always evaluated, predictions written;
    `extra`: keys added to the checkpoint."""
    tc = cfg.train
    epoch = row["epoch"]
    evaluated = last_epoch or (epoch + 1) % tc.eval_every == 0
    for split, data in evals.items() if evaluated else ():
        metrics, scores, labels = split_metrics(head, data, ctx, cfg, reader, device, relevance)
        row.update({f"{split}/{k}": v for k, v in metrics.items()})
        if last_epoch:  # the tables' confidence intervals resample these per-video scores
            save_predictions(run_dir / f"predictions-{split}.npz", scores, labels, data.rows, row["step"])
    history.append(row)
    names = ["map"] if ctx.multi_label else ["acc1", "acc5", "map"]
    names += list(GROUND_KEYS) if hasattr(head, "frames_used") else []
    _append_metrics(run_dir, row, ["epoch", "step", "lr", "loss"] + [f"{s}/{m}" for s in evals for m in names])
    select = tc.select_split
    if select and not evaluated:
        score = -math.inf  # best.pt is chosen only among evaluated epochs
    else:
        score = row[f"{select}/{primary_metric(ctx.multi_label)}"] if select else epoch  # no selection: best = last
    opt_state, sched_state, scaler_state = optim
    state = {
        "head": tc.head,
        "variant": tc.variant,
        "grounding": tc.grounding,
        "task": tc.task,
        "options": to_dict(head_options(cfg, tc.head, tc.variant)),
        "grounding_options": to_dict(grounding_options(cfg, tc.grounding)) if tc.grounding else None,
        "state_dict": head.state_dict(),
        "optimizer": opt_state,
        "scheduler": sched_state,
        "scaler": scaler_state,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "epoch": epoch,
        "step": row["step"],
        "best": max(best, score),
        "history": history,
        "fingerprint": reader.fingerprint,
        "init": INIT_SCHEME,
        "architecture": architecture(head),
        "dictionaries": dictionary_hashes(cfg, reader),
        "store": str(store),
        "class_names": reader.class_names,
        "config": to_dict(cfg),
        **(extra or {}),
    }
    atomic_save(state, run_dir / "last.pt")
    if score > best:
        best = score
        if select:
            atomic_save(state, run_dir / "best.pt")
        else:  # no selection split: best is the last epoch, the same bytes; a hard link saves a second write
            link_or_save(run_dir / "last.pt", run_dir / "best.pt", state)
    return best


def link_or_save(src: Path, dst: Path, state: dict) -> None:
    """dst becomes the file src is (a hard link, renamed into place: readers see the old dst or the new one);
    where the filesystem has no hard links, `state` is saved to dst instead."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        atomic_save(state, dst)
        return
    os.replace(tmp, dst)


@dataclass
class LoadedRun:
    """A checkpoint rebuilt on its cache: the run's config, the reader, the context, the model with its weights."""

    ckpt: dict
    cfg: Config
    reader: CacheReader
    ctx: Any
    device: str
    model: torch.nn.Module


def run_config(ckpt: dict) -> Config:
    """The configuration a checkpoint was trained with, less its `ablations` tables: they do not decide what the
    run computed, and a table row naming a variant since renamed or removed must not make the run unreadable."""
    return from_dict({k: v for k, v in ckpt["config"].items() if k != "ablations"})


def read_checkpoint(path: Path, map_location: str = "cpu", trust: bool = False) -> dict:
    """A run checkpoint read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts
    only, so reading a checkpoint someone shared never runs code (ltar writes nothing else). A file that needs
    more is refused unless `trust` (the CLI's --trust-checkpoint); a file that is not a checkpoint (empty,
    truncated, another format) is a RunError naming it."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle of objects at all: a damaged or foreign file
            raise RunError(
                f"{path} is not a readable checkpoint (its contents are not a torch checkpoint); it may have been "
                "cut short or overwritten: copy it again, or remove its run folder and retrain"
            ) from None
        raise RunError(
            f"{path} holds Python objects beyond tensors, numbers, strings, lists and dicts (first: {found.group(1)}); "
            "reading it would build them, which can run code. ltar writes no such checkpoint, so this file was made "
            "elsewhere: load it only if you made it or trust its source, with --trust-checkpoint"
        ) from None
    except (EOFError, RuntimeError, KeyError, zipfile.BadZipFile, pickle.PickleError) as e:
        why = str(e).splitlines()[0] if str(e) else "empty"
        raise RunError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {why}); "
            "it may have been cut short by an interrupted copy or write: copy it again, or remove its run folder "
            "and retrain"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RunError(f"{path} is not an ltar run checkpoint (no state_dict); pass a run's last.pt or best.pt")
    return ckpt


def load_run(checkpoint: Path, store: Path | None = None, cfg: Config | None = None, trust: bool = False) -> LoadedRun:
    """Load a checkpoint (or a run folder's last.pt) and rebuild its model on the store it was trained on;
    refuses another cache."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "last.pt"
    if not checkpoint.exists():
        raise RunError(f"checkpoint {checkpoint} does not exist; `ltar train` writes runs/<run>/best.pt and last.pt")
    ckpt = read_checkpoint(checkpoint, trust=trust)
    run_cfg = run_config(ckpt)
    if cfg is not None:  # the caller's cache location wins; everything else is the run's own
        run_cfg = replace(run_cfg, cache=cfg.cache, dataset=cfg.dataset)
    store = Path(store) if store else Path(ckpt["store"]) if Path(ckpt["store"]).exists() else find_store(run_cfg, None)
    reader = CacheReader(store, ckpt["task"], allow_partial=True, num_frames=run_cfg.train.num_frames)
    if reader.fingerprint != ckpt["fingerprint"]:
        raise CacheError(
            f"{checkpoint} was trained on cache {ckpt['fingerprint']}, but {store} is cache {reader.fingerprint}; "
            "use it on the store it was trained on (--store) or retrain on this one"
        )
    ctx = reader.context()
    device = resolve_device(run_cfg.train.device)
    model = build_model(run_cfg, ctx, ckpt["head"], ckpt["variant"], ckpt.get("grounding")).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return LoadedRun(ckpt, run_cfg, reader, ctx, device, model)


def save_predictions(path: Path, scores: np.ndarray, labels: np.ndarray, rows: np.ndarray, step: int) -> None:
    """A split's per-video scores (N, C), labels and store rows, written atomically with the run's step: an .npz
    (np.load reads it) whose members carry a fixed time stamp, so the same predictions are the same bytes whenever
    and wherever they are written (np.savez stamps each member with the time of writing)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"scores": scores.astype(np.float32), "labels": labels, "rows": rows, "step": step}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
    os.replace(tmp, path)


def run_predictions(run_dir: Path, split: str, store: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, C), labels and store rows of a finished run's last checkpoint on a split: read from
    `predictions-<split>.npz` when it belongs to that checkpoint, else computed from `last.pt` and written."""
    path = run_dir / f"predictions-{split}.npz"
    ckpt = read_checkpoint(run_dir / "last.pt")
    if path.exists():
        saved = np.load(path)
        if int(saved["step"]) == ckpt["step"]:
            return saved["scores"], saved["labels"], saved["rows"]
    run = load_run(run_dir / "last.pt", store)
    data = _load(run.reader, split, run.cfg, run.device)
    tc = run.cfg.train
    scores, labels, _ = predict(run.model, data, run.ctx, run.device, tc.batch_size, autocast_dtype(tc, run.device))
    save_predictions(path, scores, labels, data.rows, ckpt["step"])
    return scores, labels, np.asarray(data.rows)


def _append_metrics(run_dir: Path, row: dict[str, Any], fields: list[str]) -> None:
    """One line per epoch in metrics.jsonl and metrics.csv (empty cells where an epoch was not evaluated)."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    path = run_dir / "metrics.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]
    confusion_png: Path | None
    metrics_json: Path | None = None  # evaluate-<split>.json beside the checkpoint


def evaluate(
    checkpoint: Path,
    split: str,
    store: Path | None = None,
    cfg: Config | None = None,
    out_dir: Path | None = None,
    trust: bool = False,
) -> EvalResult:
    """Metrics of a checkpoint on a split; refuses a checkpoint trained on another cache."""
    checkpoint = Path(checkpoint)
    run = load_run(checkpoint, store, cfg, trust=trust)
    ckpt, run_cfg, reader, ctx, device, head = run.ckpt, run.cfg, run.reader, run.ctx, run.device, run.model
    data = _load(reader, split, run_cfg, device)
    metrics, scores, labels = split_metrics(head, data, ctx, run_cfg, reader, device, {})
    png = None
    if not ctx.multi_label:
        png = confusion_png(
            scores,
            labels,
            reader.class_names,
            Path(out_dir or checkpoint.parent) / f"confusion-{split}.png",
            f"{ckpt['head']} {ckpt['variant'] or ''} on {split}",
        )
    where = Path(out_dir or checkpoint.parent) / f"evaluate-{split}.json"  # the metrics, beside the confusion PNG
    where.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(checkpoint), "split": split, "store": str(reader.path), "metrics": metrics}
    where.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return EvalResult(split, metrics, png, where)


def confusion_png(scores: np.ndarray, labels: np.ndarray, names: list[str], out: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class rows, predicted class columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(names)
    pred = scores.argmax(1)
    counts = np.zeros((c, c))
    np.add.at(counts, (labels, pred), 1)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * c, 1 + 0.45 * c))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), names, rotation=90, fontsize=7)
    ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
