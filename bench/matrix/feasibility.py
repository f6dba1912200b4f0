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


def check_combination(path: Path, run: RunSpec) -> None:
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
    problem = scale_problem(run, adapter_cls)
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
