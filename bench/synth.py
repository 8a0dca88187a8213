"""Benchmark the synthetic generator: render time of the default world, and proof that its confounder is real.

Renders the default demo-size world (train/test_iid/test_ood of `SyntheticConfig()`) into a temporary
folder with `write_dataset` (2 processes) and times it, then, in memory, with the test splits extended
to 256 videos so the figures are not sampling noise, trains logistic regressions on downsampled mean frames
(`probe_confounders`): full frames, the same world with rho at chance, background-only frames (object
pixels replaced by the empty scene through the masks) and foreground-only frames (scene replaced by grey),
the last also in the same world with add_salt_pepper at one rate in every split. A real scene confounder
shows as a large iid/ood gap on full and background frames and a closed gap at rho = 1/8; what is left
of the foreground gap is the co-occurrence confounder, and it closes when the rates are even.
Prints a table, then one line of key=value pairs.

Run from the repository root: `.venv/bin/python bench/synth.py` (or with PYTHONPATH=. before install).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# the repository root first: run as `python bench/X.py`, bench/extract.py would shadow the extract package
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import os
import sys
import tempfile
import time
from dataclasses import replace

from extract.config import SyntheticConfig
from extract.synthetic import probe_confounders, write_dataset

PROBE_TEST_VIDEOS = 256  # videos per test split for the classifier figures


def main() -> None:
    cfg = SyntheticConfig()
    workers = min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="ltar-synth-") as root:
        summary = write_dataset(cfg, root, progress=sys.stderr.isatty(), workers=workers)
        rerun = write_dataset(cfg, root, progress=False, workers=workers)
    videos = sum(summary["videos"].values())
    t0 = time.perf_counter()
    # The demo's test splits extended (each video has its own RNG stream, so the first 64 are the demo's):
    # accuracy on 64 videos carries +-0.06 of sampling noise, on 256 about +-0.03.
    probe_cfg = replace(cfg, videos=replace(cfg.videos, test_iid=PROBE_TEST_VIDEOS, test_ood=PROBE_TEST_VIDEOS))
    r = probe_confounders(probe_cfg, size=8, workers=workers)
    # The same world with add_salt_pepper at one rate everywhere: what is left of the foreground gap.
    middle = (cfg.cooccur_high + cfg.cooccur_low) / 2
    even = probe_confounders(replace(probe_cfg, cooccur_high=middle, cooccur_low=middle), size=8, workers=workers)
    r["fg_even_iid"], r["fg_even_ood"] = even["fg_iid"], even["fg_ood"]
    probe_s = time.perf_counter() - t0

    print(
        f"rendered {videos} videos {summary['videos']} at {cfg.width}x{cfg.height}, {cfg.fps} fps, "
        f"{cfg.min_seconds:g}-{cfg.max_seconds:g} s, {cfg.codec} q{cfg.quality}: {summary['seconds']:.1f} s "
        f"with {workers} processes, {summary['bytes'] / 2**20:.1f} MiB"
    )
    print(f"re-run with the same config: {rerun['seconds']:.2f} s, {rerun['skipped']} videos skipped")
    print(
        f"mean-frame logistic regression, trained on train ({cfg.videos.train}), tested on "
        f"{PROBE_TEST_VIDEOS} videos per test split (took {probe_s:.1f} s):"
    )
    print(f"  {'features':<28}{'test_iid':>10}{'test_ood':>10}{'gap':>8}")
    rows = [
        (f"full frames, rho={cfg.rho:g}", "acc_iid", "acc_ood"),
        ("full frames, rho=1/8", "unconf_iid", "unconf_ood"),
        ("background only", "bg_iid", "bg_ood"),
        ("foreground only", "fg_iid", "fg_ood"),
        ("foreground, even co-occur.", "fg_even_iid", "fg_even_ood"),
    ]
    for name, iid, ood in rows:
        print(f"  {name:<28}{r[iid]:>10.3f}{r[ood]:>10.3f}{r[iid] - r[ood]:>8.3f}")
    line = {
        "render_s": f"{summary['seconds']:.2f}",
        "videos": videos,
        "mib": f"{summary['bytes'] / 2**20:.1f}",
        "rerun_s": f"{rerun['seconds']:.2f}",
        **{k: f"{r[k]:.3f}" for k in ("acc_iid", "acc_ood", "gap", "unconf_iid", "unconf_ood", "unconf_gap")},
        **{k: f"{r[k]:.3f}" for k in ("bg_iid", "bg_ood", "fg_iid", "fg_ood", "fg_even_iid", "fg_even_ood")},
        "probe_s": f"{probe_s:.1f}",
    }
    print(" ".join(f"{k}={v}" for k, v in line.items()))


if __name__ == "__main__":
    main()
