"""Typed configuration: one frozen dataclass per `pipeline.yaml` section, a strict loader.

Every key is checked before any work starts: unknown keys (with a did-you-mean), wrong types,
out-of-range numbers and values outside a fixed set fail with the full key path. `--set a.b=c`
overrides go through the same checks. Both stages read this module; it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem a user fixes by editing the YAML or a `--set` override."""


def _range(lo: float | None = None, hi: float | None = None, *, doc: str = "") -> dict:
    return {"range": (lo, hi), "doc": doc}


bounds = _range  # field(metadata=bounds(0, 1)): accepted range of a number, for sections typed elsewhere


def predating(value: Any) -> dict:
    """field(default=new, metadata=predating(old)): an option added with a default that changes what runs compute;
    a saved run from before the option existed was computed as `old`, and is read back as that
    (train.ablate's reuse check), not as today's default."""
    return {"predates": value}


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "synthetic"  # a registered dataset adapter (`ltar config show` lists them)
    root: str = "data/synthetic"  # where the dataset lives; `ltar synth` writes here
    # split scheme where a benchmark has several (Breakfast: s1..s4, person, or a file listing the test
    # videos); null = the dataset's standard split (Breakfast: person, the Timeception/CMDCL split)
    split: str | None = None
    include_sil: bool = True  # Breakfast: count the background unit action SIL (48 classes, as Timeception)
    stereo_channel: int = field(default=0, metadata=_range(0, 1))  # Breakfast: which stereo camera channel
    # frame rate of frame-numbered annotations (Breakfast) when it cannot be read from the video
    fps: float = field(default=15.0, metadata=_range(1.0, 1000.0))
    # manifest datasets: split names besides train, val, test, pretrain and train_* / test_* (test_iid, test_ood_scene,
    # train_oracle, ...); a manifest line with any other split is refused, so a typo never becomes a new split
    extra_splits: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitSizes:
    train: int = field(default=192, metadata=_range(0))  # videos in the training split
    test_iid: int = field(default=64, metadata=_range(0))  # same scene/co-occurrence bias as train
    test_ood: int = field(default=64, metadata=_range(0))  # scene and co-occurrence drawn independently
    pretrain: int = field(default=0, metadata=_range(0))  # separate split for VLM pretraining (own seed)
    # an unconfounded training split (scene and co-occurrence independent of the activity, rho = 1/#scenes):
    # the training data of the `oracle` bound row (`make benchmark`); 0 = none
    train_oracle: int = field(default=0, metadata=_range(0))
    # one ood split per confounder (the `confounders` table): each breaks only its own, the others as in test_iid
    test_ood_scene: int = field(default=0, metadata=_range(0))  # the scene drawn independently of the activity
    test_ood_cooccur: int = field(default=0, metadata=_range(0))  # add_salt_pepper at the mean rate for all
    test_ood_distractor: int = field(default=0, metadata=_range(0))  # the distractor drawn independently
    test_ood_idle: int = field(default=0, metadata=_range(0))  # the idle-frame marker drawn independently


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0  # one seed decides every video of train/test_iid/test_ood
    pretrain_seed: int = 1000  # the pretraining split has its own seed, never overlapping the others
    videos: SplitSizes = SplitSizes()  # videos per split
    rho: float = field(default=0.85, metadata=_range(0.0, 1.0))  # P(scene = activity's usual scene) in train/iid
    # test_ood: scene independent of, or never equal to, the usual one
    ood_scene: Literal["independent", "anti"] = "independent"
    # P(co-occurring action) for activities that favour it
    cooccur_high: float = field(default=0.8, metadata=_range(0.0, 1.0))
    cooccur_low: float = field(default=0.1, metadata=_range(0.0, 1.0))  # ... and for the others (train/iid)
    # a non-causal object drawn beside the acting object in every action (so inside the salient region), tied to
    # the activity as the scene is (PCMCI's co-occurrence hallucination); false = no distractor (the demo's world)
    distractor: bool = False
    # P(distractor = the activity's usual one) in train/test_iid/pretrain; drawn uniformly where it is broken
    distractor_rho: float = field(default=0.85, metadata=_range(0.0, 1.0))
    # a static object shown only in the idle frames between actions (none while an action plays), tied to the
    # activity: a shortcut that lives in separable environment frames (IGV's premise); false = none
    idle_marker: bool = False
    idle_rho: float = field(default=0.85, metadata=_range(0.0, 1.0))  # P(marker = the activity's usual one)
    height: int = field(default=96, metadata=_range(32, 1024))  # rendered frame size in pixels
    width: int = field(default=96, metadata=_range(32, 1024))
    fps: int = field(default=8, metadata=_range(1, 120))  # frames per second of the written videos
    min_seconds: float = field(default=6.0, metadata=_range(1.0))  # video length is drawn in [min, max]
    max_seconds: float = field(default=10.0, metadata=_range(1.0))
    codec: Literal["mpeg4", "libx264", "h264"] = "mpeg4"  # encoder for the mp4 files (mpeg4 is in every PyAV wheel)
    quality: int = field(default=4, metadata=_range(1, 31))  # mpeg4 qscale (lower = better, larger files)


