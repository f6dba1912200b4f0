"""How long a matrix will take here, before it runs: ``qdiff-bench validate`` prints it.

The one measured quantity is the FP denoiser's time per image and sampler step on this device,
``r`` (one batch timed after a warm-up call, for each distinct model and sampling setting); a run
costs a known number of denoiser passes in units of ``r``:

- sampling: ``samples × steps`` passes, :data:`FAKE_QUANT` times slower for a simulated model;
- calibration inputs: ``calib_samples × steps`` (once per model and calibration seed);
- activation calibration: ``calib_timesteps × calib_samples`` inputs through the model,
  :data:`CALIBRATE` passes each (a grid search per layer costs more than min-max);
- reconstruction: ``(weight_iters + act_iters) × batch`` inputs, :data:`RECONSTRUCT` passes each
  (every unit's forward and backward with soft rounding, its held-out check and captures);
- metrics: what each declares (:meth:`bench.metrics.quality.Metric.work`): denoiser passes
  (``eps_mse``'s held-out trajectories, the latency metrics' timed calls) and images through
  Inception (the FID family), :data:`INCEPTION_S` per image.

The factors were fitted to the default matrix's rows on the 2-core Xeon of the README (one torch
thread per worker): they are ratios of work, so they carry over to other models and devices
roughly, not exactly. Runs are summed per wave (FP references first) over the workers. The
estimate assumes an empty cache: cached samples, calibration inputs and checkpoints make a rerun
faster.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from bench.errors import AvailabilityError
from bench.metrics.cost import time_calls
from bench.registry import METHODS, METRICS, MODELS
from bench.runner import waves
from bench.runner.plan import Artefact, artefacts
from bench.spec import Bits, RunSpec, resolve_device

FAKE_QUANT = 1.25  # simulated quantization: quantized runs sampled 45-60 s where FP took 42 s
CALIBRATE = {"mse": 21.0, "minmax": 3.0}  # passes per calibration input (qdiff-no-recon: 13 s)
RECONSTRUCT = 8.2  # passes per reconstruction input (qdiff: 75 s, 26 s of it calibration)
INCEPTION_S = {"cpu": 0.03, "cuda": 0.001}  # seconds per image for Inception features
# Fixed costs, measured on a 2-run matrix of 50 images (estimated 10 s without them, took 21 s on
# the EPYC): a run's own (loading its model and its metrics' networks, writing samples and rows)
# and an invocation's (starting the worker processes, writing the report).
RUN_S = 3.5
START_S = 4.0
WARN_MINUTES = 30  # validate warns past this
SLOW_S = 0.2  # a denoiser call slower than this at one image is timed at one image only


@dataclass(frozen=True)
class Estimate:
    """Seconds of the runs left (None where a model could not be timed here) and how it was got."""

    seconds: float | None
    rates: dict[str, float]  # "model on device" -> seconds per image per sampler step
    unknown: tuple[str, ...]  # models that could not be timed (weights absent, no CUDA)


def step_rate(spec: RunSpec) -> float:
    """Seconds per image per sampler step of ``spec``'s FP denoiser here. A model whose weights
    are not here is timed with random weights of its published architecture (speed does not
    depend on weight values). A fast model is timed at up to 32 images per batch, a slow one
    (over :data:`SLOW_S` a call) at one image, so timing SD on a CPU takes seconds, not minutes."""
    adapter_cls = MODELS.get(spec.model)
    args = dict(spec.model_args)
    try:
        adapter = adapter_cls(spec.sampling, **args)
        model = adapter.denoiser().eval()
    except AvailabilityError:
        if getattr(adapter_cls, "RANDOM_CONFIG", None) is None:
            raise
        adapter = adapter_cls(spec.sampling, **{**args, "init": "random"})
        model = adapter.denoiser().eval()
    device = resolve_device(spec.sampling.device)

    def timed(n: int, calls: int) -> float:
        x, t, kwargs = adapter.step_inputs(n, 0)
        with torch.no_grad():
            times = time_calls(lambda: model(x, t, **kwargs), warmup=0, repeats=calls, device=device)
        return statistics.median(times) / n

    first = timed(1, 2)  # the first call warms up (allocations, kernel selection)
    if first > SLOW_S:
        return first
    return timed(max(1, min(spec.sampling.batch_size, 32)), 5)


def run_seconds(spec: RunSpec, r: float, shared: set) -> float:
    """Seconds of one run at ``r`` seconds per pass: the runner's plan of what it builds or reuses
    (:func:`bench.runner.plan.artefacts`), each artefact charged to the first run that needs it
    (``shared`` holds those already counted), and its metrics' work."""
    total = 0.0
    for artefact in artefacts(spec):
        if artefact.key not in shared:
            shared.add(artefact.key)
            total += _artefact_seconds(artefact, r)
    return RUN_S + total + _metrics_seconds(spec, r)


