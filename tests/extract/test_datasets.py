"""The manifest reader: what a user's own dataset (and the synthetic one) goes through."""

import json

import pytest

from extract.contract.config import from_dict
from extract.datasets import DatasetError, dataset_names, load_dataset, read_manifest


def _write(root, rows, classes=None):
    root.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if classes:
        (root / "classes.json").write_text(json.dumps(classes))


def _row(vid, split="train", activity="a", atomic=("x",), path=None):
    return {
        "id": vid,
        "path": path or f"{vid}.mp4",
        "split": split,
        "labels": {"activity": activity, "atomic": list(atomic)},
        "fps": 8,
    }


def test_reads_items_vocabularies_and_reports_problems(tmp_path):
    for v in ("v1", "v2", "v3"):
        (tmp_path / f"{v}.mp4").write_bytes(b"x")
    _write(
        tmp_path,
        [
            _row("v1"),
            _row("v2", split="test", activity="b", atomic=("x", "y")),
            "{not json",
            {"id": "v9", "path": "v9.mp4"},
            _row("v1"),
            _row("v4"),
            _row("v3", activity="zzz"),
        ],
        classes={"activity": ["a", "b"], "atomic": ["x", "y", "z"]},
    )
    index = read_manifest(tmp_path / "manifest.jsonl")
    assert [it.id for it in index.items] == ["v1", "v2", "v4", "v3"]
    assert index.items[1].labels == {"activity": "b", "atomic": ("x", "y")} and index.items[0].meta == {"fps": 8}
    assert index.vocabularies["atomic"].names == ("x", "y", "z") and index.vocabularies["atomic"].multi_label
    assert not index.vocabularies["activity"].multi_label
    problems = "\n".join(index.problems)
    assert f"{tmp_path / 'manifest.jsonl'}:3: not valid JSON" in problems
    assert ":4: missing field(s) ['split', 'labels']" in problems
    assert ":5: duplicate video id 'v1'" in problems
    assert ":6: video 'v4' has no file at" in problems and "will record it as failed" in problems
    assert "labels outside its vocabulary: ['zzz']" in problems
    assert "4 videos (1 test, 3 train)" in index.summary()


def test_vocabulary_from_labels_without_classes_file(tmp_path):
    (tmp_path / "v1.mp4").write_bytes(b"x")
    _write(tmp_path, [_row("v1", activity="stir_milk")])
    vocab = read_manifest(tmp_path / "manifest.jsonl").vocabularies["activity"]
    assert vocab.names == ("stir_milk",) and vocab.prompt_name(0) == "stir milk"


def test_registry_and_missing_manifest(tmp_path):
    assert {"manifest", "synthetic"} <= set(dataset_names())
    cfg = from_dict({"dataset": {"name": "manifest", "root": str(tmp_path / "none")}})
    with pytest.raises(DatasetError, match="manifest.jsonl does not exist; run `ltar synth`"):
        load_dataset(cfg)


def test_an_unknown_split_name_is_refused_unless_declared(tmp_path):
    """A typo (`tset`) would become a split no stage reads: refused with the line and a did-you-mean; a declared
    extra split (dataset.extra_splits) and the train_* / test_* family are accepted."""
    _write(tmp_path, [_row("v1"), _row("v2", split="tset"), _row("v3", split="test_ood_scene"), _row("v4", split="x")])
    with pytest.raises(
        DatasetError, match=r"manifest\.jsonl:2: split 'tset' is not a known split \(did you mean 'test'"
    ):
        read_manifest(tmp_path / "manifest.jsonl")
    with pytest.raises(DatasetError, match=r"2 line\(s\) name unknown splits \(tset, x\)"):
        read_manifest(tmp_path / "manifest.jsonl")
    cfg = from_dict({"dataset": {"name": "manifest", "root": str(tmp_path), "extra_splits": ["tset", "x"]}})
    index = load_dataset(cfg)
    assert sorted({it.split for it in index.items}) == ["test_ood_scene", "train", "tset", "x"]


def test_a_task_mixing_single_labels_and_lists_is_refused(tmp_path):
    rows = [_row("v1"), {**_row("v2"), "labels": {"activity": ["a", "b"], "atomic": ["x"]}}]
    _write(tmp_path, rows)
    with pytest.raises(
        DatasetError, match=r"task 'activity' has one label \(a string\) for 1 video\(s\) \(e\.g\. v1\)"
    ):
        read_manifest(tmp_path / "manifest.jsonl")