@dataclass(frozen=True)
class FramesConfig:
    num_frames: int = field(default=16, metadata=_range(1, 4096))  # L: frames sampled per video
    sampling: Literal["uniform", "region"] = "uniform"  # uniform over the video, or over the annotated region
    min_frames: int = field(default=2, metadata=_range(1))  # a video with fewer decodable frames is a recorded failure
    # decoding processes overlapping the encoders: auto = the cores less one, as many as shared memory holds; 0 = inline
    decode_workers: int | Literal["auto"] = field(default="auto", metadata=_range(0, 64))
    # frames are converted to RGB at their native size and handed to the encoders, which resize and crop them as
    # their own code does; a video whose short side exceeds this (and every encoder's input side) is first resized
    # to it in RGB, to bound memory. null = always native (exact official preprocessing at any resolution)
    max_short_side: int | None = field(default=480, metadata=_range(16))
    # ignore = the coded pixel grid, as the official loaders read it (open_clip on a decoded image, TimeSformer's
    # PyAV loader); apply = stretch anamorphic video (sample aspect ratio != 1) to its display aspect first
    pixel_aspect: Literal["ignore", "apply"] = "ignore"


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-16"  # open_clip architecture name (`tiny` preset: our small ViT of the same layout)
    # open_clip pretrained tag, e.g. laion2b_s34b_b88k or openai (needs the weights locally); with `weights`, the tag
    # that file comes from, which gives it its preprocessing and activation (openai: QuickGELU)
    pretrained: str | None = None
    # local checkpoint (.pt / .bin / .safetensors); an open_clip JSON config beside it names the architecture
    weights: str | None = None
    # random-weight architecture used when no weights are given or reachable (loudly logged)
    preset: Literal["tiny", "base"] = "tiny"
    prompts: tuple[str, ...] = ("a video of {}.", "a person {}.", "{}")  # text templates, averaged per class


@dataclass(frozen=True)
class TimesformerConfig:
    # official facebookresearch/TimeSformer .pyth checkpoint or a Hugging Face TimesformerModel folder
    weights: str | None = None
    # random-weight architecture when no weights are given (base = ViT-B/16, divided ST)
    preset: Literal["tiny", "base"] = "tiny"
    # clips = one clip per sampled frame, in the checkpoint's own setting (clip_frames frames, sampling_rate frames
    # apart at target_fps, as the official test samples), centred on the frame: V_l is that frame's patch mean and
    # v_cls the clips' CLS averaged; spread = the L frames themselves as one clip (time embeddings resampled to L)
    sampling: Literal["clips", "spread"] = "clips"
    # the official cfg's DATA.NUM_FRAMES / DATA.SAMPLING_RATE / DATA.TARGET_FPS; null = read from the checkpoint's
    # cfg, else the K400 release's 8 frames, 32 apart at 30 fps (clip_frames: the checkpoint's time embeddings)
    clip_frames: int | None = field(default=None, metadata=_range(1, 256))
    sampling_rate: int | None = field(default=None, metadata=_range(1))
    target_fps: float | None = field(default=None, metadata=_range(0.1))


@dataclass(frozen=True)
class EncodersConfig:
    clip: ClipConfig = ClipConfig()
    timesformer: TimesformerConfig = TimesformerConfig()
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"  # autocast dtype on GPU (CPU always runs fp32)
    device: str = "auto"  # auto = cuda when available, else cpu; or an explicit torch device such as cuda:1
    # sampled frames per encoder call, across videos; a video with more (dense sampling) is encoded in pieces of it
    batch_frames: int = field(default=256, metadata=_range(1))
    # torch.compile the encoders' forward passes at fixed batch shapes (padded chunks); the numbers may differ from
    # eager in the last bits, so a compiled store is another store (fingerprint). CLIP calls with attention hooks
    # (saliency clip-attention / clip-surgery) run eager
    compile: bool = False


