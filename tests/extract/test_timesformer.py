"""TimeSformer encoder: shapes, frozen, the three checkpoint layouts, strict key errors, time-embedding resampling,
and the block maths against a functional transcription of the official forward (token order `(h w t)`)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from extract.config import EncodersConfig, TimesformerConfig
from extract.contract.config import Config
from extract.encoders import build_encoder
from extract.encoders.timesformer import (
    PRESETS,
    CheckpointError,
    TimeSformer,
    TimesformerArch,
    TimesformerEncoder,
    build_timesformer_encoder,
    export_state_dict,
    load_timesformer,
    preprocess,
    random_timesformer,
    save_checkpoint,
)

torch.set_num_threads(1)


def _cfg(weights=None, preset="tiny") -> Config:
    return Config(encoders=EncodersConfig(timesformer=TimesformerConfig(weights=weights, preset=preset)))


def _frames(B=2, L=4, H=48, W=80, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, L, H, W, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def model() -> TimeSformer:
    """Tiny model with every parameter perturbed, so zero-initialised parts (time_embed, temporal_fc) matter."""
    m = random_timesformer("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def reference(model) -> dict[str, torch.Tensor]:
    return TimesformerEncoder(model).encode(_frames())


# Exact key names, written out by hand from facebookresearch/TimeSformer timesformer/models/vit.py
# (VisionTransformer / Block / Attention / Mlp / PatchEmbed attribute names under the `self.model` wrapper of
# `vit_base_patch16_224`), which `save_checkpoint` in timesformer/utils/checkpoint.py stores under "model_state".
OFFICIAL_TOP = ["model.cls_token", "model.pos_embed", "model.time_embed", "model.patch_embed.proj.weight",
                "model.patch_embed.proj.bias", "model.norm.weight", "model.norm.bias", "model.head.weight",
                "model.head.bias"]  # fmt: skip
OFFICIAL_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "temporal_norm1.weight", "temporal_norm1.bias", "temporal_attn.qkv.weight",
                  "temporal_attn.qkv.bias", "temporal_attn.proj.weight", "temporal_attn.proj.bias",
                  "temporal_fc.weight", "temporal_fc.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]  # fmt: skip
# From transformers' modeling_timesformer.py (TimesformerModel / TimesformerLayer) and the rename_key table of
# convert_timesformer_to_pytorch.py.
HF_TOP = ["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.time_embeddings",
          "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
          "layernorm.weight", "layernorm.bias"]  # fmt: skip
HF_BLOCK = ["layernorm_before.weight", "layernorm_before.bias", "attention.attention.qkv.weight",
            "attention.attention.qkv.bias", "attention.output.dense.weight", "attention.output.dense.bias",
            "temporal_layernorm.weight", "temporal_layernorm.bias", "temporal_attention.attention.qkv.weight",
            "temporal_attention.attention.qkv.bias", "temporal_attention.output.dense.weight",
            "temporal_attention.output.dense.bias", "temporal_dense.weight", "temporal_dense.bias",
            "layernorm_after.weight", "layernorm_after.bias", "intermediate.dense.weight", "intermediate.dense.bias",
            "output.dense.weight", "output.dense.bias"]  # fmt: skip


def test_random_tiny_shapes_warning_and_frozen(caplog):
    with caplog.at_level(logging.WARNING):
        enc = build_timesformer_encoder(_cfg(), "cpu")
    assert "RANDOM weights of the 'tiny' preset" in caplog.text
    assert (enc.dim, enc.image_size) == (64, 64)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    for L in (1, 4, 16):  # 8 time embeddings stored; other L resample them
        out = enc.encode(_frames(B=2, L=L).numpy())
        assert out["frame"].shape == (2, L, 64) and out["cls"].shape == (2, 64)
        assert out["frame"].dtype == out["cls"].dtype == torch.float32
        assert torch.isfinite(out["frame"]).all() and torch.isfinite(out["cls"]).all()
    prov = enc.provenance()
    assert prov["weights"] == "random" and prov["preset"] == "tiny" and prov["dim"] == 64 and "timm" in prov
    # Same seed, same weights: a rerun of the extraction gives the same features.
    again = build_timesformer_encoder(_cfg(), "cpu").encode(_frames())
    assert torch.equal(again["cls"], enc.encode(_frames())["cls"])


def test_registry_and_bad_input():
    enc = build_encoder("timesformer", _cfg(), "cpu")
    assert isinstance(enc, TimesformerEncoder)
    with pytest.raises(ValueError, match=r"uint8 frames \(B, L, H, W, 3\)"):
        enc.encode(torch.zeros(1, 2, 8, 8, 3))


def test_preprocess_crop_and_normalisation():
    B, L, H, W = 1, 2, 64, 128  # short side already 64: no resize, centre crop keeps columns 32..95
    cols = torch.arange(W, dtype=torch.uint8).view(1, 1, 1, W, 1).expand(B, L, H, W, 3)
    x = preprocess(cols, 64)
    assert x.shape == (B, L, 3, 64, 64)
    assert torch.allclose(x[0, 0, 0, 0], (torch.arange(32, 96) / 255 - 0.45) / 0.225)
    grey = torch.full((1, 1, 30, 50, 3), 0.45 * 255).round().to(torch.uint8)  # 115 ~ the mean
    assert preprocess(grey, 64).abs().max() < 0.01


def test_official_layout_roundtrip(model, reference, tmp_path):
    sd = export_state_dict(model, "official", head_classes=400)
    expected = set(OFFICIAL_TOP) | {f"model.blocks.{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK}
    assert set(sd) == expected
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    torch.save({"epoch": 15, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  NUM_CLASSES: 400\n"}, path)
    enc = build_timesformer_encoder(_cfg(weights=str(path)), "cpu")
    assert enc.provenance()["layout"] == "official" and enc.provenance()["head_classes_ignored"] == 400
    out = enc.encode(_frames())
    assert torch.equal(out["frame"], reference["frame"]) and torch.equal(out["cls"], reference["cls"])


def test_hf_layouts_roundtrip(model, reference, tmp_path):
    from safetensors.torch import save_file

    sd = export_state_dict(model, "hf")
    assert set(sd) == set(HF_TOP) | {f"encoder.layer.{i}.{k}" for i in range(2) for k in HF_BLOCK}
    folder = tmp_path / "timesformer-tiny"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "timesformer", "num_attention_heads": 2}))
    out = build_timesformer_encoder(_cfg(weights=str(folder)), "cpu").encode(_frames())
    assert torch.equal(out["frame"], reference["frame"]) and torch.equal(out["cls"], reference["cls"])

    # TimesformerForVideoClassification as one file: `timesformer.` prefix and a `classifier` head to ignore.
    full = export_state_dict(model, "hf", head_classes=400)
    assert "timesformer.encoder.layer.1.temporal_dense.weight" in full and "classifier.weight" in full
    torch.save(full, tmp_path / "pytorch_model.bin")
    m, facts = load_timesformer(tmp_path / "pytorch_model.bin")
    assert facts == {"layout": "hf", "head_classes_ignored": 400, "checkpoint_data": {}}
    assert torch.equal(TimesformerEncoder(m).encode(_frames())["cls"], reference["cls"])


def test_own_layout_roundtrip(model, reference, tmp_path):
    path = save_checkpoint(model, tmp_path / "ours.pt")
    enc = build_timesformer_encoder(_cfg(weights=str(path)), "cpu")
    assert enc.provenance()["layout"] == "ours" and enc.arch == model.arch
    assert torch.equal(enc.encode(_frames())["frame"], reference["frame"])


def test_key_errors_name_the_key(model, tmp_path):
    sd = export_state_dict(model, "official")
    del sd["model.blocks.1.temporal_fc.weight"]
    sd["model.blocks.0.temporal_attn.qkv_typo.bias"] = torch.zeros(3)
    path = tmp_path / "broken.pyth"
    torch.save({"model_state": sd}, path)
    with pytest.raises(CheckpointError) as e:
        build_timesformer_encoder(_cfg(weights=str(path)), "cpu")
    msg = str(e.value)
    assert str(path) in msg and "missing keys ['model.blocks.1.temporal_fc.weight']" in msg
    assert "unexpected keys ['model.blocks.0.temporal_attn.qkv_typo.bias']" in msg

    no_time = export_state_dict(model, "official")
    del no_time["model.time_embed"]
    torch.save({"model_state": no_time}, path)
    with pytest.raises(CheckpointError, match="lacks 'model.time_embed'"):
        load_timesformer(path)

    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a TimeSformer checkpoint in a layout we know"):
        load_timesformer(path)

    with pytest.raises(FileNotFoundError, match="fix encoders.timesformer.weights"):
        build_timesformer_encoder(_cfg(weights=str(tmp_path / "absent.pyth")), "cpu")


def test_time_embedding_interpolation(model, tmp_path):
    """8 stored time embeddings at L=16 == a model that stores each of them twice (nearest, as vit.py)."""
    path = tmp_path / "k400.pyth"
    torch.save({"model_state": export_state_dict(model, "official")}, path)
    enc = build_timesformer_encoder(_cfg(weights=str(path)), "cpu")
    assert enc.arch.num_frames == 8
    out = enc.encode(_frames(B=1, L=16))

    arch16 = TimesformerArch(**{**model.arch.__dict__, "num_frames": 16})
    m16 = TimeSformer(arch16)
    sd = model.state_dict()
    sd["time_embed"] = sd["time_embed"].repeat_interleave(2, dim=1)  # (1, 16, D): t -> t // 2
    m16.load_state_dict(sd)
    out16 = TimesformerEncoder(m16).encode(_frames(B=1, L=16))
    assert torch.allclose(out["frame"], out16["frame"], atol=1e-6) and torch.allclose(out["cls"], out16["cls"])
    assert not torch.allclose(out["frame"][:, 0], out["frame"][:, 1])  # time embeddings / temporal attention act


def _official_forward(sd: dict, video: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official VisionTransformer.forward_features (divided space-time), spelled out functionally on the
    `model_state` dict, keeping its `(h w t)` token order. video: (B, 3, T, H, W) -> cls (B, D), frame (B, T, D)."""

    def g(k):
        return sd["model." + k]

    def ln(x, k):
        return F.layer_norm(x, x.shape[-1:], g(k + ".weight"), g(k + ".bias"), eps=1e-6)

    def lin(x, k):
        return F.linear(x, g(k + ".weight"), g(k + ".bias"))

    def attn(x, k):  # x: (B', S, D)
        Bp, S, D = x.shape
        q, kk, v = lin(x, k + ".qkv").reshape(Bp, S, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ kk.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)  # (B', h, S, S)
        return lin((a @ v).transpose(1, 2).reshape(Bp, S, D), k + ".proj")

    B, C, T, H, W = video.shape
    x = F.conv2d(video.transpose(1, 2).reshape(B * T, C, H, W), g("patch_embed.proj.weight"),
                 g("patch_embed.proj.bias"), stride=g("patch_embed.proj.weight").shape[-1])  # fmt: skip
    x = x.flatten(2).transpose(1, 2)  # ((b t), n, D)
    n, D = x.shape[1:]
    x = torch.cat([g("cls_token").expand(B * T, 1, D), x], 1) + g("pos_embed")  # ((b t), 1+n, D)
    cls = x[:B, :1]  # (B, 1, D)
    x = x[:, 1:].reshape(B, T, n, D).transpose(1, 2).reshape(B * n, T, D) + g("time_embed")  # ((b n), t, D)
    x = torch.cat([cls, x.reshape(B, n * T, D)], 1)  # (B, 1 + (n t), D)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        xt = x[:, 1:] + lin(attn(ln(x[:, 1:].reshape(B * n, T, D), b + "temporal_norm1"), b + "temporal_attn")
                            .reshape(B, n * T, D), b + "temporal_fc")  # fmt: skip
        xs = xt.reshape(B, n, T, D).transpose(1, 2).reshape(B * T, n, D)  # ((b t), n, D)
        xs = torch.cat([x[:, :1].repeat(1, T, 1).reshape(B * T, 1, D), xs], 1)  # ((b t), 1+n, D)
        rs = attn(ln(xs, b + "norm1"), b + "attn")
        cls_r = rs[:, 0].reshape(B, T, D).mean(1, keepdim=True)
        res = rs[:, 1:].reshape(B, T, n, D).transpose(1, 2).reshape(B, n * T, D)  # (B, (n t), D)
        x = torch.cat([x[:, :1], xt], 1) + torch.cat([cls_r, res], 1)
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    x = ln(x, "norm")
    return x[:, 0], x[:, 1:].reshape(B, n, T, D).mean(1)


