"""Dataset registry and the generic manifest reader.

Every adapter yields `VideoItem`s (`id, path, split, labels, region, meta`) and the label
vocabularies of its tasks. The synthetic generator writes a `manifest.jsonl` + `classes.json`, so
the `synthetic` dataset is the manifest reader pointed at `data/synthetic`. The benchmarks' own
formats (Breakfast, COIN, Charades) are read by the adapters in `extract/adapters.py`.

manifest.jsonl — one JSON object per line:
    {"id": "train_00000", "path": "videos/train/train_00000.mp4", "split": "train",
     "labels": {"activity": "make_pancake", "atomic": ["crack_egg", "whisk"]},
     "region": null, ...any further fields kept in `meta` (fps, num_frames, segments, scene)}
classes.json (optional, beside it): {"activity": [names...], "atomic": [names...]}; without it the
vocabulary of each task is the sorted set of labels seen in the manifest.

manifest.csv — the same as a table: columns id, path, split, then one column per task; a multi-label
task's cell holds its labels separated by `;` (a `[]` after the column name, `atomic[]`, marks a task
multi-label even where every cell holds one label); optional `start`/`end` columns give the region.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.contract.config import Config, register_choices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoItem:
    id: str  # unique within the dataset; the cache's row key
    path: Path  # absolute or relative to the working directory
    split: str  # train, test_iid, test_ood, val, test, ...
    labels: dict[str, Any]  # task -> class name (single-label) or tuple of names (multi-label)
    region: tuple[float, float] | None = None  # (start, end) seconds to sample from, None = whole video
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # fps, segments, scene, ...


@dataclass(frozen=True)
class Vocabulary:
    task: str  # activity, atomic, ...
    names: tuple[str, ...]  # class names, index = class id
    multi_label: bool  # True: multi-hot labels (BCE, mAP); False: one class per video (CE, Acc@k)
    # text for the text encoder, index = class id (`c092` -> `Holding some clothes`); None = from names
    prompts: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.prompts is not None and len(self.prompts) != len(self.names):
            raise ValueError(f"task {self.task!r}: {len(self.prompts)} prompts for {len(self.names)} classes")

    def prompt_name(self, i: int) -> str:
        """Readable text for class `i`: its prompt, else its name (`stir_milk` -> `stir milk`)."""
        return self.prompts[i] if self.prompts is not None else self.names[i].replace("_", " ")


@dataclass
class DatasetIndex:
    items: list[VideoItem]
    vocabularies: dict[str, Vocabulary]
    problems: list[str]  # malformed lines, missing files, unknown labels: reported, then skipped
    counts: dict[str, int] = field(default_factory=dict)  # problems by kind (see ProblemLog), for the summary
    # what identifies the content beyond the video files themselves (the synthetic world's hash); in the fingerprint
    source: dict[str, Any] = field(default_factory=dict)
    # activity classes made of the same actions in another order (the synthetic world names them); the store keeps
    # them for stage 2's order confusion (not in the fingerprint: the world hash covers them)
    same_set_pairs: list[tuple[str, str]] = field(default_factory=list)

    def split(self, name: str) -> list[VideoItem]:
        return [it for it in self.items if it.split == name]

    def summary(self) -> str:
        """Videos per split, classes per task, problems by kind:
        `12 videos (4 test, 8 train); activity: 10 classes; 1 missing, 2 malformed; 3 problems`."""
        splits = Counter(it.split for it in self.items)
        parts = [f"{n} {s}" for s, n in sorted(splits.items())]
        vocab = ", ".join(f"{v.task}: {len(v.names)} classes" for v in self.vocabularies.values())
        counts = {"missing": 0, "malformed": 0, **self.counts}
        kinds = ", ".join(f"{n} {ProblemLog.WORDS.get(k, k)}" for k, n in counts.items())
        return f"{len(self.items)} videos ({', '.join(parts)}); {vocab}; {kinds}; {len(self.problems)} problems"


class ProblemLog:
    """What an adapter found wrong, one sentence each (with file:line), counted by kind for the summary."""

    WORDS = {"unknown": "unknown labels", "duplicate": "duplicates", "unlabelled": "without annotation"}

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, message: str) -> None:
        """kind: missing (video file absent; kept), malformed (line or entry skipped), unknown (label
        outside the vocabulary; ignored), duplicate (skipped), unlabelled (video without annotation), or other."""
        self.lines.append(message)
        self.counts[kind] += 1

    def index(self, items: list[VideoItem], vocabularies: dict[str, Vocabulary]) -> DatasetIndex:
        return DatasetIndex(items, vocabularies, self.lines, dict(self.counts))


_DATASETS: dict[str, Callable[[Config], DatasetIndex]] = {}


def register_dataset(name: str):
    def wrap(fn: Callable[[Config], DatasetIndex]):
        _DATASETS[name] = fn
        return fn

    return wrap


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


register_choices("dataset.name", dataset_names)


def load_dataset(cfg: Config) -> DatasetIndex:
    """Index the configured dataset (unknown names list the registered ones)."""
    if cfg.dataset.name not in _DATASETS:
        raise KeyError(f"unknown dataset {cfg.dataset.name!r}; choose from {dataset_names()}")
    index = _DATASETS[cfg.dataset.name](cfg)
    for problem in index.problems:
        log.warning(problem)
    log.info("dataset %s at %s: %s", cfg.dataset.name, cfg.dataset.root, index.summary())
    return index


class DatasetError(RuntimeError):
    """The dataset cannot be indexed at all (missing root or manifest)."""


def known_split(name: str, extra: tuple[str, ...] = ()) -> bool:
    """train, val, test, pretrain (the encoders' own videos), train_* / test_* (train_oracle, test_iid,
    test_ood_scene, ...), or a declared extra."""
    return name in ("train", "val", "test", "pretrain", *extra) or name.startswith(("train_", "test_"))


def read_manifest(manifest: Path, root: Path | None = None, extra_splits: tuple[str, ...] = ()) -> DatasetIndex:
    """Read a manifest.jsonl or manifest.csv; malformed lines and duplicate ids are reported with their
    line number and skipped. A video whose file is missing is reported and kept: extraction records it as
    failed in the cache, so restoring the file later fills its row without changing the fingerprint. A split
    name outside the known ones (`known_split`, `dataset.extra_splits`) is refused: a typo would otherwise
    become a split no stage reads."""
    root = manifest.parent if root is None else root
    if root.exists() and not root.is_dir():
        raise DatasetError(f"dataset.root {root} is a file; set dataset.root to the folder that holds the manifest")
    if not manifest.exists():
        raise DatasetError(
            f"{manifest} does not exist; run `ltar synth` to generate the synthetic dataset "
            "or set dataset.root to a folder holding manifest.jsonl or manifest.csv"
        )
    report = ProblemLog()
    rows = _csv_rows(manifest, report) if manifest.suffix == ".csv" else _jsonl_rows(manifest, report)
    unknown = [(where, str(row["split"])) for where, row in rows if not known_split(str(row["split"]), extra_splits)]
    if unknown:
        import difflib

        where, name = unknown[0]
        known = ["train", "val", "test", "test_iid", "test_ood", "train_oracle", *extra_splits]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(
            f"{where}: split {name!r} is not a known split{hint}; {len(unknown)} line(s) name unknown splits "
            f"({', '.join(sorted({n for _, n in unknown}))}). Known: train, val, test, pretrain and train_* / test_* "
            "names; "
            "fix the manifest, or declare the names in dataset.extra_splits"
        )
    items: list[VideoItem] = []
    seen: set[str] = set()
    for where, row in rows:
        vid = str(row["id"])
        if vid in seen:
            report.add("duplicate", f"{where}: duplicate video id {vid!r}; line skipped")
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else root / path
        if not path.exists():
            report.add("missing", f"{where}: video {vid!r} has no file at {path}; extraction will record it as failed")
        labels = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(row["labels"]).items()}
        region = row.get("region")
        meta = {k: v for k, v in row.items() if k not in ("id", "path", "split", "labels", "region")}
        seen.add(vid)
        items.append(VideoItem(vid, path, str(row["split"]), labels, tuple(region) if region else None, meta))
    vocabularies = _vocabularies(manifest.parent / "classes.json", items, report)
    return report.index(items, vocabularies)


_REQUIRED = ("id", "path", "split")


def _jsonl_rows(manifest: Path, report: ProblemLog) -> list[tuple[str, dict]]:
    """(file:line, record) of every well-formed line of a manifest.jsonl."""
    rows = []
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.add("malformed", f"{where}: not valid JSON ({e.msg}); line skipped")
            continue
        missing = [k for k in (*_REQUIRED, "labels") if k not in row]
        if missing:
            report.add("malformed", f"{where}: missing field(s) {missing}; line skipped")
            continue
        rows.append((where, row))
    return rows


def _csv_rows(manifest: Path, report: ProblemLog) -> list[tuple[str, dict]]:
    """(file:line, record) of every well-formed row of a manifest.csv, in the manifest.jsonl form.

    Columns besides id, path, split, start and end are tasks; a task is multi-label when its header
    ends in `[]` or any of its cells holds a `;`.
    """
    with manifest.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        missing = [k for k in _REQUIRED if k not in header]
        if missing:
            raise DatasetError(f"{manifest}:1: the header lacks column(s) {missing}; it names {header}")
        records, line = [], 1
        for cells in reader:
            records.append((f"{manifest}:{line + 1}", cells))
            line = reader.line_num  # a quoted cell may span lines: the next record starts after this one
    tasks = [h for h in header if h not in (*_REQUIRED, "start", "end")]
    col = {h: i for i, h in enumerate(header)}
    multi = {t: t.endswith("[]") or any(len(c) > col[t] and ";" in c[col[t]] for _, c in records) for t in tasks}
    rows = []
    for where, cells in records:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            report.add("malformed", f"{where}: {len(cells)} cells for {len(header)} columns; line skipped")
            continue
        row = {h: cells[i].strip() for h, i in col.items()}
        if not all(row[k] for k in _REQUIRED):
            report.add("malformed", f"{where}: empty {[k for k in _REQUIRED if not row[k]]}; line skipped")
            continue
        labels: dict[str, Any] = {}
        for t in tasks:
            if multi[t]:
                labels[t.removesuffix("[]")] = [v.strip() for v in row[t].split(";") if v.strip()]
            elif row[t]:
                labels[t] = row[t]
        out = {"id": row["id"], "path": row["path"], "split": row["split"], "labels": labels}
        if row.get("start") or row.get("end"):
            try:
                out["region"] = (float(row["start"]), float(row["end"]))
            except (KeyError, ValueError):
                report.add("malformed", f"{where}: start/end {row.get('start')!r}, {row.get('end')!r} are not numbers")
                continue
        rows.append((where, out))
    return rows


def _vocabularies(classes_file: Path, items: list[VideoItem], report: ProblemLog) -> dict[str, Vocabulary]:
    multi = {}
    seen: dict[str, set[str]] = {}
    kinds: dict[str, dict[bool, list[str]]] = {}  # task -> {is a list: video ids}
    for it in items:
        for task, value in it.labels.items():
            multi[task] = multi.get(task, False) or isinstance(value, tuple)
            seen.setdefault(task, set()).update(value if isinstance(value, tuple) else [value])
            kinds.setdefault(task, {}).setdefault(isinstance(value, tuple), []).append(it.id)
    for task, by in kinds.items():
        if len(by) == 2:  # one label for some videos, a list for others: which kind of task is it?
            raise DatasetError(
                f"{classes_file.parent}: task {task!r} has one label (a string) for {len(by[False])} video(s) (e.g. "
                f"{', '.join(by[False][:3])}) and a list of labels for {len(by[True])} (e.g. "
                f"{', '.join(by[True][:3])}); give every video of a task the same kind: a string for a single-label "
                "task, a list (possibly of one) for a multi-label one"
            )
    declared = {}
    if classes_file.exists():
        try:
            declared = json.loads(classes_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(
                f"{classes_file} is not valid JSON ({e}); it must map each task to its class names, e.g. "
                '{"activity": ["cook", "clean"]}; fix it or remove it to take the labels seen in the manifest'
            ) from None
        bad = not isinstance(declared, dict) or any(
            not isinstance(v, list) or not all(isinstance(n, str) for n in v) for v in declared.values()
        )
        if bad:
            raise DatasetError(
                f"{classes_file} must map each task to a list of class names (strings), e.g. "
                '{"activity": ["cook", "clean"]}; fix it or remove it to take the labels seen in the manifest'
            )
    vocabularies = {}
    for task in sorted(set(seen) | set(declared)):
        names = tuple(declared.get(task) or sorted(seen.get(task, ())))
        unknown = sorted(seen.get(task, set()) - set(names))
        if unknown:
            report.add("unknown", f"{classes_file}: task {task!r} has labels outside its vocabulary: {unknown}")
        vocabularies[task] = Vocabulary(task, names, multi.get(task, False))
    return vocabularies


@register_dataset("manifest")
def manifest_dataset(cfg: Config) -> DatasetIndex:
    """A user's own dataset: `dataset.root` holds manifest.jsonl or manifest.csv (paths relative to it)."""
    root = Path(cfg.dataset.root)
    jsonl, table = root / "manifest.jsonl", root / "manifest.csv"
    extra = tuple(cfg.dataset.extra_splits)
    if table.exists() and not jsonl.exists():
        return read_manifest(table, root, extra)
    index = read_manifest(jsonl, root, extra)
    if table.exists():
        index.problems.append(f"{table}: ignored, {jsonl} is read instead; remove one of the two")
        index.counts["other"] = index.counts.get("other", 0) + 1
    return index


