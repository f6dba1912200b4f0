"""The one registry mechanism: name → object, with helpful errors. The harness's methods, models
and metrics (``bench.registry``), qdiff's backends and its transforms all use it."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator
from typing import Any

from qdiff.errors import QdiffError

log = logging.getLogger(__name__)


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
        self._origins: dict[str, str] = {}  # name -> the module that registered it
        self._loading: str | None = None  # the registering module being imported
        self._clashes: dict[str, list[str]] = {}  # name -> the modules that all registered it
        # What could not be loaded (a module that failed to import, a name taken twice): one
        # line each, logged once and repeated where a lookup misses.
        self.problems: dict[str, str] = {}
        self._imported = not modules

    def _all(self) -> dict[str, Any]:
        """The entries, after importing the registering modules once. A module that fails to
        import (or exits) and a name registered by two modules are logged in one line each;
        everything else stays usable."""
        if not self._imported:
            self._imported = True  # first: a registering module may look a name up while it loads
            try:
                for name in self.modules:
                    module = importlib.import_module(name)
                    for info in pkgutil.iter_modules(getattr(module, "__path__", []), f"{name}."):
                        self._load(info.name)
            except BaseException:
                self._imported = False
                raise
            for name, modules in self._clashes.items():
                del self._entries[name]  # neither is the one a matrix meant: the name is unusable
                files = " and ".join(_source(m) for m in modules)
                self._problem(name, f"{self.kind} {name!r} is registered by both {files}; rename one of them")
        return self._entries

    def _load(self, module: str) -> None:
        """Import one registering module; a failure drops what it registered and is logged."""
        self._loading = module
        try:
            importlib.import_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a broken plugin must not end the process
            sys.modules.pop(module, None)
            for name in [n for n, m in self._origins.items() if m == module]:
                self._entries.pop(name, None)
                self._origins.pop(name)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._problem(
                module, f"{_source(module)} failed to import ({reason}); its {self.kind}s are unavailable"
            )
        finally:
            self._loading = None

    def _problem(self, key: str, message: str) -> None:
        self.problems[key] = message
        log.warning("%s", message)

    def names(self) -> list[str]:
        return sorted(self._all())

    def add(self, obj: Any, name: str | None = None) -> Any:
        """Register ``obj`` under ``name`` (default: its own ``name``) and return it, so that a
        module writes ``METHOD = METHODS.add(RecipeMethod("mine", ...))`` or decorates a class."""
        name = obj.name if name is None else name
        origin = self._loading or getattr(obj, "__module__", None) or "?"
        if self._entries.get(name, obj) is not obj:
            if self._loading is None:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {_source(self._origins[name])})"
                )
            self._clashes.setdefault(name, [self._origins[name]]).append(origin)
            return obj
        self._entries[name] = obj
        self._origins.setdefault(name, origin)
        return obj

    def get(self, name: str) -> Any:
        entries = self._all()
        if name not in entries:
            close = difflib.get_close_matches(str(name), entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if name in self.problems:
                raise self.error(self.problems[name])
            broken = "".join(f"; {m}" for k, m in self.problems.items() if k not in self._clashes)
            raise self.error(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}{broken}")
        return entries[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        """The names in the order they were registered."""
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _source(module: str) -> str:
    """The file a module is loaded from, relative to the working folder where it lies below it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None and spec.origin else None
    if origin is None:
        return module
    relative = os.path.relpath(origin)
    return origin if relative.startswith("..") else relative
