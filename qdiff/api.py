"""One-call quantization and conversion to a deployable backend."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from qdiff.calibration import CalibData, calibrate
from qdiff.config import QConfig
from qdiff.lowrank import add_low_rank
from qdiff.modules import QuantLayer
from qdiff.prepare import FilterFn, prepare, quant_layers, set_quant_state
from qdiff.reconstruct import UnitReport, reconstruct
from qdiff.smooth import smooth


def quantize(
    model: nn.Module,
    qconfig: QConfig,
    calib_data: CalibData,
    filter_fn: FilterFn | None = None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, list[UnitReport]]:
    """prepare → (smooth → low-rank branch) → calibrate → reconstruct, on a copy of ``model``.

    Returns:
        The quantized model (fake quantization on) and the reconstruction reports.
    """
    qmodel = prepare(copy.deepcopy(model), qconfig, filter_fn)
    if qconfig.smooth_alpha is not None:
        smooth(qmodel, calib_data, qconfig.smooth_alpha, batch_size=batch_size)
    if qconfig.low_rank:
        add_low_rank(qmodel, qconfig.low_rank)
    calibrate(qmodel, calib_data, batch_size=batch_size, seed=qconfig.calib.seed)
    reports = reconstruct(qmodel, calib_data, qconfig.recon, batch_size=batch_size, progress=progress)
    set_quant_state(qmodel, weight=True, act=True)
    return qmodel, reports


class FrozenFakeQuantLayer(nn.Module):
    """A quantized layer with its fake-quantized weight precomputed (no per-call weight quant)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            w = layer.quantized_weight() if layer.use_weight_quant else layer.effective_weight()
        self.register_buffer("weight_q", w.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.compute(x, self.weight_q)


def _convert_fake(qmodel: nn.Module) -> nn.Module:
    model = copy.deepcopy(qmodel).eval().requires_grad_(False)
    for name, layer in list(quant_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FrozenFakeQuantLayer(layer))
    return model


# Backends: the name a user passes → the function that builds the deployable model.
# Real integer kernels (x86 int8, Triton, torchao) register here.
BACKENDS: dict[str, Callable[[nn.Module], nn.Module]] = {"fake": _convert_fake}


def convert(qmodel: nn.Module, backend: str = "fake") -> nn.Module:
    """A deployable copy of a quantized model for ``backend``.

    ``fake``: simulated quantization with weights fake-quantized once, for quality evaluation;
    the numerics equal the quantized model's.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](qmodel)
