"""Adapters for the benchmarks as they are distributed: Breakfast, COIN and Charades.

Each is a registered dataset (`dataset.name`) that reads `dataset.root` exactly as downloaded and
returns a `DatasetIndex`, like the manifest reader: malformed lines and entries are reported with
file:line and skipped, labels outside the vocabulary are reported and ignored, and a video whose
file is missing is reported and kept, so extraction records it as failed. Class ids stay the
vocabulary's names; readable prompts for the text encoder are stored beside them.

Breakfast (Kuehne et al. 2014)  root/
    BreakfastII_15fps_qvga_sync/P03/cam01/P03_cereals.avi (+ P03_cereals.avi.labels)
    BreakfastII_15fps_qvga_sync/P03/stereo/P03_cereals_ch0.avi, ..._ch1.avi
    segmentation_coarse/[<activity>/]P03_cam01_P03_cereals.txt   (`1-30 SIL` lines, 1-based frames)
COIN (Tang et al. 2019)  root/COIN.json + root/videos/<recipe_type>/<id>.mp4 (or root/<id>.mp4)
Charades (Sigurdsson et al. 2016)  root/[Charades/]Charades_v1_{train,test}.csv,
    Charades_v1_classes.txt + root/Charades_v1_480/<id>.mp4 (or root/<id>.mp4)
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.contract.config import Config, register_validator
from extract.datasets import DatasetError, DatasetIndex, ProblemLog, VideoItem, Vocabulary, register_dataset

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")  # preference order when one id has several files


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

_WORDS = {"saltnpepper": "salt and pepper", "stirfry": "stir-fry"}


def readable(name: str) -> str:
    """A class name as words: `stir_milk` -> `stir milk`, `put_toppingOnTop` -> `put topping on top`,
    `put_egg2plate` -> `put egg to plate`, `add_saltnpepper` -> `add salt and pepper`."""
    words = []
    for part in name.replace("-", "_").split("_"):
        part = re.sub(r"(?<=[a-z])2(?=[a-z])", " to ", part)  # Breakfast's `put_fruit2bowl`
        part = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", part).lower()  # camelCase
        words += [_WORDS.get(w, w) for w in part.split()]
    return " ".join(words)


def camel_words(name: str) -> str:
    """COIN's task names as words, acronyms kept: `ReplaceCDDriveWithSSD` -> `replace CD drive with SSD`."""
    tokens = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    if not tokens:
        return name
    return " ".join(t if len(t) > 1 and t.isupper() else t.lower() for t in tokens)


def _video_files(folders: Iterable[Path], recursive: Iterable[Path] = ()) -> dict[str, Path]:
    """Video file stem -> path over `folders`, those in `recursive` with their subfolders (earlier
    folders, then earlier extensions, win)."""
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    recursive = set(recursive)
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        chosen: dict[str, Path] = {}
        for path in sorted(folder.rglob("*") if folder in recursive else folder.iterdir()):
            ext = path.suffix.lower()
            if ext in rank and not path.name.startswith(".") and path.is_file():
                old = chosen.get(path.stem)
                if old is None or rank[ext] < rank[old.suffix.lower()]:
                    chosen[path.stem] = path
        for stem, path in chosen.items():
            found.setdefault(stem, path)
    return found


