"""Benchmark VLM pretraining: cost of the demo's tiny CLIP, and proof that it learned the world and its bias.

Trains the `vlm` section of pipeline.yaml (the demo's settings) into a temporary folder with
`pretrain_vlm` and times it, re-runs it (a no-op), then probes the trained checkpoint, loaded through
`encoders.clip.weights` as extraction loads it, beside the random-weight `tiny` preset, on test splits
extended to 256 videos (each video has its own RNG stream, so the first 64 are the demo's):
- zero-shot activity accuracy per video (mean embedding of 8 frames against the activity prompts) on
  test_iid and test_ood (chance 1/8): learned the world, and through the scene, so it drops on test_ood;
- zero-shot atomic-action accuracy of single frames showing an action (chance 1/16): the causal foreground;
- scene bias: from scene-only clips (no action at all), accuracy of naming the activity whose usual scene
  it is (chance 1/8), and the mean cosine margin of each activity's text for its usual scene over others.
Prints a table, then one line of key=value pairs.

Run from the repository root: `.venv/bin/python bench/vlm.py` (or with PYTHONPATH=. before install);
`--smoke` runs the same path on a tiny world in seconds (the test suite does).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# The repository root first: bench/extract.py would otherwise shadow the `extract` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.contract.config import load_config
from extract.encoders.clip import build_clip_encoder  # noqa: E402
from extract.vlm import pretrain_vlm, probe_vlm  # noqa: E402

PROBE_TEST_VIDEOS = 256  # videos per test split for the zero-shot figures


SMOKE = [  # `--smoke`: the same code path in seconds (tests/extract/test_bench.py runs it)
    "vlm.steps=3",
    "vlm.batch_size=8",
    "vlm.frames_per_video=2",
    "synthetic.videos.pretrain=8",
    "synthetic.height=32",
    "synthetic.width=32",
]


def main(argv: list[str] | None = None) -> None:
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    probe_videos = 8 if smoke else PROBE_TEST_VIDEOS
    cfg = load_config(Path(__file__).resolve().parents[1] / "pipeline.yaml", SMOKE if smoke else ())
    with tempfile.TemporaryDirectory(prefix="ltar-vlm-") as out:
        cfg = replace(cfg, vlm=replace(cfg.vlm, out=out))
        t0, c0 = time.perf_counter(), time.process_time()
        result = pretrain_vlm(cfg, progress=sys.stderr.isatty())
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        rerun = pretrain_vlm(cfg, progress=False)
        rerun_s = time.perf_counter() - t0
        assert rerun.skipped, "a re-run with the same config must be a no-op"

        with_weights = replace(cfg.encoders.clip, weights=str(result.checkpoint))
        trained = build_clip_encoder(replace(cfg, encoders=replace(cfg.encoders, clip=with_weights)), "cpu")
        logging.disable(logging.WARNING)  # the random preset's loud banner: expected here
        # the random-weight preset: the config's `weights` (the demo's `vlm`) must not reach it
        random = build_clip_encoder(
            replace(cfg, encoders=replace(cfg.encoders, clip=replace(cfg.encoders.clip, weights=None))), "cpu"
        )
        logging.disable(logging.NOTSET)
        t0 = time.perf_counter()
        got = probe_vlm(trained, cfg, videos=probe_videos)
        base = probe_vlm(random, cfg, videos=probe_videos)
        probe_s = time.perf_counter() - t0

    v = cfg.vlm
    print(
        f"pretrained the tiny CLIP on {result.videos} pretraining videos x {v.frames_per_video} frames, "
        f"{v.steps} steps of {v.batch_size} pairs, torch threads {torch.get_num_threads()}: "
        f"{train_s:.1f} s wall, {train_cpu:.1f} s CPU; final loss {result.final_loss:.3f}, "
        f"in-batch image->text top-1 {result.train_accuracy:.2f}"
    )
    print(f"re-run with the same config: {rerun_s:.3f} s (skipped)")
    print(f"zero-shot probes on {probe_videos} videos per test split (took {probe_s:.1f} s):")
    rows = [
        ("activity, test_iid", "zs_iid", "1/8"),
        ("activity, test_ood", "zs_ood", "1/8"),
        ("atomic action, test_iid frames", "action_iid", "1/16"),
        ("atomic action, test_ood frames", "action_ood", "1/16"),
        ("scene-only clip -> its activity", "scene_bias", "1/8"),
        ("cosine margin, usual vs other scene", "scene_margin", "0"),
    ]
    print(f"  {'figure':<38}{'trained':>9}{'random':>9}{'chance':>8}")
    for name, key, chance in rows:
        print(f"  {name:<38}{got[key]:>9.3f}{base[key]:>9.3f}{chance:>8}")
    figures = {
        **{k: got[k] for k in ("zs_iid", "zs_ood", "scene_bias")},
        **{f"random_{k}": base[k] for k in ("zs_iid", "zs_ood", "scene_bias")},
        **{k: got[k] for k in ("scene_margin", "action_iid", "action_ood")},
        "random_scene_margin": base["scene_margin"],
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "final_loss": result.final_loss,
        "train_i2t": result.train_accuracy,
    }
    print(" ".join(f"{k}={val:.3f}" for k, val in figures.items()))


if __name__ == "__main__":
    main()
