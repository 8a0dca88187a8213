"""Stage 1's configuration sections: one frozen dataclass per `pipeline.yaml` section, registered with the
contract's loader (extract/contract/config.py), which checks every key with its full path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from extract.contract.config import Config, bounds, register_section, register_validator

_range = bounds


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
    return errors


register_section("dataset", DatasetConfig, order=10, stage="extract")
register_section("synthetic", SyntheticConfig, order=20, stage="extract")
register_section("frames", FramesConfig, order=30, stage="extract")
register_section("encoders", EncodersConfig, order=40, stage="extract")
register_section("saliency", SaliencyConfig, order=50, stage="extract")
# (60: `cache`, the contract's)
register_section("dictionaries", dict[str, DictionarySpec], order=70, stage="extract", default=_default_dictionaries())
register_section("vlm", VlmConfig, order=80, stage="extract")
register_section("video", VideoPretrainConfig, order=90, stage="extract")
register_validator(_cross_checks)
