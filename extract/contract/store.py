"""Writing the cache store: create it from the schema, write rows, record failures.

Crash safety: zarr's local store replaces a shard file atomically (temporary file + rename), so a
kill mid-write leaves the previous shard intact; `done[i]` is written after every other array of
row i; stale `*.partial` temporaries from a killed writer are removed when the store is reopened.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.schema import ArraySpec, CacheError

log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """Extraction cannot go on (disk full, unwritable store); finished videos are kept."""


def create_array(group: Any, spec: ArraySpec, shard_videos: int = schema.SHARD_VIDEOS) -> None:
    """Create one schema array in `group`: per-video arrays one row per chunk, sharded; others whole."""
    from zarr.codecs import BloscCodec, ZstdCodec

    compressor = ZstdCodec(level=3) if spec.dtype == "float16" else BloscCodec(cname="zstd", clevel=3)
    if spec.per_video:
        chunks = (1, *spec.shape[1:])
        shards = (min(shard_videos, max(spec.shape[0], 1)), *spec.shape[1:])
    else:
        chunks, shards = spec.shape, None
    string = spec.dtype == schema.STRING
    group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=chunks,
        shards=shards,
        dtype=np.dtypes.StringDType() if string else spec.dtype,
        compressors=compressor,
        fill_value="" if string else -1 if spec.dtype == "int32" else 0,
        dimension_names=spec.dims,
    )


def create_store(
    path: Path, specs: list[ArraySpec], attrs: dict[str, Any], shard_videos: int = schema.SHARD_VIDEOS
) -> Any:
    """Create every array, then the attributes; `schema_version` is written last, so a store whose
    creation was interrupted is recognised (it has none) and recreated. The writer's lock file
    (schema.LOCK_FILE) survives the recreation."""
    import zarr

    if path.exists():
        for child in path.iterdir():
            if child.name == schema.LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="a")  # mode "w" would delete the lock file with the rest
    for spec in specs:
        create_array(group, spec, shard_videos)
    group.attrs.update(attrs)
    group.attrs["schema_version"] = schema.SCHEMA_VERSION
    return group


def open_for_writing(path: Path, fingerprint: str, upgrade: Callable[[Any], None] | None = None) -> Any | None:
    """Reopen an existing store of this fingerprint for resuming; None when it must be created. A store of an
    older schema version (schema.UPGRADABLE) is handed to `upgrade(group)` first, which writes what the newer
    version adds and sets `schema_version` last (stage 1 knows the dataset it needs)."""
    import zarr

    if not (path / "zarr.json").exists():
        return None
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    if "schema_version" not in attrs:
        log.warning("%s: its creation was interrupted; creating it again", path)
        return None
    if attrs["schema_version"] in schema.UPGRADABLE and upgrade is not None:
        if attrs.get("fingerprint") != fingerprint:
            raise CacheError(f"{path} holds fingerprint {attrs.get('fingerprint')}, not {fingerprint}; remove it")
        upgrade(zarr.open_group(str(path), mode="r+"))
    group, info = schema.open_cache(path, mode="r+")
    if info.attrs.get("fingerprint") != fingerprint:
        raise CacheError(f"{path} holds fingerprint {info.attrs.get('fingerprint')}, not {fingerprint}; remove it")
    for stale in path.rglob("*.partial"):  # temporaries of a writer killed mid-write
        stale.unlink(missing_ok=True)
    return group


def contiguous_runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """Sorted row indices -> (start, stop) half-open runs, so each run is one slice write."""
    if rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        yield int(run[0]), int(run[-1]) + 1


def write_rows(group: Any, start: int, values: dict[str, np.ndarray]) -> None:
    """Write rows start..start+n of every array in `values`, then mark them done."""
    try:
        n = None
        for name, value in values.items():
            n = len(value)
            group[name][start : start + n] = value
        if n:
            group[schema.DONE][start : start + n] = True
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExtractError(
                f"the disk holding {group.store} is full; finished videos are kept and marked done. "
                "Free space (or move cache.root) and run `ltar extract` again to resume."
            ) from None
        raise ExtractError(f"could not write to the cache store {group.store}: {e}; re-run to resume") from None


def sha256_of(path: Path) -> str:
    """Content hash of a file, or of every file of a folder in name order (weights, imported features)."""
    import hashlib

    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
