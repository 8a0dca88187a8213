"""CLIP encoder: shapes and norms, the embedding equals `encode_image`, the attention equals a separate
`nn.MultiheadAttention(need_weights=True)` run, preprocessing matches open_clip's PIL transform, text
prompts, checkpoint round trips through `encoders.clip.weights`, clear errors, provenance. Real-weight
settings: a local file plus a pretrained tag gets the tag's preprocessing and activation, checked against
open_clip's own tag path. No downloads: where a test names a tag, open_clip's downloader is patched to
return a local checkpoint of random weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from PIL import Image

from extract.config import ClipConfig, EncodersConfig, SaliencyConfig
from extract.contract.config import Config, ConfigError
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
    with pytest.raises(RuntimeError, match="need a ViT"):
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
    from extract.contract.config import from_dict
    from extract.encoders.clip import build_clip_encoder

    a = build_clip_encoder(from_dict({}), "cpu").model.state_dict()
    torch.manual_seed(123)  # the caller's RNG state must not matter
    b = build_clip_encoder(from_dict({}), "cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------
# Real-weight settings: pretrained tags' preprocessing and activation for local files
# -------------------------------------------------------------------------------------------------

# Our preprocessing resizes uint8 tensors (torchvision, antialiased) where open_clip resizes PIL images, so the
# two differ by rounding. Measured on the 480x640 and 360x640 scenes below: ViT-B-16 (bicubic, shortest, 224,
# OpenAI std ~0.27, one uint8 level = 0.015) max-abs 0.058 / 0.029 and mean-abs 4.2e-4; PE-Core-T (bilinear,
# squash, 384, std 0.5, one level = 0.0078) max-abs 0.0078, mean-abs 1.6e-4. The wrong settings these tests
# guard against (open_clip's defaults for a mean/std-0.5 or squash tag) are off by mean-abs 0.30-0.44.
PREPROCESS_MAX_ABS = 0.08
PREPROCESS_MEAN_ABS = 1e-3


def _scene(H: int, W: int, seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 frame with real structure: smooth colour gradients, flat boxes (edges) and a disc."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.linspace(0, 1, H).view(H, 1, 1), torch.linspace(0, 1, W).view(1, W, 1)
    a = torch.rand(3, 3, generator=g)  # per-channel weights of three gradients
    img = 30 + 190 * (a[0] * y + a[1] * x + a[2] * (x - y) ** 2) / (a.sum(0) + 1e-3)  # (H, W, 3)
    for _ in range(8):
        top, left = (int(torch.randint(0, n - 20, (1,), generator=g)) for n in (H, W))
        h, w = (int(torch.randint(10, n // 3, (1,), generator=g)) for n in (H, W))
        img[top : top + h, left : left + w] = torch.rand(3, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img[(yy - 0.6 * H) ** 2 + (xx - 0.4 * W) ** 2 < (0.2 * min(H, W)) ** 2] = torch.tensor([250.0, 240.0, 20.0])
    return img.clamp(0, 255).round().to(torch.uint8).numpy()


SCENES = [_scene(480, 640, 0), _scene(360, 640, 1)]


def _save_random_fp16(arch: str, path: Path) -> Path:
    """Random weights of `arch` saved as an fp16 state dict (half the bytes), with no JSON beside it."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    n = sum(v.numel() for v in model.state_dict().values())
    assert path.stat().st_size < 2.1 * n  # fp16: 2 bytes per value
    assert not list(path.parent.glob("*.json"))
    return path


@pytest.fixture(scope="module")
def vit_b16_file(tmp_path_factory) -> Path:
    return _save_random_fp16("ViT-B-16", tmp_path_factory.mktemp("vit_b16") / "vit_b16_random_fp16.pt")


@pytest.fixture(scope="module")
def b16_encoders(vit_b16_file) -> dict[str, ClipEncoder]:
    """The random ViT-B-16 file built with two of its tags: openai (QuickGELU) and laion2b (GELU)."""
    tags = ("openai", "laion2b_s34b_b88k")
    return {t: build_clip_encoder(_cfg(weights=str(vit_b16_file), model="ViT-B-16", pretrained=t), "cpu") for t in tags}


