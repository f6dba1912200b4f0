"""On-disk cache of expensive, deterministic artefacts (FP samples, calibration data, quantized
checkpoints), by content hash.

Nothing read from the cache is trusted: each entry has a SHA-256 of its bytes written beside it
(``<key>.sha256``) and is checked against it and against what the caller expects (``check``:
shapes, counts, dtypes) before use; a mismatch is rebuilt, with one warning line. Tensors are
safetensors; checkpoints (whole quantized modules) are loaded with ``torch.load(weights_only=True)``
and an allowlist of *classes* from the suite and its model libraries (:func:`load_module`), so a
hostile file can name no function to call — not even with a valid checksum. Writing is
best-effort: a cache that cannot be written (full, read-only) costs the reuse, never the run.

Each entry is built once however many processes want it at the same time (worker processes, Ray
tasks on every node of a cluster that shares the cache folder): the first takes ``<key>.lock``
(an ``O_EXCL`` file, kept touched while it builds), the others wait for the entry and load it.
A lock whose holder died (its process is gone, or, from another host, it went untouched for
:data:`LOCK_STALE_S`) is taken over.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import hashlib
import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.fsio import atomic_path, heartbeat, lock_is_stale, try_lock, write_atomic

CACHE_ENV = "QDIFF_BENCH_CACHE"
log = logging.getLogger("qdiff-bench")
Check = Callable[[Any], str | None]  # what is wrong with a loaded entry, or None
READ_ONLY = 0o444
LOCK_STALE_S = 120.0  # a build lock untouched this long is a dead (or unreachable) builder's
HEARTBEAT_S = 10.0  # how often a builder touches its lock
WAIT_POLL_S = 0.5  # how often a process waiting for another's build looks for the entry
# Packages whose classes a checkpoint may instantiate (as torch's own pickles of modules do:
# ``__new__`` and ``__setstate__``, no ``__init__``); no function is ever allowed.
TRUSTED_PACKAGES = ("torch", "diffusers", "qdiff", "bench", "baselines", "collections")


def cache_dir() -> Path:
    """``$QDIFF_BENCH_CACHE``, else ``~/.cache/qdiff-bench``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qdiff-bench")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, load: Callable[[Path], Any], check: Check | None) -> Any | None:
    """The entry at ``path`` if its checksum, loading and ``check`` all pass; else None (after
    one warning line and removing it, when it existed)."""
    sidecar = _sidecar(path)
    # An entry without its checksum is not finished (its builder writes the checksum last).
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        if sidecar.read_text().strip() != _digest(path):
            raise ValueError("its bytes do not match the checksum written with it")
        value = load(path)
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(problem)
        return value
    except Exception as exc:  # a damaged, tampered or foreign entry is only a cache miss
        log.warning("cache entry %s is not usable (%s); rebuilding it", path, exc)
        for stale in (path, sidecar):
            with contextlib.suppress(OSError):  # read-only: the rebuilt entry is not stored either
                stale.unlink(missing_ok=True)
        return None


def _bound(key: str, stored_key: Any) -> None:
    """Raise ValueError unless an entry was built for ``key``: a file copied over another
    entry, its checksum rewritten, would otherwise be used as that entry."""
    if stored_key != key:
        raise ValueError(f"it was built for key {stored_key!r}, not {key!r}")


def _store(path: Path, save: Callable[[Path], None]) -> None:
    """Write an entry and then its checksum (an entry without one is never used), both
    read-only: a model maps its entry's pages (safetensors, ``torch.load(mmap=True)``), and a
    file truncated in place under a mapping kills its process with SIGBUS. Entries are
    replaced by rename, never rewritten, so nothing of the suite's needs to write them."""
    try:
        with atomic_path(path, READ_ONLY) as tmp:
            save(tmp)
        write_atomic(_sidecar(path), _digest(path) + "\n", READ_ONLY)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        log.warning("could not write cache entry %s (%s); the run goes on without caching it", path, exc)
        with contextlib.suppress(OSError):  # e.g. the cache path is a file: nothing was written
            path.unlink(missing_ok=True)


def cached_tensors(
    kind: str, key: str, build: Callable[[], dict[str, torch.Tensor]], check: Check | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load ``kind/key.safetensors`` (verified; ``check`` says what is wrong with the loaded
    tensors, e.g. a sample count) or build and store it.

    Returns:
        The tensors and whether they came from the cache.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = cache_dir() / kind / f"{key}.safetensors"

    def make() -> dict[str, torch.Tensor]:
        tensors = build()
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        _store(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"key": key}))
        return tensors

    def load(p: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(p), framework="pt") as f:
            _bound(key, (f.metadata() or {}).get("key"))
        return load_file(str(p))

    return _once(path, lambda: _verified(path, load, check), make)


