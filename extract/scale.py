"""Scale-out: stage 1 on a dask.distributed cluster, and the task farm `ltar ablate --scheduler` trains on.

`ltar extract --scheduler local:N` starts a `LocalCluster` of N worker processes (1 thread each);
`--scheduler tcp://host:port` joins a running one (one `dask worker` per GPU). One task = one shard
of the store: the worker builds the encoders once (kept in a worker-local global), decodes,
encodes the shard's fixed groups and writes its rows and `done` flags through the same
`extract_groups` loop as the single-process run, then returns its failures. Workers only ever write
the shards they were given, so no two processes share a file; the driver holds the store lock,
shows one progress bar, and writes the `failures` attribute once at the end.

A shard task is idempotent (rows already `done` are skipped, groups are fixed per store), so a task
whose worker died is simply run again: dask reschedules tasks of a lost worker (up to
`distributed.scheduler.allowed-failures` times) and `retries=` resubmits a task that raised.

The driver holds the store lock (extract/contract/lock.py); cluster tasks check its token before every
write, so tasks of a dead driver whose lock was taken over stop instead of writing beside the new run.
This needs a POSIX filesystem that every worker and the driver share (local disk for `local:N`,
NFS/Lustre/GPFS for a multi-host cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.contract import schema
from extract.contract.config import Config, to_dict
from extract.contract.lock import acquire_lock, check_lock
from extract.contract.store import ExtractError
from extract.datasets import DatasetIndex, VideoItem
from extract.devices import usable_cores

log = logging.getLogger(__name__)

PROGRESS_TOPIC = "ltar-extract"  # dask event topic: workers report rows after every group


# ---------------------------------------------------------------------------------------------
# Worker side: one task per shard
# ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # per worker process: "encoders" -> (key, Encoders)


@dataclass
class ShardResult:
    """What one shard task did; the driver merges these into the run's ExtractSummary."""

    start: int  # first row of the shard
    stop: int  # one past its last row
    done: int = 0  # rows written by this task
    frames: int = 0  # real frames in them
    failures: dict[str, str] = field(default_factory=dict)  # video id -> reason
    seconds: float = 0.0
    worker: str = ""
    device: str = ""
    short: dict[str, int] = field(default_factory=dict)  # video id -> distinct frames (frames repeat)


def worker_device(cfg: Config, dask_worker: Any = None) -> str:
    """The torch device of this worker: `encoders.device`, or for `auto` with CUDA, GPU `name % count`
    (LocalCluster names its workers 0..N-1; a worker pinned by CUDA_VISIBLE_DEVICES sees one GPU)."""
    from extract.devices import resolve_device

    device = resolve_device(cfg)
    if cfg.encoders.device != "auto" or device != "cuda":
        return device
    import torch

    name = getattr(dask_worker, "name", None)
    if dask_worker is None:
        with contextlib.suppress(ValueError):
            from distributed import get_worker

            name = get_worker().name
    index = int(name) if isinstance(name, int) or str(name).isdigit() else 0
    return f"cuda:{index % max(torch.cuda.device_count(), 1)}"


def _worker_encoders(cfg: Config, torch_threads: int | None) -> Any:
    """Encoders built once per worker process and kept for every later shard of the same configuration."""
    import torch

    from extract.pipeline import build_encoders

    if torch_threads and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    device = worker_device(cfg)
    key = json.dumps([to_dict(cfg.encoders), to_dict(cfg.saliency), device], sort_keys=True, default=str)
    cached = _WORKER.get("encoders")
    if cached is None or cached[0] != key:
        _WORKER["encoders"] = (key, build_encoders(cfg, device))
    return _WORKER["encoders"][1]


def create_store_task(cfg: Config, index: DatasetIndex, path: str, fp: str, torch_threads: int | None) -> str:
    """Cluster task: create the store on a worker (text embeddings come from the workers' encoders)."""
    from extract.pipeline import create_cache

    create_cache(cfg, index, _worker_encoders(cfg, torch_threads), Path(path), fp)
    return path


