"""HDF5 interop: import per-video features we did not extract into a cache store; export any cache array.

Import (`ltar import-h5 FILE --dataset NAME`) reads one HDF5 dataset per video id, `(T, D)`, either
at the file's root or under a group per feature kind (`/clip/<id>`, `/timesformer/<id>`; ids may
themselves hold `/`). `--map KIND=ARRAY` says which cache array a kind fills (defaults in
DEFAULT_MAP; `KIND=skip` ignores one). Each video is resampled to `frames.num_frames` = L slots:
T >= L takes L rows uniformly (the centre row of L equal segments), T < L keeps the T rows and pads
with zeros, `frame_mask` False on the padding. A file written by `export-h5` of a store with the
same L puts every row back into its original slot (the `frame_slots` attribute), so export →
import is exact. `frame_mask` and `timestamps` follow `clip/frame`: its `timestamps` attribute, else
row / `fps` attribute, else the source row index. The dataset index (dataset.name, dataset.root)
gives ids, splits, labels and vocabularies; file ids that match no video are reported.

What a store needs to train (train/data.py reads clip/frame, timesformer/frame, clip/fg, clip/bg,
frame_mask, labels/<task>, text/<task>): `clip/frame` is required (every head scores text against
VP, and it fixes Dc). The rest may be absent and is then zero, listed in the store's provenance
(`imported.zero`) and in the summary: `timesformer/frame` zero → use heads' `visual: clip`;
`clip/fg`/`clip/bg` zero → ECRL's FCM/BCM/BD and a `clip/bg` confounder dictionary carry nothing;
`text/<task>` (from `/text/<task>` `(C, Dc)` in the file) zero → text queries start from zero
(learnable text still trains; frozen-text variants are meaningless); `saliency` is always zero.
`done[i]` is True when video i had a dataset in every array the file provides; a video missing
from one of them (or with no rows, or non-finite values) is recorded in `failures` instead.

Export (`ltar export-h5 STORE ARRAY OUT`) writes `/<array>/<video_id>` per done video (the valid
frames only for per-frame arrays) with attributes `timestamps`, `frame_slots`, `fps`, `split`; a
non-per-video array (`text/<task>`) as one dataset; file attributes: fingerprint, schema_version,
dataset, num_frames, exported_at. Several arrays of one store may share a file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.config import Config
from extract.contract.store import ExtractError, sha256_of
from extract.datasets import DatasetIndex, load_dataset, segment_mask

log = logging.getLogger(__name__)

PER_FRAME = (schema.CLIP_FRAME, schema.CLIP_FG, schema.CLIP_BG, schema.TSF_FRAME)  # (T, D) datasets
TARGETS = (*PER_FRAME, schema.TSF_CLS)  # TSF_CLS takes (D,) datasets
REQUIRED = (schema.CLIP_FRAME,)
SKIP = "skip"
TEXT_GROUP = schema.TEXT  # /text/<task> (C, Dc): class-name embeddings, not a feature kind
ROOT = "/"  # the kind of datasets directly at the file's root
# kind (group path inside the file) -> cache array; the longest kind that prefixes a dataset path wins
DEFAULT_MAP = {
    ROOT: schema.CLIP_FRAME,
    "clip": schema.CLIP_FRAME,
    "clip/frame": schema.CLIP_FRAME,
    "clip/fg": schema.CLIP_FG,
    "clip/bg": schema.CLIP_BG,
    "fg": schema.CLIP_FG,
    "bg": schema.CLIP_BG,
    "timesformer": schema.TSF_FRAME,
    "timesformer/frame": schema.TSF_FRAME,
    "timesformer/cls": schema.TSF_CLS,
}


class H5Error(ExtractError):
    """An HDF5 file that cannot be imported or written as it is; the message names the path inside it."""


# ---------------------------------------------------------------------------------------------
# Reading a feature file
# ---------------------------------------------------------------------------------------------


def parse_map(pairs: list[str]) -> dict[str, str]:
    """`--map KIND=ARRAY` options over DEFAULT_MAP; ARRAY `skip` drops a kind."""
    mapping = dict(DEFAULT_MAP)
    for pair in pairs:
        kind, sep, array = pair.partition("=")
        kind = kind.strip().strip("/") or ROOT
        array = array.strip()
        if not sep or not array:
            raise H5Error(f"--map {pair!r}: expected KIND=ARRAY, e.g. --map clip=clip/frame or --map fg=skip")
        if kind == TEXT_GROUP or kind.startswith(TEXT_GROUP + "/"):
            raise H5Error(f"--map {pair!r}: /{TEXT_GROUP}/<task> holds class-name embeddings and is read as such")
        if array not in (*TARGETS, SKIP):
            raise H5Error(f"--map {pair!r}: unknown cache array {array!r}; choose from {[*TARGETS, SKIP]}")
        mapping[kind] = array
    return {k: v for k, v in mapping.items() if v != SKIP}


@dataclass
class Source:
    """One cache array's datasets in the file."""

    array: str  # cache array it fills
    kind: str  # group path inside the file ("/" for the root)
    paths: dict[str, str] = field(default_factory=dict)  # video id -> dataset path inside the file
    dim: int = 0  # D shared by every dataset


