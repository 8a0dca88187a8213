"""The hook through which stage 2 runs its tasks on a dask cluster without importing dask.

`ltar ablate --scheduler local:N | tcp://HOST:PORT` trains a table's runs as cluster tasks. The cluster code
(dask.distributed: connecting, placing, collecting) is stage 1's (extract/scale.py, `TaskFarm`); the console
script (train/main.py) registers it here, and train/ablate.py asks for it by this name only.

A task farm is built as `factory(address, exits)` (exits: a contextlib.ExitStack that closes the connection) and
has `threads` (torch threads per worker: cores // N for local:N, None for a running cluster) and
`run(calls, finish) -> iterator of (index, result)`: every call `(key, fn, args)` runs as one task, one per worker
thread at a time, the next handed to the worker whose task just ended, in the list's order; `result()` returns
the task's value or raises its error; `finish = (fn, args)` runs on every worker at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_FACTORY: list[Callable[[str, Any], Any]] = []


def register_task_farm(factory: Callable[[str, Any], Any]) -> None:
    _FACTORY[:] = [factory]


def task_farm(address: str, exits: Any) -> Any:
    """The registered task farm connected to `address`; a sentence when none is registered."""
    if not _FACTORY:
        raise RuntimeError(
            f"train.scheduler {address!r}: no dask task farm is registered in this process; run through the `ltar` "
            "command (train/main.py registers extract/scale.py's), or set train.scheduler: null"
        )
    return _FACTORY[0](address, exits)
