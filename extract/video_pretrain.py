"""Pretrain the tiny TimeSformer on short atomic-action clips (`ltar pretrain-video`): the Kinetics stand-in.

A real user's V comes from a TimeSformer trained on Kinetics-400, which carries actions; a random-weight
TimeSformer carries the scene and almost nothing of the small moving objects, so with it the visual input,
not the intervention, decides every head's number. No K400 weights can be downloaded here, so the `tiny`
divided space-time architecture of `extract/encoders/timesformer.py` is trained with supervision, as the
official model was, on clips rendered from the synthetic world's pretraining world:

- **Clips** (`video.clips`, `video.clip_frames` frames each, the preset's T0 = 8): one atomic action per clip
  (balanced over the 16 actions), covering half to all of the clip with idle frames around it, with the
  world's jitter of speed, phase, lane and size, and the world's lighting. Each clip has its own RNG stream
  under `synthetic.pretrain_seed`, so no clip is a train or test video.
- **Scene tie** (`video.scene_tie`): the scene is the action's usual scene (the usual scene of the first
  activity whose script holds it) with this probability, else one of the others; 1/8 is no tie. The default
  0.3 is mild: web-scale video data has its own scene bias, weaker than the demo world's rho = 0.85.
- **Objective**: cross-entropy of the official classifier `head` on the CLS token (the clip's action), plus
  `video.frame_weight` times the same head's cross-entropy on each frame's mean patch token, the exact V
  that extraction stores, over frames that show the action (idle frames carry no label). The second term is
  ours: the heads read per-frame V, and a CLS-only objective leaves the per-frame tokens free.

Output: `<video.out>/<fingerprint>/timesformer.pyth` in the **official facebookresearch/TimeSformer layout**
(`{"model_state": {"model.blocks.0.attn.qkv.weight": ..., "model.head.weight": ...}, "epoch", "cfg"}`, as its
`utils/checkpoint.py:save_checkpoint` writes, minus the optimizer state), so extraction loads it through
`encoders.timesformer.weights` by the same code as a downloaded K400 `.pyth` (the head is ignored there), and
`video.json` (training curve, config, provenance). `encoders.timesformer.weights: video` names this file.
The fingerprint hashes the video section, the world settings that change a clip's pixels, the architecture
and the generator version; the same config again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.contract.config import Config, to_dict
from extract.encoders.timesformer import PRESETS, TimeSformer, export_state_dict, preprocess
from extract.synthetic import (
    ACTIVITIES,
    ATOMIC_ACTIONS,
    COOCCUR_ACTION,
    GENERATOR_VERSION,
    SCENES,
    Segment,
    VideoSpec,
    draw_lighting,
    render_video,
)
from extract.vlm import publish_folder, warmup_cosine_lr

log = logging.getLogger(__name__)

VIDEO_VERSION = 2  # bump when clips or the training recipe change: every checkpoint retrains
PRESET = "tiny"  # the architecture trained (extract/encoders/timesformer.py PRESETS)
CHECKPOINT = "timesformer.pyth"  # beside it: video.json (training summary)
SUMMARY = "video.json"
WEIGHTS_TOKEN = "video"  # encoders.timesformer.weights: video = this module's checkpoint for the config
WEIGHT_DECAY = 0.05  # AdamW on weight matrices (TimeSformer's recipe excludes norms, biases and embeddings)
WARMUP = 0.05  # share of the steps with a linear warm-up before the cosine decay
CURVE_POINTS = 20
_CLIP_STREAM = 7001  # the clips' RNG streams: [synthetic.pretrain_seed, _CLIP_STREAM, i]

# Synthetic settings that never change a clip's pixels (clips are drawn here, not from the splits).
_WORLD_USED = ("pretrain_seed", "height", "width", "fps")


def _usual_scene_of_action() -> np.ndarray:
    """(K,) scene index per atomic action: the usual scene of the first activity whose script holds it
    (the co-occurring action: of the first activity that favours it)."""
    scene_index = {s.name: i for i, s in enumerate(SCENES)}
    out = np.empty(len(ATOMIC_ACTIONS), dtype=np.int64)
    for k, action in enumerate(ATOMIC_ACTIONS):
        owner = next(
            a for a in ACTIVITIES if action.name in a.script or (action.name == COOCCUR_ACTION and a.cooccur == "high")
        )
        out[k] = scene_index[owner.usual_scene]
    return out


ACTION_SCENE = _usual_scene_of_action()  # (K,)


def video_fingerprint(cfg: Config) -> str:
    """Hash of everything that changes the checkpoint's numbers (not `video.out`)."""
    world = to_dict(cfg.synthetic)
    blob = {
        "video_version": VIDEO_VERSION,
        "generator": GENERATOR_VERSION,
        "video": {k: v for k, v in to_dict(cfg.video).items() if k != "out"},
        "world": {k: world[k] for k in _WORLD_USED},
        "arch": to_dict(PRESETS[PRESET]),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def video_checkpoint(cfg: Config) -> Path:
    """Where `pretrain_video(cfg)` writes (or wrote) its checkpoint: the path for encoders.timesformer.weights."""
    return Path(cfg.video.out) / video_fingerprint(cfg) / CHECKPOINT


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------


def plan_clips(cfg: Config) -> list[VideoSpec]:
    """Specs of the pretraining clips: one atomic action each (balanced, shuffled), scene tied by `scene_tie`."""
    v, world = cfg.video, cfg.synthetic
    K, S, T = len(ATOMIC_ACTIONS), len(SCENES), v.clip_frames
    order = np.random.default_rng([world.pretrain_seed, _CLIP_STREAM]).permutation(np.arange(v.clips) % K)
    specs = []
    for i in range(v.clips):
        rng = np.random.default_rng([world.pretrain_seed, _CLIP_STREAM, i])
        k = int(order[i])
        usual = int(ACTION_SCENE[k])
        other = int(rng.integers(S - 1))
        other += other >= usual
        scene = usual if rng.random() < v.scene_tie else other
        length = int(rng.integers(math.ceil(T / 2), T + 1))  # the action covers half to all of the clip
        start = int(rng.integers(0, T - length + 1))
        j = rng.random(5)
        seed = int(rng.integers(2**31))
        segment = Segment(
            label=ATOMIC_ACTIONS[k].name,
            start=start,
            end=start + length,
            speed=float(0.8 + 0.45 * j[0]),
            phase=float(2 * math.pi * j[1]),
            offset=(float(0.16 * j[2] - 0.08), float(0.16 * j[3] - 0.08)),
            scale=float(0.85 + 0.3 * j[4]),
        )
        specs.append(
            VideoSpec(
                id=f"clip_{i:05d}",
                split="pretrain_video",
                activity="",  # a clip shows one action, no activity
                scene=SCENES[scene].name,
                usual_scene=scene == usual,
                cooccur=False,
                num_frames=T,
                segments=(segment,),
                lighting=draw_lighting(seed),
                seed=seed,
            )
        )
    return specs


@dataclass
class ClipData:
    """The rendered clips, preprocessed: `pixels` (N, T, 3, S, S) float16, `action` (N,) int64, `frame_action`
    (N, T) int64 (-1 on idle frames), `scene` (N,) int64."""

    pixels: torch.Tensor
    action: torch.Tensor
    frame_action: torch.Tensor
    scene: torch.Tensor


def build_clips(cfg: Config, progress: bool = False) -> ClipData:
    from tqdm import tqdm

    specs = plan_clips(cfg)
    size = PRESETS[PRESET].image_size
    action_index = {a.name: i for i, a in enumerate(ATOMIC_ACTIONS)}
    scene_index = {s.name: i for i, s in enumerate(SCENES)}
    T = cfg.video.clip_frames
    pixels = torch.empty(len(specs), T, 3, size, size, dtype=torch.float16)
    frame_action = torch.full((len(specs), T), -1, dtype=torch.int64)
    chunk = 64
    for lo in tqdm(range(0, len(specs), chunk), desc="pretrain clips", unit="chunk", disable=not progress):
        part = specs[lo : lo + chunk]
        frames = np.stack([render_video(spec, cfg.synthetic)[0] for spec in part])  # (b, T, H, W, 3)
        pixels[lo : lo + len(part)] = preprocess(torch.from_numpy(frames), size).half()  # (b, T, 3, S, S)
    for i, spec in enumerate(specs):
        seg = spec.segments[0]
        frame_action[i, seg.start : seg.end] = action_index[seg.label]
    return ClipData(
        pixels=pixels,
        action=torch.tensor([action_index[s.segments[0].label] for s in specs]),
        frame_action=frame_action,
        scene=torch.tensor([scene_index[s.scene] for s in specs]),
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class ClipClassifier(nn.Module):
    """The official `VisionTransformer`: backbone + `head` (a Linear on the CLS token), K = 16 atomic actions."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.model = TimeSformer(PRESETS[PRESET])
        self.head = nn.Linear(self.model.arch.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, S, S) -> clip logits (B, K) from the CLS, frame logits (B, T, K) from V."""
        cls, tokens = self.model(video)  # (B, D), (B, T, N, D)
        return self.head(cls), self.head(tokens.mean(dim=2))  # V_t = mean patch token, as extraction stores


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, rest = [], []
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or "norm" in name or name.endswith(("pos_embed", "cls_token", "time_embed"))
        (rest if no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


@dataclass(frozen=True)
class VideoResult:
    checkpoint: Path  # <out>/<fingerprint>/timesformer.pyth (official layout); video.json beside it
    fingerprint: str
    steps: int
    final_loss: float  # total loss averaged over the last span of the curve
    train_accuracy: float  # clip-level top-1 of the CLS head over the same span
    seconds: float  # wall time of this call
    skipped: bool  # True: the checkpoint for this fingerprint existed, nothing was trained
    clips: int


def _read_result(folder: Path, fingerprint: str, t0: float) -> VideoResult | None:
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("fingerprint") != fingerprint or not (folder / CHECKPOINT).is_file():
        return None
    return VideoResult(
        checkpoint=folder / CHECKPOINT,
        fingerprint=fingerprint,
        steps=int(summary["steps"]),
        final_loss=float(summary["final_loss"]),
        train_accuracy=float(summary["train_accuracy"]),
        seconds=time.perf_counter() - t0,
        skipped=True,
        clips=int(summary["clips"]),
    )


def official_cfg(cfg: Config) -> str:
    """The `cfg` entry of the checkpoint: a YAML dump as the official `save_checkpoint` writes (`cfg.dump()`), whose
    `DATA` section says how the clips were sampled (consecutive rendered frames: 8 frames 1 apart at the world's fps)
    and normalised, so that extraction feeds this model its own setting as it does a K400 checkpoint."""
    import yaml

    from extract.encoders.timesformer import MEAN, STD

    data = {
        "NUM_FRAMES": cfg.video.clip_frames,
        "SAMPLING_RATE": 1,
        "TARGET_FPS": cfg.synthetic.fps,
        "TEST_CROP_SIZE": PRESETS[PRESET].image_size,
        "MEAN": list(MEAN),
        "STD": list(STD),
    }
    return yaml.safe_dump({"DATA": data, "MODEL": {"NUM_CLASSES": len(ATOMIC_ACTIONS)}}, sort_keys=True)


def save_official(clf: ClipClassifier, path: Path, cfg_yaml: str, epoch: int) -> None:
    """Write the facebookresearch/TimeSformer `.pyth` layout: `model_state` with `model.`-prefixed keys and the
    classifier `model.head.*`, `epoch`, `cfg` (the YAML dump of its settings, as the official file holds)."""
    state = export_state_dict(clf.model, "official")
    state["model.head.weight"] = clf.head.weight.detach().cpu().clone()
    state["model.head.bias"] = clf.head.bias.detach().cpu().clone()
    torch.save({"epoch": epoch, "model_state": state, "cfg": cfg_yaml}, path)


def pretrain_video(cfg: Config, progress: bool = True) -> VideoResult:
    """Train the tiny TimeSformer on the atomic-action clips and write its official-layout checkpoint; a
    no-op when it exists. Each step draws `video.batch_size` clips with replacement."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    vc = cfg.video
    fingerprint = video_fingerprint(cfg)
    folder = Path(vc.out) / fingerprint
    done = _read_result(folder, fingerprint, t0)
    if done is not None:
        log.info("video encoder checkpoint %s exists for this config; nothing to train", done.checkpoint)
        return done
    from extract.devices import resolve_device

    device = torch.device(resolve_device(cfg))  # a named device this machine lacks: a sentence, exit 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vc.seed)
        clf = ClipClassifier(len(ATOMIC_ACTIONS)).to(device)
    data = build_clips(cfg, progress)
    N = data.pixels.shape[0]
    opt = _optimizer(clf, vc.lr)
    gen = torch.Generator().manual_seed(vc.seed)
    losses, accs = np.zeros(vc.steps), np.zeros(vc.steps)
    clf.train()
    with tqdm(range(vc.steps), desc="pretrain video", unit="step", disable=not progress) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, vc.steps, vc.lr, WARMUP)
            rows = torch.randint(N, (vc.batch_size,), generator=gen)  # (B,)
            video = data.pixels[rows].to(device).float()  # (B, T, 3, S, S)
            y, yf = data.action[rows].to(device), data.frame_action[rows].to(device)  # (B,), (B, T)
            clip_logits, frame_logits = clf(video)  # (B, K), (B, T, K)
            loss = F.cross_entropy(clip_logits, y)
            if vc.frame_weight > 0:
                loss = loss + vc.frame_weight * F.cross_entropy(
                    frame_logits.flatten(0, 1), yf.flatten(), ignore_index=-1
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            losses[step] = loss.item()
            accs[step] = (clip_logits.argmax(dim=1) == y).float().mean().item()
            if step % 10 == 0 or step == vc.steps - 1:
                lo = max(0, step - 19)
                bar.set_postfix(loss=f"{losses[lo : step + 1].mean():.3f}", acc=f"{accs[lo : step + 1].mean():.2f}")
    clf.eval()

    spans = np.array_split(np.arange(vc.steps), min(CURVE_POINTS, vc.steps))
    curve = [
        {"step": int(s[-1]) + 1, "loss": round(float(losses[s].mean()), 4), "acc": round(float(accs[s].mean()), 4)}
        for s in spans
    ]
    seconds = time.perf_counter() - t0
    record = {"video": to_dict(vc), "synthetic": {k: to_dict(cfg.synthetic)[k] for k in _WORLD_USED}}
    summary = {
        "fingerprint": fingerprint,
        "video_version": VIDEO_VERSION,
        "generator_version": GENERATOR_VERSION,
        "architecture": f"timesformer-divided-space-time, preset {PRESET}",
        "layout": "official (facebookresearch/TimeSformer .pyth: model_state, model.* keys, model.head = 16 actions)",
        "classes": [a.name for a in ATOMIC_ACTIONS],
        "clips": N,
        "usual_scene_share": round(
            float((data.scene == torch.from_numpy(ACTION_SCENE)[data.action]).float().mean()), 4
        ),
        "steps": vc.steps,
        "final_loss": curve[-1]["loss"],
        "train_accuracy": curve[-1]["acc"],
        "seconds": round(seconds, 2),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "config": record,
        "versions": {"torch": torch.__version__},
    }

    def write(tmp: Path) -> None:
        save_official(clf.cpu(), tmp / CHECKPOINT, official_cfg(cfg), epoch=vc.steps)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")

    publish_folder(folder, write, complete=lambda: _read_result(folder, fingerprint, t0) is not None)
    log.info("wrote %s (%.1f s)", folder / CHECKPOINT, seconds)
    return VideoResult(
        checkpoint=folder / CHECKPOINT,
        fingerprint=fingerprint,
        steps=vc.steps,
        final_loss=summary["final_loss"],
        train_accuracy=summary["train_accuracy"],
        seconds=seconds,
        skipped=False,
        clips=N,
    )
