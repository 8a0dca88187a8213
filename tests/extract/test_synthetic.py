"""The synthetic benchmark keeps its promises: planted confounders at the declared rates, order-only
activity pairs, masks where the objects are, files that decode to the rendered frames, determinism,
idempotency, and a scene shortcut that a linear probe really takes."""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from extract import synthetic as S
from extract.config import SplitSizes, SyntheticConfig
from extract.datasets import read_manifest

TINY = SyntheticConfig(
    videos=SplitSizes(train=16, test_iid=8, test_ood=8, pretrain=8),
    height=48,
    width=48,
    fps=4,
    min_seconds=6.0,
    max_seconds=8.0,
)
# Planning is pixel-free, so rates can be checked on many videos at no cost.
MANY = replace(TINY, videos=SplitSizes(train=2000, test_iid=2000, test_ood=2000, pretrain=2000))
plan = functools.lru_cache(S.plan_split)  # configs are frozen, hence hashable


def decode(path: Path) -> np.ndarray:
    """All frames of a video file, uint8 (T, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    summary = S.write_dataset(TINY, root, progress=False, workers=2)
    return root, summary


# --- the world ----------------------------------------------------------------------------------


def test_world_has_the_promised_parts():
    assert len(S.ATOMIC_ACTIONS) == 16 and len(S.ACTIVITIES) == 8 and len(S.SCENES) == 8
    visuals = [(a.shape, a.colour, a.motion) for a in S.ATOMIC_ACTIONS]
    assert len(set(visuals)) == 16
    for i, a in enumerate(visuals):  # any two actions differ in at least two of shape, colour, motion
        for b in visuals[i + 1 :]:
            assert sum(x != y for x, y in zip(a, b, strict=True)) >= 2, (a, b)
    assert {a.motion for a in S.ATOMIC_ACTIONS} <= set(S.MOTION_TEXT)
    for act in S.ACTIVITIES:
        assert 3 <= len(act.script) <= 6 and len(set(act.script)) == len(act.script)
        assert S.COOCCUR_ACTION not in act.script  # it never decides the activity
        assert set(act.script) <= set(S.ATOMIC)
    assert sorted(a.usual_scene for a in S.ACTIVITIES) == sorted(S.SCENE)  # one usual scene each
    assert Counter(a.cooccur for a in S.ACTIVITIES) == {"high": 4, "low": 4}
    world = json.loads(json.dumps(S.world_definition()))  # plain JSON data
    assert world["cooccur_action"] == S.COOCCUR_ACTION
    assert world["atomic"][0]["description"] == "a white circle falling from top to bottom"


def test_same_set_pairs_differ_only_by_order():
    pairs = S.same_set_pairs()
    assert len(pairs) >= 2
    for a, b in pairs:
        sa, sb = S.ACTIVITY[a].script, S.ACTIVITY[b].script
        assert sorted(sa) == sorted(sb) and sa != sb
    # Their videos carry the same atomic labels (up to the co-occurring action); only order differs.
    specs = S.plan_split(TINY, "train") + S.plan_split(TINY, "test_ood")
    for a, b in pairs:
        labels = {
            name: {tuple(x for x in s.atomic if x != S.COOCCUR_ACTION) for s in specs if s.activity == name}
            for name in (a, b)
        }
        assert labels[a] == labels[b] and len(labels[a]) == 1


# --- plans --------------------------------------------------------------------------------------


def usual_rate(specs: list[S.VideoSpec]) -> float:
    return float(np.mean([s.usual_scene for s in specs]))


def test_scene_correlation_per_split():
    for split in ("train", "test_iid", "pretrain"):
        assert usual_rate(plan(MANY, split)) == pytest.approx(MANY.rho, abs=0.03)
    assert usual_rate(plan(MANY, "test_ood")) == pytest.approx(1 / 8, abs=0.03)
    assert usual_rate(plan(replace(MANY, ood_scene="anti"), "test_ood")) == 0
    assert usual_rate(plan(replace(MANY, rho=1 / 8), "train")) == pytest.approx(1 / 8, abs=0.03)
    # Off the usual scene, and in test_ood, every scene appears about equally often.
    ood = Counter(s.scene for s in plan(MANY, "test_ood"))
    assert min(ood.values()) > 0.8 * 2000 / 8
    off = Counter(s.scene for s in plan(MANY, "train") if not s.usual_scene)
    assert len(off) == 8 and min(off.values()) > 0.6 * sum(off.values()) / 8


def test_the_oracle_split_has_scene_and_activity_independent():
    from scipy.stats import chi2_contingency

    world = replace(MANY, videos=replace(MANY.videos, train_oracle=2000))
    names = [a.name for a in S.ACTIVITIES]
    scenes = [sc.name for sc in S.SCENES]

    def table(specs):  # (activity, scene) counts
        counts = Counter((s.activity, s.scene) for s in specs)
        return np.array([[counts[(a, sc)] for sc in scenes] for a in names])

    oracle, train = table(plan(world, "train_oracle")), table(plan(world, "train"))
    assert oracle.sum() == 2000 and (oracle.sum(1) == 250).all()  # balanced activities, like train
    assert chi2_contingency(oracle).pvalue > 0.01  # no dependence found on 2000 videos
    assert chi2_contingency(train).pvalue < 1e-100  # while train's scene tells the activity
    assert usual_rate(plan(world, "train_oracle")) == pytest.approx(1 / 8, abs=0.03)
    high = {a.name for a in S.ACTIVITIES if a.cooccur == "high"}
    specs = plan(world, "train_oracle")
    middle = (MANY.cooccur_high + MANY.cooccur_low) / 2
    assert np.mean([s.cooccur for s in specs if s.activity in high]) == pytest.approx(middle, abs=0.05)
    # the new split changes no other split's videos, and an empty one not even the world's hash
    assert plan(world, "train") == plan(MANY, "train") and plan(world, "test_ood") == plan(MANY, "test_ood")
    import hashlib

    from extract.contract.config import to_dict

    before = to_dict(MANY)  # the hash as it was before these splits and keys existed: old worlds keep their caches
    for split in ("train_oracle", "test_ood_scene", "test_ood_cooccur", "test_ood_distractor", "test_ood_idle"):
        del before["videos"][split]
    del before["distractor"], before["distractor_rho"], before["idle_marker"], before["idle_rho"]
    blob = json.dumps({"generator": S.GENERATOR_VERSION, "config": before}, sort_keys=True)
    assert S.config_hash(MANY) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert S.config_hash(world) != S.config_hash(MANY)


def test_cooccurrence_rates_per_split():
    high = {a.name for a in S.ACTIVITIES if a.cooccur == "high"}
    middle = (MANY.cooccur_high + MANY.cooccur_low) / 2
    for split in ("train", "test_iid", "pretrain", "test_ood"):
        specs = plan(MANY, split)
        rate_high = np.mean([s.cooccur for s in specs if s.activity in high])
        rate_low = np.mean([s.cooccur for s in specs if s.activity not in high])
        expected = (middle, middle) if split == "test_ood" else (MANY.cooccur_high, MANY.cooccur_low)
        assert (rate_high, rate_low) == pytest.approx(expected, abs=0.05), split
        # Inserted at a random place, and visible: it is in the labels exactly when inserted.
        places = {[x.label for x in s.segments].index(S.COOCCUR_ACTION) for s in specs if s.cooccur}
        assert len(places) >= 4
        assert all((S.COOCCUR_ACTION in s.atomic) == s.cooccur for s in specs)


def test_plans_are_well_formed():
    for split in S.SPLITS:
        specs = S.plan_split(TINY, split)
        assert [s.id for s in specs] == [f"{split}_{i:05d}" for i in range(getattr(TINY.videos, split))]
        for s in specs:
            assert TINY.min_seconds * TINY.fps - 1 <= s.num_frames <= TINY.max_seconds * TINY.fps + 1
            labels = [x.label for x in s.segments]
            assert [x for x in labels if x != S.COOCCUR_ACTION] == list(S.ACTIVITY[s.activity].script)
            assert s.atomic == [a.name for a in S.ATOMIC_ACTIONS if a.name in labels]
            ends = [0] + [v for x in s.segments for v in (x.start, x.end)] + [s.num_frames]
            assert ends == sorted(ends) and all(x.end - x.start >= 2 for x in s.segments)
            assert s.lighting == S.draw_lighting(s.seed)
    counts = Counter(s.activity for s in S.plan_split(TINY, "train"))
    assert set(counts.values()) == {2}  # activities are balanced


def test_plans_are_deterministic_and_splits_independent():
    assert S.plan_split(TINY, "train") == S.plan_split(TINY, "train")
    bigger = replace(TINY, videos=replace(TINY.videos, train=40))
    assert S.plan_split(bigger, "test_iid") == S.plan_split(TINY, "test_iid")  # resizing train keeps the tests
    seeds = {s.seed for split in ("train", "test_iid", "test_ood") for s in S.plan_split(TINY, split)}
    assert not seeds & {s.seed for s in S.plan_split(TINY, "pretrain")}
    assert S.plan_split(replace(TINY, seed=5), "train") != S.plan_split(TINY, "train")
    with pytest.raises(ValueError, match="unknown split"):
        S.plan_split(TINY, "val")
    with pytest.raises(ValueError, match="min_seconds"):
        S.plan_split(replace(TINY, min_seconds=1.0, max_seconds=1.0), "train")


# --- pixels -------------------------------------------------------------------------------------


def test_foreground_mask_is_where_the_object_is():
    for spec in S.plan_split(TINY, "train")[:6]:
        frames, mask = S.render_video(spec, TINY)
        T = spec.num_frames
        assert frames.shape == (T, 48, 48, 3) and frames.dtype == np.uint8
        assert mask.shape == (T, 48, 48) and mask.dtype == bool
        scene = S.render_scene_only(spec.scene, TINY, T, spec.seed)
        np.testing.assert_array_equal(frames[~mask], scene[~mask])  # outside the mask: the empty scene
        diff = np.abs(frames.astype(int) - scene.astype(int)).max(-1)  # (T, H, W)
        assert diff[mask].mean() > 40  # inside: an object that stands out
        active = np.zeros(T, bool)
        for seg in spec.segments:
            active[seg.start : seg.end] = True
            colour = S.COLOURS[S.ATOMIC[seg.label].colour]
            assert (frames[seg.start : seg.end][mask[seg.start : seg.end]] == colour).all()
        assert (mask.sum((1, 2)) > 10)[active].all() and not mask[~active].any()  # idle gaps are empty
    a = S.render_scene_only("marble_counter", TINY, 4, seed=1)
    b = S.render_scene_only("marble_counter", TINY, 4, seed=2)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2  # per-video lighting: never pixel-identical
    with pytest.raises(ValueError, match="unknown scene"):
        S.render_scene_only("moon_base", TINY, 4, seed=0)


def test_confounder_is_real():
    cfg = replace(TINY, videos=SplitSizes(train=96, test_iid=48, test_ood=48), min_seconds=6.0, max_seconds=8.0)
    r = S.probe_confounders(cfg, size=6, workers=2)
    assert r["acc_iid"] - r["acc_ood"] > 0.25  # the full-frame probe takes the scene shortcut ...
    assert abs(r["unconf_iid"] - r["unconf_ood"]) < 0.2  # ... which is absent when rho is at chance
    assert r["bg_iid"] > 0.5 and r["bg_ood"] < 0.35  # background alone: right in iid, chance in ood
    assert r["fg_iid"] > 0.45 and abs(r["fg_iid"] - r["fg_ood"]) < 0.25  # foreground alone: stable


# --- files --------------------------------------------------------------------------------------


def test_manifest_reads_back(tiny_root):
    root, summary = tiny_root
    assert summary["videos"] == {"train": 16, "test_iid": 8, "test_ood": 8, "pretrain": 8}
    assert summary["rendered"] == 40 and summary["skipped"] == 0 and summary["bytes"] > 0
    index = read_manifest(root / "manifest.jsonl")
    assert index.problems == []
    assert len(index.items) == 40 and len({it.id for it in index.items}) == 40
    assert set(index.vocabularies) == {"activity", "atomic"}  # scene is not a task
    assert index.vocabularies["activity"].names == tuple(a.name for a in S.ACTIVITIES)
    assert not index.vocabularies["activity"].multi_label
    assert index.vocabularies["atomic"].names == tuple(a.name for a in S.ATOMIC_ACTIONS)
    assert index.vocabularies["atomic"].multi_label
    specs = {s.id: s for split in S.SPLITS for s in S.plan_split(TINY, split)}
    for it in index.items:
        spec = specs[it.id]
        assert it.labels == {"activity": spec.activity, "atomic": tuple(spec.atomic)}
        assert it.meta["scene"] == spec.scene and it.meta["num_frames"] == spec.num_frames
        assert [seg[2] for seg in it.meta["segments"]] == [x.label for x in spec.segments]
        assert all(0 <= seg[0] < seg[1] <= it.meta["duration_s"] for seg in it.meta["segments"])
    world = json.loads((root / "world.json").read_text())
    assert world["complete"] and world["config_hash"] == S.config_hash(TINY)
    assert [s["name"] for s in world["world"]["scenes"]] == [s.name for s in S.SCENES]


def test_decoded_frames_match_rendered(tiny_root):
    root, _ = tiny_root
    for spec in S.plan_split(TINY, "test_ood")[:4]:
        frames, mask = S.render_video(spec, TINY)
        decoded = decode(root / f"videos/test_ood/{spec.id}.mp4")
        assert decoded.shape == frames.shape
        err = np.abs(decoded.astype(int) - frames.astype(int))  # (T, H, W, 3)
        # mpeg4 at q=4 and 48x48 measures 3-9 (thin textures, subsampled chroma); a wrong frame is far worse.
        assert err.mean() < 12
        shifted = np.abs(np.roll(decoded, 1, axis=0).astype(int) - frames.astype(int))  # one frame off
        assert err[mask].mean() < 0.5 * shifted[mask].mean()  # no frame dropped, duplicated or reordered


def test_same_seed_same_bytes(tiny_root, tmp_path):
    root, _ = tiny_root
    S.write_dataset(TINY, tmp_path, splits=["test_iid"], progress=False, workers=1)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    assert (tmp_path / "manifest.jsonl").read_text().splitlines() == [ln for ln in lines if '"test_iid"' in ln]
    for spec in S.plan_split(TINY, "test_iid")[:3]:
        name = f"videos/test_iid/{spec.id}.mp4"
        np.testing.assert_array_equal(decode(root / name), decode(tmp_path / name))
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes()


def test_rerun_is_a_noop_and_a_new_config_rerenders(tmp_path):
    cfg = replace(TINY, videos=SplitSizes(train=4, test_iid=2, test_ood=2))
    first = S.write_dataset(cfg, tmp_path, progress=False, workers=1)
    manifest = (tmp_path / "manifest.jsonl").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.mp4")}
    again = S.write_dataset(cfg, tmp_path, progress=False, workers=1)
    assert first["rendered"] == 8 and (again["rendered"], again["skipped"]) == (0, 8)
    assert (tmp_path / "manifest.jsonl").read_bytes() == manifest
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.mp4")} == stamps
    # A killed run resumes: a lost video is rendered again, the others are kept.
    (tmp_path / "videos/train/train_00001.mp4").unlink()
    assert S.write_dataset(cfg, tmp_path, progress=False, workers=1)["rendered"] == 1
    assert (tmp_path / "manifest.jsonl").read_bytes() == manifest
    # A different config renders everything again, and videos it no longer plans are gone.
    smaller = replace(cfg, videos=SplitSizes(train=2, test_iid=2, test_ood=2), quality=8)
    changed = S.write_dataset(smaller, tmp_path, progress=False, workers=1)
    assert changed["rendered"] == 6 and changed["skipped"] == 0
    assert sorted(p.name for p in (tmp_path / "videos/train").iterdir()) == ["train_00000.mp4", "train_00001.mp4"]
    assert read_manifest(tmp_path / "manifest.jsonl").problems == []


def test_splits_can_be_written_one_at_a_time(tmp_path):
    cfg = replace(TINY, videos=SplitSizes(train=2, test_iid=2, test_ood=2, pretrain=2))
    assert S.write_dataset(cfg, tmp_path, splits=["pretrain"], progress=False, workers=1)["videos"] == {"pretrain": 2}
    summary = S.write_dataset(cfg, tmp_path, progress=False, workers=1)
    assert summary["skipped"] == 2 and summary["rendered"] == 6
    assert len(read_manifest(tmp_path / "manifest.jsonl").items) == 8
    with pytest.raises(ValueError, match="unknown split"):
        S.write_dataset(cfg, tmp_path, splits=["validation"], progress=False)


def test_write_video_is_atomic(tmp_path, monkeypatch):
    frames = np.zeros((4, 48, 48, 3), np.uint8)
    path = tmp_path / "v.mp4"
    assert S.write_video(path, frames, fps=4) == path.stat().st_size > 0
    bad = np.zeros((4, 48, 48, 3), np.float32)  # wrong dtype: fails before touching the file
    with pytest.raises(ValueError, match="uint8"):
        S.write_video(tmp_path / "w.mp4", bad, fps=4)
    with pytest.raises(ValueError, match="even"):
        S.write_video(tmp_path / "w.mp4", np.zeros((4, 47, 48, 3), np.uint8), fps=4)

    def killed(*args):  # the process dies after encoding, before the rename
        raise RuntimeError("killed")

    monkeypatch.setattr(S.os, "replace", killed)
    with pytest.raises(RuntimeError, match="killed"):
        S.write_video(tmp_path / "w.mp4", frames, fps=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no half file, no temporary left


# --- the named confounders ----------------------------------------------------------------------

NAMED = replace(
    MANY,
    distractor=True,
    idle_marker=True,
    videos=replace(
        MANY.videos, test_ood_scene=2000, test_ood_cooccur=2000, test_ood_distractor=2000, test_ood_idle=2000
    ),
)


def test_each_ood_split_breaks_only_its_own_confounder():
    """Counted on the manifest rows: in each split, the rate of the usual scene, of the co-occurring action per
    activity group and of the usual distractor is the train rate where the split keeps the confounder and the
    independent rate where it breaks it (`S.BROKEN`)."""
    high = {a.name for a in S.ACTIVITIES if a.cooccur == "high"}
    middle = (NAMED.cooccur_high + NAMED.cooccur_low) / 2
    kept = {
        "scene": NAMED.rho,
        "cooccur": (NAMED.cooccur_high, NAMED.cooccur_low),
        "distractor": NAMED.distractor_rho,
        "idle": NAMED.idle_rho,
    }
    free = {"scene": 1 / 8, "cooccur": (middle, middle), "distractor": 1 / 8, "idle": 1 / 8}
    splits = ("train", "test_iid", "test_ood", *(f"test_ood_{c}" for c in S.CONFOUNDERS))
    for split in splits:
        rows = [S.manifest_row(s, NAMED) for s in plan(NAMED, split)]
        assert len(rows) == 2000
        got = {
            "scene": np.mean([r["usual_scene"] for r in rows]),
            "cooccur": tuple(
                np.mean([r["cooccur"] for r in rows if (r["labels"]["activity"] in high) == h]) for h in (True, False)
            ),
            "distractor": np.mean([r["usual_distractor"] for r in rows]),
            "idle": np.mean([r["usual_idle_marker"] for r in rows]),
        }
        for name in S.CONFOUNDERS:
            expected = free[name] if name in S.broken(split) else kept[name]
            assert got[name] == pytest.approx(expected, abs=0.04), (split, name)
    assert S.broken("test_ood") == set(S.CONFOUNDERS) and not S.broken("test_iid")
    # where the distractor is broken, every distractor appears about equally often with every activity
    counts = Counter((s.activity, s.distractor) for s in plan(NAMED, "test_ood_distractor"))
    assert len(counts) == 64 and min(counts.values()) > 0.5 * 2000 / 64


def test_the_distractor_adds_an_object_and_changes_nothing_else():
    off, on = replace(TINY, distractor_rho=0.5), replace(TINY, distractor=True)  # off: its rho decides nothing
    for split in ("train", "test_ood"):
        for a, b in zip(S.plan_split(TINY, split), S.plan_split(on, split), strict=True):
            assert replace(b, distractor=None, usual_distractor=None, distractor_angle=0.0) == a  # its own stream
            assert b.distractor in S.DISTRACTOR and b.usual_distractor == (
                b.distractor == S.DISTRACTORS[[x.name for x in S.ACTIVITIES].index(b.activity)].name
            )
    spec_off, spec_on = S.plan_split(TINY, "train")[0], S.plan_split(on, "train")[0]
    frames_off, mask_off, none = S.render_layers(spec_off, TINY)
    frames_on, mask_on, spurious = S.render_layers(spec_on, on)
    assert not none.any()
    np.testing.assert_array_equal(mask_on, mask_off)  # the causal object is untouched ...
    np.testing.assert_array_equal(frames_on[~spurious], frames_off[~spurious])  # ... and so is every other pixel
    colour = S.DISTRACTOR_COLOURS[S.DISTRACTOR[spec_on.distractor].colour]
    assert (frames_on[spurious] == colour).all() and not (spurious & mask_on).any()
    active = np.zeros(spec_on.num_frames, bool)
    for seg in spec_on.segments:
        active[seg.start : seg.end] = True
    assert spurious.any((1, 2))[active].all() and not spurious[~active].any()  # beside every action, never idle
    # the demo world keeps its hash and its manifest (old caches stay valid); the options are recorded
    assert S.config_hash(off) == S.config_hash(TINY) != S.config_hash(on)
    assert S.config_hash(replace(TINY, videos=replace(TINY.videos, test_ood_scene=8))) != S.config_hash(TINY)
    assert "distractor" not in S.manifest_row(spec_off, TINY) and S.manifest_row(spec_on, on)["distractor"]


def test_the_distractor_lies_inside_the_foreground_box():
    """A foreground crop keeps the distractor: on rendered frames, the box the saliency produces (spectral
    residual, the configured mass 0.6) holds about as much of the distractor's pixels as of the acting
    object's, far more than the box's share of the frame (where a pixel placed at random would fall)."""
    import torch

    from extract.saliency import box_mask, foreground_box, spectral_residual_saliency

    world = replace(SyntheticConfig(), distractor=True, videos=SplitSizes(train=16, test_iid=0, test_ood=0))
    layers = [S.render_layers(s, world) for s in S.plan_split(world, "train")]
    frames, obj, spurious = (np.concatenate(x) for x in zip(*layers, strict=True))  # (N, H, W, ...)
    shown = spurious.any((1, 2))  # frames during an action
    frames, obj, spurious = frames[shown], obj[shown], spurious[shown]
    boxes = foreground_box(spectral_residual_saliency(torch.from_numpy(frames), 12), mass=0.6)  # (N, 4)
    inside = box_mask(boxes, frames.shape[1:3]).numpy()  # (N, H, W)
    share_distractor = (inside & spurious).sum() / spurious.sum()
    share_object = (inside & obj).sum() / obj.sum()
    assert share_distractor > 0.7 and share_distractor > 0.85 * share_object
    assert share_distractor > 2.5 * inside.mean()


def test_the_idle_marker_is_shown_only_between_actions():
    """IGV's premise world: a static activity-tied object in a corner in every idle frame, in none during an
    action; every other pixel as in the world without it."""
    on = replace(TINY, idle_marker=True)
    assert S.config_hash(replace(TINY, idle_rho=0.3)) == S.config_hash(TINY) != S.config_hash(on)
    for a, b in zip(S.plan_split(TINY, "train")[:4], S.plan_split(on, "train")[:4], strict=True):
        assert replace(b, idle_marker=None, usual_idle_marker=None, idle_corner=0) == a  # its own stream
        frames_off, mask_off, _ = S.render_layers(a, TINY)
        frames_on, mask_on, marker = S.render_layers(b, on)
        np.testing.assert_array_equal(mask_on, mask_off)
        np.testing.assert_array_equal(frames_on[~marker], frames_off[~marker])
        assert (frames_on[marker] == S.IDLE_COLOURS[S.IDLE_MARKER[b.idle_marker].colour]).all()
        active = np.zeros(b.num_frames, bool)
        for seg in b.segments:
            active[seg.start : seg.end] = True
        shown = marker.any((1, 2))
        assert shown[~active].all() and not shown[active].any()  # every idle frame, no action frame
        assert (marker[~active] == marker[~active][0]).all()  # static
        row = S.manifest_row(b, on)
        assert row["idle_marker"] == b.idle_marker and "idle_marker" not in S.manifest_row(a, TINY)
    with pytest.raises(ValueError, match="set synthetic.idle_marker: true"):
        S.write_dataset(
            replace(TINY, videos=replace(TINY.videos, test_ood_idle=2)), Path("/nonexistent"), progress=False
        )
