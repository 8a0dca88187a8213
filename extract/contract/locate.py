"""Where the stores live, and how stage 2 finds the one stage 1 wrote for a configuration.

A store is named by its content fingerprint (`<cache.root>/<dataset>/<fingerprint>.zarr`), which stage 1
computes from the dataset index, the encoders' weights and the device. Stage 2 does not recompute it (that needs
the encoders' code and the dataset): `ltar extract` and `ltar dictionaries` write a pointer,
`<cache.root>/<dataset>/pointers/<key>.json`, keyed by the resolved stage-1 sections (`stage1_key`), naming the
store they wrote for them. `find_store` reads it back and refuses a store whose video files changed since their
rows were written (the store's `file_stamps` against the files named in `file_paths`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.contract import schema
from extract.contract.config import Config, bounds, register_section, sections, to_dict
from extract.contract.schema import CacheError

POINTERS = "pointers"  # <cache.root>/<dataset>/pointers/<stage-1 key>.json


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache"  # stores land in <root>/<dataset>/<fingerprint>.zarr
    # videos per shard file of a NEW store (fixed once created: it decides the encoder groups, so a resumed run
    # or a cluster worker reads it back from the store); not in the fingerprint. Smaller = more, finer cluster tasks
    shard_videos: int = field(default=schema.SHARD_VIDEOS, metadata=bounds(1, 65536))


register_section("cache", CacheConfig, order=60, stage="contract")


def check_cache_root(cfg: Config) -> None:
    """Refuse an object-store URL as cache.root: atomic shard replacement and the lock need POSIX files."""
    if "://" in cfg.cache.root:
        raise CacheError(
            f"cache.root {cfg.cache.root!r} is a URL; the cache must live on a local or shared POSIX filesystem "
            "(atomic shard writes and the store lock rely on rename and O_EXCL): use a path such as /shared/cache"
        )


def stage1_key(cfg: Config) -> str:
    """Hash of every resolved stage-1 section (what decides which store serves this configuration)."""
    resolved = {s.name: to_dict(getattr(cfg, s.name)) for s in sections("extract")}
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pointer_path(cfg: Config) -> Path:
    return Path(cfg.cache.root) / cfg.dataset.name / POINTERS / f"{stage1_key(cfg)}.json"


def write_pointer(cfg: Config, store: str | Path, device: str, command: str) -> Path:
    """Record that `store` (extracted on `device`) serves this configuration's stage-1 sections; each device's
    store is kept (a GPU fp16 store and a CPU fp32 store may both exist), the latest named as such."""
    path = pointer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        held = {}
    name = Path(store).name
    pointer = {
        "latest": name,
        "stores": {**held.get("stores", {}), device: name},
        "written_by": command,
        "written": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "stage1": {s.name: to_dict(getattr(cfg, s.name)) for s in sections("extract")},
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(pointer, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a reader sees the old pointer or the new one
    return path


def stale_rows(attrs: dict[str, Any]) -> list[str]:
    """Video ids whose file changed (size or modification time) since their row was written; a file absent now
    keeps its row (the features stay valid for the file they came from)."""
    stamps, paths = dict(attrs.get("file_stamps", {})), dict(attrs.get("file_paths", {}))
    stale = []
    for vid, stamp in stamps.items():
        if vid not in paths:
            continue
        try:
            st = os.stat(paths[vid])
        except OSError:
            continue
        if [st.st_size, st.st_mtime_ns] != list(stamp):
            stale.append(vid)
    return stale


def find_store(cfg: Config, prefer: tuple[str, ...] = ()) -> Path:
    """The store `ltar extract` wrote for this configuration's stage-1 sections (the store of a device in
    `prefer` first, else the latest); refused while a video file has changed since its row was written."""
    path = pointer_path(cfg)
    folder = Path(cfg.cache.root) / cfg.dataset.name
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(
            f"no cache store recorded in {folder / POINTERS} for this configuration's stage-1 sections; run "
            "`ltar extract` with the same config (a finished store is found again and only recorded), or pass "
            "--store"
        ) from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: the store pointer cannot be read ({e}); run `ltar extract` again") from None
    names = [pointer["stores"][d] for d in prefer if d in pointer.get("stores", {})] + [pointer["latest"]]
    for name in dict.fromkeys(names):
        store = folder / name
        if (store / "zarr.json").exists():
            stale = stale_rows(schema.open_cache(store)[1].attrs)
            if stale:
                raise CacheError(
                    f"{store}: {len(stale)} video file(s) changed since they were extracted (first: {stale[0]}); "
                    "run `ltar extract` to extract them again"
                )
            return store
    raise CacheError(
        f"{path} names the store {folder / pointer['latest']}, which no longer exists; run `ltar extract` again "
        "(or pass --store)"
    )
