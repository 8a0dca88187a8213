"""Extraction on dask.distributed: throughput with 1 and 2 local workers, side by side in one run.

On the demo world (96 videos, 16 frames, shards of 16 videos = 6 shard tasks), each configuration
extracts into a fresh store:
- single: `ltar extract` in this process (the reference);
- local:1 and local:2: `ltar extract --scheduler local:N` (N worker processes, 1 dask thread each,
  torch threads = cores / N, each worker decoding with `frames.decode_workers` processes).
Reported per configuration: wall time of the whole call (cluster start, encoder builds, writes) and
the throughput of the extraction span (first shard started to last shard finished), which is what
more workers speed up; `ratio` = local:2 / local:1 span throughput. Every store is checked equal to
the single-process one. On a machine with a GPU the same comparison runs with the `base` presets
(CLIP ViT-B/16, TimeSformer-B, random weights); without one the last line says gpu=none.

Usage: python bench/scale.py [--videos 96] [--frames 16] [--shard 16]
The last line is `key=value` pairs.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# the repository root first: run as `python bench/X.py`, bench/extract.py would shadow the extract package
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.contract.config import from_dict
from extract.inspect import _arrays  # noqa: E402
from extract.pipeline import extract  # noqa: E402
from extract.scale import extract_distributed, extract_shard  # noqa: E402
from extract.synthetic import write_dataset  # noqa: E402


def _config(root: Path, cache: Path, videos: int, frames: int, shard: int, **encoders):
    n_iid = max(1, videos // 6)
    return from_dict(
        {
            "dataset": {"root": str(root)},
            "synthetic": {"videos": {"train": videos - 2 * n_iid, "test_iid": n_iid, "test_ood": n_iid}},
            "frames": {"num_frames": frames},
            "encoders": encoders,
            "cache": {"root": str(cache), "shard_videos": shard},
        }
    )


def _timed_shard(log_dir: str, *args):
    """The shard task, recording when it ran (wall clock) for the extraction span."""
    t0 = time.time()
    result = extract_shard(*args)
    Path(log_dir, f"{args[2]}.json").write_text(json.dumps({"start": t0, "end": time.time()}))
    return result


def run_cluster(cfg, workers: int, log_dir: Path) -> dict[str, float]:
    log_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    summary = extract_distributed(
        cfg, f"local:{workers}", progress=False, task=functools.partial(_timed_shard, str(log_dir))
    )
    wall = time.perf_counter() - t0
    spans = [json.loads(p.read_text()) for p in log_dir.glob("*.json")]
    span = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    assert summary.done == summary.total and not summary.failures, summary.lines()
    return {"wall_s": wall, "span_s": span, "fps": summary.frames / span, "store": summary.store, "n": summary.total}


def same_store(a: Path, b: Path) -> bool:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    return all(np.array_equal(np.asarray(arr[...]), np.asarray(gb[name][...])) for name, arr in _arrays(ga))


def compare(tmp: Path, videos: int, frames: int, shard: int, tag: str, **encoders) -> dict[str, str]:
    data = tmp / "data"
    cfg = _config(data, tmp / f"{tag}-single", videos, frames, shard, **encoders)
    if not (data / "manifest.jsonl").exists():
        write_dataset(cfg.synthetic, data, progress=False)
    t0 = time.perf_counter()
    single = extract(cfg, progress=False)
    single_wall = time.perf_counter() - t0
    out = {}
    runs = {}
    for workers in (1, 2):
        wcfg = _config(data, tmp / f"{tag}-w{workers}", videos, frames, shard, **encoders)
        runs[workers] = run_cluster(wcfg, workers, tmp / f"{tag}-log{workers}")
    equal = all(same_store(r["store"], single.store) for r in runs.values())
    n = single.total
    name = tag.rstrip("_") or "tiny presets"
    print(f"[{name}] videos={n} frames_per_video={frames} shard_videos={shard} ({-(-n // shard)} shard tasks)")
    print(f"  single process: {single.frames / single_wall:8.1f} frames/s ({single_wall:.1f} s wall)")
    for workers, r in runs.items():
        print(
            f"  local:{workers}:        {r['fps']:8.1f} frames/s over the extraction span ({r['span_s']:.1f} s; "
            f"{r['wall_s']:.1f} s wall incl. cluster start)"
        )
    ratio = runs[2]["fps"] / runs[1]["fps"]
    print(f"  local:2 / local:1 = {ratio:.2f}; stores equal to the single-process one: {equal}")
    out[f"{tag}single_fps"] = f"{single.frames / single_wall:.1f}"
    out[f"{tag}w1_fps"] = f"{runs[1]['fps']:.1f}"
    out[f"{tag}w2_fps"] = f"{runs[2]['fps']:.1f}"
    out[f"{tag}ratio"] = f"{ratio:.2f}"
    out[f"{tag}w1_wall_s"] = f"{runs[1]['wall_s']:.1f}"
    out[f"{tag}w2_wall_s"] = f"{runs[2]['wall_s']:.1f}"
    out[f"{tag}equal"] = str(equal)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--shard", type=int, default=16, help="cache.shard_videos: videos per shard task")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    figures = {"videos": str(args.videos), "frames": str(args.frames), "shard_videos": str(args.shard)}
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(compare(Path(tmp), args.videos, args.frames, args.shard, ""))
        if torch.cuda.is_available():
            base = {"clip": {"preset": "base"}, "timesformer": {"preset": "base"}}
            figures.update(compare(Path(tmp), args.videos, args.frames, args.shard, "gpu_base_", **base))
            figures["gpu"] = torch.cuda.get_device_name(0).replace(" ", "_")
        else:
            figures["gpu"] = "none"
    figures["cores"] = str(__import__("os").cpu_count())
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
