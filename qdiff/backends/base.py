"""What every backend is built from: the backend description, the kernel-layer base with the
transforms around its kernel, the shared weight and grid conversions, the layer replacement
that deploys a model, and the count of which kernel each layer runs.

A backend module (``fake``, ``x86``, ``int8``, ``fp8``, ``w4a16``) subclasses
:class:`KernelLayer` (the GPU ones :class:`~qdiff.backends.choice.ChoosingLayer`) and converts
with :func:`deploy_layers`; the table of backends is in :mod:`qdiff.backends`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qdiff.errors import QdiffError
from qdiff.modules import QuantLayer, QuantMatMul
from qdiff.prepare import quant_layers, shared_copy
from qdiff.transforms.base import run_layer


class BackendError(QdiffError, ValueError):
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


def layer_report(model: nn.Module) -> dict[str, int]:
    """How a deployable model's quantized layers run: ``{kernel: count}``.

    Integer/low-precision layers name their kernel (their class's ``kernel``); layers that still
    simulate quantization in floating point count as ``simulated``, attention matmuls as
    ``simulated-matmul``. (A model quantized outside qdiff labels its own layers: see
    ``Method.kernels`` in the harness.)
    """
    runtime = getattr(model, "runtime_kernels", None)
    if runtime is not None:  # a model compiled for another runtime reports what that runs
        return runtime()
    counts: dict[str, int] = {}
    for module in model.modules():
        # A kernel layer that chooses among kernels names the one it runs (an instance property).
        kernel = module.kernel if isinstance(module, KernelLayer) else getattr(type(module), "kernel", None)
        active = isinstance(module, QuantLayer) and (module.use_weight_quant or module.use_act_quant)
        if kernel is None and active:
            kernel = "simulated"
        if isinstance(module, QuantMatMul) and module.use_act_quant:
            kernel = "simulated-matmul"
        if kernel is not None:
            counts[kernel] = counts.get(kernel, 0) + 1
    return dict(sorted(counts.items()))


class KernelLayer(nn.Module):
    """Base of a backend's layer: the layer's transforms (SmoothQuant, SVDQuant's branch; run
    through the same :func:`~qdiff.transforms.base.run_layer` as the simulated layer) and the
    split-shortcut halves around the backend's kernel, which :meth:`part` calls once per input
    part (the bias goes to the first part only).

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
        self.reduction = layer.weight[0].numel()  # multiply-accumulates per output element
        self.parts = len(layer.weight_quantizer)  # 2 for a split-shortcut layer
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.transforms = layer.transforms

    def _apply(self, fn, recurse=True):
        # ``.to(float16)`` casts floating buffers. Two kinds must keep their dtype and only move
        # with the module: scales stay float32 (a float16 step size loses digits and underflows
        # below 6e-8), and stored weights stay in their deployed format (fp8's e4m3 weights are
        # floating point, and a cast to float16 made every ``_scaled_mm`` call fail on the GPU).
        kept = {
            k: self._buffers.pop(k)
            for k, v in list(self._buffers.items())
            if v is not None and k.startswith(("w_scale", "a_scale", "weight"))
        }
        super()._apply(fn, recurse)
        for name, t in kept.items():
            # Where ``fn`` sends a tensor of this device (``.cuda()``, ``.to(device)``, a cast).
            self._buffers[name] = t.to(fn(torch.empty(0, device=t.device)).device)
        return self

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the stored low-bit weights (buffers ``weight<i>``)."""
        return sum(getattr(self, f"weight{i}").nbytes for i in range(self.parts))

    def opaque_bytes(self) -> int:
        """Bytes of tensors the layer holds outside its parameters and buffers (a kernel
        library's prepacked weights); 0 unless a backend keeps such tensors."""
        return 0

    def for_compile(self) -> None:
        """Put the layer in the form ``torch.compile`` traces: a backend whose eager calls
        replace the stored weights with a kernel library's prepacked copy gives them back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layer(self.transforms, x, self._parts)

    def _parts(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.part(0, x, self.bias)
        dim = 1 if self.conv else -1
        first, second = x.split([self.split, x.shape[dim] - self.split], dim)
        return self.accumulate(1, second, self.part(0, first, self.bias))

    def accumulate(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + part(i, x)``, written into ``out`` (a kernel's fresh output): the sum of a
        split layer's halves needs no third output-sized tensor."""
        return out.add_(self.part(i, x, None))


def for_compile(model: nn.Module) -> nn.Module:
    """``model`` with every kernel layer in the form ``torch.compile`` traces
    (:meth:`KernelLayer.for_compile`), in place."""
    for module in model.modules():
        if isinstance(module, KernelLayer):
            module.for_compile()
    return model


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


def integer_weights(
    layer: QuantLayer, backend: str, bits: int, gemm_layout: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each weight part of a quantized layer as ``(integers, per-output-channel scales)``, for a
    backend that stores ``bits``-bit signed integers.

    The integers are the layer's fake-quantized weight divided by its grid's step, so AdaRound's
    learned rounding is kept exactly; symmetric grids only (zero point 0, as every kernel here
    expects). With ``gemm_layout`` a conv weight ``[O, C, KH, KW]`` comes as ``[O, KH·KW·C]``
    (the implicit-GEMM kernel's ``k = (kh·KW + kw)·C + c``) and a Linear's as it is.

    Raises:
        BackendError: an asymmetric grid, or integers outside the ``bits``-bit range.
    """
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = []
    for q, w in zip(layer.weight_quantizer, layer.weight_parts(), strict=True):
        grid = getattr(q, "base", q)  # an AdaRoundQuantizer keeps its grid in ``base``
        if not grid.spec.symmetric:
            raise BackendError("integer kernels need symmetric weight grids (zero point 0)")
        with torch.no_grad():
            scale = grid.scale.detach().float()
            ints = torch.round(q(w.detach()) / scale)
        if ints.min() < lo or ints.max() > hi:
            raise BackendError(f"backend {backend} stores {bits}-bit weights; this layer's grid is wider")
        scale = scale.reshape(-1).expand(ints.shape[0]).contiguous()
        if gemm_layout:
            ints = (ints.permute(0, 2, 3, 1) if ints.ndim == 4 else ints).reshape(ints.shape[0], -1)
        out.append((ints, scale))
    return out


class FrozenFakeQuantLayer(nn.Module):
    """A quantized layer with its fake-quantized weight precomputed (no per-call weight quant)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            w = layer.quantized_weight() if layer.use_weight_quant else layer.effective_weight()
        self.register_buffer("weight_q", w.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.compute(x, self.weight_q)


def replace_layers(qmodel: nn.Module, build: Callable[[str, QuantLayer], nn.Module]) -> nn.Module:
    """An inference copy of ``qmodel`` (sharing its weights' storage) with every quantized layer
    replaced by ``build(name, layer)``."""
    model = shared_copy(qmodel).eval().requires_grad_(False)
    for name, layer in list(quant_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(name, layer))
    return model


def deploy_layers(
    qmodel: nn.Module, kernel_layer: Callable[[QuantLayer], nn.Module], runs: Callable[[QuantLayer], bool]
) -> nn.Module:
    """``qmodel`` with each quantized layer the backend ``runs`` as ``kernel_layer(layer)``, and
    every other one simulated (counted by :func:`qdiff.backends.layer_report`)."""
    return replace_layers(
        qmodel, lambda _, layer: kernel_layer(layer) if runs(layer) else FrozenFakeQuantLayer(layer)
    )
