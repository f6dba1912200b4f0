"""Name → object registries with lazy ``"module:attr"`` entries and helpful errors."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from baselines import BASELINES
from bench.errors import UnknownNameError


class Registry:
    """Maps short names to objects, importing each entry's module only when it is first used.

    Args:
        kind: what the entries are ("method", "model", ...), used in error messages.
        entries: ``{name: "package.module:attribute"}``.
    """

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def register(self, name: str, target: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def get(self, name: str) -> Any:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]


MODELS = Registry(
    "model",
    {
        "embedded-digits": "bench.models.embedded:EmbeddedDigits",
        "embedded-dit": "bench.models.embedded:EmbeddedDiT",
        "ddim-cifar10": "bench.models.pipelines:DDIMCifar10",
        "ldm-celebahq": "bench.models.pipelines:LDMCelebAHQ",
        "sd-1.5": "bench.models.pipelines:StableDiffusion15",
        "sdxl": "bench.models.transformers:StableDiffusionXL",
        "pixart-alpha": "bench.models.transformers:PixArtAlpha",
        "pixart-sigma": "bench.models.transformers:PixArtSigma",
        "sd3": "bench.models.transformers:StableDiffusion3",
        "flux": "bench.models.transformers:Flux",
        "dit-xl-2-256": "bench.models.transformers:DiTXL2",
    },
)

# Baselines register in baselines/__init__.py; Q-Diffusion and its ablations live in bench.methods.
METHODS = Registry(
    "method",
    {
        "fp": "bench.methods:FP",
        "qdiff": "bench.methods:QDIFFUSION",
        "qdiff-no-calib": "bench.methods:QDIFF_NO_CALIB",
        "qdiff-no-split": "bench.methods:QDIFF_NO_SPLIT",
        "qdiff-no-recon": "bench.methods:QDIFF_NO_RECON",
        "qdiff-asym": "bench.methods:QDIFF_ASYM",
        **BASELINES,
    },
)

METRICS = Registry(
    "metric",
    {
        "digits_fd": "bench.metrics.quality:DIGITS_FD",
        "fd_to_fp": "bench.metrics.quality:FD_TO_FP",
        "class_accuracy": "bench.metrics.quality:CLASS_ACCURACY",
        "psnr_vs_fp": "bench.metrics.quality:PSNR_VS_FP",
        "eps_mse": "bench.metrics.quality:EPS_MSE",
        "quantize_time": "bench.metrics.quality:QUANTIZE_TIME",
        "quantize_peak_memory": "bench.metrics.quality:QUANTIZE_PEAK_MEMORY",
        "fid": "bench.metrics.fid:FID_METRIC",
        "kid": "bench.metrics.fid:KID_METRIC",
        "inception_score": "bench.metrics.fid:INCEPTION_SCORE",
        "fid_vs_fp": "bench.metrics.fid:FID_VS_FP",
        "clip_score": "bench.metrics.clip:CLIP_SCORE",
        "lpips_vs_fp": "bench.metrics.lpips_metric:LPIPS_VS_FP",
        "latency_step": "bench.metrics.cost:LATENCY_STEP",
        "deploy_sqnr": "bench.metrics.cost:DEPLOY_SQNR",
        "latency_e2e": "bench.metrics.cost:LATENCY_E2E",
        "peak_memory": "bench.metrics.cost:PEAK_MEMORY",
        "weight_bytes": "bench.metrics.cost:WEIGHT_BYTES",
    },
)