def _open_clip_tag_build(monkeypatch, arch: str, tag: str, checkpoint: Path):
    """open_clip's own `create_model_and_transforms(arch, pretrained=tag)` with the tag's download replaced by
    `checkpoint`, and QuickGELU as the tag's settings ask (open_clip itself only warns): (model, eval transform)."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(checkpoint))
    quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, force_quick_gelu=quick_gelu)
    return model.eval(), preprocess


def _assert_preprocess_matches(enc: ClipEncoder, transform) -> None:
    for frame in SCENES:
        ours = enc.preprocess(torch.from_numpy(frame)[None])[0]  # (3, h, w)
        ref = transform(Image.fromarray(frame))  # (3, h, w)
        assert ours.shape == ref.shape
        diff = (ours - ref).abs()
        assert diff.max() < PREPROCESS_MAX_ABS and diff.mean() < PREPROCESS_MEAN_ABS, (frame.shape, diff.max())


def _plain(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


@pytest.mark.parametrize(("tag", "activation"), [("openai", QuickGELU), ("laion2b_s34b_b88k", torch.nn.GELU)])
def test_local_weights_take_their_tags_preprocessing_and_activation(
    b16_encoders, vit_b16_file, monkeypatch, tag, activation
):
    enc = b16_encoders[tag]
    ref_model, ref_transform = _open_clip_tag_build(monkeypatch, "ViT-B-16", tag, vit_b16_file)
    # The activation the tag was trained with, in both towers (open_clip alone would build GELU for openai).
    for block in (enc.model.visual.transformer.resblocks[0], enc.model.transformer.resblocks[0]):
        assert type(block.mlp.gelu) is activation
    prov = enc.provenance()
    assert prov["activation"] == ("quick_gelu" if activation is QuickGELU else "gelu")
    assert prov["activation_source"] == prov["preprocess_source"] == "tag" and prov["pretrained"] == tag
    assert prov["source"] == "weights" and prov["weights"] == str(vit_b16_file) and prov["model_config"] is None
    # The fp16 file loads (into fp32 parameters) exactly as open_clip loads it.
    ours_sd, ref_sd = enc.model.state_dict(), ref_model.state_dict()
    for key in ("visual.conv1.weight", "visual.proj", "text_projection", "logit_scale"):
        assert ours_sd[key].dtype == torch.float32 and torch.equal(ours_sd[key], ref_sd[key])
    # The tag's preprocessing, and open_clip's eval transform on real-sized frames.
    assert _plain(open_clip.get_model_preprocess_cfg(enc.model)) == _plain(
        open_clip.get_model_preprocess_cfg(ref_model)
    )
    _assert_preprocess_matches(enc, ref_transform)
    # End to end: our embedding equals open_clip's tag model on its own PIL preprocessing.
    frame = SCENES[1]
    with torch.no_grad():
        ref = F.normalize(ref_model.encode_image(ref_transform(Image.fromarray(frame))[None]), dim=-1)
    ours = enc.encode_images(torch.from_numpy(frame)[None])
    assert float((ours * ref).sum()) > 0.9999


def test_pretrained_tag_alone_forces_quick_gelu(b16_encoders, vit_b16_file, monkeypatch):
    """`encoders.clip.pretrained: openai` without a file: QuickGELU even though open_clip's ViT-B-16 config lacks it."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(vit_b16_file))
    enc = build_clip_encoder(_cfg(model="ViT-B-16", pretrained="openai"), "cpu")
    assert type(enc.model.visual.transformer.resblocks[0].mlp.gelu) is QuickGELU
    prov = enc.provenance()
    assert prov["source"] == "pretrained" and prov["activation"] == "quick_gelu" and prov["preprocess_source"] == "tag"
    frames = torch.from_numpy(SCENES[0])[None]
    assert torch.equal(enc.encode_images(frames), b16_encoders["openai"].encode_images(frames))


@pytest.fixture(scope="module")
def pe_core_file(tmp_path_factory) -> Path:
    """PE-Core-T-16-384, the smallest architecture with a squash tag (`meta`: bilinear, mean/std 0.5)."""
    return _save_random_fp16("PE-Core-T-16-384", tmp_path_factory.mktemp("pe_core") / "pe_core_t_random_fp16.pt")


