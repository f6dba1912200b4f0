"""Triton kernels for the GPU backends: one implicit-GEMM kernel for Conv2d (and Linear).

A Linear layer is a 1×1 convolution over a 1×1 image, so one kernel serves both: the output
``[N·OH·OW, O]`` is a GEMM whose A operand is gathered from the channels-last (NHWC) input on
the fly (implicit GEMM: no im2col buffer) and whose B operand is the weight laid out as
``[O, KH·KW·C]`` (``k = (kh·KW + kw)·C + c``). Padding positions read 0.0.

The K loop runs over the filter taps ``(kh, kw)`` (unrolled: ``KH`` and ``KW`` are constants)
and, inside each tap, over blocks of ``BLOCK_K`` channels. Each tile row's output pixel is
decoded once per tile, each tap's input row offset once per tap, so the inner loop has no
integer division or modulo: it loads a ``[BLOCK_M, BLOCK_K]`` slab of contiguous channels and a
``[BLOCK_K, BLOCK_N]`` weight slab and issues one ``tl.dot``.

Two weight/activation modes (``MODE``):

* ``int8`` (W8A8): each A element is quantized in registers with the layer's static
  per-tensor input grid (``round_half_even(x / s) + zp``, clamped), shifted by −128 into int8;
  ``tl.dot`` multiplies int8 × int8 into int32. The epilogue removes the zero point with the
  weight's per-channel sums, ``(acc − (zp − 128)·Σₖw)``, then dequantizes with
  ``s · w_scale[o]`` and adds the bias: one kernel from float input to float output.
* ``w4a16``: the weight is packed two signed 4-bit values per byte (low nibble = even ``k``,
  stored as ``q + 8``) with one scale per output channel; tiles are unpacked to their integers
  in registers, multiplied in the activation dtype with float32 accumulation (the integers
  −8 … 7 are exact in any float format), and the epilogue applies the scale and the bias.

The launch configurations (:data:`CONFIGS`) are all eligible for Hopper's wgmma instructions
(``BLOCK_M`` a multiple of 64, 4 or 8 warps, a 2-D dot, ``BLOCK_K`` ≥ 32) and software-pipelined
(``num_stages``); which one a layer runs is chosen by measuring them on the device
(:func:`qdiff.backends.choose_kernels`), and every one of them is compiled ahead of time for
sm_80, sm_89 and sm_90 by the tests (:func:`compile_for`). Under ``TRITON_INTERPRET=1`` the same
kernel runs on CPU tensors (warps and stages mean nothing there).

The launch is a ``torch.library`` custom op (``qdiff::implicit_gemm``) with a shape-only fake
implementation, so ``torch.compile`` traces a model around it and fuses what is before and
after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    # torch.round's rounding (ties to even), which the fake-quant model uses.
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _implicit_gemm_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, w_scale_ptr, w_sum_ptr,
    a_scale, a_zp, a_zp_shift, a_qmin, a_qmax,
    M, OC, C, H, W, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    n_ok = rn < OC
    # Output pixel (n, oh, ow) of each row of the tile: decoded once, outside the K loop.
    n_img = rm // (OH * OW)
    rest = rm % (OH * OW)
    ih0 = (rest // OW) * stride_h - pad_h
    iw0 = (rest % OW) * stride_w - pad_w
    K = KH * KW * C
    if MODE == "int8":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        w_row = rn[None, :] * K
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_row = rn[None, :] * ((K + 1) // 2)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * dil_h
        for kw in tl.static_range(KW):
            iw = iw0 + kw * dil_w
            pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = ((n_img * H + ih) * W + iw) * C
            k_tap = (kh * KW + kw) * C
            for c0 in range(0, C, BLOCK_K):
                c = c0 + rc
                c_ok = c < C
                x = tl.load(
                    x_ptr + x_row[:, None] + c[None, :], mask=pix_ok[:, None] & c_ok[None, :], other=0.0
                )
                w_ok = c_ok[:, None] & n_ok[None, :]
                k = k_tap + c
                if MODE == "int8":
                    q = _round_half_even(x.to(tl.float32) / a_scale) + a_zp
                    a = (tl.minimum(tl.maximum(q, a_qmin), a_qmax) - 128.0).to(tl.int8)
                    w = tl.load(w_ptr + w_row + k[:, None], mask=w_ok, other=0)
                    acc += tl.dot(a, w, out_dtype=tl.int32)
                else:
                    packed = tl.load(w_ptr + w_row + (k >> 1)[:, None], mask=w_ok, other=0x88).to(tl.int32)
                    nibble = tl.where((k & 1)[:, None] == 0, packed & 0xF, (packed >> 4) & 0xF)
                    acc += tl.dot(x, (nibble - 8).to(x.dtype), out_dtype=tl.float32)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    if MODE == "int8":
        w_sum = tl.load(w_sum_ptr + rn, mask=n_ok, other=0)
        out = (acc - a_zp_shift * w_sum[None, :]).to(tl.float32) * (a_scale * w_scale[None, :])
    else:
        out = acc * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * OC + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


class KernelConfig(NamedTuple):
    """A launch configuration: tile edges, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"


# What a layer can run, smallest first. All wgmma-eligible on Hopper (BLOCK_M a multiple of
# 64, 4 or 8 warps, K tiles of at least 32: int8 ``tl.dot`` with 16-wide K fails to compile on
# sm_80–sm_90), from the shapes Triton's own matmul tutorials tune over; few, so that measuring
# each per layer shape and compiling each ahead of time for three GPUs stay affordable.
CONFIGS = (
    KernelConfig(64, 64, 32, 4, 3),
    KernelConfig(64, 128, 64, 4, 4),
    KernelConfig(128, 64, 64, 4, 4),
    KernelConfig(128, 128, 64, 8, 3),
)
TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}  # A100, L40/4090, H100/H200
MODES = ("int8", "w4a16")


