"""The ``openvino`` backend: a calibrated model on OpenVINO's CPU runtime, with the suite's grids.

OpenVINO is how diffusion models are deployed on CPUs (optimum-intel), and its int8 kernels are
the CPU peer of the ``x86`` backend. The model goes there in the form OpenVINO's PyTorch
frontend reads as quantization: every quantized layer becomes ``FakeQuantize`` on its input
(``torch.fake_quantize_per_tensor_affine`` with the calibrated scale and zero point, on the
uint8 range) and on its weight (``torch.fake_quantize_per_channel_affine`` of the already
quantized weight, held as its integers, so AdaRound's learned rounding is kept exactly), then
the float conv or linear; attention stays whole and 4-D, with ``FakeQuantize`` on Q, K, V and
the probabilities (:class:`FakeQuantizeAttention`), the pattern OpenVINO fuses into one kernel.
OpenVINO's low-precision transformations turn each such pattern into an int8 kernel with int8
weights; whatever it cannot run in int8 runs in f32 with the same rounding (``kernels`` counts
both, read from the compiled model's runtime precisions, so a fallback is never silent).

:class:`OpenVINOModule` is the deployable: an ``nn.Module`` whose ``forward(x, t, **cond)``
runs the compiled model. It compiles for the inputs it is first given (``ov.convert_model``
needs an example; shapes stay dynamic), or explicitly through :meth:`OpenVINOModule.compile_for`,
which the harness calls before anything is timed or sampled. The same class runs an FP model
(FP32 on OpenVINO) and a model NNCF quantized (``ov_model=``). Inference threads: torch's
thread count when it compiles. OpenVINO is optional (``pip install 'qdiff-bench[openvino]'``).
"""

from __future__ import annotations

import gc
import math
import os
import warnings
from types import SimpleNamespace
from typing import Any

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
    weight_bits,
)
from qdiff.modules import AttnProcessorSteps, QuantAttnProcessor, QuantLayer
from qdiff.storage import exact_heap, release_free_heap, storage_bytes


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError("backend openvino needs OpenVINO: pip install 'qdiff-bench[openvino]'") from None
    return openvino


class FakeQuantizeLayer(KernelLayer):
    """A quantized Conv2d/Linear as OpenVINO's frontend reads quantization: FakeQuantize on the
    input (calibrated per-tensor grid) and on the weight (per output channel), then the op."""

    kernel = "openvino-fq"

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__(layer)
        bits = weight_bits(layer)
        self.w_range = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        self.grids = []
        for i, ((ints, scale), aq) in enumerate(
            zip(integer_weights(layer, "openvino", bits), layer.act_quantizers(), strict=True)
        ):
            # The integers (the backend holds at most 8 bits), not the float weight they stand
            # for: the form is built beside the FP model, and a float copy of SDXL's weights
            # (9.6 GiB) would not fit beside it.
            self.register_buffer(f"weight{i}", ints.to(torch.int8))
            self.register_buffer(f"w_scale{i}", scale)
            self.grids.append(uint8_grid(aq))
        self.register_buffer("w_zero_point", torch.zeros(layer.weight.shape[0], dtype=torch.int32))

    def part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale, zero_point, qmin, qmax = self.grids[i]
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        ints, w_scale = getattr(self, f"weight{i}"), getattr(self, f"w_scale{i}")
        # integers × step is on the grid, so FakeQuantize leaves it unchanged; OpenVINO folds
        # the three constants' ops into one integer weight, the same as from a float weight.
        w = ints.float() * w_scale.reshape((-1,) + (1,) * (ints.ndim - 1))
        w = torch.fake_quantize_per_channel_affine(w, w_scale, self.w_zero_point, 0, *self.w_range)
        if self.conv:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, bias, stride, padding, dilation, groups)
        return F.linear(x, w, bias)

    def weight_bytes(self) -> int:
        # Stored as integers of the grid's width once OpenVINO has compressed them.
        bits = self.w_range[1].bit_length() + 1
        return sum(math.ceil(getattr(self, f"weight{i}").numel() * bits / 8) for i in range(self.parts))


class FakeQuantizeAttention(AttnProcessorSteps):
    """Attention as OpenVINO fuses it: whole (no slicing: the runtime never materialises more
    than its tiles), in the 4-D ``[batch, heads, tokens, dim]`` layout of its MHA pattern, with
    FakeQuantize on Q, K and V and on the softmax probabilities (their calibrated grids) and
    nowhere else. The CPU plugin tokenizes MatMul→Softmax→MatMul into one snippets subgraph;
    it runs in int8 when no activation operand carries a zero point (symmetric Q/K/V grids,
    ``QConfig.attn_act``; probabilities have zero point 0), else in f32 with the same
    rounding. Same values as the simulated processor, which slices for its memory's sake."""

    kernel = "openvino-fq-attention"

    def __init__(self, processor: QuantAttnProcessor) -> None:
        super().__init__()
        qk, pv = processor.qk, processor.pv
        self.q, self.k, self.v, self.probs = (
            uint8_grid(quantizer) for quantizer in (qk.quant_a, qk.quant_b, pv.quant_b, pv.quant_a)
        )

    def attention(self, attn, query, key, value, attention_mask):
        batch, seq_len = key.shape[:2]
        heads, dim = attn.heads, query.shape[-1] // attn.heads

        def split(t: torch.Tensor, grid) -> torch.Tensor:
            t = t.view(batch, -1, heads, dim).transpose(1, 2)
            return torch.fake_quantize_per_tensor_affine(t, *grid)

        scores = torch.matmul(split(query, self.q), split(key, self.k).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1])
        probs = torch.fake_quantize_per_tensor_affine(scores.softmax(dim=-1), *self.probs)
        out = torch.matmul(probs, split(value, self.v))
        return out.transpose(1, 2).reshape(batch, -1, heads * dim)


