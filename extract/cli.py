"""`ltar`: the command line of causal-ltar.

Every command takes `--config PATH` (default pipeline.yaml) and repeated `--set KEY=VALUE`.
Exit codes: 0 success, 1 finished with recorded failures (bad videos, listed), 2 bad usage, configuration or input
(one sentence naming the file, key or device), 3 an internal error (one line; the traceback is written to a file
it names), 130 interrupted (Ctrl-C; what finished is kept, and the same command resumes).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from extract.config import Config, ConfigError, dump_yaml, load_config, write_resolved

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="ltar",
    help=(
        "Long-term action recognition with causal intervention heads on a frozen-feature cache.\n\n"
        "Typical run: ltar synth; ltar pretrain-vlm; ltar pretrain-video; ltar extract; ltar dictionaries; "
        "ltar train; ltar ablate (the default config's encoders are the tiny ones the two pretrain commands make).\n\n"
        "Exit codes: 0 success; 1 finished with recorded failures; 2 bad usage, configuration or input; 3 internal "
        "error (traceback written to a file); 130 interrupted.\n\n"
        "Example: ltar synth --set synthetic.rho=0.5 --set dataset.root=data/synth-rho50"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Shared by every command (typer has no inheritance of options, so each command declares them).
ConfigOpt = typer.Option(Path("pipeline.yaml"), "--config", "-c", help="The pipeline YAML file.")
SetOpt = typer.Option([], "--set", "-s", help="Override one key, e.g. --set train.lr=1e-4 (repeatable).")


class _State:
    quiet = False


def progress_enabled() -> bool:
    """Progress bars show unless --quiet was given."""
    return not _State.quiet


@app.callback()
def _main(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    _State.quiet = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_libraries_quiet)


def _libraries_quiet(record: logging.LogRecord) -> bool:
    """Below WARNING, only our own packages speak (open_clip logs its loading on the root logger, FAISS its loader
    fallbacks); `-v` shows everything."""
    if record.levelno >= logging.WARNING:
        return True
    return record.name.split(".")[0] in ("extract", "train", "bench")


LISTINGS: list = []  # callables -> a `# registered ...` line for `ltar config show` (train.cli adds the heads)
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")  # the app's own options, accepted anywhere on the line


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def resolve_config(config: Path, overrides: list[str]) -> Config:
    """Load and validate; a bad config stops here with exit code 2 before any work starts."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise _fail(str(e)) from None


