"""The one registry mechanism: name → object, with helpful errors. The harness's methods, models
and metrics (``bench.registry``), qdiff's backends and its transforms all use it."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from qdiff.errors import QdiffError

log = logging.getLogger(__name__)
_LOADING: list[str] = []  # the registering modules being imported, innermost last (any registry)
_REGISTRIES: weakref.WeakSet = weakref.WeakSet()


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
        entry_points: the entry-point group through which installed packages register
            entries (``qdiff_bench.methods``), loaded after ``modules`` on the first lookup.
    """

    def __init__(
        self,
        kind: str,
        modules: tuple[str, ...] = (),
        error: type[Exception] = UnknownNameError,
        entry_points: str | None = None,
    ) -> None:
        self.kind, self.modules, self.error, self.entry_points = kind, modules, error, entry_points
        self._entries: dict[str, Any] = {}
        self._origins: dict[str, str] = {}  # name -> the module that registered it
        self._clashes: dict[str, list[str]] = {}  # name -> the modules that all registered it
        # What could not be loaded (a module that failed to import, a name taken twice): one
        # line each, logged once and repeated where a lookup misses.
        self.problems: dict[str, str] = {}
        self._imported = not modules and not entry_points
        _REGISTRIES.add(self)

    def _all(self) -> dict[str, Any]:
        """The entries, after importing the registering modules once: the packages' modules,
        then the installed packages' entry points of the registry's group. A module that fails
        to import (or exits) and a name registered by two modules are logged in one line each;
        everything else stays usable."""
        if not self._imported:
            self._imported = True  # first: a registering module may look a name up while it loads
            try:
                for name in self.modules:
                    module = importlib.import_module(name)
                    for info in pkgutil.iter_modules(getattr(module, "__path__", []), f"{name}."):
                        self.load(info.name)
                for point in (
                    importlib.metadata.entry_points(group=self.entry_points) if self.entry_points else ()
                ):
                    where = f"entry point {point.name} = {point.value} ({self.entry_points})"
                    self.load(point.module, point.load, where)
            except BaseException:
                self._imported = False
                raise
        return self._entries

    def load(
        self, module: str, importer: Callable[[], object] | None = None, where: str | None = None
    ) -> bool:
        """Import one registering module (``importer()``, default ``import_module``), whatever
        registry it registers in. A failure (an exception, ``sys.exit``) drops what it
        registered and is one logged line naming ``where`` (default: its file); a name it
        registers that another module registered too becomes unusable, one line naming both.
        Returns whether it loaded."""
        _LOADING.append(module)
        try:
            (importer or (lambda: importlib.import_module(module)))()
            return True
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a broken plugin must not end the process
            sys.modules.pop(module, None)
            for registry in list(_REGISTRIES):
                registry._forget(module)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._problem(module, f"{where or _source(module)} failed to import ({reason}); what it "
                                  "registers is unavailable")  # fmt: skip
            return False
        finally:
            _LOADING.pop()
            for registry in list(_REGISTRIES):
                registry._settle()

    def _forget(self, module: str) -> None:
        for name in [n for n, m in self._origins.items() if m == module]:
            self._entries.pop(name, None)
            self._origins.pop(name)

    def _settle(self) -> None:
        """Names registered twice: unusable, one line naming both modules."""
        for name, modules in self._clashes.items():
            if name in self.problems:
                continue
            self._entries.pop(name, None)  # neither is the one a matrix meant
            files = " and ".join(_source(m) for m in modules)
            self._problem(name, f"{self.kind} {name!r} is registered by both {files}; rename one of them")

    def _problem(self, key: str, message: str) -> None:
        self.problems[key] = message
        log.warning("%s", message)

    def names(self) -> list[str]:
        return sorted(self._all())

    def add(self, obj: Any, name: str | None = None) -> Any:
        """Register ``obj`` under ``name`` (default: its own ``name``) and return it, so that a
        module writes ``METHOD = METHODS.add(RecipeMethod("mine", ...))`` or decorates a class."""
        name = obj.name if name is None else name
        loading = _LOADING[-1] if _LOADING else None
        origin = loading or getattr(obj, "__module__", None) or "?"
        if name in self._clashes:
            self._clashes[name].append(origin)
            return obj
        if self._entries.get(name, obj) is not obj:
            if loading is None:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {_source(self._origins[name])})"
                )
            self._clashes[name] = [self._origins[name], origin]
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
    file = getattr(sys.modules.get(module), "__file__", None)
    if file:
        relative = os.path.relpath(file)
        return file if relative.startswith("..") else relative
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None and spec.origin else None
    if origin is None:
        return module
    relative = os.path.relpath(origin)
    return origin if relative.startswith("..") else relative
