"""The metric interface, and the metrics that need no external library.

A metric is called with an :class:`EvalContext` (the run, its images, the paired FP images, the
model that made them) and returns a :class:`Measurement`, or ``None`` where it does not apply
(e.g. a paired metric on the FP run itself). It raises
:class:`bench.errors.AvailabilityError` when this machine lacks what it needs (weights
offline): that metric's row is then ``skipped`` and the run's other metrics still count.
Metrics register in ``bench.registry.METRICS``; FID-family metrics live in
:mod:`bench.metrics.fid`, CLIP score in :mod:`bench.metrics.clip`, cost in :mod:`bench.metrics.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from bench import stats
from bench.errors import AvailabilityError
from bench.frechet import feature_stats, frechet_distance
from bench.registry import METRICS


@dataclass
class EvalContext:
    """What a metric may look at for one run.

    Args:
        spec: the run (a :class:`bench.spec.RunSpec`).
        adapter: the model adapter that produced the images.
        images: uint8 NCHW samples of this run (``None`` when no metric of the run needs them).
        fp_images: the paired FP samples (same seeds, prompts, sampler); ``None`` for the FP run.
        make_denoiser: builds the deployable denoiser that produced ``images`` (for cost
            metrics; built on first use of :attr:`denoiser`, as the samples may be cached).
        quantize_s: seconds the method took to quantize (``None`` for the FP run).
        quantize_cached: whether the quantized checkpoint came from the cache.
        make_simulated: builds the quantized model's simulation (fake quantization in floating
            point) that the deployable runs with real kernels; ``None`` for the FP run and for
            methods that quantize with another library (torchao, NNCF).
        quantize_peak_mib: the method's peak memory while quantizing (see ``QuantizePeakMemory``).
        memo: scratch space shared by this run's metrics (e.g. features FID and KID share).
    """

    spec: Any
    adapter: Any
    images: torch.Tensor | None
    fp_images: torch.Tensor | None
    make_denoiser: Callable[[], nn.Module] | None = None
    quantize_s: float | None = None
    quantize_cached: bool = False
    make_simulated: Callable[[], nn.Module] | None = None
    quantize_peak_mib: float | None = None
    memo: dict[Any, Any] = field(default_factory=dict)

    @cached_property
    def denoiser(self) -> nn.Module:
        if self.make_denoiser is None:
            raise ValueError(f"no denoiser was given for {self.spec.label}")
        return self.make_denoiser()


@dataclass(frozen=True)
class Measurement:
    value: float
    extra: dict[str, Any] = field(default_factory=dict)


def with_intervals(
    statistic: Callable[[np.ndarray, np.ndarray | None], float], n: int, paired: bool, extra=None
) -> Measurement:
    """A measurement with its bootstrap interval over the run's n images and, when ``paired``,
    the interval of its difference to the FP run from the same noise (same resampled indices).

    ``statistic(indices, None)`` is the run's value on those images, ``statistic(None, indices)``
    the FP run's (see :mod:`bench.stats`).
    """
    draws = stats.resample_indices(n)
    whole = np.arange(n)
    # Each resample's statistic once; the paired delta reuses it on the same indices.
    reps = np.array([statistic(idx, None) for idx in draws])
    value = stats.from_replicates(statistic(whole, None), reps)
    out = {**(extra or {}), **value.row(), "n_resamples": stats.N_RESAMPLES, "ci_level": stats.LEVEL,
           "ci_method": stats.METHOD}  # fmt: skip
    if paired:
        fp_reps = np.array([statistic(None, idx) for idx in draws])
        delta = stats.from_replicates(value.estimate - statistic(None, whole), reps - fp_reps)
        out.update({"delta": delta.estimate, **delta.row("delta_")})
    return Measurement(value.estimate, out)


class Work(NamedTuple):
    """Work a metric adds to a run, in the estimate's units: ``passes`` of the denoiser (at the
    FP model's measured seconds per image and step) and ``feature_images`` through Inception."""

    passes: float = 0.0
    feature_images: int = 0


class Metric:
    """Base class; subclasses set the class attributes and implement ``__call__``."""

    name: ClassVar[str]
    unit: ClassVar[str]
    higher_is_better: ClassVar[bool]
    # What a model must offer for this metric (``DiffusionAdapter.CAPABILITIES``), e.g.
    # ``text-to-image`` (prompts); empty: any model.
    requires: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "quality"  # "quality" (of the images) or "cost" (time, memory, size)
    quantized_only: ClassVar[bool] = False  # measures the quantization itself: no FP row
    # Compares a qdiff deployment with its simulation: the matrix leaves it out of runs that
    # have none (methods deploying themselves, torchao's and NNCF's) or deploy nothing (``fake``).
    needs_simulation: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ()  # the ``Evaluation`` fields it reads
    # Whether it reads the run's images; a run whose metrics all do not (step latency, weight
    # bytes, quantize time) generates none, which is what lets cost matrices on large
    # random-weight models skip sampling.
    needs_images: ClassVar[bool] = True
    # A cost of a real deployment, which the ``fake`` backend's simulation does not have (its
    # latency and memory are the simulation's): the report marks those cells and ranks none.
    real_kernels_only: ClassVar[bool] = False
    # A cost that includes the costs of the checkpoints a refining method starts from (its
    # ``bases``, the row's ``weights_from``): the report says so beside the value.
    includes_bases: ClassVar[bool] = False

    def check(self, evaluation) -> str | None:
        """Why ``evaluation`` cannot work for this metric (checked when a matrix loads)."""
        return None

    def work(self, spec) -> Work:
        """What measuring it adds to the run ``spec`` beyond sampling, for ``qdiff-bench
        validate``'s estimate (:mod:`bench.estimate`). The default, nothing: a value computed
        from the run's samples or models in well under a second."""
        return Work()

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        raise NotImplementedError