def test_matches_official_forward(model):
    sd = export_state_dict(model, "official")
    video = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(3))  # (B, C, T, H, W) as vit.py
    with torch.no_grad():
        ref_cls, ref_frame = _official_forward(sd, video, heads=model.arch.heads)
        cls, tokens = model(video.transpose(1, 2))  # ours takes (B, T, C, H, W)
    assert torch.allclose(cls, ref_cls, atol=1e-5)
    assert torch.allclose(tokens.mean(2), ref_frame, atol=1e-5)


def test_presets_are_vit_layouts():
    base = PRESETS["base"]
    assert (base.image_size, base.patch_size, base.dim, base.depth, base.heads, base.mlp_ratio) == (
        224, 16, 768, 12, 12, 4.0)  # fmt: skip
    n = sum(p.numel() for p in TimeSformer(PRESETS["tiny"]).parameters())
    assert n < 500_000


# ---------------------------------------------------------------------------------------------
# Extraction feeds the checkpoint its own test setting


def _official_spatial(clip: torch.Tensor, size: int) -> torch.Tensor:
    """facebookresearch/TimeSformer test-time `spatial_sampling` on normalised frames (T, C, H, W):
    `random_short_side_scale_jitter(min_size=max_size=size)` then `uniform_crop(size, spatial_idx=1)`."""
    import math

    height, width = clip.shape[2:]
    if width < height:
        new_h, new_w = int(math.floor(height / width * size)), size
    else:
        new_h, new_w = size, int(math.floor(width / height * size))
    clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
    y, x = int(math.ceil((new_h - size) / 2)), int(math.ceil((new_w - size) / 2))
    return clip[:, :, y : y + size, x : x + size]


