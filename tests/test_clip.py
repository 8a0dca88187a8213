"""CLIP encoder: shapes and norms, the embedding equals `encode_image`, the attention equals a separate
`nn.MultiheadAttention(need_weights=True)` run, preprocessing matches open_clip's PIL transform, text
prompts, checkpoint round trips through `encoders.clip.weights`, clear errors, provenance. No downloads:
no test passes a pretrained tag to open_clip."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from extract.config import ClipConfig, Config, ConfigError, EncodersConfig, SaliencyConfig
from extract.encoders import build_encoder
from extract.encoders.clip import (
    TINY_MODEL_CFG,
    TINY_MODEL_NAME,
    ClipEncoder,
    build_clip_encoder,
    register_model_config,
    save_checkpoint,
)

torch.set_num_threads(1)


def _cfg(**clip) -> Config:
    saliency = clip.pop("saliency", "clip-attention")
    return Config(encoders=EncodersConfig(clip=ClipConfig(**clip)), saliency=SaliencyConfig(method=saliency))


def _frames(N=5, H=40, W=56, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, H, W, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    torch.manual_seed(0)
    return build_encoder("clip", _cfg(), "cpu")


def test_shapes_dtypes_norms(enc):
    out = enc.encode(_frames())
    assert enc.dim == 64 and enc.image_size == (64, 64) and enc.grid == (8, 8)
    assert out["embedding"].shape == (5, 64) and out["embedding"].dtype == torch.float32
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(5), atol=1e-5)
    att = out["attention"]
    assert att.shape == (5, 8, 8) and att.dtype == torch.float32
    assert (att >= 0).all() and (att.sum(dim=(1, 2)) < 1).all() and (att.sum(dim=(1, 2)) > 0).all()
    assert enc.encode_images(_frames(3, 20, 20)).shape == (3, 64)
    assert enc.encode(_frames(0))["embedding"].shape == (0, 64)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_embedding_equals_encode_image(enc):
    frames = _frames(4, 70, 50, seed=1)
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(enc.preprocess(frames)), dim=-1)  # (N, Dc)
    assert torch.allclose(enc.encode(frames)["embedding"], ref, atol=1e-6)
    assert torch.allclose(enc.encode_images(frames), ref, atol=1e-6)


def test_attention_equals_multihead_attention_weights(enc):
    """Recompute the last block's attention with the block's own nn.MultiheadAttention(need_weights=True)."""
    frames = _frames(3, seed=2)
    block = enc.model.visual.transformer.resblocks[-1]
    inputs = []
    handle = block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            enc.model.encode_image(enc.preprocess(frames))
            y = block.ln_1(inputs[0])  # (N, T, D)
            _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)  # (N, T, T)
    finally:
        handle.remove()
    cls_row = weights[:, 0]  # (N, T): CLS query over CLS + patches
    assert torch.allclose(cls_row.sum(-1), torch.ones(3), atol=1e-5)
    ours = enc.encode(frames)["attention"]  # (N, h, w)
    assert torch.allclose(ours.flatten(1), cls_row[:, 1:], atol=1e-6)


def test_preprocess_matches_open_clip_transform(enc):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(enc.model))
    transform = image_transform_v2(pp, is_train=False)
    frames = _frames(2, 90, 120, seed=3)
    frames = F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), 5, 1, 2).permute(0, 2, 3, 1).to(torch.uint8)  # smooth
    ours = enc.preprocess(frames)  # (N, 3, 64, 64)
    ref = torch.stack([transform(Image.fromarray(f.numpy())) for f in frames])
    assert ours.shape == ref.shape
    # PIL and torch resample slightly differently; the crop window and normalisation must agree.
    assert (ours - ref).abs().mean() < 0.01  # a one-pixel shift of the crop gives ~0.1


def test_view_box(enc):
    assert enc.view_box(64, 96) == pytest.approx((16 / 96, 0.0, 80 / 96, 1.0))
    assert enc.view_box(100, 100) == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_text_embeddings(enc):
    names, templates = ["cut bread", "pour milk", "fry egg"], ("a video of {}.", "a person {}.", "{}")
    t = enc.encode_text(names, templates)
    assert t.shape == (3, 64) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Class order is kept and templates are averaged after normalisation.
    tok = enc.tokenizer([tpl.format("pour milk") for tpl in templates])
    with torch.no_grad():
        one = F.normalize(enc.model.encode_text(tok), dim=-1).mean(0)
    assert torch.allclose(t[1], F.normalize(one, dim=-1), atol=1e-5)
    with pytest.raises(ConfigError, match="encoders.clip.prompts"):
        enc.encode_text(names, ("no placeholder",))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip_through_weights(enc, tmp_path, suffix):
    path = save_checkpoint(enc.model, tmp_path / f"tiny{suffix}", TINY_MODEL_CFG)
    assert path.with_suffix(".json").is_file()
    # `model` names another architecture: the JSON beside the checkpoint must win.
    loaded = build_clip_encoder(_cfg(weights=str(path), model="ViT-B-16"), "cpu")
    frames = _frames(seed=4)
    a, b = enc.encode(frames), loaded.encode(frames)
    assert torch.equal(a["embedding"], b["embedding"]) and torch.equal(a["attention"], b["attention"])
    assert torch.equal(enc.encode_text(["x"], ("{}",)), loaded.encode_text(["x"], ("{}",)))
    prov = loaded.provenance()
    assert prov["source"] == "weights" and prov["random_weights"] is False
    assert prov["weights"] == str(path) and len(prov["weights_sha256"]) == 64 and prov["model"] == TINY_MODEL_NAME


def test_unregistered_config_and_model_fallback(tmp_path):
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"]["layers"] = 1
    torch.manual_seed(1)
    model = open_clip.create_model(register_model_config("test-one-layer", cfg))
    path = save_checkpoint(model, tmp_path / "ckpt" / "epoch_1.pt", cfg)
    loaded = build_clip_encoder(_cfg(weights=str(path)), "cpu")
    assert len(loaded.model.visual.transformer.resblocks) == 1
    # Without a JSON beside it, `model` names the architecture.
    path.with_suffix(".json").unlink()
    again = build_clip_encoder(_cfg(weights=str(path), model="test-one-layer"), "cpu")
    assert again.provenance()["model_config"] is None
    assert torch.equal(loaded.encode_images(_frames(2)), again.encode_images(_frames(2)))
    # open_clip's trainer checkpoints: {"epoch", "name", "state_dict" with DDP's `module.` prefix, ...}.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    trainer = build_clip_encoder(_cfg(weights=str(path), model="test-one-layer"), "cpu")
    assert torch.equal(loaded.encode_images(_frames(2)), trainer.encode_images(_frames(2)))
    with pytest.raises(ConfigError, match="encoders.clip.weights: could not load"):
        build_clip_encoder(_cfg(weights=str(path), model=TINY_MODEL_NAME), "cpu")


def test_missing_weights_is_a_sentence(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match="encoders.clip.weights") as e:
        build_clip_encoder(_cfg(weights=str(missing)), "cpu")
    assert str(missing) in str(e.value)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="encoders.clip.pretrained.*not a pretrained tag"):
        build_clip_encoder(_cfg(pretrained="no-such-tag"), "cpu")
    with pytest.raises(ConfigError, match="encoders.clip.model.*not an open_clip architecture"):
        build_clip_encoder(_cfg(preset="base", model="ViT-Q-99"), "cpu")


def test_random_weights_are_loud_and_recorded(enc, caplog):
    prov = enc.provenance()
    assert prov["random_weights"] is True and prov["source"] == "random" and prov["model"] == TINY_MODEL_NAME
    assert prov["grid"] == [8, 8] and prov["embed_dim"] == 64 and prov["open_clip"] == open_clip.__version__
    json.dumps(prov)  # stored as cache attributes
    with caplog.at_level(logging.WARNING, logger="extract.encoders.clip"):
        build_clip_encoder(_cfg(), "cpu")
    assert "RANDOM" in caplog.text


def test_unreachable_pretrained_falls_back_loudly(monkeypatch, caplog):
    real = open_clip.create_model

    def offline(name, pretrained=None, **kw):
        if pretrained:
            raise RuntimeError(f"Failed to download weights for tag '{pretrained}'")
        return real(name, **kw)

    monkeypatch.setattr(open_clip, "create_model", offline)
    with caplog.at_level(logging.WARNING, logger="extract.encoders.clip"):
        fell_back = build_clip_encoder(_cfg(pretrained="openai"), "cpu")
    prov = fell_back.provenance()
    assert prov["random_weights"] is True and prov["model"] == TINY_MODEL_NAME and prov["pretrained"] is None
    assert "could not be loaded" in prov["fallback_reason"] and "RANDOM" in caplog.text


def test_resnet_clip_has_no_attention():
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    name = register_model_config("test-tiny-resnet", cfg)
    with pytest.raises(ConfigError, match="spectral-residual"):
        build_clip_encoder(_cfg(preset="base", model=name), "cpu")
    rn = build_clip_encoder(_cfg(preset="base", model=name, saliency="spectral-residual"), "cpu")
    assert not rn.supports_attention and rn.grid is None
    assert rn.encode_images(_frames(2)).shape == (2, 32)
    with pytest.raises(RuntimeError, match="needs a ViT"):
        rn.encode(_frames(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_matches_cpu(enc, precision):
    torch.manual_seed(0)
    cfg = Config(encoders=EncodersConfig(precision=precision))
    gpu = build_clip_encoder(cfg, "cuda")
    gpu.model.load_state_dict(enc.model.state_dict())
    frames = _frames(8, 96, 96)
    out = gpu.encode(frames.cuda())
    ref = enc.encode(frames)
    assert out["embedding"].dtype == torch.float32 and out["attention"].dtype == torch.float32
    cos = (out["embedding"].cpu() * ref["embedding"]).sum(-1)
    assert (cos > 0.99).all()
    assert torch.allclose(out["attention"].cpu(), ref["attention"], atol=1e-2)


def test_random_preset_is_seeded_so_a_fingerprint_means_fixed_numbers():
    """Two builds (as in two processes) of the random tiny preset give the same weights."""
    from extract.config import from_dict
    from extract.encoders.clip import build_clip_encoder

    a = build_clip_encoder(from_dict({}), "cpu").model.state_dict()
    torch.manual_seed(123)  # the caller's RNG state must not matter
    b = build_clip_encoder(from_dict({}), "cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