@config_app.command("show")
def config_show(config: Path = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the resolved configuration (defaults, file and --set overrides merged and checked).

    Example: ltar config show --set frames.num_frames=32
    """
    from extract.datasets import dataset_names
    from extract.encoders import encoder_names

    cfg = resolve_config(config, set_)
    typer.echo(dump_yaml(cfg), nl=False)
    typer.echo(f"# registered datasets: {', '.join(dataset_names())}")
    typer.echo(f"# registered encoders: {', '.join(encoder_names())}")
    for listing in LISTINGS:  # stage 2 adds its registries (heads) without this module importing them
        typer.echo(listing())


@app.command()
def synth(config: Path = ConfigOpt, set_: list[str] = SetOpt) -> None:
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
    config: Path = ConfigOpt,
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
    from extract.datasets import DatasetError
    from extract.pipeline import extract as run_extract
    from extract.schema import CacheError
    from extract.store import ExtractError

    cfg = resolve_config(config, set_)
    try:
        if scheduler:
            from extract.scale import extract_distributed

            summary = extract_distributed(cfg, scheduler, progress=progress_enabled(), retries=retries)
        else:
            summary = run_extract(cfg, progress=progress_enabled())
    except (DatasetError, CacheError, ExtractError) as e:
        raise _fail(str(e)) from None
    write_resolved(cfg, summary.store.parent, f"{summary.store.stem}.config.yaml")
    for line in summary.lines():
        typer.echo(line)
    if summary.failures:
        raise typer.Exit(EXIT_FAILURES)


@app.command("pretrain-vlm")
def pretrain_vlm_cmd(config: Path = ConfigOpt, set_: list[str] = SetOpt) -> None:
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
def pretrain_video_cmd(config: Path = ConfigOpt, set_: list[str] = SetOpt) -> None:
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
    config: Path = ConfigOpt, set_: list[str] = SetOpt, store: Path = typer.Option(None, "--store")
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
        raise _fail(str(e)) from None
    for result in results:
        typer.echo(str(result))


@app.command()
def inspect(
    video_id: str = typer.Argument(None, help="A video id; without one, print the cache summary."),
    config: Path = ConfigOpt,
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
    from extract.inspect import cache_summary, inspect_video, locate_store
    from extract.schema import CacheError

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
        raise _fail(str(e).strip("'\"")) from None
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
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Import per-video features from an HDF5 file into a cache store, so heads train on them.

    Every video is resampled to frames.num_frames (uniform rows, or padding with frame_mask False);
    clip/frame is required, arrays the file lacks are zero (listed). Exit code 1 when videos failed.

    Example: ltar import-h5 feats.h5 --dataset manifest --map features=clip/frame --set dataset.root=data/mine
    """
    from extract.datasets import DatasetError
    from extract.interop import import_h5 as run_import
    from extract.schema import CacheError
    from extract.store import ExtractError

    cfg = resolve_config(config, [*set_, *([f"dataset.name={dataset}"] if dataset else [])])
    try:
        summary = run_import(cfg, file, map_)
    except (DatasetError, CacheError, ExtractError) as e:
        raise _fail(str(e)) from None
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
    from extract.interop import export_h5 as run_export
    from extract.schema import CacheError
    from extract.store import ExtractError

    try:
        summary = run_export(store, array, out)
    except (CacheError, ExtractError) as e:
        raise _fail(str(e)) from None
    for line in summary.lines():
        typer.echo(line)


def _format_summary(summary: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in summary.items())


def _os_sentence(e: OSError) -> str:
    """An operating-system error on a path as a sentence with what to do."""
    import errno

    where = e.filename if e.filename is not None else "a file"
    fixes = {
        errno.EROFS: "the file system is read-only; point the output at a writable folder (--set cache.root=..., "
        "--set train.runs_root=..., or --set dataset.root=...)",
        errno.EACCES: "permission denied; make it writable (or readable) for this user, or choose another folder",
        errno.ENOSPC: "the disk is full; free space or choose a folder on another disk, then run the same command "
        "again (finished work is kept)",
        errno.EISDIR: "it is a folder where a file was expected; give the file's path",
        errno.ENOTDIR: "a part of the path is a file where a folder was expected; check the path",
        errno.ENOENT: "it does not exist; check the path",
    }
    fix = fixes.get(e.errno, e.strerror or str(e))
    return f"{where}: {fix}"


def run_app(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the CLI and map every way it can end to an exit code: 0 / 1 as the command decides, 2 with one sentence
    for a user error (config, input, a path the OS refuses), 130 on Ctrl-C, and 3 with a one-line summary for an
    internal error, its traceback written to a file. No traceback reaches the terminal."""
    from extract.datasets import DatasetError
    from extract.schema import CacheError

    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    hoisted = [a for a in argv[:end] if a in GLOBAL_FLAGS]  # -q / -v before or after the subcommand, as documented
    argv = hoisted + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]
    interrupted = (
        "interrupted: every finished video, epoch and run is kept on disk; run the same command again to resume "
        "where it stopped"
    )
    try:
        rv = application(args=argv, standalone_mode=False, prog_name="ltar")
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(interrupted, err=True)
        return EXIT_INTERRUPTED
    except typer.TyperException as e:  # usage errors: no such command or option, a bad option value
        e.show() if hasattr(e, "show") else typer.echo(f"error: {e}", err=True)
        return getattr(e, "exit_code", EXIT_USAGE)
    except (ConfigError, CacheError, DatasetError) as e:
        typer.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    except OSError as e:
        typer.echo(f"error: {_os_sentence(e)}", err=True)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback to a file
        import tempfile
        import time
        import traceback

        where = Path(tempfile.gettempdir()) / f"ltar-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        where.write_text("".join(traceback.format_exception(e)))
        summary = str(e).splitlines()[0] if str(e) else ""
        typer.echo(
            f"internal error: {type(e).__name__}: {summary} (the traceback is in {where}; please report it with "
            "the command you ran)",
            err=True,
        )
        return EXIT_INTERNAL
    if rv == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130) itself
        typer.echo(interrupted, err=True)
    return rv if isinstance(rv, int) else EXIT_OK


def main() -> None:
    """Console-script entry point (see `run_app`)."""
    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
