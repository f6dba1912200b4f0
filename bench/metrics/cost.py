"""Cost metrics: denoiser-step and end-to-end latency, deployed peak memory, weight bytes.

Timings exclude warm-up (``latency_warmup`` untimed calls: allocator growth, cuDNN autotuning,
``torch.compile``) and report the median of ``latency_repeats`` timed calls with the
interquartile range. On a GPU, CUDA events time the device work; on a CPU, ``perf_counter``
times the call. All timings run at the run's batch size on the run's device with the deployable
denoiser (the ``backend`` the run evaluates: ``fake`` simulates quantization in floating point,
so its latency shows the simulation's overhead, not a quantized kernel's speed; ``x86`` and the
GPU backends run integer / low-precision kernels). Every cost row counts which kernel each
quantized layer ran (``backend_layers``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import torch
from torch import nn

import qdiff
from bench.cache import cache_dir
from bench.errors import AvailabilityError
from bench.fsio import write_atomic
from bench.metrics.memory import PeakWindow, deployed_memory
from bench.metrics.quality import CostMetric, EvalContext, Measurement, Metric, Work
from bench.models.base import in_dtype, model_dtype
from bench.registry import METHODS, METRICS
from bench.spec import resolve_device
from qdiff.backends import KernelChoices, choose_kernels, for_compile, has_choices, layer_report
from qdiff.backends.choice import time_calls
from qdiff.backends.x86 import compile_setup

MIB = 2**20
CHOICES_FILE = "kernel-choices.json"
# Per candidate kernel of a layer shape: untimed and timed calls (the median decides).
CHOICE_WARMUP, CHOICE_REPEATS = 3, 10
log = logging.getLogger("qdiff-bench")
LATENCY_SETTINGS = ("latency_warmup", "latency_repeats", "compile")


def summarize(times: list[float], scale: float) -> tuple[float, dict[str, float]]:
    """Median and interquartile range of ``times`` × ``scale`` (e.g. 1000 for ms)."""
    values = sorted(t * scale for t in times)
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    median = statistics.median(values)
    return median, {"iqr": q3 - q1, "p25": q1, "p75": q3, "min": values[0], "max": values[-1]}


def deploy_backend(spec) -> str:
    """What runs the run's denoiser: ``fp``, the budget's qdiff backend, or a method's own
    deployment (torchao's presets run torchao's kernels whatever the budget says)."""
    if spec.is_fp:
        return "fp"
    return METHODS.get(spec.method).backend or spec.budget.backend


def _backend_layers(ctx: EvalContext) -> dict[str, int]:
    """Which kernel each quantized layer of the run's denoiser runs (once per run)."""
    if "backend_layers" not in ctx.memo:
        denoiser = ctx.denoiser
        choose(denoiser, ctx.adapter, ctx.spec)  # a layer's kernel is the one it was given
        ctx.memo["backend_layers"] = (
            layer_report(denoiser) if ctx.spec.is_fp else METHODS.get(ctx.spec.method).kernels(denoiser)
        )
    return ctx.memo["backend_layers"]


def _protocol(ctx: EvalContext, device: torch.device, warmup: int, repeats: int) -> dict:
    ev = ctx.spec.evaluation
    return {
        "timer": "cuda-events" if device.type == "cuda" else "perf_counter",
        "warmup": warmup,
        "repeats": repeats,
        "batch_size": ctx.spec.sampling.batch_size,
        "backend": deploy_backend(ctx.spec),
        "compile": ev.compile,
        "freezing": ev.compile == "inductor",
        "threads": torch.get_num_threads(),
        # Which kernel each quantized layer runs: a backend's fallbacks are counted, never silent.
        "backend_layers": _backend_layers(ctx),
        **_mac_shares(ctx),
    }


