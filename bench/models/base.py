"""Model adapters: what the runner needs from a diffusion model, and the shared DDIM loop.

An adapter builds the pipeline, hands out the denoiser to quantize, samples images from a seed
with any denoiser swapped in (so FP and quantized models see identical noise, prompts and
sampler), records calibration inputs ``(x_t, t, cond)`` from the FP trajectory, and declares its
metrics. Images come back as uint8 NCHW tensors on the CPU: what a PNG or an FID tool sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import nn

import qdiff
from bench.spec import ModelTraits, Sampling, resolve_device

# Which conditions a sampler run draws: those scored (``evaluation``) or those calibration may
# see (``calibration``); a model whose conditions are not test items (class labels) uses one set.
Split = Literal["evaluation", "calibration"]

# What every model measures about cost (bench.metrics.cost, and the method's own time).
COST_METRICS = (
    "quantize_time", "quantize_peak_memory", "latency_step", "latency_e2e", "peak_memory", "weight_bytes",
)  # fmt: skip


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype a denoiser computes in (its first floating parameter or buffer)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def in_dtype(
    dtype: torch.dtype, x: torch.Tensor, kwargs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``x`` and the float tensors of ``kwargs`` in a denoiser's dtype (see :func:`model_dtype`;
    the sampler keeps its state in float32, a float16 denoiser takes float16 inputs)."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    return x.to(dtype), cast


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → [0, 255] uint8, rounded as an image file would store them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _init_sigma(scheduler) -> float:
    return getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at 1


def _scale_input(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


class DiffusionAdapter:
    """Base class: a denoiser sampled by DDIM, with optional text guidance and latent decoding.

    Subclasses set the class attributes and implement :meth:`denoiser`, :meth:`scheduler`,
    :meth:`latent_shape`, and (if needed) :meth:`conditions` and :meth:`decode`.

    Args:
        sampling: steps, batch size, eta, device and sample count of the run.
        **args: model arguments from the matrix file (``ARGS`` lists the accepted ones).
    """

    name: ClassVar[str]
    ARGS: ClassVar[tuple[str, ...]] = ()
    DEFAULT_METRICS: ClassVar[tuple[str, ...]] = ("psnr_vs_fp", *COST_METRICS)
    # What the model offers the metrics that need more than images (``Metric.requires``):
    # ``text-to-image`` (prompts, :meth:`prompts`), ``digit-features`` (a digit classifier's
    # features for a Fréchet distance, :class:`bench.models.embedded.EmbeddedDigits`).
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset()
    # Checked when a matrix loads: the sampler cannot take more steps than the model was trained
    # with, and ``samples`` images of this shape must fit in memory (uint8, run + its FP pair).
    TRAIN_TIMESTEPS: ClassVar[int] = 1000
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]] = (3, 512, 512)
    # The real data FID compares with unless the matrix sets ``fid_reference``: a
    # torch-fidelity registered input, or "" (none; the user supplies a folder).
    FID_REFERENCE: ClassVar[str] = ""
    # "unet" or "transformer": what the denoiser is built from, for the methods that only apply
    # to one (``Method.unsupported_on``: split shortcut needs a UNet's skip concatenations).
    ARCHITECTURE: ClassVar[str] = "unet"
    # Classifier-free guidance scale unless the matrix sets ``guidance_scale`` (models that
    # take it list it in ``ARGS``).
    DEFAULT_GUIDANCE: ClassVar[float] = 1.0
    # Rectified-flow models (SD3, FLUX) predict a velocity and sample with an Euler flow-matching
    # scheduler: no eta, no input scaling (checked when a matrix loads).
    FLOW_MATCHING: ClassVar[bool] = False

    @classmethod
    def traits(cls) -> ModelTraits:
        return ModelTraits(cls.ARCHITECTURE, cls.FLOW_MATCHING)

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        """What is wrong with a matrix entry's model arguments, found before anything runs (a
        local path that does not exist, a value out of range); empty if nothing."""
        return []

    def __init__(self, sampling: Sampling, **args: Any) -> None:
        bad = sorted(set(args) - set(self.ARGS))
        if bad:
            raise ValueError(
                f"{self.name} does not take {', '.join(bad)}; valid: {', '.join(self.ARGS) or 'none'}"
            )
        self.sampling = sampling
        self.args = args
        self.device = resolve_device(sampling.device)

    # --- to implement ---------------------------------------------------------------------

    def denoiser(self) -> nn.Module:
        """The FP denoiser on ``self.device`` (the runner copies it before quantizing)."""
        raise NotImplementedError

    def scheduler(self):
        """A fresh diffusers scheduler for the sampling loop: ``DDIMScheduler``, or
        ``FlowMatchEulerDiscreteScheduler`` for a flow-matching model (``FLOW_MATCHING``)."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the initial noise (C, H, W)."""
        raise NotImplementedError

    def set_timesteps(self, scheduler) -> None:
        """Set ``sampling.steps`` sampler steps on a fresh scheduler (FLUX overrides it: its
        schedule shifts with the image size)."""
        scheduler.set_timesteps(self.sampling.steps, device=self.device)

    def conditions(self, start: int, n: int, split: Split = "evaluation") -> dict[str, torch.Tensor] | None:
        """Extra denoiser inputs for samples ``start..start+n`` (e.g. text embeddings) of the
        ``split``: ``evaluation`` conditions what is sampled and scored, ``calibration`` what
        calibration records (a text-to-image model's disjoint calibration prompts)."""
        return None

    def guided(self) -> bool:
        """Whether the denoiser sees a doubled (unconditional, conditional) batch whose
        predictions :meth:`guide` combines (classifier-free guidance)."""
        return False

    @property
    def guidance_scale(self) -> float:
        return float(self.args.get("guidance_scale", self.DEFAULT_GUIDANCE))

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Combine a doubled (unconditional, conditional) batch's noise predictions:
        ``uncond + s · (cond − uncond)``."""
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final sampler state → images in [-1, 1]."""
        return x

    def prompts(self, n: int, split: Split = "evaluation") -> list[str] | None:
        """The prompt of each of ``n`` samples of the ``split``, for text-to-image models."""
        return None

    def row_fields(self) -> dict[str, Any]:
        """What the results rows record of the model's evaluation protocol beyond its args
        (a text-to-image model: its two prompt sets' names and hashes)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What, besides the denoiser's weights, determines the samples (hashed into caches)."""
        s = self.sampling
        return {
            "name": self.name,
            "args": self.args,
            "steps": s.steps,
            "eta": s.eta,
            "batch_size": s.batch_size,
            # Where it samples: FP and quantized images made on different devices never pair.
            "device": self.device.type,
            **({} if s.dtype == "float32" else {"dtype": s.dtype}),
            **({"guidance_scale": self.guidance_scale} if self.guided() else {}),
        }

    # --- shared ---------------------------------------------------------------------------

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """Initial noise of ``n`` samples from one CPU generator per seed: the same on every
        device and for every batch size."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((n, *self.latent_shape()), generator=generator)

    @torch.no_grad()
    def sample(
        self,
        denoiser: nn.Module,
        n: int,
        seed: int,
        recorder: Callable | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """``n`` uint8 images from the noise of ``seed``, ``sampling.steps`` steps of the model's
        scheduler (DDIM, or flow-matching Euler).

        ``recorder(step, x, t, cond)`` sees the denoiser's exact inputs at every step;
        ``progress(done, total)`` is called after every step of every batch.
        """
        batches = self.trajectories(denoiser, n, seed, recorder, progress)
        return torch.cat([to_uint8(self.decode(x)) for x in batches])

    @torch.no_grad()
    def trajectories(
        self,
        denoiser: nn.Module,
        n: int,
        seed: int,
        recorder: Callable | None = None,
        progress: Callable[[int, int], None] | None = None,
        split: Split = "evaluation",
    ) -> Iterator[torch.Tensor]:
        """The sampler loop of :meth:`sample` without decoding: each batch's final state, the
        samples conditioned as the ``split`` says. Calibration runs only this, so models without
        a decoder (random-weight cost runs) calibrate too."""
        noise = self.noise(n, seed)
        # A denoiser that knows its own output noise (PTQD) may scale the noise a stochastic
        # step adds: variance_noise(scheduler, t, eps, eta, generator).
        fold = getattr(denoiser, "variance_noise", None)
        dtype = model_dtype(denoiser)
        batch_size = self.sampling.batch_size
        steps = self.sampling.steps
        total, done = -(-n // batch_size) * steps, 0
        guided = self.guided()
        for start in range(0, n, batch_size):
            scheduler = self.scheduler()
            self.set_timesteps(scheduler)
            x = noise[start : start + batch_size].to(self.device) * _init_sigma(scheduler)
            cond = self.conditions(start, len(x), split)
            # eta > 0 draws fresh noise each step: seed it per batch for reproducibility.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            for i, t in enumerate(scheduler.timesteps):
                x_in = _scale_input(scheduler, torch.cat([x, x]) if guided else x, t)
                t_in = t.expand(len(x_in))
                kwargs = cond or {}
                if recorder is not None:
                    recorder(i, x_in, t_in, kwargs)
                x_m, kwargs_m = in_dtype(dtype, x_in, kwargs)
                eps = denoiser(x_m, t_in, **kwargs_m).sample.float()
                eps = self.guide(eps) if guided else eps
                if self.FLOW_MATCHING:  # Euler on the predicted velocity; deterministic
                    x = scheduler.step(eps, t, x).prev_sample
                else:
                    step_noise = {"generator": generator}
                    if self.sampling.eta > 0 and fold is not None:
                        step_noise = {"variance_noise": fold(scheduler, t, eps, self.sampling.eta, generator)}
                    x = scheduler.step(eps, t, x, eta=self.sampling.eta, **step_noise).prev_sample
                done += 1
                if progress is not None:
                    progress(done, total)
            yield x

    @torch.no_grad()
    def step_inputs(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The denoiser's inputs ``(x, t, kwargs)`` at the first sampler step for ``n`` samples
        (a doubled batch under guidance, as :meth:`sample` feeds it): for timing one step."""
        scheduler = self.scheduler()
        self.set_timesteps(scheduler)
        x = self.noise(n, seed).to(self.device) * _init_sigma(scheduler)
        cond = self.conditions(0, n)
        t = scheduler.timesteps[0]
        x_in = _scale_input(scheduler, torch.cat([x, x]) if self.guided() else x, t)
        return x_in, t.expand(len(x_in)), cond or {}

    def calibration_data(
        self,
        denoiser: nn.Module,
        config: qdiff.CalibConfig,
        progress: Callable[[int, int], None] | None = None,
        split: Split = "calibration",
    ) -> qdiff.CalibData:
        """Denoiser inputs from the FP trajectories of ``config.samples_per_timestep`` samples,
        at the steps the calibration strategy selects (on the CPU, for caching), conditioned
        from the ``split`` (``evaluation`` only for held-out error metrics, never to calibrate)."""
        recorder = qdiff.TrajectoryRecorder(qdiff.select_steps(config, self.sampling.steps))
        n = config.samples_per_timestep
        for _ in self.trajectories(denoiser, n, config.seed, recorder, progress, split):
            pass
        return recorder.data().to("cpu")
