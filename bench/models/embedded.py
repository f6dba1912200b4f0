"""The embedded models: a DDIM-sampled UNet2DModel and a class-conditional DiT (classifier-free
guidance), both trained on scikit-learn's digits.

Its quality metric is the Fréchet distance between generated and real digits in the 64-d
penultimate features of a classifier trained on the same data ("digits Fréchet distance"; it
is not FID: no Inception network is involved, and its values are not comparable to FID).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.embedded.data import reference_split
from bench.embedded.model import (
    ASSETS,
    DIT_CONFIG,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    load_classifier,
    load_dit,
    load_unet,
)
from bench.frechet import feature_stats, frechet_distance, sqrt_psd
from bench.models.base import DiffusionAdapter, Split
from bench.registry import MODELS


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images as the classifier's float [-1, 1] input (floats pass through)."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


@MODELS.add
class EmbeddedDigits(DiffusionAdapter):
    """The embedded 16×16 digits UNet (trained in-repo), DDIM; CPU-sized, offline."""

    name = "embedded-digits"
    # End-to-end latency is left out by default: one batch of 250 takes ~10 s on a CPU core.
    CAPABILITIES = frozenset({"digit-features"})
    IMAGE_SHAPE = (1, 16, 16)
    DEFAULT_METRICS = (
        "digits_fd",
        "fd_to_fp",
        "psnr_vs_fp",
        "eps_mse",
        "quantize_time",
        "quantize_peak_memory",
        "latency_step",
        "peak_memory",
        "weight_bytes",
    )

    def denoiser(self) -> nn.Module:
        """A fresh copy of the trained FP UNet (EMA weights)."""
        return load_unet().to(self.device)

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing="trailing")

    def latent_shape(self) -> tuple[int, ...]:
        size = UNET_CONFIG["sample_size"]
        return (UNET_CONFIG["in_channels"], size, size)

    # --- metric -----------------------------------------------------------------------------

    @cached_property
    def _classifier(self) -> nn.Module:
        return load_classifier()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Classifier features of images, uint8 [0, 255] or float [-1, 1]."""
        return (
            torch.cat([self._classifier.features(b) for b in _as_float(images).split(500)]).double().numpy()
        )

    @cached_property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature statistics of the reference half (A) of the real digits."""
        return feature_stats(self.features(reference_split()[0]))

    def frechet(self, images: torch.Tensor) -> float:
        return self.frechet_features(self.features(images))

    @cached_property
    def _reference_root(self) -> np.ndarray:
        return sqrt_psd(self.reference_stats[1])  # once: a bootstrap asks for ~2,000 distances

    def frechet_features(self, features: np.ndarray) -> float:
        return frechet_distance(*feature_stats(features), *self.reference_stats, root2=self._reference_root)

    def real_floor(self, n: int, draws: int = 20, seed: int = 0) -> tuple[float, float]:
        """Mean and sd of the metric for ``n`` digits drawn with replacement from *all* the
        real digits (both halves), against the reference half A.

        That is how a perfect model of its training data samples (the UNet was trained on
        every digit), so it is the floor such a model scores at sample count ``n`` — the
        Fréchet distance is biased upwards at small n. (Held-apart digits alone, B vs A, are
        no floor: the model reproduces digits of A, which B does not contain.)
        """
        a, b = reference_split()
        feats = np.concatenate([self.features(a), self.features(b)])
        rng = np.random.default_rng(seed)
        values = [self.frechet_features(feats[rng.integers(0, len(feats), n)]) for _ in range(draws)]
        return float(np.mean(values)), float(np.std(values))


@MODELS.add
class EmbeddedDiT(EmbeddedDigits):
    """The embedded class-conditional DiT (trained in-repo), DDIM with guidance; CPU-sized, offline.

    An adaLN-Zero transformer on the digits with classifier-free guidance: the offline stand-in
    for a text-to-image transformer. Sample ``i`` asks for digit ``i mod 10``; ``class_accuracy`` (the digit
    classifier's accuracy on the requested class) is its alignment metric, as CLIP score is a
    text-to-image model's.

    Model args: ``guidance_scale`` (default 1.5: chosen on the FP model alone, the smallest of
    1, 1.5, 2 and 3 whose class accuracy reaches the classifier's own, 99.4 %; 1 is the
    conditional model alone, one forward per step instead of a doubled batch).
    """

    name = "embedded-dit"
    ARCHITECTURE = "transformer"
    ARGS = ("guidance_scale",)
    CAPABILITIES = frozenset({"digit-features", "class-conditional"})
    DEFAULT_GUIDANCE = 1.5
    DEFAULT_METRICS = (
        "digits_fd",
        "fd_to_fp",
        "class_accuracy",
        "psnr_vs_fp",
        "eps_mse",
        "quantize_time",
        "quantize_peak_memory",
        "latency_step",
        "peak_memory",
        "weight_bytes",
    )

    @classmethod
    def arg_problems(cls, args: dict[str, Any]) -> list[str]:
        scale = args.get("guidance_scale", cls.DEFAULT_GUIDANCE)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 1:
            return [f"guidance_scale={scale!r}; give a number ≥ 1 (1: no guidance)"]
        return []

    def denoiser(self) -> nn.Module:
        """A fresh copy of the trained FP DiT (EMA weights)."""
        return load_dit().to(self.device)

    def latent_shape(self) -> tuple[int, ...]:
        size = DIT_CONFIG["sample_size"]
        return (DIT_CONFIG["in_channels"], size, size)

    def guided(self) -> bool:
        return self.guidance_scale != 1

    def class_labels(self, n: int) -> torch.Tensor:
        """The digit each of ``n`` samples asks for: ``i mod 10``."""
        return torch.arange(n) % 10

    def conditions(self, start: int, n: int, split: Split = "evaluation") -> dict[str, torch.Tensor]:
        # Ten classes are the conditioning's whole domain, not test items: both splits use them.
        labels = self.class_labels(start + n)[start:].to(self.device)
        if self.guided():
            labels = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
        return {"class_labels": labels}

    @cached_property
    def classifier_accuracy(self) -> float:
        """The classifier's accuracy (%) on its held-out real digits (its training log)."""
        log = json.loads((ASSETS / "classifier_train.json").read_text())
        return round(100 * log["test_accuracy"], 2)

    @torch.no_grad()
    def predicted_classes(self, images: torch.Tensor) -> np.ndarray:
        """The digit classifier's decision on each image (uint8 or [-1, 1] float)."""
        return torch.cat([self._classifier(b).argmax(1) for b in _as_float(images).split(500)]).numpy()
