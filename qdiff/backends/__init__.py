"""Deployable backends: what :func:`qdiff.convert` builds from a calibrated (fake-quant) model.

Each backend names the device it runs on and the bit widths it can deploy, so that a matrix
asking for an impossible combination fails when it is loaded, not an hour into a run.
Converters are imported on first use (the GPU backends import Triton).

Layers a backend cannot run with its kernels (attention matmuls on ``x86``, a layer left at
16 bits) stay simulated, as in ``fake``; :func:`layer_report` counts both kinds, and every
cost row carries that count (``backend_layers``), so a fallback is never silent.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from qdiff.modules import QuantLayer, QuantMatMul, low_rank_branch, smooth_input


class BackendError(ValueError):
    """A backend asked for on a device or bit width it cannot deploy."""


@dataclass(frozen=True)
class Backend:
    """A deployment target.

    Args:
        name: what users pass (``Budget.backend``, ``qdiff.convert(..., backend=)``).
        description: one line for listings.
        device: ``any``, ``cpu`` or ``cuda``: where its kernels run.
        converter: ``"module:function"`` building the deployable model from a quantized one.
        max_w_bits / max_a_bits: widest grids it can hold (None: no limit).
        needs_act: it quantizes activations (static scales), so WxA32 models cannot use it.
        weight_only: it keeps activations in floating point, so WxAy models cannot use it.
    """

    name: str
    description: str
    device: str
    converter: str
    max_w_bits: int | None = None
    max_a_bits: int | None = None
    needs_act: bool = False
    weight_only: bool = False

    def problem(self, w_bits: int | None, a_bits: int | None, device: str) -> str | None:
        """Why this backend cannot deploy a ``W{w_bits}A{a_bits}`` model on ``device``, or None."""
        if self.device != "any" and device != self.device:
            where = "a CUDA GPU" if self.device == "cuda" else "the CPU"
            return f"backend {self.name} runs on {where}, not on device {device!r}"
        if w_bits is None:
            return f"backend {self.name} deploys quantized weights; the FP model has none"
        if self.max_w_bits is not None and w_bits > self.max_w_bits:
            return f"backend {self.name} holds weights of at most {self.max_w_bits} bits, not {w_bits}"
        if self.needs_act and a_bits is None:
            return f"backend {self.name} needs quantized activations (WxA8 or narrower), not WxA32"
        if self.max_a_bits is not None and a_bits is not None and a_bits > self.max_a_bits:
            return f"backend {self.name} holds activations of at most {self.max_a_bits} bits, not {a_bits}"
        if self.weight_only and a_bits is not None:
            return f"backend {self.name} is weight-only: it deploys WxA32 models, not A{a_bits}"
        return None

    def convert(self, qmodel: nn.Module) -> nn.Module:
        module, _, attr = self.converter.partition(":")
        fn: Callable[[nn.Module], nn.Module] = getattr(importlib.import_module(module), attr)
        return fn(qmodel)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fake", "simulated quantization in floating point (quality)", "any",
                "qdiff.backends.fake:convert_fake"),
        Backend("x86", "int8 oneDNN kernels on CPU: static W8A8, scales from calibration", "cpu",
                "qdiff.backends.x86:convert_x86", max_w_bits=8, max_a_bits=8, needs_act=True),
        Backend("triton-int8", "Triton int8 GEMM / implicit-GEMM conv on GPU: static W8A8", "cuda",
                "qdiff.backends.triton_int8:convert_triton_int8", max_w_bits=8, max_a_bits=8,
                needs_act=True),
        Backend("fp8", "e4m3 weights and activations, static scales (torch._scaled_mm), SM >= 8.9",
                "cuda", "qdiff.backends.fp8:convert_fp8", max_w_bits=8, max_a_bits=8, needs_act=True),
        Backend("w4a16", "packed 4-bit weights, dequantized inside a Triton GEMM / conv", "cuda",
                "qdiff.backends.w4a16:convert_w4a16", max_w_bits=4, weight_only=True),
    )
}  # fmt: skip


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def layer_report(model: nn.Module) -> dict[str, int]:
    """How a deployable model's quantized layers run: ``{kernel: count}``.

    Integer/low-precision layers name their kernel (their class's ``kernel``; torchao's
    quantized Linear weights their tensor type); layers that still simulate quantization in
    floating point count as ``simulated``, attention matmuls as ``simulated-matmul``.
    """
    counts: dict[str, int] = {}
    for module in model.modules():
        kernel = getattr(type(module), "kernel", None)
        active = isinstance(module, QuantLayer) and (module.use_weight_quant or module.use_act_quant)
        if kernel is None and active:
            kernel = "simulated"
        if isinstance(module, QuantMatMul) and module.use_act_quant:
            kernel = "simulated-matmul"
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and is_traceable_wrapper_subclass(weight):
            kernel = f"torchao-{type(weight).__name__}"  # a torchao preset's quantized tensor
        if kernel is not None:
            counts[kernel] = counts.get(kernel, 0) + 1
    return dict(sorted(counts.items()))


class KernelLayer(nn.Module):
    """Base of a backend's layer: SmoothQuant's input division, split-shortcut halves and
    SVDQuant's low-rank branch around the backend's kernel, which :meth:`part` calls once
    per input part (the bias goes to the first part only).

    Subclasses set ``kernel`` (its name in :func:`layer_report`) and register each part's
    weights and weight scales as buffers named ``weight<i>`` and ``w_scale<i>``.
    """

    kernel: ClassVar[str]

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.conv = layer.weight.ndim == 4
        self.conv_args = (
            ([*layer.stride], [*layer.padding], [*layer.dilation], layer.groups) if self.conv else None
        )
        self.split = layer.split
        self.parts = len(layer.weight_quantizer)  # 2 for a split-shortcut layer
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("smooth_scale", layer.smooth_scale)
        self.register_buffer("lowrank_u", layer.lowrank_u)
        self.register_buffer("lowrank_v", layer.lowrank_v)

    def _apply(self, fn, recurse=True):
        # ``.to(float16)`` casts floating buffers; scales stay float32 (a float16 step size loses
        # digits and underflows below 6e-8), moving with the module to its device.
        scales = {
            k: self._buffers.pop(k) for k in list(self._buffers) if k.startswith(("w_scale", "a_scale"))
        }
        super()._apply(fn, recurse)
        device = next((b.device for b in self._buffers.values() if b is not None), None)
        for name, t in scales.items():
            self._buffers[name] = t if device is None else t.to(device)
        return self

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the stored low-bit weights (buffers ``weight<i>``)."""
        return sum(getattr(self, f"weight{i}").nbytes for i in range(self.parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = smooth_input(x, self.smooth_scale, self.conv)
        if self.split is None:
            y = self.part(0, x, self.bias)
        else:
            dim = 1 if self.conv else -1
            first, second = x.split([self.split, x.shape[dim] - self.split], dim)
            y = self.part(0, first, self.bias) + self.part(1, second, None)
        if self.lowrank_u is None:
            return y
        stride, padding = self.conv_args[:2] if self.conv else (None, None)
        return y + low_rank_branch(x, self.lowrank_u, self.lowrank_v, stride, padding)


def static_int(layer: QuantLayer) -> bool:
    """Quantized weights and inputs (what the W8A8 backends run)."""
    return layer.use_weight_quant and layer.use_act_quant


def ungrouped(layer: QuantLayer) -> bool:
    """Not a grouped convolution (the GEMM kernels treat a conv as one dense GEMM)."""
    return layer.weight.ndim != 4 or layer.groups == 1


def static_gemm(layer: QuantLayer) -> bool:
    """What the GPU W8A8 kernels run: quantized weights and inputs, not a grouped conv."""
    return static_int(layer) and ungrouped(layer)


def require_kernel_device(qmodel: nn.Module, backend: str) -> None:
    """Triton backends run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    device = next(qmodel.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            f"backend {backend} runs Triton kernels on a CUDA GPU; the model is on {device.type} "
            "(on CPU use backend x86, or set TRITON_INTERPRET=1 to run the kernels interpreted)"
        )


def weight_bits(layer: QuantLayer) -> int:
    """The widest weight grid of a quantized layer (first/last layers may be kept wider)."""
    return max(getattr(q, "base", q).spec.bits for q in layer.weight_quantizer)


def uint8_grid(quantizer) -> tuple[float, int, int, int]:
    """An activation quantizer's grid as ``(scale, zero_point, qmin, qmax)`` on the unsigned
    8-bit range the kernels read (a signed grid moves up by ``2^(b-1)``)."""
    offset = -quantizer.qmin
    zero_point = int(quantizer.zero_point) + offset
    return float(quantizer.scale), zero_point, quantizer.qmin + offset, quantizer.qmax + offset


def quantized_int(layer: QuantLayer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each weight part of a quantized layer as ``(integers, per-output-channel scales)``.

    The integers are the layer's fake-quantized weight divided by its grid's step, so AdaRound's
    learned rounding is kept exactly; symmetric grids only (zero point 0, as every kernel here
    expects).
    """
    out = []
    for q, w in zip(layer.weight_quantizer, layer.weight_parts(), strict=True):
        grid = getattr(q, "base", q)  # an AdaRoundQuantizer keeps its grid in ``base``
        if not grid.spec.symmetric:
            raise BackendError("integer kernels need symmetric weight grids (zero point 0)")
        with torch.no_grad():
            scale = grid.scale.detach().float()
            ints = torch.round(q(w.detach()) / scale)
        scale = scale.reshape(-1).expand(ints.shape[0]).contiguous()
        out.append((ints, scale))
    return out
