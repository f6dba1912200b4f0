"""PTQD (He et al., "PTQD: Accurate Post-Training Quantization for Diffusion Models", NeurIPS 2023):
correction of the quantization noise in the noise prediction.

PTQD models the quantized denoiser's output as the FP output plus noise, and splits the noise
into a part linearly correlated with the FP output and an uncorrelated residual (Sec. 4.1):

    ε_q(x, t) = (1 + k_t) · ε(x, t) + μ_t + r_t,     k_t = ⟨ε_q − ε, ε⟩ / ⟨ε, ε⟩

``k_t`` is fitted per timestep by least squares on the calibration inputs, ``μ_t`` is the
residual's mean per output channel (its bias) and ``σ²_t`` the variance of the zero-mean rest
``r_t``. The correction (Sec. 4.1–4.2) removes the correlated part and the bias:

    ε̂ = (ε_q − μ_t) / (1 + k_t) = ε + r_t / (1 + k_t)

What is left, ``r_t / (1 + k_t)``, is treated as Gaussian noise of variance
``σ²_t / (1 + k_t)²``. A stochastic sampler already adds noise of variance ``σ_η,t²`` per step
(DDIM with η > 0), and the residual reaches ``x_{t−1}`` through the coefficient of ε,
``c_t = √(1 − ᾱ_{t−1} − σ_η,t²) − √ᾱ_{t−1} √(1 − ᾱ_t) / √ᾱ_t``; PTQD's variance schedule
calibration lowers the added noise so the total matches the schedule (Eq. 13, DDIM form):

    σ'_t² = max(σ_η,t² − c_t² σ²_t / (1 + k_t)², 0)

(:meth:`NoiseCorrected.variance_noise`, which the suite's sampler calls). With deterministic
DDIM (η = 0, the suite's default) nothing is added, so there is nothing to fold and only the
mean correction applies. Quantization is Q-Diffusion's recipe (the runner reuses the ``qdiff``
checkpoint), so PTQD differs from ``qdiff`` by the correction alone. Timesteps the calibration
did not see use the nearest calibrated one.

Not implemented (a documented gap, not a silent one): PTQD's step-aware mixed precision, which
picks a lower activation bit width for the denoising steps whose quantization noise stays
below the diffusion noise. The correction is fitted on each bit width's own model, so a WxA32
run fits its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

import qdiff
from bench.methods import Calibration, RecipeMethod, qdiffusion_recipe

FIT_BATCH = 64


class NoiseCorrected(nn.Module):
    """A quantized denoiser whose noise prediction is corrected to ``(ε_q − μ_t) / (1 + k_t)``.

    Buffers: ``timesteps`` (calibrated, ascending); per timestep ``k``, ``bias`` (one value per
    output channel) and ``residual_var`` (variance of the residual before rescaling).
    """

    def __init__(
        self,
        model: nn.Module,
        timesteps: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor,
        residual_var: torch.Tensor,
    ):
        super().__init__()
        self.model = model
        self.register_buffer("timesteps", timesteps.float())
        self.register_buffer("k", k.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("residual_var", residual_var.float())

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the calibrated timestep nearest to each entry of ``t``."""
        t = t.reshape(-1).float().to(self.timesteps.device)
        return (t[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        out = self.model(x, t, **kwargs)
        eps = out.sample
        index = self.nearest(t.expand(len(x)) if t.ndim == 0 else t)
        shape = (len(eps), -1, *[1] * (eps.ndim - 2))  # per sample, per channel
        k = self.k[index].to(eps.dtype).view(len(eps), *[1] * (eps.ndim - 1))
        bias = self.bias[index].to(eps.dtype).view(shape)
        return type(out)(sample=(eps - bias) / (1 + k))

    def variance_noise(
        self, scheduler, t: torch.Tensor, eps: torch.Tensor, eta: float, generator
    ) -> torch.Tensor:
        """The noise a DDIM step with ``eta`` > 0 should add, scaled so that it plus the
        corrected prediction's residual has the schedule's variance (PTQD's variance schedule
        calibration). Drawn from ``generator`` as the scheduler itself would draw it, so an FP
        run on the same seed gets the same unscaled noise."""
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"PTQD's variance folding needs an epsilon-prediction model, not "
                             f"{scheduler.config.prediction_type!r}")  # fmt: skip
        step = int(t)
        prev = step - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[step].item()
        a_prev = scheduler.alphas_cumprod[prev].item() if prev >= 0 else float(scheduler.final_alpha_cumprod)
        sigma2 = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        c = math.sqrt(max(1 - a_prev - sigma2, 0.0)) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
        i = self.nearest(t.reshape(1))[0]
        residual = self.residual_var[i].item() / (1 + self.k[i].item()) ** 2
        scale = math.sqrt(max(sigma2 - c**2 * residual, 0.0) / sigma2) if sigma2 > 0 else 0.0
        noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        return noise * scale


@torch.no_grad()
def fit_correction(fp: nn.Module, qmodel: nn.Module, calib: qdiff.CalibData) -> NoiseCorrected:
    """Least-squares ``k_t`` (PTQD Eq. 8), the residual's per-channel mean and its variance, per
    calibration timestep."""
    timesteps = calib.t.unique().sort().values
    k, bias, residual_var = [], [], []
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
        residual = torch.cat([eq - (1 + k_t) * e for e, eq in pairs])
        dims = [d for d in range(residual.ndim) if d != 1]  # all but the channel dimension
        mean = residual.mean(dim=dims)
        k.append(k_t)
        bias.append(mean)
        residual_var.append((residual - mean.view(1, -1, *[1] * (residual.ndim - 2))).var().item())
    return NoiseCorrected(qmodel, timesteps, torch.tensor(k), torch.stack(bias), torch.tensor(residual_var))


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
