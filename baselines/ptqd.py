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

Step-aware mixed precision (Sec. 4.3), registered as ``ptqd-mp``: quantization noise matters
less where the denoiser's input is mostly noise. For each calibrated timestep the corrected
model with ``LOW_BITS`` (4-bit) activations is used where its quantization SNR,
``‖ε‖² / ‖ε̂_low − ε‖²`` on that step's calibration inputs, is at least the diffusion SNR of the
input, ``ᾱ_t / (1 − ᾱ_t)``, and the run's own activation bits elsewhere (:func:`choose_steps`).
Both models are Q-Diffusion's (the runner reuses the ``qdiff`` WxAy and WxA4 checkpoints) and
each gets its own correction. Deviation: this exact criterion is our reading of the paper's
comparison of the quantization noise with the diffusion noise at each step; the measured SNRs
are kept on the model (``snr_quant``, ``snr_diffusion``, ``use_low``). The correction is fitted
on each bit width's own model, so a WxA32 run fits its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import qdiff
from bench.methods import Calibration, RecipeMethod, qdiffusion_recipe
from bench.registry import METHODS
from bench.spec import Bits

FIT_BATCH = 64
LOW_BITS = 4  # the low activation bit width of step-aware mixed precision


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
        # Imported here: diffusers' torch utilities load torch._dynamo (seconds and 160 MB),
        # which listing the registered methods (a report) does not need.
        from diffusers.utils.torch_utils import randn_tensor

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


