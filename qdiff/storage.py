"""The bytes a model's weights take as a deployment stores them, not as fake quantization holds them.

A fake-quantized model keeps every weight as float32 (twice, once converted), so its in-memory size
says nothing about compression. Here a quantized weight of ``b`` bits counts as packed integers,
``ceil(numel · b / 8)`` bytes, plus its grid: one float32 scale per tensor or output channel and,
for asymmetric grids, one byte of zero point per scale. Activation quantizers' grids count the
same way; grids of quantizers switched off (a WxA32 model's activation quantizers) are not
stored. Every other parameter and persistent buffer (biases, norms, embeddings, layers left
in floating point) counts at its own dtype's size. Tensors shared between modules count once.

:func:`resident_bytes` is the other view: what a model's tensors occupy in memory right now
(a fake-quantized model's float copies included), which deployed-memory figures need.

A weight held as a tensor subclass (torchao's quantized tensors) counts as the inner tensors it
actually stores, found through ``__tensor_flatten__``: the integer data (named ``qdata`` in
torchao) as quantized weights, everything else (scales, zero points) as grid. That is the
memory torchao's layout takes, e.g. one byte per int4 value in its unpacked CPU format.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from qdiff.backends.base import FrozenFakeQuantLayer, KernelLayer
from qdiff.modules import QuantModule
from qdiff.quantizer import AdaRoundQuantizer, UniformAffineQuantizer

SCALE_BYTES = 4  # float32 step size
ZERO_POINT_BYTES = 1  # an integer in the grid's range; 8 bits hold every grid we build


def _grid_bytes(q: UniformAffineQuantizer) -> int:
    zero_points = 0 if q.spec.symmetric else q.zero_point.numel() * ZERO_POINT_BYTES
    return q.scale.numel() * SCALE_BYTES + zero_points


def _leaves(t: torch.Tensor, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the plain tensors ``t`` is made of: itself, or a wrapper
    subclass's inner tensors (recursively), named as the subclass names them."""
    if not is_traceable_wrapper_subclass(t):
        yield name, t
        return
    for inner in t.__tensor_flatten__()[0]:
        yield from _leaves(getattr(t, inner), inner)


def storage_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s weights as stored for deployment, by part.

    Returns:
        ``{"quantized_weights", "grids", "other", "total"}``: packed low-bit weights; quantizer
        scales and zero points; every remaining parameter and buffer; their sum.
    """
    deployed = getattr(model, "deployed_storage", None)
    if deployed is not None:  # compiled for another runtime (OpenVINO): it knows its weights
        return deployed()
    counted: set[int] = set()
    parts = {"quantized_weights": 0, "grids": 0, "other": 0}

    def mark(t: torch.Tensor) -> None:
        counted.add(id(t))

    stored_weights: set[tuple[int, ...]] = set()
    for module in model.modules():
        if isinstance(module, QuantModule):
            # Only grids in use are stored: a WxA32 model keeps its (idle) activation quantizers.
            # A weight whose tensors and grid tensors another layer shares (two models of the
            # same weights, e.g. PTQD's mixed precision) is stored once.
            if module.use_weight_quant:
                grids = module.weight_quantizer.state_dict(keep_vars=True).values()
                weight_id = (id(module.weight), *(id(t) for t in grids))
                if weight_id not in stored_weights:
                    stored_weights.add(weight_id)
                    for q, w in zip(module.weight_quantizer, module.weight_parts(), strict=True):
                        grid = q.base if isinstance(q, AdaRoundQuantizer) else q
                        parts["quantized_weights"] += math.ceil(w.numel() * grid.spec.bits / 8)
                        parts["grids"] += _grid_bytes(grid)
                mark(module.weight)
            if module.use_act_quant:
                parts["grids"] += sum(_grid_bytes(q) for q in module.act_quantizers())
        if isinstance(module, KernelLayer):  # a backend's integer / low-precision weights
            parts["quantized_weights"] += module.weight_bytes()
            for name, t in module.named_buffers(recurse=False):
                if name.startswith("w_scale"):
                    parts["grids"] += t.numel() * t.element_size()
                    mark(t)
                elif name.startswith(("weight", "w_zero_point")):
                    # The weights are counted by weight_bytes(); the zero points of the
                    # symmetric weight grids the kernels read are all 0, never stored.
                    mark(t)
        if isinstance(module, FrozenFakeQuantLayer):
            mark(module.weight_q)  # a precomputed copy of its layer's (quantized) weight
        if isinstance(module, UniformAffineQuantizer | AdaRoundQuantizer):
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                mark(t)  # grid state or AdaRound's rounding variables, counted above if in use
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in counted:
            continue
        mark(t)
        if is_traceable_wrapper_subclass(t):
            for name, inner in _leaves(t):
                part = "quantized_weights" if name == "qdata" else "grids"
                parts[part] += inner.numel() * inner.element_size()
        else:
            parts["other"] += t.numel() * t.element_size()
    return {**parts, "total": sum(parts.values())}


def _storage_bytes_once(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of a plain tensor's storage, or 0 when ``seen`` already holds that storage."""
    try:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # opaque layouts (mkldnn) have no plain storage
        key, size = id(t), t.numel() * t.element_size()
    if key in seen or size == 0:
        return 0
    seen.add(key)
    return size