def extract_shard(
    cfg: Config,
    path: str,
    start: int,
    stop: int,
    items: dict[int, VideoItem],
    token: str | None = None,
    torch_threads: int | None = None,
) -> ShardResult:
    """Cluster task: extract the rows still to do of shard [start, stop) of the store at `path`.

    items: row -> VideoItem of this shard. Idempotent: done rows are skipped, so a rerun after a
    killed worker redoes only the groups that did not land."""
    from extract.pipeline import RowsResult, _shard_groups, extract_groups, group_bytes, resolve_decode_workers

    t0 = time.perf_counter()
    enc = _worker_encoders(cfg, torch_threads)
    group, _ = schema.open_cache(path, mode="r+")
    n = int(group[schema.DONE].shape[0])
    done = np.zeros(n, dtype=bool)  # (N,): only this shard's rows are read
    done[start:stop] = np.asarray(group[schema.DONE][start:stop])
    per_group = max(1, cfg.encoders.batch_frames // cfg.frames.num_frames)
    groups = [g for g in _shard_groups(start, stop, per_group) if not done[g].all()]
    # auto: this worker's share of the cores (its torch threads) plus one, less one for its encoders
    cores = torch_threads + 1 if torch_threads else None
    decode_workers = resolve_decode_workers(cfg, group_bytes(cfg, items, groups, enc), cores)
    if decode_workers and multiprocessing.current_process().daemon:
        log.warning("this dask worker is a daemon process and cannot start decoding workers; decoding inline")
        decode_workers = 0
    # dask starts workers with `spawn`, which DataLoader would inherit: a fresh interpreter importing torch per
    # decoding process and shard (4x slower end to end here); forking the worker is what the single run does
    mp_context = "fork" if sys.platform == "linux" else None
    report = _progress_reporter()
    result = RowsResult()
    extract_groups(
        group,
        items,
        groups,
        cfg,
        enc,
        done,
        result,
        decode_workers,
        on_group=report,
        before_write=(lambda: check_lock(path, token)) if token else None,
        mp_context=mp_context,
    )
    return ShardResult(
        start,
        stop,
        result.done,
        result.frames,
        result.failures,
        time.perf_counter() - t0,
        worker=str(_worker_name()),
        device=enc.device,
        short=result.short,
    )


def _worker_name() -> Any:
    with contextlib.suppress(ValueError, ImportError):
        from distributed import get_worker

        return get_worker().name
    return ""


def _progress_reporter() -> Callable[[int, Any], None] | None:
    """Send rows finished after every group to the driver's progress bar (a dask event)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ValueError, ImportError):
        return None
    return lambda rows, result: worker.log_event(PROGRESS_TOPIC, {"rows": int(rows)})


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator[tuple[Any, int | None]]:
    """(client, torch threads per worker or None) for `local:N` or a scheduler address."""
    # distributed's INFO lines would drown the progress bar and the summary; a busy machine may take over
    # 4 s to stop a local worker, and the nanny's "still alive ... killing" warning is noise then
    quiet = {"distributed": logging.WARNING, "distributed.nanny": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(max(levels[name], level))
    try:
        with _connect(scheduler) as connected:
            yield connected
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _connect(scheduler: str) -> Iterator[tuple[Any, int | None]]:
    import dask
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        count = scheduler.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise ExtractError(f"--scheduler {scheduler!r}: local:N needs a number of workers N >= 1, e.g. local:2")
        n = int(count)
        # non-daemon workers may start decoding processes (frames.decode_workers); restarted ones too. The nanny's
        # MALLOC_TRIM_THRESHOLD_ is left out: setting it turns off glibc's adaptive mmap threshold, so every tensor
        # over 128 KiB is mapped and faulted in afresh (a table's runs trained ~10 % slower in such workers)
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        # and the worker's statistical profiler (a thread that takes the GIL every 10 ms to read the task's stack)
        # is off: a run's Python-heavy training loop waits for it
        quiet = {"distributed.worker.profile.enabled": False, "distributed.admin.system-monitor.gil.enabled": False}
        with dask.config.set(
            {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ, **quiet}
        ):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            try:
                with Client(cluster) as client:
                    yield client, max(1, usable_cores() // n)
            finally:
                cluster.close()
        return
    if "://" not in scheduler:
        raise ExtractError(
            f"--scheduler {scheduler!r} is neither local:N nor a scheduler address such as tcp://host:8786"
        )
    try:
        client = Client(scheduler, timeout="30s")
    except OSError as e:
        raise ExtractError(f"could not reach the dask scheduler at {scheduler}: {e}") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=120)
        except TimeoutError:
            raise ExtractError(f"the dask scheduler at {scheduler} has no workers (waited 120 s)") from None
        yield client, None


def cluster_device(client: Any, cfg: Config) -> str:
    """The device the workers will encode on (it decides the fingerprint's precision); all must agree."""
    devices = client.run(worker_device, cfg)  # {worker address: device}
    kinds = sorted({d.split(":")[0] for d in devices.values()})
    if len(kinds) != 1:
        listing = ", ".join(f"{addr}: {d}" for addr, d in sorted(devices.items()))
        raise ExtractError(
            f"the dask workers would encode on different kinds of device ({listing}); the precision, and so "
            "the cache fingerprint, depends on it: give every worker the same kind (or set encoders.device)"
        )
    return next(iter(devices.values()))


def _gpu_resources(client: Any) -> dict[str, float] | None:
    """resources={'GPU': 1} when the workers declare GPUs (`dask worker --resources GPU=1`)."""
    workers = client.scheduler_info().get("workers", {})
    if any("GPU" in (w.get("resources") or {}) for w in workers.values()):
        return {"GPU": 1}
    return None


def store_array_specs(group: Any, info: schema.CacheInfo) -> list[schema.ArraySpec]:
    """The schema specs of an existing store, read from its arrays and attributes."""
    n, ll, dc = group[schema.CLIP_FRAME].shape
    sizes = schema.Sizes(n, ll, dc, group[schema.TSF_FRAME].shape[2], group[schema.SALIENCY].shape[2])
    tasks = {t: (len(v["names"]), bool(v["multi_label"])) for t, v in info.vocabularies.items()}
    return schema.array_specs(sizes, tasks)


def extract_distributed(
    cfg: Config,
    scheduler: str,
    progress: bool = True,
    index: DatasetIndex | None = None,
    retries: int = 2,
    task: Callable[..., ShardResult] = extract_shard,
) -> Any:
    """Stage 1 on a dask cluster; the same store, bytes and summary as `pipeline.extract`.

    `task` is the shard function (tests wrap it to kill a worker mid-shard)."""
    from distributed import wait
    from tqdm import tqdm

    from extract.contract.locate import write_pointer
    from extract.contract.store import open_for_writing, store_bytes
    from extract.pipeline import (
        ExtractSummary,
        fingerprint,
        prepare_run,
        raw_fp32_bytes,
        record_failures,
        record_file_stamps,
        resume_store,
        upgrade_store,
    )

    t0 = time.perf_counter()
    named, (cfg, index) = cfg, prepare_run(cfg, index)
    # workers may run elsewhere: absolute paths (the same on every host of a shared filesystem)
    items = [dataclasses.replace(it, path=it.path.absolute()) for it in index.items]
    with connect(scheduler) as (client, torch_threads):
        device = cluster_device(client, cfg)
        fp = fingerprint(cfg, index, device)
        path = schema.store_path(cfg.cache.root, cfg.dataset.name, fp)
        resources = _gpu_resources(client)
        with acquire_lock(path) as lock:
            group = open_for_writing(path, fp, upgrade=lambda g: upgrade_store(g, index))
            if group is None:
                client.submit(
                    create_store_task,
                    cfg,
                    index,
                    str(path.absolute()),
                    fp,
                    torch_threads,
                    pure=False,
                    resources=resources,
                ).result()
                group, _ = schema.open_cache(path, mode="r+")
                shard = schema.store_shard_videos(group)
            else:
                shard = resume_store(group, cfg, index, path)
            write_pointer(named, path, device.split(":")[0], "ltar extract --scheduler")
            info = schema.CacheInfo(path, dict(group.attrs))
            n = len(index.items)
            done = np.asarray(group[schema.DONE][:])
            summary = ExtractSummary(path, total=n, skipped=int(done.sum()))
            previous_failures = info.failures
            todo = int((~done).sum())
            shards = [(s, min(s + shard, n)) for s in range(0, n, shard) if not done[s : min(s + shard, n)].all()]
            futures = {
                client.submit(
                    task,
                    cfg,
                    str(path.absolute()),
                    start,
                    stop,
                    {r: items[r] for r in range(start, stop)},
                    lock.token,
                    torch_threads,
                    key=f"ltar-shard-{start}-{lock.token[:8]}",
                    retries=retries,
                    pure=False,
                    resources=resources,
                ): (start, stop)
                for start, stop in shards
            }
            reported: list[int] = []  # rows reported by workers' events (a list: appended from the client's thread)
            client.subscribe_topic(PROGRESS_TOPIC, lambda event: reported.append(int(event[1].get("rows", 0))))
            bar = tqdm(total=todo, unit="video", disable=not progress, desc=f"extract ({len(futures)} shards)")
            finished_rows, t_bar = 0, time.perf_counter()
            pending = set(futures)
            try:
                while pending:
                    try:
                        finished, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                    except TimeoutError:  # nothing finished: refresh the bar from the workers' events
                        finished = set()
                    for future in finished:
                        start, stop = futures[future]
                        try:
                            result = future.result()
                        except ExtractError:
                            raise
                        except Exception as e:  # noqa: BLE001 - a task failed after its retries: one sentence
                            raise ExtractError(
                                f"rows {start}..{stop - 1} of {path} failed on the cluster after {retries} retries "
                                f"({type(e).__name__}: {e}); finished rows are kept, run again to resume"
                            ) from None
                        finished_rows += int((~done[start:stop]).sum())
                        summary.done += result.done
                        summary.frames += result.frames
                        summary.failures.update(result.failures)
                        summary.short.update(result.short)
                    bar.n = min(todo, max(finished_rows, sum(reported)))
                    bar.set_postfix(frames_s=f"{summary.frames / max(time.perf_counter() - t_bar, 1e-9):.0f}")
            finally:
                bar.close()
                client.unsubscribe_topic(PROGRESS_TOPIC)
                if pending:
                    client.cancel(list(pending))
                record_failures(group, [it.id for it in index.items], previous_failures, summary.failures)
                record_file_stamps(group, index)
            # counted from the store: rows that a killed attempt wrote before dying count too
            new = np.asarray(group[schema.DONE][:]) & ~done  # (N,)
            summary.done = int(new.sum())
            summary.frames = int(np.asarray(group[schema.FRAME_MASK][:])[new].sum())
            specs = store_array_specs(group, info)
    summary.seconds = time.perf_counter() - t0
    summary.store_bytes = store_bytes(path)
    summary.raw_fp32_bytes = raw_fp32_bytes(specs)
    return summary


# ---------------------------------------------------------------------------------------------
# The task farm of `ltar ablate --scheduler` (registered with extract/contract/cluster.py by the console script)
# ---------------------------------------------------------------------------------------------


def _farm_call(fn: Callable, args: tuple, threads: int | None, level: int) -> Any:
    """A farm task in its worker: `threads` intra-op torch threads (local:N; None keeps the worker's), the driver's
    log level, and on a local cluster of several GPUs worker i on GPU i mod count (a `dask worker` pinned by
    CUDA_VISIBLE_DEVICES sees one)."""
    import torch

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # in the thread that computes: OpenMP keeps the count per thread
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    name, gpus = _worker_name(), torch.cuda.device_count()
    if gpus > 1 and (isinstance(name, int) or str(name).isdigit()):
        torch.cuda.set_device(int(name) % gpus)
    return fn(*args)


@dataclass
class TaskFarm:
    """Calls as dask tasks on `address` (local:N or tcp://host:port), connected on first use, closed with `exits`."""

    address: str
    exits: contextlib.ExitStack
    client: Any = None
    threads: int | None = None  # torch threads per worker: cores // N for local:N, None for a running cluster

    def connect(self) -> Any:
        if self.client is None:
            self.client, self.threads = self.exits.enter_context(connect(self.address))
            log.info("tasks run on the dask cluster at %s", self.address)
        return self.client

    def run(
        self, calls: list[tuple[str, Callable, tuple]], finish: tuple[Callable, tuple] | None = None
    ) -> Iterator[tuple[int, Callable[[], Any]]]:
        """Each call as one task, as a process pool runs them: one per worker thread, the next handed to the worker
        whose task just ended, in the list's order (left to itself, dask placed every task at once by durations
        it does not know yet, and a worker could sit idle while another held two long ones). A task whose worker
        died is run again by dask; with workers that declare GPUs (`dask worker --resources GPU=1`) each task
        takes one. Yields (index of the call, its result getter) as tasks complete."""
        from distributed import as_completed

        client = self.connect()
        level = logging.getLogger().getEffectiveLevel()
        resources = _gpu_resources(client)
        workers = client.scheduler_info().get("workers", {})
        slots = [address for address, w in workers.items() for _ in range(int(w.get("nthreads", 1)))]
        if not slots:
            raise ExtractError(f"the dask cluster at {self.address} has no workers left; start some and run again")
        queue = iter(enumerate(calls))
        running: dict[Any, tuple[int, str]] = {}
        completed = as_completed()

        def start(i: int, worker: str) -> None:
            key, fn, args = calls[i]
            future = client.submit(
                _farm_call,
                fn,
                args,
                self.threads,
                level,
                key=key,
                pure=False,
                resources=resources,
                workers=[worker],
                allow_other_workers=True,  # a preference: a worker that died does not hold its task back
            )
            running[future] = (i, worker)
            completed.add(future)

        for worker, (i, _) in zip(slots, queue, strict=False):
            start(i, worker)
        try:
            for future in completed:
                i, worker = running.pop(future)
                nxt = next(queue, None)
                if nxt is not None:
                    start(nxt[0], worker)
                yield i, future.result
        finally:
            client.cancel(list(running))
            if finish is not None:
                with contextlib.suppress(Exception):  # a worker gone meanwhile holds nothing
                    client.run(finish[0], *finish[1])