class CostMetric(Metric):
    """A cost (time, memory, size): lower is better."""

    higher_is_better = False
    kind = "cost"


class DigitsFD(Metric):
    """Fréchet distance of generated digits to real ones in the embedded classifier's features.

    Rows carry a bootstrap interval over the run's images and, for a quantized run, the paired
    difference to its FP run with its interval (:func:`with_intervals`). The FP run's row also
    carries the floor at the same sample count: what a perfect model of the training data
    scores (see :meth:`bench.models.embedded.EmbeddedDigits.real_floor`).
    """

    name = "digits_fd"
    unit = "fd"
    higher_is_better = False
    requires = frozenset({"digit-features"})

    def __call__(self, ctx: EvalContext) -> Measurement:
        adapter = ctx.adapter
        feats = adapter.features(ctx.images)
        fp_feats = None if ctx.fp_images is None else adapter.features(ctx.fp_images)

        def fd(idx, fp_idx):
            return adapter.frechet_features(feats[idx] if idx is not None else fp_feats[fp_idx])

        if fp_feats is not None:
            return with_intervals(fd, len(feats), paired=True)
        floor, floor_sd = adapter.real_floor(len(ctx.images))
        return with_intervals(fd, len(feats), paired=False, extra={"floor": floor, "floor_sd": floor_sd})


class FDtoFP(Metric):
    """Fréchet distance between the quantized run's samples and the FP samples from the same
    noise, in the embedded classifier's digit features: how far quantization moved the sample
    *distribution*, with no real data (the paired fidelity the field reports beside FID, e.g.
    SVDQuant's and MixDQ's FID to the 16-bit model's images). Unlike ``digits_fd`` it cannot
    come out better than FP by guidance or luck: 0 is the FP model itself. Interval: bootstrap
    over image pairs (each resample takes the same indices from both sets). On real models the
    same quantity in Inception features is ``fid_vs_fp`` (torch-fidelity or clean-fid)."""

    name = "fd_to_fp"
    unit = "fd"
    higher_is_better = False
    quantized_only = True
    requires = frozenset({"digit-features"})

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.fp_images is None:
            return None
        feats, fp_feats = ctx.adapter.features(ctx.images), ctx.adapter.features(ctx.fp_images)

        def fd(idx, _):
            return frechet_distance(*feature_stats(feats[idx]), *feature_stats(fp_feats[idx]))

        return with_intervals(fd, len(feats), paired=False)


class ClassAccuracy(Metric):
    """Class alignment of a class-conditional model: the share (%) of samples the committed
    digit classifier assigns to the class they were generated for — the offline analogue of
    CLIP score. Interval: bootstrap over the images; a quantized run also gets the paired
    difference to FP (same noise, same requested classes). The FP row records the classifier's
    own held-out accuracy: beyond about that level the metric cannot separate models."""

    name = "class_accuracy"
    unit = "%"
    higher_is_better = True
    requires = frozenset({"class-conditional"})

    def __call__(self, ctx: EvalContext) -> Measurement:
        adapter = ctx.adapter
        wanted = adapter.class_labels(len(ctx.images)).numpy()
        hits = (adapter.predicted_classes(ctx.images) == wanted).astype(np.float64)
        fp_hits = None
        if ctx.fp_images is not None:
            fp_hits = (adapter.predicted_classes(ctx.fp_images) == wanted).astype(np.float64)

        def accuracy(idx, fp_idx):
            return 100 * float(hits[idx].mean() if idx is not None else fp_hits[fp_idx].mean())

        extra = {} if fp_hits is not None else {"classifier_accuracy": adapter.classifier_accuracy}
        return with_intervals(accuracy, len(hits), paired=fp_hits is not None, extra=extra)


MAX_PSNR_DB = 100.0  # reported for images identical to FP (the PSNR of zero error is infinite)


