"""Every way the command line ends: an exit code a script can trust and one sentence, never a traceback.

Each case runs the console script's own entry (`extract.contract.cli.run_app`, what `ltar` runs) and checks the exit
code, the sentence on stderr and that no traceback reached it. Exit codes (README): 0 success, 1 finished with recorded
failures, 2 bad usage / configuration / input, 3 internal error (traceback written to a file), 130 interrupted.
"""

import errno
import json
from pathlib import Path

import pytest
import torch

from extract.contract.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, run_app
from train.main import app  # the full app: every command registered

REPO = Path(__file__).resolve().parents[2]
RANDOM_WEIGHTS = ["--set", "encoders.clip.weights=null", "--set", "encoders.timesformer.weights=null"]


def ltar(capsys, *argv: str) -> tuple[int, str]:
    """Run `ltar argv...` as the console script does: (exit code, stderr)."""
    code = run_app(app, list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def test_config_path_that_is_a_directory(capsys):
    code, err = ltar(capsys, "config", "show", "--config", str(REPO / "extract"))
    assert code == EXIT_USAGE and "is a directory; give the pipeline YAML file" in err


def test_a_section_set_to_a_value_names_set(capsys):
    code, err = ltar(capsys, "config", "show", "--config", str(REPO / "pipeline.yaml"), "--set", "train=5")
    assert code == EXIT_USAGE and "--set 'train=5': train is a section" in err
    code, err = ltar(capsys, "config", "show", "--config", str(REPO / "pipeline.yaml"), "--set", "train.lr=abc")
    assert code == EXIT_USAGE and "with --set train.lr=abc: train.lr: expected a number" in err


def test_dataset_root_that_is_a_file(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS, "--set", f"dataset.root={afile}"]
    code, err = ltar(capsys, *args, "--set", f"cache.root={tmp_path / 'cache'}")
    assert code == EXIT_USAGE and f"dataset.root {afile} is a file" in err


def test_malformed_classes_json_names_the_file(capsys, tmp_path, tiny_cache):
    cfg, _ = tiny_cache
    root = tmp_path / "world"
    root.mkdir()
    for name in ("manifest.jsonl", "world.json"):
        (root / name).write_text((Path(cfg.dataset.root) / name).read_text())
    (root / "classes.json").write_text("{not json")
    args = ["extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS, "--set", f"dataset.root={root}"]
    code, err = ltar(capsys, *args, "--set", f"cache.root={tmp_path / 'cache'}")
    assert code == EXIT_USAGE and f"{root / 'classes.json'} is not valid JSON" in err
    (root / "classes.json").write_text(json.dumps({"activity": "cook"}))
    code, err = ltar(capsys, *args, "--set", f"cache.root={tmp_path / 'cache'}")
    assert code == EXIT_USAGE and "must map each task to a list of class names" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_cuda_device_on_a_machine_without_one_leaves_no_folder(capsys, tmp_path, tiny_cache):
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    args = ["extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS, "--set", f"cache.root={cache}"]
    code, err = ltar(capsys, *args, "--set", f"dataset.root={cfg.dataset.root}", "--set", "encoders.device=cuda:0")
    assert code == EXIT_USAGE and "encoders.device is 'cuda:0' but torch sees no CUDA GPU" in err
    assert not cache.exists() or not any(cache.rglob("*.zarr"))  # nothing half-made


def test_a_read_only_file_system_is_a_sentence(capsys, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", "cache/synthetic/abc.zarr")

    monkeypatch.setattr("extract.pipeline.extract", refuse)
    code, err = ltar(capsys, "extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS)
    assert code == EXIT_USAGE and "cache/synthetic/abc.zarr: the file system is read-only" in err
    assert "--set cache.root=" in err


def test_an_internal_error_is_one_line_and_its_traceback_a_file(capsys, monkeypatch):
    def broken(*a, **k):
        raise ValueError("an invariant broke\nsecond line")

    monkeypatch.setattr("extract.pipeline.extract", broken)
    code, err = ltar(capsys, "extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS)
    assert code == EXIT_INTERNAL and err.count("\n") == 1
    assert err.startswith("internal error: ValueError: an invariant broke (the traceback is in ")
    written = Path(err.split("the traceback is in ")[1].split(";")[0])
    assert "Traceback" in written.read_text() and "an invariant broke" in written.read_text()


def test_ctrl_c_says_what_was_kept_and_how_to_resume(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("extract.pipeline.extract", interrupted)
    code, err = ltar(capsys, "extract", "--config", str(REPO / "pipeline.yaml"), *RANDOM_WEIGHTS)
    assert code == EXIT_INTERRUPTED and "run the same command again to resume" in err


def test_usage_errors_and_global_flags_after_the_subcommand(capsys):
    code, err = ltar(capsys, "nosuch")
    assert code == EXIT_USAGE and "No such command 'nosuch'" in err
    code, err = ltar(capsys, "config", "show", "--config", str(REPO / "pipeline.yaml"), "-q")  # -q after it
    assert code == 0
    code, err = ltar(capsys, "train", "--bogus")
    assert code == EXIT_USAGE and "No such option: --bogus" in err


def test_libraries_info_lines_are_quiet_unless_verbose():
    import logging

    from extract.contract.cli import _libraries_quiet

    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, "msg", None, None)

    assert not _libraries_quiet(record("root", logging.INFO))  # open_clip's "INFO root: Loading ..."
    assert not _libraries_quiet(record("faiss.loader", logging.INFO))
    assert _libraries_quiet(record("faiss.loader", logging.WARNING))
    assert _libraries_quiet(record("extract.datasets", logging.INFO)) and _libraries_quiet(record("train.engine", 10))


@pytest.mark.parametrize("raw,disk,words", [(100, 40, "(2.5x smaller)"), (40, 100, "(2.5x larger: chunk overhead)")])
def test_the_size_line_says_smaller_or_larger_never_a_fraction_smaller(raw, disk, words):
    from extract.pipeline import ExtractSummary

    line = ExtractSummary(Path("s.zarr"), 1, store_bytes=disk * 2**20, raw_fp32_bytes=raw * 2**20).lines()[3]
    assert line.endswith(words), line
