"""A matrix's typed settings: the ``settings`` mapping (and model or method entries' overrides)
read into :class:`Sampling`, :class:`Budget` and :class:`Evaluation`, the executor, and the axes'
values (bits, backends, metrics, seeds, rules), each problem named with its fix."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from bench.errors import BitsError, MatrixError, UnknownNameError
from bench.matrix.load import Problems, unknown_problem
from bench.registry import METRICS
from bench.spec import (
    BUDGET_KEYS,
    CLEANFID_MODES,
    COMPILE_BACKENDS,
    DTYPES,
    EXECUTORS,
    FID_BACKENDS,
    RULE_KEYS,
    SAMPLING_KEYS,
    SETTING_KEYS,
    Bits,
    Budget,
    Evaluation,
    ExecutorSpec,
    Sampling,
)
from qdiff import validate
from qdiff.backends import BACKENDS

NON_NEGATIVE = ("latency_warmup", "eta")  # settings that may be 0 (every other number must be > 0)


def setting_choices() -> dict[str, tuple[str, ...]]:
    return {
        "device": ("auto", "cpu", "cuda"),
        "dtype": DTYPES,
        "backend": tuple(BACKENDS),
        "fid_backend": FID_BACKENDS,
        "fid_mode": CLEANFID_MODES,
        "compile": COMPILE_BACKENDS,
    }


def as_list(path: Path, key: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str | int | dict):
        return [value]
    raise MatrixError(f"{path}: '{key}' must be a list, got {type(value).__name__}")


class Settings(NamedTuple):
    """A matrix's (or one model or method entry's) settings, in their three typed groups."""

    sampling: Sampling
    budget: Budget
    evaluation: Evaluation


def settings_of(
    path: Path,
    where: str,
    values: dict[str, Any],
    base: Settings,
    problems: Problems | None = None,
) -> Settings:
    """Apply setting overrides; each value is type-checked against the field's default. A bad
    one is recorded in ``problems`` and skipped (raised at once without ``problems``)."""
    groups = list(base)
    choices = setting_choices()
    report = problems.add if problems is not None else raise_problem
    for key, value in values.items():
        if key not in SETTING_KEYS:
            report(f"{path}: {where}: {unknown_problem('setting', [key], SETTING_KEYS)}")
            continue
        i = 0 if key in SAMPLING_KEYS else 1 if key in BUDGET_KEYS else 2
        default = getattr(groups[i], key)
        problem = setting_problem(key, value, default, choices.get(key))
        if problem:
            report(f"{path}: {where}: setting {key}={value!r} {problem}")
            continue
        if isinstance(default, float):
            value = float(value)
        groups[i] = dataclasses.replace(groups[i], **{key: value})
    return Settings(*groups)


def executor_of(path: Path, value: Any) -> ExecutorSpec:
    """``settings.executor``: a name, or a mapping of :class:`ExecutorSpec`'s fields."""
    fields = {f.name: f.default for f in dataclasses.fields(ExecutorSpec)}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise MatrixError(f"{path}: settings: executor must be {' or '.join(EXECUTORS)}, or a mapping of "
                          f"{', '.join(fields)}")  # fmt: skip
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise MatrixError(f"{path}: settings: executor: {unknown_problem('key', unknown, tuple(fields))}")
    name = value.get("name", "local")
    if name not in EXECUTORS:
        raise MatrixError(f"{path}: settings: executor: {unknown_problem('executor', [name], EXECUTORS)}")
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    checks = {
        "address": lambda v: v is None or isinstance(v, str),
        "retries": lambda v: number(v) and v == int(v) and v >= 0,
        "memory_gib": lambda v: v is None or (number(v) and v > 0),
        "dashboard": lambda v: isinstance(v, bool),
    }
    wants = {"address": "a string (auto, ray://host:10001)", "retries": "an integer >= 0",
             "memory_gib": "a number > 0", "dashboard": "true or false"}  # fmt: skip
    for key, ok in checks.items():
        if key in value and not ok(value[key]):
            raise MatrixError(f"{path}: settings: executor: {key}={value[key]!r} must be {wants[key]}")
    return ExecutorSpec(**value)


