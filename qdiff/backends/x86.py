"""The ``x86`` backend: int8 Conv2d/Linear on CPU through oneDNN, with calibrated static scales.

Each quantized layer stores its weight as prepacked int8 (oneDNN's blocked layout) with
per-output-channel float scales, quantizes its input to uint8 with the calibrated per-tensor
scale and zero point, and runs ``torch.ops.onednn.qconv2d_pointwise`` /
``qlinear_pointwise``: uint8 × int8 products accumulated in int32, dequantized (and the bias
added) inside the kernel. These are the ops PyTorch's x86 quantization stack (``X86InductorQuantizer``)
lowers to; they take plain uint8/int8 tensors, unlike the deprecated quantized tensor types.

The output stays float32 rather than being requantized to uint8: every quantized layer's output
flows into a float island (GroupNorm, SiLU, softmax, residual sums) or into another layer whose
input grid differs, so an int8 output would only add a rounding step and an extra scale to
calibrate. Split-shortcut layers run one kernel per input half (each half has its own grid)
and add the results. Attention's two activation-by-activation matmuls have no int8 kernel here
and stay simulated (counted as ``simulated-matmul`` by :func:`qdiff.backends.layer_report`).

Numerics: on CPUs without VNNI or AMX (AVX2 only), oneDNN multiplies uint8 × int8 with
``vpmaddubsw``, which adds pairs of products in int16 with saturation; with full-range inputs
and weights some layers of the embedded UNet came out at 14–30 dB against exact integer
arithmetic. There the weights are stored on a 7-bit grid (the calibrated step doubled, PyTorch's
``reduce_range`` applied to weights instead of inputs, as per-channel weight grids lose less):
255 · 64 · 2 < 32768, so no pair saturates, and every layer measured ≥ 35 dB against the
fake-quant model. With VNNI or AMX the calibrated 8-bit weights are kept and the kernel is
exact. Rows record the CPU's capability (``cpu_capability``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.backends.base import (
    BackendError,
    KernelLayer,
    deploy_layers,
    integer_weights,
    static_int,
    uint8_grid,
)
from qdiff.modules import QuantLayer

# Whether this CPU's oneDNN int8 kernels are exact for full-range uint8 × int8 (module docstring).
EXACT_INT8 = torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


# Bytes of float input a strided view is quantized in at a time (see quantize_uint8).
STRIDED_CHUNK = 8 << 20


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as uint8 (``qmin``/``qmax`` already
    shifted to the unsigned range)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    rows = max(1, STRIDED_CHUNK // max(1, x[0].numel() * x.element_size())) if x.ndim else 0
    if not dense and x.shape[0] > rows:
        # A strided view (one half of a split layer's input): quantize_per_tensor copies its
        # input whole to a dense float tensor first; a few samples at a time bound that copy.
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        for start in range(0, x.shape[0], rows):
            out[start : start + rows] = quantize_uint8(x[start : start + rows], scale, zero_point, qmin, qmax)
        return out
    with warnings.catch_warnings():
        # One fused pass (5× faster than the elementwise ops); quantized tensor types are
        # deprecated (pytorch#184982) but this op is still the fastest way to uint8 here.
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    # Read its bytes as plain uint8 through the shared storage: ``int_repr`` would copy them
    # (4× the quantization's own time), and ``view(torch.uint8)`` crashes on quantized tensors.
    u8 = torch.empty(0, dtype=torch.uint8, device=x.device)
    u8.set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
    return u8 if (qmin, qmax) == (0, 255) else u8.clamp_(qmin, qmax)


class X86Int8Layer(KernelLayer):
    """A quantized Conv2d or Linear running oneDNN's int8 kernel (see the module docstring)."""

    kernel = "onednn-int8"

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        if self.bias is not None:
            self.bias = self.bias.float()
        # Per input part: the int8 weight with its per-channel scales, and the input grid moved
        # into the uint8 range. Eager calls pack the weight into oneDNN's blocked layout on first
        # use (an opaque tensor, so a plain attribute rather than a buffer).
        self.packed: list[torch.Tensor] = []
        self.stored_bytes = 0
        self.traceable = False  # see for_compile
        self.grids: list[tuple[float, int, int, int]] = []
        parts = zip(integer_weights(layer, "x86", 8), layer.act_quantizers(), strict=True)
        for i, ((ints, scale), aq) in enumerate(parts):
            if not EXACT_INT8:  # 7-bit weights: no int16 pair sum can saturate (docstring)
                ints, scale = (ints / 2).round().clamp(-64, 63), scale * 2
            self.register_buffer(f"weight{i}", ints.to(torch.int8))
            self.register_buffer(f"w_scale{i}", scale)
            self.grids.append(uint8_grid(aq))
        # int64: the dtype torchao's dequantize_per_channel pattern reads (oneDNN takes it too).
        self.register_buffer("w_zero_point", torch.zeros(layer.weight.shape[0], dtype=torch.int64))

    def _pack(self) -> None:
        stored = super().weight_bytes()
        for i in range(self.parts):
            w8, scale = getattr(self, f"weight{i}"), getattr(self, f"w_scale{i}")
            if self.conv:
                stride, padding, dilation, groups = self.conv_args
                a_scale, a_zp = self.grids[i][:2]
                packed = torch.ops.onednn.qconv_prepack(
                    w8, scale, a_scale, a_zp, stride, padding, dilation, groups, None
                )
            else:
                packed = torch.ops.onednn.qlinear_prepack(w8, None)
            self.packed.append(packed)
        # The weights are kept once: oneDNN's blocked copy replaces the plain integers, which
        # only the decomposed form that ``torch.compile`` traces reads (:meth:`for_compile`).
        self.stored_bytes = stored
        if not self.traceable:
            for i in range(self.parts):
                self._buffers[f"weight{i}"] = None

    def for_compile(self) -> None:
        """The plain int8 weights back from the prepacked ones, which are dropped; from now
        on an eager call keeps them beside its prepacked copy (a compiled model reads them)."""
        for i, packed in enumerate(self.packed):
            if getattr(self, f"weight{i}") is None:
                dense = packed.to_dense()
                self._buffers[f"weight{i}"] = dense if self.conv else dense.t().contiguous()
        self.packed = []
        self.traceable = True

    def weight_bytes(self) -> int:
        return self.stored_bytes if self.packed else super().weight_bytes()

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._part_decomposed(i, x, bias)
        if not self.packed:
            self._pack()
        scale, zp, qmin, qmax = self.grids[i]
        qx = quantize_uint8(x, scale, zp, qmin, qmax)
        w_scale = getattr(self, f"w_scale{i}")
        if self.conv:
            stride, padding, dilation, groups = self.conv_args
            # The output is channels-last, oneDNN's native layout, and stays so: converting it
            # back cost more (embedded UNet 396 vs 359 ms a step) than the float islands lose
            # on channels-last tensors (GroupNorm is 3× slower on them here).
            return torch.ops.onednn.qconv2d_pointwise(
                qx, scale, zp, self.packed[i], w_scale, self.w_zero_point, bias, stride, padding,
                dilation, groups, 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qlinear_pointwise(
            qx.contiguous(), scale, zp, self.packed[i], w_scale, self.w_zero_point, bias, 1.0, 0,
            torch.float32, "none", [], "",
        )  # fmt: skip

    def accumulate(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not self.conv:
            return super().accumulate(i, x, out)
        # oneDNN's sum post-op adds the product into ``out`` inside the kernel, so the second
        # half's output is never materialised.
        scale, zp, qmin, qmax = self.grids[i]
        stride, padding, dilation, groups = self.conv_args
        return torch.ops.onednn.qconv2d_pointwise.binary(
            quantize_uint8(x, scale, zp, qmin, qmax), scale, zp, self.packed[i], getattr(self, f"w_scale{i}"),
            self.w_zero_point, out, None, stride, padding, dilation, groups, 1.0, 0, torch.float32, 1.0, 0,
            "sum", 1.0, "none", [], "",
        )  # fmt: skip

    def _part_decomposed(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The same layer as PT2E's ``convert_pt2e`` writes it: quantize → dequantize the input,
        dequantize the int8 weight, float conv/linear. Under ``torch.compile`` (inductor, with
        freezing and torchao's x86 passes registered: :func:`compile_setup`) inductor lowers
        this to the same oneDNN int8 kernel and fuses the input quantization into the op that
        produces the input (GroupNorm, SiLU, a residual sum), which eager calls pay apart."""
        if getattr(self, f"weight{i}") is None:
            raise BackendError(
                "this x86 layer keeps only oneDNN's prepacked weights once it runs eagerly; call "
                "qdiff.backends.for_compile(model) before torch.compile"
            )
        scale, zp, qmin, qmax = self.grids[i]
        qd = torch.ops.quantized_decomposed
        shape = x.shape
        if not self.conv:  # 2-D, as the qlinear pattern expects (its N-D match fails here)
            x = x.reshape(-1, shape[-1])
        xq = qd.quantize_per_tensor.default(x, scale, zp, qmin, qmax, torch.uint8)
        x = qd.dequantize_per_tensor.default(xq, scale, zp, qmin, qmax, torch.uint8)
        w = qd.dequantize_per_channel.default(
            getattr(self, f"weight{i}"), getattr(self, f"w_scale{i}"), self.w_zero_point, 0, -128, 127,
            torch.int8,
        )  # fmt: skip
        if self.conv:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, bias, stride, padding, dilation, groups)
        return F.linear(x, w, bias).reshape(*shape[:-1], w.shape[0])

    def opaque_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.packed)


def compile_setup() -> None:
    """What ``torch.compile(..., backend="inductor")`` of an int8 model needs: freezing (weights
    become constants that inductor prepacks), the x86 int8 lowering passes, which torchao
    registers on import (they left PyTorch with ``torch.ao``'s PT2E), and the fusion of
    ``torch._int_mm`` with its scale. All are process-wide and leave float models' compilation
    as it was, bar freezing's prepacking."""
    import torch._inductor.config
    import torch.ao.quantization.fx._decomposed
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    torch._inductor.config.freezing = True
    # The int8 GPU backend's cuBLASLt GEMM (``torch._int_mm``) with its dequantizing multiply in
    # one kernel; graphs without ``_int_mm`` (FP16 included) compile as before.
    torch._inductor.config.force_fuse_int_mm_with_mul = True
    # Inductor's own int8 weight lowering builds a tensor from a tensor and says so once per
    # layer; nothing for a user to act on.
    warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning, "torch._inductor")


def convert_x86(qmodel: nn.Module) -> nn.Module:
    """The int8 CPU deployment of a calibrated W8A8-or-narrower model (float32 elsewhere)."""
    if next(qmodel.parameters()).device.type != "cpu":
        raise BackendError("backend x86 runs on the CPU; move the model there (or use triton-int8 on GPU)")
    return deploy_layers(qmodel, X86Int8Layer, static_int)
