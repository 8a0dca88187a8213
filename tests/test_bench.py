"""Benches that do not rot: each bench with a smoke size runs its own code path here, on tiny inputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_vlm_bench_smoke_compares_the_trained_clip_with_the_random_preset(capsys):
    from bench import vlm

    vlm.main(["--smoke"])
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert {"zs_iid", "random_zs_iid", "train_s"} <= set(figures)
    assert all(float(v) == float(v) for v in figures.values())  # numbers, no NaN


def test_video_encoder_bench_smoke_probes_the_trained_and_the_random_timesformer(capsys):
    from bench import video_encoder

    video_encoder.main(["--smoke"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert {"action_ood", "random_action_ood", "scene_ood", "train_s"} <= set(figures)
    assert all(float(v) == float(v) for v in figures.values())
