"""One run, start to finish: :func:`execute` is a pure function of its :class:`RunSpec`.

Everything runs share (FP samples, calibration data, quantized checkpoints) goes through the
on-disk cache by content hash, so every executor gives the same rows. Every quantized run
samples from exactly the same initial noise, prompts and DDIM schedule as its FP reference, so
differences in the metrics come from quantization alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any

import torch

from bench.cache import cached_tensors
from bench.errors import AvailabilityError
from bench.images import preview_name, save_grid
from bench.matrix.feasibility import machine_problem
from bench.metrics.cost import ready
from bench.metrics.quality import EvalContext
from bench.progress import Tracker
from bench.provenance import code_hash, config_hash, environment, model_hash
from bench.registry import METHODS, METRICS, MODELS
from bench.runner.checkpoints import quantized
from bench.spec import RunSpec, resolve_device


@dataclasses.dataclass(frozen=True)
class RunTask:
    """What every run of a matrix executes: :func:`execute` with the matrix's name, the folder
    for preview grids and the progress mode. A picklable value, so that executors can ship it
    to worker processes and cluster nodes (which may write ``previews`` elsewhere)."""

    matrix: str
    previews: Path | None = None
    progress: str | None = None

    def __call__(self, spec: RunSpec) -> list[dict[str, Any]]:
        return execute(spec, self.matrix, self.previews, self.progress)


def execute(
    spec: RunSpec, matrix: str, previews: Path | None = None, progress: str | None = None
) -> list[dict[str, Any]]:
    """One run: its rows, one per metric. Failures become ``error`` rows (``skipped`` when the
    run cannot happen on this machine) with the message; this function does not raise for them.
    ``progress`` is a :mod:`bench.progress` mode (``"bar"``, ``"lines"``) or None.
    """
    t0 = time.perf_counter()
    base = _base(spec, matrix, datetime.now(UTC))
    device = torch.device("cpu")
    try:
        device = resolve_device(spec.sampling.device)
        problem = machine_problem(spec, device)  # "auto", or a cluster node unlike the driver
        if problem:
            raise AvailabilityError(problem)
        rows = _evaluate(spec, base, previews, Tracker(progress, spec.label))
        duration = round(time.perf_counter() - t0, 3)
        return [{**environment(device), **row, "duration_s": duration} for row in rows]
    except Exception as exc:  # one failed run must not stop the matrix (CUDA OOM included)
        return failure_rows(spec, matrix, *_failure(exc), base, device, time.perf_counter() - t0)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _failure(exc: Exception) -> tuple[str, str]:
    """``(status, message)`` of an exception: ``skipped`` when this machine lacks what it needs,
    else ``error`` (whose traceback goes to the log)."""
    if isinstance(exc, AvailabilityError):
        return "skipped", str(exc)
    traceback.print_exc(limit=4)
    return "error", f"{type(exc).__name__}: {exc}"


def failure_rows(
    spec: RunSpec,
    matrix: str,
    status: str,
    message: str,
    base: dict[str, Any] | None = None,
    device: torch.device | None = None,
    seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """One ``error``/``skipped`` row per requested metric, so the failure shows in every cell."""
    base = base or _base(spec, matrix, datetime.now(UTC))
    base = {**base, **environment(device or torch.device("cpu")), "status": status, "error": message}
    return [_metric_row(base, METRICS.get(m), None, duration_s=round(seconds, 3)) for m in spec.metrics]


def _base(spec: RunSpec, matrix: str, started: datetime) -> dict[str, Any]:
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    reference = None if spec.is_fp else spec.fp_reference().hash
    return {"run_id": run_id, "matrix": matrix, **spec.fields(), "reference_hash": reference,
            "started_at": started.isoformat()}  # fmt: skip


def _metric_row(base: dict[str, Any], metric, value: float | None, **extra: Any) -> dict[str, Any]:
    row = {
        "status": "ok",
        "error": None,
        **base,
        "metric": metric.name,
        "value": value,
        "unit": metric.unit,
        "higher_is_better": metric.higher_is_better,
        "kind": metric.kind,
    }
    return {**row, **extra}


@lru_cache(maxsize=2)
def _load(model: str, model_args: tuple, sampling) -> tuple[Any, torch.nn.Module, str]:
    """Adapter, FP denoiser and the denoiser's content hash (memoised per process)."""
    adapter = MODELS.get(model)(sampling, **dict(model_args))
    fp = adapter.denoiser().eval().requires_grad_(False)
    # The hash reads every weight: a model mapped from the cache (random init) is resident
    # before any memory window opens, which then counts none of its pages as working memory.
    return adapter, fp, model_hash(fp)


