"""Kernel choice by measurement, per layer shape.

A quantized kernel is not faster than the float one at every shape: a small GEMM (a time
embedding at batch 2) is launch-bound, cuBLASLt's int8 GEMM needs more than 16 rows and
dimensions that are multiples of 8, and cuDNN's FP16 3×3 convolution can beat an int8 implicit
GEMM. So a GPU backend's layer (:class:`ChoosingLayer`) can run several kernels, and
:func:`choose_kernels` times each candidate on the device for every distinct layer shape of one
model call and keeps the fastest. A layer that falls back to the float kernel (``float-grid``)
still computes its grids: its weights are dequantized from the stored integers and its input is
rounded to its calibrated grid, so the deployed numbers stay those of the simulated model.

Choices are cached in a mapping the caller owns (the harness keeps it in a JSON file), keyed by
the device's name, torch's and Triton's versions and the layer's shape, so a second run on the
same GPU measures nothing. Every choice is visible: :func:`qdiff.backends.layer_report` counts
layers by the kernel they run, and :class:`KernelChoices` gives the multiply-accumulates
(MACs) each kernel computes in one call, from which a report shows the quantized share.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn

from qdiff.backends.base import FrozenFakeQuantLayer, KernelLayer
from qdiff.modules import QuantMatMul
from qdiff.storage import steady_heap

FLOAT_GRID = "float-grid"  # the fallback: the layer's grids through the float kernel


class ChoosingLayer(KernelLayer):
    """A kernel layer with several kernels to run; ``choice`` names the one it runs (a kernel
    name, and for a Triton kernel its launch configuration after a ``/``)."""

    choice: str

    @property
    def kernel(self) -> str:  # what layer_report counts: the kernel, not its configuration
        return self.choice.partition("/")[0]

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        """The kernels this layer can run on input ``x`` (:data:`FLOAT_GRID` always among them)."""
        raise NotImplementedError

    def run(self, choice: str, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Input part ``i`` through kernel ``choice``."""
        raise NotImplementedError

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.run(self.choice, i, x, bias)

    def signature(self, x: torch.Tensor) -> dict:
        """What the timing of this layer depends on (the cache key's layer part)."""
        weights = [list(getattr(self, f"weight{i}").shape) for i in range(self.parts)]
        dtype = str(x.dtype).removeprefix("torch.")
        return {"layer": type(self).__name__, "weights": weights, "conv": self.conv_args,
                "split": self.split, "input": list(x.shape), "dtype": dtype}  # fmt: skip


@dataclass
class KernelChoices:
    """What :func:`choose_kernels` did.

    Attributes:
        macs: multiply-accumulates of one model call by the kernel that computes them
            (``float-grid`` for fallbacks, ``simulated``/``simulated-matmul`` for layers that stay
            simulated, ``float`` for layers left unquantized).
        shapes: one record per distinct layer shape: its signature, each candidate's median
            time (ms; None when it came from the cache) and the choice.
        measured: how many shapes were timed here (the rest came from the cache).
    """

    macs: dict[str, int] = field(default_factory=dict)
    shapes: list[dict] = field(default_factory=list)
    measured: int = 0

    def quantized_share(self) -> float:
        """The share of the counted MACs that a quantized kernel computes."""
        total = sum(self.macs.values())
        plain = sum(
            v for k, v in self.macs.items() if k in (FLOAT_GRID, "float", "simulated", "simulated-matmul")
        )
        return 0.0 if total == 0 else (total - plain) / total


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events
    on a GPU, ``perf_counter`` elsewhere), under the C heap's fixed thresholds
    (:func:`qdiff.storage.steady_heap`)."""
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


def device_name(device: torch.device) -> str:
    """The device a timing belongs to (a choice measured on one GPU does not hold on another)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def _kernel_of(module: nn.Module) -> str | None:
    """The kernel a layer's MACs are counted under, or None for modules that are not layers."""
    if isinstance(module, KernelLayer):
        return module.kernel
    if isinstance(module, FrozenFakeQuantLayer):
        return "simulated"
    if isinstance(module, QuantMatMul):
        return "simulated-matmul" if module.use_act_quant else "float"
    if isinstance(module, nn.Conv2d | nn.Linear):
        return "float"
    return None


def _per_output(module: nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates per output element of a layer (its reduction length)."""
    if isinstance(module, QuantMatMul):
        return inputs[0].shape[-1]
    if isinstance(module, FrozenFakeQuantLayer):
        module = module.layer
    return module.reduction if isinstance(module, KernelLayer) else module.weight[0].numel()


def choose_kernels(
    model: nn.Module,
    *args,
    cache: MutableMapping[str, str] | None = None,
    warmup: int = 3,
    repeats: int = 10,
    timer: Callable[[ChoosingLayer, Callable[[], object]], float] | None = None,
    **kwargs,
) -> KernelChoices:
    """Set every :class:`ChoosingLayer` of ``model`` to its fastest kernel for the shapes of
    ``model(*args, **kwargs)``, in place, and count each kernel's MACs in that call.

    Args:
        cache: choices by key (device, versions, layer shape); read, and written for every shape
            measured here. None: measure everything, remember nothing.
        warmup, repeats: per candidate, untimed and timed calls (the median is kept).
        timer: seconds of a layer's call (given the layer, its candidate set as its ``choice``,
            and the call; default: :func:`time_calls` on the layer's device with ``warmup`` and
            ``repeats``).
    """
    observed: dict[ChoosingLayer, torch.Tensor] = {}  # each choosing layer's first input
    counts: dict[nn.Module, int] = {}  # each layer's MACs over every call (attention slices: many)

    def record(module, inputs, output):
        if isinstance(module, ChoosingLayer):  # only these are timed: keep no other activations
            observed.setdefault(module, inputs[0].detach())
        counts[module] = counts.get(module, 0) + output.numel() * _per_output(module, inputs)

    hooks = [m.register_forward_hook(record) for m in model.modules() if _kernel_of(m) is not None]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()

    report = KernelChoices()
    by_key: dict[str, str] = {}
    versions = _versions()
    for module, x in observed.items():
        signature = module.signature(x)
        key = json.dumps({"device": device_name(x.device), **versions, **signature}, sort_keys=True)
        candidates = module.candidates(x)
        if key not in by_key:
            cached = None if cache is None else cache.get(key)
            if isinstance(cached, str) and cached in candidates:
                by_key[key] = cached
                report.shapes.append({**signature, "times_ms": None, "choice": cached})
            else:
                times = {}
                measure = timer or (
                    lambda _, fn, d=x.device: statistics.median(time_calls(fn, warmup, repeats, d))
                )
                with torch.no_grad():
                    for candidate in candidates:
                        module.choice = candidate
                        times[candidate] = measure(module, lambda m=module, x=x: m(x))
                by_key[key] = min(times, key=times.get)
                report.measured += 1
                report.shapes.append({**signature, "times_ms": {k: v * 1000 for k, v in times.items()},
                                      "choice": by_key[key]})  # fmt: skip
                if cache is not None:
                    cache[key] = by_key[key]
        module.choice = by_key[key]
    macs: dict[str, int] = {}
    for module, count in counts.items():
        kernel = _kernel_of(module)
        macs[kernel] = macs.get(kernel, 0) + count
    report.macs = dict(sorted(macs.items()))
    return report


def has_choices(model: nn.Module) -> bool:
    """Whether ``model`` has layers whose kernel :func:`choose_kernels` would pick."""
    return any(isinstance(m, ChoosingLayer) for m in model.modules())