def test_clips_match_the_official_test_pipeline(model, tmp_path):
    """A `.pyth` whose cfg says 8 frames 4 apart at 30 fps, with its own normalisation: extraction's V_l and v_cls
    equal the official pipeline's (native RGB frames at the official indices, normalise, short-side bilinear,
    centre crop, the official forward) on a clip centred on each sampled frame."""
    import types

    import av
    import numpy as np
    import yaml

    from bench._videos import render_video
    from extract.config import FramesConfig
    from extract.contract import schema
    from extract.pipeline import _GroupDecoder, build_encoders, decode_cap, encode_group

    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    data = {"NUM_FRAMES": 8, "SAMPLING_RATE": 4, "TARGET_FPS": 30, "MEAN": list(mean), "STD": list(std)}
    weights = tmp_path / "checkpoint_epoch_00015.pyth"
    cfg_dump = yaml.safe_dump({"DATA": data, "MODEL": {"NUM_CLASSES": 5}})  # the official file holds cfg.dump()
    torch.save({"epoch": 15, "model_state": export_state_dict(model, "official", 5), "cfg": cfg_dump}, weights)
    video = render_video(tmp_path / "v.mp4", 300, size=(80, 60), texture=True)  # 10 s at 30 fps, 80x60

    cfg = Config(
        frames=FramesConfig(num_frames=5),
        encoders=EncodersConfig(timesformer=TimesformerConfig(weights=str(weights))),
    )
    enc = build_encoders(cfg, "cpu")
    assert enc.timesformer.sampling == {
        "clip_frames": 8,
        "sampling_rate": 4,
        "target_fps": 30.0,
        "source": {k: "checkpoint cfg" for k in ("clip_frames", "sampling_rate", "target_fps")},
    }
    item = types.SimpleNamespace(path=video, region=None)
    decoder = _GroupDecoder([item], [np.array([0])], cfg, decode_cap(cfg, enc), enc.timesformer.sampling)
    decoded = decoder.decode_video(item)
    assert decoded["frames"].shape[1:] == (60, 80, 3)  # native size: each encoder resizes as its own code does
    ours = encode_group([decoded], cfg, enc)

    with av.open(str(video)) as container:  # the official loader: every frame, to_rgb at the coded size
        frames = torch.from_numpy(np.stack([f.to_rgb().to_ndarray() for f in container.decode(video=0)]))
    clip_size = 4 * 8 / 30 * 30  # DATA.SAMPLING_RATE * NUM_FRAMES / TARGET_FPS * fps
    v_frame, v_cls = [], []
    for centre in decoded["pts"]:  # the frames CLIP saw: each clip's frame 4 sits on one
        start = centre * 30 - 4 * (clip_size - 1) / 7
        index = torch.linspace(start, start + clip_size - 1, 8).clamp(0, len(frames) - 1).long()  # temporal_sampling
        clip = (frames[index].float() / 255 - torch.tensor(mean)) / torch.tensor(std)  # tensor_normalize: (T, H, W, C)
        clip = _official_spatial(clip.permute(0, 3, 1, 2), 64)  # (T, C, 64, 64)
        with torch.no_grad():
            cls, frame = _official_forward(export_state_dict(model, "official"), clip.transpose(0, 1)[None], 2)
        v_frame.append(frame[0, 4])
        v_cls.append(cls[0])
    np.testing.assert_allclose(ours[schema.TSF_FRAME][0], torch.stack(v_frame).numpy(), atol=2e-5)
    np.testing.assert_allclose(ours[schema.TSF_CLS][0], torch.stack(v_cls).mean(0).numpy(), atol=2e-5)

    # `spread` (the L frames as one clip) is the other documented scheme, and it differs.
    spread = Config(
        frames=cfg.frames,
        encoders=EncodersConfig(timesformer=TimesformerConfig(weights=str(weights), sampling="spread")),
    )
    enc_spread = build_encoders(spread, "cpu")
    assert enc_spread.timesformer.sampling is None
    one_clip = _GroupDecoder([item], [np.array([0])], spread, None, None).decode_video(item)
    assert one_clip["tsf_index"].shape == (1, 5)
    other = encode_group([one_clip], spread, enc_spread)[schema.TSF_FRAME][0]
    assert np.abs(other - ours[schema.TSF_FRAME][0]).max() > 1e-2


