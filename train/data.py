"""Reading the cache for training: a split's arrays read once into memory, batches drawn from them.

Arrays are read through the schema `extract` declares; nothing here knows an encoder. A split that
fits `train.memory_budget_mb` is read into host memory once (fp16; kept resident on the GPU when
training there); a larger one streams blocks of rows from Zarr with a background prefetch thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import torch

from extract.contract import schema
from extract.contract.schema import CacheError
from train.heads import Batch, HeadContext

log = logging.getLogger(__name__)

FEATURES = {"vp": schema.CLIP_FRAME, "v": schema.TSF_FRAME, "fg": schema.CLIP_FG, "bg": schema.CLIP_BG}
DICTIONARIES = "dictionaries"


@dataclass
class SplitTensors:
    """One split in memory: features (N, L, D) fp16, mask (N, L), labels (N,) or (N, C)."""

    rows: np.ndarray  # store row of each item
    ids: list[str]
    vp: torch.Tensor
    v: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: str) -> SplitTensors:
        move = {k: getattr(self, k).to(device) for k in ("vp", "v", "fg", "bg", "mask", "labels")}
        return SplitTensors(self.rows, self.ids, **move)

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k)[idx] for k in ("vp", "v", "fg", "bg", "mask", "labels")}


def frame_slots(cached: int, num_frames: int | None, path: Path) -> np.ndarray:
    """The cache slots a head sees: all `cached` (L) slots, or `num_frames` (L' ≤ L) uniformly spaced ones,
    slot j of L' taking cached slot floor((j + 1/2) L / L') (the centre of its share) -> (L',) int."""
    if num_frames is None or num_frames == cached:
        return np.arange(cached)
    if num_frames > cached:
        raise CacheError(
            f"train.num_frames = {num_frames}, but {path} holds {cached} frames per video; choose at most {cached} "
            "(or extract a cache with more frames.num_frames)"
        )
    return np.floor((np.arange(num_frames) + 0.5) * cached / num_frames).astype(np.int64)


class CacheReader:
    """A finished store, one label task of it."""

    def __init__(self, path: Path, task: str, allow_partial: bool = False, num_frames: int | None = None):
        self.group, self.info = schema.open_cache(path)
        self.path = Path(path)
        self.slots = frame_slots(int(self.group[schema.FRAME_MASK].shape[1]), num_frames, self.path)  # (L',)
        vocab = self.info.vocabularies
        if task not in vocab:
            raise CacheError(f"{path} has no label task {task!r}; set train.task to one of {sorted(vocab)}")
        self.task = task
        self.multi_label = bool(vocab[task]["multi_label"])
        self.class_names = list(vocab[task]["names"])
        self.done = np.asarray(self.group[schema.DONE][:])
        if not self.done.all():
            missing = int((~self.done).sum())
            failed = len(self.info.failures)
            if not allow_partial:
                raise CacheError(
                    f"{path}: {missing} of {len(self.done)} videos have no features ({failed} recorded as failed); "
                    "run `ltar extract` to finish the store, or pass --allow-partial to train on the done rows only"
                )
            log.warning("%s: training on done rows only; %d videos have no features", path, missing)

    @property
    def fingerprint(self) -> str:
        return str(self.info.attrs["fingerprint"])

    def dictionary_names(self) -> list[str]:
        return sorted(self.group[DICTIONARIES].group_keys()) if DICTIONARIES in self.group else []

    def dictionaries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (centroids (K, D) float32, prior (K,) float32)."""
        out = {}
        for name in self.dictionary_names():
            g = self.group[f"{DICTIONARIES}/{name}"]
            self._check_fresh(name, g.attrs)
            out[name] = (
                torch.from_numpy(np.asarray(g["centroids"][:], dtype=np.float32)),
                torch.from_numpy(np.asarray(g["prior"][:], dtype=np.float32)),
            )
        return out

    def _check_fresh(self, name: str, attrs: Any) -> None:
        """A dictionary built before the store finished other videos of its split is stale: refused (dictionaries
        from before the record are not checked)."""
        split, recorded = attrs.get("built_from_split"), attrs.get("rows_done_digest")
        if split is None or recorded is None:
            return
        rows = self.info.split_indices(split)
        now = rows[self.done[rows]]
        if schema.rows_digest(now) != recorded:
            raise CacheError(
                f"{self.path}: dictionary {name!r} was built from other finished videos of split {split!r} than the "
                f"store holds now ({len(now)} finished today: videos were extracted since); run `ltar dictionaries` "
                "to rebuild it"
            )

    def context(self) -> HeadContext:
        vp = self.group[schema.CLIP_FRAME]
        t0 = torch.from_numpy(np.asarray(self.group[f"{schema.TEXT}/{self.task}"][:], dtype=np.float32))
        return HeadContext(
            clip_dim=int(vp.shape[2]),
            video_dim=int(self.group[schema.TSF_FRAME].shape[2]),
            num_frames=len(self.slots),
            num_classes=len(self.class_names),
            multi_label=self.multi_label,
            t0=t0,
            dictionaries=self.dictionaries(),
        )

    def split_rows(self, split: str) -> np.ndarray:
        rows = self.info.split_indices(split)
        if rows.size == 0:
            raise CacheError(f"{self.path} has no videos in split {split!r}; splits: {sorted(set(self.info.splits))}")
        rows = rows[self.done[rows]]
        if not self.multi_label:  # videos without an activity label cannot be scored
            rows = rows[np.asarray(self.group[f"{schema.LABELS}/{self.task}"].get_orthogonal_selection(rows)) >= 0]
        return rows

    def split_bytes(self, split: str) -> int:
        n = len(self.split_rows(split))
        return sum(2 * n * int(np.prod(self.group[a].shape[1:])) for a in FEATURES.values())

    def _read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows (sorted) -> tensors; contiguous rows are read as one slice per array."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        contiguous = hi - lo == len(rows)

        def read(name: str) -> np.ndarray:
            arr = self.group[name]
            return np.asarray(arr[lo:hi]) if contiguous else np.asarray(arr.get_orthogonal_selection(rows))

        out = {k: torch.from_numpy(read(a)[:, self.slots].astype(np.float16)) for k, a in FEATURES.items()}
        out["mask"] = torch.from_numpy(read(schema.FRAME_MASK)[:, self.slots].astype(bool))
        labels = read(f"{schema.LABELS}/{self.task}")
        out["labels"] = torch.from_numpy(labels.astype(np.float32) if self.multi_label else labels.astype(np.int64))
        return out

    def load_split(self, split: str) -> SplitTensors:
        rows = self.split_rows(split)
        ids = [self.info.video_ids[r] for r in rows]
        return SplitTensors(rows, ids, **self._read(rows))

    def stream_split(self, split: str, block_rows: int) -> StreamedSplit:
        return StreamedSplit(self, self.split_rows(split), block_rows)


class StreamedSplit:
    """A split larger than the memory budget: blocks of rows read from Zarr ahead of use."""

    def __init__(self, reader: CacheReader, rows: np.ndarray, block_rows: int):
        self.reader, self.rows, self.block_rows = reader, rows, max(1, block_rows)
        self.ids = [reader.info.video_ids[r] for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def blocks(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Yield (positions, tensors) per block in `order` of block indices; one block prefetched."""
        queue: Queue = Queue(maxsize=2)
        starts = np.arange(0, len(self.rows), self.block_rows)

        def produce() -> None:
            for b in order:
                pos = np.arange(starts[b], min(starts[b] + self.block_rows, len(self.rows)))
                queue.put((pos, self.reader._read(self.rows[pos])))
            queue.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := queue.get()) is not None:
            yield item

    def num_blocks(self) -> int:
        return -(-len(self.rows) // self.block_rows)


def iterate_batches(
    data: SplitTensors | StreamedSplit,
    batch_size: int,
    t0: torch.Tensor,
    dictionaries: dict[str, tuple[torch.Tensor, torch.Tensor]],
    device: str,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[np.ndarray, Batch]]:
    """(positions in the split, Batch) in a shuffled order when `generator` is given, else in order."""

    def batch(t: dict[str, torch.Tensor], pos: np.ndarray) -> Batch:
        ids = torch.as_tensor(pos, dtype=torch.long)
        return Batch(t["vp"], t["v"], t["fg"], t["bg"], t["mask"], t0, dictionaries, t["labels"], ids).to(device)

    if isinstance(data, SplitTensors):
        n = len(data)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield idx.numpy(), batch(data.take(idx.to(data.vp.device)), idx.numpy())
        return
    blocks = np.arange(data.num_blocks())
    if generator is not None:
        blocks = blocks[torch.randperm(len(blocks), generator=generator).numpy()]
    for pos, tensors in data.blocks(blocks):
        inner = torch.randperm(len(pos), generator=generator) if generator is not None else torch.arange(len(pos))
        for i in range(0, len(pos), batch_size):
            idx = inner[i : i + batch_size]
            yield pos[idx.numpy()], batch({k: v[idx] for k, v in tensors.items()}, pos[idx.numpy()])
