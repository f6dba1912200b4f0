"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): migrate activation outliers into the weights.

For a layer ``y = X Wᵀ`` with input channels j, Eq. 4 of the paper:

    s_j = max|X_j|^α / max|W_{:,j}|^(1−α),     y = (X diag(s)⁻¹) (W diag(s))ᵀ

The function is unchanged; the layer quantizes ``X / s`` (channels with outlier activations
scaled down, so one per-tensor activation grid fits them all) and ``W · s`` (the weights'
per-output-channel grids absorb the growth). α trades difficulty between the two (0.5 in the
paper). ``max|X_j|`` is taken over the calibration data on the FP model.

Applied to the layers whose input can be smoothed per channel without changing the graph
(:func:`~qdiff.transforms.base.smoothable`): ``Linear`` (attention projections, feed-forward,
time embedding) and 1×1 ``Conv2d`` (shortcuts, ``proj_in``/``proj_out``). Deviation: the paper
folds ``1/s`` into the preceding LayerNorm; in a UNet most of these inputs do not come straight
from a norm, so qdiff keeps the division as a per-channel multiply at the layer input (where a
deployment fuses it into the activation-quantize kernel); ``weight_bytes`` counts the factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from qdiff.calibration import CalibData, run_model
from qdiff.config import ConfigError
from qdiff.hooks import installed
from qdiff.prepare import quant_layers, set_quant_state
from qdiff.transforms.base import LayerTransform, Transform, smoothable
from qdiff.validate import number

MIN_SCALE = 1e-5


class SmoothScale(LayerTransform):
    """A layer's factors ``s``: it computes ``(x / s) · (W · s)ᵀ``, quantizing both factors."""

    def __init__(self, scale: torch.Tensor, conv: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.conv = conv  # input channels: dim 1 of a conv input, the last of a linear one

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        shape = [1] * w.ndim
        shape[1] = -1  # a weight's input channels, conv or linear
        return w * self.scale.view(shape)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[1 if self.conv else -1] = -1
        return x / self.scale.view(shape)


def _observe(amax: dict[str, torch.Tensor], name: str, layer: nn.Module, args: tuple) -> None:
    x = args[0].detach().abs()
    x = x.amax(dim=(0, 2, 3)) if layer.weight.ndim == 4 else x.reshape(-1, x.shape[-1]).amax(dim=0)
    amax[name] = x if name not in amax else torch.maximum(amax[name], x)


@torch.no_grad()
def smooth(qmodel: nn.Module, data: CalibData, alpha: float, batch_size: int = 64) -> list[str]:
    """Give every smoothable layer of a prepared model SmoothQuant factors from its FP inputs on
    ``data``, re-initialising its weight grids on the smoothed weight.

    Returns:
        The names of the smoothed layers. Run :func:`qdiff.calibrate` afterwards: activation
        grids must be set on the smoothed inputs.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha={alpha} must be in [0, 1]")
    layers = {name: m for name, m in quant_layers(qmodel) if smoothable(m)}
    amax: dict[str, torch.Tensor] = {}
    set_quant_state(qmodel, weight=False, act=False)
    with installed(m.register_forward_pre_hook(partial(_observe, amax, name)) for name, m in layers.items()):
        for batch in data.batches(batch_size):
            run_model(qmodel, batch)
    for name, layer in layers.items():
        w = layer.effective_weight()
        dims = [d for d in range(w.ndim) if d != 1]
        w_max = w.abs().amax(dim=dims).clamp(min=MIN_SCALE)
        x_max = amax[name].clamp(min=MIN_SCALE)
        scale = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=MIN_SCALE)
        layer.add_transform(SmoothScale(scale, conv=w.ndim == 4))
    return list(layers)


@dataclass(frozen=True)
class Smooth(Transform):
    """SmoothQuant with migration strength ``alpha`` in [0, 1] (the paper: 0.5)."""

    alpha: float = 0.5
    kind = "smooth"

    def __post_init__(self) -> None:
        problem = number(self.alpha, allow_zero=True)
        if problem or self.alpha > 1:
            raise ConfigError(f"Smooth.alpha={self.alpha!r} must be a number in [0, 1]")

    def apply(self, qmodel: nn.Module, data: CalibData, batch_size: int) -> list[str]:
        return smooth(qmodel, data, self.alpha, batch_size=batch_size)