def _evaluate(
    spec: RunSpec, base: dict[str, Any], previews: Path | None, progress: Tracker
) -> list[dict[str, Any]]:
    adapter, fp32, fp_id = _load(spec.model, spec.model_args, spec.sampling)
    base.update(adapter.row_fields())  # e.g. the prompt sets: on the rows of every metric
    fp = fp32
    code = code_hash()  # a code change never reuses a stale checkpoint or sample set
    n, seed = spec.sampling.samples, spec.seed
    # Cost-only runs (step latency, weight bytes) generate no images: a large random-weight
    # model's cost needs neither a sampler run nor a decoder.
    sampled = any(METRICS.get(m).needs_images for m in spec.metrics)
    fp_key = config_hash("fp-samples", code, fp_id, adapter.identity(), n, seed)

    def fp_samples():
        if not sampled:
            return None, None
        return _timed_samples(
            fp_key, n, lambda: adapter.sample(fp, n, seed, progress=progress.phase("FP sampling", "steps"))
        )

    dtype = getattr(torch, spec.sampling.dtype)
    if dtype != torch.float32 and (spec.is_fp or sampled):
        fp = copy.deepcopy(fp32).to(dtype)  # evaluated in ``dtype``; quantization calibrates float32
    if spec.is_fp:
        fp_images, fp_sample_s = fp_samples()
        ctx = EvalContext(spec, adapter, fp_images, None, make_denoiser=lambda: fp)
        extra = {"sample_s": fp_sample_s}
    else:
        fp_images = fp_samples()[0]
        ckpt, cached = quantized(adapter, fp32, fp_id, spec, code, progress)
        key = config_hash("samples", code, fp_id, ckpt.key, spec.budget.backend, adapter.identity(), n, seed)

        method = METHODS.get(spec.method)

        @cache
        def deployable() -> torch.nn.Module:
            deployed = method.deploy(ckpt.model.to(adapter.device), spec.budget.backend)
            # Cast only when asked: diffusers warns on every ``.to(dtype)`` of a UNet.
            return deployed if dtype == torch.float32 else deployed.to(dtype)

        def ready_model() -> torch.nn.Module:
            model = ready(deployable(), adapter, spec)
            if not method.kernels(model):
                raise ValueError(
                    f"{spec.method} returned a model with no quantized layer ({type(method).__name__}"
                    f".kernels found none): its {spec.bits_label} rows would describe the FP model"
                )
            return model

        images = sample_s = None
        if sampled:  # samples are cached only from a model that passed the check
            steps = progress.phase("sampling", "steps")
            sample = lambda: adapter.sample(deployable(), n, seed, progress=steps)  # noqa: E731
            images, sample_s = _timed_samples(key, n, sample, before=ready_model)
        else:
            ready_model()
        # The simulation the deployment is compared with (deploy_sqnr): qdiff's methods only. The
        # quantized model itself, not ``convert(..., "fake")``, whose precomputed fake-quantized
        # weights would be a third float copy of a real-size model (SDXL: 9.6 GiB).
        simulated = None if method.backend else (lambda: ckpt.model.to(adapter.device))
        ctx = EvalContext(spec, adapter, images, fp_images, deployable, ckpt.quantize_s, cached, simulated,
                          quantize_peak_mib=ckpt.quantize_peak_mib)  # fmt: skip
        extra = {"qconfig": ckpt.qconfig, "weights_from": ckpt.weights_from, "sample_s": sample_s,
                 "recon": ckpt.report}  # fmt: skip
    if previews is not None and ctx.images is not None:
        count = 64 if ctx.images.shape[-1] < 64 else 8
        name = preview_name(
            spec.model, spec.method, spec.real_backend, spec.bits_label, seed, spec.calib_seed
        )
        try:
            save_grid(ctx.images[:count], previews / name)
        except OSError as exc:  # a picture for eyeballing: its loss must not cost the run's rows
            print(
                f"{spec.label}: preview {previews / name} not written ({exc.strerror or exc})",
                file=sys.stderr,
            )
    rows = []
    for name in spec.metrics:
        metric = METRICS.get(name)
        t = time.perf_counter()
        try:
            measured = metric(ctx)
        except Exception as exc:  # one metric's failure leaves the run's other metrics standing
            status, message = _failure(exc)
            rows.append(_metric_row({**base, "status": status, "error": message}, metric, None, **extra))
            continue
        if measured is not None:
            # Metrics sharing work (FID and KID) charge it to the first of them.
            timing = {"metric_s": round(time.perf_counter() - t, 3)}
            row = _metric_row(base, metric, measured.value, **{**extra, **timing, **measured.extra})
            problem = _not_finite(row)
            if problem:  # NaN outputs: this metric's row is an error, the others stand
                print(f"{spec.label}: {metric.name} {problem}", file=sys.stderr)
                row = _metric_row({**base, "status": "error", "error": f"{metric.name} {problem}"},
                                  metric, None, **extra)  # fmt: skip
            rows.append(row)
    if not rows:
        raise ValueError(f"none of the metrics {', '.join(spec.metrics)} applies to {spec.label}")
    return rows


def _not_finite(row: dict[str, Any]) -> str | None:
    """What makes a measured row unstorable as ``ok`` (a NaN or infinite value or extra, which
    JSON cannot hold and no ranking can use), or None. NaN samples from a broken quantized model
    make such values; the row becomes an error naming the metric rather than killing the matrix."""
    value = row["value"]
    try:
        finite = math.isfinite(value)
    except TypeError:
        return f"is not a number ({value!r})"
    if not finite:
        return f"is not a finite number ({value!r}): do the model's outputs hold NaN or Inf?"
    try:
        json.dumps(row, allow_nan=False, default=str)
    except ValueError:
        bad = [k for k, v in row.items() if _has_non_finite(v)]
        return f"carries non-finite values in {', '.join(bad) or 'a field'} (value {value!r})"
    return None


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def _timed_samples(
    key: str, n: int, sample: Callable[[], torch.Tensor], before: Callable[[], object] | None = None
) -> tuple[torch.Tensor, float | None]:
    """Samples from the cache or ``sample()``, and the seconds sampling took (None if cached).
    ``before()`` runs first when sampling is needed, outside the timing (building the model)."""
    seconds = None

    def build() -> dict[str, torch.Tensor]:
        nonlocal seconds
        if before is not None:
            before()
        t = time.perf_counter()
        images = sample()
        seconds = round(time.perf_counter() - t, 3)
        return {"images": images}

    tensors, _ = cached_tensors("samples", key, build, check=partial(_images_problem, n))
    return tensors["images"], seconds


def _images_problem(n: int, tensors: dict[str, torch.Tensor]) -> str | None:
    images = tensors.get("images")
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or len(images) != n:
        got = None if images is None else f"{images.dtype} {tuple(images.shape)}"
        return f"expected {n} uint8 NCHW images, found {got}"
    return None