def _video_fps(path: Path) -> float | None:
    """The video stream's frame rate from the container header (no frame decoded), None if unreadable."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return float(rate) if rate else None
    except (av.error.FFmpegError, OSError, IndexError, ValueError):
        return None  # extraction reports the unreadable file; the index falls back to dataset.fps


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and abs(out) != float("inf") else None


def _visible(paths: Iterable[Path]) -> list[Path]:
    """Sorted, without hidden files (archives unpacked on macOS carry `._name` twins)."""
    return sorted(p for p in paths if not p.name.startswith("."))


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


# ---------------------------------------------------------------------------------------------
# Breakfast
# ---------------------------------------------------------------------------------------------

BREAKFAST_ACTIVITIES = (
    "cereals",
    "coffee",
    "friedegg",
    "juice",
    "milk",
    "pancake",
    "salat",
    "sandwich",
    "scrambledegg",
    "tea",
)
# The dishes as the dataset's paper names them ("salat" is the archive's German spelling).
BREAKFAST_ACTIVITY_PROMPTS = {
    "cereals": "making a bowl of cereals",
    "coffee": "making coffee",
    "friedegg": "frying eggs",
    "juice": "making orange juice",
    "milk": "making chocolate milk",
    "pancake": "making pancakes",
    "salat": "making fruit salad",
    "sandwich": "making a sandwich",
    "scrambledegg": "making scrambled eggs",
    "tea": "making tea",
}
# The 48 coarse unit actions of segmentation_coarse (47 + the background SIL), sorted.
BREAKFAST_ACTIONS = tuple(
    sorted(
        (
            "SIL add_saltnpepper add_teabag butter_pan crack_egg cut_bun cut_fruit cut_orange fry_egg "
            "fry_pancake peel_fruit pour_cereals pour_coffee pour_dough2pan pour_egg2pan pour_flour pour_juice "
            "pour_milk pour_oil pour_sugar pour_water put_bunTogether put_egg2plate put_fruit2bowl "
            "put_pancake2plate put_toppingOnTop smear_butter spoon_flour spoon_powder spoon_sugar squeeze_orange "
            "stir_cereals stir_coffee stir_dough stir_egg stir_fruit stir_milk stir_tea stirfry_egg take_bowl "
            "take_butter take_cup take_eggs take_glass take_knife take_plate take_squeezer take_topping"
        ).split()
    )
)
# Test persons of the four official folds; the other 39 persons train.
BREAKFAST_FOLDS = {
    "s1": range(3, 16),
    "s2": range(16, 29),
    "s3": range(29, 42),
    "s4": range(42, 55),
}
# Timeception / VideoGraph / CMDCL: the first 44 of the 52 persons (P03..P54) train, the last 8 test.
BREAKFAST_PERSON_TRAIN = range(3, 47)
BREAKFAST_SPLITS = (*BREAKFAST_FOLDS, "person")

_BF_ID = re.compile(
    r"(?P<person>P\d+)[_/-](?P<camera>[A-Za-z]+\d*)[_/-](?P<person2>P\d+)_(?P<activity>[A-Za-z]+)(?:_ch(?P<ch>\d))?"
)
_BF_SUFFIXES = (".avi.labels", ".labels", ".txt", *VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class BreakfastKey:
    """One Breakfast recording: person, camera (`cam01`, `webcam02`, `stereo01`) and activity."""

    person: str
    camera: str
    activity: str
    channel: int | None = None  # stereo channel named in the file (ch0/ch1), else None

    @property
    def id(self) -> str:
        """The id of segmentation_coarse and the MS-TCN/Timeception lists: `P03_cam01_P03_cereals`."""
        return f"{self.person}_{self.camera}_{self.person}_{self.activity}"

    @property
    def stereo(self) -> bool:
        return self.camera.startswith("stereo")

    def video_path(self, video_dir: Path, channel: int, ext: str = ".avi") -> Path:
        """Where the distributed archive keeps this recording (`P03/stereo/P03_cereals_ch0.avi`)."""
        if self.stereo:
            return video_dir / self.person / "stereo" / f"{self.person}_{self.activity}_ch{channel}{ext}"
        return video_dir / self.person / self.camera / f"{self.person}_{self.activity}{ext}"


def parse_breakfast_id(text: str) -> BreakfastKey | None:
    """Any id or path style of one Breakfast video -> its key, None if `text` names no Breakfast video.

    `P03_cam01_P03_cereals`, `P03-cam01-P03_cereals`, `P03/cam01/P03_cereals.avi`,
    `P03_stereo01_P03_cereals.txt` and `P03/stereo/P03_cereals_ch0.avi` all resolve; the stereo camera
    is `stereo01` in ids whatever its channel.
    """
    text = text.strip().replace("\\", "/")
    if "/" in text:
        text = "/".join(text.split("/")[-3:])
    for suffix in _BF_SUFFIXES:
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)]
            break
    m = _BF_ID.fullmatch(text)
    if m is None or m["person"] != m["person2"]:
        return None
    camera = "stereo01" if m["camera"].lower().startswith("stereo") else m["camera"]
    return BreakfastKey(m["person"], camera, m["activity"], int(m["ch"]) if m["ch"] is not None else None)


@dataclass
class _Annotation:
    source: Path
    segments: list[tuple[int, int, str, int]]  # (first frame, last frame, unit action, line), 1-based inclusive


def _read_breakfast_segments(path: Path, report: ProblemLog) -> list[tuple[int, int, str, int]]:
    """`start-end label` lines (1-based inclusive frame numbers; trailing spaces allowed)."""
    out = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)\s+(\S+)", text)
        if m is None:
            report.add(
                "malformed", f"{path}:{lineno}: expected `start-end label` (frame numbers), got {text!r}; line skipped"
            )
            continue
        s, e = int(m[1]), int(m[2])
        if s < 1 or e < s:
            report.add(
                "malformed",
                f"{path}:{lineno}: segment {s}-{e} is empty (frames are 1-based, the end inclusive); line skipped",
            )
            continue
        out.append((s, e, m[3], lineno))
    return out


def _breakfast_annotations(
    files: Iterable[Path], annotations: dict[str, _Annotation], report: ProblemLog, channel: int
) -> None:
    """Add each annotation file to `annotations` by video id; the first source of an id wins."""
    for path in files:
        key = parse_breakfast_id(path.name if path.suffix == ".txt" else "/".join(path.parts[-3:]))
        if key is None:
            report.add("malformed", f"{path}:1: not a Breakfast annotation name (P03_cam01_P03_cereals.txt); skipped")
            continue
        if key.stereo and key.channel is not None and key.channel != channel and key.id in annotations:
            continue  # the other stereo channel's copy of the same labels
        segments = _read_breakfast_segments(path, report)
        old = annotations.get(key.id)
        if old is None:
            annotations[key.id] = _Annotation(path, segments)
        elif [s[:3] for s in old.segments] != [s[:3] for s in segments]:
            report.add("duplicate", f"{path}:1: annotation of {key.id!r} differs from {old.source}; that one is used")


def _breakfast_split(cfg: Config, root: Path, keys: dict[str, BreakfastKey], report: ProblemLog) -> Callable:
    """BreakfastKey -> `train` / `test` under dataset.split."""
    scheme = cfg.dataset.split or "person"
    if scheme == "person":
        return lambda k: "train" if int(k.person[1:]) in BREAKFAST_PERSON_TRAIN else "test"
    if scheme in BREAKFAST_FOLDS:
        fold = BREAKFAST_FOLDS[scheme]
        return lambda k: "test" if int(k.person[1:]) in fold else "train"
    path = _split_file(scheme, root)
    if path is None:
        raise DatasetError(
            f"dataset.split: {scheme!r} is neither a Breakfast split {list(BREAKFAST_SPLITS)} "
            "nor a file listing the test videos"
        )
    test: set[str] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key = parse_breakfast_id(line.split()[0])
        if key is None:
            report.add("malformed", f"{path}:{lineno}: {line.strip()!r} names no Breakfast video; line skipped")
        elif key.id not in keys:
            report.add("other", f"{path}:{lineno}: test video {key.id!r} is not in the dataset; ignored")
        else:
            test.add(key.id)
    return lambda k: "test" if k.id in test else "train"


def _split_file(name: str, root: Path) -> Path | None:
    p = Path(name)
    return _first_existing(p, root / p) if p.suffix or "/" in name else None


@register_dataset("breakfast")
def breakfast_dataset(cfg: Config) -> DatasetIndex:
    """Breakfast Actions as distributed; tasks `activity` (10, single-label) and `atomic` (48 unit
    actions incl. SIL, multi-label; 47 with dataset.include_sil false)."""
    root = Path(cfg.dataset.root)
    if not root.is_dir():
        raise DatasetError(f"dataset.root {root} is not a folder; point it at the Breakfast download")
    video_dir = root / "BreakfastII_15fps_qvga_sync"
    video_dir = video_dir if video_dir.is_dir() else root
    coarse = root / "segmentation_coarse"
    channel = cfg.dataset.stereo_channel
    report = ProblemLog()

    annotations: dict[str, _Annotation] = {}
    coarse_files = _visible(coarse.rglob("*.txt")) if coarse.is_dir() else []
    label_files = _visible(video_dir.glob("*/*/*.avi.labels"))
    if not coarse_files and not label_files:
        raise DatasetError(
            f"{root} holds no Breakfast annotation: expected segmentation_coarse/**/*.txt or "
            "BreakfastII_15fps_qvga_sync/P03/cam01/P03_cereals.avi.labels"
        )
    _breakfast_annotations(coarse_files, annotations, report, channel)
    _breakfast_annotations(label_files, annotations, report, channel)

    keys: dict[str, BreakfastKey] = {}
    videos: dict[str, Path] = {}
    for path in _visible(p for p in video_dir.glob("*/*/*") if p.suffix.lower() in VIDEO_EXTENSIONS):
        key = parse_breakfast_id("/".join(path.parts[-3:]))
        if key is None:
            report.add("other", f"{path}: not a Breakfast video name (P03/cam01/P03_cereals.avi); ignored")
        elif not key.stereo or key.channel == channel:  # the other stereo channel is left out by choice
            keys.setdefault(key.id, key)
            videos.setdefault(key.id, path)
    for vid in annotations:
        keys.setdefault(vid, parse_breakfast_id(vid))  # ids parse by construction
    split_of = _breakfast_split(cfg, root, keys, report)

    actions = tuple(a for a in BREAKFAST_ACTIONS if cfg.dataset.include_sil or a != "SIL")
    known = set(actions)
    items = []
    for vid in sorted(keys):
        key = keys[vid]
        ann = annotations.get(vid)
        if ann is None:
            report.add(
                "unlabelled",
                f"{videos[vid]}: video {vid!r} has no annotation (neither segmentation_coarse/**/{vid}.txt "
                "nor a .avi.labels file beside it); skipped",
            )
            continue
        labels: dict[str, Any] = {}
        if key.activity in BREAKFAST_ACTIVITIES:
            labels["activity"] = key.activity
        else:
            report.add(
                "unknown",
                f"{ann.source}:1: activity {key.activity!r} (from the file name) is not one of the "
                f"{len(BREAKFAST_ACTIVITIES)} Breakfast activities; the video has no activity label",
            )
        atomic = set()
        for _, _, label, lineno in ann.segments:
            if label in known:
                atomic.add(label)
            elif label != "SIL":  # SIL is left out by dataset.include_sil, not unknown
                report.add(
                    "unknown",
                    f"{ann.source}:{lineno}: unit action {label!r} is not one of the {len(actions)} "
                    "Breakfast unit actions; ignored",
                )
        if not ann.segments:
            report.add("other", f"{ann.source}: no segments; video {vid!r} is kept with no unit actions")
        labels["atomic"] = tuple(a for a in actions if a in atomic)
        path = videos.get(vid) or key.video_path(video_dir, channel)
        fps = _video_fps(path) if path.exists() else None
        if not path.exists():
            report.add(
                "missing", f"{ann.source}: video {vid!r} has no file at {path}; extraction will record it as failed"
            )
        rate = fps or cfg.dataset.fps
        meta = {
            "person": key.person,
            "camera": key.camera,
            "fps": rate,
            "fps_from": "video" if fps else "dataset.fps",
            "annotation": str(ann.source),
            # (start s, end s, label): frame f (1-based) covers [(f - 1) / fps, f / fps)
            "segments": [((s - 1) / rate, e / rate, label) for s, e, label, _ in ann.segments],
        }
        if key.stereo:
            meta["channel"] = channel
        items.append(VideoItem(vid, path, split_of(key), labels, None, meta))

    vocabularies = {
        "activity": Vocabulary(
            "activity",
            BREAKFAST_ACTIVITIES,
            False,
            tuple(BREAKFAST_ACTIVITY_PROMPTS[a] for a in BREAKFAST_ACTIVITIES),
        ),
        "atomic": Vocabulary("atomic", actions, True, tuple(readable(a) for a in actions)),
    }
    return report.index(items, vocabularies)


# ---------------------------------------------------------------------------------------------
# COIN
# ---------------------------------------------------------------------------------------------

COIN_SUBSETS = {"training": "train", "testing": "test", "validation": "val"}


def _json_key_lines(text: str) -> dict[str, int]:
    """Line of each key that opens an object in a JSON text (`"LtRSn-ntcLY": {`), first occurrence."""
    lines: dict[str, int] = {}
    newlines = [m.start() for m in re.finditer("\n", text)]
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:\s*\{', text):
        lines.setdefault(m[1], bisect.bisect_left(newlines, m.start()) + 1)
    return lines


def _coin_steps(entry: dict, where: str, vid: str, report: ProblemLog, step_names: dict[str, str]) -> list:
    """Valid (start, end, step id) of one video's `annotation`; step_names gathers id -> label."""
    annotation = entry.get("annotation") or []
    if not isinstance(annotation, list):
        report.add("malformed", f"{where}: video {vid!r}: `annotation` is not a list; its steps are skipped")
        return []
    out = []
    for i, step in enumerate(annotation):
        at = f"{where}: video {vid!r} annotation[{i}]"
        segment = step.get("segment") if isinstance(step, dict) else None
        if not isinstance(step, dict) or "id" not in step or "label" not in step or not isinstance(segment, list):
            report.add("malformed", f"{at}: expected {{id, segment: [start, end], label}}; step skipped")
            continue
        s, e = (_number(v) for v in segment) if len(segment) == 2 else (None, None)
        if s is None or e is None:
            report.add("malformed", f"{at}: segment {segment!r} is not [start, end] in seconds; step skipped")
            continue
        if s >= e:
            report.add("malformed", f"{at}: segment [{s}, {e}] starts at or after its end; step skipped")
            continue
        sid, label = str(step["id"]).strip(), str(step["label"]).strip()
        old = step_names.setdefault(sid, label)
        if old != label:
            report.add("other", f"{at}: step {sid} is labelled {label!r} here but {old!r} before; {old!r} is used")
        out.append((s, e, sid))
    return out


