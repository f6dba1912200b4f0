"""qdiff: post-training quantization of diffusion models (Q-Diffusion, Li et al., ICCV 2023).

Explicit steps: :func:`prepare` → :func:`calibrate` → :func:`reconstruct` → :func:`convert`,
or :func:`quantize` for the first three in one call.
"""

import logging

from qdiff.api import convert, quantize
from qdiff.calibration import CalibData, TrajectoryRecorder, calibrate, select_steps
from qdiff.config import CalibConfig, ConfigError, QConfig, QuantSpec, ReconConfig
from qdiff.errors import QdiffError
from qdiff.modules import QuantAttnProcessor, QuantConv2d, QuantLinear, QuantMatMul
from qdiff.prepare import find_skip_concats, fp_attention, prepare, set_quant_state
from qdiff.quantizer import AdaRoundQuantizer, UniformAffineQuantizer
from qdiff.reconstruct import ReconResult, UnitReport, find_units, reconstruct
from qdiff.storage import resident_bytes, storage_bytes
from qdiff.transforms.lowrank import LowRank, add_low_rank
from qdiff.transforms.smooth import Smooth, smooth

# A diffusion model reaches qdiff through diffusers, whose import imports torchao when it is
# installed: torchao 0.18 under torch 2.14 logs a deprecation warning per enum it registers, and
# diffusers one about torchao tensor classes it cannot import. Neither concerns quantizing with
# qdiff, and every worker process of the harness would print them.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

__all__ = [
    "AdaRoundQuantizer",
    "CalibConfig",
    "CalibData",
    "ConfigError",
    "LowRank",
    "QConfig",
    "QdiffError",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantSpec",
    "ReconConfig",
    "ReconResult",
    "Smooth",
    "TrajectoryRecorder",
    "UniformAffineQuantizer",
    "UnitReport",
    "add_low_rank",
    "calibrate",
    "convert",
    "find_skip_concats",
    "find_units",
    "fp_attention",
    "prepare",
    "quantize",
    "reconstruct",
    "resident_bytes",
    "select_steps",
    "set_quant_state",
    "smooth",
    "storage_bytes",
]
