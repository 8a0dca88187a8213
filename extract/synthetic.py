"""The synthetic confounded benchmark: real mp4 videos whose causal structure is known.

The world (fixed in code, written to `world.json`):
- 16 atomic actions, each a visible foreground event: a shape of one colour moving in one way
  (`crack_egg` = a white circle falling from top to bottom).
- 8 activities, each an ordered script of 3-6 atomic actions played one after the other with idle
  gaps; two pairs use the same actions in a different order, so only temporal order separates them.
- 8 background scenes (texture, colours), each the "usual scene" of one activity.

Causal graph: activity -> script -> foreground pixels (the only causal path); activity -> scene ->
background pixels is a shortcut planted in train / test_iid / pretrain (scene = usual scene with
probability `rho`) and broken in test_ood. `add_salt_pepper` co-occurs with half of the activities
(`cooccur_high`) more than with the rest (`cooccur_low`) and never decides the activity; test_ood
inserts it at the average rate. `train_oracle` (`synthetic.videos.train_oracle`, 0 by default) is a training
split drawn as test_ood is with an independent scene: the unconfounded data of the oracle bound row. The
foreground never depends on the scene: objects keep their colours
under every lighting, so the foreground mask separates the causal from the spurious pixels exactly.

The named confounders (`CONFOUNDERS`), each a shortcut one of the papers claims to remove:
- `scene`: the background tied to the activity (ECRL's background, CMDCL's and PCMCI's visual confounder);
- `cooccur`: `add_salt_pepper`, a labelled action inserted more often in some activities (a co-occurrence);
- `distractor` (`synthetic.distractor`, off by default): a small non-causal object drawn beside the acting
  object during every action, so inside the salient region and kept by a foreground crop, the activity's
  usual one with probability `distractor_rho` (PCMCI's "apron near the stove" co-occurrence hallucination);
- `idle` (`synthetic.idle_marker`, off by default): a static object in a corner shown only in the idle frames
  between actions, never while an action plays, the activity's usual one with probability `idle_rho`: a
  shortcut that lives in separable environment frames, the premise of IGV / EIGV's grounding;
- `order`: no planted bias but a hard case, the same-set activity pairs that only temporal order separates
  (ICI's claim); tables report their confusion (`train.ablate`).
test_ood breaks every planted confounder at once (today's split); `test_ood_scene`, `test_ood_cooccur`,
`test_ood_distractor` and `test_ood_idle` (`synthetic.videos.*`, 0 by default) each break only their own and
keep the others as test_iid draws them (`BROKEN`), so a table can tell which head removes which bias. The
distractor and the idle marker are drawn from their own random streams: switching one on adds an object to
the same videos (same activity, scene, timing and lighting) and changes nothing else.

Outputs of `write_dataset(cfg, root)`: `videos/<split>/<id>.mp4`, `manifest.jsonl` (read by
`extract.datasets.read_manifest`), `classes.json` (the two tasks only) and `world.json` (world
definition, config and its hash; the scene list lives here because scene is not a task).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import SyntheticConfig
from extract.contract.config import to_dict

GENERATOR_VERSION = 1  # bump when rendering or the world changes: every written dataset re-renders
SPLITS = (  # appended only: a split's index seeds its videos
    "train",
    "test_iid",
    "test_ood",
    "pretrain",
    "train_oracle",
    "test_ood_scene",
    "test_ood_cooccur",
    "test_ood_distractor",
    "test_ood_idle",
)
UNCONFOUNDED = "train_oracle"  # every confounder independent of the activity: the oracle's training data
CONFOUNDERS = ("scene", "cooccur", "distractor", "idle")  # the planted shortcuts (`order` is a hard case, not a bias)
BROKEN: dict[str, frozenset[str]] = {  # split -> the confounders drawn independently of the activity in it
    "test_ood": frozenset(CONFOUNDERS),
    UNCONFOUNDED: frozenset(CONFOUNDERS),
    **{f"test_ood_{c}": frozenset({c}) for c in CONFOUNDERS},
}
_VIDEO_NAME = re.compile(r"^(" + "|".join(SPLITS) + r")_\d{5}\.mp4$")

# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {  # saturated or bright, so objects stand out from every scene
    "white": (245, 245, 245),
    "yellow": (250, 220, 40),
    "orange": (255, 140, 0),
    "red": (230, 30, 30),
    "green": (40, 200, 60),
    "blue": (30, 80, 240),
    "cyan": (0, 220, 230),
}

DISTRACTOR_COLOURS: dict[str, tuple[int, int, int]] = {  # hues no atomic action has, so a distractor is no action
    "magenta": (235, 40, 235),
    "pink": (255, 165, 200),
}

IDLE_COLOURS: dict[str, tuple[int, int, int]] = {  # neither an action's nor a distractor's hue
    "black": (12, 12, 12),
    "lime": (165, 255, 0),
}

MOTION_TEXT = {
    "left_right": "moving from left to right",
    "right_left": "moving from right to left",
    "fall": "falling from top to bottom",
    "diagonal": "sliding diagonally down to the right",
    "circle": "circling around the centre",
    "up_down": "bobbing up and down",
    "zigzag": "zig-zagging from left to right",
    "shake": "shaking in place",
    "bounce": "bouncing from left to right",
    "figure_eight": "tracing a figure eight",
}


@dataclass(frozen=True)
class AtomicAction:
    name: str  # class name, also the caption stem (`crack_egg` -> "crack egg")
    shape: str  # circle, ring, square, triangle, diamond, bar, cross
    colour: str  # a key of COLOURS
    motion: str  # a key of MOTION_TEXT

    def description(self) -> str:
        """The visual definition in words, e.g. `a white circle falling from top to bottom`."""
        return f"a {self.colour} {self.shape} {MOTION_TEXT[self.motion]}"


@dataclass(frozen=True)
class Activity:
    name: str  # class name of the long-term activity
    script: tuple[str, ...]  # atomic actions in temporal order
    usual_scene: str  # the scene it is filmed in with probability rho (train, test_iid, pretrain)
    cooccur: str  # "high" or "low": how often add_salt_pepper is inserted (train, test_iid, pretrain)


@dataclass(frozen=True)
class Distractor:
    name: str  # readable object name (not a class: no task labels it)
    shape: str  # a key of _SHAPES
    colour: str  # a key of DISTRACTOR_COLOURS (never an atomic action's colour)


@dataclass(frozen=True)
class IdleMarker:
    name: str  # readable object name (not a class)
    shape: str  # a key of _SHAPES
    colour: str  # a key of IDLE_COLOURS (never an atomic action's or a distractor's colour)


@dataclass(frozen=True)
class Scene:
    name: str  # readable scene name
    pattern: str  # a key of _PATTERNS
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]  # RGB in [0, 1]: base, pattern


COOCCUR_ACTION = "add_salt_pepper"  # the non-causal atomic action (visible, labelled, never decisive)

ATOMIC_ACTIONS: tuple[AtomicAction, ...] = (
    AtomicAction("crack_egg", "circle", "white", "fall"),
    AtomicAction("whisk_batter", "ring", "yellow", "circle"),
    AtomicAction("butter_pan", "square", "yellow", "left_right"),
    AtomicAction("fry_in_pan", "circle", "orange", "shake"),
    AtomicAction("plate_food", "square", "white", "right_left"),
    AtomicAction("pour_milk", "bar", "white", "zigzag"),
    AtomicAction("pour_cereal", "triangle", "orange", "fall"),
    AtomicAction("stir_spoon", "bar", "cyan", "circle"),
    AtomicAction("boil_water", "ring", "blue", "up_down"),
    AtomicAction("add_teabag", "square", "green", "fall"),
    AtomicAction("pour_water", "bar", "blue", "diagonal"),
    AtomicAction("cut_bread", "diamond", "orange", "up_down"),
    AtomicAction("spread_butter", "diamond", "yellow", "zigzag"),
    AtomicAction("squeeze_orange", "cross", "orange", "figure_eight"),
    AtomicAction("pour_flour", "triangle", "white", "diagonal"),
    AtomicAction(COOCCUR_ACTION, "cross", "red", "bounce"),
)

SCENES: tuple[Scene, ...] = (  # mid-tone colours (max channel <= 0.6): every object stays visible under any lighting
    Scene("striped_kitchen", "stripes", ((0.60, 0.55, 0.42), (0.35, 0.45, 0.33))),
    Scene("checkered_diner", "checker", ((0.30, 0.20, 0.40), (0.55, 0.48, 0.60))),
    Scene("dotted_cafe", "dots", ((0.20, 0.40, 0.45), (0.50, 0.60, 0.60))),
    Scene("wooden_cabin", "wood", ((0.40, 0.26, 0.15), (0.58, 0.42, 0.25))),
    Scene("tiled_bakery", "tiles", ((0.45, 0.55, 0.62), (0.30, 0.30, 0.32))),
    Scene("brick_canteen", "bricks", ((0.55, 0.26, 0.17), (0.48, 0.45, 0.42))),
    Scene("diagonal_pantry", "diagonal", ((0.48, 0.48, 0.22), (0.28, 0.28, 0.18))),
    Scene("marble_counter", "marble", ((0.56, 0.56, 0.60), (0.36, 0.36, 0.40))),
)

# The distractors, the i-th the usual one of the i-th activity (`ACTIVITIES`) when `synthetic.distractor` is on.
DISTRACTORS: tuple[Distractor, ...] = (
    Distractor("apron", "square", "magenta"),
    Distractor("oven_mitt", "circle", "magenta"),
    Distractor("spice_jar", "triangle", "magenta"),
    Distractor("tea_towel", "diamond", "magenta"),
    Distractor("napkin", "square", "pink"),
    Distractor("salt_shaker", "circle", "pink"),
    Distractor("pot_lid", "triangle", "pink"),
    Distractor("sponge", "diamond", "pink"),
)

# The idle markers, the i-th the usual one of the i-th activity when `synthetic.idle_marker` is on: static, in a
# corner, shown only while no action plays.
IDLE_MARKERS: tuple[IdleMarker, ...] = (
    IdleMarker("wall_clock", "circle", "black"),
    IdleMarker("calendar", "square", "black"),
    IdleMarker("radio", "bar", "black"),
    IdleMarker("plant", "triangle", "black"),
    IdleMarker("lamp", "circle", "lime"),
    IdleMarker("poster", "square", "lime"),
    IdleMarker("shelf", "bar", "lime"),
    IdleMarker("vase", "triangle", "lime"),
)

# The two same-set pairs: (fried, scrambled) and (cereal, porridge). In each pair one member favours
# the co-occurring action, so co-occurrence is a shortcut exactly where temporal order should decide.
ACTIVITIES: tuple[Activity, ...] = (
    Activity("make_fried_egg", ("butter_pan", "crack_egg", "fry_in_pan", "plate_food"), "striped_kitchen", "high"),
    Activity("make_scrambled_egg", ("crack_egg", "butter_pan", "fry_in_pan", "plate_food"), "checkered_diner", "low"),
    Activity("make_cereal", ("pour_cereal", "pour_milk", "stir_spoon"), "dotted_cafe", "low"),
    Activity("make_porridge", ("pour_milk", "pour_cereal", "stir_spoon"), "wooden_cabin", "high"),
    Activity("make_tea", ("boil_water", "pour_water", "add_teabag", "stir_spoon"), "tiled_bakery", "low"),
    Activity(
        "make_pancake",
        ("pour_flour", "crack_egg", "pour_milk", "whisk_batter", "butter_pan", "fry_in_pan"),
        "brick_canteen",
        "high",
    ),
    Activity("make_sandwich", ("cut_bread", "spread_butter", "plate_food"), "diagonal_pantry", "high"),
    Activity("make_juice", ("squeeze_orange", "pour_water", "stir_spoon"), "marble_counter", "low"),
)

ATOMIC = {a.name: a for a in ATOMIC_ACTIONS}
ACTIVITY = {a.name: a for a in ACTIVITIES}
SCENE = {s.name: s for s in SCENES}
_ACTIVITY_INDEX = {a.name: i for i, a in enumerate(ACTIVITIES)}
_SCENE_INDEX = {s.name: i for i, s in enumerate(SCENES)}
DISTRACTOR = {d.name: d for d in DISTRACTORS}
IDLE_MARKER = {m.name: m for m in IDLE_MARKERS}


def broken(split: str) -> frozenset[str]:
    """The confounders drawn independently of the activity in `split` (none in train, test_iid, pretrain)."""
    return BROKEN.get(split, frozenset())


def same_set_pairs() -> list[tuple[str, str]]:
    """Pairs of activities whose scripts hold the same atomic actions in a different order."""
    return [
        (a.name, b.name)
        for i, a in enumerate(ACTIVITIES)
        for b in ACTIVITIES[i + 1 :]
        if sorted(a.script) == sorted(b.script) and a.script != b.script
    ]


def world_definition() -> dict[str, Any]:
    """The whole world as plain data (written to world.json; captions can be built from it)."""
    return {
        "atomic": [
            {**a.__dict__, "description": a.description(), "causal": a.name != COOCCUR_ACTION} for a in ATOMIC_ACTIONS
        ],
        "activities": [{**a.__dict__, "script": list(a.script)} for a in ACTIVITIES],
        "scenes": [{"name": s.name, "pattern": s.pattern, "colours": [list(c) for c in s.colours]} for s in SCENES],
        "cooccur_action": COOCCUR_ACTION,
        "distractors": [{**d.__dict__, "usual_for": a.name} for d, a in zip(DISTRACTORS, ACTIVITIES, strict=True)],
        "idle_markers": [{**m.__dict__, "usual_for": a.name} for m, a in zip(IDLE_MARKERS, ACTIVITIES, strict=True)],
        "confounders": list(CONFOUNDERS),
        "broken": {s: sorted(c) for s, c in BROKEN.items()},
        "same_set_pairs": [list(p) for p in same_set_pairs()],
        "colours": {k: list(v) for k, v in COLOURS.items()},
    }


def classes() -> dict[str, list[str]]:
    """The label vocabularies (tasks only: scene is not a task, so it stays out of classes.json)."""
    return {"activity": [a.name for a in ACTIVITIES], "atomic": [a.name for a in ATOMIC_ACTIONS]}


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    label: str  # atomic action
    start: int  # first frame
    end: int  # one past the last frame
    speed: float  # path speed: cycles of a periodic motion, easing exponent of a straight one
    phase: float  # radians, start of a periodic motion
    offset: tuple[float, float]  # (dy, dx) lane offset in frame fractions
    scale: float  # object size multiplier


@dataclass(frozen=True)
class Lighting:
    gain: float  # overall brightness of the scene
    tint: tuple[float, float, float]  # per-channel colour multiplier
    gradient: float  # strength of a linear light falloff across the frame
    angle: float  # radians, direction the light comes from
    shift: tuple[float, float]  # (dy, dx) texture offset in pattern periods (scenes are never pixel-identical)
    flicker: float  # amplitude of a slow brightness wobble over time
    flicker_hz: float  # its frequency
    flicker_phase: float  # its phase in radians


@dataclass(frozen=True)
class VideoSpec:
    id: str  # train_00000, ...
    split: str
    activity: str
    scene: str
    usual_scene: bool  # scene == the activity's usual scene
    cooccur: bool  # add_salt_pepper was inserted into the script
    num_frames: int  # T
    segments: tuple[Segment, ...]  # atomic actions in temporal order; frames between them are idle
    lighting: Lighting  # = draw_lighting(seed)
    seed: int  # decides the lighting; render_scene_only(scene, cfg, T, seed) is this video's background
    distractor: str | None = None  # the object drawn beside every action (synthetic.distractor), None = none
    usual_distractor: bool | None = None  # distractor == the activity's usual one
    distractor_angle: float = 0.0  # radians: where the distractor sits around the acting object
    idle_marker: str | None = None  # the object shown in the idle frames (synthetic.idle_marker), None = none
    usual_idle_marker: bool | None = None  # idle_marker == the activity's usual one
    idle_corner: int = 0  # 0..3: top-left, top-right, bottom-left, bottom-right

    @property
    def atomic(self) -> list[str]:
        """The multi-hot label as names, in vocabulary order."""
        present = {s.label for s in self.segments}
        return [a.name for a in ATOMIC_ACTIONS if a.name in present]

    def annotations(self, fps: float) -> list[list[Any]]:
        """Per-segment `[start_s, end_s, label]` in seconds."""
        return [[round(s.start / fps, 4), round(s.end / fps, 4), s.label] for s in self.segments]


def draw_lighting(seed: int) -> Lighting:
    """Per-video lighting and colour jitter, a pure function of the video's seed."""
    rng = np.random.default_rng([seed, 7])
    u = rng.random(11)
    return Lighting(
        gain=float(0.85 + 0.3 * u[0]),
        tint=tuple(float(t) for t in 0.94 + 0.12 * u[1:4]),
        gradient=float(0.2 * u[4]),
        angle=float(2 * math.pi * u[5]),
        shift=(float(u[6]), float(u[7])),
        flicker=float(0.04 * u[8]),
        flicker_hz=float(0.05 + 0.25 * u[9]),
        flicker_phase=float(2 * math.pi * u[10]),
    )