@dataclass
class FileScan:
    sources: dict[str, Source]  # cache array -> its datasets
    text: dict[str, str]  # task -> /text/<task> dataset path
    ignored: dict[str, int]  # top-level group not mapped -> datasets in it


def _kind_of(name: str, kinds: list[str]) -> tuple[str, str] | None:
    """(kind, video id) of a dataset path, by the longest mapped kind that prefixes it."""
    for kind in kinds:  # longest first
        if kind != ROOT and name.startswith(kind + "/"):
            return kind, name[len(kind) + 1 :]
    if ROOT in kinds and "/" not in name:
        return ROOT, name
    return None


def scan_file(file: Path, mapping: dict[str, str]) -> FileScan:
    """List the file's datasets by cache array and check ranks and D; raise H5Error naming the path."""
    import h5py

    if not file.is_file():
        raise H5Error(f"{file} does not exist")
    if not h5py.is_hdf5(file):
        raise H5Error(f"{file} is not an HDF5 file (no HDF5 signature); expected one dataset per video id")
    names: list[tuple[str, tuple[int, ...], np.dtype]] = []
    try:
        with h5py.File(file, "r") as f:
            f.visititems(lambda name, obj: names.append((name, obj.shape, obj.dtype)) if _is_dataset(obj) else None)
    except (OSError, RuntimeError, KeyError) as e:
        where = f" after /{names[-1][0]}" if names else ""
        raise H5Error(f"{file} cannot be read as HDF5 (truncated or damaged?{where}): {e}") from None
    kinds = sorted(mapping, key=len, reverse=True)
    sources: dict[str, Source] = {}
    text: dict[str, str] = {}
    ignored: dict[str, int] = {}
    first: dict[str, str] = {}  # cache array -> first dataset path (for the D mismatch message)
    for name, shape, dtype in names:
        if name.startswith(TEXT_GROUP + "/"):
            text[name[len(TEXT_GROUP) + 1 :]] = name
            continue
        if name in schema.VIDEO_COORDS:  # the id list an export may carry: not a video's features
            continue
        found = _kind_of(name, kinds)
        if found is None:
            top = name.split("/")[0] if "/" in name else ROOT
            ignored[top] = ignored.get(top, 0) + 1
            continue
        kind, vid = found
        array = mapping[kind]
        src = sources.setdefault(array, Source(array, kind))
        if src.kind != kind:
            raise H5Error(
                f"{file}: both /{src.kind.strip('/')} and /{kind.strip('/')} map to {array}; "
                f"choose one with --map {kind}=skip (or map it to another array)"
            )
        rank = 1 if array == schema.TSF_CLS else 2
        want = "(D,): one vector per video" if rank == 1 else "(T, D): one row per frame"
        if len(shape) != rank:
            raise H5Error(f"{file}: /{name} has shape {shape} (rank {len(shape)}); datasets for {array} must be {want}")
        if dtype.kind not in "fiu":
            raise H5Error(f"{file}: /{name} holds {dtype}, not numbers; datasets for {array} must be {want}")
        d = int(shape[-1])
        if src.dim and d != src.dim:
            raise H5Error(
                f"{file}: /{name} has D={d} but /{first[array]} has D={src.dim}; every dataset of kind "
                f"/{kind.strip('/')} ({array}) must have the same feature size"
            )
        src.dim, first[array] = d, first.get(array, name)
        src.paths[vid] = name
    clip_dims = {a: s.dim for a, s in sources.items() if a.startswith("clip/")}
    if len(set(clip_dims.values())) > 1:
        raise H5Error(
            f"{file}: the CLIP arrays must share one feature size Dc, got "
            + ", ".join(f"{a} D={d} (/{first[a]})" for a, d in sorted(clip_dims.items()))
        )
    for req in REQUIRED:
        if req not in sources:
            looked = ", ".join(f"/{k.strip('/')}" for k, a in mapping.items() if a == req)
            raise H5Error(
                f"{file} has no datasets for {req} (looked under {looked or 'no mapped kind'}); it is required "
                f"(every head reads it): map the group that holds it with --map KIND={req}"
            )
    return FileScan(sources, text, ignored)


