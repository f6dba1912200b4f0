"""The ``triton-int8`` backend (GPU): static W8A8 through one Triton implicit-GEMM kernel.

Each quantized Conv2d/Linear stores its weight as int8 ``[O, KH·KW·C]`` with per-output-channel
scales and per-channel weight sums (for the input zero point), and runs
:func:`qdiff.backends.triton_kernels.implicit_gemm`, which quantizes the float input with the
calibrated grid inside the kernel, multiplies int8 × int8 into int32 on the tensor cores and
dequantizes and adds the bias in the epilogue. Convolutions read channels-last input and
write channels-last output, so a model runs channels-last end to end without layout copies.
Grouped convolutions and attention's activation-by-activation matmuls stay simulated and are
counted (``simulated``, ``simulated-matmul``).
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.backends.base import (
    KernelLayer,
    deploy_layers,
    integer_weights,
    require_kernel_device,
    static_gemm,
    uint8_grid,
)
from qdiff.backends.triton_kernels import implicit_gemm
from qdiff.modules import QuantLayer


def to_nhwc(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """``x`` as the kernel's ``[N, H, W, C]`` input: a conv input permuted (free when it is
    already channels-last), a Linear input ``[..., C]`` viewed as ``[rows, 1, 1, C]``."""
    if conv:
        return x.permute(0, 2, 3, 1).contiguous()
    return x.reshape(-1, 1, 1, x.shape[-1]).contiguous()


def from_nhwc(y: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
    """The kernel's ``[N, OH, OW, O]`` output in the layer's shape (channels-last for a conv)."""
    if conv:
        return y.permute(0, 3, 1, 2)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class TritonInt8Layer(KernelLayer):
    kernel = "triton-int8"

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        self.kernel_size = tuple(layer.weight.shape[2:]) if self.conv else (1, 1)
        self.grids: list[tuple[float, int, int, int]] = []
        parts = zip(
            integer_weights(layer, "triton-int8", 8, gemm_layout=True), layer.act_quantizers(), strict=True
        )
        for i, ((w, scale), aq) in enumerate(parts):
            self.register_buffer(f"weight{i}", w.to(torch.int8).contiguous())
            self.register_buffer(f"w_sum{i}", w.sum(dim=1).to(torch.int32))
            self.register_buffer(f"w_scale{i}", scale.float())
            self.grids.append(uint8_grid(aq))

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        stride, padding, dilation, _ = self.conv_args if self.conv else ((1, 1), (0, 0), (1, 1), 1)
        y = implicit_gemm(
            to_nhwc(x, self.conv), getattr(self, f"weight{i}"), getattr(self, f"w_scale{i}"),
            None if bias is None else bias.float(), self.kernel_size, tuple(stride), tuple(padding),
            tuple(dilation), act_grid=self.grids[i], w_sum=getattr(self, f"w_sum{i}"), out_dtype=x.dtype,
        )  # fmt: skip
        return from_nhwc(y, x, self.conv)


def convert_triton_int8(qmodel: nn.Module) -> nn.Module:
    """The Triton int8 deployment of a calibrated W8A8-or-narrower model."""
    require_kernel_device(qmodel, "triton-int8")
    return deploy_layers(qmodel, TritonInt8Layer, static_gemm)