def cached_module(
    kind: str, key: str, build: Callable[[], dict], check: Check | None = None
) -> tuple[dict, bool]:
    """Like :func:`cached_tensors` for a dict holding whole modules (quantized checkpoints),
    stored with ``torch.save`` beside the key it was built for and read back by
    :func:`load_module`; ``check`` says what is wrong with a loaded dict."""
    path = cache_dir() / kind / f"{key}.pt"

    def make() -> dict:
        value = build()
        _store(path, lambda tmp: _save_module({"key": key, "value": value}, tmp))
        return value

    def load(p: Path) -> dict:
        stored = load_module(p)
        if not isinstance(stored, dict) or set(stored) != {"key", "value"}:
            raise ValueError("not an entry of this cache")
        _bound(key, stored["key"])
        if not isinstance(stored["value"], dict):
            raise ValueError("not a checkpoint")
        return stored["value"]

    return _once(path, lambda: _verified(path, load, check), make)


def _once(path: Path, load: Callable[[], Any], make: Callable[[], Any]) -> tuple[Any, bool]:
    """The entry at ``path`` from ``load()``, or built and stored by ``make()`` under its lock
    while every other process that wants it waits (see the module docstring). Returns the value
    and whether it came from the cache."""
    lock = path.with_name(path.name + ".lock")
    while True:
        value = load()
        if value is not None:
            return value, True
        try:
            locked = try_lock(lock)
        except OSError:  # a cache that cannot be written: build here, without sharing
            return make(), False
        if locked:
            break
        if lock_is_stale(lock, LOCK_STALE_S):
            log.warning("cache entry %s: its builder is gone; building it here", path)
            lock.unlink(missing_ok=True)
        else:
            time.sleep(WAIT_POLL_S)
    try:
        with heartbeat(lock, HEARTBEAT_S):
            value = load()  # finished by another process between the look and the lock
            return (value, True) if value is not None else (make(), False)
    finally:
        lock.unlink(missing_ok=True)


def _save_module(value: dict, path: Path) -> None:
    """``torch.save`` with diffusers' ``FrozenDict`` (every model's config) pickled as a call of
    the class on a plain dict, the one form of a dict subclass the weights-only loader rebuilds."""
    from diffusers.configuration_utils import FrozenDict

    table = copyreg.dispatch_table
    previous = table.get(FrozenDict)
    table[FrozenDict] = lambda d: (FrozenDict, (dict(d),))
    try:
        torch.save(value, path)
    finally:
        if previous is None:
            del table[FrozenDict]
        else:
            table[FrozenDict] = previous


def load_module(path: Path) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` that also rebuilds the suite's modules.

    The file's globals must all be classes (``nn.Module`` subclasses, dataclasses, dicts) of
    :data:`TRUSTED_PACKAGES`; anything else (a function such as ``os.system``, a class from
    elsewhere) fails the load with ``UnpicklingError``, before anything is called.
    """
    allowed = [_trusted_class(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
    with torch.serialization.safe_globals(allowed):
        # Mapped, not read: a real-size checkpoint's tensors are file pages the kernel can drop
        # (SDXL's simulated UNet is 9.6 GiB beside the FP model the process already holds).
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)


def _trusted_class(name: str) -> type:
    module, _, attr = name.rpartition(".")
    if module.split(".")[0] not in TRUSTED_PACKAGES:
        raise torch.serialization.pickle.UnpicklingError(
            f"checkpoint names {name}, outside the suite's packages"
        )
    obj = getattr(importlib.import_module(module), attr, None)
    # diffusers' attention processors are plain classes that a model holds beside its modules
    # (a weight-only model keeps the default one): rebuilt from their state, like a module.
    processor = module == "diffusers.models.attention_processor" and attr.endswith(
        ("Processor", "Processor2_0")
    )
    ok = isinstance(obj, type) and (
        issubclass(obj, nn.Module | dict) or dataclasses.is_dataclass(obj) or processor
    )
    if not ok:
        raise torch.serialization.pickle.UnpicklingError(
            f"checkpoint names {name}, which is not a module class"
        )
    return obj
