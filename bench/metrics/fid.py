"""FID, KID and Inception Score through torch-fidelity or clean-fid.

Both libraries do the measuring: their Inception-v3 weights and image resizing (the part that
makes FIDs comparable between papers) and their own statistics. :mod:`bench.metrics.inception`
feeds them samples from memory or from a folder of images and caches the reference set's
features once per data set; this module picks the backend a run's settings name, computes the
scores and turns "weights missing offline" into a skipped row that names the file and the flag.

Which library, mode and extractor produced a number is recorded in its row: FIDs from different
backends, modes or sample counts are not comparable.
"""

from __future__ import annotations

import os
import pickle
import time
import warnings
from pathlib import Path

from bench.errors import AvailabilityError, ImageError
from bench.fsio import missing_path
from bench.metrics.inception import WEIGHT_FILES, Images, Scores, backend, identity
from bench.metrics.quality import EvalContext, Measurement, Metric, Work
from bench.provenance import config_hash
from bench.registry import METRICS
from bench.spec import resolve_device


def reliability_warning(n: int, dims: int | None) -> str | None:
    if dims is None or n >= dims:
        return None
    return (
        f"FID from n={n} samples < {dims} feature dimensions is biased upward and unreliable "
        f"(singular covariance); use n >= {dims}, and 10k-50k to compare with published numbers"
    )


def compute(
    evaluation,
    gen: Images,
    ref: Images | None,
    ref_key: str | None = None,
    kid: bool = False,
    isc: bool = False,
    device: str = "cpu",
    batch_size: int = 64,
) -> Scores:
    """FID (and KID, IS) of ``gen`` against ``ref`` with the backend ``evaluation`` names.

    Args:
        gen / ref: uint8 image tensors or image folders (``ref`` may also be a torch-fidelity
            registered input such as ``cifar10-train``, or None for the Inception Score alone).
        ref_key: cache the reference's features under this key (computed once per data set).
    """
    t = time.perf_counter()
    try:
        bk = backend(evaluation, device, batch_size)
        scores = bk.compare(gen, ref, ref_key, kid, isc)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        if not evaluation.inception_weights:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageError(
            f"inception weights {evaluation.inception_weights} could not be loaded ({first}); "
            f"expected the backend's file ({', '.join(sorted(set(WEIGHT_FILES.values())))})"
        ) from None
    n = scores.info["n_gen"]
    dims = scores.info.get("feature_dims") or bk.feature_dims()
    warning = reliability_warning(n, dims) if scores.fid is not None else None
    if warning:
        warnings.warn(warning, stacklevel=2)
    info = {
        "fid_backend": bk.name,
        "fid_mode": bk.mode,
        "feature_extractor": bk.extractor,
        "inception_weights": evaluation.inception_weights or "library download",
        **scores.info,
        "feature_dims": dims,
        "warning": warning,
        "fid_s": round(time.perf_counter() - t, 3),  # extraction and statistics, both sets
    }
    return Scores(scores.fid, scores.kid, scores.kid_std, scores.isc, scores.isc_std, info)


def _extraction(evaluation) -> tuple:
    """What determines a set's features, for cache keys: the weights file counts by name and
    size, the library's own download as "download"."""
    weights = Path(evaluation.inception_weights) if evaluation.inception_weights else None
    source = (weights.name, weights.stat().st_size) if weights and weights.is_file() else "download"
    return evaluation.fid_backend, evaluation.fid_mode, evaluation.fid_extractor, source


class _FIDFamily(Metric):
    """FID-family metrics of a run; FID, KID and IS against the same set share one computation."""

    field: str  # which of Scores' values this metric reports
    against: str = "reference"  # or "fp" (the paired FP samples) or "none" (Inception Score)
    settings = ("fid_backend", "fid_mode", "fid_extractor", "fid_reference", "inception_weights")

    def work(self, spec) -> Work:
        return Work(feature_images=spec.sampling.samples)

    def check(self, evaluation) -> str | None:
        if self.field == "isc" and evaluation.fid_backend != "torch-fidelity":
            return "clean-fid does not compute the Inception Score; use fid_backend: torch-fidelity"
        for setting in ("fid_reference", "inception_weights"):
            value = getattr(evaluation, setting)
            problem = missing_path(value) if value else None
            if problem:
                return f"{setting} {problem}"
        return None

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if self.against == "fp" and ctx.fp_images is None:
            return None
        scores = ctx.memo.get(("fid", self.against))
        if scores is None:
            scores = self._scores(ctx)
            ctx.memo[("fid", self.against)] = scores
        value = getattr(scores, self.field)
        spread = getattr(scores, f"{self.field}_std", None)
        return Measurement(float(value), {**scores.info, **({"std": spread} if spread is not None else {})})

    def _scores(self, ctx: EvalContext) -> Scores:
        ev = ctx.spec.evaluation
        device = str(resolve_device(ctx.spec.sampling.device))
        batch = min(ctx.spec.sampling.batch_size, 256)
        if self.against == "none":
            return compute(ev, ctx.images, None, isc=True, device=device, batch_size=batch)
        if self.against == "fp":
            fp_id = identity(ctx.fp_images)
            key = config_hash("fid-fp", _extraction(ev), fp_id)
            fp = ctx.fp_images
            return compute(ev, ctx.images, fp, f"qdiff-{key}", device=device, batch_size=batch)
        ref = ev.fid_reference or ctx.adapter.FID_REFERENCE
        if not ref:
            raise AvailabilityError(
                f"FID needs real reference images for {ctx.spec.model}: set fid_reference: /path/to/images "
                "(a folder) in the matrix settings or on the model entry"
            )
        is_folder = Path(ref).is_dir()
        if not is_folder and (os.sep in ref or ev.fid_backend == "clean-fid"):
            raise AvailabilityError(f"fid_reference {ref!r}: no such folder of images on this machine")
        ref_id = identity(ref) if is_folder else ref
        key = config_hash("fid-ref", _extraction(ev), ref_id)
        kid = "kid" in ctx.spec.metrics
        return compute(ev, ctx.images, ref, f"qdiff-{key}", kid=kid, device=device, batch_size=batch)


class FID(_FIDFamily):
    """Fréchet Inception Distance of the run's samples to the real reference set."""

    name, unit, higher_is_better, field = "fid", "fid", False, "fid"


class KID(_FIDFamily):
    """Kernel Inception Distance (unbiased MMD², cubic polynomial kernel) to the reference set;
    unlike FID, unbiased at small n."""

    name, unit, higher_is_better, field = "kid", "mmd2", False, "kid"


class InceptionScore(_FIDFamily):
    """Inception Score of the run's samples (torch-fidelity; 10 splits); no reference set."""

    name, unit, higher_is_better, field, against = "inception_score", "is", True, "isc", "none"
    settings = ("fid_backend", "fid_extractor", "inception_weights")


class FIDvsFP(_FIDFamily):
    """FID of the quantized samples to the paired FP samples (same seeds, prompts, sampler): the
    distribution shift caused by quantization alone, with no real data needed."""

    name, unit, higher_is_better, field, against = "fid_vs_fp", "fid", False, "fid", "fp"
    quantized_only = True
    settings = ("fid_backend", "fid_mode", "fid_extractor", "inception_weights")


FID_METRIC, KID_METRIC, INCEPTION_SCORE, FID_VS_FP = (
    METRICS.add(m) for m in (FID(), KID(), InceptionScore(), FIDvsFP())
)
