"""Head registry: `@register_head("name", config=Cls)`, `build_head(name, cfg, cache_info)`.

Every head is an `nn.Module` with `forward(batch) -> logits (B, C)`. Its options are a frozen
dataclass (one field per module the paper ablates), filled from `heads.<name>` in pipeline.yaml;
`heads.<name>.variants.<variant>` is a named set of overrides of those options. The config loader
checks every head section, variant and ablation row against this registry before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from extract.config import Config, ConfigError, build_section, register_validator

# Head modules, imported on first use of the registry (each registers itself).
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


def _validate(cfg: Config) -> list[str]:
    errors = []
    names = head_names()
    for name, section in cfg.heads.items():
        if name not in names:
            errors.append(f"heads.{name}: unknown head; choose from {names}")
            continue
        if section is not None and not isinstance(section, dict):
            errors.append(f"heads.{name}: expected a mapping of options, got {section!r}")
            continue
        try:
            head_options(cfg, name)
            for variant in variant_names(cfg, name):
                head_options(cfg, name, variant)
        except ConfigError as e:
            errors.append(str(e))
    from train import grounding  # imports this package: loaded here, not at the top

    errors += grounding.validate(cfg)
    tc = cfg.train
    rows = [("train.head", tc.head + (f":{tc.variant}" if tc.variant else ""))]
    if tc.grounding is not None and tc.grounding not in cfg.grounding:
        errors.append(
            f"train.grounding: no grounding {tc.grounding!r}; pipeline.yaml defines grounding: {sorted(cfg.grounding)}"
        )
    rows += [(f"ablations.{t}.rows[{i}]", r) for t, table in cfg.ablations.items() for i, r in enumerate(table.rows)]
    for key, row in rows:
        if row == ORACLE_ROW and key.startswith("ablations."):
            continue  # a bound row (train.ablate): the baseline trained on train_oracle
        head, variant, ground = parse_row(row)
        try:
            row_frames(row)
        except ValueError as e:
            errors.append(f"{key}: {e}")
        if head not in names:
            errors.append(f"{key}: unknown head {head!r}; choose from {names}")
        elif variant is not None and variant not in variant_names(cfg, head):
            errors.append(f"{key}: head {head!r} has no variant {variant!r}; choose from {variant_names(cfg, head)}")
        if ground is not None and ground not in cfg.grounding:
            errors.append(f"{key}: no grounding {ground!r}; pipeline.yaml defines grounding: {sorted(cfg.grounding)}")
    for t, table in cfg.ablations.items():
        if not table.rows:
            errors.append(f"ablations.{t}.rows: a table needs at least one row")
    return errors


register_validator(_validate)


@dataclass(frozen=True)
class HeadContext:
    """What a head may size and initialise itself from: read from the store, never from an encoder."""

    clip_dim: int  # Dc
    video_dim: int  # Dv
    num_frames: int  # L
    num_classes: int  # C
    multi_label: bool
    t0: torch.Tensor  # T0 (C, Dc): initial class text embeddings
    dictionaries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (K, D), (K,)


@dataclass
class Batch:
    """One batch as every head sees it (B videos, L frames, C classes)."""

    vp: torch.Tensor  # VP (B, L, Dc): CLIP frame embeddings
    v: torch.Tensor  # V (B, L, Dv): TimeSformer frame features
    fg: torch.Tensor  # FG (B, L, Dc): foreground crops
    bg: torch.Tensor  # BG (B, L, Dc): backgrounds
    mask: torch.Tensor  # (B, L) bool, True = real frame
    t0: torch.Tensor  # T0 (C, Dc): class-name text embeddings
    dictionaries: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (centroids (K, D), prior (K,))
    labels: torch.Tensor | None = None  # (B,) long or (B, C) float multi-hot
    ids: torch.Tensor | None = None  # (B,) long: each video's position in its split (None outside a split)

    def to(self, device: Any) -> Batch:
        move = lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return dataclasses.replace(
            self,
            vp=move(self.vp),
            v=move(self.v),
            fg=move(self.fg),
            bg=move(self.bg),
            mask=move(self.mask),
            t0=move(self.t0),
            dictionaries={k: (move(c), move(p)) for k, (c, p) in self.dictionaries.items()},
            labels=move(self.labels),
            ids=move(self.ids),
        )


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
