"""Test helpers shared by several modules."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's test criterion)."""
    noise = (reference - approx).pow(2).mean()
    return (10 * torch.log10(reference.pow(2).mean() / noise)).item()


def calib_for(unet, n: int = 32, cond_dim: int | None = None, seed: int = 0):
    """Random but plausible denoiser inputs (x_t ~ N(0, 1), timesteps across the schedule)."""
    import qdiff

    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    s = unet.config.sample_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = {} if cond_dim is None else {"encoder_hidden_states": torch.randn(n, 5, cond_dim, generator=g)}
    return qdiff.CalibData(x, t, cond)


TINY_SETTINGS = (
    "{device: cpu, samples: 24, steps: 4, batch_size: 24, calib_timesteps: 2, calib_samples: 4, "
    "weight_iters: 3, act_iters: 2}"
)


def tiny_matrix(tmp_path, methods: str = "[linear, qdiff]", bits: str = "[W8A8, W4A8, W4A32]", **extra) -> str:
    """A matrix file on the embedded model that runs in seconds."""
    from pathlib import Path

    lines = [
        "name: tiny",
        "models: [embedded-digits]",
        f"methods: {methods}",
        f"bits: {bits}",
        f"settings: {TINY_SETTINGS}",
        *[f"{k}: {v}" for k, v in extra.items()],
    ]
    path = Path(tmp_path) / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class FailingMethod:
    """A method whose quantization fails the way a GPU run can (registered by tests only)."""

    name = "boom"
    description = "fails with CUDA out of memory"
    weight_only = False

    def qconfig(self, bits):
        from bench.methods import QDIFFUSION

        return QDIFFUSION.qconfig(bits)

    def quantize(self, denoiser, qconfig, calib, progress=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class InterruptingMethod(FailingMethod):
    """Stands in for a killed process: the interrupt is not an error of the run."""

    name = "interrupt"

    def quantize(self, denoiser, qconfig, calib, progress=None):
        raise KeyboardInterrupt


BOOM = FailingMethod()
INTERRUPT = InterruptingMethod()