def _is_dataset(obj: Any) -> bool:
    import h5py

    return isinstance(obj, h5py.Dataset)


def resample_slots(t: int, num_frames: int, slots: np.ndarray | None = None) -> np.ndarray:
    """(L,) source row of each slot, -1 for padding: T >= L uniform, T < L the T rows then padding;
    `slots` (T,) puts each row back into its recorded slot (a file exported with the same L)."""
    out = np.full(num_frames, -1, dtype=np.int64)
    if slots is not None and len(slots) == t and t and slots.min() >= 0 and slots.max() < num_frames:
        out[slots] = np.arange(t)
    elif t >= num_frames:
        out[:] = ((np.arange(num_frames) + 0.5) * t / num_frames).astype(np.int64)  # centres of L segments
    else:
        out[:t] = np.arange(t)
    return out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    store: Path
    total: int
    imported: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # video id -> reason
    provided: dict[str, str] = field(default_factory=dict)  # cache array -> kind in the file
    zero: list[str] = field(default_factory=list)  # arrays the file does not provide
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # kind -> file ids matching no video
    ignored: dict[str, int] = field(default_factory=dict)  # unmapped group -> datasets
    text: list[str] = field(default_factory=list)  # tasks with text embeddings from the file

    def lines(self) -> list[str]:
        out = [
            f"store: {self.store}",
            f"videos: {self.imported} imported, {len(self.failures)} failed (of {self.total})",
            "from the file: " + ", ".join(f"{a} (/{k.strip('/')})" for a, k in sorted(self.provided.items())),
            "zero (not in the file): " + ", ".join(self.zero),
        ]
        for kind, ids in sorted(self.unmatched.items()):
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            out.append(f"ids under /{kind.strip('/')} that match no video of the dataset: {len(ids)} ({shown})")
        for top, count in sorted(self.ignored.items()):
            out.append(f"not imported: /{top.strip('/')} ({count} datasets); map it with --map {top}=ARRAY")
        out += [f"failed: {vid}: {reason}" for vid, reason in sorted(self.failures.items())]
        return out


