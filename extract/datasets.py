"""Dataset registry and the generic manifest reader.

Every adapter yields `VideoItem`s (`id, path, split, labels, region, meta`) and the label
vocabularies of its tasks. The synthetic generator writes a `manifest.jsonl` + `classes.json`, so
the `synthetic` dataset is the manifest reader pointed at `data/synthetic`.

manifest.jsonl — one JSON object per line:
    {"id": "train_00000", "path": "videos/train/train_00000.mp4", "split": "train",
     "labels": {"activity": "make_pancake", "atomic": ["crack_egg", "whisk"]},
     "region": null, ...any further fields kept in `meta` (fps, num_frames, segments, scene)}
classes.json (optional, beside it): {"activity": [names...], "atomic": [names...]}; without it the
vocabulary of each task is the sorted set of labels seen in the manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.config import Config, register_choices

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

    def prompt_name(self, i: int) -> str:
        """Readable text for class `i` (`stir_milk` -> `stir milk`)."""
        return self.names[i].replace("_", " ")


@dataclass
class DatasetIndex:
    items: list[VideoItem]
    vocabularies: dict[str, Vocabulary]
    problems: list[str]  # malformed lines, missing files, unknown labels: reported, then skipped

    def split(self, name: str) -> list[VideoItem]:
        return [it for it in self.items if it.split == name]

    def summary(self) -> str:
        splits: dict[str, int] = {}
        for it in self.items:
            splits[it.split] = splits.get(it.split, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(splits.items())]
        vocab = ", ".join(f"{v.task}: {len(v.names)} classes" for v in self.vocabularies.values())
        return f"{len(self.items)} videos ({', '.join(parts)}); {vocab}; {len(self.problems)} problems"


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
    return index


class DatasetError(RuntimeError):
    """The dataset cannot be indexed at all (missing root or manifest)."""


def read_manifest(manifest: Path, root: Path | None = None) -> DatasetIndex:
    """Read a manifest.jsonl; malformed lines and duplicate ids are reported with their line number
    and skipped. A video whose file is missing is reported and kept: extraction records it as failed
    in the cache, so restoring the file later fills its row without changing the fingerprint."""
    root = manifest.parent if root is None else root
    if not manifest.exists():
        raise DatasetError(
            f"{manifest} does not exist; run `ltar synth` to generate the synthetic dataset "
            "or set dataset.root to a folder holding manifest.jsonl"
        )
    items: list[VideoItem] = []
    problems: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg}); line skipped")
            continue
        missing = [k for k in ("id", "path", "split", "labels") if k not in row]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}; line skipped")
            continue
        vid = str(row["id"])
        if vid in seen:
            problems.append(f"{where}: duplicate video id {vid!r}; line skipped")
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else root / path
        if not path.exists():
            problems.append(f"{where}: video {vid!r} has no file at {path}; extraction will record it as failed")
        labels = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(row["labels"]).items()}
        region = row.get("region")
        meta = {k: v for k, v in row.items() if k not in ("id", "path", "split", "labels", "region")}
        seen.add(vid)
        items.append(VideoItem(vid, path, str(row["split"]), labels, tuple(region) if region else None, meta))
    vocabularies = _vocabularies(manifest.parent / "classes.json", items, problems)
    return DatasetIndex(items, vocabularies, problems)


def _vocabularies(classes_file: Path, items: list[VideoItem], problems: list[str]) -> dict[str, Vocabulary]:
    multi = {}
    seen: dict[str, set[str]] = {}
    for it in items:
        for task, value in it.labels.items():
            multi[task] = multi.get(task, False) or isinstance(value, tuple)
            seen.setdefault(task, set()).update(value if isinstance(value, tuple) else [value])
    declared = json.loads(classes_file.read_text()) if classes_file.exists() else {}
    vocabularies = {}
    for task in sorted(set(seen) | set(declared)):
        names = tuple(declared.get(task) or sorted(seen.get(task, ())))
        unknown = sorted(seen.get(task, set()) - set(names))
        if unknown:
            problems.append(f"{classes_file}: task {task!r} has labels outside its vocabulary: {unknown}")
        vocabularies[task] = Vocabulary(task, names, multi.get(task, False))
    return vocabularies


@register_dataset("manifest")
def manifest_dataset(cfg: Config) -> DatasetIndex:
    """A user's own dataset: `dataset.root` holds manifest.jsonl (paths relative to it)."""
    root = Path(cfg.dataset.root)
    return read_manifest(root / "manifest.jsonl", root)


@register_dataset("synthetic")
def synthetic_dataset(cfg: Config) -> DatasetIndex:
    """The embedded synthetic benchmark, as written by `ltar synth` (a manifest dataset)."""
    return manifest_dataset(cfg)
