"""VLM pretraining: a short run on a small pretraining split learns the scene shortcut (the random preset
shows none), its checkpoint loads through `encoders.clip.weights` with the same embeddings, a re-run is a
no-op, and only the pretraining split is ever planned or rendered."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch

import extract.vlm as vlm
from extract.config import ClipConfig, EncodersConfig, SplitSizes, SyntheticConfig, VlmConfig
from extract.contract.config import Config
from extract.encoders.clip import TINY_MODEL_NAME, build_clip_encoder
from extract.synthetic import plan_split

torch.set_num_threads(1)

# Small and quick: 48 pretraining videos x 4 frames, 100 steps of 64 pairs (about 10-20 s on 2 cores).
STEPS = 100


def _cfg(out, weights=None, **vlm_kw) -> Config:
    world = SyntheticConfig(videos=SplitSizes(train=16, test_iid=48, test_ood=48, pretrain=48))
    vc = VlmConfig(steps=STEPS, batch_size=64, lr=1e-3, frames_per_video=4, out=str(out), **vlm_kw)
    return Config(synthetic=world, vlm=vc, encoders=EncodersConfig(clip=ClipConfig(weights=weights)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm")
    cfg = _cfg(out)
    seen = {"planned": [], "rendered": set()}
    plan, render = vlm.plan_split, vlm.render_video

    def spy_plan(world, split):
        seen["planned"].append(split)
        return plan(world, split)

    def spy_render(spec, world):
        seen["rendered"].add(spec.split)
        return render(spec, world)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlm, "plan_split", spy_plan)
        mp.setattr(vlm, "render_video", spy_render)
        result = vlm.pretrain_vlm(cfg, progress=False)
    return cfg, result, seen


def test_pretraining_writes_a_checkpoint_and_a_summary(trained):
    cfg, r, _ = trained
    assert not r.skipped and r.steps == STEPS and r.videos == 48
    assert r.checkpoint == vlm.vlm_checkpoint(cfg) and r.checkpoint.parent.name == r.fingerprint
    folder = r.checkpoint.parent
    assert sorted(p.name for p in folder.iterdir()) == ["clip.json", "clip.pt", "vlm.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    summary = json.loads((folder / "vlm.json").read_text())
    assert summary["fingerprint"] == r.fingerprint and summary["frames"] == 48 * 4
    assert len(summary["curve"]) == 20 and summary["config"]["vlm"]["steps"] == STEPS
    # It learned something: the loss fell and in-batch retrieval beats chance (1/64 at most for unique captions).
    assert summary["curve"][-1]["loss"] < summary["curve"][0]["loss"] - 0.5
    assert r.train_accuracy > 0.1


def test_only_the_pretraining_split_is_used(trained):
    cfg, _, seen = trained
    assert set(seen["planned"]) == {"pretrain"} and seen["rendered"] == {"pretrain"}
    pre = plan_split(cfg.synthetic, "pretrain")
    others = [s for split in ("train", "test_iid", "test_ood") for s in plan_split(cfg.synthetic, split)]
    assert not {s.seed for s in pre} & {s.seed for s in others}
    assert not {s.id for s in pre} & {s.id for s in others}


def test_rerun_is_a_noop_and_the_fingerprint_tracks_what_matters(trained, tmp_path):
    cfg, r, _ = trained
    again = vlm.pretrain_vlm(cfg, progress=False)
    assert again.skipped and again.checkpoint == r.checkpoint and again.final_loss == r.final_loss
    fp = vlm.vlm_fingerprint
    # Not hashed: where it is written, the test splits, the train/test seed, the mp4 codec.
    assert fp(replace(cfg, vlm=replace(cfg.vlm, out=str(tmp_path)))) == r.fingerprint
    world = cfg.synthetic
    assert fp(replace(cfg, synthetic=replace(world, seed=7, videos=replace(world.videos, train=3)))) == r.fingerprint
    # Hashed: the training settings and the pretraining world.
    assert fp(replace(cfg, vlm=replace(cfg.vlm, steps=STEPS + 1))) != r.fingerprint
    assert fp(replace(cfg, synthetic=replace(world, rho=0.5))) != r.fingerprint
    assert fp(replace(cfg, synthetic=replace(world, pretrain_seed=5))) != r.fingerprint
    assert fp(replace(cfg, synthetic=replace(world, videos=replace(world.videos, pretrain=64)))) != r.fingerprint
    # A pretrain size of 0 trains on the default count, and hashes as that count.
    zero = replace(world, videos=replace(world.videos, pretrain=0))
    default = replace(world, videos=replace(world.videos, pretrain=vlm.DEFAULT_PRETRAIN_VIDEOS))
    assert fp(replace(cfg, synthetic=zero)) == fp(replace(cfg, synthetic=default))
    # Options added to the world later hash only when on: an old world keeps its checkpoint (and its caches).
    off = replace(world, distractor_rho=0.3, idle_rho=0.3, videos=replace(world.videos, test_ood_scene=9))
    assert fp(replace(cfg, synthetic=off)) == r.fingerprint
    assert fp(replace(cfg, synthetic=replace(world, distractor=True))) != r.fingerprint
    assert fp(replace(cfg, synthetic=replace(world, idle_marker=True))) != r.fingerprint


def test_caption_tokens_equal_the_tokenizer():
    texts, tokens = vlm.caption_texts(), vlm.caption_tokens()
    assert tokens.shape == (len(texts), 77) and len(texts) == len(vlm.CAPTION_TEMPLATES) * vlm.NUM_SUBJECTS
    rows = np.random.default_rng(0).choice(len(texts), 300, replace=False)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL_NAME)
    assert torch.equal(tokens[rows], tokenizer([texts[i] for i in rows]))
    assert (
        texts[vlm._subject_index(torch.tensor(1), torch.tensor(2), torch.tensor(0))]
        == "make scrambled egg, whisk batter"
    )


def test_checkpoint_loads_through_encoders_clip_weights(trained):
    cfg, r, _ = trained
    enc = build_clip_encoder(_cfg(cfg.vlm.out, weights=str(r.checkpoint)), "cpu")
    assert enc.provenance()["source"] == "weights" and not enc.provenance()["random_weights"]
    model = vlm._create_model(0, torch.device("cpu"))
    model.load_state_dict(torch.load(r.checkpoint, weights_only=True))
    model.eval()
    frames = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    tokens = enc.tokenizer(["make tea", "a video of make cereal, pour milk."])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(enc.preprocess(frames)), dim=-1)
        txt = model.encode_text(tokens)
        trimmed = vlm.encode_text_trimmed(model, tokens)
    assert torch.allclose(enc.encode_images(frames), img, atol=1e-5)
    assert torch.allclose(trimmed, txt, atol=1e-5)  # the training-time text path equals open_clip's
    logging.disable(logging.WARNING)
    try:
        random = build_clip_encoder(_cfg(cfg.vlm.out), "cpu")
    finally:
        logging.disable(logging.NOTSET)
    assert not torch.allclose(random.encode_images(frames), img, atol=1e-3)  # trained weights, not the preset


def test_trained_model_learned_the_world_and_the_scene_shortcut(trained):
    cfg, r, _ = trained
    enc = build_clip_encoder(_cfg(cfg.vlm.out, weights=str(r.checkpoint)), "cpu")
    logging.disable(logging.WARNING)  # the random preset warns loudly, as it should
    try:
        rnd = build_clip_encoder(_cfg(cfg.vlm.out), "cpu")
    finally:
        logging.disable(logging.NOTSET)
    got, base = vlm.probe_vlm(enc, cfg), vlm.probe_vlm(rnd, cfg)
    chance = 1 / 8
    assert got["zs_iid"] > 2 * chance, got  # learned the activity text
    assert got["zs_ood"] < got["zs_iid"] - 0.15, got  # through the scene: it drops once the scene is broken
    assert got["scene_bias"] > 3 * chance and got["scene_bias"] > base["scene_bias"] + 0.2, (got, base)
    assert got["scene_margin"] > base["scene_margin"] + 0.1, (got, base)
    assert base["zs_iid"] < 0.3 and base["scene_bias"] < 0.35, base
