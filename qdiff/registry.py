"""The one registry mechanism: name → object, with helpful errors. The harness's methods, models
and metrics (``bench.registry``), qdiff's backends and its transforms all use it."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any

from qdiff.errors import QdiffError


class UnknownNameError(QdiffError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry:
    """Maps short names to objects.

    Args:
        kind: what the entries are ("method", "backend", ...), used in error messages.
        entries: ``{name: "package.module:attribute"}``, each imported only when first used
            (so listing the names imports nothing).
        error: the exception an unknown name raises (a subclass of :class:`UnknownNameError`
            or another :class:`QdiffError`), given the message.
    """

    def __init__(
        self, kind: str, entries: dict[str, str] | None = None, error: type[Exception] = UnknownNameError
    ) -> None:
        self.kind, self.error = kind, error
        self._entries: dict[str, str | None] = dict(entries or {})
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def register(self, name: str, target: str) -> None:
        """Add ``name`` → the lazily imported ``"module:attribute"`` ``target``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def add(self, name: str, obj: Any) -> Any:
        """Add ``name`` → ``obj`` itself (already imported: a class registering itself)."""
        if name in self._entries and self._loaded.get(name) is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name], self._loaded[name] = None, obj
        return obj

    def get(self, name: str) -> Any:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The names in the order they were registered."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