def _split_sizes(cfg: SyntheticConfig, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return int(getattr(cfg.videos, split))


def _draw_scene(rng: np.random.Generator, activity: Activity, split: str, cfg: SyntheticConfig) -> str:
    usual = _SCENE_INDEX[activity.usual_scene]
    u, other, anything = rng.random(), int(rng.integers(len(SCENES) - 1)), int(rng.integers(len(SCENES)))
    other += other >= usual  # uniform over the scenes that are not the usual one
    if split == UNCONFOUNDED:
        return SCENES[anything].name  # rho = 1/#scenes: the scene carries nothing about the activity
    if "scene" not in broken(split):
        return SCENES[usual if u < cfg.rho else other].name
    return SCENES[anything if cfg.ood_scene == "independent" else other].name


def _cooccur_rate(activity: Activity, split: str, cfg: SyntheticConfig) -> float:
    if "cooccur" in broken(split):
        return (cfg.cooccur_high + cfg.cooccur_low) / 2
    return cfg.cooccur_high if activity.cooccur == "high" else cfg.cooccur_low


def _draw_tied(rng: np.random.Generator, activity: Activity, split: str, confounder: str, rho: float) -> int:
    """Index of an activity-tied object (distractor, idle marker; 8 of each, the i-th the usual one of the
    i-th activity): the usual one with probability rho, else one of the others; uniform where `split` breaks
    `confounder`. `rng` is the video's own stream for that object."""
    usual = _ACTIVITY_INDEX[activity.name]
    n = len(ACTIVITIES)
    u, other, anything = rng.random(), int(rng.integers(n - 1)), int(rng.integers(n))
    other += other >= usual
    if confounder in broken(split):
        return anything
    return usual if u < rho else other


def _timeline(rng: np.random.Generator, script: Sequence[str], num_frames: int) -> list[tuple[int, int]]:
    """(start, end) frames of each action: jittered lengths, idle gaps before, between and after."""
    k = len(script)
    if num_frames < 2 * k:
        raise ValueError(
            f"a {num_frames}-frame video cannot hold {k} atomic actions of at least 2 frames; "
            "raise synthetic.min_seconds or synthetic.fps"
        )
    weights = np.empty(2 * k + 1)  # g0, a1, g1, ..., ak, gk
    weights[1::2] = rng.uniform(0.7, 1.3, k)  # action lengths
    weights[0::2] = rng.uniform(0.05, 0.45, k + 1)  # idle gaps
    free = num_frames - 2 * k  # every action gets 2 frames, the rest is shared by weight
    edges = np.round(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * free).astype(int)
    lengths = np.diff(edges)  # (2k+1,), sums to free
    lengths[1::2] += 2
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [(int(bounds[2 * i + 1]), int(bounds[2 * i + 2])) for i in range(k)]


def plan_split(cfg: SyntheticConfig, split: str) -> list[VideoSpec]:
    """Deterministic specs of every video of `split` (no pixels): activity, scene, script, timing, lighting.

    train / test_iid / test_ood come from `cfg.seed`, pretrain from `cfg.pretrain_seed`; each split and
    each video has its own RNG stream, so resizing one split never changes another's videos.
    """
    n = _split_sizes(cfg, split)
    base = cfg.pretrain_seed if split == "pretrain" else cfg.seed
    k = SPLITS.index(split)
    # Activities are balanced (n // 8 each, the remainder spread), then shuffled.
    order = np.random.default_rng([base, k]).permutation(np.arange(n) % len(ACTIVITIES))
    specs = []
    for i in range(n):
        rng = np.random.default_rng([base, k, i])
        seed = int(rng.integers(2**31))
        activity = ACTIVITIES[int(order[i])]
        scene = _draw_scene(rng, activity, split, cfg)
        cooccur = bool(rng.random() < _cooccur_rate(activity, split, cfg))
        where = int(rng.integers(len(activity.script) + 1))
        script = list(activity.script)
        if cooccur:
            script.insert(where, COOCCUR_ACTION)
        num_frames = int(round(rng.uniform(cfg.min_seconds, cfg.max_seconds) * cfg.fps))
        spans = _timeline(rng, script, num_frames)
        distractor, angle, marker, corner = None, 0.0, None, 0
        if cfg.distractor:  # its own stream: the video's other draws are the same with the distractor on or off
            stream = np.random.default_rng([base, k, i, 2])
            distractor = DISTRACTORS[_draw_tied(stream, activity, split, "distractor", cfg.distractor_rho)].name
            angle = float(2 * math.pi * stream.random())
        if cfg.idle_marker:  # its own stream too
            stream = np.random.default_rng([base, k, i, 3])
            marker = IDLE_MARKERS[_draw_tied(stream, activity, split, "idle", cfg.idle_rho)].name
            corner = int(stream.integers(4))
        jitter = rng.random((len(script), 5))  # speed, phase, dy, dx, scale per segment
        segments = tuple(
            Segment(
                label=label,
                start=start,
                end=end,
                speed=float(0.8 + 0.45 * j[0]),
                phase=float(2 * math.pi * j[1]),
                offset=(float(0.16 * j[2] - 0.08), float(0.16 * j[3] - 0.08)),
                scale=float(0.85 + 0.3 * j[4]),
            )
            for label, (start, end), j in zip(script, spans, jitter, strict=True)
        )
        specs.append(
            VideoSpec(
                id=f"{split}_{i:05d}",
                split=split,
                activity=activity.name,
                scene=scene,
                usual_scene=scene == activity.usual_scene,
                cooccur=cooccur,
                num_frames=num_frames,
                segments=segments,
                lighting=draw_lighting(seed),
                seed=seed,
                distractor=distractor,
                usual_distractor=None if distractor is None else distractor == DISTRACTORS[int(order[i])].name,
                distractor_angle=angle,
                idle_marker=marker,
                usual_idle_marker=None if marker is None else marker == IDLE_MARKERS[int(order[i])].name,
                idle_corner=corner,
            )
        )
    return specs


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


# Textures on frame fractions (y, x) in [0, 1), shifted by (sy, sx) pattern periods; values in [0, 1].
_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]] = {
    "stripes": lambda y, x, sy, sx: np.floor(6 * y + sy) % 2,
    "checker": lambda y, x, sy, sx: (np.floor(5 * y + sy) + np.floor(5 * x + sx)) % 2,
    "dots": lambda y, x, sy, sx: ((_frac(5 * y + sy) - 0.5) ** 2 + (_frac(5 * x + sx) - 0.5) ** 2 < 0.09) * 1.0,
    "wood": lambda y, x, sy, sx: (
        0.5 + 0.5 * np.sin(2 * np.pi * (4 * x + sx + 0.35 * np.sin(2 * np.pi * (1.5 * y + sy))))
    ),
    "tiles": lambda y, x, sy, sx: ((_frac(4 * y + sy) < 0.12) | (_frac(4 * x + sx) < 0.12)) * 1.0,
    "bricks": lambda y, x, sy, sx: (
        ((_frac(6 * y + sy) < 0.15) | (_frac(3 * x + sx + 0.5 * (np.floor(6 * y + sy) % 2)) < 0.08)) * 1.0
    ),
    "diagonal": lambda y, x, sy, sx: np.floor(4 * (x + y) + sx + sy) % 2,
    "marble": lambda y, x, sy, sx: (
        (0.5 + 0.5 * np.sin(2 * np.pi * (2 * x + 1.3 * y + sx) + 2.5 * np.sin(2 * np.pi * (1.7 * y - 0.8 * x + sy))))
        ** 3
    ),
}


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as frame fractions: y (H, 1), x (1, W)."""
    y = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    return y, x


def _background(scene: Scene, lighting: Lighting, cfg: SyntheticConfig, num_frames: int) -> np.ndarray:
    """Lit scene frames, float32 `(T, H, W, 3)` in [0, 1] before quantisation."""
    y, x = _grid(cfg.height, cfg.width)
    p = _PATTERNS[scene.pattern](y, x, *lighting.shift).astype(np.float32)  # (H, W)
    p = np.broadcast_to(p, (cfg.height, cfg.width))
    c0, c1 = (np.asarray(c, np.float32) for c in scene.colours)
    image = c0 * (1 - p[..., None]) + c1 * p[..., None]  # (H, W, 3)
    light = 1 + lighting.gradient * ((x - 0.5) * math.cos(lighting.angle) + (y - 0.5) * math.sin(lighting.angle))
    image = image * light[..., None] * lighting.gain * np.asarray(lighting.tint, np.float32)  # (H, W, 3)
    t = np.arange(num_frames, dtype=np.float32) / cfg.fps
    wobble = 1 + lighting.flicker * np.sin(2 * np.pi * lighting.flicker_hz * t + lighting.flicker_phase)  # (T,)
    return image[None] * wobble.astype(np.float32)[:, None, None, None]  # (T, H, W, 3)


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8, rounding half up; works in place on `frames`."""
    frames *= 255
    frames += 0.5
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8)


