"""Metrics the runner computes on every run, registered in ``bench.registry.METRICS``.

A metric is called with an :class:`EvalContext` (the run, its images, the paired FP images) and
returns a :class:`Measurement`, or ``None`` where it does not apply (e.g. a paired metric on the
FP run itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class EvalContext:
    """What a metric may look at for one run.

    Args:
        spec: the run (a :class:`bench.matrix.RunSpec`).
        adapter: the model adapter that produced the images.
        images: uint8 NCHW samples of this run.
        fp_images: the paired FP samples (same seeds, prompts, sampler); ``None`` for the FP run.
        quantize_s: seconds the method took to quantize (``None`` for the FP run).
        quantize_cached: whether the quantized checkpoint came from the cache.
    """

    spec: Any
    adapter: Any
    images: torch.Tensor
    fp_images: torch.Tensor | None
    quantize_s: float | None = None
    quantize_cached: bool = False


@dataclass(frozen=True)
class Measurement:
    value: float
    extra: dict[str, Any] = field(default_factory=dict)


class Metric(Protocol):
    name: str
    unit: str
    higher_is_better: bool
    models: tuple[str, ...] | None  # the models it works for; None: any
    kind: str  # "quality" (of the images) or "cost" (time, memory, size)
    quantized_only: bool  # measures the quantization itself: no row for the FP run

    def __call__(self, ctx: EvalContext) -> Measurement | None: ...


@dataclass(frozen=True)
class DigitsFD:
    """Fréchet distance of generated digits to real ones in the embedded classifier's features.

    The FP run's row also carries the real-vs-real floor at the same sample count (mean ± sd
    over 5 draws of held-apart real digits): no generator can be expected to score below it.
    """

    name: str = "digits_fd"
    unit: str = "fd"
    higher_is_better: bool = False
    models: tuple[str, ...] | None = ("embedded-digits",)
    kind: str = "quality"
    quantized_only: bool = False

    def __call__(self, ctx: EvalContext) -> Measurement:
        value = ctx.adapter.frechet(ctx.images)
        if ctx.fp_images is not None:
            return Measurement(value)
        floor, floor_sd = ctx.adapter.real_floor(len(ctx.images))
        return Measurement(value, {"floor": floor, "floor_sd": floor_sd})


MAX_PSNR_DB = 100.0  # reported for images identical to FP (the PSNR of zero error is infinite)


@dataclass(frozen=True)
class PSNRvsFP:
    """PSNR (dB) of the quantized run's images against the FP images from the same noise: a
    paired, reference-free measure of how far quantization moved each sample. Computed from the
    mean squared error over all pixels of all images, on 8-bit images."""

    name: str = "psnr_vs_fp"
    unit: str = "dB"
    higher_is_better: bool = True
    models: tuple[str, ...] | None = None
    kind: str = "quality"
    quantized_only: bool = True

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.fp_images is None:
            return None
        mse = (ctx.images.double() - ctx.fp_images.double()).square().mean().item()
        psnr = MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10 * math.log10(255.0**2 / mse))
        return Measurement(psnr)


@dataclass(frozen=True)
class QuantizeTime:
    """Wall seconds the method took to produce the quantized model (calibration data excluded:
    it is shared between methods). A checkpoint from the cache reports its original time; a
    WxA32 model that reuses a WxAy model's weight phase reports that model's time (the row's
    ``weights_from`` names it)."""

    name: str = "quantize_time"
    unit: str = "s"
    higher_is_better: bool = False
    models: tuple[str, ...] | None = None
    kind: str = "cost"
    quantized_only: bool = True

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.quantize_s is None:
            return None
        return Measurement(round(ctx.quantize_s, 3), {"cached": ctx.quantize_cached})


DIGITS_FD = DigitsFD()
PSNR_VS_FP = PSNRvsFP()
QUANTIZE_TIME = QuantizeTime()
