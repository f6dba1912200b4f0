"""Quantized layers: Conv2d, Linear and the two attention matmuls.

Every module keeps its FP weight untouched and quantizes on the fly, so one model serves as its
own FP reference (``set_quant_state(False, False)``) during calibration and reconstruction.
Activations are quantized at the *input* of each layer, which is where an integer kernel needs
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.config import QuantSpec
from qdiff.quantizer import AdaRoundQuantizer, UniformAffineQuantizer
from qdiff.transforms.base import LayerTransform, run_layer, transformed_weight


class QuantModule(nn.Module):
    """Anything with quantizers that can be switched on and off."""

    use_weight_quant: bool = False
    use_act_quant: bool = False

    def set_quant_state(self, weight: bool, act: bool) -> None:
        self.use_weight_quant = weight and self.has_weight_quant
        self.use_act_quant = act and self.has_act_quant

    @property
    def has_weight_quant(self) -> bool:
        return False

    @property
    def has_act_quant(self) -> bool:
        return False

    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        return []


class QuantLayer(QuantModule):
    """A Conv2d or Linear with weight and input quantizers.

    With ``split`` set (split shortcut quantization, Q-Diffusion Sec. 4.2), the input's first
    ``split`` channels and the rest get separate activation quantizers, and the weight is cut
    along its input channels to match, each part with its own per-channel grid.

    Args:
        fp: the layer to wrap (its parameters are shared, not copied).
        weight: weight spec, or None for FP weights.
        act: input activation spec, or None for FP inputs.
        split: number of input channels in the first part of a concatenated input.
    """

    def __init__(
        self,
        fp: nn.Conv2d | nn.Linear,
        weight: QuantSpec | None,
        act: QuantSpec | None,
        split: int | None = None,
    ) -> None:
        super().__init__()
        self.weight = fp.weight
        self.bias = fp.bias
        in_channels = self.weight.shape[1]
        if split is not None and not 0 < split < in_channels:
            raise ValueError(f"split={split} must lie inside the {in_channels} input channels")
        self.split = split
        parts = 1 if split is None else 2
        ndim = self.weight.ndim
        self.weight_quantizer = nn.ModuleList(
            [UniformAffineQuantizer(weight, channel_dim=0, ndim=ndim) for _ in range(parts)]
            if weight is not None
            else []
        )
        self.act_quantizer = nn.ModuleList(
            [UniformAffineQuantizer(act) for _ in range(parts)] if act is not None else []
        )
        # Grids live where the layer does: a model prepared on a GPU calibrates and runs there.
        self.weight_quantizer.to(self.weight.device)
        self.act_quantizer.to(self.weight.device)
        # Algorithms that change what the layer computes (SmoothQuant, SVDQuant's branch), in the
        # order they were applied (see qdiff.transforms).
        self.transforms = nn.ModuleList()
        if weight is not None:
            for q, w in zip(self.weight_quantizer, self.weight_parts(), strict=True):
                q.init_from(w)

    @property
    def has_weight_quant(self) -> bool:
        return len(self.weight_quantizer) > 0

    @property
    def has_act_quant(self) -> bool:
        return len(self.act_quantizer) > 0

    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        return list(self.act_quantizer)

    def effective_weight(self) -> torch.Tensor:
        """The FP weight the quantized path multiplies with: the layer's weight after its
        transforms (``W · s`` when smoothed, minus ``U V`` with a low-rank branch)."""
        return transformed_weight(self.transforms, self.weight)

    def add_transform(self, transform: LayerTransform) -> None:
        """Attach a transform's state to this layer and re-initialise the weight grids on the
        weight it now quantizes."""
        self.transforms.append(transform)
        for q, part in zip(self.weight_quantizer, self.weight_parts(), strict=True):
            q.init_from(part)

    def weight_parts(self) -> list[torch.Tensor]:
        w = self.effective_weight()
        if self.split is None:
            return [w]
        return [w[:, : self.split], w[:, self.split :]]

    def input_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.split is None:
            return [x]
        dim = 1 if self.weight.ndim == 4 else -1
        return list(x.split([self.split, x.shape[dim] - self.split], dim=dim))

    def quantized_weight(self) -> torch.Tensor:
        parts = [q(w) for q, w in zip(self.weight_quantizer, self.weight_parts(), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        parts = [q(p) for q, p in zip(self.act_quantizer, self.input_parts(x), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 if x.ndim == 4 else -1)

    def enable_adaround(self) -> list[AdaRoundQuantizer]:
        """Swap each weight grid for a learnable AdaRound rounding of the same grid."""
        rounders = []
        for i, (q, w) in enumerate(zip(self.weight_quantizer, self.weight_parts(), strict=True)):
            if not isinstance(q, AdaRoundQuantizer):
                q = AdaRoundQuantizer(q, w)
                self.weight_quantizer[i] = q
            rounders.append(q)
        return rounders

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.quantized_weight() if self.use_weight_quant else self.effective_weight())

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer on input ``x`` with (quantized) weight ``w``: input quantization and the op,
        inside the layer's transforms."""
        return run_layer(
            self.transforms, x, lambda x: self.op(self.quantize_input(x) if self.use_act_quant else x, w)
        )

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantConv2d(QuantLayer):
    def __init__(self, fp: nn.Conv2d, weight, act, split=None) -> None:
        if fp.padding_mode != "zeros":
            raise ValueError(f"padding_mode={fp.padding_mode!r} is not supported; only 'zeros'")
        super().__init__(fp, weight, act, split)
        self.in_channels, self.out_channels = fp.in_channels, fp.out_channels
        self.kernel_size, self.stride, self.padding = fp.kernel_size, fp.stride, fp.padding
        self.dilation, self.groups = fp.dilation, fp.groups

    def op(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, split={self.split}"


class QuantLinear(QuantLayer):
    def __init__(self, fp: nn.Linear, weight, act, split=None) -> None:
        super().__init__(fp, weight, act, split)
        self.in_features, self.out_features = fp.in_features, fp.out_features

    def op(self, x, w):
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantMatMul(QuantModule):
    """``a @ b`` with both operands quantized per tensor (attention Q·Kᵀ or softmax·V)."""

    def __init__(self, a: QuantSpec, b: QuantSpec) -> None:
        super().__init__()
        self.quant_a = UniformAffineQuantizer(a)
        self.quant_b = UniformAffineQuantizer(b)

    @property
    def has_act_quant(self) -> bool:
        return True

    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        return [self.quant_a, self.quant_b]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant:
            a, b = self.quant_a(a), self.quant_b(b)
        return torch.matmul(a, b)


# Elements of one attention slice's score matrix (64 MiB in float32: one SD-1.5 head at 512²).
SLICE_SCORES = 1 << 24


class AttnProcessorSteps(nn.Module):
    """diffusers' reference ``AttnProcessor`` step for step (group/spatial norm, 4-D inputs,
    cross-attention norm, masks, residual, rescale), with the attention itself
    (:meth:`attention`) left to the subclass: simulated quantization here, a deployment's form
    in a backend. The projections are the Attention's own (possibly quantized) ``to_q/to_k/
    to_v/to_out`` layers. Being an ``nn.Module``, a processor is registered as the Attention's
    ``processor`` submodule, so its quantizers are part of the model's state dict."""

    # diffusers passes only the keyword arguments named in ``__call__``'s signature (``temb``
    # among them), so the signature is spelled out instead of nn.Module's ``*args, **kwargs``.
    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        hidden_states = self.attention(attn, query, key, value, attention_mask)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attention(self, attn, query, key, value, attention_mask):
        """``softmax(Q·Kᵀ · scale + mask) · V`` over ``attn.heads`` heads, from and to
        ``[batch, tokens, heads × dim]``; ``attention_mask`` as the Attention was given it."""
        raise NotImplementedError


class QuantAttnProcessor(AttnProcessorSteps):
    """A diffusers attention processor whose two matmuls are :class:`QuantMatMul`: Q, K and V
    on ``qkv``'s grids, the softmax probabilities on ``probs``'s."""

    def __init__(self, qkv: QuantSpec, probs: QuantSpec) -> None:
        super().__init__()
        self.qk = QuantMatMul(qkv, qkv)
        self.pv = QuantMatMul(probs, qkv)

    def attention(self, attn, query, key, value, attention_mask):
        batch, seq_len = key.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        key = key.transpose(-1, -2)
        # Attention slicing over batch x heads: the (fake-)quantized scores and probabilities
        # cannot use a fused kernel, so each slice materialises its scores, and SD-1.5's 4096
        # tokens make that 512 MiB per image per layer, several times over in the quantizers'
        # temporaries. The grids are per tensor, so slicing changes no value; an observer sees
        # one call per slice (the same extremes, a larger sample for the ``mse`` search).
        rows = max(1, SLICE_SCORES // (query.shape[1] * key.shape[-1]))
        out = []
        for i in range(0, query.shape[0], rows):
            mask = attention_mask
            if mask is not None and mask.shape[0] > 1:
                mask = mask[i : i + rows]
            out.append(self._attend(attn, query[i : i + rows], key[i : i + rows], value[i : i + rows], mask))
        return attn.batch_to_head_dim(out[0] if len(out) == 1 else torch.cat(out))

    def _attend(self, attn, query, key_t, value, attention_mask):
        scores = self.qk(query, key_t) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        del scores
        return self.pv(probs, value)
