"""Head registry (a leaf: the head modules import it, never the package): `@register_head("name", config=Cls)`,
`build_head(name, cfg, ctx)`.

Every head is an `nn.Module` with `forward(batch) -> logits (B, C)`. Its options are a frozen
dataclass (one field per module the paper ablates), filled from `heads.<name>` in pipeline.yaml;
`heads.<name>.variants.<variant>` is a named set of overrides of those options. The config loader
checks every head section, variant and ablation row against this registry before any work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from extract.contract.config import Config, ConfigError, build_section
from train.heads.batch import HeadContext

# Head modules, imported on first use of the registry (each registers itself; train/heads/__init__.py imports
# them explicitly too).
_HEAD_MODULES = ("train.heads.baseline", "train.heads.cmdcl", "train.heads.pcmci", "train.heads.ecrl")


# weights(module, args, kwargs, output) -> (p (..., K) over the last axis, valid entries (...) or None = all K)
WeightsFn = Callable[[torch.nn.Module, tuple, dict, Any], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class CausalTerm:
    """A causal term a head declares for `ltar diagnose`: the output of submodule `module` (B, ...) per video."""

    name: str  # short name, used in tables (`ich`, `bd`)
    symbol: str  # the paper's expression for it
    module: str  # dotted path of the submodule whose output is the term (absent when switched off)
    weights_module: str | None = None  # the submodule whose call gives the term's attention / plan weights ...
    weights: WeightsFn | None = None  # ... and how (None: the term has no weights)


@dataclass(frozen=True)
class HeadEntry:
    name: str
    cls: type[torch.nn.Module]
    config: type  # frozen dataclass of the head's options
    builtin_variants: dict[str, dict[str, Any]]  # variants every config has (the paper's ablations)
    terms: tuple[CausalTerm, ...] = ()  # its causal terms, for `ltar diagnose`


_HEADS: dict[str, HeadEntry] = {}

# A table row that is not a head: the baseline trained on the unconfounded `train_oracle` split (train.ablate)
ORACLE_ROW = "oracle"


def register_head(
    name: str,
    config: type,
    variants: dict[str, dict[str, Any]] | None = None,
    terms: tuple[CausalTerm, ...] = (),
) -> Callable:
    """Class decorator: register a head with its options dataclass, its built-in variants and its causal
    terms (a new head gets `ltar diagnose` by declaring them)."""

    def wrap(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        _HEADS[name] = HeadEntry(name, cls, config, dict(variants or {}), tuple(terms))
        return cls

    return wrap


def _load_all() -> None:
    for module in _HEAD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a paper head not written yet
            if e.name != module:
                raise


def head_names() -> list[str]:
    _load_all()
    return sorted(_HEADS)


def head_entry(name: str) -> HeadEntry:
    _load_all()
    if name not in _HEADS:
        raise KeyError(f"unknown head {name!r}; choose from {head_names()}")
    return _HEADS[name]


def head_options(cfg: Config, name: str, variant: str | None = None) -> Any:
    """The head's options: dataclass defaults <- heads.<name> <- the variant's overrides."""
    entry = head_entry(name)
    section = dict(cfg.heads.get(name) or {})
    user_variants = section.pop("variants", None) or {}
    variants = {**entry.builtin_variants, **user_variants}
    data = dict(section)
    path = f"heads.{name}"
    if variant is not None:
        if variant not in variants:
            raise ConfigError(f"{path}.variants: unknown variant {variant!r}; choose from {sorted(variants)}")
        data.update(variants[variant] or {})
        path = f"{path}.variants.{variant}"
    return build_section(entry.config, data, path)


def variant_names(cfg: Config, name: str) -> list[str]:
    entry = head_entry(name)
    return sorted({**entry.builtin_variants, **((cfg.heads.get(name) or {}).get("variants") or {})})


def parse_row(row: str) -> tuple[str, str | None, str | None]:
    """`head[:variant][+grounding][/f<L'>]` -> (head, variant or None, grounding or None); frames: `row_frames`."""
    row, _, grounding = row.split("/", 1)[0].partition("+")
    head, _, variant = row.partition(":")
    return head, (variant or None), (grounding or None)


def row_frames(row: str) -> int | None:
    """The L' of a row `<row>/f<L'>` (the head sees L' frames uniformly subsampled from the cache's L, as
    `train.num_frames` does: a frames ablation on one cache), None without the suffix. A suffix that is not
    /f and a positive whole number is a ValueError naming the row."""
    _, slash, suffix = row.partition("/")
    if not slash:
        return None
    if not (suffix.startswith("f") and suffix[1:].isdigit() and int(suffix[1:]) > 0):
        raise ValueError(f"row {row!r}: the frames suffix is /f<L'> with L' a positive whole number, e.g. 'cmdcl/f8'")
    return int(suffix[1:])


def required_dictionaries(cfg: Config, name: str, variant: str | None = None) -> tuple[str, ...]:
    """Names of the cache dictionaries a head (with these options) reads."""
    entry = head_entry(name)
    needs = getattr(entry.cls, "required_dictionaries", None)
    return tuple(needs(head_options(cfg, name, variant))) if needs else ()


def build_head(name: str, cfg: Config, ctx: HeadContext, variant: str | None = None) -> torch.nn.Module:
    """Build a registered head from the config (its section and variant) and the cache."""
    entry = head_entry(name)
    missing = [d for d in required_dictionaries(cfg, name, variant) if d not in ctx.dictionaries]
    if missing:
        raise ConfigError(
            f"head {name!r} needs the dictionaries {missing}, which the cache does not hold; "
            "run `ltar dictionaries` (or `make dictionaries`) first"
        )
    return entry.cls(head_options(cfg, name, variant), ctx)
