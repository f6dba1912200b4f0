"""Expanding a read matrix into its runs: models × methods × bits × seeds × calibration seeds,
deployed on each backend and compile mode, ``exclude`` and ``include`` applied, and the FP
reference every quantized run is paired with."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from bench.errors import MatrixError, UnknownNameError
from bench.matrix.feasibility import check_combination
from bench.matrix.load import Problems, unknown_problem
from bench.matrix.settings import (
    Settings,
    as_list,
    backends_of,
    bits_of,
    entry_of,
    executor_of,
    metrics_of,
    one_bits,
    rules_of,
    seeds_of,
    settings_of,
)
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import (
    BUDGET_KEYS,
    COMPILE_BACKENDS,
    FP_METHOD,
    PRESETS,
    SETTING_KEYS,
    Bits,
    Budget,
    Evaluation,
    ExecutorSpec,
    MatrixSpec,
    RunSpec,
    Sampling,
    name_problem,
)


def build(data: dict[str, Any], path: Path, problems: Problems, runs_on: str | None = None) -> MatrixSpec:
    """The matrix of ``data``; ``runs_on``: the executor its runs go to, if not its setting's."""
    name = data.get("name") or path.stem
    if name_problem(name):
        problems.add(f"{path}: {name_problem(name)}")
        name = path.stem
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        problems.add(f"{path}: 'settings' must be a mapping of {', '.join(SETTING_KEYS)}")
        settings = {}
    settings = dict(settings)
    executor = problems.attempt(executor_of, path, settings.pop("executor", "local"), default=ExecutorSpec())
    preset = data.get("preset")
    if preset is not None and preset not in PRESETS:
        problems.add(f"{path}: {unknown_problem('preset', [preset], tuple(PRESETS))}")
        preset = None
    defaults = settings_of(
        path, f"preset {preset}", PRESETS.get(preset, {}), Settings(Sampling(), Budget(), Evaluation())
    )
    base = settings_of(path, "settings", settings, defaults, problems)
    attempt = problems.attempt

    def listed(key: str, default: Any = None) -> list | None:
        """``key``'s value as a list, or None with the problem recorded (and the others kept)."""
        return attempt(as_list, path, key, data.get(key, default))

    def entries(axis: str, registry) -> list[tuple[str, dict[str, Any]]]:
        items = listed(axis) or []
        return [e for i, m in enumerate(items) if (e := attempt(entry_of, path, axis, i, m, registry))]

    models, methods = entries("models", MODELS), entries("methods", METHODS)
    if (not data.get("models") or not data.get("methods")) and not problems.unknown_keys:
        problems.add(f"{path}: 'models' and 'methods' need at least one entry each (see `qdiff-bench ls`)")
    bits = [b for i, label in enumerate(listed("bits") or []) if (b := attempt(one_bits, path, i, label))]

    def seed_list(key: str) -> list[int]:
        values = listed(key, [0])
        return [0] if values is None else attempt(seeds_of, path, key, values, default=[0])

    seeds, calib_seeds = seed_list("seeds"), seed_list("calib_seeds")
    backends = attempt(backends_of, path, listed("backends") or [], lambda i: f"backends[{i}]", default=[])
    compile_modes = attempt(compile_modes_of, path, data.get("compile"), settings, default=[])
    metrics = attempt(metrics_of, path, "metrics", data.get("metrics"), default=())
    excludes = attempt(rules_of, path, "exclude", listed("exclude") or [], default=[])
    includes = attempt(rules_of, path, "include", listed("include") or [], default=[])

    model_entries = {}
    model_metrics = {}
    arg_problems: list[str] = []  # wrong paths and values: they do not stop the expansion
    for i, (model, extra) in enumerate(models):
        model_metrics[model] = attempt(
            metrics_of, path, f"models[{i}].metrics", extra.pop("metrics", None), default=()
        )
        overrides = {k: v for k, v in extra.items() if k in SETTING_KEYS}
        args = {k: v for k, v in extra.items() if k not in SETTING_KEYS}
        adapter_cls = MODELS.get(model)
        bad = sorted(set(args) - set(adapter_cls.ARGS))
        if bad:
            valid = (*adapter_cls.ARGS, "metrics", *SETTING_KEYS)
            problems.add(f"{path}: models[{i}] ({model}): {unknown_problem('key', bad, valid)}")
        args = {k: v for k, v in args.items() if k not in bad}
        arg_problems += [f"{path}: models[{i}] ({model}): {p}" for p in adapter_cls.arg_problems(args)]
        model_entries[model] = (
            tuple(sorted(args.items())), settings_of(path, f"models[{i}]", overrides, base, problems)
        )  # fmt: skip
    for axis, axis_entries in (("models", models), ("methods", methods)):
        names = [n for n, _ in axis_entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.add(f"{path}: '{axis}' lists {', '.join(twice)} more than once; list each name once")
    method_overrides = {m: extra for m, extra in methods}
    for method, extra in method_overrides.items():
        settings_of(path, f"methods ({method})", extra, base, problems)
    axes_unknown = bool(problems.found)
    for problem in arg_problems:
        problems.add(problem)
    if axes_unknown:  # expanding would only report knock-on problems
        return MatrixSpec(name, str(path), ())

    def make(model: str, method: str, b: Bits | None, seed: int, calib_seed: int = 0) -> RunSpec:
        args, settings = model_entries[model]
        chosen = settings_of(path, f"methods ({method})", method_overrides.get(method, {}), settings)
        sampling, evaluation = chosen.sampling, chosen.evaluation
        budget = dataclasses.replace(chosen.budget, calib_seed=calib_seed)
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

    runs = cells_of(model_entries, method_overrides, seeds, bits, calib_seeds, make)
    runs = [c for r in runs for d in deployments(r) for c in compiled(d, compile_modes)]

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
        added = attempt(included, path, i, rule, model_entries, method_overrides, seeds, calib_seeds, make,
                        default=[])  # fmt: skip
        if "backend" in rule:  # this rule's runs deploy on exactly the backends it names
            named = attempt(backends_of, path, rule["backend"], lambda _, i=i: f"include[{i}]", default=[])
            added = [r.on_backend(b) for r in added if not r.is_fp for b in named]
        else:
            added = [d for r in added for d in deployments(r)]
        added = [
            c
            for r in added
            for c in compiled(r, compile_modes)
            if c.matches({"compile": rule.get("compile", ("*",))})
        ]
        runs.extend(added)
    runs = [r for r in map(without_simulation_metrics, runs) if r.metrics]
    runs = with_fp_references(runs, compile_modes)
    for i, rule in fp_rules.items():
        if not any(r.is_fp and r.matches(rule) for r in runs):
            unmatched(i, rule)
    runs = [r for r in runs if not (r.is_fp and any(r.matches(rule) for rule in fp_rules.values()))]
    seen: dict[str, list[str]] = {}  # a problem shared by many runs is reported once
    for run in runs:
        try:
            check_combination(path, run, here=(runs_on or executor.name) != "ray")
        except MatrixError as exc:
            problem = str(exc).removeprefix(f"{path}: ").removeprefix(f"{run.label}: ")
            seen.setdefault(problem, []).append(run.label)
    for problem, labels in seen.items():
        more = f" (and {len(labels) - 1} more run(s))" if len(labels) > 1 else ""
        problems.add(f"{path}: {labels[0]}{more}: {problem}")
    if not runs:
        problems.add(f"{path}: the matrix expands to no runs (check 'bits' and 'exclude')")
    return MatrixSpec(name, str(path), tuple(runs), str(data.get("description") or ""),
                      (budget_note_of(preset, settings, runs),), executor)  # fmt: skip


def budget_note_of(preset: str | None, settings: dict[str, Any], runs: list[RunSpec]) -> str:
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


def included(path, i, rule, model_entries, method_overrides, seeds, calib_seeds, make) -> list[RunSpec]:
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
    bits = bits_of(path, list(rule.get("bits", ())))
    seeds_ = [int(s) for s in rule.get("seed", seeds)]
    calib_ = [int(s) for s in rule.get("calib_seed", calib_seeds)]
    return cells_of(models, methods, seeds_, bits, calib_, make)


def cells_of(models, methods, seeds, bits, calib_seeds, make) -> list[RunSpec]:
    """Every model × method × seed, and for a quantized method × bit width × calibration seed."""
    out = []
    for model, method, seed in itertools.product(models, methods, seeds):
        if method == FP_METHOD:
            out.append(make(model, method, None, seed))
            continue
        for b, c in itertools.product(bits, calib_seeds):
            out.append(make(model, method, b, seed, c))
    return out


def compile_modes_of(path: Path, modes: Any, settings: dict[str, Any]) -> list[str]:
    if modes is None:
        return []
    # YAML 1.1 reads a bare ``off`` as false.
    modes = ["off" if m is False else m for m in as_list(path, "compile", modes)]
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


def compiled(run: RunSpec, modes: list[str]) -> list[RunSpec]:
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


def without_simulation_metrics(run: RunSpec) -> RunSpec:
    """The run without the metrics that compare a deployment with its simulation when it has
    none to compare (a method that deploys itself, or the ``fake`` backend, which deploys
    nothing); otherwise every such run ends in a skipped row that resuming would retry."""
    if run.is_fp or not (METHODS.get(run.method).backend or run.budget.backend == "fake"):
        return run
    metrics = tuple(m for m in run.metrics if not METRICS.get(m).needs_simulation)
    return dataclasses.replace(run, metrics=metrics)


def with_fp_references(runs: list[RunSpec], compile_modes: list[str]) -> list[RunSpec]:
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
                fps = compiled(fps[0], compile_modes)
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
