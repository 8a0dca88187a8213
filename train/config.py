"""Stage 2's configuration sections (`train`, `heads`, `grounding`, `ablations`, `recipes`), registered with the
contract's loader (extract/contract/config.py), which checks every key with its full path.

`heads.<name>` and `grounding.<name>` are checked against the head and grounding registries (train.heads,
train.grounding); tables (`ablations`) and recipes are usually folders of one YAML file each (configs/tables,
configs/recipes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from extract.contract.config import (
    Config,
    ConfigError,
    bounds,
    build_section,
    register_display,
    register_section,
    register_transform,
    register_validator,
    to_dict,
)

_range = bounds


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds torch, numpy and the data order
    epochs: int = field(default=30, metadata=_range(1))  # passes over the training split
    lr: float = field(default=1e-3, metadata=_range(0.0))  # AdamW peak learning rate (cosine decay after warm-up)
    batch_size: int = field(default=32, metadata=_range(1))  # videos per step
    weight_decay: float = field(default=0.05, metadata=_range(0.0))  # AdamW decoupled weight decay
    warmup_epochs: float = field(default=2.0, metadata=_range(0.0))  # linear warm-up before the cosine
    grad_clip: float = field(default=1.0, metadata=_range(0.0))  # max gradient norm; 0 = no clipping
    task: str = "activity"  # label task: activity (single label, CE) or atomic (multi-label, BCE)
    # L' frames the heads see, uniformly subsampled from the cache's L slots (null = all L; the cache is unchanged)
    num_frames: int | None = field(default=None, metadata=_range(1))
    optimizer: Literal["adamw", "adam"] = "adamw"  # AdamW (decoupled weight decay) | Adam (L2 weight decay)
    schedule: Literal["cosine", "step"] = "cosine"  # after warm-up: cosine decay to 0 | × step_gamma every step_epochs
    step_epochs: int = field(default=4, metadata=_range(1))  # schedule step: the decay interval in epochs
    step_gamma: float = field(default=0.1, metadata=_range(0.0, 1.0))  # schedule step: the decay factor
    # a named paper recipe (`recipes.<name>`): its train keys and head options replace the file's; null = ours
    recipe: str | None = None
    train_split: str = "train"  # the split the head trains on (`train_oracle` for the oracle bound row)
    head: str = "baseline"  # registered head (`ltar config show` lists them)
    variant: str | None = None  # a named variant of the head (heads.<head>.variants), null = the full head
    grounding: str | None = None  # a named grounding intervention around the head (grounding.<name>), null = none
    device: str = "auto"  # auto = cuda when available, else cpu
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    # the autocast dtype of `amp`: bfloat16 (fp32's exponent range, no loss scaling: a row's seeds can stack) |
    # float16 (a GradScaler; stacked seeds are refused, one scaler would couple them). A run from before this key
    # that kept a GradScaler's state trained in float16 (train.engine.saved_train)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # split that picks best.pt by its primary metric; null = best is the last epoch (never select on test)
    select_split: str | None = None
    eval_splits: tuple[str, ...] = ()  # splits evaluated after training; empty = every split except train
    eval_every: int = field(default=1, metadata=_range(1))  # evaluate every N epochs (and always after the last)
    memory_budget_mb: int = field(default=4096, metadata=_range(1))  # larger splits stream chunk-wise from Zarr
    # `ltar ablate`: true = the seeds of a row train as one stacked model (train/stacked.py); false = one at a time
    stack_seeds: bool = False
    # `ltar ablate`: processes that train runs side by side, each with cores // workers threads (train.ablate);
    # 1 = one run at a time in this process, today's path
    workers: int = field(default=1, metadata=_range(1, 64))
    # `ltar ablate`: the runs as dask tasks, one per worker at a time: local:N (a LocalCluster of N worker processes,
    # cores // N threads each) or a running scheduler's address, tcp://host:port (one worker per GPU); set, it
    # replaces `workers`. null = no dask (extract/scale.py connects)
    scheduler: str | None = None
    # runs land in <runs_root>/<head>[-<variant>][+<grounding>][-f<L>][-<train_split>][@<recipe>]-<task>-s<seed>/
    runs_root: str = "runs"


@dataclass(frozen=True)
class Recipe:
    """A paper's training recipe (`train.recipe`): the `train` keys and head options it sets over the file's."""

    source: str = ""  # where the paper states it, and what it leaves unstated (kept from `train`)
    train: dict[str, Any] = field(default_factory=dict)  # keys of `train` (not recipe, head, variant, task, seed)
    heads: dict[str, Any] = field(default_factory=dict)  # head name -> {option: value}


RECIPE_FORBIDDEN = ("recipe", "head", "variant", "grounding", "task", "seed", "runs_root", "device", "train_split")


@dataclass(frozen=True)
class AblationTable:
    rows: tuple[str, ...] = ()  # `head`, `head:variant`, optionally `+grounding` (`ecrl+igv`), one row each
    tasks: tuple[str, ...] = ("activity",)  # each row is trained and evaluated on every task listed
    seeds: int = field(default=3, metadata=_range(1))  # each cell rests on this many seeds (`--seeds` overrides)
    caption: str = ""  # written above the table
    # the row every paired difference is taken against (null = the first row); `previous`: each row against the row
    # above it (a chain whose rows change one thing at a time)
    reference: str | None = None
    # single-label tasks: also report the confusion of the same-set activity pairs (they differ only in the
    # order of their actions; the synthetic world's world.json names them), lower is better
    order_confusion: bool = False
    # rows with a grounding indicator (IGV / EIGV): also `ltar ground-check` on seed 0's run (train split), their
    # training objective under fixed masks, written as <table>-ground-check.md / .csv
    ground_check: bool = False


def _cross_checks(cfg: Config) -> list[str]:
    """Recipes, tables and `train.recipe` against each other (a single field's type cannot say these)."""
    errors = []
    for name, recipe in cfg.recipes.items():
        bad = sorted(set(recipe.train) & set(RECIPE_FORBIDDEN))
        if bad:
            errors.append(f"recipes.{name}.train: a recipe sets how a run trains, not which run it is; drop {bad}")
        try:
            build_section(TrainConfig, {k: v for k, v in recipe.train.items() if k not in bad}, f"recipes.{name}.train")
        except ConfigError as e:
            errors.append(str(e))
    for name, table in cfg.ablations.items():
        if table.reference not in (None, "previous") and table.reference not in table.rows:
            errors.append(
                f"ablations.{name}.reference: {table.reference!r} is not one of the table's rows {list(table.rows)} "
                "(or `previous`: each row against the row above it)"
            )
    if cfg.train.recipe is not None and cfg.train.recipe not in cfg.recipes:
        errors.append(
            f"train.recipe: no recipe {cfg.train.recipe!r}; pipeline.yaml defines recipes: {sorted(cfg.recipes)}"
        )
    return errors


def apply_recipe(data: dict) -> dict:
    """The raw mapping with `train.recipe`'s train keys and head options written over the file's (a copy)."""
    name = (data.get("train") or {}).get("recipe")
    recipe = ((data.get("recipes") or {}).get(name) or {}) if name is not None else {}
    if not isinstance(recipe, dict) or not recipe:
        return data  # no recipe, or an unknown one (reported by the cross-checks with the names there are)
    data = copy.deepcopy(data)
    train = {k: v for k, v in (recipe.get("train") or {}).items() if k not in RECIPE_FORBIDDEN}
    data["train"] = {**(data.get("train") or {}), **train}
    for head, options in (recipe.get("heads") or {}).items():
        heads = data.setdefault("heads", {}) or {}
        data["heads"] = heads
        heads[head] = {**(heads.get(head) or {}), **(options or {})}
    return data


def _registries(cfg: Config) -> list[str]:
    """Heads, variants, groundings and table rows against the registries (imported here: the head modules import
    the contract, not this module)."""
    from train import grounding
    from train.heads.registry import ORACLE_ROW, head_names, head_options, parse_row, row_frames, variant_names

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


register_section("train", TrainConfig, order=100, stage="train")
# head name -> its options and `variants`; checked against the head's own typed config (train.heads)
register_section("heads", dict[str, Any], order=110, stage="train")
# name -> grounding options (IGV / EIGV / STR rationales around any head); checked by train.grounding
register_section("grounding", dict[str, Any], order=120, stage="train")
register_section("ablations", dict[str, AblationTable], order=130, stage="train")  # named tables for `ltar ablate`
register_section("recipes", dict[str, Recipe], order=140, stage="train")  # the papers' training recipes, by name


def _heads_resolved(cfg: Config) -> dict[str, Any]:
    """Every registered head's options as they resolve (the defaults in its options dataclass, the config's
    overrides) and its variants (built in, then the config's), for `ltar config show`."""
    from train.heads.registry import head_entry, head_names, head_options

    out = {}
    for name in head_names():
        user = (cfg.heads.get(name) or {}).get("variants") or {}
        variants = {**head_entry(name).builtin_variants, **user}
        out[name] = {**to_dict(head_options(cfg, name)), "variants": to_dict(variants)}
    return out


register_transform(apply_recipe)
register_display("heads", _heads_resolved)
register_validator(_cross_checks)
register_validator(_registries)