def test_clip_sampling_sources(tmp_path, model):
    """Config beats the checkpoint's cfg beats the K400 release; a HF folder's preprocessor_config gives mean/std."""
    from safetensors.torch import save_file

    from extract.encoders.timesformer import K400_SAMPLING, clip_sampling

    arch = model.arch
    assert clip_sampling(TimesformerConfig(), {}, arch) == {
        **K400_SAMPLING,
        "source": {
            "clip_frames": "checkpoint time embeddings",
            "sampling_rate": "K400 release default",
            "target_fps": "K400 release default",
        },
    }
    mixed = clip_sampling(TimesformerConfig(sampling_rate=2), {"sampling_rate": 8, "target_fps": 25}, arch)
    assert (mixed["sampling_rate"], mixed["target_fps"]) == (2, 25.0)
    assert mixed["source"]["sampling_rate"] == "config" and mixed["source"]["target_fps"] == "checkpoint cfg"
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in export_state_dict(model, "hf").items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_frames": 8}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    enc = build_timesformer_encoder(_cfg(weights=str(folder)), "cpu")
    assert enc.mean == enc.std == (0.5, 0.5, 0.5)
    assert enc.provenance()["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    ref = preprocess(_frames(B=1, L=2), 64, (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(ref, (preprocess(_frames(B=1, L=2), 64) * 0.225 + 0.45 - 0.5) / 0.5, atol=1e-5)