def fake_quantize_form(qmodel: nn.Module) -> nn.Module:
    """A copy of a calibrated model with every active quantizer as a FakeQuantize op, and its
    quantized attention in the form OpenVINO fuses (:class:`FakeQuantizeAttention`)."""
    model = deploy_layers(qmodel, FakeQuantizeLayer, static_int)
    for module in list(model.modules()):
        processor = getattr(module, "processor", None)
        if isinstance(processor, QuantAttnProcessor) and processor.qk.use_act_quant:
            module.set_processor(FakeQuantizeAttention(processor))
    return model


class _Tensors(nn.Module):
    """``model(x, t, **cond).sample`` as a function of positional tensors (what tracing takes)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x, t, *cond):
        return self.model(x, t, **dict(zip(self.names, cond, strict=True))).sample


def convert(model: nn.Module, names: tuple[str, ...], example: tuple[torch.Tensor, ...]):
    """``model(x, t, **cond)`` as an ``openvino.Model`` (traced from ``example``; dynamic
    shapes). OpenVINO's frontend traces with ``torch.jit.trace``: the tracer's warnings about
    diffusers' Python branches on shapes, and torch's deprecation of the tracer, say nothing a
    user can act on, so they are silenced.

    The tracer's own check (``check_trace``) is off: it runs the model twice more and keeps
    every intermediate of the traced rerun alive (2.4 GiB against eager's 0.4 GiB for a chain
    of 128 MiB activations), which ran SDXL's UNet at 1024² out of 24 GiB. The converted model
    is checked where it is used instead: against the eager model (``compile: openvino``) or
    the simulated one (``deploy_sqnr``).

    Tracing runs under :func:`~qdiff.storage.exact_heap`: the trace's many mid-sized temporaries
    (each layer's weight as floats, attention slices) otherwise fragment glibc's heap, which
    kept what they freed resident (SD-1.5: 1.9 GiB left after tracing, 0 inside; SDXL's grew
    past 24 GiB)."""
    ov = import_openvino()
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.no_grad(), warnings.catch_warnings(), exact_heap():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)
        decoder = TorchScriptPythonDecoder(
            _Tensors(model, names), example_input=example, trace_kwargs={"check_trace": False}
        )
        return ov.convert_model(decoder)


def _rss_bytes() -> int | None:
    """The process's resident bytes (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class OpenVINOModule(nn.Module):
    """A denoiser compiled for OpenVINO's CPU runtime, called the suite's way.

    Args:
        model: the torch model to convert (FP, or a :func:`fake_quantize_form`); dropped once
            compiled, so only OpenVINO's copy of the weights stays resident.
        ov_model: an ``openvino.Model`` to compile instead (e.g. one NNCF quantized).
        names: the condition keywords in the order ``ov_model``'s inputs take them (after ``x``
            and ``t``); a converted torch model takes them in the order of its first call.
        precision: ``INFERENCE_PRECISION_HINT`` (``f32``: no bf16 on AMX machines, so FP32 and
            int8 rows compare the same arithmetic outside the int8 kernels).
    """

    # OpenVINO allocates its tensors itself: its memory is read from the process's RSS.
    allocates_outside_torch = True

    def __init__(
        self,
        model: nn.Module | None = None,
        ov_model: Any = None,
        precision: str = "f32",
        names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if (model is None) == (ov_model is None):
            raise ValueError("give OpenVINOModule a torch model or an openvino.Model")
        self._torch = [model]  # a list: not a submodule, so .to() and state_dict leave it alone
        self._ov_model = ov_model
        # The weights as deployed: integers of their grids' width (OpenVINO compresses the
        # FakeQuantize'd constants to them), scales, the rest at its dtype.
        self.stored = storage_bytes(model) if model is not None else _constant_bytes(ov_model)
        self.precision = precision
        self.compiled = None
        self.names = names
        self.held_bytes = 0
        self.threads = None

    def compile_for(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> None:
        """Convert (from an example of the inputs; shapes stay dynamic) and compile, once."""
        if self.compiled is not None:
            return
        self.names = self.names or tuple(cond)
        core = _core()  # the CPU plugin loaded before the measurement: it is not the model's
        gc.collect()
        release_free_heap()
        before = _rss_bytes()
        ov_model = self._ov_model
        if ov_model is None:
            example = (x.float(), t, *(cond[k] for k in self.names))
            ov_model = convert(self._torch[0], self.names, example)
        self.threads = torch.get_num_threads()
        config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": self.precision}
        self.compiled = core.compile_model(ov_model, "CPU", config)
        # Only the compiled model's own copy of the weights stays: the torch model and the
        # converted graph (which shares the torch weights) go.
        self._torch, self._ov_model = [None], None
        del ov_model
        gc.collect()
        release_free_heap()  # what conversion freed but the allocator kept is not the model's
        after = _rss_bytes()
        grown = 0 if before is None or after is None else max(after - before, 0)
        # A model handed in already converted (NNCF's) holds its weights from before the
        # measurement; the compiled model needs them resident at least once.
        self.held_bytes = max(grown, self.stored["total"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor):
        if self.compiled is None:
            self.compile_for(x, t, **cond)
        dtype = x.dtype
        inputs = [x.float(), t, *(cond[k] for k in self.names)]
        out = self.compiled([v.detach().cpu().numpy() for v in inputs])[0]
        return SimpleNamespace(sample=torch.from_numpy(out).to(dtype))

    def opaque_bytes(self) -> int:
        """What the compiled model holds: the process's RSS growth across converting and
        compiling (once the torch model and the converted graph are gone and the C heap's free
        pages handed back: OpenVINO's weights in its kernels' layout), and at least its weights
        as stored."""
        return self.held_bytes

    def runtime_kernels(self) -> dict[str, int]:
        """Convolutions and matmuls of the compiled model by the precision they run in
        (``openvino-u8``/``-i8``: int8 kernels; ``openvino-f32``: float), and its fused
        attention subgraphs by the precision of their inputs (:func:`attention_precision`:
        ``openvino-mha-i8``, ``-mixed`` or ``-f32``), from its runtime graph."""
        counts: dict[str, int] = {}
        for op in self.runtime_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in GEMM_LAYERS:
                name = f"openvino-{info['runtimePrecision'].astype(str)}"
            elif fused_attention(op):
                name = f"openvino-mha-{attention_precision(op)}"
            else:
                continue
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def runtime_ops(self) -> list:
        """The compiled model's runtime graph (what the CPU plugin executes), or [] before it
        compiles."""
        return [] if self.compiled is None else list(self.compiled.get_runtime_model().get_ops())

    def deployed_storage(self) -> dict[str, int]:
        """:func:`qdiff.storage_bytes`'s parts for the deployed weights."""
        return dict(self.stored)


GEMM_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")


def fused_attention(op) -> bool:
    """A runtime op is one fused attention: a snippets ``Subgraph`` that computes the source
    model's softmax and its matmuls, or its ``ScaledDotProductAttention`` (a model converted
    with torch's SDPA, as NNCF's is); the runtime graph names the ops each one absorbed."""
    info = op.get_rt_info()
    if info["layerType"].astype(str) != "Subgraph":
        return False
    absorbed = [op.get_friendly_name(), *info["originalLayersNames"].astype(str).split(",")]
    names = [part for name in absorbed for part in name.split("/")]
    if any(n.startswith("ScaledDotProductAttention") for n in names):
        return True
    return any(n.startswith("Softmax") for n in names) and any(n.startswith("MatMul") for n in names)


def integer_inputs(op) -> int:
    """How many inputs of a runtime op arrive as 8-bit integers (u8/i8)."""
    return sum(
        op.input(i).get_element_type().get_type_name() in ("u8", "i8") for i in range(op.get_input_size())
    )


def attention_precision(op) -> str:
    """A fused attention's precision from its inputs: ``i8`` when Q, K and V all arrive as 8-bit
    integers (an additive mask stays float), ``mixed`` when some do (NNCF's Q and K), ``f32``
    when none does."""
    n = integer_inputs(op)
    return "i8" if n >= 3 else "mixed" if n else "f32"


def _core():
    """One OpenVINO runtime per process (its CPU plugin loads once)."""
    global _CORE
    if _CORE is None:
        _CORE = import_openvino().Core()
        _CORE.get_property("CPU", "FULL_DEVICE_NAME")
    return _CORE


_CORE = None


def _constant_bytes(ov_model) -> dict[str, int]:
    """Weights of an ``openvino.Model`` as stored: its integer constants (NNCF's compressed
    weights) and its float ones."""
    parts = {"quantized_weights": 0, "grids": 0, "other": 0}
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant":
            kind = "quantized_weights" if op.get_element_type().is_integral() else "other"
            parts[kind] += op.get_byte_size()
    return {**parts, "total": sum(parts.values())}


def convert_openvino(qmodel: nn.Module) -> nn.Module:
    """A calibrated W8A8-or-narrower model on OpenVINO's CPU runtime (int8 where its kernels
    take the FakeQuantize pattern), compiled on its first call or :meth:`~OpenVINOModule.compile_for`."""
    import_openvino()
    if next(qmodel.parameters()).device.type != "cpu":
        raise BackendError("backend openvino runs on the CPU; move the model there")
    return OpenVINOModule(fake_quantize_form(qmodel))