class PSNRvsFP(Metric):
    """PSNR (dB) of the quantized run's images against the FP images from the same noise: a
    paired, reference-free measure of how far quantization moved each sample. Computed from the
    mean squared error over all pixels of all images, on 8-bit images."""

    name = "psnr_vs_fp"
    unit = "dB"
    higher_is_better = True
    quantized_only = True

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.fp_images is None:
            return None
        per_image = (ctx.images.double() - ctx.fp_images.double()).square().flatten(1).mean(1).numpy()

        def psnr(idx, _):
            mse = per_image[idx].mean()
            return MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10 * math.log10(255.0**2 / mse))

        # Already a paired measure (each image against its FP twin): its interval is the only one.
        return with_intervals(psnr, len(per_image), paired=False)


class QuantizeTime(CostMetric):
    """Wall seconds the method took to produce the quantized model (calibration data excluded:
    it is shared between methods). A checkpoint from the cache reports its original time; a
    method that refines other methods' models (``Method.bases``) reports their time plus its
    own (the row's ``weights_from`` names them)."""

    name = "quantize_time"
    unit = "s"
    quantized_only = True
    needs_images = False
    includes_bases = True

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.quantize_s is None:
            return None
        return Measurement(round(ctx.quantize_s, 3), {"cached": ctx.quantize_cached})


class QuantizePeakMemory(CostMetric):
    """Peak memory of quantizing (MiB): the FP model counted once plus everything the method
    held at its peak — its copies of the model, the calibration inputs, activation statistics,
    reconstruction's cached block inputs and optimiser state. The FP trajectories that make the
    calibration inputs are generated outside the measurement (methods share them). On a GPU the
    allocator's peak, on Linux CPUs the process's peak RSS (see ``bench.metrics.memory.PeakWindow``).
    A cached checkpoint reports its original figure; a refining method the largest of its
    bases' and its own."""

    name = "quantize_peak_memory"
    unit = "MiB"
    quantized_only = True
    needs_images = False

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.quantize_s is None:
            return None
        if ctx.quantize_peak_mib is None:
            raise AvailabilityError(
                "this checkpoint's quantization peak was not measured (a cache entry from before "
                "the metric, or a platform whose peak cannot be reset)"
            )
        return Measurement(ctx.quantize_peak_mib, {"cached": ctx.quantize_cached})


class EpsError(Metric):
    """The deployed denoiser's noise-prediction error against the FP denoiser's, per sampler
    step, on FP trajectories that no method calibrated on (seed ``HELD_OUT_SEED``): the mean
    over steps of the mean squared ε difference. It shows *where along the trajectory* a
    method loses accuracy (the report draws it per step) and, unlike an image metric, has no
    small-sample bias. Interval: bootstrap over the trajectories."""

    name = "eps_mse"
    unit = "mse"
    higher_is_better = False
    quantized_only = True
    HELD_OUT_SEED = 999_983
    TRAJECTORIES = 32
    PASSES = 1.8  # per trajectory and step, FP and quantized (fitted: eps_mse took 4-6 s)

    def work(self, spec) -> Work:
        return Work(0.0 if spec.is_fp else self.TRAJECTORIES * spec.sampling.steps * self.PASSES)

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.spec.is_fp:
            return None
        import qdiff
        from bench.models.base import in_dtype, model_dtype

        adapter = ctx.adapter
        steps = adapter.sampling.steps
        n = min(self.TRAJECTORIES, adapter.sampling.batch_size)
        calib = qdiff.CalibConfig(strategy="uniform", num_timesteps=steps, samples_per_timestep=n,
                                  seed=self.HELD_OUT_SEED)  # fmt: skip
        fp = adapter.denoiser().eval().requires_grad_(False)
        # Held out: the evaluation prompts, never those calibration saw.
        data = adapter.calibration_data(fp, calib, split="evaluation").to(adapter.device)
        model = ctx.denoiser
        dtype = model_dtype(model)
        errors = []
        with torch.no_grad():
            for x, t, cond in data.batches(n):  # one sampler step per batch, trajectories in order
                ref = fp(x, t, **cond).sample.float()
                xm, condm = in_dtype(dtype, x, cond)
                out = model(xm, t, **condm).sample.float()
                errors.append((out - ref).pow(2).flatten(1).mean(1).cpu())
        per = torch.stack(errors).double().numpy()  # (steps, trajectories)
        timesteps = [int(t) for t in data.t[::n].tolist()]
        measured = with_intervals(lambda idx, _: float(per[:, idx].mean()), n, paired=False)
        per_step = [float(f"{v:.6g}") for v in per.mean(1)]
        return Measurement(measured.value, {**measured.extra, "timesteps": timesteps, "per_step": per_step,
                                            "trajectories": n})  # fmt: skip


CLASS_ACCURACY = METRICS.add(ClassAccuracy())
DIGITS_FD = METRICS.add(DigitsFD())
FD_TO_FP = METRICS.add(FDtoFP())
EPS_MSE = METRICS.add(EpsError())
PSNR_VS_FP = METRICS.add(PSNRvsFP())
QUANTIZE_TIME = METRICS.add(QuantizeTime())
QUANTIZE_PEAK_MEMORY = METRICS.add(QuantizePeakMemory())