def default_config(m: int, o: int) -> KernelConfig:
    """The configuration a layer runs before (or without) measurement: the largest for a
    large problem, the smallest otherwise (a tile larger than the problem is masked work, and
    the CPU interpreter's tests stay fast)."""
    return CONFIGS[-1] if m >= 128 and o >= 128 else CONFIGS[0]


def compile_for(
    target: str, mode: str, dtype: torch.dtype, config: KernelConfig, taps: tuple[int, int] = (3, 3)
):
    """Compile the kernel ahead of time for an NVIDIA GPU (``target`` in :data:`TARGETS`),
    without one: Triton's own front end, optimiser and ``ptxas``, exactly as a GPU launch would
    with these constants and argument types (those of :func:`implicit_gemm`). Raises what the
    compiler raises, so a configuration only the interpreter accepts is caught on a CPU machine."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _implicit_gemm_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for needs the compiled kernel: import qdiff without TRITON_INTERPRET=1")
    act = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    signature = {name: "i32" for name in kernel.arg_names}
    # The int8 layers pass a float32 bias; the w4a16 layers theirs in the model's dtype.
    bias = "*fp32" if mode == "int8" else f"*{act}"
    signature.update(x_ptr=f"*{act}", out_ptr=f"*{act}", bias_ptr=bias, w_scale_ptr="*fp32",
                     w_ptr="*i8" if mode == "int8" else "*u8", w_sum_ptr="*i32", a_scale="fp32",
                     a_zp="fp32", a_qmin="fp32", a_qmax="fp32")  # fmt: skip
    constants = dict(KH=taps[0], KW=taps[1], MODE=mode, HAS_BIAS=True, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k)  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32), options=options)


def output_size(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """A convolution's output height and width."""
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation, strict=True)
    )


@torch.library.custom_op("qdiff::implicit_gemm", mutates_args=())
def _implicit_gemm_op(
    x_nhwc: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    w_sum: torch.Tensor | None,
    geometry: Sequence[int],
    act_grid: Sequence[float] | None,
    config: Sequence[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    n, h, w, c = x_nhwc.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    o = weight.shape[0]
    oh, ow = output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    out = torch.empty((n, oh, ow, o), device=x_nhwc.device, dtype=out_dtype)
    cfg = KernelConfig(*config)
    int8 = act_grid is not None
    scale, zp, qmin, qmax = act_grid if int8 else (1.0, 0.0, 0.0, 0.0)
    grid = (triton.cdiv(n * oh * ow, cfg.block_m), triton.cdiv(o, cfg.block_n))
    _implicit_gemm_kernel[grid](
        x_nhwc, weight, out, bias if bias is not None else w_scale, w_scale,
        w_sum if w_sum is not None else w_scale,
        float(scale), float(zp), int(zp) - 128, float(qmin), float(qmax),
        n * oh * ow, o, c, h, w, oh, ow, sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, MODE="int8" if int8 else "w4a16", HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@_implicit_gemm_op.register_fake
def _(x_nhwc, weight, w_scale, bias, w_sum, geometry, act_grid, config, out_dtype):
    n, h, w, _ = x_nhwc.shape
    oh, ow = output_size(h, w, geometry[0:2], geometry[2:4], geometry[4:6], geometry[6:8])
    return x_nhwc.new_empty((n, oh, ow, weight.shape[0]), dtype=out_dtype)


def implicit_gemm(
    x_nhwc: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    act_grid: tuple[float, int, int, int] | None = None,
    w_sum: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Conv2d (or Linear: 1×1 kernel over ``[N, 1, 1, C]``) of an NHWC input; NHWC output.

    Args:
        x_nhwc: ``[N, H, W, C]`` float input, contiguous.
        weight: int8 ``[O, K]``, ``K = KH·KW·C`` (``act_grid`` given: W8A8) or packed uint8
            ``[O, ⌈K/2⌉]`` (w4a16, see :func:`pack_int4`).
        w_scale: ``[O]`` float32 per-output-channel scales.
        act_grid: ``(scale, zero_point, qmin, qmax)`` of the static unsigned input grid.
        w_sum: ``[O]`` int32 per-channel weight sums (int8 mode).
        config: the launch configuration (default: :func:`default_config`).
    """
    n, h, w, _ = x_nhwc.shape
    oh, ow = output_size(h, w, kernel, stride, padding, dilation)
    config = config or default_config(n * oh * ow, weight.shape[0])
    grid = None if act_grid is None else [float(v) for v in act_grid]
    geometry = [*kernel, *stride, *padding, *dilation]
    return _implicit_gemm_op(x_nhwc, weight, w_scale, bias, w_sum, geometry, grid, list(config), out_dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit integers ``[O, K]`` (values in [−8, 7]) → ``[O, ⌈K/2⌉]`` uint8, two per
    byte: even ``k`` in the low nibble, each stored as ``q + 8`` (an odd K is padded with 0)."""
    if q.min() < -8 or q.max() > 7:
        raise ValueError("pack_int4 holds signed 4-bit values, −8 … 7")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.cat([u, torch.full_like(u[..., :1], 8)], dim=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[O, k]``."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :k]