@register_dataset("coin")
def coin_dataset(cfg: Config) -> DatasetIndex:
    """COIN as distributed; tasks `task` (180 classes, the `class` field) and `steps` (multi-label over
    the step ids of `annotation`, 778 in COIN.json; prompts are the step labels)."""
    root = Path(cfg.dataset.root)
    source = _first_existing(root / "COIN.json", *sorted(root.glob("*/COIN.json")))
    if source is None:
        raise DatasetError(f"{root} holds no COIN.json (looked in it and its subfolders); point dataset.root at COIN")
    text = source.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise DatasetError(f"{source}: expected an object with a `database` mapping of video ids to entries")
    lines = _json_key_lines(text)
    videos = _video_files([root / "videos", root], recursive=[root / "videos"])
    report = ProblemLog()
    items, step_names, task_ids = [], {}, {}
    for vid, entry in database.items():
        where = f"{source}:{lines.get(vid, 1)}"
        if not isinstance(entry, dict) or not entry.get("class") or "subset" not in entry:
            report.add("malformed", f"{where}: video {vid!r} lacks `class` or `subset`; skipped")
            continue
        split = COIN_SUBSETS.get(str(entry["subset"]).strip().lower())
        if split is None:
            report.add(
                "malformed", f"{where}: video {vid!r} has subset {entry['subset']!r}, not one of {list(COIN_SUBSETS)}"
            )
            continue
        task = str(entry["class"]).strip()
        recipe = entry.get("recipe_type")
        task_ids.setdefault(task, _number(recipe) if recipe is not None else float("inf"))
        steps = _coin_steps(entry, where, vid, report, step_names)
        region = None
        start, end = _number(entry.get("start")), _number(entry.get("end"))
        if start is not None and end is not None:
            if start < end:
                region = (start, end)
            else:
                report.add(
                    "malformed", f"{where}: video {vid!r} region [{start}, {end}] is empty; the whole video is used"
                )
        path = videos.get(vid) or root / "videos" / str(recipe if recipe is not None else task) / f"{vid}.mp4"
        if not path.exists():
            report.add("missing", f"{where}: video {vid!r} has no file at {path}; extraction will record it as failed")
        meta = {
            "recipe_type": recipe,
            "duration": entry.get("duration"),
            "video_url": entry.get("video_url"),
            "segments": steps,
        }
        labels = {"task": task, "steps": tuple(sorted({s for _, _, s in steps}, key=_step_order))}
        items.append(VideoItem(str(vid), path, split, labels, region, meta))
    tasks = tuple(sorted(task_ids, key=lambda t: (task_ids[t] if task_ids[t] is not None else float("inf"), t)))
    steps = tuple(sorted(step_names, key=_step_order))
    vocabularies = {
        "task": Vocabulary("task", tasks, False, tuple(camel_words(t) for t in tasks)),
        "steps": Vocabulary("steps", steps, True, tuple(step_names[s] for s in steps)),
    }
    return report.index(items, vocabularies)


