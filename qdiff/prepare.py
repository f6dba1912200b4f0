"""Swap a model's layers for quantized ones, and switch quantization on and off."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace

from torch import nn

from qdiff.config import QConfig, QuantSpec
from qdiff.modules import QuantAttnProcessor, QuantConv2d, QuantLayer, QuantLinear, QuantModule

FilterFn = Callable[[str, nn.Module], bool]


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are new ``Parameter`` objects over the same
    storage, so a real-size model is not held twice while it is quantized or deployed (SDXL's
    UNet is 9.6 GiB in float32).

    Sharing is safe because nothing here writes a weight in place: quantization reads the
    weights (transforms compute effective weights; layers are replaced, not edited), and a cast
    of the copy (``.to(dtype)``) rebinds the copy's own ``Parameter`` objects, never the
    original's. ``tests/test_quantize.py`` holds both.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def find_skip_concats(model: nn.Module) -> dict[str, int]:
    """Layers that consume a UNet skip concatenation directly, with the decoder-half width.

    In diffusers UNets (``UNet2DModel``, ``UNet2DConditionModel``) every ResNet of an up block
    receives ``cat([decoder, skip], dim=1)``; its 1×1 ``conv_shortcut`` is the layer that sees the
    raw, bimodal concatenation (``conv1`` sees it only after GroupNorm and SiLU). The decoder
    half of the j-th ResNet is the previous ResNet's output, or for j = 0 whatever entered the
    up block: the mid block's output, then each up block's output in turn.

    Returns:
        ``{qualified conv_shortcut name: number of decoder channels}`` for the first such UNet
        in ``model`` (itself, or a wrapped one); empty for models without diffusers-style
        ``up_blocks``, e.g. transformer denoisers, which have no skip concatenations.
    """
    for prefix, module in model.named_modules():
        if hasattr(module, "up_blocks") and hasattr(getattr(module, "mid_block", None), "resnets"):
            found = _unet_skip_concats(module)
            return {f"{prefix}.{name}" if prefix else name: n for name, n in found.items()}
    return {}


def _unet_skip_concats(unet: nn.Module) -> dict[str, int]:
    up_blocks, mid = unet.up_blocks, unet.mid_block
    splits: dict[str, int] = {}
    decoder_channels = mid.resnets[-1].out_channels
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is not None and decoder_channels < resnet.in_channels:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = decoder_channels
            decoder_channels = resnet.out_channels
    return splits


# Attention processors whose computation QuantAttnProcessor reproduces step for step. Joint
# (SD3, FLUX: text and image tokens in one softmax, RMS-normed Q/K, rotary embeddings) and other
# processors keep their FP matmuls; their projections are quantized like any Linear.
STANDARD_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def _is_diffusers_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "to_q")


def _standard_attention(module: nn.Module) -> bool:
    """A diffusers ``Attention`` computing plain (cross-)attention, without Q/K norms."""
    return (
        type(module.processor).__name__ in STANDARD_PROCESSORS
        and getattr(module, "norm_q", None) is None
        and getattr(module, "add_q_proj", None) is None
    )


def fp_attention(model: nn.Module) -> list[str]:
    """The diffusers attention modules whose two matmuls :func:`prepare` leaves in FP (their
    processor is not one it reproduces, :data:`STANDARD_PROCESSORS`)."""
    return [
        name
        for name, module in model.named_modules()
        if _is_diffusers_attention(module) and not isinstance(module.processor, QuantAttnProcessor)
    ]


def prepare(model: nn.Module, qconfig: QConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every Conv2d/Linear (and diffusers attention matmuls) with quantized modules.

    In a transformer denoiser that is every Q/K/V/out projection, MLP and adaLN modulation
    linear, and the two matmuls of standard attention (see :data:`STANDARD_PROCESSORS`;
    :func:`fp_attention` lists those left in FP); split shortcut finds nothing to split.

    The first and last of those layers in module order (a UNet's ``conv_in`` and ``conv_out``)
    get at least ``qconfig.first_last_bits``. Weight grids are initialised here from the
    weights; activation grids are not, until :func:`qdiff.calibrate` runs. The model is
    modified in place and returned with quantization switched off (it behaves exactly as the
    FP model until ``set_quant_state``).

    Args:
        model: the denoiser (e.g. a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``).
        qconfig: the recipe.
        filter_fn: ``(qualified_name, module) -> bool``; layers for which it is False stay FP.

    Returns:
        The same model object, prepared.
    """
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("model is already prepared; call prepare on an FP model")
    splits = find_skip_concats(model) if qconfig.split_shortcut else {}
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and (filter_fn is None or filter_fn(name, module)):
            replacements.append((name, module))
    edges = {replacements[0][0], replacements[-1][0]} if replacements else set()
    for name, module in replacements:
        kind = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        weight, act = qconfig.weight, qconfig.act
        if name in edges and qconfig.first_last_bits is not None:
            weight, act = _at_least(weight, qconfig.first_last_bits), _at_least(act, qconfig.first_last_bits)
        quant = kind(module, weight, act, split=splits.get(name))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quant)
    if qconfig.quantize_attention and qconfig.act is not None:
        for name, module in list(model.named_modules()):
            if (
                _is_diffusers_attention(module)
                and _standard_attention(module)
                and (filter_fn is None or filter_fn(name, module))
            ):
                processor = QuantAttnProcessor(qconfig.qkv_spec, qconfig.probs_spec)
                module.set_processor(processor.to(module.to_q.weight.device))
    set_quant_state(model, weight=False, act=False)
    return model


def _at_least(spec: QuantSpec | None, bits: int) -> QuantSpec | None:
    return spec if spec is None or spec.bits >= bits else replace(spec, bits=bits)


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation fake quantization of every quantized module."""
    for _, module in quant_modules(model):
        module.set_quant_state(weight, act)
