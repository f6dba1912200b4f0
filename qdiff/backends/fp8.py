"""The ``fp8`` backend: e4m3 weights and activations with static scales, via ``torch._scaled_mm``.

Each quantized layer keeps its (smoothed, low-rank-reduced) float weight as e4m3 with one scale
per output channel (``amax / 448``) and casts its input to e4m3 with a static per-tensor scale
taken from the calibrated 8-bit input grid's range (the range calibration found, so no
per-call amax reduction). ``torch._scaled_mm`` multiplies the two e4m3 operands with a
per-tensor input scale; the per-channel weight scales and the bias are applied to its output
in one ``addcmul``. A 1×1 conv is the same GEMM over channels-last pixels; a k×k conv unfolds
its float input first (``F.unfold``, k² times the input's memory: the closest real fp8 conv
PyTorch offers without a custom kernel). FP8 GEMMs on CUDA need SM ≥ 8.9 (Ada, Hopper) and
operand dimensions that are multiples of 16, so K and O are zero-padded at conversion.
PyTorch also implements ``_scaled_mm`` on CPU, which the tests use. Where the float kernel is
faster for a layer shape (a k×k conv's unfold costs more than cuDNN's FP16 conv saves),
:func:`qdiff.backends.choose_kernels` runs the layer's e4m3 operands, decoded, through it
(``float-grid``): the same numbers, the float kernel's speed.

FP8 rounds differently from the int8 grid the model was calibrated for (3 mantissa bits,
relative rather than absolute steps); the tests compare it with an e4m3 simulation of the same
scales, and quality rows measure the difference from the fake-quant model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.backends.base import BackendError, deploy_layers, static_gemm
from qdiff.backends.choice import FLOAT_GRID, ChoosingLayer
from qdiff.modules import QuantLayer

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
ALIGN = 16  # _scaled_mm's dimension multiple on CUDA


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to ±448 and rounded to e4m3."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_to(n: int) -> int:
    return -n % ALIGN


SCALED_MM = "fp8-scaled-mm"


class Fp8Layer(ChoosingLayer):
    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        self.choice = SCALED_MM
        self.kernel_size = tuple(layer.weight.shape[2:]) if self.conv else (1, 1)
        self.out_features = layer.weight.shape[0]
        self.k_parts: list[int] = []  # each part's K before padding (channels × taps)
        with torch.no_grad():
            for i, (w, aq) in enumerate(zip(layer.weight_parts(), layer.act_quantizers(), strict=True)):
                # [O, C, KH, KW] → [O, C·KH·KW]: F.unfold's order (c, kh, kw).
                w = w.detach().float().reshape(w.shape[0], -1)
                self.k_parts.append(w.shape[1])
                w_scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
                w8 = to_e4m3(w, w_scale[:, None])
                w8 = F.pad(w8.view(torch.uint8), (0, _pad_to(w8.shape[1]), 0, _pad_to(w8.shape[0])))
                # _scaled_mm wants its second operand column-major: store W [O, K] row-major, pass Wᵀ.
                self.register_buffer(f"weight{i}", w8.view(E4M3).contiguous())
                self.register_buffer(f"w_scale{i}", w_scale)
                lo = (aq.qmin - aq.zero_point) * aq.scale
                hi = (aq.qmax - aq.zero_point) * aq.scale
                amax = torch.maximum(lo.abs(), hi.abs()).reshape(())
                self.register_buffer(f"a_scale{i}", (amax / E4M3_MAX).float())

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's A operand ``[rows, K]`` (unfolded for a k×k conv)."""
        if not self.conv:
            return x.reshape(-1, x.shape[-1])
        stride, padding, dilation, _ = self.conv_args
        if self.kernel_size == (1, 1) and padding == [0, 0]:
            return x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        cols = F.unfold(x, self.kernel_size, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        return (SCALED_MM, FLOAT_GRID)

    def run(self, choice: str, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._scaled_mm(i, x, bias) if choice == SCALED_MM else self._float_grid(i, x, bias)

    def _float_grid(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The e4m3 operands, decoded, through the float kernel (cuDNN for a k×k conv)."""
        a_scale = getattr(self, f"a_scale{i}")
        xq = (to_e4m3(x, a_scale).float() * a_scale).to(x.dtype)
        w = getattr(self, f"weight{i}")[: self.out_features, : self.k_parts[i]]
        w = (w.float() * getattr(self, f"w_scale{i}")[:, None]).to(x.dtype)
        if not self.conv:
            return F.linear(xq, w, bias)
        stride, padding, dilation, groups = self.conv_args
        w = w.reshape(self.out_features, -1, *self.kernel_size)
        return F.conv2d(xq, w, bias, stride, padding, dilation, groups)

    def _scaled_mm(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = self._rows(x)
        weight = getattr(self, f"weight{i}")
        a_scale = getattr(self, f"a_scale{i}")
        a8 = to_e4m3(rows, a_scale)
        if weight.shape[1] != a8.shape[1]:
            a8 = F.pad(a8.view(torch.uint8), (0, weight.shape[1] - a8.shape[1])).view(E4M3)
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(a8, weight.t(), scale_a=a_scale, scale_b=one, out_dtype=torch.float32)
        y = y[:, : self.out_features] * getattr(self, f"w_scale{i}")
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
        if not self.conv:
            return y.reshape(*x.shape[:-1], self.out_features)
        stride, padding, dilation, _ = self.conv_args
        oh, ow = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(x.shape[2:], padding, dilation, self.kernel_size, stride, strict=True)
        )
        return y.reshape(x.shape[0], oh, ow, self.out_features).permute(0, 3, 1, 2)


def convert_fp8(qmodel: nn.Module) -> nn.Module:
    """The e4m3 deployment of a calibrated W8A8 model (on CUDA: SM ≥ 8.9)."""
    device = next(qmodel.parameters()).device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise BackendError(
            f"backend fp8 needs a GPU with FP8 tensor cores (SM >= 8.9); this one is SM {major}.{minor}: "
            "use int8"
        )
    return deploy_layers(qmodel, Fp8Layer, static_gemm)
