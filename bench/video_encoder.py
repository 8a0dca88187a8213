"""Benchmark video-encoder pretraining: cost of the demo's tiny TimeSformer, and what its V carries.

Trains the `video` section of pipeline.yaml (the demo's settings) into a temporary folder with
`pretrain_video` and times it, re-runs it (a no-op), then loads the checkpoint through
`encoders.timesformer.weights` (the official-layout path a K400 `.pyth` takes) beside the random-weight
`tiny` preset, and fits linear probes (scikit-learn logistic regression on standardised features) on V of
the world's train videos, L = frames.num_frames uniform frames each, as extraction samples them:
- atomic action of each frame showing one (chance 1/16), scored on test_iid and test_ood frames;
- scene of each video from its mean V (chance 1/8), scored on test_iid and test_ood.
A pretrained encoder should carry the actions far better than random weights; how much scene it keeps is
the mild scene bias of its pretraining clips (`video.scene_tie`). Prints a table, then one line of key=value.

Run from the repository root: `.venv/bin/python bench/video_encoder.py`; `--smoke` runs the same path on a
tiny world in seconds (the test suite does).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.contract.config import Config, load_config
from extract.encoders.timesformer import TimesformerEncoder, build_timesformer_encoder  # noqa: E402
from extract.synthetic import SCENES, plan_split, render_video  # noqa: E402
from extract.video_pretrain import pretrain_video  # noqa: E402
from extract.vlm import _frame_labels  # noqa: E402

PROBE_VIDEOS = {"train": 192, "test_iid": 256, "test_ood": 256}  # videos per split for the probes

SMOKE = [  # `--smoke`: the same code path in seconds (tests/extract/test_bench.py runs it)
    "video.steps=3",
    "video.batch_size=4",
    "video.clips=16",
    "synthetic.height=32",
    "synthetic.width=32",
    "frames.num_frames=4",
]
SMOKE_VIDEOS = {"train": 16, "test_iid": 8, "test_ood": 8}


def split_features(encoder: TimesformerEncoder, cfg: Config, split: str, n: int) -> tuple[np.ndarray, ...]:
    """V (n, L, Dv) of the first n videos of `split`, their frame actions (n, L) (-1 idle) and scenes (n,)."""
    world = replace(cfg.synthetic, videos=replace(cfg.synthetic.videos, **{split: n}))
    L = cfg.frames.num_frames
    feats, actions, scenes = [], [], []
    scene_index = {s.name: i for i, s in enumerate(SCENES)}
    for lo in range(0, n, 16):
        specs = plan_split(world, split)[lo : lo + 16]
        picks = [np.linspace(0, s.num_frames - 1, L).round().astype(int) for s in specs]
        frames = np.stack([render_video(s, world)[0][p] for s, p in zip(specs, picks, strict=True)])  # (b, L, H, W, 3)
        feats.append(encoder.encode(torch.from_numpy(frames))["frame"].numpy())  # (b, L, Dv)
        actions += [_frame_labels(s)[p] for s, p in zip(specs, picks, strict=True)]
        scenes += [scene_index[s.scene] for s in specs]
    return np.concatenate(feats), np.stack(actions), np.array(scenes)


def probe(encoder: TimesformerEncoder, cfg: Config, videos: dict[str, int]) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = {split: split_features(encoder, cfg, split, n) for split, n in videos.items()}
    V, act, scene = data["train"]
    shown = act >= 0  # (n, L)
    action_probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(V[shown], act[shown])
    scene_probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(V.mean(axis=1), scene)
    out = {}
    for split, tag in (("test_iid", "iid"), ("test_ood", "ood")):
        V, act, scene = data[split]
        shown = act >= 0
        out[f"action_{tag}"] = float(action_probe.score(V[shown], act[shown]))
        out[f"scene_{tag}"] = float(scene_probe.score(V.mean(axis=1), scene))
    return out


def main(argv: list[str] | None = None) -> None:
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    videos = SMOKE_VIDEOS if smoke else PROBE_VIDEOS
    cfg = load_config(Path(__file__).resolve().parents[1] / "pipeline.yaml", SMOKE if smoke else ())
    with tempfile.TemporaryDirectory(prefix="ltar-video-") as out:
        cfg = replace(cfg, video=replace(cfg.video, out=out), encoders=replace(cfg.encoders, device="cpu"))
        t0, c0 = time.perf_counter(), time.process_time()
        result = pretrain_video(cfg, progress=sys.stderr.isatty())
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        assert pretrain_video(cfg, progress=False).skipped, "a re-run with the same config must be a no-op"
        rerun_s = time.perf_counter() - t0

        def encoder(weights: str | None) -> TimesformerEncoder:
            tsf = replace(cfg.encoders.timesformer, weights=weights)
            return build_timesformer_encoder(replace(cfg, encoders=replace(cfg.encoders, timesformer=tsf)), "cpu")

        trained = encoder(str(result.checkpoint))
        logging.disable(logging.WARNING)  # the random preset's loud banner: expected here
        random = encoder(None)
        logging.disable(logging.NOTSET)
        t0 = time.perf_counter()
        got, base = probe(trained, cfg, videos), probe(random, cfg, videos)
        probe_s = time.perf_counter() - t0

    v = cfg.video
    print(
        f"pretrained the tiny TimeSformer on {result.clips} clips x {v.clip_frames} frames, {v.steps} steps of "
        f"{v.batch_size} clips, torch threads {torch.get_num_threads()}: {train_s:.1f} s wall, {train_cpu:.1f} s CPU; "
        f"final loss {result.final_loss:.3f}, clip top-1 {result.train_accuracy:.2f}; "
        f"loaded as layout {trained.provenance()['layout']}"
    )
    print(f"re-run with the same config: {rerun_s:.3f} s (skipped)")
    print(
        f"linear probes on V, fit on {videos['train']} train videos, scored on {videos['test_iid']} per test split "
        f"({cfg.frames.num_frames} frames each; took {probe_s:.1f} s):"
    )
    rows = [
        ("atomic action of a frame, test_iid", "action_iid", "1/16"),
        ("atomic action of a frame, test_ood", "action_ood", "1/16"),
        ("scene of a video, test_iid", "scene_iid", "1/8"),
        ("scene of a video, test_ood", "scene_ood", "1/8"),
    ]
    print(f"  {'probe':<38}{'trained':>9}{'random':>9}{'chance':>8}")
    for name, key, chance in rows:
        print(f"  {name:<38}{got[key]:>9.3f}{base[key]:>9.3f}{chance:>8}")
    figures = {
        **got,
        **{f"random_{k}": val for k, val in base.items()},
        "action_ood_ratio": got["action_ood"] / max(base["action_ood"], 1e-9),
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "final_loss": result.final_loss,
    }
    print(" ".join(f"{k}={val:.3f}" for k, val in figures.items()))


if __name__ == "__main__":
    main()
