"""The ``fake`` backend: simulated quantization with each weight fake-quantized once."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from qdiff.modules import QuantLayer
from qdiff.prepare import quant_layers


class FrozenFakeQuantLayer(nn.Module):
    """A quantized layer with its fake-quantized weight precomputed (no per-call weight quant)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            w = layer.quantized_weight() if layer.use_weight_quant else layer.effective_weight()
        self.register_buffer("weight_q", w.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.compute(x, self.weight_q)


def replace_layers(qmodel: nn.Module, build: Callable[[str, QuantLayer], nn.Module]) -> nn.Module:
    """An inference copy of ``qmodel`` with every quantized layer replaced by ``build(name, layer)``."""
    model = copy.deepcopy(qmodel).eval().requires_grad_(False)
    for name, layer in list(quant_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(name, layer))
    return model


def deploy_layers(
    qmodel: nn.Module, kernel_layer: Callable[[QuantLayer], nn.Module], runs: Callable[[QuantLayer], bool]
) -> nn.Module:
    """``qmodel`` with each quantized layer the backend ``runs`` as ``kernel_layer(layer)``, and
    every other one simulated (counted by :func:`qdiff.backends.layer_report`)."""
    return replace_layers(
        qmodel, lambda _, layer: kernel_layer(layer) if runs(layer) else FrozenFakeQuantLayer(layer)
    )


def convert_fake(qmodel: nn.Module) -> nn.Module:
    """Numerically the quantized model itself, with the weight quantization done once."""
    return replace_layers(qmodel, lambda _, layer: FrozenFakeQuantLayer(layer))
