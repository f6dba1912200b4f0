"""The ``fake`` backend: simulated quantization with each weight fake-quantized once."""

from __future__ import annotations

from torch import nn

from qdiff.backends.base import FrozenFakeQuantLayer, replace_layers


def convert_fake(qmodel: nn.Module) -> nn.Module:
    """Numerically the quantized model itself, with the weight quantization done once."""
    return replace_layers(qmodel, lambda _, layer: FrozenFakeQuantLayer(layer))
