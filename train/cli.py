"""Stage 2's commands (`ltar train`, `evaluate`, `diagnose`, `ground-check`, `ablate`) on the shared `ltar` app
(extract/contract/cli.py); train/main.py, the console script, adds stage 1's beside them."""

from __future__ import annotations

from pathlib import Path

import typer

import train.heads  # noqa: F401  (registers heads; the config loader checks heads/ablations against them)
from extract.contract.cli import (
    EXIT_USAGE,
    LISTINGS,
    ConfigOpt,
    SetOpt,
    app,
    fail,
    progress_enabled,
    resolve_config,
)
from extract.contract.config import ConfigError, write_resolved
from extract.contract.schema import CacheError


def _heads_listing() -> str:
    from train.heads import head_names

    return f"# registered heads: {', '.join(head_names())} (variants: heads.<name>.variants and each head's built-ins)"


LISTINGS.append(_heads_listing)

StoreOpt = typer.Option(
    None, "--store", help="A cache store path (default: the one `ltar extract` recorded for these stage-1 settings)."
)

TrustOpt = typer.Option(
    False,
    "--trust-checkpoint",
    help="Read a checkpoint that holds Python objects beyond tensors and plain data (reading it can run code; "
    "ltar never writes one). Only for a file you made or whose source you trust.",
)


