"""The ``w4a16`` backend (GPU): packed 4-bit weights, dequantized inside a Triton GEMM / conv.

Weights of a WxA32 model with at most 4 bits are stored two per byte
(:func:`~qdiff.backends.triton_kernels.pack_int4`) with one float32 scale per output channel
(qdiff's grids are per channel); the implicit-GEMM kernel unpacks each weight tile to its
integers in registers, multiplies them with the 16-bit (or 32-bit) activations and scales the
sums in its epilogue, so the weights cross memory at 4 bits. Activations stay in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.backends.base import (
    KernelLayer,
    deploy_layers,
    integer_weights,
    require_kernel_device,
    ungrouped,
    weight_bits,
)
from qdiff.backends.int8 import from_nhwc, to_nhwc
from qdiff.backends.triton_kernels import implicit_gemm, pack_int4
from qdiff.modules import QuantLayer


class W4A16Layer(KernelLayer):
    kernel = "triton-w4a16"

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        self.kernel_size = tuple(layer.weight.shape[2:]) if self.conv else (1, 1)
        for i, (w, scale) in enumerate(integer_weights(layer, "w4a16", 4, gemm_layout=True)):
            self.register_buffer(f"weight{i}", pack_int4(w))
            self.register_buffer(f"w_scale{i}", scale.float())

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        stride, padding, dilation, _ = self.conv_args if self.conv else ((1, 1), (0, 0), (1, 1), 1)
        y = implicit_gemm(
            to_nhwc(x, self.conv), getattr(self, f"weight{i}"), getattr(self, f"w_scale{i}"), bias,
            self.kernel_size, tuple(stride), tuple(padding), tuple(dilation), out_dtype=x.dtype,
        )  # fmt: skip
        return from_nhwc(y, x, self.conv)


def _packs(layer: QuantLayer) -> bool:
    # Weight-only, at most 4 bits: first/last layers kept at 8 bits stay simulated (counted).
    return layer.use_weight_quant and not layer.use_act_quant and ungrouped(layer) and weight_bits(layer) <= 4


def convert_w4a16(qmodel: nn.Module) -> nn.Module:
    """The packed-int4 deployment of a calibrated W4A32 (weight-only) model."""
    require_kernel_device(qmodel, "w4a16")
    return deploy_layers(qmodel, W4A16Layer, _packs)
