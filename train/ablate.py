"""`ltar ablate`: every row of a named table × task × seed, trained from one cache, written as files.

Outputs in `<runs_root>/ablations/`: `<table>.md` (paste into a paper: each cell the mean over seeds with
its 95% interval counting test-video and training-seed noise, and the paired difference to the table's
reference row with its interval, starred where it survives Holm's correction over the table's Δ cells;
train/stats.py), `<table>.csv` (one line per row, task, split and metric: mean, std, the per-seed values, the
interval with its standard error and degrees of freedom, the paired difference with its uncorrected interval,
p and Holm-adjusted p; and each gap closed with its Fieller interval) and `<table>.png` (bars with the
intervals and the chance level). The runs live in `<runs_root>/ablations/<cache fingerprint>/<run>/`, shared by every
table of that cache (a row that appears in several tables, such as a full head, trains once). Runs
already finished (their `last.pt` reached the last epoch) are reused, so an interrupted ablation
resumes where it stopped; a run folder trained with other settings is refused, never silently reused.
Each split of the cache is read once per table and task (`shared_splits`; the runs' numbers are unchanged). With
`train.stack_seeds: true` the seeds of a row train as one stacked model (train/stacked.py: per-seed runs,
folders and checkpoints as the one-at-a-time path writes them; rows that cannot stack train one seed at a
time); off by default, because on this 2-core CPU it is no faster (bench/train.py, stacked.py's docstring).
The runs train in this process one at a time, in `train.workers` processes side by side, or as dask tasks with
`train.scheduler` (`--scheduler local:N | tcp://HOST:PORT`, extract/scale.py connects; `_train_units`): a run's
predictions and metrics are the same bytes as when it trains alone at its thread count. A failed run is reported,
the others finish, and the table then raises one RunError naming the failed runs; a re-run trains only those.
"""

from __future__ import annotations

import csv
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.contract.config import Config, ConfigError
from extract.contract.schema import CacheError
from train.config import AblationTable
from train.data import CacheReader
from train.diagnose import diagnose as diagnose_run
from train.diagnose import headline
from train.engine import (
    _NOT_RESULTS,
    INIT_SCHEME,
    RunError,
    RunResult,
    architecture,
    changed_keys,
    dictionary_hashes,
    find_store,
    new_model,
    read_checkpoint,
    run_name,
    run_predictions,
    saved_train,
    shared_splits,
    train,
)
from train.ground_check import mask_objectives, write_table_check
from train.grounding import grounding_options
from train.heads import ORACLE_ROW, head_options, parse_row, row_frames
from train.stacked import NotStackable, train_stacked
from train.stats import LEVEL, GapClosed, Interval, Replicates, chance_level, fieller_ratio, holm, replicates

METRICS_WITH_CI = ("acc1", "acc5", "map", "order")  # intervals per video and seed (train.stats); frame IoU as is
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
    ci: Interval | None = None  # mean over seeds with its 95% interval (train.stats)
    diff: Interval | None = None  # paired difference to the table's reference row, with its uncorrected interval
    p_holm: float | None = None  # the difference's p, Holm-adjusted over the table's Δ cells
    rep: Replicates | None = None  # what the intervals are computed from (per-seed values, leave-one-video-out)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def star(self) -> bool:
        """The difference survives the table's family-wise correction (Holm, at 1 - LEVEL)."""
        return self.p_holm is not None and self.p_holm < 1 - LEVEL


@dataclass
class TableResult:
    name: str
    cells: list[Cell]
    seconds: float
    runs: int
    files: list[Path]
    recipe: str = "ours (pipeline.yaml `train`)"  # which training recipe produced the table
    diagnosis: dict[tuple[str, str], str] = field(default_factory=dict)  # (row, task) -> causal-term headline
    reference: str = ""  # the row of the paired differences, or `previous` (each row against the row above it)
    chance: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (task, metric, split) -> chance level
    gap: dict[tuple[str, str, str], GapClosed] = field(default_factory=dict)  # (row, task, ood split) -> gap closed
    family: int = 0  # how many Δ cells the correction runs over
    references: dict[str, str] = field(default_factory=dict)  # row -> the row its Δ is taken against


class MissingSplit(RunError):
    """A table needs a split the cache does not hold (the oracle row's train_oracle)."""


