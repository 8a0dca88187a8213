"""The heads: one module per paper, each registering itself (`@register_head`) in the leaf registry
train/heads/registry.py, and imported here explicitly.

Every head is an `nn.Module` with `forward(batch) -> logits (B, C)`. Its options are a frozen dataclass (one field
per module the paper ablates) whose defaults are the only place the head's defaults are written; `heads.<name>` in
pipeline.yaml overrides them, and `heads.<name>.variants.<variant>` is a named set of overrides (the head's
built-in variants are the papers' ablations). The config loader checks every head section, variant and table row
against this registry before any work starts (`validate`).
"""

from __future__ import annotations

from train.heads import baseline, cmdcl, ecrl, pcmci  # noqa: F401  (each registers itself)
from train.heads.batch import Batch, HeadContext
from train.heads.registry import (
    ORACLE_ROW,
    CausalTerm,
    HeadEntry,
    build_head,
    head_entry,
    head_names,
    head_options,
    parse_row,
    register_head,
    required_dictionaries,
    row_frames,
    variant_names,
)

__all__ = [
    "ORACLE_ROW",
    "Batch",
    "CausalTerm",
    "HeadContext",
    "HeadEntry",
    "build_head",
    "head_entry",
    "head_names",
    "head_options",
    "parse_row",
    "register_head",
    "required_dictionaries",
    "row_frames",
    "variant_names",
]
