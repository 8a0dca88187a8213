"""The benchmark adapters (Breakfast, COIN, Charades) and the CSV manifest, on small fixture trees
written in each dataset's distributed format; never real data."""

import json
from pathlib import Path

import numpy as np
import pytest

from extract.adapters import (
    BREAKFAST_ACTIONS,
    camel_words,
    parse_breakfast_id,
    readable,
)
from extract.contract.config import ConfigError, from_dict
from extract.datasets import DatasetError, Vocabulary, dataset_names, load_dataset, read_manifest

CEREALS = "1-30 SIL  \n31-150 take_bowl  \n151-428 pour_cereals  \n429-575 pour_milk  \n576-705 stir_cereals  \n"
TEA = "1-37 SIL \n38-92 take_cup \n93-229 pour_water \n230-744 add_teabag \n745-884 pour_sugar \n885-973 SIL \n"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def _avi(path: Path, seconds: float = 2.0, fps: int = 15, size: int = 32) -> Path:
    """A real AVI (mpeg4), as the distributed Breakfast files are: a moving gradient."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * fps))[:, None, None, None]
    x = np.arange(size)[None, None, :, None]
    frames = ((x * 8 + t * 5 + np.arange(3) * 60) % 256).astype(np.uint8).repeat(size, axis=1)  # (T, S, S, 3)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def _cfg(root: Path, name: str, **dataset):
    return from_dict({"dataset": {"name": name, "root": str(root), **dataset}})


def _problems(index) -> str:
    return "\n".join(index.problems)


# ---------------------------------------------------------------------------------------------
# Breakfast
# ---------------------------------------------------------------------------------------------


def _breakfast(root: Path) -> Path:
    """Both annotation sources, every camera kind, and one of each problem."""
    videos = root / "BreakfastII_15fps_qvga_sync"
    coarse = root / "segmentation_coarse"
    _write(coarse / "cereals" / "P03_cam01_P03_cereals.txt", CEREALS)
    _write(coarse / "cereals" / "P03_stereo01_P03_cereals.txt", CEREALS)
    _write(coarse / "tea" / "P47-webcam01-P47_tea.txt", TEA)  # the dash id style
    _write(coarse / "juggling" / "P42_cam01_P42_juggling.txt", "1-10 SIL\n")  # not a Breakfast activity
    _write(coarse / "cereals" / "P03_cam01_P03_cereals 2.txt", CEREALS)  # a stray copy: not an id
    _write(videos / "P03" / "cam01" / "P03_cereals.avi", b"x")
    _write(videos / "P03" / "stereo" / "P03_cereals_ch0.avi", b"x")
    _write(videos / "P03" / "stereo" / "P03_cereals_ch1.avi", b"x")
    _write(videos / "P47" / "webcam01" / "P47_tea.avi", b"x")
    _write(videos / "P47" / "webcam01" / "P47_tea.avi.labels", TEA)  # same video as the dash-named file
    labels = "1-5 SIL \n5-5 SIL\n6-40 crack_egg \nnot a segment\n50-45 fry_egg\n41-49 juggle_eggs\n50-80 fry_egg\n"
    _write(videos / "P16" / "cam02" / "P16_friedegg.avi.labels", labels)  # labels only: its video is missing
    _write(videos / "P29" / "cam01" / "P29_pancake.avi", b"x")  # a video nobody annotated
    return root


def test_breakfast_items_labels_and_problems(tmp_path):
    index = load_dataset(_cfg(_breakfast(tmp_path), "breakfast"))
    assert [it.id for it in index.items] == [
        "P03_cam01_P03_cereals",
        "P03_stereo01_P03_cereals",
        "P16_cam02_P16_friedegg",
        "P42_cam01_P42_juggling",
        "P47_webcam01_P47_tea",
    ]
    by_id = {it.id: it for it in index.items}
    cereals = by_id["P03_cam01_P03_cereals"]
    assert cereals.labels == {
        "activity": "cereals",
        "atomic": ("SIL", "pour_cereals", "pour_milk", "stir_cereals", "take_bowl"),
    }
    assert cereals.split == "train" and by_id["P47_webcam01_P47_tea"].split == "test"  # the person split
    # 1-based inclusive frames at the fallback 15 fps: frames 1-30 are [0, 2) s
    assert cereals.meta["segments"][0] == (0.0, 2.0, "SIL") and cereals.meta["fps_from"] == "dataset.fps"
    stereo = by_id["P03_stereo01_P03_cereals"]
    assert stereo.path.name == "P03_cereals_ch0.avi" and stereo.meta["channel"] == 0
    fried = by_id["P16_cam02_P16_friedegg"]
    assert fried.labels["atomic"] == ("SIL", "crack_egg", "fry_egg")  # `5-5` is one frame, kept
    assert "activity" not in by_id["P42_cam01_P42_juggling"].labels

    labels = tmp_path / "BreakfastII_15fps_qvga_sync" / "P16" / "cam02" / "P16_friedegg.avi.labels"
    problems = _problems(index)
    assert f"{labels}:4: expected `start-end label`" in problems
    assert f"{labels}:5: segment 50-45 is empty" in problems
    assert f"{labels}:6: unit action 'juggle_eggs' is not one of the 48" in problems
    assert f"{labels}: video 'P16_cam02_P16_friedegg' has no file at" in problems
    assert "P29_pancake.avi: video 'P29_cam01_P29_pancake' has no annotation" in problems
    assert "activity 'juggling' (from the file name) is not one of the 10" in problems
    assert "P03_cam01_P03_cereals 2.txt:1: not a Breakfast annotation name" in problems
    assert "P47" not in problems  # the .avi.labels agreeing with segmentation_coarse is no problem
    assert index.counts == {"malformed": 3, "unknown": 2, "missing": 2, "unlabelled": 1}
    summary = index.summary()
    assert summary.startswith("5 videos (1 test, 4 train); activity: 10 classes, atomic: 48 classes;")
    assert "2 missing, 3 malformed, 2 unknown labels, 1 without annotation; 8 problems" in summary


def test_breakfast_vocabularies_and_prompts(tmp_path):
    index = load_dataset(_cfg(_breakfast(tmp_path), "breakfast"))
    atomic, activity = index.vocabularies["atomic"], index.vocabularies["activity"]
    assert len(atomic.names) == 48 and atomic.multi_label and atomic.names[0] == "SIL"
    assert atomic.prompt_name(atomic.names.index("stir_milk")) == "stir milk"
    assert atomic.prompt_name(atomic.names.index("put_toppingOnTop")) == "put topping on top"
    assert activity.names[activity.names.index("salat")] == "salat" and not activity.multi_label
    assert activity.prompt_name(activity.names.index("salat")) == "making fruit salad"
    no_sil = load_dataset(_cfg(tmp_path, "breakfast", include_sil=False))
    assert len(no_sil.vocabularies["atomic"].names) == 47 and "SIL" not in no_sil.vocabularies["atomic"].names
    assert no_sil.items[0].labels["atomic"] == ("pour_cereals", "pour_milk", "stir_cereals", "take_bowl")
    assert "'SIL'" not in _problems(no_sil)  # left out by the option, not unknown


def test_breakfast_id_styles_and_stereo_channel(tmp_path):
    styles = [
        "P03_cam01_P03_cereals",
        "P03-cam01-P03_cereals",
        "P03/cam01/P03_cereals.avi",
        "/data/BreakfastII_15fps_qvga_sync/P03/cam01/P03_cereals.avi.labels",
        "P03_cam01_P03_cereals.txt",
    ]
    assert {parse_breakfast_id(s).id for s in styles} == {"P03_cam01_P03_cereals"}
    stereo = ["P03_stereo01_P03_cereals", "P03/stereo/P03_cereals_ch1.avi", "P03-stereo01-P03_cereals"]
    assert {parse_breakfast_id(s).id for s in stereo} == {"P03_stereo01_P03_cereals"}
    assert parse_breakfast_id("P03_cam01_P04_cereals") is None and parse_breakfast_id("readme") is None
    index = load_dataset(_cfg(_breakfast(tmp_path), "breakfast", stereo_channel=1))
    stereo_item = next(it for it in index.items if it.id == "P03_stereo01_P03_cereals")
    assert stereo_item.path.name == "P03_cereals_ch1.avi" and stereo_item.meta["channel"] == 1


@pytest.mark.parametrize(
    ("split", "test_persons"),
    [
        (None, range(47, 55)),  # Timeception / VideoGraph / CMDCL: the first 44 persons train
        ("person", range(47, 55)),
        ("s1", range(3, 16)),
        ("s2", range(16, 29)),
        ("s3", range(29, 42)),
        ("s4", range(42, 55)),
    ],
)
def test_breakfast_split_sizes(tmp_path, split, test_persons):
    for p in range(3, 55):  # 52 persons, one annotated video each
        _write(tmp_path / "segmentation_coarse" / f"P{p:02d}_cam01_P{p:02d}_tea.txt", TEA)
    index = load_dataset(_cfg(tmp_path, "breakfast", split=split))
    test = {int(it.meta["person"][1:]) for it in index.split("test")}
    assert test == set(test_persons) and len(index.split("train")) == 52 - len(test_persons)
    assert index.counts == {"missing": 52}  # no video files: every one reported, every one kept


def test_breakfast_split_file_takes_either_id_style(tmp_path):
    _breakfast(tmp_path)
    _write(tmp_path / "test_ids.txt", "P03-cam01-P03_cereals\nP16_cam02_P16_friedegg.txt\nP99_cam01_P99_tea\nbad\n")
    index = load_dataset(_cfg(tmp_path, "breakfast", split="test_ids.txt"))
    assert {it.id for it in index.split("test")} == {"P03_cam01_P03_cereals", "P16_cam02_P16_friedegg"}
    problems = _problems(index)
    assert "test_ids.txt:3: test video 'P99_cam01_P99_tea' is not in the dataset" in problems
    assert "test_ids.txt:4: 'bad' names no Breakfast video" in problems


def test_breakfast_without_annotations_fails_clearly(tmp_path):
    with pytest.raises(DatasetError, match="holds no Breakfast annotation: expected segmentation_coarse"):
        load_dataset(_cfg(tmp_path, "breakfast"))


# ---------------------------------------------------------------------------------------------
# COIN
# ---------------------------------------------------------------------------------------------


def _coin(root: Path) -> Path:
    def entry(cls, recipe, subset, steps, start=1.0, end=30.0):
        return {
            "duration": 40.0,
            "class": cls,
            "video_url": "https://www.youtube.com/embed/x",
            "start": start,
            "end": end,
            "annotation": [{"id": i, "segment": seg, "label": label} for i, seg, label in steps],
            "subset": subset,
            "recipe_type": recipe,
        }

    database = {
        "LtRSn-ntcLY": entry(
            "ReplaceCDDriveWithSSD",
            131,
            "training",
            [("212", [60.0, 69.0], "take out the laptop CD drive"), ("216", [71.0, 82.0], "insert the hard disk")],
        ),
        "tire_1": entry(
            "ChangeCarTire",
            13,
            "testing",
            [("260", [5.0, 9.0], "jack up the car"), ("259", [10.0, 5.0], "unscrew the screw")],  # s >= e
        ),
        "tire_2": entry("ChangeCarTire", 13, "validation", [("259", [1.0, 4.0], "unscrew the screw")]),
        "bad_subset": entry("ChangeCarTire", 13, "holdout", []),
        "no_class": {"subset": "training", "annotation": []},
        "odd": entry("ChangeCarTire", 13, "training", [("261", [3.0], "remove the tire")], start=9.0, end=2.0),
    }
    _write(root / "COIN.json", json.dumps({"database": database}, indent=4))
    _write(root / "videos" / "131" / "LtRSn-ntcLY.mp4", b"x")
    _write(root / "tire_1.webm", b"x")  # flat, another extension
    _write(root / "videos" / "13" / "odd.mkv", b"x")
    return root


def test_coin_items_splits_and_vocabularies(tmp_path):
    root = _coin(tmp_path)
    index = load_dataset(_cfg(root, "coin"))
    by_id = {it.id: it for it in index.items}
    assert list(by_id) == ["LtRSn-ntcLY", "tire_1", "tire_2", "odd"]
    assert {it.id: it.split for it in index.items} == {
        "LtRSn-ntcLY": "train",
        "tire_1": "test",
        "tire_2": "val",
        "odd": "train",
    }
    assert by_id["LtRSn-ntcLY"].labels == {"task": "ReplaceCDDriveWithSSD", "steps": ("212", "216")}
    assert by_id["LtRSn-ntcLY"].region == (1.0, 30.0) and by_id["odd"].region is None
    assert by_id["LtRSn-ntcLY"].path == root / "videos" / "131" / "LtRSn-ntcLY.mp4"
    assert by_id["tire_1"].path == root / "tire_1.webm" and by_id["tire_1"].labels["steps"] == ("260",)
    task, steps = index.vocabularies["task"], index.vocabularies["steps"]
    assert task.names == ("ChangeCarTire", "ReplaceCDDriveWithSSD") and not task.multi_label  # recipe_type order
    assert task.prompt_name(1) == "replace CD drive with SSD"
    assert steps.names == ("212", "216", "259", "260") and steps.multi_label
    assert steps.prompt_name(0) == "take out the laptop CD drive"  # step names as given

    text = (root / "COIN.json").read_text().splitlines()
    line = {vid: 1 + next(i for i, t in enumerate(text) if f'"{vid}": {{' in t) for vid in by_id | {"bad_subset": 0}}
    problems = _problems(index)
    source = root / "COIN.json"
    assert (
        f"{source}:{line['tire_1']}: video 'tire_1' annotation[1]: segment [10.0, 5.0] starts at or after" in problems
    )
    assert f"{source}:{line['bad_subset']}: video 'bad_subset' has subset 'holdout'" in problems
    assert "video 'no_class' lacks `class` or `subset`; skipped" in problems
    assert f"{source}:{line['odd']}: video 'odd' annotation[0]: segment [3.0] is not [start, end]" in problems
    assert "video 'odd' region [9.0, 2.0] is empty" in problems
    assert f"video 'tire_2' has no file at {root / 'videos' / '13' / 'tire_2.mp4'}" in problems
    assert index.counts == {"malformed": 5, "missing": 1}


def test_coin_camel_words():
    assert camel_words("ReplaceCDDriveWithSSD") == "replace CD drive with SSD"
    assert camel_words("MakeFrenchFries") == "make french fries"
    assert camel_words("UseJackToChangeTire") == "use jack to change tire"


# ---------------------------------------------------------------------------------------------
# Charades
# ---------------------------------------------------------------------------------------------

HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"


def _charades(root: Path) -> Path:
    ann = root / "Charades"
    _write(
        ann / "Charades_v1_classes.txt",
        "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking some clothes from somewhere\n"
        "c003 Throwing clothes somewhere\nthis line is not a class\n",
    )
    train = [
        # quoted fields with commas, and a description spanning two lines
        'AAAAA,S1,Bedroom,6,7,Yes,"A person holds clothes, then throws them.","clothes;floor",'
        '"A person, holding clothes.\nThen they throw them.","c001 11.90 21.20;c000 0.00 12.60;c001 1.0 3.0",30.00',
        'BBBBB,S2,Kitchen,5,7,Yes,"Nothing happens.",,"",,12.00',  # no actions
        'CCCCC,S3,Garage,5,7,Yes,"x",,"","c999 1 2;c002 5.0 5.0;c003 25.0 40.0;c002 35 40;c000 two 3",30.00',
        'DDDDD,S4,Garage,5,7,Yes,"x",,"","c000 1 2",not-a-number',
        "EEEEE,S5,Garage,5,7",  # too few fields
        'AAAAA,S1,Bedroom,6,7,Yes,"again",,"","c000 1 2",30.00',
    ]
    _write(ann / "Charades_v1_train.csv", HEADER + "\n".join(train) + "\n")
    _write(ann / "Charades_v1_test.csv", HEADER + 'FFFFF,S6,Hall,7,7,Yes,"y",,"","c002 0.5 4.5",8.25\n')
    for vid in ("AAAAA", "CCCCC", "FFFFF"):
        _write(root / "Charades_v1_480" / f"{vid}.mp4", b"x")
    return root


def test_charades_items_labels_and_problems(tmp_path):
    root = _charades(tmp_path)
    index = load_dataset(_cfg(root, "charades"))
    by_id = {it.id: it for it in index.items}
    assert list(by_id) == ["AAAAA", "BBBBB", "CCCCC", "FFFFF"]
    assert [len(index.split(s)) for s in ("train", "test")] == [3, 1]
    a = by_id["AAAAA"]
    assert a.labels == {"actions": ("c000", "c001")}  # c001 twice: counted once
    assert a.meta["script"] == "A person holds clothes, then throws them." and a.meta["scene"] == "Bedroom"
    assert a.meta["descriptions"] == "A person, holding clothes.\nThen they throw them."
    assert a.path == root / "Charades_v1_480" / "AAAAA.mp4"
    assert by_id["BBBBB"].labels == {"actions": ()}  # empty action list: a video with no action
    c = by_id["CCCCC"]
    assert c.labels == {"actions": ("c000", "c002", "c003")}  # bad intervals keep their class as a label
    assert c.meta["segments"] == [(25.0, 30.0, "c003")]  # clamped to length
    vocab = index.vocabularies["actions"]
    assert vocab.names == ("c000", "c001", "c002", "c003") and vocab.multi_label
    assert vocab.prompt_name(0) == "Holding some clothes"

    train = root / "Charades" / "Charades_v1_train.csv"
    problems = _problems(index)
    assert f"{root / 'Charades' / 'Charades_v1_classes.txt'}:5: expected `c000 class name`" in problems
    assert f"{train}:5: action class 'c999' is not in Charades_v1_classes.txt" in problems  # after a 2-line record
    assert f"{train}:5: action 'c002 5.0 5.0' starts at or after its end" in problems
    assert f"{train}:5: action 'c002 35 40' lies outside the video (length 30 s)" in problems
    assert f"{train}:5: action 'c000 two 3' is not `class start end`" in problems
    assert f"{train}:6: needs an id and a positive length" in problems
    assert f"{train}:7: 5 fields for 11 columns; line skipped" in problems
    assert f"{train}:8: duplicate video id 'AAAAA'" in problems
    assert f"{train}:5: 1 action interval(s) here and below reach past the video's length" in problems
    assert f"video 'BBBBB' has no file at {root / 'Charades_v1_480' / 'BBBBB.mp4'}" in problems
    assert index.counts == {"malformed": 6, "unknown": 1, "duplicate": 1, "missing": 1, "other": 1}


def test_charades_labels_count_every_listed_class_whatever_its_interval(tmp_path):
    """The official video-level ground truth counts each class in `actions`; bad intervals leave the segments."""
    root = _charades(tmp_path)
    train = [
        'GGGGG,S1,Bedroom,6,7,Yes,"x",,"","c000 2 4;c001 6 6;c002 12 15;c000 5 8",10.00',  # empty, past the end
        'HHHHH,S2,Kitchen,6,7,Yes,"x",,"","c003 8 14;c001 9 7",10.00',  # clamped, reversed
        'IIIII,S3,Garage,6,7,Yes,"x",,"","c002 6 9",5.00',  # its only interval lies past the end
    ]
    _write(root / "Charades" / "Charades_v1_train.csv", HEADER + "\n".join(train) + "\n")
    test = root / "Charades" / "Charades_v1_test.csv"
    _write(test, HEADER + 'JJJJJ,S4,Hall,7,7,Yes,"y",,"","c000 -3 2;c003 1 5;c001 -5 -1",20.00\n')  # before 0
    index = load_dataset(_cfg(root, "charades"))
    names = index.vocabularies["actions"].names
    by_id = {it.id: it for it in index.items}
    hot = {vid: [int(c in it.labels["actions"]) for c in names] for vid, it in by_id.items()}  # (videos, classes)
    # before: GGGGG [1,0,0,0], HHHHH [0,0,0,1], IIIII [0,0,0,0], JJJJJ [1,0,0,1] (per class 2,0,0,2)
    assert hot == {"GGGGG": [1, 1, 1, 0], "HHHHH": [0, 1, 0, 1], "IIIII": [0, 0, 1, 0], "JJJJJ": [1, 1, 0, 1]}
    assert [sum(col) for col in zip(*hot.values(), strict=True)] == [2, 3, 2, 2]  # positives per class
    assert by_id["GGGGG"].labels == {"actions": ("c000", "c001", "c002")}  # c000 twice: counted once
    assert by_id["GGGGG"].meta["segments"] == [(2.0, 4.0, "c000"), (5.0, 8.0, "c000")]
    assert by_id["HHHHH"].meta["segments"] == [(8.0, 10.0, "c003")]
    assert by_id["IIIII"].meta["segments"] == []
    assert by_id["JJJJJ"].meta["segments"] == [(0.0, 2.0, "c000"), (1.0, 5.0, "c003")]

    problems = _problems(index)
    csv = root / "Charades" / "Charades_v1_train.csv"
    kept = "its interval is skipped, the class is kept as a label"
    assert f"{csv}:2: action 'c001 6 6' starts at or after its end; {kept}" in problems
    assert f"{csv}:2: action 'c002 12 15' lies outside the video (length 10 s); {kept}" in problems
    assert f"{csv}:3: action 'c001 9 7' starts at or after its end; {kept}" in problems
    assert f"{csv}:4: action 'c002 6 9' lies outside the video (length 5 s); {kept}" in problems
    assert f"{test}:2: action 'c001 -5 -1' lies outside the video (length 20 s); {kept}" in problems
    assert f"{csv}:3: 1 action interval(s) here and below reach past the video's length" in problems
    assert f"{test}:2: 1 action interval(s) here and below reach past the video's length" in problems
    assert index.counts == {"malformed": 6, "missing": 4, "other": 2}


# ---------------------------------------------------------------------------------------------
# Manifest CSV, vocabularies, registry, config
# ---------------------------------------------------------------------------------------------


def test_manifest_csv(tmp_path):
    _write(tmp_path / "a.mp4", b"x")
    _write(tmp_path / "b c.mp4", b"x")
    rows = [
        "id,path,split,activity,atomic[],objects,start,end",
        'a,a.mp4,train,"make tea, quickly",boil_water;pour_water,cup,1.5,20',
        'b,"b c.mp4",test,make_coffee,pour_water,"cup;spoon",,',
        "c,missing.mp4,test,make_coffee,,,,",
        "d,d.mp4,train",
        "e,e.mp4,train,make_tea,x,y,one,2",
    ]
    _write(tmp_path / "manifest.csv", "\n".join(rows) + "\n")
    index = load_dataset(_cfg(tmp_path, "manifest"))
    by_id = {it.id: it for it in index.items}
    assert list(by_id) == ["a", "b", "c"]
    assert by_id["a"].labels == {
        "activity": "make tea, quickly",
        "atomic": ("boil_water", "pour_water"),
        "objects": ("cup",),
    }
    assert by_id["a"].region == (1.5, 20.0) and by_id["b"].region is None and by_id["b"].path == tmp_path / "b c.mp4"
    assert by_id["c"].labels == {"activity": "make_coffee", "atomic": (), "objects": ()}
    assert index.vocabularies["atomic"].multi_label and index.vocabularies["objects"].multi_label  # `;` in a cell
    assert not index.vocabularies["activity"].multi_label
    problems = _problems(index)
    manifest = tmp_path / "manifest.csv"
    assert f"{manifest}:4: video 'c' has no file at" in problems
    assert f"{manifest}:5: 3 cells for 8 columns; line skipped" in problems
    assert f"{manifest}:6: start/end 'one', '2' are not numbers" in problems
    assert read_manifest(manifest).summary().startswith("3 videos (2 test, 1 train)")


def test_vocabulary_prompts():
    vocab = Vocabulary("actions", ("c000", "c001"), True, ("Holding some clothes", "Putting clothes somewhere"))
    assert vocab.prompt_name(1) == "Putting clothes somewhere"
    assert Vocabulary("atomic", ("stir_milk",), True).prompt_name(0) == "stir milk"
    with pytest.raises(ValueError, match="1 prompts for 2 classes"):
        Vocabulary("t", ("a", "b"), False, ("a",))
    assert readable("add_saltnpepper") == "add salt and pepper" and readable("put_egg2plate") == "put egg to plate"
    assert all(readable(a) for a in BREAKFAST_ACTIONS)


def test_registry_and_split_option_checks(tmp_path):
    assert {"breakfast", "coin", "charades", "manifest", "synthetic"} <= set(dataset_names())
    assert _cfg(tmp_path, "breakfast", split="s2").dataset.split == "s2"
    with pytest.raises(ConfigError, match=r"dataset.split: 's9' is neither a Breakfast split \['s1'"):
        _cfg(tmp_path, "breakfast", split="s9")
    with pytest.raises(ConfigError, match="dataset.split: the coin dataset takes its split from its annotation"):
        _cfg(tmp_path, "coin", split="s1")
    with pytest.raises(ConfigError, match="dataset.stereo_channel: 2 is out of range"):
        _cfg(tmp_path, "breakfast", stereo_channel=2)
    with pytest.raises(DatasetError, match="holds no COIN.json"):
        load_dataset(_cfg(tmp_path, "coin"))
    with pytest.raises(DatasetError, match="holds no Charades_v1_classes.txt"):
        load_dataset(_cfg(tmp_path, "charades"))


# ---------------------------------------------------------------------------------------------
# End to end: `ltar extract` on a Breakfast-format tree of tiny rendered videos
# ---------------------------------------------------------------------------------------------


def test_extract_breakfast_end_to_end(tmp_path):
    from extract.contract import schema
    from extract.pipeline import extract
    from tests.conftest import tiny_config

    root = tmp_path / "breakfast"
    videos = root / "BreakfastII_15fps_qvga_sync"
    for rel, labels in [
        ("P03/cam01/P03_cereals", CEREALS),
        ("P03/stereo/P03_cereals_ch0", CEREALS),
        ("P47/webcam01/P47_tea", TEA),
        ("P48/cam02/P48_tea", TEA),
    ]:
        _avi(videos / f"{rel}.avi")
        _write(videos / f"{rel}.avi.labels", labels)
    _write(root / "segmentation_coarse" / "tea" / "P50_cam01_P50_tea.txt", TEA)  # its video is missing

    cfg = tiny_config(root, tmp_path / "cache", dataset={"name": "breakfast"})
    index = load_dataset(cfg)
    assert all(it.meta["fps"] == 15 and it.meta["fps_from"] == "video" for it in index.items if it.path.exists())
    summary = extract(cfg, progress=False)
    assert summary.done == 4 and list(summary.failures) == ["P50_cam01_P50_tea"]
    group, info = schema.open_cache(summary.store)
    assert summary.store.parent.name == "breakfast"
    assert info.video_ids == [
        "P03_cam01_P03_cereals",
        "P03_stereo01_P03_cereals",
        "P47_webcam01_P47_tea",
        "P48_cam02_P48_tea",
        "P50_cam01_P50_tea",
    ]
    assert info.splits == ["train", "train", "test", "test", "test"]
    vocab = info.attrs["vocabularies"]
    assert vocab["atomic"]["prompts"][vocab["atomic"]["names"].index("stir_cereals")] == "stir cereals"
    assert vocab["activity"]["prompts"][0] == "making a bowl of cereals"
    assert np.asarray(group["labels/activity"][:]).tolist() == [0, 0, 9, 9, 9]
    hot = np.asarray(group["labels/atomic"][:])
    assert hot.shape == (5, 48) and [np.asarray(vocab["atomic"]["names"])[h].tolist() for h in hot[:1]] == [
        ["SIL", "pour_cereals", "pour_milk", "stir_cereals", "take_bowl"]
    ]
    assert group["text/atomic"].shape[0] == 48 and group["text/activity"].shape[0] == 10
    done = np.asarray(group[schema.DONE][:])
    assert done.tolist() == [True, True, True, True, False]
    assert (np.asarray(group[schema.FPS][:])[done] == 15).all()