def _run_cfg(cfg: Config, row: str, task: str, seed: int) -> Config:
    if row == ORACLE_ROW:  # the bound: the baseline trained on the unconfounded split of the same world
        train = replace(cfg.train, head="baseline", variant=None, grounding=None, train_split="train_oracle")
        return replace(cfg, train=replace(train, task=task, seed=seed))
    head, variant, grounding = parse_row(row)
    frames = row_frames(row)  # `<row>/f<L'>`: this row on L' of the cache's frames (a frames ablation)
    train = replace(cfg.train, num_frames=frames) if frames is not None else cfg.train
    return replace(cfg, train=replace(train, head=head, variant=variant, grounding=grounding, task=task, seed=seed))


def gap_closed(cells: list[Cell], split: str = "test_ood") -> dict[tuple[str, str], GapClosed]:
    """(row, task) -> (ood - ood_baseline) / (ood_oracle - ood_baseline) on the task's primary metric on the ood
    `split` with Fieller's 95% interval (train.stats.fieller_ratio), for a table holding the `baseline` and the
    `oracle` rows (0 = the baseline, 1 = the oracle). Numerator and denominator are paired differences on the
    same videos and seeds.

    Left out where the oracle does not beat the baseline on average (a split whose broken shortcut costs the
    baseline less than unconfounded training costs it: there is no gap, and the ratio's sign means nothing);
    `unstable` (no interval) where it does, but the gap is not resolved from 0."""
    primary = {(c.row, c.task): c for c in cells if c.split == split and c.metric in ("acc1", "map") and c.rep}
    out = {}
    for (row, task), cell in primary.items():
        base, oracle = primary.get(("baseline", task)), primary.get((ORACLE_ROW, task))
        if base is None or oracle is None or oracle.rep.estimate <= base.rep.estimate:
            continue
        out[(row, task)] = fieller_ratio(cell.rep - base.rep, oracle.rep - base.rep)
    return out


def ood_gaps(cells: list[Cell]) -> dict[tuple[str, str, str], GapClosed]:
    """(row, task, split) -> `gap_closed` on every ood split of the table (test_ood and one per named confounder)."""
    splits = sorted({c.split for c in cells if c.split.startswith("test_ood")})
    gaps = {split: gap_closed(cells, split) for split in splits}
    return {(row, task, split): v for split, g in gaps.items() for (row, task), v in g.items()}


def references(table_rows: list[str] | tuple[str, ...], reference: str | None) -> dict[str, str]:
    """row -> the row its paired Δ is taken against: the table's reference (default its first row), or with
    `previous` the row above it (the first row is its own reference)."""
    if reference == "previous":
        return {row: table_rows[max(i - 1, 0)] for i, row in enumerate(table_rows)}
    return dict.fromkeys(table_rows, reference or table_rows[0])


def correct(cells: list[Cell], reference: str | dict[str, str]) -> int:
    """Holm's correction over every Δ cell of the table (each row but its own reference, each task, split and
    metric with an interval): sets `p_holm`; returns the family's size. reference: one row, or row -> its row."""
    ref = reference if isinstance(reference, dict) else None
    family = [c for c in cells if c.diff is not None and c.row != (ref[c.row] if ref else reference)]
    for c, p in zip(family, holm(np.array([c.diff.p for c in family])), strict=True):
        c.p_holm = float(p)
    return len(family)


def _same(saved: dict, now: Any, ignore: tuple[str, ...] = ()) -> bool:
    """A saved options dict equals the dataclass `now` (see `train.engine.changed_keys`)."""
    return not changed_keys(saved, now, ignore)


@functools.lru_cache(maxsize=256)
def _context(store: Path, task: str, num_frames: int | None) -> Any:
    return CacheReader(store, task, allow_partial=True, num_frames=num_frames).context()


def _architecture(cfg: Config, store: Path) -> str:
    """The module layout a run of this row would have now (the digest `end_epoch` records)."""
    t = cfg.train
    return architecture(new_model(cfg, _context(store, t.task, t.num_frames), t.seed))


def _finished(run_dir: Path, cfg: Config, reader: CacheReader) -> RunResult | None:
    """The finished run in run_dir, None if it has not finished; a run of other settings is an error."""
    last = run_dir / "last.pt"
    if not last.exists():
        return None
    ckpt = read_checkpoint(last)
    t = cfg.train
    options = head_options(cfg, t.head, t.variant)
    same = {
        "train": _same(saved_train(ckpt), t, ignore=_NOT_RESULTS),
        f"heads.{t.head}": _same(ckpt["options"], options),
    }
    same["initialisation"] = ckpt.get("init") == INIT_SCHEME  # other initial weights: another run
    # another module layout: the head's form changed since (its saved predictions would be read as this row's)
    same["architecture"] = ckpt.get("architecture") == _architecture(cfg, reader.path)
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


