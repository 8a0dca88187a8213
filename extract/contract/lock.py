"""The store lock: one writer per folder (a cache store, a training run), taken by every stage.

`<folder>/ltar.lock` (schema.LOCK_FILE) is a JSON file created with O_EXCL: host, pid, process start time,
start time, a random token and the command. A second run is refused with a sentence naming the holder; a
lock whose pid is gone (same host) is stale and taken over with a warning. Cluster tasks check the token
before every write (`check_lock`), so tasks of a dead driver whose lock was taken over stop instead of
writing beside the new run. This needs a POSIX filesystem that every writer shares.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.contract import schema
from extract.contract.store import ExtractError

log = logging.getLogger(__name__)


class StoreLocked(ExtractError):
    """Another live run is writing this store."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(pid)
    return start is None or now is None or now == start


@dataclass
class StoreLock:
    """A held lock; `release()` (or leaving the `with` block) removes the file."""

    path: Path  # <store>/ltar.lock
    token: str
    info: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if read_lock(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def read_lock(path: Path) -> dict[str, Any]:
    """The lock file's contents; {} when there is none (or it is being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: `{info.get('command', '?')}`"


def acquire_lock(
    store: str | Path, wait_s: float = 2.0, kind: str = "store", kept: str = "its finished videos are kept"
) -> StoreLock:
    """Take `<store>/ltar.lock` or raise StoreLocked with a sentence; a stale lock is taken over.

    `wait_s` covers a lock file caught between its creation and its contents being written. `kind` names
    the locked folder in the sentences (a store, a training run) and `kept` says what survives stopping
    the holder."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = store / schema.LOCK_FILE
    host, pid = socket.gethostname(), os.getpid()
    info = {
        "host": host,
        "pid": pid,
        "pid_start": _proc_start(pid),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:4000],  # whole: its --sets tell runs apart
    }
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_lock(path)
            if not held:  # empty or half-written: its writer is a moment away from filling it
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLocked(
                    f"{store} is locked by an unreadable lock file {path}; if no `ltar` run is writing this "
                    f"{kind}, delete that file and run again"
                ) from None
            if held.get("host") != host:
                raise StoreLocked(
                    f"{store} is being written by another run ({_describe(held)}); a {kind} takes one run at a "
                    f"time. Wait for it, or, if that run is gone, delete {path} (it is on another host, so "
                    "this run cannot tell)"
                ) from None
            if _alive(int(held.get("pid", -1)), held.get("pid_start")):
                raise StoreLocked(
                    f"{store} is being written by another run ({_describe(held)}); a {kind} takes one run at a "
                    f"time: wait for it to finish, or stop it ({kept}) and run again"
                ) from None
            _take_over(path, held)
            log.warning("%s: taking over a stale lock of a run that is gone (%s)", store, _describe(held))
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return StoreLock(path, info["token"], info)


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Move a stale lock aside atomically; if another run replaced it meanwhile, put that one back."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first; the caller looks again
    if read_lock(aside).get("token") != stale.get("token"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # a live lock moved by mistake goes back (unless a third run holds one)
    aside.unlink(missing_ok=True)


def check_lock(store: str | Path, token: str) -> None:
    """Raise when the store's lock no longer holds `token`: another run took it over."""
    path = Path(store) / schema.LOCK_FILE
    held = read_lock(path)
    if held.get("token") != token:
        who = _describe(held) if held else "nobody"
        raise ExtractError(f"{store}: this run lost the store lock (now held by {who}); stopping without writing")
