"""One-call quantization and conversion to a deployable backend."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qdiff.backends import get_backend
from qdiff.calibration import CalibData, calibrate
from qdiff.config import QConfig
from qdiff.prepare import FilterFn, prepare, set_quant_state, shared_copy
from qdiff.reconstruct import ReconResult, reconstruct


def quantize(
    model: nn.Module,
    qconfig: QConfig,
    calib_data: CalibData,
    filter_fn: FilterFn | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, ReconResult]:
    """prepare → transforms (in order) → calibrate → reconstruct, on a copy of ``model`` that
    shares its weights' storage (:func:`qdiff.prepare.shared_copy`); ``model`` is not changed.

    Returns:
        The quantized model (fake quantization on) and what reconstruction did.
    """
    qmodel = prepare(shared_copy(model), qconfig, filter_fn)
    for transform in qconfig.transforms:
        transform.apply(qmodel, calib_data, batch_size)
    calibrate(qmodel, calib_data, batch_size=batch_size, seed=qconfig.calib.seed)
    result = reconstruct(qmodel, calib_data, qconfig.recon, batch_size=batch_size, progress=progress)
    set_quant_state(qmodel, weight=True, act=True)
    return qmodel, result


def convert(qmodel: nn.Module, backend: str = "fake") -> nn.Module:
    """A deployable copy of a quantized model for ``backend`` (see :data:`qdiff.backends.BACKENDS`).

    ``fake``: simulated quantization with weights fake-quantized once, for quality evaluation;
    the numerics equal the quantized model's. ``x86``, ``triton-int8``, ``fp8``, ``w4a16``:
    integer / low-precision weights and kernels, for cost; layers a backend cannot run stay
    simulated and are counted by :func:`qdiff.backends.layer_report`.
    """
    return get_backend(backend).convert(qmodel)
