"""Triton kernels for the GPU backends: one implicit-GEMM kernel for Linear and Conv2d.

A Linear layer is a 1×1 convolution over a 1×1 image, so one kernel serves both: the output
``[N·OH·OW, O]`` is a GEMM whose A operand is gathered from the channels-last (NHWC) input on
the fly (implicit GEMM: no im2col buffer) and whose B operand is the weight laid out as
``[O, KH·KW·C]`` (``k = (kh·KW + kw)·C + c``). Padding positions read 0.0.

Two weight/activation modes (``MODE``):

* ``int8`` (W8A8): each A element is quantized in registers with the layer's static
  per-tensor input grid (``round_half_even(x / s) + zp``, clamped), shifted by −128 into int8;
  ``tl.dot`` multiplies int8 × int8 into int32. The epilogue removes the zero point with the
  weight's per-channel sums, ``(acc − (zp − 128)·Σₖw)``, then dequantizes with
  ``s · w_scale[o]`` and adds the bias: one kernel from float input to float output.
* ``w4a16``: the weight is packed two signed 4-bit values per byte (low nibble = even ``k``,
  stored as ``q + 8``) with one scale per output channel and group of ``GROUP`` consecutive
  ``k``; tiles are unpacked and dequantized in registers and multiplied in the activation dtype
  with float32 accumulation (an odd ``K`` leaves the last byte's high nibble unused).

Block sizes are fixed (no autotuning), so that ``TRITON_INTERPRET=1`` runs the same kernel on
CPU tensors for the tests; :func:`block_sizes` picks them from the problem shape.
"""

from __future__ import annotations

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
    M, OC, K, C, H, W, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KW: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Output pixel (n, oh, ow) of each row of the tile.
    n_img = rm // (OH * OW)
    rest = rm % (OH * OW)
    ih0 = (rest // OW) * stride_h - pad_h
    iw0 = (rest % OW) * stride_w - pad_w
    if MODE == "int8":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        c = rk % C
        kw = (rk // C) % KW
        kh = rk // (C * KW)
        ih = ih0[:, None] + kh[None, :] * dil_h
        iw = iw0[:, None] + kw[None, :] * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (rm[:, None] < M) & (rk[None, :] < K)
        offs = ((n_img[:, None] * H + ih) * W + iw) * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        k_ok = rk[:, None] < K
        if MODE == "int8":
            q = _round_half_even(x.to(tl.float32) / a_scale) + a_zp
            a = (tl.minimum(tl.maximum(q, a_qmin), a_qmax) - 128.0).to(tl.int8)
            w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=k_ok & (rn[None, :] < OC), other=0)
            acc += tl.dot(a, w, out_dtype=tl.int32)
        else:
            w_ok = k_ok & (rn[None, :] < OC)
            packed = tl.load(w_ptr + rn[None, :] * ((K + 1) // 2) + rk[:, None] // 2, mask=w_ok, other=0)
            packed = packed.to(tl.int32)
            nibble = tl.where((rk[:, None] % 2) == 0, packed & 0xF, (packed >> 4) & 0xF)
            groups = (K + GROUP - 1) // GROUP
            scale = tl.load(w_scale_ptr + rn[None, :] * groups + rk[:, None] // GROUP, mask=w_ok, other=0.0)
            w = ((nibble - 8).to(tl.float32) * scale).to(x.dtype)
            acc += tl.dot(x, w, out_dtype=tl.float32)
    n_ok = rn < OC
    if MODE == "int8":
        w_sum = tl.load(w_sum_ptr + rn, mask=n_ok, other=0)
        w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
        out = (acc - a_zp_shift * w_sum[None, :]).to(tl.float32) * (a_scale * w_scale[None, :])
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * OC + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# Tile edges ``block_sizes`` chooses from. Every tile must compile for the GPUs the backends
# target, which the CPU interpreter does not check: int8 ``tl.dot`` needs K tiles of at least 32
# on sm_80–sm_90 (16 fails to compile), so no tile edge is below 32. Few tiles also keep the
# ahead-of-time compile check of every tile (:func:`compile_for`) affordable.
TILE_MN = (32, 128)
TILE_K = (32, 64)
TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}  # A100, L40/4090, H100/H200
MODES = ("int8", "w4a16")


def block_sizes(m: int, o: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): tensor-core-sized tiles, smaller for small problems so that
    the CPU interpreter stays fast in tests (a tile larger than the problem is masked)."""
    bm = TILE_MN[1] if m >= TILE_MN[1] else TILE_MN[0]
    bn = TILE_MN[1] if o >= TILE_MN[1] else TILE_MN[0]
    bk = TILE_K[1] if k >= TILE_K[1] else TILE_K[0]
    return bm, bn, bk


def compile_for(target: str, mode: str, dtype: torch.dtype, tile: tuple[int, int, int], kw: int = 3):
    """Compile the kernel ahead of time for an NVIDIA GPU (``target`` in :data:`TARGETS`),
    without one: Triton's own front end, optimiser and ``ptxas``, exactly as a GPU launch would
    with these constants and argument types (those of :func:`implicit_gemm`). Raises what the
    compiler raises, so a tile only the interpreter accepts is caught on a CPU machine."""
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
    bm, bn, bk = tile
    constants = dict(KW=kw, MODE=mode, GROUP=64, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    signature.update(dict.fromkeys(constants, "constexpr"))
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32))


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
    group: int = 0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Conv2d (or Linear: 1×1 kernel over ``[N, 1, 1, C]``) of an NHWC input; NHWC output.

    Args:
        x_nhwc: ``[N, H, W, C]`` float input, contiguous.
        weight: int8 ``[O, K]``, ``K = KH·KW·C`` (``act_grid`` given: W8A8) or packed uint8
            ``[O, ⌈K/2⌉]`` (w4a16, see :func:`pack_int4`).
        w_scale: ``[O]`` (int8) or ``[O, ⌈K/group⌉]`` (int4) float32 scales.
        act_grid: ``(scale, zero_point, qmin, qmax)`` of the static unsigned input grid.
        w_sum: ``[O]`` int32 per-channel weight sums (int8 mode).
        group: K values per int4 scale (int4 mode).
    """
    n, h, w, c = x_nhwc.shape
    o = weight.shape[0]
    kh, kw = kernel
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    m, k = n * oh * ow, kh * kw * c
    out = torch.empty((n, oh, ow, o), device=x_nhwc.device, dtype=out_dtype)
    bm, bn, bk = block_sizes(m, o, k)
    int8 = act_grid is not None
    scale, zp, qmin, qmax = act_grid if int8 else (1.0, 0, 0, 0)
    grid = (triton.cdiv(m, bm), triton.cdiv(o, bn))
    _implicit_gemm_kernel[grid](
        x_nhwc, weight, out, bias if bias is not None else w_scale, w_scale,
        w_sum if w_sum is not None else w_scale,
        float(scale), float(zp), int(zp) - 128, float(qmin), float(qmax),
        m, o, k, c, h, w, oh, ow, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KW=kw, MODE="int8" if int8 else "w4a16", GROUP=max(group, 1), HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return out


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