def _step_order(step_id: str) -> tuple:
    return (0, int(step_id), "") if step_id.isdigit() else (1, 0, step_id)


# ---------------------------------------------------------------------------------------------
# Charades
# ---------------------------------------------------------------------------------------------

CHARADES_FILES = {"train": "Charades_v1_train.csv", "test": "Charades_v1_test.csv"}
CHARADES_META = ("subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions")


def _charades_classes(path: Path, report: ProblemLog) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class ids, names) of Charades_v1_classes.txt (`c000 Holding some clothes`)."""
    ids, names = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(c\d+)\s+(.+?)\s*", line)
        if m is None:
            report.add("malformed", f"{path}:{lineno}: expected `c000 class name`, got {line.strip()!r}; line skipped")
        elif m[1] in ids:
            report.add("duplicate", f"{path}:{lineno}: class {m[1]} is listed twice; line skipped")
        else:
            ids.append(m[1])
            names.append(m[2])
    return tuple(ids), tuple(names)


def _csv_records(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line, cells) of each record; a quoted cell may span lines."""
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        records, line = [], 1
        for cells in reader:
            records.append((line + 1, cells))
            line = reader.line_num
    return header, records


def _charades_actions(
    text: str, length: float, where: str, classes: set[str], report: ProblemLog
) -> tuple[list[tuple[float, float, str]], set[str], int]:
    """(start, end, class) of each valid interval of an `actions` cell, clamped to [0, length]; the set of
    classes it lists (every known class, whatever its interval: the official video-level ground truth); and
    the clamp count."""
    kept = "its interval is skipped, the class is kept as a label"
    out, listed, clamped = [], set(), 0
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        tokens = part.split()
        known = tokens[0] in classes
        if known:
            listed.add(tokens[0])  # a label even when its interval is bad below
        s, e = (_number(t) for t in tokens[1:]) if len(tokens) == 3 else (None, None)
        if s is None or e is None:
            then = kept if known else "skipped"
            report.add("malformed", f"{where}: action {part!r} is not `class start end`; {then}")
            continue
        if not known:
            report.add("unknown", f"{where}: action class {tokens[0]!r} is not in Charades_v1_classes.txt; ignored")
            continue
        if s >= e:
            report.add("malformed", f"{where}: action {part!r} starts at or after its end; {kept}")
            continue
        cs, ce = max(s, 0.0), min(e, length)
        if cs >= ce:
            report.add("malformed", f"{where}: action {part!r} lies outside the video (length {length:g} s); {kept}")
            continue
        clamped += (cs, ce) != (s, e)
        out.append((cs, ce, tokens[0]))
    return out, listed, clamped


