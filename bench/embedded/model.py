"""Architecture and loading of the embedded diffusion model and its feature classifier."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.errors import AssetError

ASSETS = Path(__file__).parent / "assets"

# Three resolutions (16, 8, 4): every up block concatenates skip features, and the 4×4 level
# plus the mid block carry self-attention, so both of Q-Diffusion's problem spots exist.
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)
# The conditional model: a class-conditional DiT (adaLN-Zero blocks, as in Peebles & Xie) on
# the same 16×16 digits. Patches of 4×4 pixels are 2×2 pixels of the original 8×8 digits, so
# 16 tokens carry the image; 4 blocks of width 128 keep sampling with guidance (a doubled
# batch) CPU-sized. Label 10 is the null class of classifier-free guidance.
DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    sample_size=16,
    patch_size=4,
    num_embeds_ada_norm=10,
)
NULL_CLASS = 10
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
)


class DigitClassifier(nn.Module):
    """Small CNN on 16×16 digits; its 64-d penultimate layer is the metric's feature space."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 16, self.feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise AssetError(
            f"missing checkpoint {path}; reinstall qdiff-bench or retrain with "
            "`python -m bench.embedded.train --replace`"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise AssetError(
            f"corrupt checkpoint {path} ({exc}); restore it with `git checkout -- {path}` "
            "or retrain with `python -m bench.embedded.train --replace`"
        ) from exc


def _load_diffusers(cls, directory: Path, what: str):
    """A diffusers model from a ``save_pretrained`` directory, read as JSON + safetensors only."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise AssetError(
            f"missing {config_path}; retrain with `python -m bench.embedded.train {what} --replace`"
        )
    model = cls.from_config(json.loads(config_path.read_text()))
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = _load_state(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shapes or names disagree with config.json
        raise AssetError(f"checkpoint {weights} does not match {config_path}: {exc}") from exc
    return model.eval().requires_grad_(False)


def load_unet(directory: Path | str | None = None):
    """The trained embedded UNet2DModel (EMA weights) from a diffusers-style directory."""
    from diffusers import UNet2DModel

    directory = Path(directory) if directory is not None else ASSETS / "unet"
    return _load_diffusers(UNet2DModel, directory, "unet")


def load_dit(directory: Path | str | None = None):
    """The trained embedded class-conditional DiTTransformer2DModel (EMA weights)."""
    from diffusers import DiTTransformer2DModel

    directory = Path(directory) if directory is not None else ASSETS / "dit"
    return _load_diffusers(DiTTransformer2DModel, directory, "dit")


def load_classifier(path: Path | str | None = None) -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(_load_state(Path(path) if path is not None else ASSETS / "classifier.safetensors"))
    return model.eval().requires_grad_(False)
