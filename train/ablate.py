"""`ltar ablate`: every row of a named table × task × seed, trained from one cache, written as files.

Outputs in `<runs_root>/ablations/`: `<table>.md` (paste into a paper: each cell the mean over seeds with
its 95% bootstrap interval, and the paired difference to the table's reference row with its interval,
marked where it excludes 0; train/stats.py), `<table>.csv` (one line per row, task, split and metric, with
mean, std, the per-seed values, the interval and the paired difference) and `<table>.png` (bars with the
intervals and the chance level). The runs live in `<runs_root>/ablations/<cache fingerprint>/<run>/`, shared by every
table of that cache (a row that appears in several tables, such as a full head, trains once). Runs
already finished (their `last.pt` reached the last epoch) are reused, so an interrupted ablation
resumes where it stopped; a run folder trained with other settings is refused, never silently reused.
Each split of the cache is read once per table and task (`shared_splits`; the runs' numbers are unchanged). With
`train.stack_seeds: true` the seeds of a row train as one stacked model (train/stacked.py: per-seed runs,
folders and checkpoints as the one-at-a-time path writes them; rows that cannot stack train one seed at a
time); off by default, because on this 2-core CPU it is no faster (bench/train.py, stacked.py's docstring).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.config import AblationTable, Config, to_dict
from train.data import CacheReader
from train.diagnose import diagnose as diagnose_run
from train.diagnose import headline
from train.engine import (
    RunError,
    RunResult,
    dictionary_hashes,
    find_store,
    run_name,
    run_predictions,
    shared_splits,
    train,
)
from train.ground_check import mask_objectives, write_table_check
from train.grounding import grounding_options
from train.heads import ORACLE_ROW, head_options, parse_row
from train.stacked import NotStackable, train_stacked
from train.stats import Interval, chance_level, interval, paired_difference, point

METRICS_WITH_CI = ("acc1", "acc5", "map", "order")  # bootstrapped per video (train.stats); frame IoU is reported as is
DIAGNOSE_SPLIT = "test_ood"  # `ltar ablate --diagnose` reads the split where the confounder breaks

log = logging.getLogger(__name__)

METRIC_LABEL = {
    "acc1": "Acc@1",
    "acc5": "Acc@5",
    "map": "mAP",
    "order": "order confusion",  # same-set pairs: the share of a pair's videos predicted as the other activity
    "ground_iou": "frame IoU",  # grounded heads: frames used vs annotated segments (train.grounding)
    "ground_iou_random": "frame IoU random",  # ... the same number of random frames (exact expectation)
}


@dataclass
class Cell:
    row: str
    task: str
    split: str
    metric: str
    values: list[float]
    ci: Interval | None = None  # mean over seeds with its bootstrap 95% interval (train.stats)
    diff: Interval | None = None  # paired difference to the table's reference row, with its interval

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


@dataclass
class TableResult:
    name: str
    cells: list[Cell]
    seconds: float
    runs: int
    files: list[Path]
    recipe: str = "ours (pipeline.yaml `train`)"  # which training recipe produced the table
    diagnosis: dict[tuple[str, str], str] = field(default_factory=dict)  # (row, task) -> causal-term headline
    reference: str = ""  # the row of the paired differences
    chance: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (task, metric, split) -> chance level
    gap: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (row, task, ood split) -> gap closed


class MissingSplit(RunError):
    """A table needs a split the cache does not hold (the oracle row's train_oracle)."""


def _run_cfg(cfg: Config, row: str, task: str, seed: int) -> Config:
    if row == ORACLE_ROW:  # the bound: the baseline trained on the unconfounded split of the same world
        train = replace(cfg.train, head="baseline", variant=None, grounding=None, train_split="train_oracle")
        return replace(cfg, train=replace(train, task=task, seed=seed))
    head, variant, grounding = parse_row(row)
    return replace(cfg, train=replace(cfg.train, head=head, variant=variant, grounding=grounding, task=task, seed=seed))


def gap_closed(cells: list[Cell], split: str = "test_ood", reference: str = "baseline") -> dict[tuple[str, str], float]:
    """(row, task) -> (ood - ood_baseline) / (ood_oracle - ood_baseline) on the task's primary metric on the ood
    `split`, for a table holding both the `baseline` and the `oracle` rows (0 = the baseline, 1 = the oracle).

    Defined only where there is a gap to close: the oracle above the baseline, by a resolved paired difference
    when the table's `reference` is the baseline (the oracle's Δ is then against it), else by its mean. Where the
    oracle does not beat the baseline (a split whose broken shortcut costs the baseline less than the
    unconfounded training costs it) the ratio's sign and size mean nothing, so it is left out."""
    primary = {(c.row, c.task): c for c in cells if c.split == split and c.metric in ("acc1", "map")}
    out = {}
    for (row, task), cell in primary.items():
        base, oracle = primary.get(("baseline", task)), primary.get((ORACLE_ROW, task))
        if base is None or oracle is None or oracle.mean <= base.mean:
            continue
        if reference == "baseline" and oracle.diff is not None and not oracle.diff.low > 0:  # gap not resolved
            continue
        out[(row, task)] = (cell.mean - base.mean) / (oracle.mean - base.mean)
    return out


def ood_gaps(cells: list[Cell], reference: str = "baseline") -> dict[tuple[str, str, str], float]:
    """(row, task, split) -> `gap_closed` on every ood split of the table (test_ood and one per named confounder)."""
    splits = sorted({c.split for c in cells if c.split.startswith("test_ood")})
    gaps = {split: gap_closed(cells, split, reference) for split in splits}
    return {(row, task, split): v for split, g in gaps.items() for (row, task), v in g.items()}


# train keys that decide where a run lives or how it is read, not what it computes
_NOT_RESULTS = ("runs_root", "memory_budget_mb", "eval_every", "stack_seeds")  # stacked: the same in distribution


def _same(saved: dict, now: Any, ignore: tuple[str, ...] = ()) -> bool:
    """A saved options dict equals the dataclass `now`; a key the saved run predates counts as its default."""
    current, defaults = to_dict(now), to_dict(type(now)())
    keys = set(current) - set(ignore)
    return set(saved) <= set(current) and all(saved.get(k, defaults[k]) == current[k] for k in keys)


def _finished(run_dir: Path, cfg: Config, reader: CacheReader) -> RunResult | None:
    """The finished run in run_dir, None if it has not finished; a run of other settings is an error."""
    last = run_dir / "last.pt"
    if not last.exists():
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    t = cfg.train
    options = head_options(cfg, t.head, t.variant)
    same = {
        "train": _same(ckpt["config"]["train"], t, ignore=_NOT_RESULTS),
        f"heads.{t.head}": _same(ckpt["options"], options),
    }
    if "dictionaries" in ckpt:  # runs from before dictionary hashes were recorded are not checked
        same["dictionaries"] = ckpt["dictionaries"] == dictionary_hashes(cfg, reader)
    if t.grounding:
        same[f"grounding.{t.grounding}"] = _same(
            ckpt.get("grounding_options") or {}, grounding_options(cfg, t.grounding)
        )
    if not all(same.values()):
        differ = " and ".join(f"`{k}`" for k, ok in same.items() if not ok)
        raise RunError(
            f"{run_dir} holds a run trained with other {differ} settings than this table asks for; "
            "remove that folder to retrain it, or set train.runs_root to keep both"
        )
    if ckpt["epoch"] + 1 < cfg.train.epochs:
        return None
    final = ckpt["history"][-1]
    splits = {k.split("/", 1)[0] for k in final if "/" in k}
    metrics = {s: {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(f"{s}/")} for s in splits}
    return RunResult(run_dir, metrics, 0.0, ckpt["step"], ckpt["history"])


def main_metric(task_multi_label: bool) -> list[str]:
    return ["map"] if task_multi_label else ["acc1"]


def order_partners(dataset_root: str | Path, class_names: list[str]) -> np.ndarray | None:
    """(C,) each class's same-set partner (the activity with the same actions in another order), -1 for none,
    from the synthetic world's `world.json` in `dataset_root`; None where the dataset names no such pairs."""
    try:
        world = json.loads((Path(dataset_root) / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    index = {name: i for i, name in enumerate(class_names)}
    named = world.get("world", {}).get("same_set_pairs", [])
    known = [(index[a], index[b]) for a, b in named if a in index and b in index]
    if not known:
        return None
    pairs = np.array(known)  # (P, 2) class indices
    partner = np.full(len(class_names), -1)
    partner[pairs[:, 0]], partner[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    return partner


def run_table(
    cfg: Config,
    name: str,
    seeds: int | None = None,
    store: Path | None = None,
    progress: bool = True,
    diagnose: bool = False,
) -> TableResult:
    """Train and evaluate every row of `ablations.<name>`; write the .md, .csv and .png. `diagnose`: add each
    row's causal-term headline (variation, knock-out by the split mean) on `DIAGNOSE_SPLIT`, seed 0's run."""
    from tqdm import tqdm

    if name not in cfg.ablations:
        raise KeyError(f"no ablation table {name!r}; pipeline.yaml defines {sorted(cfg.ablations)}")
    table: AblationTable = cfg.ablations[name]
    store = find_store(cfg, store)  # once: every run of the table reads the same cache
    reader = CacheReader(store, cfg.train.task, allow_partial=True)
    if ORACLE_ROW in table.rows and "train_oracle" not in reader.info.splits:
        raise MissingSplit(
            f"table {name!r} has the `oracle` row, but the cache {store} has no train_oracle split; render it with "
            "synthetic.videos.train_oracle > 0 and extract again (`make benchmark` does both)"
        )
    n_seeds = seeds or table.seeds
    out_root = Path(cfg.train.runs_root) / "ablations"
    t0 = time.perf_counter()
    results: dict[tuple[str, str], list[RunResult]] = {}
    diagnosis: dict[tuple[str, str], str] = {}
    checks: dict[str, tuple] = {}  # grounded row -> its fixed-mask objectives (ground_check tables)
    seeds_run = [cfg.train.seed + s for s in range(n_seeds)]
    groups = [(row, task) for row in table.rows for task in table.tasks]  # the table's order
    bar = tqdm(total=len(groups) * n_seeds, desc=f"ablate {name}", unit="run", disable=not progress)
    for task in table.tasks:  # one task's splits in memory at a time (the labels, and so the rows, are the task's)
        with shared_splits():  # the task's runs read each split of the cache once
            for row in table.rows:
                cfgs = [_run_cfg(cfg, row, task, seed) for seed in seeds_run]
                dirs = [out_root / reader.fingerprint / run_name(c) for c in cfgs]  # shared by every table of the cache
                runs = [_finished(d, c, reader) for d, c in zip(dirs, cfgs, strict=True)]
                todo = [i for i, r in enumerate(runs) if r is None]
                if cfg.train.stack_seeds and len(todo) > 1:  # the row's seeds as one stacked model (train.stacked)
                    try:
                        stacked = train_stacked([cfgs[i] for i in todo], store, [dirs[i] for i in todo])
                        for i, r in zip(todo, stacked, strict=True):
                            runs[i] = r
                    except NotStackable as e:
                        log.info("training the seeds of row %s (%s) one at a time: %s", row, task, e)
                for i, (c, d) in enumerate(zip(cfgs, dirs, strict=True)):
                    runs[i] = runs[i] or train(c, store=store, resume=True, progress=False, run_dir=d)
                bar.update(n_seeds)
                results[(row, task)] = runs
                if diagnose and DIAGNOSE_SPLIT in reader.info.splits:  # seed 0's run
                    rows, _ = diagnose_run(dirs[0], DIAGNOSE_SPLIT, store=store)
                    diagnosis[(row, task)] = headline(rows)
                grounding = grounding_options(cfg, cfgs[0].train.grounding)
                checkable = grounding is not None and grounding.method != "none" and grounding.indicator != "oracle"
                if table.ground_check and checkable:
                    checks[row if len(table.tasks) == 1 else f"{row} ({task})"] = mask_objectives(
                        dirs[0], "train", store
                    )
    results = {k: results[k] for k in groups}  # rows in the table's order, each row's tasks together
    bar.close()
    cells = []
    chance: dict[tuple[str, str, str], float] = {}
    predictions: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}  # (row, task, split) -> (S,N,C), labels
    partners: dict[str, np.ndarray | None] = {}  # single-label task -> (C,) each class's same-set partner
    for (row, task), runs in results.items():
        splits = sorted(runs[0].metrics)
        multi = "acc1" not in runs[0].metrics[splits[0]]
        if table.order_confusion and not multi and task not in partners:
            names = CacheReader(store, task, allow_partial=True).class_names
            partners[task] = order_partners(cfg.dataset.root, names)
            if partners[task] is None:
                where = Path(cfg.dataset.root) / "world.json"
                log.warning(f"table {name}: {where} names no same-set pairs of {task} classes; no order confusion")
        order = ["order"] if partners.get(task) is not None and not multi else []
        for split in splits:
            stacked = [run_predictions(r.run_dir, split, store) for r in runs]
            if any(not np.array_equal(p[2], stacked[0][2]) for p in stacked):
                raise RunError(f"the runs of row {row!r} ({task}) scored different videos of {split}; retrain them")
            scores, labels = np.stack([p[0] for p in stacked]), stacked[0][1]
            predictions[(row, task, split)] = (scores, labels)
            grounded = [m for m in ("ground_iou", "ground_iou_random") if m in runs[0].metrics[split]]
            for metric in main_metric(multi) + grounded:
                cell = Cell(row, task, split, metric, [r.metrics[split][metric] for r in runs])
                if metric in METRICS_WITH_CI:
                    cell.ci = interval(scores, labels, metric)
                    chance[(task, metric, split)] = chance_level(labels, metric, scores.shape[-1])
                cells.append(cell)
            for metric in order:  # on the videos of the paired activities only
                partner = partners[task]
                paired = partner[labels] >= 0  # (N,)
                if paired.any():
                    s, y = scores[:, paired], labels[paired]
                    values = [point(s[i : i + 1], y, metric, partner) for i in range(len(s))]
                    cells.append(Cell(row, task, split, metric, values, interval(s, y, metric, partner=partner)))
                    chance[(task, metric, split)] = chance_level(y, metric, scores.shape[-1])
    reference = table.reference or table.rows[0]
    for cell in cells:
        ref = predictions.get((reference, cell.task, cell.split))
        if cell.ci is not None and ref is not None:
            scores, labels = predictions[(cell.row, cell.task, cell.split)]
            if not np.array_equal(labels, ref[1]):
                raise RunError(f"rows {cell.row!r} and {reference!r} scored different videos of {cell.split}")
            reference_scores, partner = ref[0], partners.get(cell.task)
            if cell.metric == "order":
                paired = partner[labels] >= 0
                scores, reference_scores, labels = scores[:, paired], reference_scores[:, paired], labels[paired]
            cell.diff = paired_difference(scores, reference_scores, labels, cell.metric, partner=partner)
    recipe = cfg.train.recipe
    file_name = name if recipe is None else f"{name}@{recipe}"  # a paper recipe's table beside ours
    source = "ours (pipeline.yaml `train`)" if recipe is None else f"`{recipe}`: {cfg.recipes[recipe].source}"
    result = TableResult(
        file_name,
        cells,
        time.perf_counter() - t0,
        len(groups) * n_seeds,
        [],
        source,
        diagnosis,
        reference,
        chance,
        ood_gaps(cells, reference),
    )
    result.files = write_table(result, table, out_root, n_seeds)
    if checks:
        result.files += write_table_check(checks, out_root, file_name)
    return result


def _columns(cells: list[Cell]) -> list[tuple[str, str, str]]:
    seen: dict[tuple[str, str, str], None] = {}
    for c in cells:
        seen[(c.task, c.metric, c.split)] = None
    return list(seen)


def _ci(x: Interval | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * x.estimate)} [{f.format(100 * x.low)}, {f.format(100 * x.high)}]"


def write_table(result: TableResult, table: AblationTable, out_root: Path, seeds: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_root.mkdir(parents=True, exist_ok=True)
    rows = list(dict.fromkeys(c.row for c in result.cells))
    cols = _columns(result.cells)
    by = {(c.row, c.task, c.metric, c.split): c for c in result.cells}
    header = []
    for t, m, s in cols:
        header.append(f"{t} {METRIC_LABEL[m]} {s}")
        if m in METRICS_WITH_CI:
            header.append("Δ")
    gap_cols = list(dict.fromkeys((t, s) for _, t, s in result.gap))
    header += [f"{t} gap closed ({s})" for t, s in gap_cols]
    tasks = list(dict.fromkeys(c.task for c in result.cells)) if result.diagnosis else []
    header += [f"{t} diagnosis ({DIAGNOSE_SPLIT}, seed 0)" for t in tasks]
    lines = []
    if table.caption:
        lines += [table.caption, ""]
    lines.append(
        f"Table `{result.name}`: all numbers in %. Each cell: the mean over {seeds} seed(s) and its 95% "
        "bootstrap interval (test videos and seeds resampled); Δ: the paired difference to the reference row "
        f"`{result.reference}` on the same videos and seeds, with its 95% interval; * marks a Δ whose interval "
        "excludes 0 (a difference the split can resolve)."
    )
    if result.gap:
        lines.append(
            "Gap closed: (ood - ood of `baseline`) / (ood of `oracle` - ood of `baseline`) on the primary metric; "
            "`oracle` is the baseline trained on an unconfounded training split of the same size."
        )
    if any(c.metric == "order" for c in result.cells):
        lines.append(
            "Order confusion: on the videos of the activity pairs that hold the same actions in another order, the "
            "share predicted as the pair's other activity (lower is better; its chance level is 1/C)."
        )
    if result.chance:
        levels = ", ".join(f"{t} {METRIC_LABEL[m]} {s} {100 * v:.1f}" for (t, m, s), v in result.chance.items())
        lines.append(f"Chance levels: {levels}.")
    lines.append(f"Training recipe: {result.recipe}.")
    lines.append("")
    lines.append("| row | " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - len(tasks)) + "---|" * len(tasks))
    for r in rows:
        vals = []
        for t, m, s in cols:
            c = by.get((r, t, m, s))
            if m not in METRICS_WITH_CI:
                vals.append(f"{100 * c.mean:.1f} ± {100 * c.std:.1f}" if c else "—")
                continue
            vals.append(_ci(c.ci) if c else "—")
            if c is None or c.diff is None:
                vals.append("—")
            elif r == result.reference:
                vals.append("ref")
            else:
                vals.append(_ci(c.diff, signed=True) + (" *" if c.diff.excludes_zero() else ""))
        vals += [f"{result.gap[(r, t, s)]:.2f}" if (r, t, s) in result.gap else "—" for t, s in gap_cols]
        vals += [result.diagnosis.get((r, t), "—") for t in tasks]
        lines.append(f"| {r} | " + " | ".join(vals) + " |")
    md = out_root / f"{result.name}.md"
    md.write_text("\n".join(lines) + "\n")

    path_csv = out_root / f"{result.name}.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["row", "task", "split", "metric", "mean", "std", "seeds", "values"]
            + ["ci_low", "ci_high", "reference", "diff", "diff_low", "diff_high", "diff_excludes_0"]
        )
        num = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
        for c in result.cells:
            ci, d = c.ci, c.diff
            w.writerow(
                [
                    c.row,
                    c.task,
                    c.split,
                    c.metric,
                    f"{c.mean:.6f}",
                    f"{c.std:.6f}",
                    len(c.values),
                    " ".join(f"{v:.6f}" for v in c.values),
                    num(ci and ci.low),
                    num(ci and ci.high),
                    result.reference,
                    num(d and d.estimate),
                    num(d and d.low),
                    num(d and d.high),
                    "" if d is None else int(d.excludes_zero()),
                ]
            )
        for (row, task, split), value in result.gap.items():  # the gap closed: a derived number, no interval
            w.writerow([row, task, split, "gap_closed", f"{value:.6f}"] + [""] * 10)

    fig, axes = plt.subplots(
        1, len(cols), figsize=(max(4.0, 1.0 + 0.7 * len(rows)) * len(cols) / 1.5, 3.6), squeeze=False
    )
    for ax, (t, m, s) in zip(axes[0], cols, strict=True):
        cs = [by.get((r, t, m, s)) for r in rows]
        means = [100 * (c.ci.estimate if c.ci else c.mean) if c else 0 for c in cs]
        low = [100 * (c.ci.estimate - c.ci.low) if c and c.ci else (100 * c.std if c else 0) for c in cs]
        high = [100 * (c.ci.high - c.ci.estimate) if c and c.ci else (100 * c.std if c else 0) for c in cs]
        ax.bar(range(len(rows)), means, yerr=[low, high], capsize=3, color="#4C72B0")
        if (t, m, s) in result.chance:
            ax.axhline(100 * result.chance[(t, m, s)], color="tab:red", lw=1, ls="--", label="chance")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{t} {METRIC_LABEL[m]} ({s})", fontsize=9)
        ax.set_ylim(0, 100)
    fig.suptitle(f"{result.name} (mean over {seeds} seeds, 95% bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    png = out_root / f"{result.name}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [md, path_csv, png]
