"""torchao presets: the production quantization a deployer tries first, through torchao's own
``quantize_`` API (https://github.com/pytorch/ao), with nothing of qdiff in the path.

Registered presets (one bit width each):

- ``torchao-int8dq`` W8A8 — ``Int8DynamicActivationInt8WeightConfig()``: symmetric per-row
  int8 weights, activations quantized per token at run time (dynamic, no calibration),
  ``y = (s_x s_w) · (X_q W_qᵀ)`` with an int8 matmul where torchao has one.
- ``torchao-fp8dq-row`` W8A8 — ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``:
  e4m3 weights with one scale per output row, activations cast to e4m3 per token at run time,
  ``torch._scaled_mm`` with row-wise scales; the fastest of torchao's fp8 presets on diffusion
  transformers (diffusers-torchao). CUDA with SM ≥ 8.9 only.
- ``torchao-int8wo`` W8A32 — ``Int8WeightOnlyConfig()``: per-row int8 weights dequantized in
  the matmul.
- ``torchao-int4wo`` W4A32 — ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``:
  asymmetric int4 weights in groups of 128 along the input dimension, tinygemm's CUDA kernel.
  CUDA only: on another device its rows are ``skipped`` with the reason.
- ``torchao-intx4wo`` W4A32 — ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(32))``: int4 weights in groups of 32, any device (the CPU route to int4).

What differs from the qdiff-based methods, on purpose (this is what the preset does): torchao's
default filter quantizes ``nn.Linear`` layers only, so a convolutional UNet keeps its
convolutions in floating point (on the embedded model, 17% of the weights are in Linear
layers; ``weight_bytes`` shows it); no calibration data and no reconstruction; activation
scales are dynamic. The matrix's budget does not apply, and neither does its ``backend``: the
quantized model runs on torchao's own kernels. The torchao version is part of the recorded
settings, so an upgrade re-measures the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from bench.errors import AvailabilityError
from bench.methods import Calibration, Progress
from bench.registry import METHODS
from bench.spec import Bits
from qdiff.prepare import shared_copy


@dataclass(frozen=True)
class TorchaoSettings:
    """What a torchao run used: the preset, torchao's config (its repr) and version."""

    preset: str
    config: str
    torchao_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torchao():
    try:
        import torchao
        import torchao.quantization
    except ImportError as exc:  # an incompatible build fails here too
        raise AvailabilityError(f"torchao does not import ({exc}); pip install torchao") from None
    return torchao


def _int8dq():
    return _torchao().quantization.Int8DynamicActivationInt8WeightConfig()


def _fp8dq_row():
    quantization = _torchao().quantization
    return quantization.Float8DynamicActivationFloat8WeightConfig(granularity=quantization.PerRow())


def _int8wo():
    return _torchao().quantization.Int8WeightOnlyConfig()


def _int4wo():
    return _torchao().quantization.Int4WeightOnlyConfig(
        group_size=128, int4_packing_format="tile_packed_to_4d"
    )


def _intx4wo():
    quantization = _torchao().quantization
    return quantization.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=quantization.granularity.PerGroup(32)
    )


@dataclass(frozen=True)
class TorchaoPreset:
    """A torchao ``quantize_`` config registered as a method for exactly one bit width.

    Args:
        build: makes the torchao config (imports torchao only when called).
        cuda_only: why the preset needs CUDA, or empty when it runs anywhere.
        bf16_weights: cast Linear layers to bfloat16 first (tinygemm packs bf16 weights; its
            kernel casts activations to bf16 and the output back).
    """

    name: str
    description: str
    bits: Bits
    build: Callable[[], Any]
    cuda_only: str = ""
    bf16_weights: bool = False

    checkpointable: ClassVar[bool] = False  # torchao's tensors do not pickle as whole modules
    backend: ClassVar[str] = "torchao"  # its own kernels deploy it, whatever Budget.backend says
    runtime_reference: ClassVar[bool] = False

    def unsupported(self, bits: Bits) -> str | None:
        if bits != self.bits:
            return f"{self.name} is torchao's {self.bits.label} preset; use bits {self.bits.label}"
        return None

    def unsupported_on(self, model) -> str | None:
        return None  # quantize_ swaps Linear layers, whatever holds them, and needs no schedule

    def bases(self, bits: Bits) -> tuple:
        return ()

    def configure(self, bits: Bits, budget) -> TorchaoSettings:
        return TorchaoSettings(self.name, repr(self.build()), _torchao().__version__)

    def quantize(
        self,
        denoiser: nn.Module,
        config: TorchaoSettings,
        calibration: Calibration,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, None]:
        device = next(denoiser.parameters()).device
        if self.cuda_only and device.type != "cuda":
            raise AvailabilityError(
                f"{self.name} needs CUDA ({self.cuda_only}); this run is on {device.type}"
            )
        model = shared_copy(denoiser)  # quantize_ rebinds the copy's weights; the FP's stay
        if self.bf16_weights:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.to(torch.bfloat16)
        _torchao().quantization.quantize_(model, self.build())
        return model.eval(), None

    def refine(self, denoiser, bases, config, calibration, alphas_cumprod) -> nn.Module:
        raise TypeError(f"{self.name} quantizes by itself (no bases): call quantize")

    def deploy(self, qmodel: nn.Module, backend: str) -> nn.Module:
        return qmodel  # torchao's kernels are the deployment; qdiff backends do not apply

    def kernels(self, deployed: nn.Module) -> dict[str, int]:
        """Each quantized Linear by its weight's torchao tensor type (``torchao-Int8Tensor``)."""
        counts: dict[str, int] = {}
        for module in deployed.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and is_traceable_wrapper_subclass(weight):
                kernel = f"torchao-{type(weight).__name__}"
                counts[kernel] = counts.get(kernel, 0) + 1
        return dict(sorted(counts.items()))


INT8_DYNAMIC = METHODS.add(
    TorchaoPreset(
        "torchao-int8dq",
        "torchao int8 dynamic activations + int8 weights (Linear layers)",
        Bits(8, 8),
        _int8dq,
    )
)
FP8_DYNAMIC_ROW = METHODS.add(
    TorchaoPreset(
        "torchao-fp8dq-row",
        "torchao fp8 (e4m3) dynamic activations + fp8 weights, row-wise scales (Linear layers, CUDA)",
        Bits(8, 8),
        _fp8dq_row,
        cuda_only="fp8 GEMMs (torch._scaled_mm) on SM >= 8.9",
    )
)
INT8_WEIGHT_ONLY = METHODS.add(
    TorchaoPreset("torchao-int8wo", "torchao int8 weight-only (Linear layers)", Bits(8, None), _int8wo)
)
INT4_WEIGHT_ONLY = METHODS.add(
    TorchaoPreset(
        "torchao-int4wo",
        "torchao int4 weight-only, tinygemm (Linear layers, CUDA)",
        Bits(4, None),
        _int4wo,
        cuda_only="tinygemm int4 kernel; on CPU use torchao-intx4wo",
        bf16_weights=True,
    )
)
INTX4_WEIGHT_ONLY = METHODS.add(
    TorchaoPreset(
        "torchao-intx4wo",
        "torchao int4 weight-only, groups of 32 (Linear layers, any device)",
        Bits(4, None),
        _intx4wo,
    )
)
