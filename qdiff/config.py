"""Typed, frozen, validated configuration of a quantization recipe.

Every field is checked on construction so a bad recipe fails before any work starts, with a
message that names the field, the bad value and the valid choices. ``QConfig.to_yaml`` /
``QConfig.from_yaml`` round-trip exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from qdiff import validate
from qdiff.errors import QdiffError

GRANULARITIES = ("tensor", "channel")
SCALE_SEARCHES = ("minmax", "mse")
CALIB_STRATEGIES = ("uniform", "normal", "final")
RECON_METHODS = ("none", "brecq")
RECON_GRANULARITIES = ("block", "layer")
MIN_BITS, MAX_BITS = 2, 16


class ConfigError(QdiffError, ValueError):
    """A quantization config field has an invalid value."""


def _choice(owner: str, name: str, value: Any, valid: tuple[str, ...]) -> None:
    problem = validate.choice(value, valid)
    if problem:
        raise ConfigError(f"{owner}.{name}={value!r} {problem}")


def _positive(owner: str, name: str, value: float, allow_zero: bool = False) -> None:
    problem = validate.number(value, allow_zero=allow_zero)
    if problem:
        raise ConfigError(f"{owner}.{name}={value!r} {problem}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized.

    Args:
        bits: integer bit width, 2–16.
        symmetric: signed grid with zero point 0; otherwise an unsigned grid with a zero point.
        granularity: ``tensor`` (one scale) or ``channel`` (one scale per output channel;
            weights only).
        scale_search: ``minmax`` uses the observed range; ``mse`` grid-searches clipping ratios
            that minimise the Lp error (Q-Diffusion/BRECQ code: 80 candidates, p = 2.4).
        p: exponent of the Lp error in the ``mse`` search.
    """

    bits: int
    symmetric: bool = False
    granularity: str = "tensor"
    scale_search: str = "minmax"
    p: float = 2.4

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"QuantSpec.bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"QuantSpec.bits={self.bits} is out of range; use {MIN_BITS}–{MAX_BITS} bits "
                "(leave the spec out, i.e. None, for full precision)"
            )
        _choice("QuantSpec", "granularity", self.granularity, GRANULARITIES)
        _choice("QuantSpec", "scale_search", self.scale_search, SCALE_SEARCHES)
        _positive("QuantSpec", "p", self.p)


@dataclass(frozen=True)
class CalibConfig:
    """Which denoiser inputs (x_t, t, cond) from the FP sampler's trajectory calibrate the model.

    Args:
        strategy: ``uniform`` — Q-Diffusion's timestep-aware calibration, ``num_timesteps``
            steps spread evenly over the whole trajectory (paper Sec. 4.1); ``normal`` — PTQ4DM,
            steps placed at the quantiles of a normal distribution over denoising progress
            (0 = pure noise, 1 = final image) with ``normal_mean``/``normal_std``; ``final`` —
            the last ``num_timesteps`` steps only (the naive choice).
        num_timesteps: K, sampler steps recorded.
        samples_per_timestep: N, trajectories run (each contributes one input per step).
        seed: seed of the calibration trajectories (kept apart from evaluation seeds).

    The defaults are the paper's CIFAR-10 setting: 20 timesteps × 256 samples.
    """

    strategy: str = "uniform"
    num_timesteps: int = 20
    samples_per_timestep: int = 256
    normal_mean: float = 0.75
    normal_std: float = 0.15
    seed: int = 1000

    def __post_init__(self) -> None:
        _choice("CalibConfig", "strategy", self.strategy, CALIB_STRATEGIES)
        for name in ("num_timesteps", "samples_per_timestep"):
            _positive("CalibConfig", name, getattr(self, name))
        if not 0.0 <= self.normal_mean <= 1.0:
            raise ConfigError(f"CalibConfig.normal_mean={self.normal_mean} must be in [0, 1]")
        _positive("CalibConfig", "normal_std", self.normal_std)

    @property
    def size(self) -> int:
        return self.num_timesteps * self.samples_per_timestep


