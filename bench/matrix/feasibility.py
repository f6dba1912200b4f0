"""Whether a run can work at all, checked when the matrix loads: the method on the model,
the backend on the bits and device, and whether its calibration fits the machine's memory."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from bench.errors import MatrixError
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import (
    Bits,
    RunSpec,
)
from qdiff.backends import BACKENDS, get_backend


def check_combination(path: Path, run: RunSpec, here: bool = True) -> None:
    """Refuse ``run`` if it cannot work. ``here``: its runs execute on this machine (the local
    executor), whose memory then bounds them; on a cluster each node checks its own
    (:func:`machine_problem`)."""
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
    problem = backend_problem(run, run.sampling.device)
    if problem:
        raise MatrixError(
            f"{path}: {run.label}: {problem}; choose another backend ({', '.join(BACKENDS)}), "
            f"or exclude {{method: {run.method}, bits: {run.bits_label}, backend: {run.budget.backend}}}"
        )
    adapter_cls = MODELS.get(run.model)
    problem = scale_problem(run, adapter_cls) or (memory_problem(run, adapter_cls) if here else None)
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


def scale_problem(run: RunSpec, adapter_cls) -> str | None:
    """Settings that are valid numbers but cannot work for this model: found now, not after an
    hour."""
    s = run.sampling
    if s.steps > adapter_cls.TRAIN_TIMESTEPS:
        trained = adapter_cls.TRAIN_TIMESTEPS
        return f"steps={s.steps} exceeds the {trained} timesteps {run.model} was trained with"
    if adapter_cls.FLOW_MATCHING and s.eta > 0:
        return f"eta={s.eta}: {run.model} samples by flow matching (Euler, deterministic); set eta: 0"
    return None


def backend_problem(run: RunSpec, device: str) -> str | None:
    """Why ``run``'s backend cannot deploy it on ``device``, or None (also for FP runs and
    methods with a backend of their own). ``auto`` resolves where the run executes, so there
    the backend must work on a CPU or on a GPU: :func:`machine_problem` checks the device the
    run then gets."""
    if run.is_fp or METHODS.get(run.method).backend is not None:
        return None
    backend = get_backend(run.budget.backend)
    if device != "auto":
        return backend.problem(run.w_bits, run.a_bits, device)
    on = {d: backend.problem(run.w_bits, run.a_bits, d) for d in ("cpu", "cuda")}
    return None if None in on.values() else on["cuda" if backend.device == "cuda" else "cpu"]


def machine_problem(run: RunSpec, device: torch.device) -> str | None:
    """Why ``run`` cannot work on the machine executing it, on ``device`` (its resolved
    ``device`` setting): its backend on that device, or the memory its samples need."""
    problem = backend_problem(run, device.type)
    if problem:
        return f"{problem} (device {run.sampling.device!r} is {device.type} on this machine)"
    return memory_problem(run, MODELS.get(run.model))


def memory_problem(run: RunSpec, adapter_cls) -> str | None:
    """Samples and a batch's activations that cannot fit in this machine's memory, or None."""
    s = run.sampling
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
