"""On-disk cache of expensive, deterministic artefacts (FP samples, calibration data), by content hash."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from bench.fsio import atomic_path

CACHE_ENV = "QDIFF_BENCH_CACHE"


def cache_dir() -> Path:
    """``$QDIFF_BENCH_CACHE``, else ``~/.cache/qdiff-bench``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qdiff-bench")


def cached_tensors(
    kind: str, key: str, build: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load ``kind/key.safetensors`` or build, store atomically, and return it.

    Returns:
        The tensors and whether they came from the cache. An unreadable cache file is rebuilt.
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path)), True
        except Exception:  # a damaged entry is only a cache miss
            path.unlink(missing_ok=True)
    tensors = build()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return tensors, False


def cached_module(kind: str, key: str, build: Callable[[], dict]) -> tuple[dict, bool]:
    """Like :func:`cached_tensors` for a dict holding whole modules (quantized checkpoints).

    Stored with ``torch.save``; callers put a hash of the code that builds the modules into
    ``key`` (:func:`bench.provenance.code_hash`), so a cached pickle is only ever loaded by the
    code that wrote it.
    """
    value = load_module(kind, key)
    if value is not None:
        return value, True
    value = build()
    store_module(kind, key, value)
    return value, False


def load_module(kind: str, key: str) -> dict | None:
    """A checkpoint stored by :func:`store_module`, or ``None``."""
    path = cache_dir() / kind / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        # Our own cache file, written by the same code version: full unpickling is safe.
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception:  # a damaged entry is only a cache miss
        path.unlink(missing_ok=True)
        return None


def store_module(kind: str, key: str, value: dict) -> None:
    with atomic_path(cache_dir() / kind / f"{key}.pt") as tmp:
        torch.save(value, tmp)
