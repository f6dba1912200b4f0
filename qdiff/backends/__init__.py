"""Deployable backends: what :func:`qdiff.convert` builds from a calibrated (fake-quant) model.

Each backend names the device it runs on and the bit widths it can deploy, so that a matrix
asking for an impossible combination fails when it is loaded, not an hour into a run.
Converters are imported on first use (the GPU backends import Triton).

The GPU backends choose a kernel per layer shape by timing the candidates on the device
(:func:`choose_kernels`); a layer whose quantized kernel is slower runs its grids through the
float kernel and is counted so.

Layers a backend cannot run with its kernels (attention matmuls on ``x86``, a layer left at
16 bits) stay simulated, as in ``fake``; :func:`layer_report` counts both kinds, and every
cost row carries that count (``backend_layers``), so a fallback is never silent.
"""

from __future__ import annotations

from qdiff.backends.base import Backend, BackendError, KernelLayer, for_compile, layer_report
from qdiff.backends.choice import ChoosingLayer, KernelChoices, choose_kernels, has_choices
from qdiff.registry import Registry

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "ChoosingLayer",
    "KernelChoices",
    "KernelLayer",
    "choose_kernels",
    "for_compile",
    "get_backend",
    "has_choices",
    "layer_report",
]

BACKENDS = Registry("backend", error=BackendError)
for _backend in (
        Backend("fake", "simulated quantization in floating point (quality)", "any",
                "qdiff.backends.fake:convert_fake"),
        Backend("x86", "int8 oneDNN kernels on CPU: static W8A8, scales from calibration", "cpu",
                "qdiff.backends.x86:convert_x86", max_w_bits=8, max_a_bits=8, needs_act=True),
        Backend("int8", "static W8A8 on GPU: cuBLASLt int8 GEMMs, Triton implicit-GEMM convs, the "
                "float kernel where measured faster", "cuda", "qdiff.backends.int8:convert_int8",
                max_w_bits=8, max_a_bits=8, needs_act=True),
        Backend("fp8", "e4m3 weights and activations, static scales (torch._scaled_mm), SM >= 8.9",
                "cuda", "qdiff.backends.fp8:convert_fp8", max_w_bits=8, max_a_bits=8, needs_act=True),
        Backend("openvino", "OpenVINO's CPU runtime: FakeQuantize from the calibrated grids, int8 kernels",
                "cpu", "qdiff.backends.openvino:convert_openvino", max_w_bits=8, max_a_bits=8,
                needs_act=True),
        Backend("w4a16", "packed 4-bit weights, dequantized inside a Triton GEMM / conv", "cuda",
                "qdiff.backends.w4a16:convert_w4a16", max_w_bits=4, weight_only=True),
):  # fmt: skip
    BACKENDS.add(_backend)


def get_backend(name: str) -> Backend:
    """The backend ``name`` (:class:`BackendError` naming the valid ones if there is none)."""
    return BACKENDS.get(name)