def _artefact_seconds(artefact: Artefact, r: float) -> float:
    spec = artefact.spec
    s = spec.sampling
    if artefact.kind == "fp-samples":
        return s.samples * s.steps * r
    if artefact.kind == "samples":
        return s.samples * s.steps * r * FAKE_QUANT
    config = METHODS.get(spec.method).configure(Bits(spec.w_bits, spec.a_bits), spec.budget)
    calib, recon, act = (getattr(config, k, None) for k in ("calib", "recon", "act"))
    if artefact.kind == "calibration":
        return calib.samples_per_timestep * s.steps * r
    # A checkpoint: calibration passes and reconstruction (a refining method's own work and
    # torchao's presets, which calibrate nothing, take seconds at most).
    if calib is None or METHODS.get(spec.method).bases(Bits(spec.w_bits, spec.a_bits)):
        return 0.0
    b = spec.budget
    inputs = b.calib_timesteps * b.calib_samples
    search = CALIBRATE.get(getattr(act, "scale_search", "minmax"), CALIBRATE["mse"]) if act else 1.0
    reconstructs = recon is not None and recon.method != "none"
    total = inputs * r * search * (2 if reconstructs else 1)  # calibrated again after weights
    if reconstructs:
        total += (recon.weight_iters + recon.act_iters) * recon.batch_size * r * RECONSTRUCT
    return total


def _metrics_seconds(spec: RunSpec, r: float) -> float:
    """What the run's metrics add, as each declares it (:meth:`bench.metrics.quality.Metric.work`)."""
    image_s = INCEPTION_S.get(resolve_device(spec.sampling.device).type, INCEPTION_S["cpu"])
    work = [METRICS.get(name).work(spec) for name in spec.metrics]
    return sum(w.passes * r + w.feature_images * image_s for w in work)


def estimate(runs: list[RunSpec], workers: int, log=print) -> Estimate:
    """The wall time of ``runs`` on ``workers`` workers, from one timed batch per model here."""
    rates: dict[tuple, float | None] = {}
    for spec in runs:
        key = (spec.model, spec.model_args, spec.sampling)
        if key in rates:
            continue
        try:
            rates[key] = step_rate(spec)
        except Exception as exc:  # absent weights, no CUDA: that model's runs are not estimated
            log(f"  {spec.model} on {spec.sampling.device}: not timed ({type(exc).__name__}: {exc})")
            rates[key] = None
    shared: set = set()
    wall, unknown = 0.0, set()
    for wave in waves(runs):
        costs = []
        for spec in wave:
            r = rates[(spec.model, spec.model_args, spec.sampling)]
            if r is None:
                unknown.add(spec.model)
                continue
            costs.append(run_seconds(spec, r, shared))
        if costs:
            wall += max(max(costs), sum(costs) / workers)
    named = {f"{k[0]} on {resolve_device(k[2].device).type}": v for k, v in rates.items() if v is not None}
    return Estimate(None if unknown and not wall else START_S + wall, named, tuple(sorted(unknown)))
