"""Matrix files: models × methods × bit widths × seeds, expanded into hashed :class:`RunSpec` s.

A matrix file is YAML::

    name: default                      # results/<name>/ and the ``matrix`` column
    extends: base.yaml                 # optional, relative to this file (see below)
    preset: quick                      # optional: a named budget (bench.spec.PRESETS: quick, paper)
    models: [embedded-digits]          # or {name: sd-1.5, source: /local/dir, samples: 100,
                                       #      metrics: [clip_score]}  (this model's metrics)
    methods: [linear, qdiff]           # or {name: qdiff, weight_iters: 2000}
    bits: [W8A8, W4A8, W4A32]          # W<weight bits>A<activation bits>; 32 = full precision
    backends: [fake, x86]              # optional: deploy each quantized run on each (default:
                                       # the ``backend`` setting); rules may name a backend
    compile: [off, inductor]           # optional: time every run (FP included) each way; the
                                       # first mode measures everything, the others re-measure
                                       # only the metrics that read ``compile`` (latency, memory);
                                       # rules may name a mode
    seeds: [0]                         # sampling seeds: the noise the images start from
    calib_seeds: [0, 1]                # calibration seeds: which calibration trajectories and
                                       # minibatch order (quantized runs only); a cell is the
                                       # mean over both kinds
    metrics: [digits_fd]               # optional; default: each model's own metrics
    settings: {samples: 500, steps: 25, fid_backend: clean-fid}   # Sampling, Budget, Evaluation
                                       # and ``executor: ray`` (bench.spec.ExecutorSpec)
    exclude: [{method: linear, bits: W4A32}]
    include: [{method: qdiff, bits: W2A8}]

``extends`` names a file relative to the extending file's folder. The extending file's keys
replace the parent's whole (``methods``, ``bits``, ``exclude``, ``include``, ...: a list is never
merged), except ``settings``, which merges key by key (the extending file's values win);
``validate`` lists what a file inherited. A budget comes from :class:`Budget`'s defaults (the
paper's), then ``preset``, then ``settings``.

Every problem of a file is reported at once, with a suggestion for a misspelt key or name; an
``exclude`` rule that matches no run is a problem (a typo would otherwise exclude nothing).

``settings`` holds three typed groups: :class:`Sampling` (how images are made),
:class:`Budget` (the quantization budget every method gets) and :class:`Evaluation` (how the
metrics are computed). A model or method entry may be a mapping whose extra keys override
``settings`` for that entry (and, for a model, set its arguments such as ``source``). Every
quantized run gets an FP run of the same model, seed and sampling settings, which is its
paired reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.errors import BitsError, MatrixError, UnknownNameError
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import (
    BUDGET_KEYS,
    CLEANFID_MODES,
    COMPILE_BACKENDS,
    DTYPES,
    EXECUTORS,
    FID_BACKENDS,
    FP_METHOD,
    PRESETS,
    RULE_KEYS,
    SAMPLING_KEYS,
    SETTING_KEYS,
    Bits,
    Budget,
    Evaluation,
    ExecutorSpec,
    MatrixSpec,
    RunSpec,
    Sampling,
)
from qdiff import validate
from qdiff.backends import BACKENDS, get_backend

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
)
NON_NEGATIVE = ("latency_warmup", "eta")  # settings that may be 0 (every other number must be > 0)


def _choices() -> dict[str, tuple[str, ...]]:
    return {
        "device": ("auto", "cpu", "cuda"),
        "dtype": DTYPES,
        "backend": tuple(BACKENDS),
        "fid_backend": FID_BACKENDS,
        "fid_mode": CLEANFID_MODES,
        "compile": COMPILE_BACKENDS,
    }


def parse_rules(items: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``["method=qdiff*", "bits=W4A8,W4A32"]`` → ``{"method": ("qdiff*",), ...}`` (for ``--only``)."""
    rules: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in RULE_KEYS or not value.strip():
            raise MatrixError(
                f"--only {item!r} is not KEY=PATTERN[,PATTERN]; keys: {', '.join(RULE_KEYS)} "
                "(e.g. --only method=qdiff --only bits=W4*)"
            )
        rules[key] = rules.get(key, ()) + tuple(v.strip() for v in value.split(",") if v.strip())
    return rules


