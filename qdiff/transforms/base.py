"""The transform contract: a config that applies itself to a prepared model, and the per-layer
state whose hooks every layer implementation calls through :func:`run_layer`."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from qdiff.registry import Registry

KINDS = Registry("transform")  # kind → config class, filled as each module is imported


class LayerTransform(nn.Module):
    """One transform's state on one layer (its tensors are buffers, so they travel with the
    model and count in its stored bytes). The defaults change nothing."""

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The FP weight the quantized path multiplies with, given the one before this transform."""
        return w

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input before quantization and the op."""
        return x

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output ``y`` given its (transformed) input ``x``."""
        return y


def transformed_weight(transforms: Sequence[LayerTransform], w: torch.Tensor) -> torch.Tensor:
    for t in transforms:
        w = t.weight(w)
    return w


def run_layer(
    transforms: Sequence[LayerTransform], x: torch.Tensor, core: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """A layer with transforms: inputs transformed in order, ``core`` (input quantization and
    the op, simulated or a kernel), outputs transformed in order."""
    for t in transforms:
        x = t.input(x)
    y = core(x)
    for t in transforms:
        y = t.output(x, y)
    return y


class Transform:
    """Base of a transform's config: a frozen dataclass with a class-level ``kind`` (its name in
    a serialised ``QConfig``). Subclasses validate their fields and implement :meth:`apply`."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS.add(cls, cls.kind)

    def apply(self, qmodel: nn.Module, data: Any, batch_size: int) -> list[str]:
        """Attach this transform to the layers of a prepared model it applies to (``data``: the
        calibration inputs, for transforms that look at activations); returns their names."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


def transform_class(kind: str) -> type[Transform]:
    """The config class of a transform ``kind`` (every module of this package is imported first,
    so a new transform needs no entry anywhere else)."""
    import qdiff.transforms as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return KINDS.get(kind)  # an unknown kind: UnknownNameError (a KeyError) naming the valid ones


def smoothable(layer: Any) -> bool:
    """A Linear, or a 1×1 non-grouped Conv2d, whose inputs are quantized: the layers whose input
    can be scaled per channel (and whose weight factored) without changing the graph."""
    if not layer.has_act_quant:
        return False
    if layer.weight.ndim == 2:  # a QuantLinear
        return True
    return layer.weight.ndim == 4 and layer.kernel_size == (1, 1) and layer.groups == 1
