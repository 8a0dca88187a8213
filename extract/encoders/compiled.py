"""`encoders.compile`: an encoder's forward under `torch.compile`, at fixed batch shapes.

A compiled graph is specialised to its input shapes (`dynamic=False`: the fastest kernels); extraction calls the
encoders with chunks of `encoders.batch_frames` sampled frames, whose last chunk is shorter. `FixedBatch` pads every
call to the next multiple of its batch (repeating the last row, so the padding is real data and never NaN) and cuts
the padding off every output, so a run compiles each encoder once per shape it uses (CLIP: the frames' chunk and the
crops' chunk of foreground plus background; the TimeSformer: its clips' chunk) instead of once per length.

The rows of a ViT never see each other, so the padding changes no real row (up to the float reordering that
another batch size allows anyway). Calls that register forward hooks (CLIP's CLS attention, CLIP Surgery's inputs)
run the eager model: a hook added per call would make the compiled graph retrace on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map


class FixedBatch:
    """`fn(x)` compiled for batches of `batch` rows (and its multiples): x (N, ...) -> fn's outputs with N rows."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], batch: int, backend: str = "inductor"):
        self.batch = max(1, int(batch))
        self.fn = torch.compile(fn, dynamic=False, backend=backend)
        self.shapes: set[tuple[int, ...]] = set()  # the input shapes compiled for, so far

    def __call__(self, x: torch.Tensor) -> Any:
        n = x.shape[0]
        size = -(-n // self.batch) * self.batch  # the next multiple of the batch
        if size != n:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])  # (size, ...)
        self.shapes.add(tuple(x.shape))
        return tree_map(
            lambda t: t[:n] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == size else t, self.fn(x)
        )
