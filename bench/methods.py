"""PTQ methods as the harness sees them, and Q-Diffusion itself.

A method is a recipe: a function from bit widths to a :class:`qdiff.QConfig`. Methods that
differ from Q-Diffusion by one choice (calibration strategy, split, reconstruction) are that
choice in the recipe, run by the same ``qdiff.quantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

import qdiff
from bench.registry import METHODS
from bench.spec import Bits, Budget, ModelTraits
from qdiff.backends import layer_report


class MethodConfig(Protocol):
    """A method's full settings for one run: a frozen dataclass (hashed into cache keys) that
    serialises into the row's ``qconfig`` column."""

    def to_dict(self) -> dict[str, Any]: ...


Calibration = Callable[[qdiff.CalibConfig], qdiff.CalibData]


Progress = Callable[[int, int], None]  # (units done, units in all), e.g. reconstruction blocks


@runtime_checkable
class Method(Protocol):
    """What the harness needs from a PTQ method (registered in ``bench.registry.METHODS``);
    every member it reads is declared here. :class:`RecipeMethod` implements it for methods
    that are a qdiff recipe; ``tests/test_contracts.py`` runs every registered method through it.

    Attributes:
        name / description: the registered name and one line for listings.
        checkpointable: the quantized model pickles whole, so the runner caches it.
        backend: ``None`` when :meth:`deploy` builds the run's ``Budget.backend``; else the name
            of the kernels the method always deploys on (torchao presets: ``"torchao"``), so
            the matrix's backend axis and checks do not apply to it.
        runtime_reference: the method is a runtime's own PTQ path (NNCF on OpenVINO), the
            deployment a user would otherwise pick: the report reads every other cost cell of
            the same model, bits and machine also as a ratio to it.
    """

    name: str
    description: str
    checkpointable: bool
    backend: str | None
    runtime_reference: bool

    def unsupported(self, bits: Bits) -> str | None:
        """Why the method cannot run at ``bits`` (checked when a matrix loads), or None."""
        ...

    def unsupported_on(self, model: ModelTraits) -> str | None:
        """Why the method does not apply to a model with these traits (its architecture, whether
        it is a flow-matching model), or None; checked when a matrix loads."""
        ...

    def configure(self, bits: Bits, budget: Budget) -> MethodConfig:
        """The method's full settings for ``bits`` under the matrix's budget."""
        ...

    def bases(self, bits: Bits) -> tuple[tuple[str, Bits], ...]:
        """The ``(registered method, bits)`` whose quantized models this method refines (the
        first with this method's own configuration), or ``()`` for a method that quantizes by
        itself. The one way a run reuses another's model: the runner builds (or takes from
        the cache) the bases' checkpoints and calls :meth:`refine` instead of :meth:`quantize`,
        and schedules the run after its bases' runs."""
        ...

    def quantize(
        self,
        denoiser: nn.Module,
        config: MethodConfig,
        calibration: Calibration,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        """The quantized denoiser (``denoiser`` untouched) and what the method reports about
        its own work (the rows' ``recon`` column), or None. ``calibration`` gives calibration
        inputs (cached by the runner); call it only if the method uses any."""
        ...

    def refine(
        self,
        denoiser: nn.Module,
        bases: list[nn.Module],
        config: MethodConfig,
        calibration: Calibration,
        alphas_cumprod: torch.Tensor,
    ) -> nn.Module:
        """For a method with :meth:`bases`: its model made from theirs (copies it may change)."""
        ...

    def deploy(self, qmodel: nn.Module, backend: str) -> nn.Module:
        """What is sampled and timed: ``qmodel`` deployed on ``backend``."""
        ...

    def kernels(self, deployed: nn.Module) -> dict[str, int]:
        """How the deployed model's quantized layers run, ``{kernel: count}`` (the cost rows'
        ``backend_layers``); :func:`qdiff.backends.layer_report` for a qdiff-built model."""
        ...


@dataclass(frozen=True)
class RecipeMethod:
    """A PTQ method defined by its recipe; ``quantize`` runs qdiff's prepare/calibrate/reconstruct."""

    name: str
    description: str
    recipe: Callable[[Bits], qdiff.QConfig]
    weight_only: bool = False  # rejects bit widths that quantize activations
    needs_act_quant: bool = False  # rejects WxA32 (e.g. SmoothQuant: it smooths activations)
    # Why it means nothing on a transformer denoiser (no UNet skip concatenations), or "".
    unet_only: str = ""
    # Why it needs a DDPM noise schedule (no rectified flow), or "".
    ddpm_only: str = ""

    checkpointable: ClassVar[bool] = True
    backend: ClassVar[str | None] = None
    runtime_reference: ClassVar[bool] = False

    def unsupported(self, bits: Bits) -> str | None:
        if self.weight_only and bits.a is not None:
            return f"{self.name} quantizes weights only; use W{bits.w}A32"
        if self.needs_act_quant and bits.a is None:
            return f"{self.name} works on quantized activations; use W{bits.w}A8"
        return None

    def unsupported_on(self, model: ModelTraits) -> str | None:
        if self.unet_only and model.architecture != "unet":
            return f"{self.name} does not apply to a {model.architecture} denoiser: {self.unet_only}"
        if self.ddpm_only and model.flow_matching:
            return f"{self.name} does not apply to a flow-matching model: {self.ddpm_only}"
        return None

    def qconfig(self, bits: Bits) -> qdiff.QConfig:
        """The recipe at ``bits``, before a budget is applied."""
        return self.recipe(bits)

    def configure(self, bits: Bits, budget: Budget) -> qdiff.QConfig:
        return budget.apply(self.recipe(bits))

    def quantize(
        self,
        denoiser: nn.Module,
        config: qdiff.QConfig,
        calibration: Calibration,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        qmodel, result = qdiff.quantize(denoiser, config, calibration(config.calib), progress=progress)
        return qmodel, None if config.recon.method == "none" else result.summary()

    def refine(self, denoiser, bases, config, calibration, alphas_cumprod) -> nn.Module:
        raise TypeError(f"{self.name} quantizes by itself (no bases): call quantize")

    def kernels(self, deployed: nn.Module) -> dict[str, int]:
        return layer_report(deployed)

    def bases(self, bits: Bits) -> tuple[tuple[str, Bits], ...]:
        return ()

    def deploy(self, qmodel: nn.Module, backend: str) -> nn.Module:
        return qdiff.convert(qmodel, backend)


# The softmax probabilities' own bit width, as the official code's ``sm_abit`` (8 by default;
# it raises it to 16 for Stable Diffusion): 4-bit attention probabilities lose the small ones.
PROBS_BITS = 8


def quant_specs(bits: Bits, scale_search: str) -> dict[str, qdiff.QuantSpec | None]:
    """``weight``/``act``/``attn_probs`` specs shared by the methods: per-output-channel weight
    grids, asymmetric per-tensor activation grids, softmax probabilities at ≥ 8 bits.

    Weight grids are *symmetric* where the official code's are asymmetric: every integer
    kernel here (oneDNN's int8 convolutions, the Triton int8 and w4a16 kernels) takes weights
    with zero point 0, and a quality number should describe the model a backend deploys. The
    cost of that choice is measured in docs/results.md (``qdiff-asym``).
    """
    return {
        "weight": None if bits.w is None else qdiff.QuantSpec(bits.w, True, "channel", scale_search),
        "act": None if bits.a is None else qdiff.QuantSpec(bits.a, False, "tensor", scale_search),
        "attn_probs": None
        if bits.a is None
        else qdiff.QuantSpec(max(PROBS_BITS, bits.a), False, "tensor", scale_search),
    }


def qdiffusion_recipe(bits: Bits) -> qdiff.QConfig:
    """Q-Diffusion (Li et al., ICCV 2023): timestep-aware (uniform) calibration, split shortcut
    quantization, BRECQ with AdaRound weights and LSQ activation steps, MSE range search."""
    return qdiff.QConfig(
        **quant_specs(bits, "mse"),
        split_shortcut=True,
        calib=qdiff.CalibConfig(strategy="uniform"),
        recon=qdiff.ReconConfig(method="brecq"),
    )


QDIFFUSION = RecipeMethod(
    "qdiff", "Q-Diffusion: timestep-aware calibration + split shortcut + BRECQ", qdiffusion_recipe
)


def _ablation(name: str, what: str, **change) -> RecipeMethod:
    """Q-Diffusion with one of its choices undone (the paper's ablations, Sec. 5.3)."""

    def recipe(bits: Bits) -> qdiff.QConfig:
        return replace(qdiffusion_recipe(bits), **change)

    return RecipeMethod(name, f"Q-Diffusion without {what}", recipe)


# Without timestep-aware calibration: inputs from the final denoising steps only, as naive PTQ.
QDIFF_NO_CALIB = _ablation(
    "qdiff-no-calib",
    "timestep-aware calibration (final steps only)",
    calib=qdiff.CalibConfig(strategy="final"),
)
QDIFF_NO_SPLIT = replace(
    _ablation("qdiff-no-split", "split shortcut quantization", split_shortcut=False),
    unet_only="it undoes split shortcut quantization, which acts on UNet skip concatenations; a "
    "transformer has none, so it would equal qdiff",
)
QDIFF_NO_RECON = _ablation(
    "qdiff-no-recon", "BRECQ reconstruction (range search only)", recon=qdiff.ReconConfig(method="none")
)


def _asymmetric_weights(bits: Bits) -> qdiff.QConfig:
    """Q-Diffusion with the official code's asymmetric per-channel weight grids (simulated
    only: the integer backends here need symmetric weights)."""
    recipe = qdiffusion_recipe(bits)
    if recipe.weight is None:
        return recipe
    return replace(recipe, weight=replace(recipe.weight, symmetric=False))


QDIFF_ASYM = RecipeMethod(
    "qdiff-asym", "Q-Diffusion with asymmetric per-channel weight grids (official code)", _asymmetric_weights
)


def symmetric_attention(method: RecipeMethod) -> RecipeMethod:
    """``method`` with symmetric per-tensor grids on attention's Q, K and V (its activation
    bits and range search), the probabilities as before (zero point 0): the grids OpenVINO's CPU
    plugin runs as one int8 attention kernel (``QConfig.attn_act``), where the paper's
    asymmetric ones leave attention in f32. A variant of its own, so that its quality and its
    cost are measured on the same configuration (configs/attention-grids.yaml)."""

    def recipe(bits: Bits) -> qdiff.QConfig:
        config = method.recipe(bits)
        return replace(config, attn_act=replace(config.act, symmetric=True))

    return replace(
        method,
        name=f"{method.name}-symattn",
        description=f"{method.name} with symmetric Q/K/V grids (OpenVINO fuses its int8 attention)",
        recipe=recipe,
        needs_act_quant=True,
    )


QDIFF_SYMATTN = symmetric_attention(QDIFFUSION)


class FullPrecision:
    """The FP reference, registered so that matrices can name it; the runner samples the
    denoiser as it is and pairs every quantized run with it."""

    name = "fp"
    description = "full-precision reference (paired with every quantized run)"


FP = FullPrecision()

for _method in (FP, QDIFFUSION, QDIFF_NO_CALIB, QDIFF_NO_SPLIT, QDIFF_NO_RECON, QDIFF_ASYM, QDIFF_SYMATTN):
    METHODS.add(_method)
