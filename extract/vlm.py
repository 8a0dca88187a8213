"""Pretrain the tiny CLIP on the synthetic world's confounded pretraining split (`ltar pretrain-vlm`).

The papers' argument is about a *pretrained* VLM that learned spurious correlations: activity text aligned
with backgrounds rather than with the causal atomic actions. No CLIP weights can be downloaded here, so the
`tiny` open_clip architecture (`ltar-tiny-vit`) is trained contrastively, with open_clip's own `ClipLoss`
and tokenizer, on frame-caption pairs of the `pretrain` split (its own seed; never a train/test video).
That split ties the scene to the activity as train does (`synthetic.rho`), and its captions read like web
captions: the activity always, often the atomic action visible in the frame (`vlm.action_mention`),
sometimes the scene (`vlm.scene_mention`). The scene is the cheapest cue for the activity text, so the
model learns it: exactly the bias the heads are meant to remove.

Output: `<vlm.out>/<fingerprint>/clip.pt` (state dict) with `clip.json` (open_clip model config) beside it,
loadable through `encoders.clip.weights` like any local checkpoint, and `vlm.json` (training curve, config).
The fingerprint hashes the vlm section, the world settings that change the pretraining pixels, the model
config, the caption templates and the generator version; the same config again is a no-op.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from extract.config import SyntheticConfig, VlmConfig
from extract.contract.config import Config, to_dict
from extract.encoders.clip import TINY_MODEL_CFG, TINY_MODEL_NAME, ClipEncoder
from extract.synthetic import (
    ACTIVITIES,
    ATOMIC_ACTIONS,
    GENERATOR_VERSION,
    SCENES,
    VideoSpec,
    hashed_config,
    plan_split,
    render_scene_only,
    render_video,
)

log = logging.getLogger(__name__)

VLM_VERSION = 1  # bump when captions, frame sampling or the training recipe change: every checkpoint retrains
DEFAULT_PRETRAIN_VIDEOS = 256  # pretraining videos when synthetic.videos.pretrain is 0 (the demo's setting)
CHECKPOINT = "clip.pt"  # beside it: clip.json (open_clip config), vlm.json (training summary)
SUMMARY = "vlm.json"

# Web-caption shapes around a subject "<activity>[, <action>][ in the <scene>]"; the first three are also
# the zero-shot prompts of encoders.clip.prompts, as web text is what CLIP's prompts were written to match.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a video of {}.",
    "a person {}.",
    "how to {}.",
    "{}, step by step",
    "watch me {}!",
)
IDLE_SHARE = 0.2  # share of sampled frames that fall in idle gaps (no action visible, none named)
WEIGHT_DECAY = 0.1  # AdamW, on weight matrices only (open_clip's trainer excludes gains, biases, logit scale)
WARMUP = 0.05  # share of the steps with a linear warm-up before the cosine decay
CURVE_POINTS = 20  # the training curve in vlm.json: loss and accuracy averaged over this many spans
EVAL_FRAMES = 8  # frames per video (uniform) for the zero-shot probes
SCENE_CLIPS = 8  # scene-only clips (lightings) per scene for the scene-bias probe

# Synthetic settings that never change a pretraining pixel: left out of the fingerprint, so resizing the
# test splits or re-encoding the mp4 files keeps the checkpoint. Everything else (including fields added
# later) is hashed.
_WORLD_IGNORED = ("seed", "ood_scene", "codec", "quality")


def _words(name: str) -> str:
    return name.replace("_", " ")  # the form extract.datasets.Vocabulary.prompt_name gives the text tower


@dataclass(frozen=True)
class VlmResult:
    checkpoint: Path  # <out>/<fingerprint>/clip.pt; clip.json (open_clip config) and vlm.json lie beside it
    fingerprint: str
    steps: int
    final_loss: float  # ClipLoss averaged over the last span of the curve
    train_accuracy: float  # in-batch image->text top-1 over the same span (a hit = the same caption text)
    seconds: float  # wall time of this call (vlm.json keeps the training time of a skipped run)
    skipped: bool  # True: the checkpoint for this fingerprint existed, nothing was trained
    videos: int  # pretraining videos used


# ---------------------------------------------------------------------------------------------
# What is hashed
# ---------------------------------------------------------------------------------------------


def pretrain_world(cfg: Config) -> SyntheticConfig:
    """The synthetic config whose `pretrain` split is trained on (a count of 0 becomes the default)."""
    s = cfg.synthetic
    if s.videos.pretrain > 0:
        return s
    return replace(s, videos=replace(s.videos, pretrain=DEFAULT_PRETRAIN_VIDEOS))


def vlm_fingerprint(cfg: Config) -> str:
    """Hash of everything that changes the checkpoint's numbers (not `vlm.out`, not the test splits)."""
    world = hashed_config(pretrain_world(cfg))  # options added later, while off, leave the hash as it was
    for key in _WORLD_IGNORED:
        world.pop(key, None)
    world["videos"] = {"pretrain": world["videos"]["pretrain"]}  # other splits never reach pretraining
    vlm = {k: v for k, v in to_dict(cfg.vlm).items() if k != "out"}
    blob = {
        "vlm_version": VLM_VERSION,
        "generator": GENERATOR_VERSION,
        "vlm": vlm,
        "world": world,
        "model": TINY_MODEL_CFG,
        "templates": CAPTION_TEMPLATES,
        "recipe": [IDLE_SHARE, WEIGHT_DECAY, WARMUP],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Data: frames and captions, built once
# ---------------------------------------------------------------------------------------------


def _subject_parts() -> list[tuple[str, str, str]]:
    """(activity, ", <action>" or "", " in the <scene>" or "") for every subject, in `caption_subjects()` order."""
    return [
        (
            _words(a.name),
            f", {_words(ATOMIC_ACTIONS[k - 1].name)}" if k else "",
            f" in the {_words(SCENES[s - 1].name)}" if s else "",
        )
        for a in ACTIVITIES
        for k in range(len(ATOMIC_ACTIONS) + 1)
        for s in range(len(SCENES) + 1)
    ]


def caption_subjects() -> list[str]:
    """Every caption subject `<activity>[, <action>][ in the <scene>]`, indexed by
    `_subject_index(activity, action + 1, scene + 1)` (action and scene 0 mean "not named")."""
    return ["".join(parts) for parts in _subject_parts()]


NUM_SUBJECTS = len(ACTIVITIES) * (len(ATOMIC_ACTIONS) + 1) * (len(SCENES) + 1)  # U, len(caption_subjects())


def _subject_index(activity: torch.Tensor, action: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """(B,) flat index into `caption_subjects()`; action and scene are 0 for "not named", else index + 1."""
    return (activity * (len(ATOMIC_ACTIONS) + 1) + action) * (len(SCENES) + 1) + scene


def caption_texts() -> list[str]:
    """Every caption, template-major: caption `t * U + u` is template t around subject u."""
    subjects = caption_subjects()
    return [t.replace("{}", s) for t in CAPTION_TEMPLATES for s in subjects]


def caption_tokens() -> torch.Tensor:
    """(K, context) int64: `open_clip.get_tokenizer(ltar-tiny-vit)(caption_texts())`, assembled from tokenised
    pieces.

    CLIP's tokenizer splits text into words and punctuation before its per-word BPE, so a caption's tokens
    are its pieces' tokens in a row; tokenising the few pieces once instead of every caption saves seconds.
    """
    tokenizer = open_clip.get_tokenizer(TINY_MODEL_NAME)
    pieces: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in pieces:
            pieces[text] = tokenizer.encode(text)
        return pieces[text]

    rows = []
    for template in CAPTION_TEMPLATES:
        prefix, suffix = template.split("{}")
        for parts in _subject_parts():
            row = ids(prefix) + [t for p in parts for t in ids(p)] + ids(suffix)
            rows.append([tokenizer.sot_token_id, *row, tokenizer.eot_token_id])
    out = np.zeros((len(rows), tokenizer.context_length), dtype=np.int64)  # (K, context), 0 = padding
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _frame_labels(spec: VideoSpec) -> np.ndarray:
    """(T,) int: index of the atomic action visible in each frame, -1 in idle gaps."""
    labels = np.full(spec.num_frames, -1)
    index = {a.name: i for i, a in enumerate(ATOMIC_ACTIONS)}
    for seg in spec.segments:
        labels[seg.start : seg.end] = index[seg.label]
    return labels


def _pick_frames(rng: np.random.Generator, labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) distinct frame indices where possible: each from an idle gap with probability IDLE_SHARE (when
    the video has one), else from an action segment."""
    active, idle = np.flatnonzero(labels >= 0), np.flatnonzero(labels < 0)
    n_idle = int(rng.binomial(k, IDLE_SHARE)) if len(idle) else 0
    picks = [rng.choice(pool, n, replace=n > len(pool)) for pool, n in ((idle, n_idle), (active, k - n_idle))]
    return np.sort(np.concatenate(picks))


@dataclass
class PretrainData:
    """Frames and caption tables of the pretraining split, held in memory.

    `pixels` (N, 3, h, w) float32, normalised model input; `activity`, `action`, `scene` (N,) int64 (action
    -1 when the frame is idle); `video` (N,) int64, row into `specs`; `tokens` (K, context) int64, every
    caption tokenised once (`caption_texts()` order).
    """

    pixels: torch.Tensor
    activity: torch.Tensor
    action: torch.Tensor
    scene: torch.Tensor
    video: torch.Tensor
    tokens: torch.Tensor
    specs: list[VideoSpec]

    def sample_captions(self, rows: torch.Tensor, generator: torch.Generator, vlm: VlmConfig) -> torch.Tensor:
        """(B,) caption ids for frames `rows` (B,): a template, the action with P(action_mention) when one is
        visible, the scene with P(scene_mention). A fresh draw every step."""
        B = rows.shape[0]
        u = torch.rand(B, 2, generator=generator)  # (B, 2)
        action = torch.where((u[:, 0] < vlm.action_mention) & (self.action[rows] >= 0), self.action[rows] + 1, 0)
        scene = torch.where(u[:, 1] < vlm.scene_mention, self.scene[rows] + 1, 0)
        template = torch.randint(len(CAPTION_TEMPLATES), (B,), generator=generator)
        subject = _subject_index(self.activity[rows], action, scene)  # (B,)
        return template * NUM_SUBJECTS + subject


def build_pretrain_data(cfg: Config, encoder: ClipEncoder, progress: bool = False) -> PretrainData:
    """Render the pretraining split in memory, keep `vlm.frames_per_video` frames of each, preprocess them."""
    from tqdm import tqdm

    world = pretrain_world(cfg)
    k = cfg.vlm.frames_per_video
    specs = plan_split(world, "pretrain")
    act_index = {a.name: i for i, a in enumerate(ACTIVITIES)}
    scene_index = {s.name: i for i, s in enumerate(SCENES)}
    frames, actions = [], []
    for i, spec in enumerate(tqdm(specs, desc="pretrain frames", unit="video", disable=not progress)):
        rng = np.random.default_rng([cfg.vlm.seed, i])
        labels = _frame_labels(spec)  # (T,)
        pick = _pick_frames(rng, labels, k)  # (k,)
        video, _ = render_video(spec, world)  # (T, H, W, 3)
        frames.append(video[pick])
        actions.append(labels[pick])
    n = len(specs)
    pixels = encoder.preprocess(np.concatenate(frames)).cpu()  # (n * k, 3, h, w)
    tokens = caption_tokens()  # (K, context)
    return PretrainData(
        pixels=pixels,
        activity=torch.tensor([act_index[s.activity] for s in specs]).repeat_interleave(k),  # (n * k,)
        action=torch.from_numpy(np.concatenate(actions)).long(),
        scene=torch.tensor([scene_index[s.scene] for s in specs]).repeat_interleave(k),
        video=torch.arange(n).repeat_interleave(k),
        tokens=tokens,
        specs=specs,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _create_model(seed: int, device: torch.device) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(TINY_MODEL_NAME, precision="fp32", device=device)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` (B, Dc), unnormalised, on the tokens cut after the longest caption.

    tokens: (B, context). Under the causal mask a position never sees the padding after it, so the pooled
    end-of-text feature is the same (to float error) at a fraction of the cost: captions hold ~15 of 77
    tokens. Models other than the standard open_clip `CLIP` text tower take the full path.
    """
    if not isinstance(model, open_clip.CLIP) or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens)
    n = int((tokens != 0).sum(dim=1).max())  # padding is 0, captions are contiguous from the start
    tokens = tokens[:, :n]  # (B, n)
    x = model.token_embedding(tokens) + model.positional_embedding[:n]  # (B, n, D)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])  # (B, n, D)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, D) at end-of-text
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj  # (B, Dc)


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine_lr(step: int, steps: int, lr: float, warmup: float = WARMUP) -> float:
    """The learning rate at `step` of `steps`: linear warm-up over the first `warmup` share, then cosine to 0
    (the schedule of both tiny-encoder pretrainings, extract/vlm.py and extract/video_pretrain.py)."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def publish_folder(folder: Path, write: Callable[[Path], object], complete: Callable[[], bool]) -> None:
    """Run `write(tmp)` into a temporary sibling folder, then rename it to `folder`: the folder exists only when
    complete. An existing `folder` that is not `complete()` (half-written by an older layout) is replaced; a
    complete one (a concurrent run that finished first) is kept."""
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if folder.exists() and not complete():
            shutil.rmtree(folder)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_result(folder: Path, fingerprint: str, t0: float) -> VlmResult | None:
    """The recorded result of a finished run in `folder`, or None when there is none."""
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("fingerprint") != fingerprint or not (folder / CHECKPOINT).is_file():
        return None
    return VlmResult(
        checkpoint=folder / CHECKPOINT,
        fingerprint=fingerprint,
        steps=int(summary["steps"]),
        final_loss=float(summary["final_loss"]),
        train_accuracy=float(summary["train_accuracy"]),
        seconds=time.perf_counter() - t0,
        skipped=True,
        videos=int(summary["videos"]),
    )


def vlm_checkpoint(cfg: Config) -> Path:
    """Where `pretrain_vlm(cfg)` writes (or wrote) its checkpoint: the path for encoders.clip.weights."""
    return Path(cfg.vlm.out) / vlm_fingerprint(cfg) / CHECKPOINT


def pretrain_vlm(cfg: Config, progress: bool = True) -> VlmResult:
    """Train the tiny CLIP on the pretraining split and write its checkpoint; a no-op when it exists.

    Each step draws `vlm.batch_size` frames (with replacement) and a fresh caption for each, and takes an
    AdamW step on open_clip's `ClipLoss` (warm-up, cosine decay; logit scale clamped at 100 as open_clip
    does). The bar shows the loss and the in-batch image->text top-1, where retrieving another frame's
    identical caption counts as a hit (a batch holds many frames of each activity).
    """
    from tqdm import tqdm

    from extract.encoders.clip import save_checkpoint

    t0 = time.perf_counter()
    vc = cfg.vlm
    fingerprint = vlm_fingerprint(cfg)
    folder = Path(vc.out) / fingerprint
    done = _read_result(folder, fingerprint, t0)
    if done is not None:
        log.info("VLM checkpoint %s exists for this config; nothing to train", done.checkpoint)
        return done
    if cfg.synthetic.videos.pretrain == 0:
        log.info(
            "synthetic.videos.pretrain is 0: pretraining on %d videos of the pretrain split (rendered in memory)",
            DEFAULT_PRETRAIN_VIDEOS,
        )
    from extract.devices import resolve_device

    device = torch.device(resolve_device(cfg))  # a named device this machine lacks: a sentence, exit 2
    model = _create_model(vc.seed, device)
    # A frozen copy only for its batched preprocessing (ClipEncoder freezes the model it wraps).
    data = build_pretrain_data(cfg, ClipEncoder(copy.deepcopy(model), TINY_MODEL_NAME, device="cpu"), progress)
    N = data.pixels.shape[0]

    model.train()
    loss_fn = open_clip.ClipLoss()
    opt = _optimizer(model, vc.lr)
    gen = torch.Generator().manual_seed(vc.seed)
    losses, accs = np.zeros(vc.steps), np.zeros(vc.steps)
    with tqdm(range(vc.steps), desc="pretrain vlm", unit="step", disable=not progress) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, vc.steps, vc.lr)
            rows = torch.randint(N, (vc.batch_size,), generator=gen)  # (B,)
            caption = data.sample_captions(rows, gen, vc)  # (B,)
            images = data.pixels[rows].to(device)  # (B, 3, h, w)
            texts = data.tokens[caption].to(device)  # (B, context)
            img = model.encode_image(images, normalize=True)  # (B, Dc)
            txt = F.normalize(encode_text_trimmed(model, texts), dim=-1)  # (B, Dc)
            loss = loss_fn(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
                best = (img @ txt.T).argmax(dim=1).cpu()  # (B,) retrieved caption row per image
                accs[step] = (caption[best] == caption).float().mean().item()
            losses[step] = loss.item()
            if step % 10 == 0 or step == vc.steps - 1:
                lo = max(0, step - 19)
                bar.set_postfix(loss=f"{losses[lo : step + 1].mean():.3f}", i2t=f"{accs[lo : step + 1].mean():.2f}")
    model.eval()

    spans = np.array_split(np.arange(vc.steps), min(CURVE_POINTS, vc.steps))
    curve = [
        {
            "step": int(s[-1]) + 1,
            "loss": round(float(losses[s].mean()), 4),
            "i2t_top1": round(float(accs[s].mean()), 4),
        }
        for s in spans
    ]
    seconds = time.perf_counter() - t0
    summary = {
        "fingerprint": fingerprint,
        "vlm_version": VLM_VERSION,
        "generator_version": GENERATOR_VERSION,
        "model": TINY_MODEL_NAME,
        "videos": len(data.specs),
        "videos_from": "synthetic.videos.pretrain" if cfg.synthetic.videos.pretrain else "default (pretrain is 0)",
        "frames": N,
        "steps": vc.steps,
        "final_loss": curve[-1]["loss"],
        "train_accuracy": curve[-1]["i2t_top1"],
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "seconds": round(seconds, 2),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "caption_templates": list(CAPTION_TEMPLATES),
        "examples": [caption_texts()[int(i)] for i in data.sample_captions(torch.arange(0, N, N // 8 or 1), gen, vc)],
        "config": {"vlm": to_dict(vc), "synthetic": to_dict(pretrain_world(cfg))},
        "versions": {"open_clip": open_clip.__version__, "torch": torch.__version__},
    }

    def write(tmp: Path) -> None:
        save_checkpoint(model, tmp / CHECKPOINT, TINY_MODEL_CFG)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")

    publish_folder(folder, write, complete=lambda: _read_result(folder, fingerprint, t0) is not None)
    log.info("wrote %s (%.1f s)", folder / CHECKPOINT, seconds)
    return VlmResult(
        checkpoint=folder / CHECKPOINT,
        fingerprint=fingerprint,
        steps=vc.steps,
        final_loss=summary["final_loss"],
        train_accuracy=summary["train_accuracy"],
        seconds=seconds,
        skipped=False,
        videos=len(data.specs),
    )


# ---------------------------------------------------------------------------------------------
# Probes: has it learned the world, and the bias?
# ---------------------------------------------------------------------------------------------


def video_frame_embeddings(
    encoder: ClipEncoder, specs: list[VideoSpec], world: SyntheticConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of EVAL_FRAMES uniform frames per video, (N, L, Dc) L2-normalised, and the atomic action
    visible in each frame, (N, L) int64 (-1 when idle)."""
    frames, labels = [], []
    for spec in specs:
        video, _ = render_video(spec, world)  # (T, H, W, 3)
        pick = np.linspace(0, spec.num_frames - 1, EVAL_FRAMES).round().astype(int)  # (L,)
        frames.append(video[pick])
        labels.append(_frame_labels(spec)[pick])
    emb = encoder.encode_images(np.concatenate(frames))  # (N * L, Dc)
    return emb.view(len(specs), EVAL_FRAMES, -1), torch.from_numpy(np.stack(labels)).long()


