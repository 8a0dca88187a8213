"""Stage 2's commands end as every command does: an exit code a script can trust and one sentence, never a
traceback (tests/extract/test_cli_errors.py holds the other cases and the exit codes)."""

from pathlib import Path

import pytest
import torch

from extract.contract.cli import EXIT_USAGE, run_app
from train.main import app  # the full app: every command registered

REPO = Path(__file__).resolve().parents[2]


def ltar(capsys, *argv: str) -> tuple[int, str]:
    """Run `ltar argv...` as the console script does: (exit code, stderr)."""
    code = run_app(app, list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", None])
def test_an_empty_garbage_or_truncated_checkpoint_is_a_sentence(capsys, tmp_path, content):
    ckpt = tmp_path / "last.pt"
    if content is None:  # truncated: the first half of a real checkpoint
        torch.save({"model": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        ckpt.write_bytes(content)
    code, err = ltar(capsys, "evaluate", str(ckpt), "--config", str(REPO / "pipeline.yaml"))
    assert code == EXIT_USAGE and str(ckpt) in err


def test_zero_seeds_is_refused(capsys):
    code, err = ltar(capsys, "ablate", "--table", "main", "--seeds", "0", "--config", str(REPO / "pipeline.yaml"))
    assert code == EXIT_USAGE and "Invalid value for '--seeds'" in err and "greater than or equal to 1" in err