def _mac_shares(ctx: EvalContext) -> dict:
    """For a deployment that chose its kernels: one call's MACs by kernel and the quantized share."""
    choices = None if ctx.spec.is_fp else getattr(ctx.denoiser, "kernel_choices", None)
    if choices is None:
        return {}
    # Each layer shape's candidates and their times (null where the choice came from the cache):
    # the per-layer figures that say why a deployment is as fast as it is.
    return {"kernel_macs": choices.macs, "quantized_mac_share": round(choices.quantized_share(), 4),
            "kernel_shapes": choices.shapes}  # fmt: skip


# A compiled denoiser must compute what the eager one does: a latency of a different model is
# not the run's. (A graph break inside the quantizers once made inductor's frozen graph of a
# tiny UNet 15 dB off its eager model, with every layer compiled alone exact.) A float model
# compiles to the same arithmetic reassociated: ≥ 30 dB. A quantized one is not bit-exact even
# when right: fused into the op that produces it, an input's quantization can round to the
# neighbouring integer, and on a random-weight 35.7M UNet such flips put compiled and eager
# int8 29.2 dB apart, while each was 29.1 dB from the simulated model. So a quantized model
# with a simulation must be as close to it as the eager deployment, within DEPLOY_SLACK_DB.
COMPILED_MIN_SQNR_DB = 30.0
DEPLOY_SLACK_DB = 1.0


def sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (reference.float() - other.float()).square().mean()
    return math.inf if noise == 0 else float(10 * torch.log10(reference.float().square().mean() / noise))


def compiled_problem(
    eager: torch.Tensor, compiled: torch.Tensor, simulated: torch.Tensor | None = None
) -> str | None:
    """Why ``compiled``'s output cannot stand for ``eager``'s, or None: below
    :data:`COMPILED_MIN_SQNR_DB` from it, unless the model's ``simulated`` output is given and
    ``compiled`` is as close to that as ``eager`` is (within :data:`DEPLOY_SLACK_DB`)."""
    apart = sqnr(eager, compiled)
    if apart >= COMPILED_MIN_SQNR_DB:
        return None
    if simulated is not None:
        eager_gap, compiled_gap = sqnr(simulated, eager), sqnr(simulated, compiled)
        if compiled_gap >= eager_gap - DEPLOY_SLACK_DB:
            return None
        because = (
            f"; it is {compiled_gap:.1f} dB from the simulated model, the eager deployment {eager_gap:.1f} dB"
        )
    else:
        because = ""
    return (
        f"the torch.compile'd denoiser's output is {apart:.1f} dB from the eager model's (at least "
        f"{COMPILED_MIN_SQNR_DB:.0f} dB needed){because}: its timing would be of another computation; "
        "time it eager (compile: off)"
    )