@register_dataset("charades")
def charades_dataset(cfg: Config) -> DatasetIndex:
    """Charades as distributed; task `actions` (157 classes, multi-label; prompts are the class names of
    Charades_v1_classes.txt). A video's labels are every class its `actions` lists, whatever the interval, as
    the official video-level ground truth counts them (a class repeated counts once); bad intervals leave
    only the segments."""
    root = Path(cfg.dataset.root)
    folder = next((d for d in (root, root / "Charades") if (d / "Charades_v1_classes.txt").exists()), None)
    if folder is None:
        raise DatasetError(
            f"{root} holds no Charades_v1_classes.txt (looked in it and in Charades/); "
            "point dataset.root at the folder with the Charades annotations"
        )
    report = ProblemLog()
    ids, names = _charades_classes(folder / "Charades_v1_classes.txt", report)
    order = {c: i for i, c in enumerate(ids)}
    sources = {split: folder / name for split, name in CHARADES_FILES.items()}
    if not any(p.exists() for p in sources.values()):
        raise DatasetError(f"{folder} holds neither {' nor '.join(CHARADES_FILES.values())}")
    video_dirs = [root / "Charades_v1_480", root / "Charades_v1", root]
    videos = _video_files(video_dirs)
    default_dir = _first_existing(*video_dirs[:2]) or root / "Charades_v1_480"
    items, seen = [], set()
    for split, path in sources.items():
        if not path.exists():
            report.add("other", f"{path} does not exist; the {split} split is empty")
            continue
        header, records = _csv_records(path)
        missing = [c for c in ("id", "actions", "length") if c not in header]
        if missing:
            raise DatasetError(f"{path}:1: the header lacks column(s) {missing}; it names {header}")
        col = {h: i for i, h in enumerate(header)}
        clamped, first_clamp = 0, 0
        for lineno, cells in records:
            where = f"{path}:{lineno}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                report.add("malformed", f"{where}: {len(cells)} fields for {len(header)} columns; line skipped")
                continue
            row = {h: cells[i].strip() for h, i in col.items()}
            vid, length = row["id"], _number(row["length"])
            if not vid or length is None or length <= 0:
                report.add("malformed", f"{where}: needs an id and a positive length, got {vid!r}, {row['length']!r}")
                continue
            if vid in seen:
                report.add("duplicate", f"{where}: duplicate video id {vid!r}; line skipped")
                continue
            seen.add(vid)
            segments, listed, n = _charades_actions(row["actions"], length, where, set(order), report)
            if n and not clamped:
                first_clamp = lineno
            clamped += n
            video = videos.get(vid) or default_dir / f"{vid}.mp4"
            if not video.exists():
                report.add(
                    "missing", f"{where}: video {vid!r} has no file at {video}; extraction will record it as failed"
                )
            labels = {"actions": tuple(sorted(listed, key=order.__getitem__))}
            meta = {k: row[k] for k in CHARADES_META if k in row}
            meta.update(length=length, segments=segments)
            items.append(VideoItem(vid, video, split, labels, None, meta))
        if clamped:
            report.add(
                "other",
                f"{path}:{first_clamp}: {clamped} action interval(s) here and below reach past the video's length "
                "and were clamped to it",
            )
    vocabularies = {"actions": Vocabulary("actions", ids, True, names)}
    return report.index(items, vocabularies)


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------


def _check_split(cfg: Config) -> list[str]:
    """dataset.split names a scheme of the configured dataset (only Breakfast has several)."""
    d = cfg.dataset
    if d.split is None:
        return []
    if d.name != "breakfast":
        return [f"dataset.split: the {d.name} dataset takes its split from its annotation files; set it to null"]
    if d.split in BREAKFAST_SPLITS or _split_file(d.split, Path(d.root)) is not None:
        return []
    return [
        f"dataset.split: {d.split!r} is neither a Breakfast split {list(BREAKFAST_SPLITS)} "
        "nor an existing file listing the test videos (one id per line)"
    ]


register_validator(_check_split)
