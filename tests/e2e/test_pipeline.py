"""Across the stages, end to end: what stage 1 extracts from the rendered synthetic world, stage 2 finds, reads and
trains on. Stage 2 alone is tested on a store written from random arrays (tests/train/); these tests are the ones
whose assertion needs stage 1's output: the store pointer `ltar extract` writes, the segments and same-set pairs it
copies from the dataset, the dictionaries `ltar dictionaries` builds."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from extract.contract.config import write_resolved
from extract.contract.schema import CacheError
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_cli_extract_dictionaries_then_train_and_evaluate_find_the_store(world, tmp_path):
    """`ltar extract`, `ltar dictionaries`, then `ltar train` and `ltar evaluate` with no --store: stage 2 finds the
    store through the pointer stage 1 wrote for the same config, and ECRL reads the dictionaries built into it."""
    from train.main import app

    cfg = tiny_config(world, tmp_path / "cache", train={"runs_root": str(tmp_path / "runs"), "epochs": 1})
    config = ["--config", str(write_resolved(cfg, tmp_path))]
    runner = CliRunner()
    res = runner.invoke(app, ["-q", "extract", *config])
    assert res.exit_code == 0, res.output
    assert "videos: 12 extracted, 0 already done, 0 failed (of 12)" in res.output
    store = Path(res.output.split("store: ")[1].split()[0])
    assert store.parent == tmp_path / "cache" / "synthetic" and any((store.parent / "pointers").glob("*.json"))
    res = runner.invoke(app, ["-q", "dictionaries", *config])
    assert res.exit_code == 0 and "confounder_paper" in res.output, res.output
    res = runner.invoke(app, ["-q", "train", "--head", "ecrl", *config])
    assert res.exit_code == 0 and "test_ood: acc1=" in res.output, res.output
    run = tmp_path / "runs" / "ecrl-activity-s0"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["store"] == str(store) and set(ckpt["dictionaries"]) == {"confounder_paper", "global"}
    res = runner.invoke(app, ["-q", "evaluate", str(run), "--split", "test_iid", *config])
    assert res.exit_code == 0 and "test_iid: acc1=" in res.output, res.output
    # another stage-1 configuration has no store recorded: a sentence, exit 2, no run folder
    res = runner.invoke(app, ["-q", "train", *config, "--set", "frames.num_frames=4"])
    assert res.exit_code == 2 and "no cache store recorded" in res.output, res.output
    assert not (tmp_path / "runs" / "baseline-activity-s0").exists()


def test_frame_relevance_follows_the_annotated_segments(tiny_cache):
    """Stage 2's relevant frames (the store's segment_mask) are the sampled frames inside the dataset's own
    annotated segments, as stage 1 read them."""
    from extract.contract import schema
    from extract.datasets import load_dataset
    from train.data import CacheReader
    from train.grounding import frame_relevance

    cfg, store = tiny_cache
    reader = CacheReader(store, "activity")
    rows = reader.split_rows("test_ood")
    got = frame_relevance(cfg, reader, rows)
    times = np.asarray(reader.group[schema.TIMESTAMPS].get_orthogonal_selection(rows))
    items = {it.id: it for it in load_dataset(cfg).items}
    for n, r in enumerate(rows):
        segments = items[reader.info.video_ids[r]].meta["segments"]
        want = [any(s <= t < e for s, e, _ in segments) for t in times[n]]
        assert got[n].tolist() == want
    assert got.any() and not got.all()


def test_a_dictionary_built_before_the_store_changed_is_refused(tiny_cache, tmp_path):
    """`ltar dictionaries` records the split's finished rows each dictionary was built from; once the store finishes
    other rows of that split (a video extracted again, or lost), training refuses it with a sentence."""
    import zarr

    from extract.contract import schema
    from extract.dictionaries import build_dictionaries
    from train.data import CacheReader

    cfg, store = tiny_cache
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    build_dictionaries(cfg, copy, progress=False)
    reader = CacheReader(copy, "activity")
    assert reader.context().dictionaries  # as built: fresh
    train_rows = reader.info.split_indices("train")
    done = zarr.open_array(str(copy / schema.DONE), mode="r+")
    done[int(train_rows[0])] = False  # the store's finished rows of the split change after the build
    with pytest.raises(CacheError, match=r"dictionary '.+' was built from other finished videos of split 'train'"):
        CacheReader(copy, "activity", allow_partial=True).context()


def test_the_oracle_row_and_the_order_confusion_on_an_extracted_world(tmp_path):
    """The `confounders` table on the rendered world: stage 1 renders and extracts the oracle's unconfounded split,
    one ood split per confounder and the world's same-set pairs; the oracle row trains on train_oracle, every ood
    split is evaluated, and the order confusion counts exactly the world's same-set pairs (by hand, from
    extract.synthetic's activities)."""
    from extract.pipeline import extract
    from extract.synthetic import ACTIVITIES, same_set_pairs, write_dataset
    from train.ablate import run_table
    from train.config import AblationTable
    from train.engine import run_predictions

    ood = ("test_ood", "test_ood_cooccur", "test_ood_distractor", "test_ood_scene")
    videos = {"train": 6, "test_iid": 3, "train_oracle": 6, **dict.fromkeys(ood, 3)}
    world = tiny_config(tmp_path / "world", tmp_path / "cache", synthetic={"videos": videos, "distractor": True})
    write_dataset(world.synthetic, tmp_path / "world", progress=False)
    store = extract(world, progress=False).store
    table = AblationTable(rows=("baseline", "oracle"), tasks=("activity",), seeds=1, order_confusion=True)
    cfg = dataclasses.replace(
        world, ablations={"bounds": table}, train=dataclasses.replace(world.train, epochs=1, runs_root=str(tmp_path))
    )
    result = run_table(cfg, "bounds", store=store, progress=False)
    runs = {p.parent.name for p in (tmp_path / "ablations").rglob("last.pt")}
    assert runs == {"baseline-activity-s0", "baseline-train_oracle-activity-s0"}
    assert {c.split for c in result.cells if c.metric == "acc1"} == {"test_iid", *ood}
    assert {c.split for c in result.cells if c.metric == "order"} == {"test_iid", *ood}
    names = [a.name for a in ACTIVITIES]
    partner = np.full(len(names), -1)
    for a, b in same_set_pairs():
        partner[names.index(a)], partner[names.index(b)] = names.index(b), names.index(a)
    assert (partner >= 0).any()
    scores, labels, _ = run_predictions(next((tmp_path / "ablations").rglob("baseline-activity-s0")), "test_ood", store)
    paired = partner[labels] >= 0
    cell = next(c for c in result.cells if (c.row, c.split, c.metric) == ("baseline", "test_ood", "order"))
    assert paired.any() and cell.values == [pytest.approx(np.mean(scores[paired].argmax(1) == partner[labels[paired]]))]