@register_dataset("synthetic")
def synthetic_dataset(cfg: Config) -> DatasetIndex:
    """The embedded synthetic benchmark, as written by `ltar synth` (a manifest dataset).

    The world hash of `world.json` joins the cache fingerprint: another world at the same paths is another cache.
    """
    index = manifest_dataset(cfg)
    world_file = Path(cfg.dataset.root) / "world.json"
    try:
        world = json.loads(world_file.read_text())
        index.source["synthetic_world"] = world.get("config_hash")
        index.same_set_pairs = [(a, b) for a, b in world.get("world", {}).get("same_set_pairs", [])]
    except (OSError, json.JSONDecodeError):
        index.problems.append(f"{world_file}: missing or unreadable; run `ltar synth` to write the synthetic world")
        index.counts["other"] = index.counts.get("other", 0) + 1
    return index


def annotated_segments(index: DatasetIndex) -> bool:
    """Whether any video of the dataset has annotated action segments (`meta["segments"]`)."""
    return any(it.meta.get("segments") for it in index.items)


def segment_mask(items: list[VideoItem], times: Any) -> Any:
    """(B, L) bool: the sampled frame at `times` (B, L) seconds lies inside one of its video's annotated action
    segments ([start, end) seconds, `meta["segments"]`); all False for a video without any."""
    import numpy as np

    times = np.asarray(times, dtype=np.float64)
    width = max([len(it.meta.get("segments") or ()) for it in items] + [1])
    bounds = np.full((len(items), width, 2), np.nan)  # (B, S, 2) [start, end) per segment, NaN = none
    for n, it in enumerate(items):  # per video: the annotation lists have different lengths
        seg = [s[:2] for s in it.meta.get("segments") or ()]
        if seg:
            bounds[n, : len(seg)] = np.asarray(seg, dtype=np.float64)
    start, end = bounds[:, None, :, 0], bounds[:, None, :, 1]  # (B, 1, S)
    inside = (times[:, :, None] >= start) & (times[:, :, None] < end)  # (B, L, S); NaN compares False
    return inside.any(-1)