def order_partners(pairs: list[tuple[str, str]], class_names: list[str]) -> np.ndarray | None:
    """(C,) each class's same-set partner (the activity with the same actions in another order), -1 for none, from
    the store's `same_set_pairs` (the dataset's, written by stage 1); None where it names no such pairs."""
    index = {name: i for i, name in enumerate(class_names)}
    known = [(index[a], index[b]) for a, b in pairs if a in index and b in index]
    if not known:
        return None
    pairs_ = np.array(known)  # (P, 2) class indices
    partner = np.full(len(class_names), -1)
    partner[pairs_[:, 0]], partner[pairs_[:, 1]] = pairs_[:, 1], pairs_[:, 0]
    return partner


def train_unit(cfgs: list[Config], store: Path, dirs: list[Path], stack: bool) -> list[RunResult]:
    """Train (or resume) the runs `cfgs` of one row and task into `dirs`: stacked when `stack` and the row can
    stack (train.stacked), else one at a time; returns their results in order."""
    runs: list[RunResult | None] = [None] * len(cfgs)
    if stack and len(cfgs) > 1:
        try:
            runs = list(train_stacked(cfgs, store, dirs))
        except NotStackable as e:
            log.info("training the seeds of %s one at a time: %s", run_name(cfgs[0]), e)
    return [
        r or train(c, store=store, resume=True, progress=False, run_dir=d)
        for r, c, d in zip(runs, cfgs, dirs, strict=True)
    ]


_WORKER = ExitStack()  # in a worker process: its `shared_splits` block, open for the worker's life


