"""Uniform affine fake quantization, its range search, AdaRound and LSQ step sizes.

Grid conventions follow ``torch.fake_quantize_per_*_affine``: asymmetric grids are unsigned
``[0, 2^b - 1]`` with an integer zero point, symmetric grids are signed
``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0. The observed range is always widened to contain
0 so that zero (padding, ReLU/SiLU floors) is exactly representable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qdiff.config import QuantSpec

# Clipping ratios tried by the ``mse`` search: 1.00, 0.99, ..., 0.21 of the observed range, as in
# the BRECQ / Q-Diffusion reference code.
MSE_SEARCH_STEPS = 80


class _RoundSTE(torch.autograd.Function):
    # A Function rather than ``(x.round() - x).detach() + x``: that sum is off the integer by
    # float round-off, so values rounded onto the grid's ends would test as outside it.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(x)


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point whose grid covers ``[lo, hi]`` (widened to contain 0)."""
    qmin, qmax = grid(bits, symmetric)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=tiny)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=tiny)
    zero_point = (qmin - lo / scale).round().clamp(qmin, qmax)
    return scale, zero_point


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through estimator for the rounding.

    Gradients reach ``x`` inside the grid and ``scale`` everywhere (the LSQ gradient).
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # Inference: the same arithmetic in place, without the autograd plumbing (≈10× faster
        # on CPU; sampling a quantized model spends most of its time here otherwise).
        return (x / scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    q = round_ste(x / scale) + zero_point
    # Explicit mask: ``clamp``'s backward also drops the gradient of values exactly on the grid's
    # ends, while torch's fake-quant ops (and LSQ) keep it.
    q = torch.where((q >= qmin) & (q <= qmax), q, q.detach().clamp(qmin, qmax))
    return (q - zero_point) * scale


def search_range(
    x: torch.Tensor, spec: QuantSpec, channel_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) range to quantize ``x`` with, per channel or per tensor.

    ``minmax`` returns the observed range; ``mse`` shrinks it by each of 80 clipping ratios and
    keeps, per channel, the one with the lowest Lp error (p = ``spec.p``).
    """
    flat = x.detach().float()
    flat = flat.reshape(1, -1) if channel_dim is None else flat.movedim(channel_dim, 0).flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    if spec.scale_search == "minmax":
        return lo, hi
    qmin, qmax = grid(spec.bits, spec.symmetric)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(MSE_SEARCH_STEPS):
        ratio = 1.0 - 0.01 * i
        cand_lo, cand_hi = lo * ratio, hi * ratio
        scale, zp = scale_zero_point(cand_lo, cand_hi, spec.bits, spec.symmetric)
        xq = fake_quant(flat, scale[:, None], zp[:, None], qmin, qmax)
        err = (flat - xq).abs().pow(spec.p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


class UniformAffineQuantizer(nn.Module):
    """Fake quantizer with a fixed integer grid and a (optionally learnable) step size.

    The step size ``scale`` is an ``nn.Parameter``; it is frozen except while LSQ reconstruction
    trains it. The quantizer must be initialised explicitly with :meth:`init_from` or
    :meth:`set_range`: an uninitialised quantizer refuses to run rather than guessing.

    Args:
        spec: bit width, symmetry, granularity and range search.
        channel_dim: dimension that holds output channels, for ``granularity='channel'``.
        ndim: rank of the tensors this quantizer will see (to shape per-channel parameters).
    """

    def __init__(self, spec: QuantSpec, channel_dim: int = 0, ndim: int = 4) -> None:
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = grid(spec.bits, spec.symmetric)
        self.channel_dim = channel_dim if spec.granularity == "channel" else None
        self.ndim = ndim
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        # While LSQ learns the step size it does so in log space (``learn_log_scale``): a step
        # of the optimiser then changes the scale by the same *relative* amount whatever its
        # magnitude, so one learning rate suits 4-bit and 8-bit grids and every layer alike.
        self.log_scale: nn.Parameter | None = None
        # Set only through ``observe`` (by ``qdiff.calibrate``): while set, the quantizer reports
        # its input to the observer and passes it through unchanged.
        self.observer: Callable[[torch.Tensor], None] | None = None

    def observe(self, observer: Callable[[torch.Tensor], None]) -> _Observing:
        """Report inputs to ``observer`` (and pass them through) until the handle's ``remove``."""
        self.observer = observer
        return _Observing(self)

    def _shape(self, v: torch.Tensor) -> torch.Tensor:
        if self.channel_dim is None:
            return v.reshape(())
        shape = [1] * self.ndim
        shape[self.channel_dim] = -1
        return v.reshape(shape)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = scale_zero_point(lo.float(), hi.float(), self.spec.bits, self.spec.symmetric)
        self.scale.data = self._shape(scale).to(self.scale.device)
        self.zero_point = self._shape(zp).to(self.scale.device)
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the grid from a tensor (a weight, or a sample of activations)."""
        self.set_range(*search_range(x, self.spec, self.channel_dim))

    def learn_log_scale(self) -> nn.Parameter:
        """Start learning the step size as ``exp(log_scale)``; returns the parameter to train."""
        self.log_scale = nn.Parameter(self.scale.detach().log())
        return self.log_scale

    @torch.no_grad()
    def freeze_scale(self, scale: torch.Tensor | None = None) -> None:
        """Stop learning: keep the learned step size (or set ``scale``, e.g. to revert)."""
        learned = self.log_scale.detach().exp() if self.log_scale is not None else self.scale.detach()
        self.scale.data = (learned if scale is None else scale).clone()
        self.log_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        # (Not under torch.compile: reading a tensor's truth value breaks the graph, and frozen
        # weights across graph breaks miscompiled; a compiled model was run eagerly first.)
        if not torch.compiler.is_compiling() and not self.initialized:
            raise RuntimeError("quantizer used before calibration; run qdiff.calibrate(model, data) first")
        scale = self.scale if self.log_scale is None else self.log_scale.exp()
        return fake_quant(x, scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, {s.granularity}, {s.scale_search}"


# AdaRound's rectified sigmoid stretch (Nagel et al. 2020, Eq. 23).
ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    """Learned up/down rounding of a weight on a fixed grid (Nagel et al., ICML 2020).

    ``h(V) = clip(sigmoid(V)·(ζ−γ) + γ, 0, 1)`` replaces the rounding residual; ``V`` starts where
    ``h`` equals the residual of nearest rounding, so training starts from round-to-nearest.
    After :meth:`harden` the rounding is binary (``V >= 0`` rounds up).

    Args:
        base: an initialised quantizer whose grid (scale, zero point) is kept.
        weight: the FP weight slice this quantizer rounds.
    """

    def __init__(self, base: UniformAffineQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if not base.initialized:
            raise RuntimeError("AdaRound needs an initialised base quantizer")
        self.base = base
        w = weight.detach() / base.scale.detach()
        residual = (w - w.floor()).clamp(1e-4, 1 - 1e-4)
        # Inverse of the rectified sigmoid at the residual.
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (residual - GAMMA) - 1))
        self.register_buffer("hard", torch.tensor(False, device=weight.device))
        # Hardened, the initial logits round to nearest (α ≥ 0 ⟺ residual ≥ ½): what a unit
        # reverts to when its learned rounding does worse (``reset``).
        self._alpha0 = self.alpha.detach().clone()

    def soft_rounding(self) -> torch.Tensor:
        """h(α), the rectified sigmoid."""
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def rounding(self) -> torch.Tensor:
        if self.hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return self.soft_rounding()

    def regularizer(self, beta: float) -> torch.Tensor:
        """Σ 1 − |2h − 1|^β: pushes every h to 0 or 1 as β is annealed down."""
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()

    def undecided(self) -> tuple[int, int]:
        """``(undecided, total)``: roundings whose soft value h lies strictly inside (0, 1), i.e.
        |α| below ≈ 2.4, which hardening would decide by the sign of α alone."""
        with torch.no_grad():
            h = self.soft_rounding()
            return int(((h > 0) & (h < 1)).sum()), h.numel()

    def harden(self) -> None:
        self.hard.fill_(True)
        self.alpha.requires_grad_(False)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to round-to-nearest, hardened."""
        self.alpha.copy_(self._alpha0)
        self.harden()

    def soften(self) -> None:
        self.hard.fill_(False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = self.base
        q = ((w / b.scale).floor() + self.rounding() + b.zero_point).clamp(b.qmin, b.qmax)
        return (q - b.zero_point) * b.scale


class _Observing:
    """The handle :meth:`UniformAffineQuantizer.observe` returns (as torch's hook handles)."""

    def __init__(self, quantizer: UniformAffineQuantizer) -> None:
        self.quantizer = quantizer

    def remove(self) -> None:
        self.quantizer.observer = None
