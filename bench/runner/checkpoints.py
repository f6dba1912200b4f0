"""Quantized checkpoints as runs share them: built by a method (or refined from its bases'
checkpoints) on cached calibration data, and cached by content hash."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch

import qdiff
from bench.cache import cached_module, cached_tensors
from bench.metrics.memory import PeakWindow
from bench.progress import Tracker
from bench.provenance import config_hash
from bench.registry import METHODS
from bench.spec import Bits, RunSpec


@dataclasses.dataclass
class Checkpoint:
    """A quantized model as the runner caches and shares it.

    Args:
        model: the quantized denoiser (what ``Method.deploy`` deploys).
        key: its cache key (the method, its configuration, the FP weights and the code).
        qconfig: the method's configuration, as the rows' ``qconfig`` column.
        quantize_s: seconds the method took, its bases' included.
        quantize_peak_mib: peak memory of quantizing (MiB): the FP model once plus everything
            the method held at its peak (its copies, calibration inputs, reconstruction state);
            the largest of its bases' and its own for a refining method; None if unmeasured.
        report: what the method reported about its work (the rows' ``recon`` column), or None.
        weights_from: for a method with bases, the ``method bits`` it refined (``+``-joined).
    """

    model: torch.nn.Module
    key: str
    qconfig: dict[str, Any]
    quantize_s: float
    report: dict[str, Any] | None = None
    weights_from: str | None = None
    quantize_peak_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def quantized(
    adapter, fp, fp_id: str, spec: RunSpec, code: str, progress: Tracker
) -> tuple[Checkpoint, bool]:
    """The run's quantized checkpoint, from the cache or built: quantized by the method, or,
    for a method with ``bases``, refined from their checkpoints (built or cached)."""
    method = METHODS.get(spec.method)
    bits = Bits(spec.w_bits, spec.a_bits)
    config = method.configure(bits, spec.budget)
    # The calibration trajectories depend on how the model is sampled (steps, guidance, ...), so
    # the adapter's identity is part of the key, as it is of the calibration data's.
    key = config_hash("checkpoint", code, fp_id, adapter.identity(), spec.method, config.to_dict())

    def calibration(calib: qdiff.CalibConfig) -> qdiff.CalibData:
        return _calibration(adapter, fp, fp_id, calib, code, progress).to(adapter.device)

    def build() -> Checkpoint:
        if method.bases(bits):
            return _refined(adapter, fp, fp_id, spec, code, progress, method, config, calibration, key)
        calib = getattr(config, "calib", None)
        if isinstance(calib, qdiff.CalibConfig):
            calibration(calib)  # generated (FP sampling, shared by methods) outside the window
        units = progress.phase(f"quantize {spec.method} {spec.bits_label}", "units")
        t = time.perf_counter()
        with PeakWindow(adapter.device) as window:
            model, report = method.quantize(fp, config, calibration, progress=units)
        seconds = time.perf_counter() - t
        return Checkpoint(
            model, key, config.to_dict(), seconds, report, quantize_peak_mib=_quantize_peak(fp, window)
        )

    if not method.checkpointable:
        return build(), False
    stored, cached = cached_module("checkpoints", key, lambda: build().to_dict(), check=checkpoint_problem)
    # Its key is the one asked for (what the samples' key derives from), never the file's.
    return Checkpoint(**{**stored, "key": key}), cached


def checkpoint_problem(stored: dict) -> str | None:
    """What makes a loaded dict not a :class:`Checkpoint` (a valid torch file of another kind)."""
    fields = {f.name for f in dataclasses.fields(Checkpoint)}
    if set(stored) != fields or not isinstance(stored.get("model"), torch.nn.Module):
        return f"not a checkpoint: expected the fields {', '.join(sorted(fields))}"
    return None


def _refined(adapter, fp, fp_id, spec, code, progress, method, config, calibration, key) -> Checkpoint:
    """The model of a method with ``bases``: their checkpoints (cached or built), refined. Its
    quantize time is theirs plus the refinement's."""
    bases = method.bases(Bits(spec.w_bits, spec.a_bits))
    first, first_bits = bases[0]
    if METHODS.get(first).configure(first_bits, spec.budget) != config:
        raise ValueError(
            f"{spec.method} builds on {first} {first_bits.label} but their configurations differ"
        )
    models, seconds, sources, base_peaks = [], 0.0, [], []
    for name, bits in bases:
        base_spec = dataclasses.replace(spec, method=name, w_bits=bits.w, a_bits=bits.a)
        base, _ = quantized(adapter, fp, fp_id, base_spec, code, progress)
        models.append(copy.deepcopy(base.model))
        seconds += base.quantize_s
        base_peaks.append(base.quantize_peak_mib)
        sources.append(f"{name} {base.weights_from or bits.label}")
    t = time.perf_counter()
    with PeakWindow(adapter.device) as window:
        model = method.refine(fp, models, config, calibration, adapter.scheduler().alphas_cumprod)
    seconds += time.perf_counter() - t
    peaks = [p for p in (*base_peaks, _quantize_peak(fp, window)) if p is not None]
    return Checkpoint(model, key, config.to_dict(), seconds, weights_from=" + ".join(sources),
                      quantize_peak_mib=max(peaks) if peaks else None)  # fmt: skip


def _quantize_peak(fp: torch.nn.Module, window: PeakWindow) -> float | None:
    """The FP model once plus the window's working memory (MiB), or None where the platform
    cannot reset its peak."""
    if window.working_mib is None:
        return None
    return round(qdiff.resident_bytes(fp) / 2**20 + window.working_mib, 1)


def _calibration(
    adapter, fp, fp_id: str, calib: qdiff.CalibConfig, code: str, progress: Tracker
) -> qdiff.CalibData:
    key = config_hash("calib", code, fp_id, adapter.identity(), calib)

    def problem(t: dict[str, torch.Tensor]) -> str | None:
        # K steps × N trajectories of inputs (twice that under classifier-free guidance).
        size = len(qdiff.select_steps(calib, adapter.sampling.steps)) * calib.samples_per_timestep
        x, steps = t.get("x"), t.get("t")
        if x is None or steps is None or len(x) != len(steps) or len(x) not in (size, 2 * size):
            return f"expected {size} calibration inputs, found {None if x is None else len(x)}"
        return None if x.is_floating_point() else f"calibration inputs are {x.dtype}, not floating point"

    steps = progress.phase("calibration trajectories", "steps")
    build = lambda: adapter.calibration_data(fp, calib, steps).to_dict()  # noqa: E731
    tensors, _ = cached_tensors("calibration", key, build, check=problem)
    return qdiff.CalibData.from_dict(tensors)
