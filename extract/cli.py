"""Stage 1's commands (`ltar synth`, `pretrain-vlm`, `pretrain-video`, `extract`, `dictionaries`, `inspect`,
`import-h5`, `export-h5`) on the shared `ltar` app (extract/contract/cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from extract.contract.cli import (
    EXIT_FAILURES,
    LISTINGS,
    USER_ERRORS,
    ConfigOpt,
    SetOpt,
    app,
    fail,
    progress_enabled,
    resolve_config,
)
from extract.contract.config import write_resolved
from extract.datasets import DatasetError


def _registered() -> str:
    from extract.datasets import dataset_names
    from extract.encoders import encoder_names

    return f"# registered datasets: {', '.join(dataset_names())}\n# registered encoders: {', '.join(encoder_names())}"


LISTINGS.append(_registered)
USER_ERRORS.append(DatasetError)


@app.command()
def synth(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Render the synthetic confounded benchmark (videos + manifest.jsonl) into dataset.root.

    Re-running with the same `synthetic` section is a no-op.

    Example: ltar synth --set synthetic.videos.train=400 --set synthetic.rho=0.95
    """
    from extract.synthetic import write_dataset

    cfg = resolve_config(config, set_)
    root = Path(cfg.dataset.root)
    summary = write_dataset(cfg.synthetic, root, progress=progress_enabled())
    write_resolved(cfg, root)
    typer.echo(_format_summary(summary))
    typer.echo(f"wrote {root / 'manifest.jsonl'}")


@app.command()
def extract(
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    scheduler: str = typer.Option(
        None,
        "--scheduler",
        help="Run on dask.distributed: local:N (N worker processes here) or tcp://host:port (a running "
        "cluster, one worker per GPU). Default: this process only.",
    ),
    retries: int = typer.Option(2, "--retries", min=0, help="With --scheduler: times a failed shard task is retried."),
) -> None:
    """Decode every video of the dataset and write CLIP, saliency and TimeSformer features to the cache.

    Resumes an interrupted run; videos that cannot be decoded are recorded and skipped (exit code 1).
    One run writes a store at a time (a lock file inside it); a second is refused.

    Example: ltar extract --set frames.num_frames=32 --set encoders.device=cuda:0

    Example: ltar extract --scheduler local:2   (or --scheduler tcp://head-node:8786)
    """
    from extract.contract.schema import CacheError
    from extract.contract.store import ExtractError
    from extract.datasets import DatasetError
    from extract.pipeline import extract as run_extract

    cfg = resolve_config(config, set_)
    try:
        if scheduler:
            from extract.scale import extract_distributed

            summary = extract_distributed(cfg, scheduler, progress=progress_enabled(), retries=retries)
        else:
            summary = run_extract(cfg, progress=progress_enabled())
    except (DatasetError, CacheError, ExtractError) as e:
        raise fail(str(e)) from None
    write_resolved(cfg, summary.store.parent, f"{summary.store.stem}.config.yaml")
    for line in summary.lines():
        typer.echo(line)
    if summary.failures:
        raise typer.Exit(EXIT_FAILURES)


@app.command("pretrain-vlm")
def pretrain_vlm_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Train the tiny open_clip CLIP contrastively on the synthetic world's confounded pretraining split.

    Writes an open_clip checkpoint (+ its JSON config) under vlm.out; `encoders.clip.weights: vlm`
    makes extraction load it. Re-running with the same config is a no-op.

    Example: ltar pretrain-vlm --set vlm.steps=300
    """
    from extract.vlm import pretrain_vlm

    cfg = resolve_config(config, set_)
    result = pretrain_vlm(cfg, progress=progress_enabled())
    state = "unchanged (same config)" if result.skipped else f"trained {result.steps} steps in {result.seconds:.1f} s"
    typer.echo(f"{state}; final loss {result.final_loss:.3f}; wrote {result.checkpoint}")


@app.command("pretrain-video")
def pretrain_video_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Train the tiny TimeSformer to name the atomic action of short clips (the Kinetics stand-in).

    Writes an official-layout TimeSformer .pyth under video.out; `encoders.timesformer.weights: video`
    makes extraction load it like a K400 checkpoint. Re-running with the same config is a no-op.

    Example: ltar pretrain-video --set video.steps=300
    """
    from extract.video_pretrain import pretrain_video

    cfg = resolve_config(config, set_)
    result = pretrain_video(cfg, progress=progress_enabled())
    state = "unchanged (same config)" if result.skipped else f"trained {result.steps} steps in {result.seconds:.1f} s"
    typer.echo(
        f"{state}; final loss {result.final_loss:.3f}, clip top-1 {result.train_accuracy:.2f}; "
        f"wrote {result.checkpoint}"
    )