class StepMixed(nn.Module):
    """PTQD's step-aware mixed precision: two corrected models with the same weights, one with
    high-bit and one with low-bit activations, and per calibrated timestep which one runs.

    Buffers, per calibrated timestep of ``high`` (the same as ``low``'s): ``use_low``, and the
    measurements behind the choice, ``snr_quant`` and ``snr_diffusion``.
    """

    def __init__(
        self,
        high: NoiseCorrected,
        low: NoiseCorrected,
        snr_quant: torch.Tensor,
        snr_diffusion: torch.Tensor,
    ):
        super().__init__()
        self.high, self.low = high, low
        self.register_buffer("snr_quant", snr_quant.float())
        self.register_buffer("snr_diffusion", snr_diffusion.float())
        self.register_buffer("use_low", snr_quant >= snr_diffusion)

    def _low(self, t: torch.Tensor) -> torch.Tensor:
        return self.use_low[self.high.nearest(t)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        t = t.expand(len(x)) if t.ndim == 0 else t
        low = self._low(t)
        if low.all():
            return self.low(x, t, **kwargs)
        if not low.any():
            return self.high(x, t, **kwargs)
        # A batch mixing timesteps (the sampler never makes one): each sample through its model.
        parts = {}
        for flag, model in ((True, self.low), (False, self.high)):
            index = (low == flag).nonzero().flatten()
            sub = {k: v[index] if torch.is_tensor(v) and len(v) == len(x) else v for k, v in kwargs.items()}
            parts[flag] = (index, model(x[index], t[index], **sub))
        out = parts[True][1]
        sample = torch.empty(
            (len(x), *out.sample.shape[1:]), dtype=out.sample.dtype, device=out.sample.device
        )
        for index, result in parts.values():
            sample[index] = result.sample
        return type(out)(sample=sample)

    def variance_noise(
        self, scheduler, t: torch.Tensor, eps: torch.Tensor, eta: float, generator
    ) -> torch.Tensor:
        model = self.low if self._low(t.reshape(1))[0] else self.high
        return model.variance_noise(scheduler, t, eps, eta, generator)


@torch.no_grad()
def choose_steps(
    fp: nn.Module,
    high: NoiseCorrected,
    low: NoiseCorrected,
    calib: qdiff.CalibData,
    alphas_cumprod: torch.Tensor,
) -> StepMixed:
    """Low-bit activations at the calibrated timesteps where the corrected low-bit model's
    quantization SNR, ``‖ε‖² / ‖ε̂_low − ε‖²``, is at least the diffusion SNR of the input,
    ``ᾱ_t / (1 − ᾱ_t)``: early in denoising the input is mostly noise and tolerates the larger
    quantization error; late, it does not."""
    snr_quant, snr_diffusion = [], []
    for t in high.timesteps.long():  # the calibrated timesteps, as fit_correction found them
        signal = error = 0.0
        for chunk in (calib.t == t).nonzero().flatten().split(FIT_BATCH):
            x, tt, cond = calib.select(chunk)
            eps = fp(x, tt, **cond).sample.double()
            signal += eps.square().sum().item()
            error += (low(x, tt, **cond).sample.double() - eps).square().sum().item()
        snr_quant.append(signal / error if error > 0 else math.inf)
        a = alphas_cumprod[int(t)].item()
        snr_diffusion.append(a / (1 - a))
    return StepMixed(high, low, torch.tensor(snr_quant), torch.tensor(snr_diffusion))


@dataclass(frozen=True)
class PTQD(RecipeMethod):
    """Q-Diffusion's quantized model followed by PTQD's noise correction."""

    def bases(self, bits: Bits) -> tuple[tuple[str, Bits], ...]:
        return (("qdiff", bits),)  # the same quantized model: the runner reuses qdiff's

    def quantize(self, denoiser, config, calibration, progress=None):
        raise TypeError(f"{self.name} refines qdiff's quantized model: call refine with it")

    def refine(
        self,
        denoiser: nn.Module,
        qmodels: list[nn.Module],
        config: qdiff.QConfig,
        calibration: Calibration,
        alphas_cumprod: torch.Tensor,
    ) -> nn.Module:
        return fit_correction(denoiser, qmodels[0], calibration(config.calib))


@dataclass(frozen=True)
class PTQDMixed(PTQD):
    """PTQD with step-aware mixed precision between the run's activation bits and ``LOW_BITS``."""

    def unsupported(self, bits: Bits) -> str | None:
        if bits.a is None or bits.a <= LOW_BITS:
            return f"{self.name} mixes A{LOW_BITS} with more activation bits per step; use W{bits.w}A8"
        return super().unsupported(bits)

    def bases(self, bits: Bits) -> tuple[tuple[str, Bits], ...]:
        return (("qdiff", bits), ("qdiff", Bits(bits.w, LOW_BITS)))

    def refine(self, denoiser, qmodels, config, calibration, alphas_cumprod) -> nn.Module:
        calib = calibration(config.calib)
        high, low = (fit_correction(denoiser, q, calib) for q in qmodels)
        share_equal_tensors(high, low)
        return choose_steps(denoiser, high, low, calib, alphas_cumprod)


def share_equal_tensors(keep: nn.Module, other: nn.Module) -> int:
    """Point ``other``'s parameters and buffers at ``keep``'s where they are equal (the two
    models of mixed precision share their weight phase), so the pair stores them once; returns
    how many were shared."""
    kept = {**dict(keep.named_parameters()), **dict(keep.named_buffers())}
    shared = 0
    for name, tensor in [*other.named_parameters(), *other.named_buffers()]:
        source = kept.get(name)
        if (
            source is None
            or source is tensor
            or source.shape != tensor.shape
            or not torch.equal(source, tensor)
        ):
            continue
        owner, _, attr = name.rpartition(".")
        module = other.get_submodule(owner)
        table = module._parameters if attr in module._parameters else module._buffers
        table[attr] = source
        shared += 1
    return shared


# Its correction and its mixed precision are defined by a DDPM step's noise schedule (ᾱ_t, the
# variance a stochastic step adds), which a rectified flow (SD3, FLUX) does not have.
DDPM_ONLY = "its noise correction and step choice are defined by a DDPM noise schedule (ᾱ_t)"
METHOD = METHODS.add(
    PTQD(
        "ptqd",
        "PTQD: Q-Diffusion + correlated quantization-noise correction per timestep",
        qdiffusion_recipe,
        ddpm_only=DDPM_ONLY,
    )
)
MIXED = METHODS.add(
    PTQDMixed(
        "ptqd-mp",
        f"PTQD + step-aware mixed precision (A{LOW_BITS} where the quantization SNR allows)",
        qdiffusion_recipe,
        ddpm_only=DDPM_ONLY,
    )
)
