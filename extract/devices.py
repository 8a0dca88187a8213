"""Where stage 1 runs: the torch device `encoders.device` names, and the cores this process may use.

A leaf of extract/ (the pipeline, the pretraining commands and the cluster code all ask it)."""

from __future__ import annotations

import os

from extract.contract.config import Config, ConfigError


def resolve_device(cfg: Config) -> str:
    """`encoders.device` as a torch device name: `auto` is CUDA where there is one; a named device this machine
    lacks is a ConfigError (before any folder is made)."""
    import torch

    device = cfg.encoders.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            seen = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
            raise ConfigError(
                f"encoders.device is {device!r} but torch sees {seen} on this machine; set encoders.device=auto "
                "(CUDA where there is one, else the CPU) or encoders.device=cpu"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("encoders.device is 'mps' but torch sees no Apple GPU here; set encoders.device=auto or cpu")
    return device


def usable_cores() -> int:
    """The cores this process may run on (a container's or a `taskset`'s share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
