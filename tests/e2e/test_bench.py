"""Benches across both stages at their smoke size: bench/train.py (heads, runs per extraction, a table's wall
time on an extracted cache) and bench/gpu.py (every step of extraction and of stage 2)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _figures(out: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())


def test_train_bench_smoke_measures_every_head_and_runs_per_extraction(capsys):
    from bench import train as bench_train
    from train.heads import head_names

    bench_train.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    for head in head_names():
        assert float(figures[f"{head}_smoke_steps_s"]) > 0 and float(figures[f"{head}_runs_per_extraction"]) > 0
    assert figures["within_4gib"] in ("True", "False") and float(figures["ms_per_frame"]) > 0
    assert all(float(figures[f"table_{m}_ratio"]) > 0 for m in ("shared", "stacked", "workers", "dask"))


def test_gpu_bench_smoke_runs_every_step_on_the_cpu(capsys):
    """bench/gpu.py's every step (render and re-encode, decode by workers and keyframe interval, the encode split,
    writes, the encoders alone, end to end, compile, stage 2 one-at-a-time and stacked, k-means) on tiny inputs."""
    from bench import gpu

    gpu.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    stages = {f"enc_{s}_ms" for s in ("upload", "clip_view", "clip_frames", "saliency", "crops", "clip_crops")}
    keys = {"decode_fps_w1", "decode_fps_gop30", "decode_fps_gop250", "enc_timesformer_ms", "write_ms_per_group"}
    keys |= {"clip_fps", "ceiling_fps", "e2e_fps", "e2e_over_ceiling", "clip_compiled_maxdiff", "tsf_compiled_ms"}
    keys |= {"steps_s_one", "steps_s_stacked", "kmeans_s"}
    assert stages | keys <= set(figures)
    assert float(figures["clip_compiled_maxdiff"]) < 1e-4 and float(figures["tsf_compiled_maxdiff"]) < 1e-4
    assert figures["gpu_util_mean"] == "none" and figures["kmeans_device"] == "cpu"
