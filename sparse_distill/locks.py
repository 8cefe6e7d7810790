"""One writer per output folder: a lock file that a second writer finds taken, and that a dead writer never holds.

Every folder a command writes (a run directory, `label --out`, `vocab --out`) is locked for as long as the command
runs: `OUT/.sparse-distill.lock`, held with `flock(2)`. The kernel drops the lock when its process dies however it
dies (kill -9, out of memory), so a stale lock is never in the way: the next writer takes it over, and logs whose it
was. The file also records the holder (pid, host, start time, command) for the message a refused writer gets.

A lock covers the folder's subfolders: a process holding `runs/x` writes `runs/x/labels/corpus` without locking it
again, and another process that wants to lock `runs/x/labels/corpus` is refused while `runs/x` is held. Within one
process the lock is re-entrant (the command line locks the folder before its flow starts, the flow locks it again).

flock works on local file systems and, on Linux, on NFS (where it becomes a POSIX lock); on a shared file system
without locking, run one writer per folder by hand.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sparse_distill.data import HOST, DataError

logger = logging.getLogger(__name__)

LOCK_FILE = ".sparse-distill.lock"


class FolderLocked(RuntimeError):
    """Another process writes this folder; the message names it (pid, host, start time, command)."""


@dataclass
class _Held:
    fd: int
    count: int


# Folders this process holds (resolved path -> open lock file): flock is per open file, so a second open in this
# process would block on the first.
_HELD: dict[Path, _Held] = {}
_HELD_LOCK = threading.Lock()


def _holder(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def describe_holder(info: dict) -> str:
    """`pid 123 on host h since 2026-01-01T12:00:00Z (sparse-distill run ...)` from a lock file's record."""
    if not info:
        return "another process (no details recorded yet)"
    text = f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
    return text + (f" ({info['command']})" if info.get("command") else "")


def _covering(folder: Path) -> Path | None:
    """The folder, or an ancestor of it, that this process already holds."""
    for f in (folder, *folder.parents):
        if f in _HELD:
            return f
    return None


def _check_ancestors(folder: Path) -> None:
    # An ancestor held by another process covers this folder too (a run directory covers its stages' folders).
    for parent in folder.parents:
        lock_path = parent / LOCK_FILE
        if not lock_path.exists():
            continue
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(
                f"{folder}: inside {parent}, which is in use by {describe_holder(_holder(lock_path))}"
            ) from None
        finally:
            os.close(fd)


def _open_lock_file(folder: Path) -> tuple[int, Path]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock_path = folder / LOCK_FILE
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), lock_path
    except PermissionError as e:
        raise DataError(f"{e.filename or folder}: cannot write to the output folder (permission denied)") from e
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES):
            raise DataError(f"{e.filename or folder}: cannot write to the output folder ({e.strerror})") from e
        raise


def _record(fd: int, lock_path: Path) -> None:
    info = {
        "pid": os.getpid(),
        "host": HOST,
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(["sparse-distill" if i == 0 else a for i, a in enumerate(sys.argv)])[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


@contextmanager
def folder_lock(folder: str | Path, wait: bool = False, poll_s: float = 1.0) -> Iterator[Path]:
    """Hold `folder`'s lock while the block runs (created with the folder if missing); yields the folder.

    Another process's lock (on the folder or on a folder above it) is a `FolderLocked` error at once, naming the
    holder, or with `wait` a wait until it is free. A lock left by a dead process is free: it is taken over.
    A folder that cannot be written is a DataError naming it.
    """
    folder = Path(folder).resolve()
    with _HELD_LOCK:
        covering = _covering(folder)
        if covering is not None:
            _HELD[covering].count += 1
    if covering is not None:
        try:
            yield folder
        finally:
            _release(covering)
        return
    _check_ancestors(folder)
    fd, lock_path = _open_lock_file(folder)
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = describe_holder(_holder(lock_path))
            if not wait:
                os.close(fd)
                raise FolderLocked(
                    f"{folder}: in use by {holder}; wait for it to finish, or add --wait to start when it does"
                ) from None
            if not announced:
                logger.warning("%s: in use by %s; waiting for it to finish", folder, holder)
                announced = True
            time.sleep(poll_s)
    previous = _holder(lock_path)
    if previous.get("pid"):  # a holder releases by emptying the file: this one ended without releasing
        logger.warning(
            "%s: taking over the lock of %s, which ended without releasing it", folder, describe_holder(previous)
        )
    _record(fd, lock_path)
    with _HELD_LOCK:
        _HELD[folder] = _Held(fd, 1)
    try:
        yield folder
    finally:
        _release(folder)


def _release(folder: Path) -> None:
    with _HELD_LOCK:
        held = _HELD[folder]
        held.count -= 1
        if held.count:
            return
        del _HELD[folder]
    # The file stays (removing it would race a writer that just opened it); emptied, it names no holder.
    try:
        os.ftruncate(held.fd, 0)
    except OSError:
        pass
    os.close(held.fd)  # closing drops the flock
