"""Callbacks installed for one pass of a model over data, and removed however the pass ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Protocol


class Handle(Protocol):
    def remove(self) -> None: ...


@contextlib.contextmanager
def installed(handles: Iterable[Handle]) -> Iterator[None]:
    """``with installed(m.register_forward_pre_hook(fn) for m in modules): run the model``:
    every handle is removed on exit, also when the pass raises (a capture stopping early)."""
    held: list[Handle] = []
    try:
        for handle in handles:
            held.append(handle)
        yield
    finally:
        for handle in held:
            handle.remove()
