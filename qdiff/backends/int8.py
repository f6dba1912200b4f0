"""The ``int8`` backend (GPU): static W8A8 through the fastest kernel for each layer shape.

Each quantized, ungrouped Conv2d/Linear stores its weight once, as int8 ``[O, KH·KW·C]`` with
per-output-channel scales and per-channel weight sums (for the input zero point), and can run:

* ``int-mm`` (Linear and 1×1 convolutions, which are GEMMs over pixels): cuBLASLt's int8 GEMM
  through ``torch._int_mm``. The input is quantized with its calibrated static grid by pointwise
  torch ops, which ``torch.compile`` fuses into the op that produces the input; the zero-point
  correction, dequantization and bias are pointwise on the int32 result, which inductor fuses
  into the GEMM's epilogue (``force_fuse_int_mm_with_mul``, set by :func:`compile_setup`).
  cuBLASLt needs more than 16 rows and K, N multiples of 8: other shapes are not candidates.
* ``triton-int8/<config>`` (k×k convolutions): :func:`qdiff.backends.triton_kernels.implicit_gemm`,
  which quantizes the float input with the grid inside the kernel, multiplies int8 × int8 into
  int32 on the tensor cores and dequantizes and adds the bias in its epilogue; channels-last in
  and out, so a model runs channels-last end to end. One candidate per launch configuration.
* ``float-grid``: the same grids through the float kernel (cuBLAS / cuDNN): weights dequantized
  from the stored integers, the input rounded to its grid.

:func:`qdiff.backends.choose_kernels` times the candidates per layer shape and keeps the fastest;
before that, a layer runs ``int-mm`` where its shape fits and Triton otherwise. Grouped
convolutions and attention's activation-by-activation matmuls stay simulated and are counted
(``simulated``, ``simulated-matmul``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.backends.base import (
    deploy_layers,
    integer_weights,
    require_kernel_device,
    static_gemm,
    uint8_grid,
)
from qdiff.backends.choice import FLOAT_GRID, ChoosingLayer
from qdiff.backends.triton_kernels import CONFIGS, default_config, implicit_gemm
from qdiff.modules import QuantLayer

INT_MM = "int-mm"
TRITON = "triton-int8"


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


def int_mm_fits(rows: int, k: int, n: int) -> bool:
    """Whether cuBLASLt's int8 GEMM (``torch._int_mm``) takes an ``[rows, k] × [k, n]`` product."""
    return rows > 16 and k % 8 == 0 and n % 8 == 0


def on_grid(x: torch.Tensor, grid: tuple[float, int, int, int]) -> torch.Tensor:
    """``x`` quantized to the unsigned grid's integers (float), as the fake quantizer rounds:
    ``clamp(round(x / s) + zp, qmin, qmax)`` in float32."""
    scale, zp, qmin, qmax = grid
    return (torch.round(x.float() / scale) + zp).clamp(qmin, qmax)


class Int8Layer(ChoosingLayer):
    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        self.kernel_size = tuple(layer.weight.shape[2:]) if self.conv else (1, 1)
        # A 1×1, stride-1, unpadded convolution is a GEMM over its pixels.
        self.gemm = self.kernel_size == (1, 1) and (
            not self.conv or (self.conv_args[0] == [1, 1] and self.conv_args[1] == [0, 0])
        )
        self.grids: list[tuple[float, int, int, int]] = []
        parts = zip(integer_weights(layer, "int8", 8, gemm_layout=True), layer.act_quantizers(), strict=True)
        for i, ((w, scale), aq) in enumerate(parts):
            self.register_buffer(f"weight{i}", w.to(torch.int8).contiguous())
            self.register_buffer(f"w_sum{i}", w.sum(dim=1).to(torch.int32))
            self.register_buffer(f"w_scale{i}", scale.float())
            self.grids.append(uint8_grid(aq))
        self.choice = INT_MM if self.gemm else TRITON

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        if self.gemm:
            rows = x.numel() // x.shape[1 if self.conv else -1]
            weights = [getattr(self, f"weight{i}") for i in range(self.parts)]
            fits = all(int_mm_fits(rows, w.shape[1], w.shape[0]) for w in weights)
            return (INT_MM, FLOAT_GRID) if fits else (FLOAT_GRID,)
        return (*(f"{TRITON}/{c.name}" for c in CONFIGS), FLOAT_GRID)

    def run(self, choice: str, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = getattr(self, f"weight{i}")
        kernel, _, config = choice.partition("/")
        # A layer never chosen for its shape may meet one cuBLASLt refuses: it runs the float
        # kernel then (choose_kernels gives such shapes float-grid, so what a harness row
        # counts is what ran).
        if kernel == INT_MM and int_mm_fits(x.numel() // weight.shape[1], weight.shape[1], weight.shape[0]):
            return self._int_mm(i, x, bias)
        if kernel == TRITON:  # a convolution (Linear layers are GEMMs: int-mm or float-grid)
            stride, padding, dilation, _ = self.conv_args
            cfg = next((c for c in CONFIGS if c.name == config), None)
            y = implicit_gemm(
                to_nhwc(x, conv=True), weight, getattr(self, f"w_scale{i}"),
                None if bias is None else bias.float(), self.kernel_size, tuple(stride), tuple(padding),
                tuple(dilation), act_grid=self.grids[i], w_sum=getattr(self, f"w_sum{i}"), out_dtype=x.dtype,
                config=cfg or default_config(x.numel() // x.shape[1], weight.shape[0]),
            )  # fmt: skip
            return from_nhwc(y, x, conv=True)
        return self._float_grid(i, x, bias)

    def _int_mm(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = getattr(self, f"weight{i}")
        scale, zp, _, _ = self.grids[i]
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.conv else x.reshape(-1, x.shape[-1])
        a = (on_grid(rows, self.grids[i]) - 128).to(torch.int8)
        acc = torch._int_mm(a, weight.t())
        # Σₖ (q − 128)·w − (zp − 128)·Σₖ w = Σₖ (q − zp)·w, exact in int32, then dequantized.
        y = (acc - (zp - 128) * getattr(self, f"w_sum{i}")).float() * (scale * getattr(self, f"w_scale{i}"))
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
        if self.conv:
            return y.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        return y.reshape(*x.shape[:-1], -1)

    def _float_grid(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale, zp, _, _ = self.grids[i]
        xq = ((on_grid(x, self.grids[i]) - zp) * scale).to(x.dtype)
        w = (getattr(self, f"weight{i}").float() * getattr(self, f"w_scale{i}")[:, None]).to(x.dtype)
        if not self.conv:
            return F.linear(xq, w, bias)
        kh, kw = self.kernel_size
        w = w.reshape(w.shape[0], kh, kw, -1).permute(0, 3, 1, 2)
        stride, padding, dilation, groups = self.conv_args
        return F.conv2d(xq, w, bias, stride, padding, dilation, groups)


def convert_int8(qmodel: nn.Module) -> nn.Module:
    """The GPU int8 deployment of a calibrated W8A8-or-narrower model."""
    require_kernel_device(qmodel, "int8")
    return deploy_layers(qmodel, Int8Layer, static_gemm)
