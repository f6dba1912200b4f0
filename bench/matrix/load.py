"""Reading matrix files: strict YAML (no duplicate keys, bounded aliases, UTF-8) and ``extends``
merging, collecting every problem of a file at once (:class:`Problems`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.errors import MatrixError

MATRIX_KEYS = (
    "name",
    "description",
    "extends",
    "preset",
    "models",
    "methods",
    "bits",
    "backends",
    "compile",
    "seeds",
    "calib_seeds",
    "metrics",
    "settings",
    "exclude",
    "include",
    "plugins",
)


class Problems:
    """Every problem of one matrix file, raised together as one :class:`MatrixError`."""

    def __init__(self, path: Path) -> None:
        self.path, self.found = path, []
        self.unknown_keys: list[str] = []  # misspelt top-level keys (their axes look empty)

    def add(self, message: str) -> None:
        if message not in self.found:
            self.found.append(message)

    def attempt(self, fn: Callable, *args, default=None):
        """``fn(*args)``, or ``default`` with its :class:`MatrixError` recorded."""
        try:
            return fn(*args)
        except MatrixError as exc:
            self.add(str(exc))
            return default

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise MatrixError(self.found[0])
        if self.found:
            lines = "\n".join(f"  - {p.removeprefix(f'{self.path}: ')}" for p in self.found)
            raise MatrixError(f"{self.path}: {len(self.found)} problems:\n{lines}")


def by_parent(inherited: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, parent in inherited.items():
        out.setdefault(parent, []).append(key)
    return out


# A matrix file is a few dozen values. YAML's aliases can make a short file expand into an
# enormous graph (nested anchors: a "billion laughs"), which every later step (validation
# messages, hashing) would walk; a file whose expansion exceeds this many values is refused.
MAX_VALUES = 10_000
MAX_BYTES = 1 << 20  # a matrix file is a few kB; read no more than this
MAX_EXTENDS = 32  # files in one 'extends' chain


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the
    last silently: a second ``methods:`` would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise MatrixError(
                    f"line {line}: key {key!r} is given twice in one mapping (first on line "
                    f"{seen[key]}); keep one"
                )
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def _file_problem(path: Path) -> str | None:
    """What makes ``path`` not a readable matrix file (missing, a folder, a device), or None."""
    if path.is_dir():
        return "is a folder, not a matrix file"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file (a device, FIFO or socket), not a matrix file"
    size = path.stat().st_size
    return f"is {size:,} bytes, more than a matrix file's {MAX_BYTES:,}" if size > MAX_BYTES else None


def literal_sizes(data: dict[str, Any]) -> dict[str, int]:
    """Values under each top-level key as written: a node reached again through an alias counts
    once (unlike :func:`expansion_exceeds`)."""
    sizes = {}
    for key, value in data.items():
        seen, count, stack = set(), 0, [value]
        while stack:
            item = stack.pop()
            count += 1
            if isinstance(item, dict | list):
                if id(item) in seen:
                    continue
                seen.add(id(item))
                stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
        sizes[str(key)] = count
    return sizes


def expansion_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data``, with every alias expanded, holds more than ``limit`` values (counted
    without expanding: a shared node counts as often as it is reached, up to the limit)."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def read_yaml(path: Path, problems: Problems) -> dict[str, Any]:
    """The file's mapping; unknown keys are recorded in ``problems`` and dropped (a file that
    cannot be read at all raises)."""
    if path.is_dir():
        raise MatrixError(f"matrix file {path} is a folder; name a YAML file (e.g. {path}/default.yaml)")
    if not path.exists():
        raise MatrixError(f"matrix file {path} does not exist; see configs/ for examples")
    problem = _file_problem(path)
    if problem:
        raise MatrixError(f"matrix file {path} {problem}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MatrixError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader: builds no objects
    except MatrixError as exc:
        raise MatrixError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MatrixError(f"{path}:{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise MatrixError(f"{path}: nested too deeply to be a matrix file") from None
    if expansion_exceeds(data, MAX_VALUES):
        sizes = literal_sizes(data) if isinstance(data, dict) else {}
        largest = max(sizes, key=sizes.get, default=None)
        if largest is not None and sum(sizes.values()) > MAX_VALUES:
            raise MatrixError(
                f"{path}: {largest!r} holds {sizes[largest]:,} values, and a matrix file at most "
                f"{MAX_VALUES:,}; a matrix of that size runs for years: list fewer"
            )
        raise MatrixError(
            f"{path}: YAML aliases nested in aliases expand it to more than {MAX_VALUES:,} values; "
            "write the values out"
        )
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: a matrix file is a mapping with keys {', '.join(MATRIX_KEYS)}")
    unknown = sorted(set(data) - set(MATRIX_KEYS))
    if unknown:
        problems.add(f"{path}: {unknown_problem('key', unknown, MATRIX_KEYS)}")
        problems.unknown_keys += unknown
    return {k: v for k, v in data.items() if k in MATRIX_KEYS}


def unknown_problem(what: str, names: list[str], valid: tuple[str, ...]) -> str:
    """``unknown key 'setings' (did you mean 'settings'?); valid: ...``."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what}{'s' if len(names) > 1 else ''} {', '.join(hints)}; valid: {', '.join(valid)}"


def read_merged(
    path: Path, seen: tuple[Path, ...], inherited: dict[str, str], problems: Problems
) -> dict[str, Any]:
    """The file with its ``extends`` chain merged; ``inherited`` receives each key (and
    setting) that came from a parent, with the parent's path."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise MatrixError(f"{path}: 'extends' forms a cycle: {chain}")
    if len(seen) >= MAX_EXTENDS:
        raise MatrixError(
            f"{seen[0]}: its 'extends' chain is more than {MAX_EXTENDS} files long (at {path}); "
            "extend a file that holds the shared keys instead"
        )
    data = read_yaml(path, problems)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise MatrixError(f"{path}: 'extends' must be a file path relative to {path.parent}")
    parent_path = path.parent / parent_name
    what = _file_problem(parent_path)
    if what:  # nothing below can be checked without the parent's keys
        where = (
            ""
            if parent_path.exists()
            else f" ('extends' is relative to the extending file's folder, {path.parent})"
        )
        problems.add(f"{path}: extends {parent_name!r}: {parent_path} {what}{where}")
        problems.raise_any()
    parent = read_merged(parent_path, (*seen, resolved), inherited, problems)
    for key in parent:
        if key not in data and key not in ("name", "description", "settings"):
            inherited.setdefault(key, str(parent_path))
    for key in parent.get("settings") or {}:
        if key not in (data.get("settings") or {}):
            inherited.setdefault(f"settings.{key}", str(parent_path))
    merged = {**parent, **data}
    merged["settings"] = {**(parent.get("settings") or {}), **(data.get("settings") or {})}
    return merged
