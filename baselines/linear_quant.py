"""Naive linear PTQ: the "traditional PTQ" row of Q-Diffusion's tables.

Min-max ranges (per output channel for weights, per tensor for activations), calibrated only on
the last denoising steps, no split of skip concatenations, no reconstruction. Everything else
(grids, layers covered, calibration size) matches Q-Diffusion, so the comparison isolates the
method's choices.
"""

from __future__ import annotations

import qdiff
from bench.methods import RecipeMethod, quant_specs, symmetric_attention
from bench.registry import METHODS
from bench.spec import Bits


def recipe(bits: Bits) -> qdiff.QConfig:
    return qdiff.QConfig(
        **quant_specs(bits, "minmax"),
        split_shortcut=False,
        calib=qdiff.CalibConfig(strategy="final"),
        recon=qdiff.ReconConfig(method="none"),
    )


METHOD = METHODS.add(RecipeMethod("linear", "naive linear PTQ: min-max, final-step calibration", recipe))
SYMATTN = METHODS.add(symmetric_attention(METHOD))
