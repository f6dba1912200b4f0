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

import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import qdiff
from bench.errors import AvailabilityError
from bench.metrics.quality import CostMetric, EvalContext, Measurement, Metric
from bench.models.base import in_dtype, model_dtype
from bench.registry import METHODS
from bench.spec import resolve_device
from qdiff.backends import for_compile, layer_report
from qdiff.backends.x86 import compile_setup
from qdiff.storage import exact_heap, release_free_heap, steady_heap

MIB = 2**20
LATENCY_SETTINGS = ("latency_warmup", "latency_repeats", "compile")


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, under the
    C heap's fixed thresholds (:func:`qdiff.storage.steady_heap`)."""
    steady_heap()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


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
    }


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


def ready(model: nn.Module, adapter, spec) -> nn.Module:
    """``model``, compiled for the run's inputs if it compiles for them (an OpenVINO model
    converts from an example): done before anything is timed or measured, so no figure
    includes a conversion."""
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


def _rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakWindow:
    """Memory over a ``with`` block. After it:

    * ``working_mib``: how much the block added at its peak over what was resident when it
      started: allocated CUDA memory on a GPU (``max_memory_allocated`` − allocated before);
      on Linux CPUs the process's peak RSS (its mark reset, the C heap's free pages handed
      back first) minus its RSS before; None where the peak cannot be reset.
    * ``peak_mib``: the device's or process's whole peak (everything resident included).
    * ``memory``: how it was measured.

    With ``exact`` (deployed memory), a CPU window runs inside :func:`qdiff.storage.exact_heap`:
    glibc maps every large allocation on its own, so the resident peak is what the block
    allocated, not what the heap's fragmentation left behind. Without it the figure is an upper
    bound that moves between calls by tens of MiB; with it, the code inside runs slower and is
    never timed.

    With ``allocator`` (deployed memory of a model that allocates through torch), a CPU
    window's ``working_mib`` is instead the peak of what torch's CPU allocator handed out over
    the block, traced by the profiler's memory events: the CPU twin of CUDA's
    ``max_memory_allocated``. Even the exact RSS window moved by ±15 MiB between calls of the
    same embedded-UNet step (resident library pages, oneDNN's scratch, heap arenas), as much as
    an int8 deployment saves there; the allocator's peak repeats to the byte and counts every
    tensor the step holds, inductor's buffers and oneDNN's scratch included. The RSS reading
    of the same block stays in the row (``rss_working_mib``). A model running in another
    runtime's memory (OpenVINO) is measured by RSS only.
    """

    def __init__(self, device: torch.device, exact: bool = False, allocator: bool = False) -> None:
        self.device, self.exact = device, exact
        self.allocator = allocator and device.type == "cpu"
        self._heap = self._trace = None

    def __enter__(self) -> PeakWindow:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        elif sys.platform == "linux" and release_free_heap() and _rss_peak_reset():
            exact = False
            if self.exact:
                self._heap = exact_heap()
                exact = self._heap.__enter__()
                release_free_heap()
                _rss_peak_reset()
            self.before = _rss_kib("VmRSS") * 1024
            self.source = "peak RSS of the process (VmHWM, reset and free heap released before" + (
                ", every allocation from 64 KiB mapped on its own)" if exact else ")"
            )
            if self.allocator:
                self._trace = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
                )
                with _quiet_stderr():
                    self._trace.__enter__()
        else:  # cannot reset: the process's lifetime peak, an upper bound
            self.before = None
            self.source = "peak RSS of the process since it started (ru_maxrss)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.before is not None:
            if self._trace is not None:
                with _quiet_stderr():
                    self._trace.__exit__(None, None, None)
            peak = _rss_kib("VmHWM") * 1024
            if self._heap is not None:
                self._heap.__exit__(None, None, None)
        else:
            usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = usage * (1 if sys.platform == "darwin" else 1024)
        self.peak_mib = peak / MIB
        self.working_mib = None if self.before is None else max(peak - self.before, 0) / MIB
        before = None if self.before is None else self.before / MIB
        self.memory = {"memory_source": self.source, "before_mib": before, "process_peak_mib": self.peak_mib}
        if self._trace is not None:
            self.memory["rss_working_mib"] = self.working_mib
            self.working_mib = _allocated_peak(self._trace) / MIB
            self.source = self.memory["memory_source"] = (
                "torch's CPU allocator: peak of what the block allocated (profiler memory events)"
            )


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) closed for the block: the profiler's C++ side
    (kineto) prints start/stop and no-GPU lines there at every trace, which no setting mutes."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocated_peak(trace: torch.profiler.profile) -> int:
    """Bytes: the highest point the CPU allocations traced by ``trace`` reached over what was
    allocated when it started (frees of older tensors count, so this is the rise, not a sum)."""
    events = [
        e for e in trace.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]  # fmt: skip
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def deployed_memory(model: nn.Module, window: PeakWindow) -> tuple[float, dict]:
    """What running ``model`` costs (MiB): its tensors as resident
    (:func:`qdiff.resident_bytes`) plus the working memory the window measured around its use,
    with nothing else resident counted (the FP model, calibration data, quantizers' float
    copies in other models, the interpreter and libraries). The row's extras give both parts.

    Raises:
        AvailabilityError: the platform cannot reset its peak (not Linux, or no glibc).
    """
    if window.working_mib is None:
        raise AvailabilityError(
            "deployed memory needs a resettable peak (a CUDA device, or Linux with glibc); "
            f"here only the process's lifetime peak is known ({window.peak_mib:.0f} MiB)"
        )
    weights = qdiff.resident_bytes(model) / MIB
    parts = {"weights_resident_mib": weights, "working_mib": window.working_mib, **window.memory}
    return weights + window.working_mib, parts


def _sampling_cost(ctx: EvalContext) -> dict:
    """Sample one batch: ``warmup + repeats`` timed samplings when ``latency_e2e`` is asked
    for, then one untimed sampling whose peak memory is measured (an exact window, see
    :class:`PeakWindow`); once per run, shared by both metrics."""
    if "sampling_cost" in ctx.memo:
        return ctx.memo["sampling_cost"]
    device = resolve_device(ctx.spec.sampling.device)
    ev = ctx.spec.evaluation
    timed = "latency_e2e" in ctx.spec.metrics
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


LATENCY_STEP = LatencyStep()
LATENCY_E2E = LatencyE2E()
DEPLOY_SQNR = DeploySQNR()
PEAK_MEMORY = PeakMemory()
WEIGHT_BYTES = WeightBytes()