def resident_bytes(model: nn.Module) -> int:
    """Bytes ``model``'s tensors occupy in memory now, each storage once: parameters, buffers,
    the inner tensors of tensor subclasses (torchao), and kernel layers' prepacked weights that
    are not buffers (:meth:`~qdiff.backends.base.KernelLayer.opaque_bytes`). Unlike
    :func:`storage_bytes` this counts what is held, e.g. both the float weight and the
    fake-quantized copy of a simulated layer."""
    seen: set[int] = set()
    tensors = (*model.parameters(), *model.buffers())
    total = sum(_storage_bytes_once(leaf, seen) for t in tensors for _, leaf in _leaves(t))
    # Kernel layers' prepacked weights; a model compiled for another runtime, what it holds.
    return total + sum(m.opaque_bytes() for m in model.modules() if hasattr(m, "opaque_bytes"))


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None on other C libraries (no ``malloc_trim``/``mallopt``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc's, absent from musl and macOS)
        return libc
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the kernel, so that memory a block allocates shows
    as resident growth instead of silently reusing pages freed before it (glibc only)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# glibc's mallopt parameters, and the thresholds it grows to by itself on 64-bit Linux
# (DEFAULT_MMAP_THRESHOLD_MAX, and twice it for trimming).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_BYTES = 32 << 20
# Inside :func:`exact_heap`: every allocation from 64 KiB up is a mapping of its own.
EXACT_MMAP_BYTES = 64 << 10


def steady_heap() -> bool:
    """Fix glibc's allocation thresholds at the values its dynamic rule grows to (allocations
    from 32 MiB up mapped on their own, free heap above 64 MiB trimmed).

    The dynamic threshold follows the largest block the process freed so far, so two timings
    of one model would differ with what the process ran before it; fixed, they do not. Called
    before every timing; a no-op where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * STEADY_MMAP_BYTES)
    return True


@contextmanager
def exact_heap() -> Iterator[bool]:
    """While inside, glibc maps every allocation from 64 KiB up on its own and unmaps it when
    freed, so the process's resident memory follows what is allocated and its peak is the
    block's real peak. Otherwise freed chunks stay resident or get reused depending on the
    heap's fragmentation: the same model's step measured 130–161 MiB of working memory in
    three calls, 94.0 MiB every time inside. Slower (each large tensor is a fresh mapping), so
    nothing inside is timed. Yields whether it applied (glibc only)."""
    libc = _libc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, EXACT_MMAP_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * EXACT_MMAP_BYTES)
    try:
        yield True
    finally:
        steady_heap()
