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
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture
def tiny_cond_unet():
    """A small random UNet2DConditionModel with cross-attention (Stable Diffusion's layout)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


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
