"""The harness's registries (methods, models, metrics): lazy ``"module:attr"`` entries of
:class:`qdiff.registry.Registry`, the one registry mechanism."""

from __future__ import annotations

from baselines import BASELINES
from qdiff.registry import Registry

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
