"""SVDQuant (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion
Models", ICLR 2025), for W4A4 and other activation-quantized settings.

Two steps on every Linear and 1×1 conv with quantized inputs: SmoothQuant-style migration of
activation outliers into the weights (``X̂ = X / s``, ``Ŵ = W · s``, :mod:`qdiff.transforms.smooth`), then a
16-bit rank-r branch from the truncated SVD of ``Ŵ`` that absorbs the weight outliers, so only
the residual ``R = Ŵ − L₁L₂`` and ``X̂`` are quantized (:mod:`qdiff.transforms.lowrank`, paper Eq. 7):
``y = X̂ L₂ᵀ L₁ᵀ + Q(X̂) Q(R)ᵀ``. Round-to-nearest, no reconstruction, as in the paper.

Settings: rank ``RANK`` = 32 (the paper's default); everything else is
:mod:`baselines.smoothquant`'s recipe (α = 0.5, min-max activation ranges, MSE weight ranges,
uniform timestep calibration, no split shortcut), so the two differ by the branch alone.

Deviations: the paper quantizes weights and activations per group of 64 (Nunchaku's INT4
format) and searches α per layer; here the grids are the suite's common ones (per output
channel for weights, per tensor for activations) so that the comparison isolates smoothing and
the low-rank branch, and α is fixed. The branch is simulated in float16 beside the fake-quant
path, not fused into a 4-bit kernel.
"""

from __future__ import annotations

import dataclasses

import qdiff
from baselines import smoothquant
from bench.methods import RecipeMethod
from bench.registry import METHODS
from bench.spec import Bits

RANK = 32


def recipe(bits: Bits) -> qdiff.QConfig:
    """SmoothQuant's recipe (same α, grids, calibration) plus the low-rank branch."""
    recipe = smoothquant.recipe(bits)
    return dataclasses.replace(recipe, transforms=(*recipe.transforms, qdiff.LowRank(RANK)))


METHOD = METHODS.add(
    RecipeMethod(
        "svdquant",
        f"SVDQuant: smoothing + rank-{RANK} 16-bit branch absorbing outliers, residual quantized",
        recipe,
        needs_act_quant=True,
    )
)
