"""The run schema: what one benchmark run is, as typed, frozen, hashable values.

:class:`RunSpec` is one cell of a matrix (model × method × bit width × seeds) with the settings
that determine its results, grouped as :class:`Sampling` (how images are made), :class:`Budget`
(the quantization budget every method gets) and :class:`Evaluation` (how metrics are computed).
Its :attr:`RunSpec.hash` identifies the run for resuming, caching and pairing. :class:`Bits` is
a bit-width label. :mod:`bench.matrix` builds these from YAML; everything else reads them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.errors import AvailabilityError, BitsError, MatrixError
from bench.provenance import config_hash
from bench.registry import METRICS
from qdiff.config import MAX_BITS, MIN_BITS

FP_METHOD = "fp"  # the full-precision reference's method name
# What rules and --only match.
RULE_KEYS = ("model", "method", "bits", "seed", "calib_seed", "backend", "compile")


FP_BITS = 32  # "A32" / "W32": leave that tensor kind in floating point
_BITS_RE = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelTraits:
    """What a method may need to know about a model before it runs (``Method.unsupported_on``).

    Args:
        architecture: ``"unet"`` or ``"transformer"`` (the denoiser's building blocks).
        flow_matching: the model is a rectified flow (velocity prediction, Euler sampler, no
            DDPM noise schedule), as SD3 and FLUX are.
    """

    architecture: str = "unet"
    flow_matching: bool = False


@dataclass(frozen=True)
class Bits:
    """Weight and activation bit widths; ``None`` means full precision."""

    w: int | None
    a: int | None

    @classmethod
    def parse(cls, label: str) -> Bits:
        m = _BITS_RE.match(label.strip())
        if not m:
            raise BitsError(f"bit width {label!r} is not of the form W<bits>A<bits>, e.g. W4A8 or W4A32")
        w, a = (int(g) for g in m.groups())
        for kind, value in (("weight", w), ("activation", a)):
            if value != FP_BITS and not MIN_BITS <= value <= MAX_BITS:
                raise BitsError(
                    f"bit width {label!r}: {kind} bits {value} are out of range; use "
                    f"{MIN_BITS}–{MAX_BITS}, or {FP_BITS} for full precision"
                )
        if w == FP_BITS and a == FP_BITS:
            raise BitsError(f"bit width {label!r} quantizes nothing; the FP reference is always run")
        return cls(None if w == FP_BITS else w, None if a == FP_BITS else a)

    @property
    def label(self) -> str:
        return f"W{self.w or FP_BITS}A{self.a or FP_BITS}"


@dataclass(frozen=True)
class Sampling:
    """How images are generated and evaluated; shared by a quantized run and its FP reference.

    Args:
        samples: images per run (the metrics' sample count).
        steps: sampler steps.
        batch_size: images per sampler batch.
        eta: DDIM eta (0 = deterministic given the initial noise).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        dtype: what the evaluated denoisers compute in: ``float32``, ``float16`` or ``bfloat16``
            (quantization always calibrates the float32 model; the FP run and each deployable
            are cast after). The sampler's state stays float32.
    """

    samples: int = 500
    steps: int = 25
    batch_size: int = 250
    eta: float = 0.0
    device: str = "auto"
    dtype: str = "float32"


@dataclass(frozen=True)
class Budget:
    """Calibration size, reconstruction schedule and backend, applied to every method's recipe
    so that methods are compared at equal cost, and the run's calibration seed.

    Args:
        calib_timesteps / calib_samples: K timesteps × N trajectories of calibration inputs
            (the paper: 20 × 256).
        weight_iters / act_iters: reconstruction steps per unit, for methods that reconstruct
            (the paper: 20,000 / 5,000).
        weight_lr: AdaRound learning rate, constant (the paper: 1e-3 at 20k steps; a short
            schedule needs ``weight_lr × weight_iters × 0.8`` well above 2.4 to decide its
            roundings — the paper's is 16).
        act_lr: learning rate of the log step sizes (see :class:`qdiff.ReconConfig`).
        backend: what :func:`qdiff.convert` builds for evaluation (``fake`` for quality).
        calib_seed: which calibration trajectories (their noise) and which minibatch order —
            an axis of the matrix (``calib_seeds``), not a setting.
    """

    calib_timesteps: int = 20
    calib_samples: int = 256
    weight_iters: int = 20000
    act_iters: int = 5000
    weight_lr: float = 1e-3
    act_lr: float = 1e-3
    backend: str = "fake"
    calib_seed: int = 0

    def apply(self, qconfig):
        """``qconfig`` with this budget's calibration size and seed and (if it reconstructs)
        schedule."""
        calib = dataclasses.replace(
            qconfig.calib,
            num_timesteps=self.calib_timesteps,
            samples_per_timestep=self.calib_samples,
            seed=CALIB_SEED_BASE + self.calib_seed,
        )
        recon = qconfig.recon
        if recon.method != "none":
            recon = dataclasses.replace(
                recon,
                weight_iters=self.weight_iters,
                act_iters=self.act_iters,
                weight_lr=self.weight_lr,
                act_lr=self.act_lr,
                seed=self.calib_seed,
            )
        return dataclasses.replace(qconfig, calib=calib, recon=recon)


# Named quantization budgets (``preset:`` in a matrix file), applied under the matrix's own
# ``settings``. Without a preset or budget settings a matrix gets :class:`Budget`'s defaults,
# the paper's, and ``validate`` says so.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's: 20 timesteps × 256 trajectories, 20k AdaRound + 5k LSQ iterations per block
    # (`qdiff-bench validate` estimates what that costs on the device at hand).
    "paper": {},
    # The CPU budget of configs/default.yaml: 10 × 40 inputs, 100 + 20 iterations, with a
    # constant AdaRound lr whose total movement (0.2 × 100 × 0.8 = 16) is the paper's.
    "quick": {
        "calib_timesteps": 10,
        "calib_samples": 40,
        "weight_iters": 100,
        "act_iters": 20,
        "weight_lr": 0.2,
        "act_lr": 0.02,
    },
}


# Calibration trajectories draw their noise from seed CALIB_SEED_BASE + calib_seed, far from
# the sampling seeds (0, 1, ...) that the evaluated images use.
CALIB_SEED_BASE = 1000


DTYPES = ("float32", "float16", "bfloat16")
FID_BACKENDS = ("torch-fidelity", "clean-fid")
CLEANFID_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
# ``openvino``: the deployable converted with ``ov.convert_model`` and run on OpenVINO's CPU
# runtime instead of torch.compile'd (FP32 on OpenVINO, the CPU deployment peer).
COMPILE_BACKENDS = ("off", "inductor", "eager", "openvino")


@dataclass(frozen=True)
class Evaluation:
    """How the metrics are computed: FID library and weights, CLIP model, latency protocol.

    Only the fields a run's metrics use enter its hash (:meth:`RunSpec.hash`), so e.g. a new
    CLIP model re-measures text-to-image runs and nothing else.

    Args:
        fid_backend: ``torch-fidelity`` (Inception-v3 "compat", as Q-Diffusion reported) or
            ``clean-fid``.
        fid_mode: clean-fid's resizing mode: ``clean``, ``legacy_pytorch`` or
            ``legacy_tensorflow`` (torch-fidelity has one protocol; the field is unused there).
        fid_extractor: ``inception`` (the library's Inception-v3), another torch-fidelity
            extractor name (e.g. ``clip-vit-b-32``), or ``module:attr`` of a custom extractor
            (a torch-fidelity ``FeatureExtractorBase`` subclass, or for clean-fid a callable
            that builds a module mapping NCHW 0–255 images at 299² to features).
        fid_reference: real images FID is measured against: a folder of images, or a
            torch-fidelity registered input such as ``cifar10-train``; empty: the model's own
            default data set.
        inception_weights: a local file with the backend's Inception weights, for machines
            without network; empty: the library's normal download. It locates the standard
            weights, so it is not hashed.
        clip_model / clip_pretrained: open_clip architecture and pretrained tag or local
            checkpoint for CLIP score (default ViT-L/14 OpenAI, the torchmetrics default).
        lpips_weights: a local file with torchvision's AlexNet weights for ``lpips_vs_fp``;
            empty: torch's hub cache. It locates the standard weights, so it is not hashed.
        latency_warmup / latency_repeats: untimed and timed repetitions of each latency
            measurement (median and interquartile range over the timed ones).
        compile: ``off``, the ``torch.compile`` backend to time the denoiser with, or
            ``openvino`` (converted and run on OpenVINO's CPU runtime).
    """

    fid_backend: str = "torch-fidelity"
    fid_mode: str = "clean"
    fid_extractor: str = "inception"
    fid_reference: str = ""
    inception_weights: str = ""
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    lpips_weights: str = ""
    latency_warmup: int = 2
    latency_repeats: int = 10
    compile: str = "off"


SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(Sampling))
BUDGET_KEYS = tuple(f.name for f in dataclasses.fields(Budget) if f.name != "calib_seed")
EVALUATION_KEYS = tuple(f.name for f in dataclasses.fields(Evaluation))
SETTING_KEYS = SAMPLING_KEYS + BUDGET_KEYS + EVALUATION_KEYS
UNHASHED_SETTINGS = ("inception_weights", "lpips_weights")


def _sampling_identity(sampling: Sampling) -> dict[str, Any]:
    """The sampling settings as hashed: ``dtype`` only when it is not float32, so that runs
    recorded before the setting existed keep their identity."""
    fields = dataclasses.asdict(sampling)
    if fields["dtype"] == "float32":
        del fields["dtype"]
    return {"__type__": "Sampling", **fields}


@dataclass(frozen=True)
class RunSpec:
    """One cell of a matrix: everything that determines its results, and nothing else.

    ``hash`` is stable across processes and machines: it is the identity used for resuming,
    caching and pairing rows. The matrix name is not part of it (the same run in two matrices
    is the same run).
    """

    model: str
    method: str
    w_bits: int | None
    a_bits: int | None
    seed: int
    sampling: Sampling
    budget: Budget | None  # None exactly when ``is_fp`` (the FP reference quantizes nothing)
    metrics: tuple[str, ...]
    model_args: tuple[tuple[str, Any], ...] = ()
    evaluation: Evaluation = Evaluation()

    @property
    def is_fp(self) -> bool:
        return self.method == FP_METHOD

    @property
    def bits_label(self) -> str:
        return "FP" if self.is_fp else Bits(self.w_bits, self.a_bits).label

    @property
    def real_backend(self) -> str | None:
        """The real-kernel backend the run deploys on; None for FP and simulated (``fake``) runs."""
        return None if self.is_fp or self.budget.backend == "fake" else self.budget.backend

    @property
    def calib_seed(self) -> int | None:
        """The calibration seed (None for the FP reference, which calibrates nothing)."""
        return None if self.is_fp else self.budget.calib_seed

    @property
    def label(self) -> str:
        on = "" if self.real_backend is None else f" [{self.real_backend}]"
        calib = "" if self.is_fp else f" calib={self.calib_seed}"
        compiled = "" if self.evaluation.compile == "off" else f" compile={self.evaluation.compile}"
        return f"{self.model} {self.method}{on} {self.bits_label} seed={self.seed}{calib}{compiled}"

    def on_backend(self, backend: str) -> RunSpec:
        """This quantized run deployed on ``backend``."""
        return dataclasses.replace(self, budget=dataclasses.replace(self.budget, backend=backend))

    @property
    def hash(self) -> str:
        return config_hash(
            "run",
            self.model,
            dict(self.model_args),
            self.method,
            self.w_bits,
            self.a_bits,
            self.seed,
            _sampling_identity(self.sampling),
            self.budget,
            self.evaluation_used(),
        )

    def evaluation_used(self) -> dict[str, Any]:
        """The evaluation settings this run's metrics depend on (what the hash includes)."""
        used = {s for m in self.metrics for s in METRICS.get(m).settings}
        return {k: v for k, v in dataclasses.asdict(self.evaluation).items()
                if k in used and k not in UNHASHED_SETTINGS}  # fmt: skip

    def fp_reference(self) -> RunSpec:
        """The FP run this run is paired with: same model, arguments, seed and sampling, and
        the metrics that apply to an unquantized model."""
        metrics = tuple(m for m in self.metrics if not METRICS.get(m).quantized_only)
        return dataclasses.replace(
            self, method=FP_METHOD, w_bits=None, a_bits=None, budget=None, metrics=metrics
        )

    def fields(self) -> dict[str, Any]:
        """The row columns that identify this run."""
        return {
            "model": self.model,
            "method": self.method,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "bits": self.bits_label,
            "seed": self.seed,
            "calib_seed": self.calib_seed,
            "config_hash": self.hash,
            "n_samples": self.sampling.samples,
            "sampling": dataclasses.asdict(self.sampling),
            "budget": None if self.is_fp else dataclasses.asdict(self.budget),
            "model_args": dict(self.model_args),
            "evaluation": self.evaluation_used(),
        }

    def matches(self, rules: dict[str, tuple[str, ...]]) -> bool:
        """Whether every ``key: patterns`` rule matches (shell-style patterns, e.g. ``W4*``)."""
        backend = "fp" if self.is_fp else self.budget.backend
        values = {"model": self.model, "method": self.method, "bits": self.bits_label, "seed": str(self.seed),
                  "calib_seed": str(self.calib_seed), "backend": backend,
                  "compile": self.evaluation.compile}  # fmt: skip
        return all(
            any(fnmatch.fnmatch(values[k].lower(), p.lower()) for p in pats) for k, pats in rules.items()
        )


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSpec:
    """Where a matrix's runs execute (never part of a run's identity: every executor gives the
    same rows). A matrix's ``settings: {executor: ray}`` or ``{executor: {name: ray, address:
    auto, ...}}``; ``qdiff-bench run`` flags override it.

    Args:
        name: ``local`` (this machine: in-process or worker processes) or ``ray``.
        address: Ray only: None starts a Ray instance here for the matrix; ``auto`` joins the
            cluster this machine belongs to (``ray start``, a KubeRay or Slurm job);
            ``ray://host:10001`` connects through Ray Client.
        retries: Ray only: how many times a run whose worker or node died is retried before it
            becomes an error row.
        memory_gib: Ray only: memory reserved per run; None: 2.5 GiB for a CPU run, none for a
            GPU run (the GPU is what it waits for).
        dashboard: Ray only: start Ray's dashboard with the local instance.
    """

    name: str = "local"
    address: str | None = None
    retries: int = 2
    memory_gib: float | None = None
    dashboard: bool = False


def name_problem(name: object) -> str | None:
    """What makes ``name`` unfit to name a matrix (it names its folder under the results root:
    ``../x`` would write elsewhere), or None."""
    if isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum() and name.isascii():
        return None
    return f"name={name!r} must be ASCII letters, digits, '-' or '_' (it names a folder)"


@dataclass(frozen=True)
class MatrixSpec:
    """A parsed, validated matrix; :meth:`expand` gives its runs."""

    name: str
    path: str
    runs: tuple[RunSpec, ...] = field(repr=False)
    description: str = ""
    notes: tuple[str, ...] = ()  # what the file leaves implicit: inherited keys, then the budget
    executor: ExecutorSpec = ExecutorSpec()

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:  # however the spec was made (a YAML file, dataclasses.replace, by hand)
            raise MatrixError(f"matrix {problem}")

    def expand(self) -> list[RunSpec]:
        return list(self.runs)

    @property
    def budget_note(self) -> str:
        """Which quantization budget the runs get, in words (the last of :attr:`notes`)."""
        return self.notes[-1] if self.notes else ""

    def with_evaluation(self, **overrides: Any) -> MatrixSpec:
        """This matrix with evaluation settings overridden in every run (command-line flags)."""
        runs = tuple(
            dataclasses.replace(run, evaluation=dataclasses.replace(run.evaluation, **overrides))
            for run in self.runs
        )
        return dataclasses.replace(self, runs=runs)


def resolve_device(name: str) -> torch.device:
    """``Sampling.device`` as a torch device (``auto``: CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AvailabilityError("device 'cuda' was requested but no CUDA device is available here")
    return torch.device(name)
