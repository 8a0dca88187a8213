"""Stage 1's benches that do not rot: each bench with a smoke size runs its own code path here, on tiny inputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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


def _figures(out: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in out.strip().splitlines()[-1].split())


def test_extract_bench_smoke_measures_the_stages_and_the_per_frame_cost(capsys):
    from bench import extract as bench_extract

    bench_extract.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    assert {"decode_fps", "encode_fps", "e2e_fps", "tiny_cpu_ms_per_frame"} <= set(figures)
    assert float(figures["tiny_cpu_ms_per_frame"]) > 0


def test_dictionaries_bench_smoke_reports_kmeans_against_sgemm(capsys):
    from bench import dictionaries

    dictionaries.main(["--smoke", "--threads", "1"])
    figures = _figures(capsys.readouterr().out)
    assert float(figures["sgemm_gflops"]) > 0 and 0 < float(figures["faiss_of_sgemm"]) < 10
    assert abs(float(figures["objective_gap"])) < 0.05  # same start, same iterations: the same local optimum


def test_saliency_bench_smoke_scores_every_method_against_the_rendered_object(capsys):
    from bench import saliency

    saliency.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    assert {"clip_random_object", "clip_random_area", "spectral_object", "spectral_object_random"} <= set(figures)
    assert all(0.0 <= float(v) <= 1.0 for v in figures.values())


def test_saliency_box_scores_known_answers():
    """The object share inside a box and its area, against a hand count on a 10x10 frame."""
    import numpy as np
    import torch

    from bench.saliency import box_scores

    objects = np.zeros((1, 10, 10), bool)
    objects[0, 2:4, 2:6] = True  # 8 pixels; the box x [0, 0.5], y [0, 0.3] holds rows 0-2 x cols 0-4: 1 x 3 of them
    others = np.zeros_like(objects)
    others[0, 0, 0] = True
    s = box_scores(torch.tensor([[0.0, 0.0, 0.5, 0.3]]), objects, others)
    assert s["object"] == 3 / 8 and s["area"] == 15 / 100 and s["distractor"] == 1.0
