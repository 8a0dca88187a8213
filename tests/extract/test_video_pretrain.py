"""`ltar pretrain-video`: clips and their labels, the official `.pyth` layout loaded through
`encoders.timesformer.weights`, a no-op re-run, and a pretrained V that separates atomic actions better than
random weights (the known direction; no tuned threshold)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.contract.config import ConfigError, load_config
from extract.contract.schema import CacheError
from extract.encoders.timesformer import build_timesformer_encoder, load_timesformer
from extract.pipeline import resolve_weights
from extract.synthetic import ATOMIC_ACTIONS, SCENES, render_video
from extract.video_pretrain import ACTION_SCENE, build_clips, plan_clips, pretrain_video, video_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "video.clips=256",
    "video.steps=150",
    "video.batch_size=16",
    "video.lr=0.003",
    "synthetic.height=64",
    "synthetic.width=64",
    "frames.num_frames=8",
    "encoders.clip.weights=null",
]


def _cfg(tmp_path, extra=()):
    cfg = load_config(REPO / "pipeline.yaml", [*TINY, *extra])
    return replace(
        cfg, video=replace(cfg.video, out=str(tmp_path / "video")), encoders=replace(cfg.encoders, device="cpu")
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The pretrained checkpoint, trained with 2 torch threads, which this module's later tests keep; the count is
    restored after the module (left at 2, every later module of the session ran its small ops on 2 threads)."""
    before = torch.get_num_threads()
    cfg = _cfg(tmp_path_factory.mktemp("video"))
    torch.set_num_threads(2)
    yield cfg, pretrain_video(cfg, progress=False)
    torch.set_num_threads(before)


def test_clips_are_balanced_one_action_each_and_tied_to_the_scene_as_configured(tmp_path):
    cfg = _cfg(tmp_path, ["video.clips=1600", "video.scene_tie=0.5"])
    specs = plan_clips(cfg)
    labels = [s.segments[0].label for s in specs]
    counts = np.unique(labels, return_counts=True)[1]
    assert len(counts) == len(ATOMIC_ACTIONS) and counts.min() == counts.max() == 100
    assert all(len(s.segments) == 1 and s.num_frames == cfg.video.clip_frames for s in specs)
    index = {a.name: i for i, a in enumerate(ATOMIC_ACTIONS)}
    usual = np.array([SCENES[ACTION_SCENE[index[lab]]].name == s.scene for lab, s in zip(labels, specs, strict=True)])
    assert abs(usual.mean() - 0.5) < 0.05  # binomial(1600, .5): sd 0.0125
    none = plan_clips(_cfg(tmp_path, ["video.clips=1600", "video.scene_tie=0.0"]))
    assert not any(s.usual_scene for s in none)


def test_frame_labels_mark_exactly_the_frames_where_the_object_is_drawn(tmp_path):
    cfg = _cfg(tmp_path, ["video.clips=16"])
    data = build_clips(cfg)
    for i, spec in enumerate(plan_clips(cfg)):
        _, mask = render_video(spec, cfg.synthetic)  # (T, H, W)
        drawn = mask.any(axis=(1, 2))
        assert np.array_equal(drawn, (data.frame_action[i] >= 0).numpy())
        assert (data.frame_action[i][drawn] == data.action[i]).all()


def test_checkpoint_is_the_official_layout_and_loads_through_encoders_timesformer_weights(trained):
    cfg, result = trained
    raw = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert set(raw) == {"epoch", "model_state", "cfg"}
    keys = set(raw["model_state"])
    assert all(k.startswith("model.") for k in keys)
    assert {"model.blocks.0.temporal_attn.qkv.weight", "model.time_embed", "model.head.weight"} <= keys
    assert raw["model_state"]["model.head.weight"].shape[0] == len(ATOMIC_ACTIONS)
    model, facts = load_timesformer(result.checkpoint)
    # cfg: the YAML dump the official file holds; its DATA section is the clips the model was trained on:
    # 8 consecutive rendered frames at the world's rate, normalised as the official model.
    assert isinstance(raw["cfg"], str)
    trained_on = {"clip_frames": cfg.video.clip_frames, "sampling_rate": 1, "target_fps": cfg.synthetic.fps}
    assert facts == {
        "layout": "official",
        "head_classes_ignored": len(ATOMIC_ACTIONS),
        "checkpoint_data": {**trained_on, "mean": (0.45,) * 3, "std": (0.225,) * 3},
    }
    resolved = resolve_weights(cfg)  # encoders.timesformer.weights: video -> this checkpoint
    assert resolved.encoders.timesformer.weights == str(video_checkpoint(cfg)) == str(result.checkpoint)
    enc = build_timesformer_encoder(resolved, "cpu")
    assert enc.provenance()["layout"] == "official" and enc.provenance()["weights"] == str(result.checkpoint)
    # extraction feeds it the same clips: the demo's encoder follows the same rule as a K400 checkpoint
    assert {k: enc.sampling[k] for k in trained_on} == trained_on
    for name, p in model.state_dict().items():
        assert torch.equal(p, raw["model_state"]["model." + name])


def test_a_rerun_is_a_no_op_and_a_changed_section_retrains_elsewhere(trained):
    cfg, result = trained
    again = pretrain_video(cfg, progress=False)
    assert again.skipped and again.checkpoint == result.checkpoint
    other = replace(cfg, video=replace(cfg.video, scene_tie=0.9))
    assert video_checkpoint(other) != result.checkpoint


def test_missing_checkpoint_is_a_sentence_naming_the_key_and_the_command(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(CacheError, match=r"encoders\.timesformer\.weights is 'video'.*ltar pretrain-video"):
        resolve_weights(cfg)


def test_unknown_key_in_the_video_section_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"video\.stepz"):
        load_config(REPO / "pipeline.yaml", ["video.stepz=3"])


def test_pretrained_v_separates_atomic_actions_better_than_random_weights(trained, caplog):
    """Nearest-class-mean accuracy of single frames' V on held-out clips (a probe with no fitted knobs)."""
    cfg, result = trained
    held = replace(cfg, synthetic=replace(cfg.synthetic, pretrain_seed=cfg.synthetic.pretrain_seed + 1))
    data = build_clips(replace(held, video=replace(held.video, clips=320)))
    fit, test = np.arange(0, 320, 2), np.arange(1, 320, 2)

    def accuracy(weights):
        tsf = replace(cfg.encoders.timesformer, weights=weights)
        enc = build_timesformer_encoder(replace(cfg, encoders=replace(cfg.encoders, timesformer=tsf)), "cpu")
        with torch.no_grad():
            _, tokens = enc.model(data.pixels.float())  # (N, T, P, D)
        V = torch.nn.functional.normalize(tokens.mean(dim=2), dim=-1)  # (N, T, D)
        y = data.frame_action  # (N, T)
        Vf, yf = V[fit][y[fit] >= 0], y[fit][y[fit] >= 0]
        onehot = torch.nn.functional.one_hot(yf, len(ATOMIC_ACTIONS)).float()  # (M, K)
        means = (onehot.T @ Vf) / onehot.sum(0)[:, None]  # (K, D) class means
        Vt, yt = V[test][y[test] >= 0], y[test][y[test] >= 0]
        return float(((Vt @ means.T).argmax(1) == yt).float().mean())

    with caplog.at_level(logging.ERROR):
        trained_acc, random_acc = accuracy(str(result.checkpoint)), accuracy(None)
    print(f"nearest-mean frame accuracy: trained {trained_acc:.3f}, random {random_acc:.3f}")
    assert trained_acc > random_acc