def compile_static(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model)`` as if it were the process's first compile, for static shapes.

    A worker compiles many runs' denoisers, often with the same ``forward`` (every diffusers
    UNet2DModel). Without the reset, dynamo's cache carries over from the previous run: the
    second shape makes it recompile with dynamic (symbolic) shapes, and after 8 recompiles it
    silently runs the model eagerly. Dynamic shapes also break inductor's int8 conv lowering (a
    stride assertion in the embedded UNet's x86 rows, after the CIFAR UNet compiled in the same
    worker), and a run's compiled model must not depend on what ran before it.
    """
    torch._dynamo.reset()
    # Kernel layers that prepacked their weights in eager calls (x86) give back the plain
    # ones the compiled graph is traced from.
    return torch.compile(for_compile(model), backend=backend, dynamic=False)


def _load_choices(path: Path) -> dict[str, str]:
    """The kernel choices measured before on this machine (``{key: kernel}``); a file that is
    not such a mapping counts as empty (it is rewritten with what this run measures)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("kernel choices %s unreadable (%s): measuring again", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def choose(model: nn.Module, adapter, spec) -> KernelChoices | None:
    """Each layer of a GPU deployment set to its fastest kernel for the run's inputs
    (:func:`qdiff.backends.choose_kernels`), once per model; the choices are cached in
    ``<cache>/kernel-choices.json`` (keyed by device, torch and Triton versions and layer shape:
    a later run on the same GPU times nothing). None for a model without such layers."""
    if not has_choices(model):
        return None
    if getattr(model, "kernel_choices", None) is None:
        x, t, kwargs = adapter.step_inputs(spec.sampling.batch_size, spec.seed)
        x, kwargs = in_dtype(model_dtype(model), x, kwargs)
        path = cache_dir() / CHOICES_FILE
        cache = _load_choices(path)
        model.kernel_choices = choose_kernels(
            model, x, t, cache=cache, warmup=CHOICE_WARMUP, repeats=CHOICE_REPEATS, **kwargs
        )
        if model.kernel_choices.measured:
            try:  # merged with what another process wrote meanwhile; losing a race re-measures
                write_atomic(path, json.dumps({**_load_choices(path), **cache}, indent=0, sort_keys=True))
            except OSError as exc:
                log.warning("kernel choices not saved to %s (%s)", path, exc)
    return model.kernel_choices


def ready(model: nn.Module, adapter, spec) -> nn.Module:
    """``model``, compiled for the run's inputs if it compiles for them (an OpenVINO model
    converts from an example) and with its kernels chosen where it chooses (:func:`choose`):
    done before anything is timed or measured, so no figure includes a conversion."""
    choose(model, adapter, spec)
    compile_for = getattr(model, "compile_for", None)
    if compile_for is not None:
        x, t, kwargs = adapter.step_inputs(spec.sampling.batch_size, spec.seed)
        x, kwargs = in_dtype(model_dtype(model), x, kwargs)
        compile_for(x, t, **kwargs)
    return model


def _openvino(model: nn.Module) -> nn.Module:
    """``compile: openvino``: the deployable on OpenVINO's CPU runtime (FP32 for the FP model)."""
    from qdiff.backends.openvino import OpenVINOModule

    if isinstance(model, OpenVINOModule):  # deployed there already (backend openvino, NNCF)
        return model
    if any(getattr(type(m), "kernel", None) for m in model.modules()):
        raise ValueError(
            "compile: openvino converts float or FakeQuantize models; this deployable runs another "
            "backend's kernels: deploy it with backend openvino, or exclude {compile: openvino} for it"
        )
    return OpenVINOModule(model)


def _denoiser(ctx: EvalContext) -> nn.Module:
    """The run's deployable denoiser, compiled when the settings ask (once per run), after
    checking on one step that the compiled model computes what the eager one does."""
    if "compiled" not in ctx.memo:
        model = ready(ctx.denoiser, ctx.adapter, ctx.spec)
        mode = ctx.spec.evaluation.compile
        if mode == "inductor":
            # Every model, FP included, compiles alike: with freezing (constant weights,
            # prepacked) and the int8 lowering passes the x86 backend needs.
            compile_setup()
        if mode != "off":
            x, t, kwargs = ctx.adapter.step_inputs(ctx.spec.sampling.batch_size, ctx.spec.seed)
            x, kwargs = in_dtype(model_dtype(model), x, kwargs)
            with torch.no_grad():
                eager = model(x, t, **kwargs).sample
            compiled = _openvino(model) if mode == "openvino" else compile_static(model, mode)
            ready(compiled, ctx.adapter, ctx.spec)
            with torch.no_grad():
                out = compiled(x, t, **kwargs).sample
                simulated = None
                if ctx.make_simulated is not None and sqnr(eager, out) < COMPILED_MIN_SQNR_DB:
                    x32, kwargs32 = in_dtype(torch.float32, x, kwargs)
                    simulated = ctx.make_simulated()(x32, t, **kwargs32).sample
                problem = compiled_problem(eager, out, simulated)
            if problem:
                raise ValueError(problem)
            model = compiled
        ctx.memo["compiled"] = model
    return ctx.memo["compiled"]


def _in_torch(model: nn.Module) -> bool:
    """Whether ``model`` computes in torch's memory (not in another runtime's, e.g. OpenVINO)."""
    return not getattr(model, "allocates_outside_torch", False)


class LatencyStep(CostMetric):
    """Milliseconds of one denoiser call at the run's batch size (the doubled batch of
    classifier-free guidance included), at the first sampler step's inputs. The row also
    carries the deployed memory of one step (``step_peak_mib``: the denoiser's resident
    tensors plus the timed calls' working memory, see :func:`deployed_memory`)."""

    name = "latency_step"
    unit = "ms"
    settings = LATENCY_SETTINGS
    needs_images = False
    real_kernels_only = True

    def work(self, spec) -> Work:
        ev = spec.evaluation
        return Work((ev.latency_warmup + ev.latency_repeats) * spec.sampling.batch_size)

    def __call__(self, ctx: EvalContext) -> Measurement:
        device = resolve_device(ctx.spec.sampling.device)
        ev = ctx.spec.evaluation
        x, t, kwargs = ctx.adapter.step_inputs(ctx.spec.sampling.batch_size, ctx.spec.seed)
        model = _denoiser(ctx)
        x, kwargs = in_dtype(model_dtype(ctx.denoiser), x, kwargs)

        @torch.no_grad()
        def step():
            return model(x, t, **kwargs)

        warmup, repeats = ev.latency_warmup, ev.latency_repeats
        times = time_calls(step, warmup, repeats, device)
        # The step's memory from one more, untimed call: the denoiser's own peak, without the
        # sampler's state, with the heap following what is allocated (PeakWindow).
        with PeakWindow(device, exact=True, allocator=_in_torch(model)) as window:
            step()
        median, spread = summarize(times, 1000)
        protocol = _protocol(ctx, device, warmup, repeats)
        memory = {"step_peak_mib": None}
        if window.working_mib is not None:
            memory["step_peak_mib"], parts = deployed_memory(model, window)
            memory["step_working_mib"] = parts["working_mib"]
            memory["step_rss_working_mib"] = parts.get("rss_working_mib", parts["working_mib"])
        return Measurement(median, {**spread, **protocol, **memory, "memory_source": window.source})


def _sampling_cost(ctx: EvalContext) -> dict:
    """Sample one batch: ``warmup + repeats`` timed samplings when ``latency_e2e`` is asked
    for, then one untimed sampling whose peak memory is measured (an exact window, see
    :class:`PeakWindow`); once per run, shared by both metrics."""
    if "sampling_cost" in ctx.memo:
        return ctx.memo["sampling_cost"]
    device = resolve_device(ctx.spec.sampling.device)
    ev = ctx.spec.evaluation
    timed = LatencyE2E.name in ctx.spec.metrics
    model, n = _denoiser(ctx), ctx.spec.sampling.batch_size

    def sample():
        ctx.adapter.sample(model, n, ctx.spec.seed)

    times = time_calls(sample, ev.latency_warmup, ev.latency_repeats, device) if timed else []
    with PeakWindow(device, exact=True, allocator=_in_torch(model)) as window:
        sample()
    warmup, repeats = (ev.latency_warmup, ev.latency_repeats) if timed else (0, 0)
    out = {"times": times, "protocol": _protocol(ctx, device, warmup, repeats), "window": window}
    ctx.memo["sampling_cost"] = out
    return out


class LatencyE2E(CostMetric):
    """Seconds to sample one batch end to end: every sampler step, guidance and decoding."""

    name = "latency_e2e"
    unit = "s"
    settings = LATENCY_SETTINGS
    real_kernels_only = True

    def work(self, spec) -> Work:
        ev, s = spec.evaluation, spec.sampling
        return Work((ev.latency_warmup + ev.latency_repeats) * s.batch_size * s.steps)

    def __call__(self, ctx: EvalContext) -> Measurement:
        cost = _sampling_cost(ctx)
        median, spread = summarize(cost["times"], 1)
        batch = cost["protocol"]["batch_size"]
        return Measurement(median, {**spread, **cost["protocol"], "images_per_s": batch / median,
                                    "steps": ctx.spec.sampling.steps})  # fmt: skip


class PeakMemory(CostMetric):
    """Deployed peak memory (MiB) of sampling one batch: what running the deployed denoiser
    costs, its resident tensors (weights as deployed: packed integers and scales, or whatever
    the backend holds) plus the peak working memory of the sampling (activations, sampler
    state); see :func:`deployed_memory`. Nothing else resident counts: not the FP model or the
    calibration state the benchmark keeps beside it, not the interpreter and libraries (the
    row's ``process_peak_mib`` is the process's whole peak), and not the pipeline's other
    components (text encoder, VAE), which every method shares. Measured over a sampling of one
    batch of its own, untimed."""

    name = "peak_memory"
    unit = "MiB"
    settings = ("compile",)
    real_kernels_only = True

    def __call__(self, ctx: EvalContext) -> Measurement:
        cost = _sampling_cost(ctx)
        value, parts = deployed_memory(_denoiser(ctx), cost["window"])
        return Measurement(value, {**parts, **cost["protocol"]})


class WeightBytes(CostMetric):
    """Denoiser weights as a deployment stores them (MiB): quantized weights packed at their bit
    width plus their scales and zero points, everything else at its dtype (see
    :func:`qdiff.storage_bytes`)."""

    name = "weight_bytes"
    unit = "MiB"
    needs_images = False

    def __call__(self, ctx: EvalContext) -> Measurement:
        parts = qdiff.storage_bytes(ctx.denoiser)
        extra = {f"{k}_bytes": v for k, v in parts.items()}
        return Measurement(parts["total"] / MIB, {**extra, "backend_layers": _backend_layers(ctx)})


class DeploySQNR(Metric):
    """The deploy gap (dB): SQNR of the deployed denoiser's output against its own simulated
    (fake-quant) model's, on one call at the first sampler step's inputs and the run's batch
    size. Simulated quality is what PTQ papers report; this says how much of it the real
    kernels keep (MQBench's lesson: deployment rounds, saturates and accumulates differently).
    Matrices leave it out of runs of methods without a simulation (torchao, NNCF) and of the
    ``fake`` backend, and it is skipped where it is asked for there."""

    name = "deploy_sqnr"
    unit = "dB"
    higher_is_better = True
    quantized_only = True
    needs_simulation = True
    needs_images = False

    def __call__(self, ctx: EvalContext) -> Measurement:
        if ctx.make_simulated is None:
            raise AvailabilityError(
                f"{ctx.spec.method} has no simulated model to compare its deployment with"
            )
        if deploy_backend(ctx.spec) == "fake":
            raise AvailabilityError("backend fake is the simulation itself: nothing is deployed")
        deployed = ready(ctx.denoiser, ctx.adapter, ctx.spec)
        simulated = ctx.make_simulated()
        x, t, kwargs = ctx.adapter.step_inputs(ctx.spec.sampling.batch_size, ctx.spec.seed)
        with torch.no_grad():
            reference = simulated(x, t, **kwargs).sample.float()  # float32, as calibrated
            x, kwargs = in_dtype(model_dtype(ctx.denoiser), x, kwargs)
            out = deployed(x, t, **kwargs).sample.float()
        return Measurement(min(sqnr(reference, out), 200.0), {"backend": deploy_backend(ctx.spec),
                                               "backend_layers": _backend_layers(ctx)})  # fmt: skip


LATENCY_STEP = METRICS.add(LatencyStep())
LATENCY_E2E = METRICS.add(LatencyE2E())
DEPLOY_SQNR = METRICS.add(DeploySQNR())
PEAK_MEMORY = METRICS.add(PeakMemory())
WEIGHT_BYTES = METRICS.add(WeightBytes())