def _start_worker(threads: int, level: int) -> None:
    """A worker process of `_train_units`: `threads` intra-op threads (its share of the cores), the parent's log
    level, and the splits of the cache read once for all the runs it trains (the pool lives for one task)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _WORKER.enter_context(shared_splits())


_DASK: dict[str, Any] = {}  # in a dask worker: "token" -> the `shared_splits` block of the table task it serves


def _release_splits(token: str | None = None) -> None:
    """In a dask worker: close the splits block of table task `token` (None: whichever is open)."""
    if "stack" in _DASK and token in (None, _DASK["token"]):
        _DASK.pop("stack").close()
        _DASK.pop("token")


def _dask_unit(cfgs: list[Config], store: Path, dirs: list[Path], stack: bool, token: str) -> list[RunResult]:
    """A cluster task (extract/scale.py's task farm sets its threads, log level and GPU): `train_unit`, with the
    splits read once per worker for table task `token` (an earlier task's are dropped, so a long-lived worker
    holds one task's splits at most)."""
    if _DASK.get("token") != token:
        _release_splits()
        _DASK["stack"], _DASK["token"] = ExitStack(), token
        _DASK["stack"].enter_context(shared_splits())
    return train_unit(cfgs, store, dirs, stack)


@dataclass
class Scheduler:
    """`train.scheduler`'s task farm (extract/contract/cluster.py), connected when a table first has runs to train
    (a table whose runs are all finished starts no cluster) and closed with the table (`exits`)."""

    address: str
    exits: ExitStack
    farm: Any = None

    def connect(self) -> Any:
        from extract.contract.cluster import task_farm

        if self.farm is None:
            try:
                self.farm = task_farm(self.address, self.exits)
                self.farm.connect()
            except RuntimeError as e:  # ltar's own sentences (ExtractError, no farm registered)
                raise RunError(f"{e} (train.scheduler; null trains without dask)") from None
        return self.farm


SENTENCES = (RunError, ConfigError, CacheError)  # errors whose message is a sentence for the user


def _sentence(e: BaseException) -> str:
    """One line saying why a unit failed: ltar's own sentence, else the exception's type and first line."""
    if isinstance(e, SENTENCES):
        return str(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


Unit = tuple[str, list[int]]  # a row and the indices of its seeds trained together


def _train_units(
    cfg: Config,
    store: Path,
    cfgs: dict[str, list[Config]],
    dirs: dict[str, list[Path]],
    units: list[Unit],
    done: Callable[[int], Any],
    scheduler: Scheduler | None = None,
) -> Iterator[tuple[Unit, list[RunResult] | None, str | None]]:
    """Train every unit (a row and the indices of its seeds to train together), yielding each with its results, or
    with None and the sentence saying why it failed.

    `train.scheduler` set: each unit is a dask task (`_dask_unit`; one per worker at a time, `local:N` workers with
    cores // N threads each). Else `train.workers: 1`: in this process, in the table's order (today's path). More:
    `workers` processes (spawned, so no thread pool is inherited mid-use), each with cores // workers threads and its
    own `shared_splits`; a free worker takes the next unit. A run's numbers then equal the one-at-a-time path's at
    that thread count, to the bytes of its predictions and metrics (tests/train/test_stacked.py), and match today's
    path in distribution, not bitwise: intra-op threads change the order of float reductions. Each run still
    trains in its own folder under its own lock, checkpointing every epoch, so a killed table resumes per run as
    before. A failing unit is reported (`log.error`, with its traceback where the error is not one of ltar's
    sentences) and the others go on; `done` counts the runs finished."""
    stack = cfg.train.stack_seeds

    def args(unit: Unit) -> tuple[list[Config], list[Path]]:
        row, idx = unit
        return [cfgs[row][i] for i in idx], [dirs[row][i] for i in idx]

    def outcome(unit: Unit, result: Callable[[], list[RunResult]]) -> tuple[Unit, list[RunResult] | None, str | None]:
        try:
            runs = result()
        except Exception as e:  # noqa: BLE001 - one unit's failure is reported; the table's other runs go on
            names = ", ".join(run_name(c) for c in args(unit)[0])
            trace = None if isinstance(e, SENTENCES) else e  # not a sentence of ours: a bug's traceback helps
            log.error("run(s) %s failed: %s; the table's other runs go on", names, _sentence(e), exc_info=trace)
            return unit, None, _sentence(e)
        done(len(unit[1]))
        return unit, runs, None

    if scheduler is not None and units:
        yield from _dask_units(store, units, args, outcome, stack, scheduler)
        return
    if cfg.train.workers == 1 or len(units) < 2:
        for unit in units:
            unit_cfgs, unit_dirs = args(unit)
            yield outcome(unit, lambda c=unit_cfgs, d=unit_dirs: train_unit(c, store, d, stack))
        return
    workers = min(cfg.train.workers, len(units))
    threads = max(1, torch.get_num_threads() // workers)
    log.info("training %d runs in %d worker processes, %d thread(s) each", len(units), workers, threads)
    context = multiprocessing.get_context("spawn")
    init = (threads, logging.getLogger().getEffectiveLevel())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=init) as pool:
        futures = {pool.submit(train_unit, args(unit)[0], store, args(unit)[1], stack): unit for unit in units}
        try:
            for future in as_completed(futures):
                yield outcome(futures[future], future.result)
        except BaseException:  # interrupted: the units running finish, the ones not started are cancelled
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _dask_units(
    store: Path,
    units: list[Unit],
    args: Callable[[Unit], tuple[list[Config], list[Path]]],
    outcome: Callable[..., tuple[Unit, list[RunResult] | None, str | None]],
    stack: bool,
    scheduler: Scheduler,
) -> Iterator[tuple[Unit, list[RunResult] | None, str | None]]:
    """`_train_units` on the task farm: every unit a task, handed to the worker whose run just ended in the table's
    order, its outcome yielded as it completes. Paths go absolute (workers of a running cluster share the
    filesystem, not the driver's working directory); a task whose worker died is run again (the run resumes from
    its last epoch)."""
    import uuid

    farm = scheduler.connect()
    token = uuid.uuid4().hex  # this call's tasks, and the splits the workers keep for them
    calls = []
    for unit in units:
        cfgs, dirs = args(unit)
        key = f"ltar-train-{run_name(cfgs[0])}-{'-'.join(map(str, unit[1]))}-{token[:8]}"
        cfg_abs, dirs_abs = [_absolute(c) for c in cfgs], [Path(d).absolute() for d in dirs]
        calls.append((key, _dask_unit, (cfg_abs, Path(store).absolute(), dirs_abs, stack, token)))
    try:
        for i, result in farm.run(calls, finish=(_release_splits, (token,))):
            yield outcome(units[i], result)
    except RuntimeError as e:  # no workers left (ExtractError): a sentence
        raise RunError(str(e)) from None


def _absolute(cfg: Config) -> Config:
    """cfg with its dataset and cache roots absolute (a grounded run reads the dataset's annotations)."""
    dataset = replace(cfg.dataset, root=str(Path(cfg.dataset.root).absolute()))
    return replace(cfg, dataset=dataset, cache=replace(cfg.cache, root=str(Path(cfg.cache.root).absolute())))


def run_table(
    cfg: Config,
    name: str,
    seeds: int | None = None,
    store: Path | None = None,
    progress: bool = True,
    diagnose: bool = False,
) -> TableResult:
    """Train and evaluate every row of `ablations.<name>`; write the .md, .csv and .png. `diagnose`: add each
    row's causal-term headline (variation, knock-out by the split mean) on `DIAGNOSE_SPLIT`, seed 0's run.

    The progress bar counts the table's runs done (reused ones included) of its total. A run that fails is
    reported as it fails and the table's other runs finish; then one RunError names every failed run with its
    sentence (the finished runs are kept: the table run again trains only the failed ones)."""
    with ExitStack() as cluster:  # train.scheduler's dask client, if a run needs one; closed with the table
        scheduler = Scheduler(cfg.train.scheduler, cluster) if cfg.train.scheduler else None
        return _run_table(cfg, name, seeds, store, progress, diagnose, scheduler)


def _run_table(
    cfg: Config,
    name: str,
    seeds: int | None,
    store: Path | None,
    progress: bool,
    diagnose: bool,
    scheduler: Scheduler | None,
) -> TableResult:
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
    if seeds is not None and seeds < 1:
        raise RunError(f"--seeds {seeds}: a table needs at least one seed per row (its own: {table.seeds})")
    n_seeds = table.seeds if seeds is None else seeds
    out_root = Path(cfg.train.runs_root) / "ablations"
    t0 = time.perf_counter()
    results: dict[tuple[str, str], list[RunResult]] = {}
    diagnosis: dict[tuple[str, str], str] = {}
    checks: dict[str, tuple] = {}  # grounded row -> its fixed-mask objectives (ground_check tables)
    seeds_run = [cfg.train.seed + s for s in range(n_seeds)]
    groups = [(row, task) for row in table.rows for task in table.tasks]  # the table's order
    bar = tqdm(total=len(groups) * n_seeds, desc=f"ablate {name}", unit="run", disable=not progress)
    failed: list[tuple[list[str], str]] = []  # (the run names of a failed unit, why)
    for task in table.tasks:  # one task's splits in memory at a time (the labels, and so the rows, are the task's)
        cfgs = {row: [_run_cfg(cfg, row, task, seed) for seed in seeds_run] for row in table.rows}
        dirs = {row: [out_root / reader.fingerprint / run_name(c) for c in cs] for row, cs in cfgs.items()}
        with shared_splits():  # the task's runs read each split of the cache once
            finished = {
                row: [_finished(d, c, reader) for d, c in zip(dirs[row], cs, strict=True)] for row, cs in cfgs.items()
            }
            todo = {row: [i for i, r in enumerate(rs) if r is None] for row, rs in finished.items()}
            units = [  # what one process trains at once: a row's unfinished seeds stacked, or one seed
                (row, idx)
                for row in table.rows
                for idx in ([todo[row]] if cfg.train.stack_seeds else [[i] for i in todo[row]])
                if idx
            ]
            bar.update(sum(n_seeds - len(idx) for idx in todo.values()))  # the reused runs
            for (row, idx), runs, error in _train_units(cfg, store, cfgs, dirs, units, bar.update, scheduler):
                if error is not None:
                    failed.append(([run_name(cfgs[row][i]) for i in idx], error))
                    bar.set_postfix(failed=sum(len(names) for names, _ in failed))
                    continue
                for i, r in zip(idx, runs, strict=True):
                    finished[row][i] = r
            for row in table.rows:
                if any(r is None for r in finished[row]):  # a failed run: the row has no cells (the error names it)
                    continue
                results[(row, task)] = finished[row]
                if diagnose and DIAGNOSE_SPLIT in reader.info.splits:  # seed 0's run
                    rows, _ = diagnose_run(dirs[row][0], DIAGNOSE_SPLIT, store=store)
                    diagnosis[(row, task)] = headline(rows)
                grounding = grounding_options(cfg, cfgs[row][0].train.grounding)
                checkable = grounding is not None and grounding.method != "none"  # the oracle's: the comparison
                if table.ground_check and checkable:
                    checks[row if len(table.tasks) == 1 else f"{row} ({task})"] = mask_objectives(
                        dirs[row][0], "train", store
                    )
    bar.close()
    if failed:
        total = len(groups) * n_seeds
        n_failed = sum(len(names) for names, _ in failed)
        why = "; ".join(f"{', '.join(names)}: {error}" for names, error in failed)
        raise RunError(
            f"table {name}: {n_failed} of {total} runs failed ({why}). The other {total - n_failed} are finished and "
            "kept; fix the cause and run the table again to train only the failed runs"
        )
    results = {k: results[k] for k in groups}  # rows in the table's order, each row's tasks together
    cells = []
    chance: dict[tuple[str, str, str], float] = {}
    predictions: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}  # (row, task, split) -> (S,N,C), labels
    partners: dict[str, np.ndarray | None] = {}  # single-label task -> (C,) each class's same-set partner
    for (row, task), runs in results.items():
        splits = sorted(runs[0].metrics)
        multi = "acc1" not in runs[0].metrics[splits[0]]
        if table.order_confusion and not multi and task not in partners:
            reader = CacheReader(store, task, allow_partial=True)
            partners[task] = order_partners(reader.info.same_set_pairs, reader.class_names)
            if partners[task] is None:
                log.warning(
                    f"table {name}: the store {store} names no same-set pairs of {task} classes; no order confusion"
                )
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
                    cell.rep = replicates(scores, labels, metric)
                    cell.ci = cell.rep.interval()
                    chance[(task, metric, split)] = chance_level(labels, metric, scores.shape[-1])
                cells.append(cell)
            for metric in order:  # on the videos of the paired activities only
                partner = partners[task]
                paired = partner[labels] >= 0  # (N,)
                if paired.any():
                    r = replicates(scores[:, paired], labels[paired], metric, partner)
                    cells.append(Cell(row, task, split, metric, r.per_seed.tolist(), r.interval(), rep=r))
                    chance[(task, metric, split)] = chance_level(labels[paired], metric, scores.shape[-1])
    reference = table.reference or table.rows[0]
    refs = references(table.rows, table.reference)
    by_key = {(c.row, c.task, c.split, c.metric): c for c in cells}
    for cell in cells:
        ref_row = refs[cell.row]
        ref = predictions.get((ref_row, cell.task, cell.split))
        if cell.rep is not None and ref is not None:
            if not np.array_equal(predictions[(cell.row, cell.task, cell.split)][1], ref[1]):
                raise RunError(f"rows {cell.row!r} and {ref_row!r} scored different videos of {cell.split}")
            ref_cell = by_key.get((ref_row, cell.task, cell.split, cell.metric))
            if ref_cell is not None:  # the same seeds by index, the same videos
                cell.diff = (cell.rep - ref_cell.rep).interval()
    family = correct(cells, refs)
    recipe = cfg.train.recipe
    file_name = name if recipe is None else f"{name}@{recipe}"  # a paper recipe's table beside ours
    if n_seeds != table.seeds:  # another seed count than the table's own: its own files, beside the table's
        file_name += f"-seeds{n_seeds}"
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
        ood_gaps(cells),
        family,
        refs,
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


def _ci(x: Interval | GapClosed | None, signed: bool = False, scale: float = 100, digits: int = 1) -> str:
    if x is None:
        return "—"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(scale * x.estimate)} [{f.format(scale * x.low)}, {f.format(scale * x.high)}]"


def _gap(g: GapClosed | None) -> str:
    if g is None:
        return "—"
    if g.status != "resolved":
        return f"{g.estimate:.2f} (unstable)"
    return _ci(g, signed=True, scale=1, digits=2)


def keep_previous(out_root: Path, name: str, rows: list[str]) -> list[Path]:
    """A table made before with other rows (the table's definition changed) is kept, not replaced: its files move
    to `<name>.before-<time>.*` with a warning naming them; returns the moved files."""
    old_csv = out_root / f"{name}.csv"
    if not old_csv.exists():
        return []
    with old_csv.open() as f:
        before = list(dict.fromkeys(r["row"] for r in csv.DictReader(f)))
    if before == list(dict.fromkeys(rows)):
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old_csv.stat().st_mtime))
    moved = []
    for suffix in (".md", ".csv", ".png", ".config.yaml", "-ground-check.md", "-ground-check.csv"):
        src = out_root / f"{name}{suffix}"
        if src.exists():
            dst = out_root / f"{name}.before-{stamp}{suffix}"
            src.rename(dst)
            moved.append(dst)
    log.warning(
        "table %s: the files of an earlier table of that name with other rows (%s) are kept as %s",
        name,
        ", ".join(before),
        ", ".join(str(m) for m in moved),
    )
    return moved


