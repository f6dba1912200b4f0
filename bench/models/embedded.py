"""The embedded model: a DDIM-sampled UNet2DModel trained on scikit-learn's digits.

Its quality metric is the Fréchet distance between generated and real digits in the 64-d
penultimate features of a classifier trained on the same data ("digits Fréchet distance"; it
is not FID: no Inception network is involved, and its values are not comparable to FID).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

import qdiff
from bench.embedded.data import reference_split
from bench.embedded.model import SCHEDULER_CONFIG, load_classifier, load_unet
from bench.metrics.frechet import feature_stats, frechet_distance


@dataclass(frozen=True)
class SamplerConfig:
    """DDIM sampling (eta = 0, deterministic given the initial noise)."""

    steps: int = 25
    batch_size: int = 250


class EmbeddedDigits:
    """Adapter for the embedded model: denoiser, sampler, calibration inputs and metric."""

    name = "embedded-digits"
    metric = "digits_fd"
    metric_unit = "fd"

    def __init__(self, sampler: SamplerConfig = SamplerConfig()) -> None:
        self.sampler = sampler

    def denoiser(self) -> nn.Module:
        """A fresh copy of the trained FP UNet (EMA weights)."""
        return load_unet()

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """The initial noise of ``n`` samples: one generator per seed, so it is batch-independent."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((n, 1, 16, 16), generator=generator)

    @torch.no_grad()
    def sample(
        self, unet: nn.Module, n: int, seed: int, recorder: qdiff.TrajectoryRecorder | None = None
    ) -> torch.Tensor:
        """``n`` images in [-1, 1] from the noise of ``seed``, DDIM with ``sampler.steps`` steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing="trailing")
        scheduler.set_timesteps(self.sampler.steps)
        out = []
        for x in self.noise(n, seed).split(self.sampler.batch_size):
            for i, t in enumerate(scheduler.timesteps):
                tt = t.expand(len(x))
                if recorder is not None:
                    recorder(i, x, tt, {})
                eps = unet(x, tt).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            out.append(x.clamp(-1, 1))
        return torch.cat(out)

    def calibration_data(self, unet: nn.Module, config: qdiff.CalibConfig) -> qdiff.CalibData:
        """Denoiser inputs recorded from the FP trajectory of ``config.samples_per_timestep`` samples."""
        recorder = qdiff.TrajectoryRecorder(qdiff.select_steps(config, self.sampler.steps))
        self.sample(unet, config.samples_per_timestep, config.seed, recorder)
        return recorder.data()

    # --- metric -----------------------------------------------------------------------------

    @cached_property
    def _classifier(self) -> nn.Module:
        return load_classifier()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([self._classifier.features(b) for b in images.split(500)]).double().numpy()

    @cached_property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature statistics of the reference half (A) of the real digits."""
        return feature_stats(self.features(reference_split()[0]))

    def frechet(self, images: torch.Tensor) -> float:
        return frechet_distance(*feature_stats(self.features(images)), *self.reference_stats)

    def real_floor(self, n: int, draws: int = 5, seed: int = 0) -> tuple[float, float]:
        """Mean and sd of the metric for ``n`` real digits from the held-apart half (B) vs A.

        This is the best a perfect generator can score at sample count ``n``: the Fréchet
        distance is biased upwards at small n.
        """
        _, held = reference_split()
        if n > len(held):
            raise ValueError(f"the real-vs-real floor needs n <= {len(held)}, got {n}")
        generator = torch.Generator().manual_seed(seed)
        values = [
            self.frechet(held[torch.randperm(len(held), generator=generator)[:n]]) for _ in range(draws)
        ]
        return float(np.mean(values)), float(np.std(values))
