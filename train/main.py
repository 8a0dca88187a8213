"""`ltar`, the console script: stage 1's and stage 2's commands on one app.

The one module of train/ that imports extract/ beyond its contract: it assembles both stages' commands
(extract/cli.py, train/cli.py) and hands `ltar ablate --scheduler` the dask task farm of extract/scale.py
(train/ never imports dask.distributed itself).
"""

from __future__ import annotations

import sys
from typing import Any

import extract.cli  # noqa: F401  (stage 1's commands)
import train.cli  # noqa: F401  (stage 2's commands)
from extract.contract.cli import app, run_app
from extract.contract.cluster import register_task_farm


def _task_farm(address: str, exits: Any) -> Any:
    from extract.scale import TaskFarm  # dask.distributed, imported only when a table trains on a cluster

    return TaskFarm(address, exits)


register_task_farm(_task_farm)


def main() -> None:
    """Console-script entry point: every command, its exit codes and sentences (`extract.contract.cli.run_app`)."""
    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