def write_table(result: TableResult, table: AblationTable, out_root: Path, seeds: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_root.mkdir(parents=True, exist_ok=True)
    keep_previous(out_root, result.name, [c.row for c in result.cells])
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
    noise = (
        "test videos (jackknife) and training seeds (between-seed variance), t quantile at Welch-Satterthwaite "
        "degrees of freedom"
        if seeds > 1
        else "test videos only (jackknife): with one seed, training noise is NOT counted; run more seeds"
    )
    lines.append(
        f"Table `{result.name}`: all numbers in %. Each cell: the mean over {seeds} seed(s) and its 95% interval "
        f"counting {noise}. Δ: the paired difference to "
        + ("the row above it" if result.reference == "previous" else f"the reference row `{result.reference}`")
        + " on the same videos, "
        f"seed against seed, with its uncorrected 95% interval; * marks a Δ that survives Holm's correction over "
        f"the table's {result.family} Δ cells (family-wise error 5%); the CSV holds each Δ's p and Holm-adjusted p."
    )
    if result.gap:
        lines.append(
            "Gap closed: (ood - ood of `baseline`) / (ood of `oracle` - ood of `baseline`) on the primary metric, "
            "with Fieller's 95% interval (numerator and denominator paired on the same videos and seeds); "
            "`oracle` is the baseline trained on an unconfounded training split of the same size. `unstable`: the "
            "oracle's gap on that split is not resolved from 0, so the ratio has no bounded interval; `—`: no gap."
        )
    if any(c.metric not in METRICS_WITH_CI for c in result.cells):
        lines.append("Frame IoU cells: the mean and, in brackets, the standard deviation over seeds (no interval).")
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
                defined = c is not None and np.isfinite(c.mean)  # (no frame used: no IoU)
                vals.append(f"{100 * c.mean:.1f} (sd {100 * c.std:.1f})" if defined else "—")
                continue
            vals.append(_ci(c.ci) if c else "—")
            if c is None or c.diff is None:
                vals.append("—")
            elif r == result.references.get(r, result.reference):
                vals.append("ref")
            else:
                vals.append(_ci(c.diff, signed=True) + (" *" if c.star else ""))
        vals += [_gap(result.gap.get((r, t, s))) for t, s in gap_cols]
        vals += [result.diagnosis.get((r, t), "—") for t in tasks]
        lines.append(f"| {r} | " + " | ".join(vals) + " |")
    md = out_root / f"{result.name}.md"
    md.write_text("\n".join(lines) + "\n")

    path_csv = out_root / f"{result.name}.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["row", "task", "split", "metric", "mean", "std", "seeds", "values", "ci_low", "ci_high", "se", "df"]
            + ["reference", "diff", "diff_low", "diff_high", "diff_se", "diff_df", "diff_p", "diff_p_holm"]
            + ["diff_excludes_0", "diff_star", "family"]
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
                    num(ci and ci.se),
                    num(ci and ci.df),
                    result.references.get(c.row, result.reference),
                    num(d and d.estimate),
                    num(d and d.low),
                    num(d and d.high),
                    num(d and d.se),
                    num(d and d.df),
                    "" if d is None else f"{d.p:.6g}",
                    "" if c.p_holm is None else f"{c.p_holm:.6g}",
                    "" if d is None else int(d.excludes_zero()),
                    "" if c.p_holm is None else int(c.star),
                    result.family,
                ]
            )
        for (row, task, split), g in result.gap.items():  # a ratio of paired differences: interval in ci_low/high
            resolved = g.status == "resolved"
            low, high = (f"{g.low:.6f}", f"{g.high:.6f}") if resolved else (g.status, g.status)
            w.writerow([row, task, split, "gap_closed", f"{g.estimate:.6f}", "", "", "", low, high] + [""] * 13)

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
    fig.suptitle(f"{result.name} (mean over {seeds} seeds, 95% intervals: videos and seeds)", fontsize=10)
    fig.tight_layout()
    png = out_root / f"{result.name}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [md, path_csv, png]