def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [-1, 1] with period 1."""
    return 4 * np.abs(_frac(x + 0.25) - 0.5) - 1


# Object centre (y, x) in frame fractions along normalised time u (n,), given speed and phase.
_MOTIONS: dict[str, Callable[[np.ndarray, float, float], tuple[np.ndarray, np.ndarray]]] = {
    "left_right": lambda u, s, ph: (np.full_like(u, 0.5), 0.15 + 0.7 * u**s),
    "right_left": lambda u, s, ph: (np.full_like(u, 0.5), 0.85 - 0.7 * u**s),
    "fall": lambda u, s, ph: (0.15 + 0.7 * u**s, np.full_like(u, 0.5)),
    "diagonal": lambda u, s, ph: (0.15 + 0.7 * u**s, 0.15 + 0.7 * u**s),
    "circle": lambda u, s, ph: (
        0.5 + 0.25 * np.sin(2 * np.pi * s * u + ph),
        0.5 + 0.25 * np.cos(2 * np.pi * s * u + ph),
    ),
    "up_down": lambda u, s, ph: (0.5 + 0.28 * np.sin(3 * np.pi * s * u + ph), np.full_like(u, 0.5)),
    "zigzag": lambda u, s, ph: (0.5 + 0.22 * _tri(2 * s * u), 0.15 + 0.7 * u),
    "shake": lambda u, s, ph: (np.full_like(u, 0.5), 0.5 + 0.07 * np.sin(2 * np.pi * 4 * s * u + ph)),
    "bounce": lambda u, s, ph: (0.75 - 0.45 * np.abs(np.sin(2 * np.pi * s * u)), 0.15 + 0.7 * u),
    "figure_eight": lambda u, s, ph: (
        0.5 + 0.18 * np.sin(4 * np.pi * s * u + 2 * ph),
        0.5 + 0.28 * np.sin(2 * np.pi * s * u + ph),
    ),
}

# Shape membership on offsets (dy, dx) in units of the object radius, each (n, H, W) -> bool.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda dy, dx: dy**2 + dx**2 <= 1,
    "ring": lambda dy, dx: (dy**2 + dx**2 <= 1) & (dy**2 + dx**2 >= 0.3),
    "square": lambda dy, dx: np.maximum(np.abs(dy), np.abs(dx)) <= 0.8,
    "triangle": lambda dy, dx: (dy >= -1) & (dy <= 0.7) & (np.abs(dx) <= (dy + 1) * 0.6),
    "diamond": lambda dy, dx: np.abs(dy) + np.abs(dx) <= 1.05,
    "bar": lambda dy, dx: (np.abs(dx) <= 1.1) & (np.abs(dy) <= 0.38),
    "cross": lambda dy, dx: ((np.abs(dx) <= 1) & (np.abs(dy) <= 0.33)) | ((np.abs(dy) <= 1) & (np.abs(dx) <= 0.33)),
}

_RADIUS = 0.12  # object radius as a fraction of the shorter frame side
_DISTRACTOR_SIZE = 0.5  # distractor radius / the acting object's radius
_DISTRACTOR_GAP = 1.4  # distance of the distractor's centre from the object's, in object radii (beside, not on it)
_IDLE_SIZE = 0.8  # idle marker radius / the object radius
_IDLE_PLACE = 0.14  # the idle marker's centre: this far (frame fraction) from the two edges of its corner


def render_layers(spec: VideoSpec, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of one planned video and where its objects are: frames uint8 `(T, H, W, 3)`, the acting
    object's mask bool `(T, H, W)` and the visible pixels of the non-causal objects bool `(T, H, W)` (the
    distractor and the idle marker; all False in a world without them).

    The distractor is drawn first, beside the acting object (at `spec.distractor_angle`, moving with it), and
    the acting object over it, so the causal pixels are the same with or without the distractor. The idle
    marker stands still in its corner in the frames no action covers.
    """
    T, H, W = spec.num_frames, cfg.height, cfg.width
    frames = _to_uint8(_background(SCENE[spec.scene], spec.lighting, cfg, T))  # (T, H, W, 3)
    mask = np.zeros((T, H, W), dtype=bool)
    spurious = np.zeros((T, H, W), dtype=bool)
    py = np.arange(H, dtype=np.float32)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    px = np.arange(W, dtype=np.float32)[None, None, :] + 0.5  # (1, 1, W)
    for seg in spec.segments:
        action = ATOMIC[seg.label]
        n = seg.end - seg.start
        u = (np.arange(n, dtype=np.float32) + 0.5) / n  # (n,) normalised time within the segment
        cy, cx = _MOTIONS[action.motion](u, seg.speed, seg.phase)  # (n,), (n,) frame fractions
        radius = _RADIUS * min(H, W) * seg.scale  # pixels
        my, mx = radius / H, radius / W  # keep the whole object inside the frame
        cy = np.clip(cy + seg.offset[0], my, 1 - my) * H  # (n,) pixels
        cx = np.clip(cx + seg.offset[1], mx, 1 - mx) * W
        if spec.distractor is not None:
            d = DISTRACTOR[spec.distractor]
            r = _DISTRACTOR_SIZE * radius  # pixels
            gap = _DISTRACTOR_GAP * radius
            ty = np.clip(cy + gap * math.sin(spec.distractor_angle), r, H - r)  # (n,) pixels, inside the frame
            tx = np.clip(cx + gap * math.cos(spec.distractor_angle), r, W - r)
            beside = _SHAPES[d.shape]((py - ty[:, None, None]) / r, (px - tx[:, None, None]) / r)  # (n, H, W)
            spurious[seg.start : seg.end] = beside
            frames[seg.start : seg.end][beside] = DISTRACTOR_COLOURS[d.colour]
        dy = (py - cy[:, None, None]) / radius  # (n, H, 1)
        dx = (px - cx[:, None, None]) / radius  # (n, 1, W)
        inside = _SHAPES[action.shape](dy, dx)  # (n, H, W)
        mask[seg.start : seg.end] = inside
        frames[seg.start : seg.end][inside] = COLOURS[action.colour]
    if spec.idle_marker is not None:
        marker = IDLE_MARKER[spec.idle_marker]
        idle = np.ones(T, dtype=bool)  # (T,) the frames no action covers
        for seg in spec.segments:
            idle[seg.start : seg.end] = False
        r = _IDLE_SIZE * _RADIUS * min(H, W)  # pixels
        cy = (_IDLE_PLACE if spec.idle_corner < 2 else 1 - _IDLE_PLACE) * H
        cx = (_IDLE_PLACE if spec.idle_corner % 2 == 0 else 1 - _IDLE_PLACE) * W
        shown = idle[:, None, None] & _SHAPES[marker.shape]((py - cy) / r, (px - cx) / r)  # (T, H, W)
        spurious |= shown
        frames[shown] = IDLE_COLOURS[marker.colour]
    return frames, mask, spurious & ~mask


