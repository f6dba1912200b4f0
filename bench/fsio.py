"""Files that readers see whole or not at all (results rows, cache entries, reports), and
lock files that any number of processes, on any number of hosts sharing a folder, agree on."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o666) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; on success it is flushed to disk
    and renamed onto ``path`` (readers see the old file or the new one, never a partial one);
    on failure (a full disk, an interrupt) it is removed and ``path`` is untouched. ``mode``
    (less the umask) is the file's permissions: 0o444 for a file never to be changed in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # After the block: a writer that recreates the file (safetensors) sets its own mode.
        # mkstemp's 0600 would hide results and cache entries from the group.
        os.chmod(tmp, mode & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """``path.write_text(text)`` through :func:`atomic_path`."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def try_lock(path: Path) -> bool:
    """Create ``path`` exclusively (``O_EXCL``, atomic on local and NFS filesystems), recording
    this process's pid and host; False when it exists (another holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        held = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        json.dump({**held, "start": process_start(os.getpid())}, f)
    return True


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``), or None where
    unknown: with the pid it names one process, where a pid alone is reused (a restarted
    container's PID 1)."""
    stat = proc_stat(pid)
    try:
        return int(stat[19])
    except (IndexError, ValueError):
        return None


def lock_holder(path: Path) -> dict | None:
    """Who holds the lock ``path`` (``{"pid", "host", "time"}``), or None if nobody does."""
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        return held if isinstance(held, dict) and {"pid", "host"} <= set(held) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or its writer died mid-write


UNREADABLE_GRACE_S = 10.0  # a lock still unreadable this long after its creation is a dead writer's


def lock_is_stale(path: Path, after_s: float) -> bool:
    """Whether the lock's holder is gone: its process is dead (same host), or the lock was not
    touched for ``after_s`` seconds (another host: a crashed node; holders that may work for
    long keep it touched with :func:`heartbeat`)."""
    held = lock_holder(path)
    if held is None:
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if not held:
        return age > UNREADABLE_GRACE_S
    if held["host"] == socket.gethostname():
        pid = int(held["pid"])
        if not _alive(pid):
            return True
        start = held.get("start")
        if start is not None and process_start(pid) not in (None, start):
            return True  # the pid is alive again, but as another process
    return age > after_s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = proc_stat(pid)  # a killed process nobody has reaped yet (a zombie) holds nothing any more
    return not stat or stat[0] != "Z"


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...);
    empty where there is none (another OS, a process gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


@contextlib.contextmanager
def heartbeat(path: Path, every_s: float) -> Iterator[None]:
    """Touch ``path`` every ``every_s`` seconds while the block runs, so that holders on other
    hosts can tell a long build from a dead one (:func:`lock_is_stale`)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name=f"heartbeat {path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def missing_path(value: str, hub_ids: bool = False) -> str | None:
    """What is wrong with a setting that names a local file or folder (None if nothing): it must
    exist. With ``hub_ids``, a value shaped like a hub id (``owner/name``) is not a path, and
    neither is a plain name without a ``/`` (a registered data set, ``cifar10-train``)."""
    path = Path(value).expanduser()
    if path.exists():
        return None
    local = value.startswith(("/", ".", "~")) or Path(value).suffix in CHECKPOINT_SUFFIXES
    if not local and (value.count("/") == 1 if hub_ids else "/" not in value):
        return None
    return f"{value}: no such file or folder here"


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