@dataclass(frozen=True)
class ReconConfig:
    """BRECQ-style reconstruction (Li et al., ICLR 2021) as used by Q-Diffusion.

    Weights are learned first with AdaRound (Nagel et al., ICML 2020) with activations in full
    precision, then activation step sizes with LSQ (Esser et al., ICLR 2020), each unit
    minimising the error between its output and the FP unit's output on calibration inputs.
    The defaults follow the Q-Diffusion code (20k / 5k iterations, Adam at a constant lr 1e-3
    for the rounding logits, batch 32); where this implementation differs on purpose, the
    field says so.

    Args:
        method: ``none`` or ``brecq``.
        granularity: ``block`` (ResNet block, attention/transformer block, up/down sampler;
            leftover layers one by one) or ``layer`` (every layer on its own).
        weight_iters / act_iters: optimisation steps per unit for each phase.
        weight_lr: Adam learning rate of the AdaRound logits, constant as in the reference
            code. Adam moves a logit by at most about ``weight_lr`` per step and a rounding is
            decided once |α| ≳ 2.4, so a budget decides its roundings only if
            ``weight_lr × weight_iters × (1 − warmup)`` is well above 2.4 (the reference:
            16); the share left undecided is reported per unit.
        act_lr: Adam learning rate of the log step sizes (a relative change per step; the
            reference learns the raw step size at 4e-4, whose relative effect depends on the
            layer's scale), cosine-decayed to 0 over ``act_iters``.
        batch_size: calibration inputs per optimisation step.
        round_weight: λ of the AdaRound rounding regulariser.
        beta_start / beta_end: annealing range of the regulariser's exponent.
        warmup: fraction of ``weight_iters`` without the regulariser.
        balance: weight each calibration input by 1 / (its timestep's mean starting loss),
            so every timestep counts equally; the reference pools them unweighted, which lets
            the low-noise steps (≈50× larger round-to-nearest error) dominate.
        holdout: share of each timestep's calibration inputs kept out of optimisation; a
            unit keeps its new rounding or step sizes only if its balanced loss on them
            improves (else it reverts), and the model's per-timestep ε error is measured on
            them before and after. 0 turns the guard off (the reference's behaviour).
        seed: seed of the held-out split and minibatch sampling.
    """

    method: str = "brecq"
    granularity: str = "block"
    weight_iters: int = 20000
    act_iters: int = 5000
    weight_lr: float = 1e-3
    act_lr: float = 1e-3
    batch_size: int = 32
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    balance: bool = True
    holdout: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("ReconConfig", "method", self.method, RECON_METHODS)
        _choice("ReconConfig", "granularity", self.granularity, RECON_GRANULARITIES)
        for name in ("weight_iters", "act_iters"):
            _positive("ReconConfig", name, getattr(self, name), allow_zero=True)
        for name in ("weight_lr", "act_lr", "batch_size", "beta_start", "beta_end"):
            _positive("ReconConfig", name, getattr(self, name))
        _positive("ReconConfig", "round_weight", self.round_weight, allow_zero=True)
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"ReconConfig.warmup={self.warmup} must be in [0, 1)")
        if not isinstance(self.balance, bool):
            raise ConfigError(f"ReconConfig.balance must be true or false, got {self.balance!r}")
        if not isinstance(self.holdout, int | float) or not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"ReconConfig.holdout={self.holdout!r} must be in [0, 1)")


