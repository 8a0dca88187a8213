"""Stage 2's benches that do not rot: the intervals bench at its smoke size."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _figures(out: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())


def test_intervals_bench_smoke_reports_false_stars_and_coverage_of_both_intervals(capsys):
    from bench import intervals

    intervals.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    for metric in ("acc1", "map"):
        for key in ("fp_new", "fp_old", "cover_new", "cover_old"):
            assert 0 <= float(figures[f"{metric}_{key}"]) <= 1