@dataclass(frozen=True)
class SaliencyConfig:
    # where the foreground comes from: motion (frame difference around each frame) | clip-attention | clip-surgery |
    # spectral-residual; motion by the ground-truth measurement (bench/saliency.py), see README
    method: Literal["motion", "clip-attention", "clip-surgery", "spectral-residual"] = "motion"
    # stored map is (map_size, map_size) uint8; null = CLIP's patch grid
    map_size: int | None = field(default=None, metadata=_range(2, 256))
    # the foreground box holds this share of the salient mass
    mass: float = field(default=0.6, metadata=_range(0.05, 1.0))
    # what replaces the salient region in the background frame
    background_fill: Literal["mean", "blur", "zero"] = "mean"
    # how the foreground box (cut from the native frame) fits CLIP's square input: pad = whole box, aspect kept,
    # letterboxed in black (ECRL's S_i is the salient content: none of it dropped or stretched) | squash | center
    crop: Literal["pad", "squash", "center"] = "pad"


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache"  # stores land in <root>/<dataset>/<fingerprint>.zarr
    # videos per shard file of a NEW store (fixed once created: it decides the encoder groups, so a resumed run
    # or a cluster worker reads it back from the store); not in the fingerprint. Smaller = more, finer cluster tasks
    shard_videos: int = field(default=64, metadata=_range(1, 65536))


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary `ltar dictionaries` writes into the store as `dictionaries/<name>/` (see
    extract/dictionaries.py); the keys a variant does not use are recorded as such in its attrs."""

    # cache array the points come from: clip/bg (confounder Z), clip/frame or timesformer/frame (global G)
    source: Literal["clip/bg", "clip/fg", "clip/frame", "timesformer/frame"] = "clip/bg"
    size: int = field(default=256, metadata=_range(1))  # K: number of entries (average: ignored, K = classes)
    # kmeans (FAISS) | random (K sampled points of the source) | noise (K random vectors, no data: ECRL Table 5's
    # "random features") | average (class-average features, prior = class frequency)
    variant: Literal["kmeans", "random", "noise", "average"] = "kmeans"
    task: str = "activity"  # the label task whose classes `average` averages over
    split: str = "train"  # only this split's rows are used
    # kmeans: cluster in this many PCA dims (FAISS PCAMatrix); each entry is then its cluster's mean in the source space
    pca: int | None = field(default=None, metadata=_range(1))
    spherical: bool = True  # L2-normalise the entries (the features are L2-normalised)
    niter: int = field(default=20, metadata=_range(1))  # k-means iterations
    nredo: int = field(default=1, metadata=_range(1))  # k-means restarts, best objective kept
    init: Literal["random", "kmeans++"] = "random"  # k-means seeding: K random points (FAISS default) or k-means++
    max_points: int | None = field(default=100_000, metadata=_range(1))  # kmeans: seeded subsample; null = all
    seed: int = 0  # seeds the subsample, the k-means init and the `random` / `noise` draws


def _default_dictionaries() -> dict[str, DictionarySpec]:
    return {
        "confounder": DictionarySpec(source="clip/bg", size=256),
        "global": DictionarySpec(source="clip/frame", size=512),
    }


@dataclass(frozen=True)
class VlmConfig:
    steps: int = field(default=600, metadata=_range(1))  # contrastive training steps
    batch_size: int = field(default=128, metadata=_range(2))  # frame-caption pairs per step
    lr: float = field(default=5e-4, metadata=_range(0.0))  # AdamW peak learning rate (5% warm-up, cosine decay)
    # frames drawn from each pretraining video (rendered once, kept in memory; 80% inside action segments)
    frames_per_video: int = field(default=8, metadata=_range(1))
    action_mention: float = field(default=0.6, metadata=_range(0.0, 1.0))  # P(caption names the visible action)
    scene_mention: float = field(default=0.3, metadata=_range(0.0, 1.0))  # P(caption names the scene)
    seed: int = 0
    out: str = "cache/vlm"  # checkpoints land in <out>/<fingerprint>/


@dataclass(frozen=True)
class VideoPretrainConfig:
    """`ltar pretrain-video`: the tiny TimeSformer trained to name the atomic action of short clips (the
    Kinetics stand-in), on clips rendered from the pretraining world (`synthetic.pretrain_seed`)."""

    clips: int = field(default=1536, metadata=_range(16))  # clips rendered once and kept in memory
    clip_frames: int = field(default=8, metadata=_range(2, 64))  # frames per clip (= the tiny preset's T0)
    # P(scene = the action's usual scene); 1/8 = no tie. Mild by default: web video has its own scene bias
    scene_tie: float = field(default=0.3, metadata=_range(0.0, 1.0))
    steps: int = field(default=300, metadata=_range(1))  # AdamW steps
    batch_size: int = field(default=64, metadata=_range(2))  # clips per step
    lr: float = field(default=2e-3, metadata=_range(0.0))  # AdamW peak learning rate (5% warm-up, cosine decay)
    frame_weight: float = field(default=1.0, metadata=_range(0.0))  # weight of the per-frame action loss on V
    seed: int = 0
    out: str = "cache/video"  # checkpoints land in <out>/<fingerprint>/


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds torch, numpy and the data order
    epochs: int = field(default=30, metadata=_range(1))  # passes over the training split
    lr: float = field(default=1e-3, metadata=_range(0.0))  # AdamW peak learning rate (cosine decay after warm-up)
    batch_size: int = field(default=32, metadata=_range(1))  # videos per step
    weight_decay: float = field(default=0.05, metadata=_range(0.0))  # AdamW decoupled weight decay
    warmup_epochs: float = field(default=2.0, metadata=_range(0.0))  # linear warm-up before the cosine
    grad_clip: float = field(default=1.0, metadata=_range(0.0))  # max gradient norm; 0 = no clipping
    task: str = "activity"  # label task: activity (single label, CE) or atomic (multi-label, BCE)
    # L' frames the heads see, uniformly subsampled from the cache's L slots (null = all L; the cache is unchanged)
    num_frames: int | None = field(default=None, metadata=_range(1))
    optimizer: Literal["adamw", "adam"] = "adamw"  # AdamW (decoupled weight decay) | Adam (L2 weight decay)
    schedule: Literal["cosine", "step"] = "cosine"  # after warm-up: cosine decay to 0 | × step_gamma every step_epochs
    step_epochs: int = field(default=4, metadata=_range(1))  # schedule step: the decay interval in epochs
    step_gamma: float = field(default=0.1, metadata=_range(0.0, 1.0))  # schedule step: the decay factor
    # a named paper recipe (`recipes.<name>`): its train keys and head options replace the file's; null = ours
    recipe: str | None = None
    train_split: str = "train"  # the split the head trains on (`train_oracle` for the oracle bound row)
    head: str = "baseline"  # registered head (`ltar config show` lists them)
    variant: str | None = None  # a named variant of the head (heads.<head>.variants), null = the full head
    grounding: str | None = None  # a named grounding intervention around the head (grounding.<name>), null = none
    device: str = "auto"  # auto = cuda when available, else cpu
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    # the autocast dtype of `amp`: bfloat16 (fp32's exponent range, no loss scaling: a row's seeds can stack) |
    # float16 (a GradScaler; stacked seeds are refused, one scaler would couple them). A run from before this key
    # that kept a GradScaler's state trained in float16 (train.engine.saved_train)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # split that picks best.pt by its primary metric; null = best is the last epoch (never select on test)
    select_split: str | None = None
    eval_splits: tuple[str, ...] = ()  # splits evaluated after training; empty = every split except train
    eval_every: int = field(default=1, metadata=_range(1))  # evaluate every N epochs (and always after the last)
    memory_budget_mb: int = field(default=4096, metadata=_range(1))  # larger splits stream chunk-wise from Zarr
    # `ltar ablate`: true = the seeds of a row train as one stacked model (train/stacked.py); false = one at a time
    stack_seeds: bool = False
    # `ltar ablate`: processes that train runs side by side, each with cores // workers threads (train.ablate);
    # 1 = one run at a time in this process, today's path
    workers: int = field(default=1, metadata=_range(1, 64))
    # `ltar ablate`: the runs as dask tasks, one per worker at a time: local:N (a LocalCluster of N worker processes,
    # cores // N threads each) or a running scheduler's address, tcp://host:port (one worker per GPU); set, it
    # replaces `workers`. null = no dask (extract/scale.py connects)
    scheduler: str | None = None
    # runs land in <runs_root>/<head>[-<variant>][+<grounding>][-f<L>][-<train_split>][@<recipe>]-<task>-s<seed>/
    runs_root: str = "runs"


@dataclass(frozen=True)
class Recipe:
    """A paper's training recipe (`train.recipe`): the `train` keys and head options it sets over the file's."""

    source: str = ""  # where the paper states it, and what it leaves unstated (kept from `train`)
    train: dict[str, Any] = field(default_factory=dict)  # keys of `train` (not recipe, head, variant, task, seed)
    heads: dict[str, Any] = field(default_factory=dict)  # head name -> {option: value}


RECIPE_FORBIDDEN = ("recipe", "head", "variant", "grounding", "task", "seed", "runs_root", "device", "train_split")


@dataclass(frozen=True)
class AblationTable:
    rows: tuple[str, ...] = ()  # `head`, `head:variant`, optionally `+grounding` (`ecrl+igv`), one row each
    tasks: tuple[str, ...] = ("activity",)  # each row is trained and evaluated on every task listed
    seeds: int = field(default=3, metadata=_range(1))  # each cell rests on this many seeds (`--seeds` overrides)
    caption: str = ""  # written above the table
    # the row every paired difference is taken against (null = the first row); `previous`: each row against the row
    # above it (a chain whose rows change one thing at a time)
    reference: str | None = None
    # single-label tasks: also report the confusion of the same-set activity pairs (they differ only in the
    # order of their actions; the synthetic world's world.json names them), lower is better
    order_confusion: bool = False
    # rows with a grounding indicator (IGV / EIGV): also `ltar ground-check` on seed 0's run (train split), their
    # training objective under fixed masks, written as <table>-ground-check.md / .csv
    ground_check: bool = False


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = DatasetConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    frames: FramesConfig = FramesConfig()
    encoders: EncodersConfig = EncodersConfig()
    saliency: SaliencyConfig = SaliencyConfig()
    cache: CacheConfig = CacheConfig()
    dictionaries: dict[str, DictionarySpec] = field(default_factory=_default_dictionaries)
    vlm: VlmConfig = VlmConfig()
    video: VideoPretrainConfig = VideoPretrainConfig()
    train: TrainConfig = TrainConfig()
    # head name -> its options and `variants`; checked against the head's own typed config (train.heads)
    heads: dict[str, Any] = field(default_factory=dict)
    # name -> grounding options (IGV / EIGV / STR rationales around any head); checked by train.grounding
    grounding: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, AblationTable] = field(default_factory=dict)  # named tables for `ltar ablate`
    recipes: dict[str, Recipe] = field(default_factory=dict)  # the papers' training recipes, by name


# Cross-field checks that a single field's type or range cannot express; each returns a message.
def _cross_checks(cfg: Config) -> list[str]:
    errors = []
    s = cfg.synthetic
    if s.min_seconds > s.max_seconds:
        errors.append(
            f"synthetic.min_seconds ({s.min_seconds}) is larger than synthetic.max_seconds ({s.max_seconds}); "
            "make min_seconds <= max_seconds"
        )
    if s.pretrain_seed == s.seed:
        errors.append("synthetic.pretrain_seed must differ from synthetic.seed so pretraining never sees test videos")
    for name, recipe in cfg.recipes.items():
        bad = sorted(set(recipe.train) & set(RECIPE_FORBIDDEN))
        if bad:
            errors.append(f"recipes.{name}.train: a recipe sets how a run trains, not which run it is; drop {bad}")
        try:
            build_section(TrainConfig, {k: v for k, v in recipe.train.items() if k not in bad}, f"recipes.{name}.train")
        except ConfigError as e:
            errors.append(str(e))
    for name, table in cfg.ablations.items():
        if table.reference not in (None, "previous") and table.reference not in table.rows:
            errors.append(
                f"ablations.{name}.reference: {table.reference!r} is not one of the table's rows {list(table.rows)} "
                "(or `previous`: each row against the row above it)"
            )
    if cfg.train.recipe is not None and cfg.train.recipe not in cfg.recipes:
        errors.append(
            f"train.recipe: no recipe {cfg.train.recipe!r}; pipeline.yaml defines recipes: {sorted(cfg.recipes)}"
        )
    return errors


def apply_recipe(data: dict) -> dict:
    """The raw mapping with `train.recipe`'s train keys and head options written over the file's (a copy)."""
    import copy

    name = (data.get("train") or {}).get("recipe")
    recipe = ((data.get("recipes") or {}).get(name) or {}) if name is not None else {}
    if not isinstance(recipe, dict) or not recipe:
        return data  # no recipe, or an unknown one (reported by the cross-checks with the names there are)
    data = copy.deepcopy(data)
    train = {k: v for k, v in (recipe.get("train") or {}).items() if k not in RECIPE_FORBIDDEN}
    data["train"] = {**(data.get("train") or {}), **train}
    for head, options in (recipe.get("heads") or {}).items():
        heads = data.setdefault("heads", {}) or {}
        data["heads"] = heads
        heads[head] = {**(heads.get(head) or {}), **(options or {})}
    return data


# Whole-config checks registered by packages that own part of the config (train.heads checks
# `heads`, `ablations` and `train.head` against the head registry).
_VALIDATORS: list[typing.Callable[[Config], list[str]]] = []


def register_validator(fn: typing.Callable[[Config], list[str]]) -> None:
    """`fn(cfg)` returns error messages (with full key paths); they fail the load like any other."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)