@dataclass(frozen=True)
class QConfig:
    """A complete PTQ recipe.

    Args:
        weight: weight quantization, or None to keep FP weights.
        act: activation quantization (inputs of every quantized layer and of the attention
            matmuls), or None to keep FP activations.
        attn_probs: quantization of the softmax output before ``probs @ V``; None uses ``act``
            (Q-Diffusion keeps these at 16 bits for Stable Diffusion). Its grid always has zero
            point 0: probabilities are ≥ 0 and every range is widened to contain 0.
        attn_act: quantization of attention's Q, K and V (the matmul operands other than the
            probabilities); None uses ``act``. ``QuantSpec(8, symmetric=True)`` gives the grids
            OpenVINO fuses into one int8 attention kernel (its low-precision matmuls refuse an
            activation operand with a zero point); the paper's recipe keeps ``act``'s
            asymmetric grids.
        split_shortcut: separate quantizers for the decoder and skip halves of a UNet skip
            concatenation (Q-Diffusion Sec. 4.2).
        quantize_attention: quantize the Q·Kᵀ and softmax·V matmul inputs.
        first_last_bits: minimum bit width of the first and last layers (weights and inputs),
            the common PTQ practice of BRECQ/AdaRound that Q-Diffusion builds on: the UNet's
            ``conv_in`` sees the raw x_t and ``conv_out`` writes the predicted noise. None
            quantizes them like every other layer.
        transforms: algorithms that change what quantized layers compute, applied in order
            after ``prepare`` and before calibration (:mod:`qdiff.transforms`): e.g.
            ``(Smooth(0.5),)`` for SmoothQuant, ``(Smooth(0.5), LowRank(32))`` for SVDQuant.
        calib: calibration data recipe.
        recon: reconstruction recipe.
    """

    weight: QuantSpec | None = field(
        default_factory=lambda: QuantSpec(8, symmetric=True, granularity="channel")
    )
    act: QuantSpec | None = field(default_factory=lambda: QuantSpec(8))
    attn_probs: QuantSpec | None = None
    attn_act: QuantSpec | None = None
    split_shortcut: bool = True
    quantize_attention: bool = True
    first_last_bits: int | None = 8
    transforms: tuple[Any, ...] = ()  # of qdiff.transforms.base.Transform
    calib: CalibConfig = field(default_factory=CalibConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)

    def __post_init__(self) -> None:
        for name, kind in (
            ("weight", QuantSpec),
            ("act", QuantSpec),
            ("attn_probs", QuantSpec),
            ("attn_act", QuantSpec),
            ("calib", CalibConfig),
            ("recon", ReconConfig),
        ):
            value = getattr(self, name)
            if not (value is None and kind is QuantSpec) and not isinstance(value, kind):
                raise ConfigError(f"QConfig.{name} must be a {kind.__name__}, got {value!r}")
        for name in ("act", "attn_probs", "attn_act"):
            spec = getattr(self, name)
            if spec is not None and spec.granularity != "tensor":
                raise ConfigError(
                    f"QConfig.{name}.granularity must be 'tensor': a per-channel activation scale "
                    "cannot be folded into an integer matmul"
                )
        if self.first_last_bits is not None and (
            isinstance(self.first_last_bits, bool)
            or not isinstance(self.first_last_bits, int)
            or not MIN_BITS <= self.first_last_bits <= MAX_BITS
        ):
            raise ConfigError(
                f"QConfig.first_last_bits={self.first_last_bits!r} must be an integer in "
                f"{MIN_BITS}–{MAX_BITS}, or None"
            )
        if self.weight is None and self.act is None:
            raise ConfigError("QConfig quantizes nothing: set weight and/or act")
        if not isinstance(self.transforms, tuple) or not all(
            callable(getattr(t, "apply", None)) and hasattr(t, "kind") for t in self.transforms
        ):
            raise ConfigError(
                f"QConfig.transforms must be a tuple of qdiff transforms (e.g. (qdiff.Smooth(0.5),)), "
                f"got {self.transforms!r}"
            )

    @property
    def probs_spec(self) -> QuantSpec | None:
        return self.attn_probs if self.attn_probs is not None else self.act

    @property
    def qkv_spec(self) -> QuantSpec | None:
        return self.attn_act if self.attn_act is not None else self.act

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("weight", "act", "attn_probs", "attn_act", "calib", "recon"):
            out[name] = None if out[name] is None else dataclasses.asdict(out[name])
        out["transforms"] = [t.to_dict() for t in self.transforms]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a QConfig must be a mapping, got {type(data).__name__}")
        kinds = {
            "weight": QuantSpec,
            "act": QuantSpec,
            "attn_probs": QuantSpec,
            "attn_act": QuantSpec,
            "calib": CalibConfig,
            "recon": ReconConfig,
        }
        kwargs = {}
        for key, value in data.items():
            if key in kinds and isinstance(value, dict):
                value = _build(kinds[key], value, prefix=f"QConfig.{key}")
            if key == "transforms":
                value = tuple(_transform(t, i) for i, t in enumerate(value or ()))
            kwargs[key] = value
        return _build(cls, kwargs, prefix="QConfig")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> QConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"QConfig YAML does not parse: {exc}") from exc
        return cls.from_dict(data)


def _transform(data: Any, i: int) -> Any:
    """A transform from its ``{kind: ..., **fields}`` mapping."""
    from qdiff.transforms.base import transform_class

    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"QConfig.transforms[{i}] must be a mapping with 'kind', got {data!r}")
    fields = dict(data)
    try:
        kind = transform_class(fields.pop("kind"))
    except KeyError as exc:
        raise ConfigError(f"QConfig.transforms[{i}]: {exc.args[0]}") from None
    return _build(kind, fields, prefix=f"QConfig.transforms[{i}]")


def _build(kind: type, data: dict[str, Any], prefix: str) -> Any:
    valid = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{prefix}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return kind(**data)