def test_squash_tag_local_weights(pe_core_file, monkeypatch):
    pcfg = open_clip.get_pretrained_cfg("PE-Core-T-16-384", "meta")
    assert pcfg["resize_mode"] == "squash" and pcfg["interpolation"] == "bilinear" and pcfg["mean"] == (0.5,) * 3
    cfg = _cfg(weights=str(pe_core_file), model="PE-Core-T-16-384", pretrained="meta", saliency="spectral-residual")
    enc = build_clip_encoder(cfg, "cpu")
    assert (enc.resize_mode, enc.interpolation, enc.image_size) == ("squash", "bilinear", (384, 384))
    for frame in SCENES:
        assert enc.view_box(*frame.shape[:2]) == (0.0, 0.0, 1.0, 1.0)
    ref_model, ref_transform = _open_clip_tag_build(monkeypatch, "PE-Core-T-16-384", "meta", pe_core_file)
    _assert_preprocess_matches(enc, ref_transform)
    frame = SCENES[0]
    with torch.no_grad():
        ref = F.normalize(ref_model.encode_image(ref_transform(Image.fromarray(frame))[None]), dim=-1)
    assert float((enc.encode_images(torch.from_numpy(frame)[None]) * ref).sum()) > 0.9999
    prov = enc.provenance()
    assert prov["preprocess_source"] == "tag" and prov["preprocess"]["resize_mode"] == "squash"
    assert not enc.supports_attention  # a timm tower with an attention pooler


def test_local_weights_without_json_or_tag_assume_defaults_loudly(vit_b16_file, caplog):
    with caplog.at_level(logging.WARNING, logger="extract.encoders.clip"):
        enc = build_clip_encoder(_cfg(weights=str(vit_b16_file), model="ViT-B-16"), "cpu")
    text = caplog.text
    assert "CLIP PREPROCESSING ASSUMED" in text and str(vit_b16_file) in text
    assert "encoders.clip.pretrained" in text and "`openai`" in text and "QuickGELU" in text
    assert "open_clip_config.json" in text
    prov = enc.provenance()
    assert prov["preprocess_source"] == prov["activation_source"] == "open_clip defaults"
    assert prov["activation"] == "gelu" and prov["pretrained"] is None
    assert prov["preprocess"]["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_local_weights_tag_must_be_a_tag_of_the_architecture(vit_b16_file):
    with pytest.raises(ConfigError, match=r"encoders.clip.pretrained: 'webli' is not a pretrained tag of 'ViT-B-16'"):
        build_clip_encoder(_cfg(weights=str(vit_b16_file), model="ViT-B-16", pretrained="webli"), "cpu")


def test_json_beside_the_file_wins_over_the_tag(enc, tmp_path, caplog):
    """A JSON's preprocess_cfg and quick_gelu beat a named tag (with warnings naming both); a JSON without a
    preprocess_cfg takes the tag's preprocessing but keeps its own activation."""
    path = save_checkpoint(enc.model, tmp_path / "tiny.pt", TINY_MODEL_CFG)  # OpenAI mean/std, no quick_gelu
    # The tiny JSON architecture has no tags, so the tag is looked up for encoders.clip.model.
    cfg = _cfg(weights=str(path), model="ViT-L-14", pretrained="laion2b_s32b_b82k")  # mean/std 0.5
    with caplog.at_level(logging.WARNING, logger="extract.encoders.clip"):
        loaded = build_clip_encoder(cfg, "cpu")
    assert (
        "disagrees" in caplog.text
        and "laion2b_s32b_b82k" in caplog.text
        and str(path.with_suffix(".json")) in caplog.text
    )
    prov = loaded.provenance()
    assert prov["preprocess_source"] == "json" and prov["preprocess"]["mean"] == pytest.approx(
        enc.provenance()["preprocess"]["mean"]
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="extract.encoders.clip"):
        openai = build_clip_encoder(_cfg(weights=str(path), model="ViT-B-16", pretrained="openai"), "cpu")
    assert "QuickGELU" in caplog.text and "disagrees" not in caplog.text  # same mean/std as the JSON
    assert openai.provenance()["activation"] == "gelu" and openai.provenance()["activation_source"] == "json"
    # Without a preprocess_cfg in the JSON the tag's preprocessing applies.
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({"model_cfg": meta["model_cfg"]}))
    tagged = build_clip_encoder(cfg, "cpu")
    prov = tagged.provenance()
    assert prov["preprocess_source"] == "tag" and prov["preprocess"]["mean"] == pytest.approx([0.5] * 3)
    assert prov["model"] == TINY_MODEL_NAME and prov["activation"] == "gelu"


