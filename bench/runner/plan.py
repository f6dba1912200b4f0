"""What a matrix still has to run, and in which order: a run after the runs whose cached work
(FP samples, base checkpoints) it reuses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from functools import cache

from bench.registry import METHODS, METRICS
from bench.spec import Bits, MatrixSpec, RunSpec
from bench.store import ResultStore

Needs = dict[str, tuple[str, ...]]  # run hash -> hashes of the runs that must finish before it starts


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    state: str  # "todo", "partial" (some metrics missing), "done", or "forced"


def plan(
    matrix: MatrixSpec,
    store: ResultStore,
    only: dict[str, tuple[str, ...]] | None = None,
    force: bool = False,
) -> list[PlannedRun]:
    """The matrix's runs (filtered by ``only``) and whether each still has work to do."""
    done = store.completed()
    out = []
    for spec in matrix.expand():
        if only and not spec.matches(only):
            continue
        have = done.get(spec.hash, set())
        if force:
            state = "forced"
        elif set(spec.metrics) <= have:  # expansion gives every run at least one metric
            state = "done"
        else:
            state = "partial" if have else "todo"
        out.append(PlannedRun(spec, state))
    return out


def dependencies(specs: Sequence[RunSpec]) -> Needs:
    """For each run, the runs among ``specs`` that must finish before it starts (an executor
    starts every other run as soon as it can): a quantized run waits for its FP reference, whose
    cached samples it pairs with, and a run of a method with ``bases`` for its bases' runs (same
    model and seeds), whose checkpoints it refines. The order only saves work: a run whose
    prerequisite failed builds what it needs itself."""
    hashes = {s.hash for s in specs}
    cells: dict[tuple, list[str]] = {}
    for s in specs:
        cells.setdefault((s.model, s.method, s.w_bits, s.a_bits, s.seed, s.calib_seed), []).append(s.hash)
    needs: Needs = {}
    for s in specs:
        if s.is_fp:
            needs[s.hash] = ()
            continue
        reference = s.fp_reference().hash
        after = [reference] if reference in hashes else []
        for base, b in METHODS.get(s.method).bases(Bits(s.w_bits, s.a_bits)):
            after += cells.get((s.model, base, b.w, b.a, s.seed, s.calib_seed), [])
        needs[s.hash] = tuple(dict.fromkeys(after))
    return needs


def waves(specs: Sequence[RunSpec], needs: Needs | None = None) -> list[list[RunSpec]]:
    """Runs in dependency order, as groups whose members need only runs of earlier groups:
    FP references first, then quantized runs, then runs that refine their checkpoints."""
    needs = dependencies(specs) if needs is None else needs

    @cache
    def depth(h: str) -> int:
        return 1 + max((depth(d) for d in needs.get(h, ())), default=-1)

    groups: dict[int, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(depth(spec.hash), []).append(spec)
    return [groups[level] for level in sorted(groups)]


def ordered(specs: Sequence[RunSpec], needs: Needs) -> list[RunSpec]:
    """``specs`` with every run after the runs it needs (otherwise in their given order)."""
    return [spec for wave in waves(specs, needs) for spec in wave]


@dataclasses.dataclass(frozen=True)
class Artefact:
    """Work a run makes or reuses through the cache. Runs with equal artefacts share one (the
    first to need it builds it): ``key`` holds what the runner's cache key for it is derived
    from (:mod:`bench.runner.execute`, :mod:`bench.runner.checkpoints`; the cache key adds the
    code and the FP weights' content hash, which are the same for every run of a model here).

    ``kind``: ``fp-samples`` (the FP images a run is paired with), ``calibration`` (the FP
    trajectories' inputs a method calibrates on), ``checkpoint`` (a quantized model; ``spec``
    is the run whose method makes it, a base's for a refining method), ``samples`` (the
    quantized run's own images).
    """

    kind: str
    key: tuple
    spec: RunSpec


def artefacts(spec: RunSpec) -> list[Artefact]:
    """What ``spec`` builds or reuses, in the order the runner needs them: :mod:`bench.estimate`
    charges each once per matrix, as the cache lets the runner build each once."""
    s = spec.sampling
    model = (spec.model, spec.model_args, s)
    images = any(METRICS.get(m).needs_images for m in spec.metrics)
    out = [Artefact("fp-samples", ("fp-samples", *model, spec.seed), spec)] if images else []
    if spec.is_fp:
        return out
    out += checkpoint_artefacts(spec)
    if images:
        out.append(Artefact("samples", ("samples", spec.hash), spec))
    return out


def checkpoint_artefacts(spec: RunSpec) -> list[Artefact]:
    """The checkpoint of ``spec``'s method and what it is made from: its bases' checkpoints (a
    refining method) or the calibration inputs its configuration asks for."""
    method, bits = METHODS.get(spec.method), Bits(spec.w_bits, spec.a_bits)
    config = method.configure(bits, spec.budget)
    model = (spec.model, spec.model_args, spec.sampling)
    out: list[Artefact] = []
    bases = method.bases(bits)
    for name, base_bits in bases:
        out += checkpoint_artefacts(
            dataclasses.replace(spec, method=name, w_bits=base_bits.w, a_bits=base_bits.a)
        )
    calib = getattr(config, "calib", None)
    if not bases and calib is not None:  # a refining method calibrates nothing of its own
        out.append(Artefact("calibration", ("calibration", *model, calib), spec))
    key = ("checkpoint", *model, spec.method, json.dumps(config.to_dict(), sort_keys=True, default=str))
    return [*out, Artefact("checkpoint", key, spec)]
