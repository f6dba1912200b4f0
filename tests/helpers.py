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
