"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): migrate activation outliers into the weights.

For a layer ``y = X Wᵀ`` with input channels j, Eq. 4 of the paper:

    s_j = max|X_j|^α / max|W_{:,j}|^(1−α),     y = (X diag(s)⁻¹) (W diag(s))ᵀ

The function is unchanged; the layer quantizes ``X / s`` (channels with outlier activations
scaled down, so one per-tensor activation grid fits them all) and ``W · s`` (the weights'
per-output-channel grids absorb the growth). α trades difficulty between the two (0.5 in the
paper). ``max|X_j|`` is taken over the calibration data on the FP model.

Applied to the layers whose input can be smoothed per channel without changing the graph:
``Linear`` (attention projections, feed-forward, time embedding) and 1×1 ``Conv2d``
(shortcuts, ``proj_in``/``proj_out``). Deviation: the paper folds ``1/s`` into the preceding
LayerNorm; in a UNet most of these inputs do not come straight from a norm, so qdiff keeps the
division as a per-channel multiply at the layer input (where a deployment fuses it into the
activation-quantize kernel); ``weight_bytes`` counts the factors.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from qdiff.calibration import CalibData, run_model
from qdiff.modules import QuantConv2d, QuantLayer, QuantLinear
from qdiff.prepare import quant_layers, set_quant_state

MIN_SCALE = 1e-5


def smoothable(layer: QuantLayer) -> bool:
    """A Linear, or a 1×1 non-grouped Conv2d, whose inputs are quantized."""
    if not layer.has_act_quant:
        return False
    if isinstance(layer, QuantLinear):
        return True
    return isinstance(layer, QuantConv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


def _observe(amax: dict[str, torch.Tensor], name: str, layer: QuantLayer, args: tuple) -> None:
    x = args[0].detach().abs()
    x = x.amax(dim=(0, 2, 3)) if layer.weight.ndim == 4 else x.reshape(-1, x.shape[-1]).amax(dim=0)
    amax[name] = x if name not in amax else torch.maximum(amax[name], x)


@torch.no_grad()
def smooth(qmodel: nn.Module, data: CalibData, alpha: float, batch_size: int = 64) -> list[str]:
    """Set SmoothQuant factors on every smoothable layer of a prepared model, from its FP inputs
    on ``data``, and re-initialise those layers' weight grids on the smoothed weights.

    Returns:
        The names of the smoothed layers. Run :func:`qdiff.calibrate` afterwards: activation
        grids must be set on the smoothed inputs.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha={alpha} must be in [0, 1]")
    layers = {name: m for name, m in quant_layers(qmodel) if smoothable(m)}
    amax: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(partial(_observe, amax, name)) for name, m in layers.items()]
    set_quant_state(qmodel, weight=False, act=False)
    try:
        for batch in data.batches(batch_size):
            run_model(qmodel, batch)
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers.items():
        dims = [d for d in range(layer.weight.ndim) if d != 1]
        w_max = layer.weight.abs().amax(dim=dims).clamp(min=MIN_SCALE)
        x_max = amax[name].clamp(min=MIN_SCALE)
        layer.smooth_scale = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=MIN_SCALE)
        for q, part in zip(layer.weight_quantizer, layer.weight_parts(), strict=True):
            q.init_from(part)
    return list(layers)