@app.command("train")
def train_cmd(
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    head: str = typer.Option(None, "--head", help="Registered head (overrides train.head)."),
    variant: str = typer.Option(None, "--variant", help="Named variant of the head (overrides train.variant)."),
    grounding: str = typer.Option(
        None, "--grounding", help="Named grounding intervention around the head, from `grounding:` (train.grounding)."
    ),
    task: str = typer.Option(None, "--task", help="activity (single label) or atomic (multi-label)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last.pt."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train on the done rows of an unfinished store."),
    store: Path = StoreOpt,
) -> None:
    """Train one head from the cache; metrics per epoch and checkpoints under runs/<run>/.

    Example: ltar train --head baseline --variant clip_only --task atomic --set train.epochs=10
    Example: ltar train --head ecrl --grounding igv
    """
    from train.engine import RunError, train

    extra = [f"train.head={head}"] if head else []
    extra += [f"train.variant={variant}"] if variant else []
    extra += [f"train.grounding={grounding}"] if grounding else []
    extra += [f"train.task={task}"] if task else []
    cfg = resolve_config(config, [*set_, *extra])
    try:
        result = train(cfg, store=store, resume=resume, progress=progress_enabled(), allow_partial=allow_partial)
    except (CacheError, RunError, ConfigError) as e:
        raise fail(str(e)) from None
    for split, metrics in result.metrics.items():
        typer.echo(f"{split}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    ran = result.steps if result.steps_run is None else result.steps_run
    resumed = f" (resumed at step {result.steps - ran} of {result.steps})" if ran != result.steps else ""
    typer.echo(f"{ran} steps in {result.seconds:.1f} s{resumed}; wrote {result.run_dir}")


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `ltar train` (best.pt or last.pt)."),
    split: list[str] = typer.Option(["test_iid", "test_ood"], "--split", help="Split(s) to evaluate (repeatable)."),
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    store: Path = StoreOpt,
    trust: bool = TrustOpt,
) -> None:
    """Metrics of a checkpoint on any split, and a confusion-matrix PNG for activity tasks.

    Example: ltar evaluate runs/baseline-activity-s0/best.pt --split test_ood
    """
    from train.engine import RunError, evaluate

    cfg = resolve_config(config, set_)
    try:
        for s in split:
            result = evaluate(checkpoint, s, store=store, cfg=cfg, trust=trust)
            typer.echo(f"{s}: " + " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
            typer.echo("wrote " + ", ".join(str(f) for f in (result.metrics_json, result.confusion_png) if f))
    except (CacheError, RunError) as e:
        raise fail(str(e)) from None


@app.command("diagnose")
def diagnose_cmd(
    run: Path = typer.Argument(
        ..., help="A run folder written by `ltar train` / `ltar ablate`, or its last.pt / best.pt."
    ),
    split: list[str] = typer.Option(["test_iid", "test_ood"], "--split", help="Split(s) to diagnose (repeatable)."),
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    store: Path = StoreOpt,
    trust: bool = TrustOpt,
) -> None:
    """Does each causal term of a trained head change anything? Its variation over the split's videos, the
    metric with it replaced by its split mean and by zero, and the entropy of its weights; writes
    diagnose-<split>.md/.csv/.png beside the checkpoint.

    Example: ltar diagnose runs/ablations/<fingerprint>/pcmci-activity-s0 --split test_ood
    """
    from train.diagnose import diagnose
    from train.engine import RunError

    cfg = resolve_config(config, set_)
    try:
        for s in split:
            _, files = diagnose(run, s, store=store, cfg=cfg, trust=trust)
            typer.echo(files[0].read_text())
            typer.echo("wrote " + ", ".join(map(str, files)))
    except (CacheError, RunError, ConfigError) as e:
        raise fail(str(e)) from None


@app.command("ground-check")
def ground_check_cmd(
    run: Path = typer.Argument(..., help="A grounded run folder (grounding igv / eigv), or its last.pt / best.pt."),
    split: list[str] = typer.Option(["train"], "--split", help="Split(s) to check on (repeatable)."),
    config: Path = typer.Option(
        None, "--config", "-c", help="A pipeline YAML whose cache and dataset locations replace the run's own."
    ),
    set_: list[str] = SetOpt,
    store: Path = StoreOpt,
    trust: bool = TrustOpt,
) -> None:
    """Is the grounding indicator decisive, and does its learned mask minimise its own objective? The run's
    training objective with the causal-frame mask held fixed: learned, oracle (annotated action frames first),
    idle-first, random, an untrained indicator; writes ground-check-<split>.md/.csv beside the checkpoint.

    Example: ltar ground-check runs/ablations/<fingerprint>/baseline+igv-activity-s0
    """
    from train.engine import RunError
    from train.ground_check import ground_check

    # the run's own cache and dataset (its annotations), unless --config / --set say where they live now
    cfg = resolve_config(config or Path("pipeline.yaml"), set_) if config or set_ else None
    try:
        for s in split:
            _, _, files = ground_check(run, s, store=store, cfg=cfg, trust=trust)
            typer.echo(files[0].read_text())
            typer.echo("wrote " + ", ".join(map(str, files)))
    except (CacheError, RunError, ConfigError) as e:
        raise fail(str(e)) from None


@app.command("ablate")
def ablate_cmd(
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    table: list[str] = typer.Option(None, "--table", help="Table name(s) from `ablations` (default: every table)."),
    seeds: int = typer.Option(None, "--seeds", min=1, help="Seeds per row, at least 1 (overrides the table's own)."),
    store: Path = StoreOpt,
    diagnose: bool = typer.Option(
        False, "--diagnose", help="Add each row's causal-term diagnosis (variation, knock-out) on test_ood (seed 0)."
    ),
    workers: int = typer.Option(
        None,
        "--workers",
        min=1,
        help="Processes training runs side by side (overrides train.workers; 1 = one at a time).",
    ),
    scheduler: str = typer.Option(
        None,
        "--scheduler",
        help="Train the runs as dask tasks, one per worker at a time (overrides train.scheduler; replaces "
        "--workers): local:N starts N worker processes here (cores / N torch threads each), tcp://HOST:PORT joins "
        "a running cluster (one worker per GPU, on a filesystem shared with this machine).",
    ),
) -> None:
    """Run every variant of the named tables from one cache; write runs/ablations/<table>.md, .csv, .png.

    A run that fails is reported and the table's other runs finish; the table then exits with one error naming
    the failed runs, and running it again trains only those (finished runs are reused).

    Example: ltar ablate --table main --seeds 3 --workers 2
    Example: ltar ablate --table main --scheduler local:2   (or --scheduler tcp://head-node:8786)
    """
    from train.ablate import MissingSplit, run_table
    from train.engine import RunError

    extra = [f"train.workers={workers}"] if workers else []
    extra += [f"train.scheduler={scheduler}"] if scheduler else []
    cfg = resolve_config(config, [*set_, *extra])
    names = table or sorted(cfg.ablations)
    unknown = [n for n in names if n not in cfg.ablations]
    if unknown:
        raise fail(f"no ablation table(s) {unknown} in {config}; defined: {sorted(cfg.ablations)}", EXIT_USAGE)
    for name in names:
        try:
            result = run_table(cfg, name, seeds=seeds, store=store, progress=progress_enabled(), diagnose=diagnose)
        except MissingSplit as e:
            if table:  # asked for by name: an error
                raise fail(str(e)) from None
            typer.echo(f"skipped: {e}")  # every table: the ones this cache cannot serve are skipped
            continue
        except (CacheError, RunError, ConfigError) as e:
            raise fail(str(e)) from None
        write_resolved(cfg, result.files[0].parent, f"{result.name}.config.yaml")
        typer.echo(result.files[0].read_text())
        typer.echo(f"{result.runs} runs in {result.seconds:.1f} s; wrote " + ", ".join(map(str, result.files)))