@app.command()
def dictionaries(
    config: list[Path] = ConfigOpt, set_: list[str] = SetOpt, store: Path = typer.Option(None, "--store")
) -> None:
    """Build the confounder and global dictionaries (FAISS k-means) into the cache store.

    Re-running with the same parameters is a no-op; the cache features are never rewritten.

    Example: ltar dictionaries --set dictionaries.confounder.size=64
    """
    from extract.dictionaries import DictionaryError, build_dictionaries

    cfg = resolve_config(config, set_)
    try:
        results = build_dictionaries(cfg, store, progress=progress_enabled())
    except DictionaryError as e:
        raise fail(str(e)) from None
    for result in results:
        typer.echo(str(result))


@app.command()
def inspect(
    video_id: str = typer.Argument(None, help="A video id; without one, print the cache summary."),
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    store: Path = typer.Option(None, "--store", help="A store path (default: the one the config names)."),
    out: Path = typer.Option(None, "--out", help="PNG path (default <train.runs_root>/inspect/<video_id>.png)."),
    saliency: str = typer.Option(
        None,
        "--saliency",
        help="Saliency methods to draw beside the stored one, comma-separated (clip-attention, clip-surgery, "
        "spectral-residual, motion); for a video file, every method by default.",
    ),
) -> None:
    """Show what the cache holds: a summary, or one video's frames, saliency, foreground and background. VIDEO_ID
    may also be a video file's path: its sampled frames split by each saliency method, before any extraction.

    Example: ltar inspect train_00003   (writes <train.runs_root>/inspect/train_00003.png, runs/inspect/ by default)

    Example: ltar inspect my_clip.mp4 --saliency clip-surgery,spectral-residual,motion
    """
    from extract.contract.schema import CacheError
    from extract.inspect import cache_summary, inspect_video, locate_store

    cfg = resolve_config(config, set_)
    methods = tuple(m.strip() for m in saliency.split(",") if m.strip()) if saliency else ()
    try:
        as_file = video_id is not None and Path(video_id).is_file()
        path = None if as_file else store or locate_store(cfg)
        if video_id is None:
            typer.echo(cache_summary(path))
            return
        name = Path(video_id).stem if as_file else video_id
        default = Path(cfg.train.runs_root) / "inspect" / f"{name}.png"
        png = inspect_video(cfg, path, video_id, out or default, methods=methods)
    except (CacheError, KeyError) as e:
        raise fail(str(e).strip("'\"")) from None
    typer.echo(f"wrote {png}")


@app.command("import-h5")
def import_h5(
    file: Path = typer.Argument(..., help="HDF5 file: one (T, D) dataset per video id, at the root or per kind group."),
    dataset: str = typer.Option(None, "--dataset", help="Dataset whose index gives ids, splits, labels."),
    map_: list[str] = typer.Option(
        [],
        "--map",
        help="KIND=ARRAY: a group of the file (/ for the root) to a cache array (clip/frame, clip/fg, clip/bg, "
        "timesformer/frame, timesformer/cls) or skip (repeatable); defaults: / and clip -> clip/frame, "
        "timesformer -> timesformer/frame, fg/bg -> clip/fg/bg, exported paths to themselves.",
    ),
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Import per-video features from an HDF5 file into a cache store, so heads train on them.

    Every video is resampled to frames.num_frames (uniform rows, or padding with frame_mask False);
    clip/frame is required, arrays the file lacks are zero (listed). Exit code 1 when videos failed.

    Example: ltar import-h5 feats.h5 --dataset manifest --map features=clip/frame --set dataset.root=data/mine
    """
    from extract.contract.schema import CacheError
    from extract.contract.store import ExtractError
    from extract.datasets import DatasetError
    from extract.interop import import_h5 as run_import

    cfg = resolve_config(config, [*set_, *([f"dataset.name={dataset}"] if dataset else [])])
    try:
        summary = run_import(cfg, file, map_)
    except (DatasetError, CacheError, ExtractError) as e:
        raise fail(str(e)) from None
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"train on it with --store {summary.store}")
    if summary.failures:
        raise typer.Exit(EXIT_FAILURES)


@app.command("export-h5")
def export_h5(
    store: Path = typer.Argument(..., help="A cache store (cache/<dataset>/<fingerprint>.zarr)."),
    array: str = typer.Argument(..., help="A cache array, e.g. clip/frame, timesformer/cls, text/activity."),
    out: Path = typer.Argument(..., help="HDF5 file to write (arrays of the same store may share it)."),
) -> None:
    """Write one cache array to HDF5: /<array>/<video_id> with the valid frames of every done video.

    Example: ltar export-h5 cache/synthetic/0123abcd.zarr clip/frame features.h5
    """
    from extract.contract.schema import CacheError
    from extract.contract.store import ExtractError
    from extract.interop import export_h5 as run_export

    try:
        summary = run_export(store, array, out)
    except (CacheError, ExtractError) as e:
        raise fail(str(e)) from None
    for line in summary.lines():
        typer.echo(line)


def _format_summary(summary: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in summary.items())
