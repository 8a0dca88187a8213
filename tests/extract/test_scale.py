"""Stage 1 on a dask.distributed cluster (2 worker processes, 1 thread each) and the store lock."""

import functools
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from extract.contract import schema
from extract.contract.lock import StoreLocked, _alive, _proc_start, acquire_lock, check_lock, read_lock
from extract.contract.schema import CacheError
from extract.contract.store import ExtractError, create_store
from extract.datasets import load_dataset
from extract.inspect import _arrays
from extract.pipeline import extract, fingerprint
from extract.scale import cluster_device, extract_distributed, extract_shard
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
# 12 videos in shards of 4 = 3 shard tasks, each of 2 fixed groups of 2 videos (16 frames / L=8)
SCALE = {"cache": {"shard_videos": 4}, "encoders": {"batch_frames": 16}}


def _config(world: Path, cache_root: Path):
    return tiny_config(world, cache_root, **SCALE)


def _all_arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in _arrays(group)}


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = _all_arrays(got), _all_arrays(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """The single-process store of the tiny world with the test shard size."""
    summary = extract(_config(world, tmp_path_factory.mktemp("single")), progress=False)
    assert summary.done == 12 and schema.store_shard_videos(zarr.open_group(str(summary.store), mode="r")) == 4
    return summary.store


@pytest.fixture(scope="module")
def cluster():
    """A running cluster the tests join by address, as `--scheduler tcp://...` does; its workers declare
    a GPU resource as `dask worker --resources GPU=1` would, so shard tasks ask for one each."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        resources={"GPU": 1},
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as c:
        yield c


@pytest.mark.slow
def test_local_cluster_writes_the_same_store_as_one_process(world, reference, tmp_path):
    summary = extract_distributed(_config(world, tmp_path), "local:2", progress=False)
    assert summary.store.name == reference.name  # same fingerprint
    assert (summary.done, summary.skipped, summary.failures) == (12, 0, {})
    assert summary.frames == 12 * 8 and "12 extracted, 0 already done, 0 failed (of 12)" in summary.lines()[1]
    _assert_same_store(summary.store, reference)
    assert not (summary.store / schema.LOCK_FILE).exists()  # released
    assert zarr.open_group(str(summary.store), mode="r").attrs["failures"] == {}


def _die_once_mid_shard(marker: str, shard_start: int, cfg, path, start, stop, items, token, threads):
    """The shard task, except that the first attempt at `shard_start` kills its worker process
    (os._exit) right after its first group landed: the retry must finish the shard."""
    if start == shard_start and not Path(marker).exists():
        import extract.pipeline as pipeline

        real = pipeline.write_rows

        def write_then_die(group, row, values):
            real(group, row, values)
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)

        pipeline.write_rows = write_then_die
    return extract_shard(cfg, path, start, stop, items, token, threads)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_replaced_and_the_store_ends_equal(world, reference, cluster, tmp_path):
    marker = tmp_path / "killed.pid"
    task = functools.partial(_die_once_mid_shard, str(marker), 4)
    summary = extract_distributed(_config(world, tmp_path), cluster.scheduler_address, progress=False, task=task)
    pid = int(marker.read_text())  # the worker that ran shard 4..7 first really died
    assert not _alive(pid, None)
    assert (summary.done, summary.failures) == (12, {})
    _assert_same_store(summary.store, reference)


@pytest.mark.slow
def test_a_locked_store_refuses_a_second_run_on_one_process_and_on_a_cluster(world, cluster, tmp_path):
    cfg = _config(world, tmp_path)
    store = schema.store_path(cfg.cache.root, "synthetic", fingerprint(cfg, load_dataset(cfg), "cpu"))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with acquire_lock(store) as mine:
            lock = store / schema.LOCK_FILE
            info = {**read_lock(lock), "pid": holder.pid, "pid_start": _proc_start(holder.pid)}
            lock.write_text(__import__("json").dumps(info))  # as if `holder` were the writing run
            for run in (
                lambda: extract(cfg, progress=False),
                lambda: extract_distributed(cfg, cluster.scheduler_address),
            ):
                with pytest.raises(StoreLocked, match=f"being written by another run \\(pid {holder.pid} on "):
                    run()
            assert read_lock(lock)["token"] == mine.token  # the refused runs left it alone
    finally:
        holder.kill()
        holder.wait()
    assert not (store / "zarr.json").exists()  # nothing was created


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    store = tmp_path / "s.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old = acquire_lock(store)
    lock = store / schema.LOCK_FILE
    lock.write_text(__import__("json").dumps({**read_lock(lock), "pid": gone.pid, "pid_start": "1"}))
    with caplog.at_level(logging.WARNING, logger="extract.scale"):
        new = acquire_lock(store)
    assert "taking over a stale lock" in caplog.text and f"pid {gone.pid}" in caplog.text
    assert read_lock(lock)["pid"] == os.getpid() and new.token != old.token
    with pytest.raises(ExtractError, match="lost the store lock"):
        check_lock(store, old.token)  # a task of the dead run stops before writing
    check_lock(store, new.token)
    old.release()  # not its lock any more: left in place
    assert lock.exists()
    new.release()
    assert not lock.exists()


def test_a_reused_pid_or_another_host_is_judged_correctly(tmp_path):
    assert _alive(os.getpid(), _proc_start(os.getpid()))
    if _proc_start(os.getpid()) is not None:  # Linux: a pid reused by another process is not the owner
        assert not _alive(os.getpid(), "0")
    store = tmp_path / "s.zarr"
    acquire_lock(store)
    lock = store / schema.LOCK_FILE
    lock.write_text(__import__("json").dumps({**read_lock(lock), "host": socket.gethostname() + "-elsewhere"}))
    with pytest.raises(StoreLocked, match=f"delete {lock} \\(it is on another host"):
        acquire_lock(store)


def test_recreating_a_store_keeps_the_writers_lock(tmp_path):
    store = tmp_path / "s.zarr"
    with acquire_lock(store) as lock:
        (store / "leftover").mkdir()
        specs = [schema.ArraySpec(schema.DONE, (3,), ("video",), "bool")]
        create_store(store, specs, {"fingerprint": "x"}, shard_videos=2)
        assert read_lock(store / schema.LOCK_FILE)["token"] == lock.token
        assert not (store / "leftover").exists()
        assert schema.store_shard_videos(zarr.open_group(str(store), mode="r")) == 2


@pytest.mark.slow
def test_a_store_keeps_its_shard_size_when_the_config_changes(world, reference, caplog):
    cfg = tiny_config(world, reference.parents[1], encoders={"batch_frames": 16})  # shard_videos: default 64
    with caplog.at_level(logging.WARNING, logger="extract.pipeline"):
        again = extract(cfg, progress=False)
    assert again.store == reference and again.skipped == 12 and again.done == 0
    assert "keeps its shard size of 4 videos (cache.shard_videos=64 applies to new stores only)" in caplog.text


def test_an_object_store_url_as_cache_root_is_refused(world, tmp_path):
    cfg = tiny_config(world, tmp_path, cache={"root": "s3://bucket/cache"})
    for run in (lambda: extract(cfg, progress=False), lambda: extract_distributed(cfg, "local:2")):
        with pytest.raises(CacheError, match="is a URL; the cache must live on a local or shared POSIX filesystem"):
            run()
    assert not Path("s3:").exists()


def test_workers_on_different_kinds_of_device_are_refused(world, tmp_path):
    class Mixed:  # a client whose workers answer as a CPU and a GPU worker would
        def run(self, fn, *args):
            return {"tcp://a:1": "cpu", "tcp://b:1": "cuda:0"}

    with pytest.raises(ExtractError, match=r"different kinds of device \(tcp://a:1: cpu, tcp://b:1: cuda:0\)"):
        cluster_device(Mixed(), tiny_config(world, tmp_path))


def test_bad_scheduler_is_one_sentence(world, tmp_path):
    from train.main import app

    for bad, words in (("local:zero", "local:N needs a number of workers"), ("head:8786", "neither local:N nor")):
        sets = [
            "--config",
            str(REPO / "pipeline.yaml"),
            "--set",
            f"dataset.root={world}",
            "--set",
            f"cache.root={tmp_path}",
            "--set",
            "encoders.clip.weights=null",
            "--set",
            "encoders.timesformer.weights=null",
        ]
        result = CliRunner().invoke(app, ["extract", "--scheduler", bad, *sets])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