def raise_problem(message: str) -> None:
    raise MatrixError(message)


def setting_problem(key: str, value: Any, default: Any, choices: tuple[str, ...] | None) -> str | None:
    """What is wrong with ``value`` for a setting whose default is ``default`` (its type is the
    setting's type; numbers go through the library's own checks, :mod:`qdiff.validate`)."""
    if isinstance(default, bool | str):
        if not isinstance(value, type(default)):
            kind = "true or false" if isinstance(default, bool) else "a string"
            return f"must be {kind} (default {default!r})"
        return None if choices is None else validate.choice(value, choices)
    integer = isinstance(default, int)
    problem = validate.number(value, allow_zero=key in NON_NEGATIVE, integer=integer)
    if problem is None and key == "eta" and value > 1:
        return "is outside DDIM's [0, 1] (0: deterministic, 1: DDPM-like)"
    return None if problem is None else f"{problem} (default {default!r})"


def entry_of(path: Path, axis: str, i: int, item: Any, registry) -> tuple[str, dict[str, Any]]:
    """An axis entry: ``name`` or ``{name: ..., **overrides}``; the name must be registered."""
    where = f"{axis}[{i}]"
    if isinstance(item, dict):
        extra = dict(item)
        name = extra.pop("name", None)
    else:
        name, extra = item, {}
    if not isinstance(name, str):
        raise MatrixError(f"{path}: {where}: expected a name or a mapping with 'name', got {item!r}")
    try:
        registry.get(name)
    except UnknownNameError as exc:
        raise MatrixError(f"{path}: {where}: {exc}") from None
    return name, extra


def bits_of(path: Path, items: list) -> list[Bits]:
    return [one_bits(path, i, label) for i, label in enumerate(items)]


def one_bits(path: Path, i: int, label: Any) -> Bits:
    try:
        return Bits.parse(str(label))
    except BitsError as exc:
        raise MatrixError(f"{path}: bits[{i}]: {exc}") from None


def rules_of(path: Path, key: str, items: list) -> list[dict[str, tuple[str, ...]]]:
    rules = []
    for i, rule in enumerate(items):
        if not isinstance(rule, dict) or not rule or set(rule) - set(RULE_KEYS):
            raise MatrixError(
                f"{path}: {key}[{i}]: a rule is a mapping with keys from {', '.join(RULE_KEYS)}, "
                f"e.g. {{method: linear, bits: W4A32}}; got {rule!r}"
            )
        # YAML 1.1 reads a bare ``off`` (a compile mode) as false.
        rules.append({k: tuple("off" if v is False else str(v) for v in as_list(path, k, val))
                      for k, val in rule.items()})  # fmt: skip
    return rules


def backends_of(path: Path, names: list | tuple, where: Callable[[int], str]) -> list[str]:
    """Backend names checked against the registry; ``where(i)`` locates the i-th in the file."""
    names = [str(b) for b in names]
    for i, name in enumerate(names):
        if name not in BACKENDS:
            raise MatrixError(
                f"{path}: {where(i)}: unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
            )
    return names


def metrics_of(path: Path, where: str, value: Any) -> tuple[str, ...]:
    metrics = tuple(str(m) for m in as_list(path, where, value))
    for i, metric in enumerate(metrics):
        try:
            METRICS.get(metric)
        except UnknownNameError as exc:
            raise MatrixError(f"{path}: {where}[{i}]: {exc}") from None
    return metrics


def seeds_of(path: Path, key: str, items: list) -> list[int]:
    if not items or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in items):
        raise MatrixError(
            f"{path}: '{key}' must be a list of integers in [0, 2^31), e.g. [0, 1]; got {items!r}"
        )
    if len(set(items)) != len(items):
        raise MatrixError(f"{path}: '{key}' lists a seed twice; list each once")
    return items