def load_matrix(path: str | Path) -> MatrixSpec:
    """Read, merge (``extends``), validate and expand a matrix file.

    Raises:
        MatrixError: with the file, the key and the fix for every problem found (one line
            for one problem; a count and one line each for several).
    """
    path = Path(path)
    inherited: dict[str, str] = {}
    problems = Problems(path)
    data = _read_merged(path, (), inherited, problems)
    spec = _build(data, path, problems)
    problems.raise_any()
    notes = [f"inherited from {parent}: {', '.join(keys)}" for parent, keys in _by_parent(inherited).items()]
    return dataclasses.replace(spec, notes=(*notes, *spec.notes))


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


def _by_parent(inherited: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, parent in inherited.items():
        out.setdefault(parent, []).append(key)
    return out


# A matrix file is a few dozen values. YAML's aliases can make a short file expand into an
# enormous graph (nested anchors: a "billion laughs"), which every later step (validation
# messages, hashing) would walk; a file whose expansion exceeds this many values is refused.
MAX_VALUES = 10_000


class _StrictLoader(yaml.SafeLoader):
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


def _expansion_exceeds(data: Any, limit: int) -> bool:
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


def _read_yaml(path: Path, problems: Problems) -> dict[str, Any]:
    """The file's mapping; unknown keys are recorded in ``problems`` and dropped (a file that
    cannot be read at all raises)."""
    if path.is_dir():
        raise MatrixError(f"matrix file {path} is a folder; name a YAML file (e.g. {path}/default.yaml)")
    if not path.is_file():
        raise MatrixError(f"matrix file {path} does not exist; see configs/ for examples")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MatrixError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no objects
    except MatrixError as exc:
        raise MatrixError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MatrixError(f"{path}:{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise MatrixError(f"{path}: nested too deeply to be a matrix file") from None
    if _expansion_exceeds(data, MAX_VALUES):
        raise MatrixError(
            f"{path}: expands to more than {MAX_VALUES:,} values (YAML aliases nested in aliases?); "
            "write the values out"
        )
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: a matrix file is a mapping with keys {', '.join(MATRIX_KEYS)}")
    unknown = sorted(set(data) - set(MATRIX_KEYS))
    if unknown:
        problems.add(f"{path}: {_unknown('key', unknown, MATRIX_KEYS)}")
        problems.unknown_keys += unknown
    return {k: v for k, v in data.items() if k in MATRIX_KEYS}


def _unknown(what: str, names: list[str], valid: tuple[str, ...]) -> str:
    """``unknown key 'setings' (did you mean 'settings'?); valid: ...``."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown {what}{'s' if len(names) > 1 else ''} {', '.join(hints)}; valid: {', '.join(valid)}"


def _read_merged(
    path: Path, seen: tuple[Path, ...], inherited: dict[str, str], problems: Problems
) -> dict[str, Any]:
    """The file with its ``extends`` chain merged; ``inherited`` receives each key (and
    setting) that came from a parent, with the parent's path."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise MatrixError(f"{path}: 'extends' forms a cycle: {chain}")
    data = _read_yaml(path, problems)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise MatrixError(f"{path}: 'extends' must be a file path relative to {path.parent}")
    parent_path = path.parent / parent_name
    if not parent_path.is_file():  # nothing below can be checked without the parent's keys
        what = "is a folder, not a matrix file" if parent_path.is_dir() else "does not exist"
        problems.add(
            f"{path}: extends {parent_name!r}: {parent_path} {what} ('extends' is relative to "
            f"the extending file's folder, {path.parent})"
        )
        problems.raise_any()
    parent = _read_merged(parent_path, (*seen, resolved), inherited, problems)
    for key in parent:
        if key not in data and key not in ("name", "description", "settings"):
            inherited.setdefault(key, str(parent_path))
    for key in parent.get("settings") or {}:
        if key not in (data.get("settings") or {}):
            inherited.setdefault(f"settings.{key}", str(parent_path))
    merged = {**parent, **data}
    merged["settings"] = {**(parent.get("settings") or {}), **(data.get("settings") or {})}
    return merged


def _as_list(path: Path, key: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str | int | dict):
        return [value]
    raise MatrixError(f"{path}: '{key}' must be a list, got {type(value).__name__}")


def _settings(
    path: Path,
    where: str,
    values: dict[str, Any],
    base: tuple[Sampling, Budget, Evaluation],
    problems: Problems | None = None,
):
    """Apply setting overrides; each value is type-checked against the field's default. A bad
    one is recorded in ``problems`` and skipped (raised at once without ``problems``)."""
    groups = list(base)
    choices = _choices()
    report = problems.add if problems is not None else _raise
    for key, value in values.items():
        if key not in SETTING_KEYS:
            report(f"{path}: {where}: {_unknown('setting', [key], SETTING_KEYS)}")
            continue
        i = 0 if key in SAMPLING_KEYS else 1 if key in BUDGET_KEYS else 2
        default = getattr(groups[i], key)
        problem = _setting_problem(key, value, default, choices.get(key))
        if problem:
            report(f"{path}: {where}: setting {key}={value!r} {problem}")
            continue
        if isinstance(default, float):
            value = float(value)
        groups[i] = dataclasses.replace(groups[i], **{key: value})
    return tuple(groups)


def _executor(path: Path, value: Any) -> ExecutorSpec:
    """``settings.executor``: a name, or a mapping of :class:`ExecutorSpec`'s fields."""
    fields = {f.name: f.default for f in dataclasses.fields(ExecutorSpec)}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise MatrixError(f"{path}: settings: executor must be {' or '.join(EXECUTORS)}, or a mapping of "
                          f"{', '.join(fields)}")  # fmt: skip
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise MatrixError(f"{path}: settings: executor: {_unknown('key', unknown, tuple(fields))}")
    name = value.get("name", "local")
    if name not in EXECUTORS:
        raise MatrixError(f"{path}: settings: executor: {_unknown('executor', [name], EXECUTORS)}")
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


def _raise(message: str) -> None:
    raise MatrixError(message)


def _setting_problem(key: str, value: Any, default: Any, choices: tuple[str, ...] | None) -> str | None:
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


def _entry(path: Path, axis: str, i: int, item: Any, registry) -> tuple[str, dict[str, Any]]:
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


def _bits(path: Path, items: list) -> list[Bits]:
    return [_one_bits(path, i, label) for i, label in enumerate(items)]


def _one_bits(path: Path, i: int, label: Any) -> Bits:
    try:
        return Bits.parse(str(label))
    except BitsError as exc:
        raise MatrixError(f"{path}: bits[{i}]: {exc}") from None


def _rules(path: Path, key: str, items: list) -> list[dict[str, tuple[str, ...]]]:
    rules = []
    for i, rule in enumerate(items):
        if not isinstance(rule, dict) or not rule or set(rule) - set(RULE_KEYS):
            raise MatrixError(
                f"{path}: {key}[{i}]: a rule is a mapping with keys from {', '.join(RULE_KEYS)}, "
                f"e.g. {{method: linear, bits: W4A32}}; got {rule!r}"
            )
        # YAML 1.1 reads a bare ``off`` (a compile mode) as false.
        rules.append({k: tuple("off" if v is False else str(v) for v in _as_list(path, k, val))
                      for k, val in rule.items()})  # fmt: skip
    return rules


def _backends(path: Path, names: list | tuple, where: Callable[[int], str]) -> list[str]:
    """Backend names checked against the registry; ``where(i)`` locates the i-th in the file."""
    names = [str(b) for b in names]
    for i, name in enumerate(names):
        if name not in BACKENDS:
            raise MatrixError(
                f"{path}: {where(i)}: unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
            )
    return names


def _metrics(path: Path, where: str, value: Any) -> tuple[str, ...]:
    metrics = tuple(str(m) for m in _as_list(path, where, value))
    for i, metric in enumerate(metrics):
        try:
            METRICS.get(metric)
        except UnknownNameError as exc:
            raise MatrixError(f"{path}: {where}[{i}]: {exc}") from None
    return metrics


def _seeds(path: Path, key: str, items: list) -> list[int]:
    if not items or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in items):
        raise MatrixError(
            f"{path}: '{key}' must be a list of integers in [0, 2^31), e.g. [0, 1]; got {items!r}"
        )
    if len(set(items)) != len(items):
        raise MatrixError(f"{path}: '{key}' lists a seed twice; list each once")
    return items


def _build(data: dict[str, Any], path: Path, problems: Problems) -> MatrixSpec:
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        problems.add(f"{path}: name={name!r} must be letters, digits, '-' or '_' (it names a folder)")
        name = path.stem
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        problems.add(f"{path}: 'settings' must be a mapping of {', '.join(SETTING_KEYS)}")
        settings = {}
    settings = dict(settings)
    executor = problems.attempt(_executor, path, settings.pop("executor", "local"), default=ExecutorSpec())
    preset = data.get("preset")
    if preset is not None and preset not in PRESETS:
        problems.add(f"{path}: {_unknown('preset', [preset], tuple(PRESETS))}")
        preset = None
    defaults = _settings(
        path, f"preset {preset}", PRESETS.get(preset, {}), (Sampling(), Budget(), Evaluation())
    )
    base = _settings(path, "settings", settings, defaults, problems)
    attempt = problems.attempt

    def listed(key: str, default: Any = None) -> list | None:
        """``key``'s value as a list, or None with the problem recorded (and the others kept)."""
        return attempt(_as_list, path, key, data.get(key, default))

    def entries(axis: str, registry) -> list[tuple[str, dict[str, Any]]]:
        items = listed(axis) or []
        return [e for i, m in enumerate(items) if (e := attempt(_entry, path, axis, i, m, registry))]

    models, methods = entries("models", MODELS), entries("methods", METHODS)
    if (not data.get("models") or not data.get("methods")) and not problems.unknown_keys:
        problems.add(f"{path}: 'models' and 'methods' need at least one entry each (see `qdiff-bench ls`)")
    bits = [b for i, label in enumerate(listed("bits") or []) if (b := attempt(_one_bits, path, i, label))]

    def seed_list(key: str) -> list[int]:
        values = listed(key, [0])
        return [0] if values is None else attempt(_seeds, path, key, values, default=[0])

    seeds, calib_seeds = seed_list("seeds"), seed_list("calib_seeds")
    backends = attempt(_backends, path, listed("backends") or [], lambda i: f"backends[{i}]", default=[])
    compile_modes = attempt(_compile_modes, path, data.get("compile"), settings, default=[])
    metrics = attempt(_metrics, path, "metrics", data.get("metrics"), default=())
    excludes = attempt(_rules, path, "exclude", listed("exclude") or [], default=[])
    includes = attempt(_rules, path, "include", listed("include") or [], default=[])

    model_entries = {}
    model_metrics = {}
    arg_problems: list[str] = []  # wrong paths and values: they do not stop the expansion
    for i, (model, extra) in enumerate(models):
        model_metrics[model] = attempt(
            _metrics, path, f"models[{i}].metrics", extra.pop("metrics", None), default=()
        )
        overrides = {k: v for k, v in extra.items() if k in SETTING_KEYS}
        args = {k: v for k, v in extra.items() if k not in SETTING_KEYS}
        adapter_cls = MODELS.get(model)
        bad = sorted(set(args) - set(adapter_cls.ARGS))
        if bad:
            valid = (*adapter_cls.ARGS, "metrics", *SETTING_KEYS)
            problems.add(f"{path}: models[{i}] ({model}): {_unknown('key', bad, valid)}")
        args = {k: v for k, v in args.items() if k not in bad}
        arg_problems += [f"{path}: models[{i}] ({model}): {p}" for p in adapter_cls.arg_problems(args)]
        model_entries[model] = (
            tuple(sorted(args.items())), _settings(path, f"models[{i}]", overrides, base, problems)
        )  # fmt: skip
    for axis, axis_entries in (("models", models), ("methods", methods)):
        names = [n for n, _ in axis_entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.add(f"{path}: '{axis}' lists {', '.join(twice)} more than once; list each name once")
    method_overrides = {m: extra for m, extra in methods}
    for method, extra in method_overrides.items():
        _settings(path, f"methods ({method})", extra, base, problems)
    axes_unknown = bool(problems.found)
    for problem in arg_problems:
        problems.add(problem)
    if axes_unknown:  # expanding would only report knock-on problems
        return MatrixSpec(name, str(path), ())

    def make(model: str, method: str, b: Bits | None, seed: int, calib_seed: int = 0) -> RunSpec:
        args, settings = model_entries[model]
        sampling, budget, evaluation = _settings(
            path, f"methods ({method})", method_overrides.get(method, {}), settings
        )
        budget = dataclasses.replace(budget, calib_seed=calib_seed)
        run_metrics = model_metrics[model] or metrics or MODELS.get(model).DEFAULT_METRICS
        spec = RunSpec(model, method, None, None, seed, sampling, budget, run_metrics, args, evaluation)
        if method == FP_METHOD:
            return spec.fp_reference()
        return dataclasses.replace(spec, w_bits=b.w, a_bits=b.a)

    def deployments(spec: RunSpec) -> list[RunSpec]:
        """The run on each backend of the ``backends`` axis (a method entry's own ``backend``
        and methods that deploy themselves keep theirs)."""
        if spec.is_fp or not backends:
            return [spec]
        if "backend" in method_overrides.get(spec.method, {}) or METHODS.get(spec.method).backend:
            return [spec]
        return [spec.on_backend(b) for b in backends]

    runs = _cells(model_entries, method_overrides, seeds, bits, calib_seeds, make)
    runs = [c for r in runs for d in deployments(r) for c in _compiled(d, compile_modes)]

    def unmatched(i: int, rule: dict) -> None:
        shown = "{" + ", ".join(f"{k}: {', '.join(v)}" for k, v in rule.items()) + "}"
        problems.add(
            f"{path}: exclude[{i}] {shown} matches no run (a misspelt name or pattern, or a rule "
            "inherited through 'extends': set 'exclude' in this file to replace it)"
        )

    # A rule naming ``method: fp`` also removes FP references (e.g. a compile mode a model
    # cannot run in), which are added after the other rules have applied.
    fp_rules = {i: rule for i, rule in enumerate(excludes) if FP_METHOD in rule.get("method", ())}
    for i, rule in enumerate(excludes):
        if i not in fp_rules and not any(r.matches(rule) for r in runs):
            unmatched(i, rule)
    runs = [r for r in runs if not any(r.matches(rule) for rule in excludes)]
    for i, rule in enumerate(includes):
        added = attempt(_included, path, i, rule, model_entries, method_overrides, seeds, calib_seeds, make,
                        default=[])  # fmt: skip
        if "backend" in rule:  # this rule's runs deploy on exactly the backends it names
            named = attempt(_backends, path, rule["backend"], lambda _, i=i: f"include[{i}]", default=[])
            added = [r.on_backend(b) for r in added if not r.is_fp for b in named]
        else:
            added = [d for r in added for d in deployments(r)]
        added = [
            c
            for r in added
            for c in _compiled(r, compile_modes)
            if c.matches({"compile": rule.get("compile", ("*",))})
        ]
        runs.extend(added)
    runs = [r for r in map(_without_simulation_metrics, runs) if r.metrics]
    runs = _with_fp_references(runs, compile_modes)
    for i, rule in fp_rules.items():
        if not any(r.is_fp and r.matches(rule) for r in runs):
            unmatched(i, rule)
    runs = [r for r in runs if not (r.is_fp and any(r.matches(rule) for rule in fp_rules.values()))]
    seen: dict[str, list[str]] = {}  # a problem shared by many runs is reported once
    for run in runs:
        try:
            _check_combination(path, run)
        except MatrixError as exc:
            problem = str(exc).removeprefix(f"{path}: ").removeprefix(f"{run.label}: ")
            seen.setdefault(problem, []).append(run.label)
    for problem, labels in seen.items():
        more = f" (and {len(labels) - 1} more run(s))" if len(labels) > 1 else ""
        problems.add(f"{path}: {labels[0]}{more}: {problem}")
    if not runs:
        problems.add(f"{path}: the matrix expands to no runs (check 'bits' and 'exclude')")
    return MatrixSpec(name, str(path), tuple(runs), str(data.get("description") or ""),
                      (_budget_note(preset, settings, runs),), executor)  # fmt: skip


def _budget_note(preset: str | None, settings: dict[str, Any], runs: list[RunSpec]) -> str:
    """Which quantization budget the matrix's runs get, in words (never silently the paper's)."""
    quantized = [r for r in runs if not r.is_fp]
    if not quantized:
        return "budget: none needed (FP runs only)"
    b = quantized[0].budget
    what = (
        f"{b.calib_timesteps} timesteps × {b.calib_samples} calibration trajectories, "
        f"{b.weight_iters:,} AdaRound + {b.act_iters:,} LSQ iterations per block (methods that reconstruct)"
    )
    own = sorted(set(settings) & set(BUDGET_KEYS) - {"backend"})
    if preset is not None:
        return f"budget: preset {preset}{' with ' + ', '.join(own) + ' set' if own else ''}: {what}"
    if own:
        return f"budget: the paper's defaults with {', '.join(own)} set: {what}"
    return (
        f"budget: the paper's (no preset and no budget settings): {what}; about 200x the iterations of "
        "'preset: quick', the CPU budget of configs/default.yaml. Say so with 'preset: paper', or "
        "use 'preset: quick'"
    )


def _included(path, i, rule, model_entries, method_overrides, seeds, calib_seeds, make) -> list[RunSpec]:
    models = rule.get("model", tuple(model_entries))
    methods = rule.get("method", tuple(method_overrides))
    if "bits" not in rule and methods != (FP_METHOD,):
        raise MatrixError(f"{path}: include[{i}]: name the bit widths to add, e.g. bits: W2A8")
    for model in models:
        if model not in model_entries:
            raise MatrixError(f"{path}: include[{i}]: model {model!r} is not in 'models'")
    for method in methods:
        try:
            METHODS.get(method)
        except UnknownNameError as exc:
            raise MatrixError(f"{path}: include[{i}]: {exc}") from None
    bits = _bits(path, list(rule.get("bits", ())))
    seeds_ = [int(s) for s in rule.get("seed", seeds)]
    calib_ = [int(s) for s in rule.get("calib_seed", calib_seeds)]
    return _cells(models, methods, seeds_, bits, calib_, make)


def _cells(models, methods, seeds, bits, calib_seeds, make) -> list[RunSpec]:
    """Every model × method × seed, and for a quantized method × bit width × calibration seed."""
    out = []
    for model, method, seed in itertools.product(models, methods, seeds):
        if method == FP_METHOD:
            out.append(make(model, method, None, seed))
            continue
        for b, c in itertools.product(bits, calib_seeds):
            out.append(make(model, method, b, seed, c))
    return out


def _compile_modes(path: Path, modes: Any, settings: dict[str, Any]) -> list[str]:
    if modes is None:
        return []
    # YAML 1.1 reads a bare ``off`` as false.
    modes = ["off" if m is False else m for m in _as_list(path, "compile", modes)]
    if "compile" in settings:
        raise MatrixError(
            f"{path}: 'compile' is both an axis and a setting; keep one (the axis: compile: [off, inductor])"
        )
    bad = [m for m in modes if m not in COMPILE_BACKENDS]
    if bad or len(set(modes)) != len(modes):
        raise MatrixError(
            f"{path}: compile: {bad or modes} — list each of {', '.join(COMPILE_BACKENDS)} at most once"
        )
    return modes


def _compiled(run: RunSpec, modes: list[str]) -> list[RunSpec]:
    """The run under each mode of the ``compile`` axis: under the first with all its metrics,
    under the others with only the metrics that read ``compile`` (the rest would repeat)."""
    out = []
    reads = tuple(m for m in run.metrics if "compile" in METRICS.get(m).settings)
    for i, mode in enumerate(modes or [run.evaluation.compile]):
        metrics = run.metrics if i == 0 else reads
        if metrics:
            evaluation = dataclasses.replace(run.evaluation, compile=mode)
            out.append(dataclasses.replace(run, evaluation=evaluation, metrics=metrics))
    return out


def _without_simulation_metrics(run: RunSpec) -> RunSpec:
    """The run without the metrics that compare a deployment with its simulation when it has
    none to compare (a method that deploys itself, or the ``fake`` backend, which deploys
    nothing); otherwise every such run ends in a skipped row that resuming would retry."""
    if run.is_fp or not (METHODS.get(run.method).backend or run.budget.backend == "fake"):
        return run
    metrics = tuple(m for m in run.metrics if not METRICS.get(m).needs_simulation)
    return dataclasses.replace(run, metrics=metrics)


def _with_fp_references(runs: list[RunSpec], compile_modes: list[str]) -> list[RunSpec]:
    """Unique runs: the FP references first, then the quantized runs grouped by method.

    Under a ``compile`` axis every FP reference is timed in every mode, even where the matrix
    excludes the quantized runs of a mode (compiled FP is the baseline quantized models are
    read against). An FP reference with no applicable metric is left out: the quantized runs
    still compute (and cache) its samples for their paired metrics.
    """
    ordered: dict[str, RunSpec] = {}
    for run in runs:
        if not run.is_fp:
            fps = [run.fp_reference()]
            if compile_modes and run.evaluation.compile == compile_modes[0]:
                fps = _compiled(fps[0], compile_modes)
            for fp in fps:
                if fp.metrics:
                    ordered.setdefault(fp.hash, fp)
        if run.metrics:
            ordered.setdefault(run.hash, run)
    fps = [r for r in ordered.values() if r.is_fp]
    quant = [r for r in ordered.values() if not r.is_fp]
    methods = list(dict.fromkeys(r.method for r in quant))
    quant.sort(key=lambda r: methods.index(r.method))
    return fps + quant


def _check_combination(path: Path, run: RunSpec) -> None:
    method = METHODS.get(run.method)
    reason = None if run.is_fp else method.unsupported(Bits(run.w_bits, run.a_bits))
    if reason:
        raise MatrixError(
            f"{path}: {run.label}: {reason}, or exclude {{method: {run.method}, bits: {run.bits_label}}}"
        )
    reason = None if run.is_fp else method.unsupported_on(MODELS.get(run.model).traits())
    if reason:
        raise MatrixError(
            f"{path}: {run.label}: {reason}; exclude {{method: {run.method}, model: {run.model}}}"
        )
    if not run.is_fp and method.backend is None:  # a method with its own backend deploys itself
        # The device the run asks for ("auto": this machine's); a CUDA run planned on a CPU
        # machine is checked against CUDA and skipped when it runs.
        device = run.sampling.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        problem = get_backend(run.budget.backend).problem(run.w_bits, run.a_bits, device)
        if problem:
            raise MatrixError(
                f"{path}: {run.label}: {problem}; choose another backend ({', '.join(BACKENDS)}), "
                f"or exclude {{method: {run.method}, bits: {run.bits_label}, backend: {run.budget.backend}}}"
            )
    adapter_cls = MODELS.get(run.model)
    problem = _scale_problem(run, adapter_cls)
    if problem:
        raise MatrixError(f"{path}: {run.label}: {problem}")
    for metric_name in run.metrics:
        metric = METRICS.get(metric_name)
        missing = sorted(metric.requires - adapter_cls.CAPABILITIES)
        if missing:
            has = ", ".join(sorted(adapter_cls.CAPABILITIES)) or "none"
            raise MatrixError(
                f"{path}: metric {metric_name} needs a model with {', '.join(missing)}; {run.model} has "
                f"{has} (its metrics: {', '.join(adapter_cls.DEFAULT_METRICS)})"
            )
        problem = metric.check(run.evaluation)
        if problem:
            raise MatrixError(f"{path}: {run.label}: metric {metric_name}: {problem}")


def _scale_problem(run: RunSpec, adapter_cls) -> str | None:
    """Settings that are valid numbers but cannot work for this model or machine: found now,
    not after an hour."""
    s = run.sampling
    if s.steps > adapter_cls.TRAIN_TIMESTEPS:
        trained = adapter_cls.TRAIN_TIMESTEPS
        return f"steps={s.steps} exceeds the {trained} timesteps {run.model} was trained with"
    if adapter_cls.FLOW_MATCHING and s.eta > 0:
        return f"eta={s.eta}: {run.model} samples by flow matching (Euler, deterministic); set eta: 0"
    pixels = math.prod(adapter_cls.IMAGE_SHAPE)
    need = s.samples * pixels * 2 + min(s.batch_size, s.samples) * pixels * 4 * ACTIVATION_FACTOR
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        return (
            f"samples={s.samples} and batch_size={s.batch_size} need at least {need / 2**30:,.0f} GiB of "
            f"memory for {adapter_cls.IMAGE_SHAPE} images; this machine has {have / 2**30:,.0f} GiB"
        )
    return None


# A lower bound on a denoiser's working memory per float32 value of its input batch (UNets hold
# tens of feature maps per input value); only absurd batch sizes trip it.
ACTIVATION_FACTOR = 16
