"""PTQD (He et al., "PTQD: Accurate Post-Training Quantization for Diffusion Models", NeurIPS 2023):
correlated-noise correction of the quantized noise prediction.

PTQD models the quantized denoiser's output as the FP output plus noise, and splits the noise
into a part linearly correlated with the FP output and an uncorrelated residual (Sec. 4.1):

    ε_q(x, t) = (1 + k_t) · ε(x, t) + r_t,     k_t = ⟨ε_q − ε, ε⟩ / ⟨ε, ε⟩

``k_t`` is fitted per timestep by least squares on the calibration inputs; the correlated part
is removed by rescaling, ``ε̂ = ε_q / (1 + k_t)`` (Eq. 9), leaving a residual of variance
``σ²_r,t / (1 + k_t)²`` (recorded per timestep on the model). Quantization is Q-Diffusion's
recipe, so PTQD differs from ``qdiff`` by the correction alone. Timesteps the calibration did
not see use the nearest calibrated one.

Deviations, and what is not implemented: PTQD also folds the residual's variance into a
stochastic sampler's noise schedule (Sec. 4.2, "variance schedule calibration"); with the
suite's deterministic DDIM (η = 0) no noise is added, so there is nothing to fold it into, and it
is not implemented. Its step-aware mixed precision (activation bit width chosen per step) is
not implemented either. The correction is fitted on the W+A model, so a WxA32 run fits its own
rather than reusing a WxA8 run's weight phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import qdiff
from bench.methods import Calibration, RecipeMethod, qdiffusion_recipe

FIT_BATCH = 64


class NoiseCorrected(nn.Module):
    """A quantized denoiser whose noise prediction is divided by ``1 + k_t``.

    Buffers: ``timesteps`` (calibrated, ascending), ``k`` and ``residual_var`` per timestep.
    """

    def __init__(
        self, model: nn.Module, timesteps: torch.Tensor, k: torch.Tensor, residual_var: torch.Tensor
    ):
        super().__init__()
        self.model = model
        self.register_buffer("timesteps", timesteps.float())
        self.register_buffer("k", k.float())
        self.register_buffer("residual_var", residual_var.float())

    def k_at(self, t: torch.Tensor) -> torch.Tensor:
        """``k`` of the calibrated timestep nearest to each entry of ``t``."""
        t = t.reshape(-1).float().to(self.timesteps.device)
        nearest = (t[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)
        return self.k[nearest]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        out = self.model(x, t, **kwargs)
        k = self.k_at(t.expand(len(x)) if t.ndim == 0 else t).to(out.sample.dtype)
        corrected = out.sample / (1 + k).view(-1, *[1] * (out.sample.ndim - 1))
        return type(out)(sample=corrected)


@torch.no_grad()
def fit_correction(fp: nn.Module, qmodel: nn.Module, calib: qdiff.CalibData) -> NoiseCorrected:
    """Least-squares ``k_t`` and residual variance per calibration timestep (PTQD Eq. 8)."""
    timesteps = calib.t.unique().sort().values
    k, residual_var = [], []
    for t in timesteps:
        index = (calib.t == t).nonzero().flatten()
        dot = norm = 0.0
        pairs = []
        for chunk in index.split(FIT_BATCH):
            x, tt, cond = calib.select(chunk)
            eps, eps_q = fp(x, tt, **cond).sample.double(), qmodel(x, tt, **cond).sample.double()
            dot += ((eps_q - eps) * eps).sum().item()
            norm += (eps * eps).sum().item()
            pairs.append((eps, eps_q))
        k_t = dot / norm if norm > 0 else 0.0
        residual = torch.cat([(eq - (1 + k_t) * e).flatten() for e, eq in pairs])
        k.append(k_t)
        residual_var.append(residual.var().item())
    return NoiseCorrected(qmodel, timesteps, torch.tensor(k), torch.tensor(residual_var))


@dataclass(frozen=True)
class PTQD(RecipeMethod):
    """Q-Diffusion's quantization followed by PTQD's correlated-noise correction."""

    shares_weight_phase: ClassVar[bool] = False  # the correction is fitted to the W+A model
    builds_on: ClassVar[str] = "qdiff"  # the same quantized model: the runner reuses qdiff's

    def refine(
        self, denoiser: nn.Module, qmodel: nn.Module, config: qdiff.QConfig, calibration: Calibration
    ) -> nn.Module:
        return fit_correction(denoiser, qmodel, calibration(config.calib))


METHOD = PTQD(
    "ptqd", "PTQD: Q-Diffusion + correlated quantization-noise correction per timestep", qdiffusion_recipe
)
