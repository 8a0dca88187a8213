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


def test_intervals_bench_smoke_reports_false_stars_and_coverage_of_both_intervals(capsys):
    from bench import intervals

    intervals.main(["--smoke"])
    figures = _figures(capsys.readouterr().out)
    for metric in ("acc1", "map"):
        for key in ("fp_new", "fp_old", "cover_new", "cover_old"):
            assert 0 <= float(figures[f"{metric}_{key}"]) <= 1


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


def test_import_graph_finds_cross_stage_edges_circles_and_breaches(tmp_path, capsys):
    """bench/imports.py on a made-up tree with a known answer: a lazy import inside a function, a relative import,
    `from pkg import module`, one circle of three extract modules, and one breach of each contract rule beside the
    edges the contract allows (train -> the contract, the console script train.main -> stage 1)."""
    from bench import imports

    files = {
        "extract/__init__.py": "",
        "extract/a.py": "from extract import b\n",
        "extract/b.py": "def f():\n    from .c import x\n    import faiss\n",
        "extract/c.py": "import extract.a\nx = 1\n",
        "extract/d.py": "import numpy\n",
        "extract/e.py": "import train.u\n",  # rule 4
        "extract/contract/__init__.py": "",
        "extract/contract/s.py": "import torch\nfrom extract import d\nimport yaml\n",  # rule 2, twice
        "train/__init__.py": "",
        "train/t.py": "import torch\nfrom extract.d import thing\nfrom . import u\n",  # rule 1
        "train/u.py": "def g():\n    import av\n",  # rule 3
        "train/v.py": "from extract.contract import s\nfrom dask.distributed import Client\n",  # rule 3
        "train/main.py": "import extract.a\n",  # allowed: the console script
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, external = imports.graph(tmp_path)
    assert edges["extract.b"] == {"extract.c"} and edges["train.t"] == {"extract.d", "train.u"}
    assert imports.circles(edges) == [["extract.a", "extract.b", "extract.c"]]
    assert external["extract.b"] == {"faiss"} and external["train.u"] == {"av"}
    assert imports.breaches(edges, external) == [
        "extract.contract.s imports extract.d: the contract imports nothing else of the project (rule 2)",
        "extract.contract.s imports torch: the contract imports no torch (rule 2)",
        "extract.e imports train.u: extract/ never imports train/ (rule 4)",
        "train.t imports extract.d: train/ may import only extract.contract (rule 1)",
        "train.u imports av: train/ never imports av (rule 3)",
        "train.v imports dask.distributed: train/ never imports dask.distributed (rule 3)",
        "import circle: extract.a <-> extract.b <-> extract.c (rule 5)",
    ]
    assert imports.main(["--root", str(tmp_path), "--dot", str(tmp_path / "g.dot")]) == 0  # reports, no --check
    assert imports.main(["--root", str(tmp_path), "--check"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        "modules=13 train_modules_importing_extract=3 extract_modules_imported_by_train=3 beyond_contract=1 "
        "circles=1 breaches=7"
    )
    assert '"train.t" -> "extract.d";' in (tmp_path / "g.dot").read_text()


def test_the_project_keeps_its_import_contract():
    """The real tree: train/ reaches stage 1 only through extract.contract (and the console script), the contract
    imports no library of the encoders, decoders or the cluster, and no module is in an import circle."""
    from bench import imports

    edges, external = imports.graph(imports.ROOT)
    assert imports.breaches(edges, external) == []
    assert any(t.startswith("extract.contract") for t in edges["train.engine"])  # the graph sees the real edges
