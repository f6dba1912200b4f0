"""Shared pieces of the asv benchmarks: thread count, the embedded model, small recipes."""

from __future__ import annotations

import os

import torch

import qdiff

# Two cores on the project's machines; the same count in every run so timings compare.
THREADS = int(os.environ.get("QDIFF_ASV_THREADS", "2"))
torch.set_num_threads(THREADS)

NO_RECON = qdiff.ReconConfig(method="none")
W8A8 = qdiff.QConfig(weight=qdiff.QuantSpec(8, True, "channel"), act=qdiff.QuantSpec(8), recon=NO_RECON)
W4A32 = qdiff.QConfig(weight=qdiff.QuantSpec(4, True, "channel"), act=None, recon=NO_RECON)
GPU_BACKENDS = ("int8", "fp8", "w4a16")


def sampling(batch_size: int, steps: int = 10, samples: int | None = None, device: str = "cpu"):
    from bench.spec import Sampling

    return Sampling(samples=samples or batch_size, steps=steps, batch_size=batch_size, device=device)


def adapter(model: str, batch_size: int, device: str = "cpu", steps: int = 10):
    """The embedded digits model, or the CIFAR-10 DDPM UNet with random weights."""
    from bench.models.embedded import EmbeddedDigits
    from bench.models.pipelines import DDIMCifar10

    s = sampling(batch_size, steps, device=device)
    return EmbeddedDigits(s) if model == "embedded" else DDIMCifar10(s, init="random")


def skip_without_cuda(backend: str) -> None:
    """asv's way to skip a parameter combination: NotImplementedError from setup."""
    if backend in GPU_BACKENDS and not torch.cuda.is_available():
        raise NotImplementedError(f"backend {backend} needs CUDA")