# Keys whose accepted values come from a registry rather than a fixed Literal.
_REGISTRY_KEYS: dict[str, typing.Callable[[], list[str]]] = {}


def register_choices(key_path: str, names: typing.Callable[[], list[str]]) -> None:
    """Declare that `key_path` (e.g. `dataset.name`) must be one of `names()` (a registry)."""
    _REGISTRY_KEYS[key_path] = names


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    """`; did you mean 'x'?` for a near miss (a typo, or a known key with something appended)."""
    options = [str(o) for o in options]
    close = [o for o in options if word.startswith(o) or o.startswith(word)]
    close = close or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str, meta: dict | None = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), allowed)
            raise ConfigError(f"{path}: {value!r} is not accepted{hint} Choose from {list(allowed)}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif tp is Any:
        return value
    else:  # pragma: no cover - a section declared a type the loader does not know
        raise TypeError(f"config field {path} has unsupported type {tp!r}")
    lo, hi = (meta or {}).get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{path}: {value!r} is out of range; accepted values lie in {bounds}")
    if path in _REGISTRY_KEYS:
        names = _REGISTRY_KEYS[path]()
        if value not in names:
            hint = _suggest(str(value), names)
            raise ConfigError(f"{path}: unknown name {value!r}{hint} Choose from {names}.")
    return value


def build_section(cls: type, data: Any, path: str) -> Any:
    """Validate a mapping into dataclass `cls` (for sections typed by other packages, e.g. heads)."""
    return _build(cls, data, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping (section), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = _suggest(str(key), fields)
            raise ConfigError(f"{key_path}: unknown key{hint} Accepted keys: {sorted(fields)}.")
        kwargs[key] = _convert(hints[key], value, key_path, dict(fields[key].metadata))
    # Defaults are checked too (a registry key's default must name a registered entry).
    for name, f in fields.items():
        if name not in kwargs and f"{path}.{name}".lstrip(".") in _REGISTRY_KEYS:
            _convert(hints[name], getattr(cls(), name), f"{path}.{name}".lstrip("."), dict(f.metadata))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted path such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


_SECTIONS = {f.name for f in dataclasses.fields(Config)}  # the top-level sections


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of the raw mapping with each `KEY=VALUE` override applied."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        key = ".".join(parts)
        if (isinstance(node.get(parts[-1]), dict) or key in _SECTIONS) and not isinstance(value, dict | None):
            raise ConfigError(
                f"--set {text!r}: {key} is a section (a mapping of keys), not a value; set one of its keys, "
                f"e.g. --set {key}.<key>=<value> (`ltar config show` lists them)"
            )
        node[parts[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    """Validate a raw mapping into a `Config` (raises ConfigError with the full key path)."""
    import extract.datasets  # noqa: F401  (registers the accepted values of dataset.name)

    cfg = _build(Config, apply_recipe(data), "")
    errors = _cross_checks(cfg)
    for validate in _VALIDATORS:
        errors += validate(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def load_config(path: str | Path = "pipeline.yaml", overrides: typing.Iterable[str] = ()) -> Config:
    """Read `path`, apply `--set` overrides, validate. A missing file means all defaults only if
    it is the default path; an explicitly named file must exist."""
    path, overrides = Path(path), list(overrides)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH or run from the repository root")
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; give the pipeline YAML file, e.g. --config pipeline.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} cannot be read ({e}); give a readable YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    merged = apply_overrides(raw, overrides)  # --set errors name --set, not the file
    try:
        return from_dict(merged)
    except ConfigError as e:
        where = f"{path} with --set {' --set '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def write_resolved(cfg: Config, out_dir: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config beside an output, so every result says how it was made."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_yaml(cfg))
    return out
