"""The one registry mechanism: name → object, with helpful errors. The harness's methods, models
and metrics (``bench.registry``), qdiff's backends and its transforms all use it."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

from qdiff.errors import QdiffError


class UnknownNameError(QdiffError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry:
    """Maps short names to objects; each object is registered once, by the module that defines
    it, under its own ``name`` (so a name is written in one place).

    Args:
        kind: what the entries are ("method", "backend", ...), used in error messages.
        modules: the modules whose import registers the entries, imported on the first lookup
            (so importing the registry imports none of them); a package stands for every module
            in it, so a new file in the package registers itself.
        error: the exception an unknown name raises (a subclass of :class:`UnknownNameError`
            or another :class:`QdiffError`), given the message.
    """

    def __init__(
        self, kind: str, modules: tuple[str, ...] = (), error: type[Exception] = UnknownNameError
    ) -> None:
        self.kind, self.modules, self.error = kind, modules, error
        self._entries: dict[str, Any] = {}
        self._imported = not modules

    def _all(self) -> dict[str, Any]:
        """The entries, after importing the registering modules once."""
        if not self._imported:
            self._imported = True  # first: a registering module may look a name up while it loads
            try:
                for name in self.modules:
                    module = importlib.import_module(name)
                    for info in pkgutil.iter_modules(getattr(module, "__path__", []), f"{name}."):
                        importlib.import_module(info.name)
            except BaseException:
                self._imported = False
                raise
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._all())

    def add(self, obj: Any, name: str | None = None) -> Any:
        """Register ``obj`` under ``name`` (default: its own ``name``) and return it, so that a
        module writes ``METHOD = METHODS.add(RecipeMethod("mine", ...))`` or decorates a class."""
        name = obj.name if name is None else name
        if self._entries.get(name, obj) is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> Any:
        entries = self._all()
        if name not in entries:
            close = difflib.get_close_matches(str(name), entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        return entries[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        """The names in the order they were registered."""
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())
