"""The command line's plumbing both stages share: the `ltar` app, the options every command takes, exit codes,
`ltar config show`, and the mapping of every way a command can end to an exit code and one sentence.

Each stage adds its own commands to `app` (extract/cli.py, train/cli.py); train/main.py, the console script,
imports both.

Every command takes `--config PATH` (default pipeline.yaml; repeatable: later files are merged over earlier
ones) and repeated `--set KEY=VALUE`.
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

from extract.contract.config import Config, ConfigError, dump_yaml, load_config

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
ConfigOpt = typer.Option(
    [Path("pipeline.yaml")],
    "--config",
    "-c",
    help="The pipeline YAML file; repeat it to merge override files over it, e.g. -c pipeline.yaml "
    "-c configs/worlds/benchmark.yaml.",
)
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


LISTINGS: list = []  # callables -> a `# registered ...` line for `ltar config show` (each stage adds its registries)
# errors whose message is a sentence for the user (exit code 2); each stage adds its own
USER_ERRORS: list[type[Exception]] = []
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")  # the app's own options, accepted anywhere on the line


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print `error: <sentence>` and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def resolve_config(config: list[Path], overrides: list[str]) -> Config:
    """Load and validate; a bad config stops here with exit code 2 before any work starts."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise fail(str(e)) from None


@config_app.command("show")
def config_show(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the resolved configuration (defaults, file and --set overrides merged and checked).

    Example: ltar config show --set frames.num_frames=32
    """
    cfg = resolve_config(config, set_)
    typer.echo(dump_yaml(cfg), nl=False)
    for listing in LISTINGS:  # each stage adds its registries (datasets, encoders, heads)
        typer.echo(listing())


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
    from extract.contract.schema import CacheError

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
    except (ConfigError, CacheError, *USER_ERRORS) as e:
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
