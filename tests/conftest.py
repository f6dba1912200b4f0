"""Shared fixtures: tiny seeded diffusers models, no downloads, explicit CPU threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Two cores on CI: torch's default threading oversubscribes badly when both are busy.
torch.set_num_threads(int(os.environ.get("QDIFF_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDIFF_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_unet():
    """A small random UNet2DModel with skip concatenations and attention at the lowest level."""
    from tiny_pipelines import unet2d

    torch.manual_seed(0)
    return unet2d(in_channels=1, sample_size=8).eval()


@pytest.fixture
def tiny_cond_unet():
    """A small random UNet2DConditionModel with cross-attention (Stable Diffusion's layout)."""
    from tiny_pipelines import cond_unet

    torch.manual_seed(0)
    return cond_unet().eval()


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny random DDPM, LDM and Stable Diffusion pipelines saved as local directories."""
    from tiny_pipelines import save_ddpm, save_ldm, save_sd

    root = tmp_path_factory.mktemp("pipelines")
    return {
        "ddim-cifar10": save_ddpm(root / "ddpm"),
        "ldm-celebahq": save_ldm(root / "ldm"),
        "sd-1.5": save_sd(root / "sd"),
    }