def scene_embeddings(encoder: ClipEncoder, world: SyntheticConfig) -> torch.Tensor:
    """(S, SCENE_CLIPS, Dc) mean embeddings of scene-only clips (no action), SCENE_CLIPS lightings per scene."""
    num_frames = round(world.min_seconds * world.fps)
    pick = np.linspace(0, num_frames - 1, EVAL_FRAMES).round().astype(int)  # (L,)
    # Lighting seeds far from any planned video's (those are drawn in [0, 2**31)).
    clips = [
        render_scene_only(s.name, world, num_frames, 2**31 + 1000 * i + j)[pick]
        for i, s in enumerate(SCENES)
        for j in range(SCENE_CLIPS)
    ]
    emb = encoder.encode_images(np.concatenate(clips))  # (S * SCENE_CLIPS * L, Dc)
    emb = emb.view(len(SCENES), SCENE_CLIPS, EVAL_FRAMES, -1).mean(dim=2)  # (S, n, Dc)
    return F.normalize(emb, dim=-1)


def probe_vlm(
    encoder: ClipEncoder, cfg: Config, templates: tuple[str, ...] | None = None, videos: int | None = None
) -> dict[str, float]:
    """Zero-shot figures of a CLIP encoder on the synthetic world (chance = 1/8 for the accuracies).

    - `zs_iid`, `zs_ood`: activity accuracy on test_iid / test_ood, each video's mean frame embedding
      against the activity prompts (`encoders.clip.prompts`, or `templates`);
    - `action_iid`, `action_ood`: atomic-action accuracy (chance 1/16) of single frames showing an action,
      against the atomic-action prompts: how much of the causal foreground the model knows;
    - `scene_bias`: accuracy of naming, from a scene-only clip (no action), the activity whose usual scene
      it is; `scene_margin`: mean over activities of cos(text, its usual scene's clips) minus the mean
      cos(text, other scenes' clips). Both near chance / 0 for a model without the shortcut.
    `videos` overrides the test split sizes (each video has its own RNG stream: the first ones are the same).
    """
    world = cfg.synthetic
    if videos is not None:
        world = replace(world, videos=replace(world.videos, test_iid=videos, test_ood=videos))
    names = [_words(a.name) for a in ACTIVITIES]
    templates = templates or cfg.encoders.clip.prompts
    text = encoder.encode_text(names, templates)  # (C, Dc)
    atomic = encoder.encode_text([_words(a.name) for a in ATOMIC_ACTIONS], templates).cpu()  # (K, Dc)
    act_index = {a.name: i for i, a in enumerate(ACTIVITIES)}
    out: dict[str, float] = {}
    for split, tag in (("test_iid", "iid"), ("test_ood", "ood")):
        specs = plan_split(world, split)
        if not specs:
            raise ValueError(f"probe_vlm needs videos in synthetic.videos.{split} (it is 0)")
        labels = torch.tensor([act_index[s.activity] for s in specs], device=text.device)  # (N,)
        frames, actions = video_frame_embeddings(encoder, specs, world)  # (N, L, Dc), (N, L)
        logits = F.normalize(frames.mean(dim=1), dim=-1) @ text.T  # (N, C)
        out[f"zs_{tag}"] = float((logits.argmax(dim=1) == labels).float().mean())
        shown = actions >= 0  # (N, L)
        guess = (frames.cpu()[shown] @ atomic.T).argmax(dim=1)  # (M,) over frames showing an action
        out[f"action_{tag}"] = float((guess == actions[shown]).float().mean())
    usual = torch.tensor([[s.name for s in SCENES].index(a.usual_scene) for a in ACTIVITIES])  # (C,) scene index
    owner = torch.empty_like(usual)
    owner[usual] = torch.arange(len(ACTIVITIES))  # (S,) the activity whose usual scene each scene is
    scenes = scene_embeddings(encoder, world)  # (S, n, Dc)
    sims = torch.einsum("snd,cd->snc", scenes, text).cpu()  # (S, n, C) clip-text cosines
    out["scene_bias"] = float((sims.argmax(dim=2) == owner[:, None]).float().mean())
    per_scene = sims.mean(dim=1).T  # (C, S): activity text vs mean over clips of each scene
    on = per_scene[torch.arange(len(ACTIVITIES)), usual]  # (C,)
    off = (per_scene.sum(dim=1) - on) / (len(SCENES) - 1)  # (C,)
    out["scene_margin"] = float((on - off).mean())
    return out
