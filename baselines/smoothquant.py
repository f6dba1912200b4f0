"""SmoothQuant (Xiao et al., ICML 2023) applied to the denoiser: per-input-channel scale
migration ``s_j = max|X_j|^α / max|W_{:,j}|^(1−α)`` on every Linear and 1×1 conv (attention
projections, feed-forward, shortcuts), then round-to-nearest W/A quantization as in the paper
(no reconstruction). See :mod:`qdiff.transforms.smooth` for the equations and the one deviation (the
division stays at the layer input instead of being folded into a preceding LayerNorm).

Recipe: ``Smooth(α)`` as the one transform, α (0.5, the paper's default; ``ALPHA`` below), min-max activation
ranges (SmoothQuant's static per-tensor scales), MSE weight ranges as every method here,
calibration on Q-Diffusion's uniform timesteps (the paper calibrates on generic text; a
diffusion model's natural analogue is its whole trajectory), no split shortcut. SmoothQuant
smooths activations, so it needs them quantized: WxA32 is rejected when the matrix loads.
"""

from __future__ import annotations

import dataclasses

import qdiff
from bench.methods import RecipeMethod, quant_specs
from bench.registry import METHODS
from bench.spec import Bits

ALPHA = 0.5


def recipe(bits: Bits) -> qdiff.QConfig:
    specs = quant_specs(bits, "mse")
    if specs["act"] is not None:
        specs["act"] = dataclasses.replace(specs["act"], scale_search="minmax")
    return qdiff.QConfig(
        **specs,
        split_shortcut=False,
        transforms=(qdiff.Smooth(ALPHA),) if bits.a is not None else (),
        calib=qdiff.CalibConfig(strategy="uniform"),
        recon=qdiff.ReconConfig(method="none"),
    )


METHOD = METHODS.add(
    RecipeMethod(
        "smoothquant",
        f"SmoothQuant: activation outliers migrated into weights (alpha={ALPHA}), round-to-nearest",
        recipe,
        needs_act_quant=True,
    )
)