def test_clipa_avg_pooling_has_no_cls_attention():
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"]["pool_type"] = "avg"  # CLIPA: the embedding is the mean of the patch tokens
    name = register_model_config("test-tiny-clipa", cfg)
    with pytest.raises(ConfigError, match="saliency.method.*pool_type='avg'.*spectral-residual") as e:
        build_clip_encoder(_cfg(preset="base", model=name), "cpu")
    assert "CLS token" in str(e.value)
    avg = build_clip_encoder(_cfg(preset="base", model=name, saliency="spectral-residual"), "cpu")
    assert not avg.supports_attention and avg.grid is None
    assert avg.encode_images(_frames(2)).shape == (2, 64)
    with pytest.raises(RuntimeError, match="spectral-residual"):
        avg.encode(_frames(2))


# ---------------------------------------------------------------------------------------------
# CLIP Surgery: the value-value path against a dual-path forward written as the paper's code runs it


def _dual_path_reference(model, pixels: torch.Tensor, surgered: int) -> torch.Tensor:
    """CLIP Surgery's ViT forward spelled out (xmed-lab/CLIP_Surgery `clip_surgery_model.py`): the original blocks up
    to the surgery, then per surgered block `x_new += attn_vv(ln_1(x_ori))` (q = k = v, per-head softmax with scale
    head_dim ** -0.5, the block's out_proj; no MLP) while `x_ori` runs the block unchanged; patch tokens of the new
    path through ln_post and proj. Returns (N, P, Dc) L2-normalised."""
    visual = model.visual
    x = visual._embeds(pixels)  # (N, T, D)
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - surgered
    x_new = None
    for i, blk in enumerate(blocks):
        if i >= first:
            if x_new is None:
                x_new = x.clone()
            N, T, D = x.shape
            nh = blk.attn.num_heads
            hd = D // nh
            qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)  # (N, T, 3D)
            v = qkv[..., 2 * D :].reshape(N, T, nh, hd).permute(0, 2, 1, 3)  # (N, nh, T, hd)
            attn = ((v @ v.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)  # q and k replaced by v
            out = (attn @ v).permute(0, 2, 1, 3).reshape(N, T, D)
            x_new = x_new + blk.attn.out_proj(out)
        x = blk(x)  # the original path
    tokens = visual.ln_post(x_new[:, 1:]) @ visual.proj  # (N, P, Dc)
    return F.normalize(tokens, dim=-1)


def test_clip_surgery_map_matches_the_dual_path_forward():
    from extract.encoders.clip import SURGERY_BLOCKS

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL_NAME).eval()
    with torch.no_grad():  # move every weight off its initialisation so no term is trivially zero
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert model.visual.transformer.batch_first
    enc = ClipEncoder(model, TINY_MODEL_NAME)
    frames = torch.randint(0, 256, (3, 80, 96, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = enc.encode(frames, attention=True, surgery=True)
    depth = len(model.visual.transformer.resblocks)
    with torch.no_grad():
        pixels = enc.preprocess(frames)
        tokens = _dual_path_reference(model, pixels, min(SURGERY_BLOCKS, depth))  # (3, 64, Dc)
        image = F.normalize(model.encode_image(pixels), dim=-1)  # (3, Dc)
    expected = (tokens @ image[:, :, None])[..., 0].reshape(3, *enc.grid)
    torch.testing.assert_close(out["surgery"], expected, atol=1e-5, rtol=1e-5)
    assert out["surgery"].shape == (3, 8, 8) and out["attention"].shape == (3, 8, 8)
    # the embedding is the untouched original path's
    torch.testing.assert_close(out["embedding"], enc.encode(frames, attention=False)["embedding"])