def render_video(spec: VideoSpec, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of one planned video.

    Returns frames uint8 `(T, H, W, 3)` and the foreground mask bool `(T, H, W)` (True where the
    moving object is). Outside the mask the frames equal `render_scene_only(spec.scene, cfg, T, spec.seed)`,
    except at the distractor's pixels when the world has one (`render_layers`).
    """
    frames, mask, _ = render_layers(spec, cfg)
    return frames, mask


def render_scene_only(scene: str, cfg: SyntheticConfig, num_frames: int, seed: int) -> np.ndarray:
    """Frames uint8 `(T, H, W, 3)` of `scene` with no action, lit as the video with this seed."""
    if scene not in SCENE:
        raise ValueError(f"unknown scene {scene!r}; choose from {list(SCENE)}")
    return _to_uint8(_background(SCENE[scene], draw_lighting(seed), cfg, num_frames))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _check_codec(codec: str) -> None:
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        raise ValueError(f"codec {codec!r} cannot encode in this PyAV build; set synthetic.codec to mpeg4") from None


def write_video(path: str | Path, frames: np.ndarray, fps: int, codec: str = "mpeg4", quality: int = 4) -> int:
    """Encode frames uint8 `(T, H, W, 3)` to an mp4 at `path` atomically; returns the file size in bytes.

    The file is written under a temporary name and renamed, so a killed run never leaves a half file
    under the final name. `quality` is mpeg4's fixed quantiser (1 best .. 31); x264 gets crf = 3q + 6.
    """
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected frames uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"{path}: frames are {height}x{width} pixels but mp4 (yuv420p) needs even sizes; "
            "set synthetic.height and synthetic.width to even numbers"
        )
    _check_codec(codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.thread_count = 1  # one thread: byte-identical output for a seed
            if codec == "mpeg4":
                # A pinned quantiser; PyAV never sets frame quality, so ffmpeg's qscale flag has no effect.
                stream.options = {"qmin": str(quality), "qmax": str(quality)}
            else:
                stream.options = {"crf": str(min(51, 3 * quality + 6))}
            for image in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def hashed_config(cfg: SyntheticConfig) -> dict[str, Any]:
    """The world's config as every hash of it reads it (this dataset's, the tiny VLM's pretraining): splits and
    options added later are left out while they are empty or off, so a world that does not use them keeps the
    hashes, and so the videos, checkpoints and caches, it had before they existed."""
    config = to_dict(cfg)
    for split in SPLITS[SPLITS.index(UNCONFOUNDED) :]:  # splits added later, empty: the same videos, the same hash
        if not config["videos"][split]:
            del config["videos"][split]
    if not config["distractor"]:  # added later, off: the same videos
        del config["distractor"], config["distractor_rho"]
    if not config["idle_marker"]:
        del config["idle_marker"], config["idle_rho"]
    return config


def config_hash(cfg: SyntheticConfig) -> str:
    """Hash of the config and the generator version: equal hashes mean byte-identical datasets."""
    blob = json.dumps({"generator": GENERATOR_VERSION, "config": hashed_config(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _video_path(spec: VideoSpec) -> str:
    return f"videos/{spec.split}/{spec.id}.mp4"


def manifest_row(spec: VideoSpec, cfg: SyntheticConfig) -> dict[str, Any]:
    """One manifest.jsonl record (the format `extract.datasets.read_manifest` reads)."""
    return {
        "id": spec.id,
        "path": _video_path(spec),
        "split": spec.split,
        "labels": {"activity": spec.activity, "atomic": spec.atomic},
        "region": None,
        "fps": cfg.fps,
        "num_frames": spec.num_frames,
        "duration_s": round(spec.num_frames / cfg.fps, 4),
        "width": cfg.width,
        "height": cfg.height,
        "segments": spec.annotations(cfg.fps),
        "scene": spec.scene,
        "usual_scene": spec.usual_scene,
        "cooccur": spec.cooccur,
        "seed": spec.seed,
        # only in a world with the distractor: the demo world's manifest stays byte-identical
        **({"distractor": spec.distractor, "usual_distractor": spec.usual_distractor} if cfg.distractor else {}),
        **({"idle_marker": spec.idle_marker, "usual_idle_marker": spec.usual_idle_marker} if cfg.idle_marker else {}),
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_world(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _clear_videos(root: Path) -> None:
    """Delete the videos (and temporary files) a previous config wrote; never anything else."""
    for split in SPLITS:
        folder = root / "videos" / split
        if folder.is_dir():
            for f in folder.iterdir():
                if _VIDEO_NAME.match(f.name) or (f.name.startswith(".") and f.name.endswith(".tmp")):
                    f.unlink()


def _render_and_write(job: tuple[VideoSpec, SyntheticConfig, str]) -> int:
    spec, cfg, path = job
    frames, _ = render_video(spec, cfg)
    return write_video(path, frames, cfg.fps, cfg.codec, cfg.quality)


def _pool_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> Iterable[Any]:
    """Ordered results of fn over jobs, in a Pool of at most `workers` processes (inline for 1)."""
    workers = max(1, min(workers, len(jobs), os.cpu_count() or 1))
    if workers == 1:
        yield from map(fn, jobs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers))))


def write_dataset(
    cfg: SyntheticConfig,
    root: str | Path,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 2,
) -> dict[str, Any]:
    """Render and write the benchmark to `root` (videos, manifest.jsonl, classes.json, world.json).

    `splits` defaults to every split with videos. Idempotent: with the config hash in world.json
    unchanged, videos already on disk are kept (a killed run resumes); a changed config deletes the old
    videos and renders again. Returns {root, hash, videos: {split: n}, rendered, skipped, seconds, bytes}.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    root = Path(root)
    if cfg.height % 2 or cfg.width % 2:
        raise ValueError(
            f"synthetic.height x width = {cfg.height}x{cfg.width}: mp4 needs even sizes; set both to even numbers"
        )
    if cfg.videos.test_ood_distractor and not cfg.distractor:
        raise ValueError(
            f"synthetic.videos.test_ood_distractor = {cfg.videos.test_ood_distractor} breaks the distractor, but the "
            "world has none; set synthetic.distractor: true, or test_ood_distractor: 0"
        )
    if cfg.videos.test_ood_idle and not cfg.idle_marker:
        raise ValueError(
            f"synthetic.videos.test_ood_idle = {cfg.videos.test_ood_idle} breaks the idle marker, but the world has "
            "none; set synthetic.idle_marker: true, or test_ood_idle: 0"
        )
    _check_codec(cfg.codec)
    requested = [s for s in SPLITS if _split_sizes(cfg, s) > 0] if splits is None else list(splits)
    for s in requested:
        _split_sizes(cfg, s)  # unknown names fail here, before anything is touched
    root.mkdir(parents=True, exist_ok=True)
    world_file = root / "world.json"
    digest = config_hash(cfg)
    old = _read_world(world_file)
    same = old.get("config_hash") == digest
    done = old.get("splits", []) if same else []
    if not same:
        # Old videos go before the new hash is written: any video on disk under this hash is then ours.
        (root / "manifest.jsonl").unlink(missing_ok=True)
        _clear_videos(root)
    splits_out = [s for s in SPLITS if s in set(done) | set(requested)]
    world = {
        "generator_version": GENERATOR_VERSION,
        "config_hash": digest,
        "config": to_dict(cfg),
        "splits": done,
        "complete": False,
        "world": world_definition(),
    }
    _write_text(world_file, json.dumps(world, indent=1) + "\n")

    specs = [spec for s in splits_out for spec in plan_split(cfg, s)]
    jobs = [(spec, cfg, str(root / _video_path(spec))) for spec in specs if not (root / _video_path(spec)).exists()]
    skipped = len(specs) - len(jobs)
    with tqdm(total=len(jobs), desc="synthetic videos", unit="video", disable=not progress) as bar:
        for _ in _pool_map(_render_and_write, jobs, workers):
            bar.update(1)

    rows = [json.dumps(manifest_row(spec, cfg)) for spec in specs]
    _write_text(root / "classes.json", json.dumps(classes(), indent=1) + "\n")
    _write_text(root / "manifest.jsonl", "".join(r + "\n" for r in rows))
    _write_text(world_file, json.dumps({**world, "splits": splits_out, "complete": True}, indent=1) + "\n")
    counts = {s: sum(spec.split == s for spec in specs) for s in splits_out}
    return {
        "root": str(root),
        "hash": digest,
        "videos": counts,
        "rendered": len(jobs),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": sum((root / _video_path(spec)).stat().st_size for spec in specs),
    }


# ---------------------------------------------------------------------------------------------
# Probing the confounders
# ---------------------------------------------------------------------------------------------


def mean_frame(frames: np.ndarray, size: int = 8) -> np.ndarray:
    """The simplest video feature: frames uint8 `(T, H, W, 3)` -> time-averaged, `size`x`size`
    average-pooled image, float32 `(size * size * 3,)` in [0, 1]."""
    _, H, W, _ = frames.shape
    bh, bw = H // size, W // size
    mean = frames[:, : bh * size, : bw * size].mean(axis=0, dtype=np.float32) / 255  # (H', W', 3)
    pooled = mean.reshape(size, bh, size, bw, 3).mean(axis=(1, 3))  # (size, size, 3)
    return pooled.reshape(-1)


def _probe_features(job: tuple[VideoSpec, SyntheticConfig, int]) -> np.ndarray:
    """(3, F): mean-frame features of the full video, its background only, its foreground only."""
    spec, cfg, size = job
    frames, mask = render_video(spec, cfg)  # (T, H, W, 3), (T, H, W)
    scene = render_scene_only(spec.scene, cfg, spec.num_frames, spec.seed)
    background = frames.copy()  # (T, H, W, 3), object pixels replaced by the empty scene
    background[mask] = scene[mask]
    foreground = np.full_like(frames, 128)  # (T, H, W, 3), scene replaced by constant grey
    foreground[mask] = frames[mask]
    return np.stack([mean_frame(v, size) for v in (frames, background, foreground)])


def probe_features(specs: Sequence[VideoSpec], cfg: SyntheticConfig, size: int = 8, workers: int = 1) -> np.ndarray:
    """Render `specs` in memory; float32 `(3, N, size * size * 3)` mean frames: full, background, foreground."""
    jobs = [(spec, cfg, size) for spec in specs]
    return np.stack(list(_pool_map(_probe_features, jobs, workers)), axis=1)


def probe_confounders(cfg: SyntheticConfig, size: int = 8, workers: int = 1) -> dict[str, float]:
    """Show the confounder is real: logistic regressions on mean frames, trained on train, tested on
    test_iid and test_ood, for full / background-only / foreground-only frames, and full frames of the
    same world with rho at chance (1/8). Returns accuracies keyed acc_iid, acc_ood, unconf_iid, ..."""
    from dataclasses import replace

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if min(cfg.videos.train, cfg.videos.test_iid, cfg.videos.test_ood) < len(ACTIVITIES):
        raise ValueError(
            f"probe_confounders needs at least {len(ACTIVITIES)} videos in each of train, test_iid and test_ood "
            f"(synthetic.videos is {cfg.videos}); raise them"
        )
    chance = replace(cfg, rho=1 / len(SCENES))
    sets = {
        "train": plan_split(cfg, "train"),
        "iid": plan_split(cfg, "test_iid"),
        "ood": plan_split(cfg, "test_ood"),
        "chance_train": plan_split(chance, "train"),
        "chance_iid": plan_split(chance, "test_iid"),
    }
    feats = {k: probe_features(v, chance if k.startswith("chance") else cfg, size, workers) for k, v in sets.items()}
    labels = {k: np.array([_ACTIVITY_INDEX[s.activity] for s in v]) for k, v in sets.items()}

    def accuracy(train: str, view: int, test: str) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(feats[train][view], labels[train])
        return float(model.score(feats[test][view], labels[test]))

    out = {
        "acc_iid": accuracy("train", 0, "iid"),
        "acc_ood": accuracy("train", 0, "ood"),
        "unconf_iid": accuracy("chance_train", 0, "chance_iid"),
        "unconf_ood": accuracy("chance_train", 0, "ood"),
        "bg_iid": accuracy("train", 1, "iid"),
        "bg_ood": accuracy("train", 1, "ood"),
        "fg_iid": accuracy("train", 2, "iid"),
        "fg_ood": accuracy("train", 2, "ood"),
    }
    out["gap"] = out["acc_iid"] - out["acc_ood"]
    out["unconf_gap"] = out["unconf_iid"] - out["unconf_ood"]
    return out
