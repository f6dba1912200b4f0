"""PTQ4DM (Shang et al., "Post-training Quantization on Diffusion Models", CVPR 2023).

What distinguishes it: Normally Distributed Time-step Calibration (NDTC). Calibration inputs
come from timesteps drawn from a normal distribution over the denoising trajectory, placed
toward its end (small t), where the paper finds the activations that matter most for image
quality; the quantized model is then fitted with BRECQ block reconstruction. It predates
Q-Diffusion's split shortcut quantization, so skip concatenations share one input grid.

Implemented as a qdiff recipe (one implementation per algorithm: only the choices differ from
Q-Diffusion):

- calibration: ``CalibConfig(strategy="normal")``: K sampler steps at evenly spaced quantiles of
  N(μ, σ²) over denoising progress p ∈ [0, 1] (0 = pure noise, 1 = final image), with
  μ = 0.75, σ = 0.15 (t ≈ 0.25 T ± 0.15 T);
- reconstruction: BRECQ (AdaRound weights, then LSQ activation steps), MSE range search, the
  same grids as every method here;
- no split shortcut.

Deviations from the paper: PTQ4DM draws one random timestep per calibration image over the T
training timesteps; here K sampler steps are placed deterministically at the quantiles of the
same distribution and every one of N FP trajectories contributes an input at each, so the
calibration set has the paper's density over time with the harness's K × N size and no
sampling noise. The paper's μ and σ were chosen on its own models; they are
``CalibConfig.normal_mean`` / ``normal_std`` here.
"""

from __future__ import annotations

import qdiff
from bench.methods import RecipeMethod, quant_specs
from bench.registry import METHODS
from bench.spec import Bits

NORMAL_MEAN = 0.75  # denoising progress: the last quarter of the trajectory, t ≈ T/4
NORMAL_STD = 0.15


def recipe(bits: Bits) -> qdiff.QConfig:
    return qdiff.QConfig(
        **quant_specs(bits, "mse"),
        split_shortcut=False,
        calib=qdiff.CalibConfig(strategy="normal", normal_mean=NORMAL_MEAN, normal_std=NORMAL_STD),
        recon=qdiff.ReconConfig(method="brecq"),
    )


METHOD = METHODS.add(
    RecipeMethod("ptq4dm", "PTQ4DM: normally distributed timestep calibration + BRECQ, no split", recipe)
)