def import_h5(cfg: Config, file: str | Path, mapping: list[str] | None = None, index: DatasetIndex | None = None):
    """Ingest a per-video HDF5 feature file into a new cache store of the schema; returns ImportSummary."""
    import h5py

    from extract.contract.locate import check_cache_root
    from extract.contract.lock import acquire_lock
    from extract.contract.store import contiguous_runs, create_store, write_rows
    from extract.pipeline import _labels, store_attrs, write_video_coordinates

    check_cache_root(cfg)
    file = Path(file).resolve()
    kinds = parse_map(mapping or [])
    scan = scan_file(file, kinds)
    index = index or load_dataset(cfg)
    if not index.items:
        raise schema.CacheError(f"dataset {cfg.dataset.name!r} at {cfg.dataset.root} has no videos")
    n, L = len(index.items), cfg.frames.num_frames
    sha = sha256_of(file)
    used = {s.kind: a for a, s in scan.sources.items()}
    payload = {
        "schema": schema.FEATURES_VERSION,  # an upgraded store keeps its name
        "imported": sha,
        "mapping": used,
        "num_frames": L,
        "dataset": cfg.dataset.name,
        "items": [
            [it.id, it.split, {k: list(v) if isinstance(v, tuple) else v for k, v in it.labels.items()}]
            for it in index.items
        ],
    }
    fp = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = schema.store_path(cfg.cache.root, cfg.dataset.name, fp)
    dc = scan.sources[schema.CLIP_FRAME].dim
    tsf = scan.sources.get(schema.TSF_FRAME) or scan.sources.get(schema.TSF_CLS)
    dv = tsf.dim if tsf else dc  # no TimeSformer features: zero arrays of the CLIP size
    sizes = schema.Sizes(n, L, dc, dv, 1)  # saliency is not imported: (N, L, 1, 1) zeros
    tasks = {t: (len(v.names), v.multi_label) for t, v in index.vocabularies.items()}
    summary = ImportSummary(path, total=n, ignored=scan.ignored)
    summary.provided = {a: s.kind for a, s in scan.sources.items()}
    summary.zero = [a for a in TARGETS if a not in scan.sources]
    ids = {it.id for it in index.items}
    summary.unmatched = {s.kind: sorted(set(s.paths) - ids) for s in scan.sources.values() if set(s.paths) - ids}
    if scan.sources and not any(set(s.paths) & ids for s in scan.sources.values()):
        theirs = sorted(next(iter(summary.unmatched.values())))[:3]
        raise H5Error(
            f"{file}: no video id in the file matches a video of dataset {cfg.dataset.name!r} at {cfg.dataset.root} "
            f"(the file's ids: {', '.join(theirs)}, ...; the dataset's: {', '.join(sorted(ids)[:3])}, ...); nothing "
            "was written. Point dataset.root at the dataset the file was made from, or rename the file's datasets"
        )

    with h5py.File(file, "r") as f, acquire_lock(path):
        text: dict[str, np.ndarray] = {}
        for task, name in sorted(scan.text.items()):
            if task not in index.vocabularies:
                log.warning("%s: /%s names no label task of the dataset (%s); ignored", file, name, sorted(tasks))
                continue
            value = _read(f, file, name)
            c = len(index.vocabularies[task].names)
            if value.shape != (c, dc):
                raise H5Error(f"{file}: /{name} has shape {value.shape}; text/{task} must be (C, Dc) = ({c}, {dc})")
            text[task] = value
        summary.text = sorted(text)
        summary.zero += [f"{schema.TEXT}/{t}" for t in sorted(tasks) if t not in text] + [schema.SALIENCY]
        timestamps_from = _timestamps_source(f, scan.sources[schema.CLIP_FRAME])
        file_frames = f.attrs.get("num_frames")
        provenance = {
            "imported": {
                "source": str(file),
                "sha256": sha,
                "mapping": {f"/{k.strip('/')}": a for k, a in used.items()},
                "provided": sorted(scan.sources),
                "zero": summary.zero,
                "timestamps": timestamps_from,
                "source_attrs": {k: _plain(v) for k, v in f.attrs.items()},
                "imported_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
        }
        attrs = store_attrs(cfg, index, fp, provenance=provenance, decode_size=0)
        group = create_store(path, schema.array_specs(sizes, tasks), attrs, cfg.cache.shard_videos)
        for name, value in _labels(index).items():
            group[name][:] = value
        for task, value in text.items():
            group[f"{schema.TEXT}/{task}"][:] = value
        write_video_coordinates(group, index)
        shard = schema.store_shard_videos(group)
        for start in range(0, n, shard):
            stop = min(start + shard, n)
            block, ok = _read_block(f, file, scan, index, start, stop, L, file_frames, summary.failures)
            for a, b in contiguous_runs(np.flatnonzero(ok)):
                write_rows(group, start + a, {k: v[a:b] for k, v in block.items()})
            summary.imported += int(ok.sum())
        group.attrs["failures"] = summary.failures
    return summary


def _plain(value: Any) -> Any:
    """An HDF5 attribute as JSON-ready data."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _read(f: Any, file: Path, name: str) -> np.ndarray:
    try:
        return np.asarray(f[name][()])
    except (OSError, RuntimeError, ValueError) as e:
        raise H5Error(f"{file}: /{name} cannot be read (truncated or damaged?): {e}") from None


def _timestamps_source(f: Any, src: Source) -> str:
    first = f[next(iter(src.paths.values()))]
    if "timestamps" in first.attrs:
        return "the datasets' timestamps attribute"
    if "fps" in first.attrs or "fps" in f.attrs:
        return "source row / fps attribute"
    return "source row index (the file gives neither timestamps nor fps)"


def _read_block(
    f: Any,
    file: Path,
    scan: FileScan,
    index: DatasetIndex,
    start: int,
    stop: int,
    num_frames: int,
    file_frames: Any,
    failures: dict[str, str],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows [start, stop) as schema arrays, and which of them are complete."""
    b, L = stop - start, num_frames
    out: dict[str, np.ndarray] = {}
    for array, src in scan.sources.items():
        shape = (b, src.dim) if array == schema.TSF_CLS else (b, L, src.dim)
        out[array] = np.zeros(shape, dtype=np.float16)
    out[schema.FRAME_MASK] = np.zeros((b, L), dtype=bool)
    out[schema.TIMESTAMPS] = np.zeros((b, L), dtype=np.float32)
    out[schema.FPS] = np.zeros(b, dtype=np.float32)
    ok = np.ones(b, dtype=bool)
    same_slots = file_frames is not None and int(file_frames) == L
    for i in range(b):
        vid = index.items[start + i].id
        for array, src in scan.sources.items():
            name = src.paths.get(vid)
            if name is None:
                failures[vid] = (
                    f"missing: {file} has no /{(src.kind.strip('/') + '/') if src.kind != ROOT else ''}{vid}"
                )
                ok[i] = False
                break
            try:
                ds = f[name]
                x = np.asarray(ds[()], dtype=np.float32)  # (T, D) or (D,)
                attrs = {k: ds.attrs[k] for k in ("timestamps", "frame_slots", "fps") if k in ds.attrs}
            except (OSError, RuntimeError, ValueError) as e:
                failures[vid] = f"unreadable: {file}: /{name}: {e}"
                ok[i] = False
                break
            if not np.isfinite(x).all():
                failures[vid] = f"non-finite: {file}: /{name} holds NaN or inf"
                ok[i] = False
                break
            if array == schema.TSF_CLS:
                out[array][i] = x
                continue
            if len(x) == 0:
                failures[vid] = f"empty: {file}: /{name} has no rows"
                ok[i] = False
                break
            slots = np.asarray(attrs["frame_slots"]) if same_slots and "frame_slots" in attrs else None
            src_row = resample_slots(len(x), L, slots)  # (L,) source row per slot, -1 = padding
            keep = src_row >= 0
            out[array][i, keep] = x[src_row[keep]]
            if array != schema.CLIP_FRAME:
                continue
            out[schema.FRAME_MASK][i] = keep
            fps = float(attrs.get("fps", f.attrs.get("fps", 0.0)))
            out[schema.FPS][i] = fps
            if "timestamps" in attrs and len(attrs["timestamps"]) == len(x):
                out[schema.TIMESTAMPS][i, keep] = np.asarray(attrs["timestamps"], dtype=np.float32)[src_row[keep]]
            else:
                out[schema.TIMESTAMPS][i, keep] = src_row[keep] / fps if fps > 0 else src_row[keep]
    in_segment = segment_mask(index.items[start:stop], out[schema.TIMESTAMPS])  # (b, L)
    out[schema.SEGMENT_MASK] = in_segment & out[schema.FRAME_MASK]
    return out, ok


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    out: Path
    array: str
    videos: int  # datasets written (1 for a non-per-video array)
    skipped: int  # rows not done (no features): not written

    def lines(self) -> list[str]:
        skipped = f"; {self.skipped} videos not done (no features), not written" if self.skipped else ""
        return [f"wrote /{self.array}: {self.videos} datasets to {self.out}{skipped}"]


def export_h5(store: str | Path, array: str, out: str | Path) -> ExportSummary:
    """Write one cache array into an HDF5 file, one dataset per done video; see the module docstring."""
    import h5py

    from extract.inspect import _arrays

    store, out = Path(store), Path(out)
    group, info = schema.open_cache(store)
    array = array.strip("/")
    names = sorted(name for name, _ in _arrays(group))
    if array not in names:
        raise H5Error(f"{store} has no array {array!r}; choose from {names}")
    arr = group[array]
    dims = tuple(arr.metadata.dimension_names or ())
    fp = info.attrs["fingerprint"]
    if out.exists():
        if not h5py.is_hdf5(out):
            raise H5Error(f"{out} exists and is not an HDF5 file; choose another OUT")
        with h5py.File(out, "r") as f:
            theirs = f.attrs.get("fingerprint")
        if theirs != fp:
            raise H5Error(
                f"{out} holds arrays of another store (fingerprint {theirs}, this one {fp}); choose another OUT"
            )
        target, mode = out, "a"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        target, mode = out.with_name(out.name + ".partial"), "w"
    per_video = bool(dims) and dims[0] == schema.VIDEO and array not in schema.VIDEO_COORDS
    written = skipped = 0
    with h5py.File(target, mode) as f:
        if array in f:
            del f[array]
        f.attrs.update(
            {
                "fingerprint": fp,
                "schema_version": schema.SCHEMA_VERSION,
                "dataset": info.attrs.get("dataset", ""),
                "source_store": str(store.resolve()),
                "num_frames": int(group[schema.FRAME_MASK].shape[1]),
                "exported_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
        )
        if not per_video:
            value = np.asarray(arr[...])
            if value.dtype.kind == "T":  # the video ids: variable-length UTF-8 in HDF5 too
                ds = f.create_dataset(array, data=value.astype(object), dtype=h5py.string_dtype())
            else:
                ds = f.create_dataset(array, data=value)
            ds.attrs["dims"] = list(dims)
            task = array.split("/", 1)[1] if array.startswith(schema.TEXT + "/") else None
            if task in info.vocabularies:
                ds.attrs["class_names"] = list(info.vocabularies[task]["names"])
            written = 1
        else:
            f.require_group(array).attrs["dims"] = list(dims)
            done = np.asarray(group[schema.DONE][:])
            shard = schema.store_shard_videos(group)
            per_frame = len(dims) > 1 and dims[1] == "frame"
            for start in range(0, len(done), shard):
                stop = min(start + shard, len(done))
                rows = np.flatnonzero(done[start:stop])
                skipped += (stop - start) - len(rows)
                if not len(rows):
                    continue
                values = np.asarray(arr[start:stop])  # (b, ...)
                mask = np.asarray(group[schema.FRAME_MASK][start:stop])  # (b, L)
                ts = np.asarray(group[schema.TIMESTAMPS][start:stop])  # (b, L)
                fps = np.asarray(group[schema.FPS][start:stop])  # (b,)
                for r in rows:
                    vid = info.video_ids[start + r]
                    keep = mask[r] if per_frame else slice(None)
                    ds = f.create_dataset(f"{array}/{vid}", data=values[r][keep] if per_frame else values[r])
                    ds.attrs["fps"] = float(fps[r])
                    ds.attrs["split"] = info.splits[start + r]
                    if per_frame:
                        ds.attrs["timestamps"] = ts[r][keep]
                        ds.attrs["frame_slots"] = np.flatnonzero(mask[r])
                    written += 1
    if target != out:
        os.replace(target, out)
    return ExportSummary(out, array, written, skipped)
