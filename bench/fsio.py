"""Files that readers see whole or not at all: results rows, cache entries, reports."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; on success it is flushed to disk
    and renamed onto ``path`` (readers see the old file or the new one, never a partial one);
    on failure (a full disk, an interrupt) it is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the group
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
