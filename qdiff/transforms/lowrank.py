"""SVDQuant's low-rank branch (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components
for 4-Bit Diffusion Models", ICLR 2025).

After smoothing (:mod:`qdiff.transforms.smooth`) the outliers sit in the weights, ``Ŵ = W · s``.
SVDQuant splits ``Ŵ = L₁L₂ + R`` with ``L₁L₂`` the rank-r truncated SVD of ``Ŵ`` (Eq. 7:
``L₁ = UΣ``, ``L₂ = Vᵀ``, top r singular values), keeps the branch in 16 bits and quantizes only
the residual, whose magnitude and outliers are much smaller:

    X̂Ŵᵀ ≈ X̂ L₂ᵀ L₁ᵀ  +  Q(X̂) Q(R)ᵀ        (X̂ = X / s)

Here the factors are stored in float16 (the paper's 16-bit branch) and ``weight_bytes`` counts
them. Applied to the same layers as smoothing: Linear and 1×1 conv with quantized inputs.
Deviation: the paper fuses the branch into the 4-bit kernel (Nunchaku); qdiff computes it as two
thin products beside the quantized main path, simulated or on a backend's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.config import ConfigError
from qdiff.prepare import quant_layers
from qdiff.transforms.base import LayerTransform, Transform, smoothable


class LowRankBranch(LayerTransform):
    """A layer's 16-bit factors ``U`` (``L₁``) and ``V`` (``L₂``): it quantizes ``W − U V`` and
    adds ``x Vᵀ Uᵀ``, as two thin products (1×1 convs for a conv layer, with its stride)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, stride=None, padding=None) -> None:
        super().__init__()
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.stride, self.padding = stride, padding  # None for a Linear

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w - (self.u.float() @ self.v.float()).view_as(w)

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u, v = self.u.to(x.dtype), self.v.to(x.dtype)
        if self.stride is not None:
            h = F.conv2d(x, v[:, :, None, None], None, self.stride, self.padding)
            return y + F.conv2d(h, u[:, :, None, None])
        return y + F.linear(F.linear(x, v), u)


@torch.no_grad()
def add_low_rank(qmodel: nn.Module, rank: int) -> list[str]:
    """Give every smoothable layer a rank-``rank`` 16-bit branch from the SVD of its (smoothed)
    weight, re-initialising its weight grids on the residual. Apply after smoothing and before
    :func:`qdiff.calibrate`.

    Returns:
        The names of the layers that got a branch.
    """
    if rank < 1:
        raise ValueError(f"low-rank branch rank={rank} must be >= 1")
    names = []
    for name, layer in quant_layers(qmodel):
        if not smoothable(layer):
            continue
        w = layer.effective_weight().float()
        flat = w.reshape(w.shape[0], -1)  # (out, in) for Linear and 1×1 conv
        u, sigma, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, len(sigma))
        conv = w.ndim == 4
        layer.add_transform(
            LowRankBranch(
                (u[:, :r] * sigma[:r]).to(torch.float16),
                vh[:r].contiguous().to(torch.float16),
                layer.stride if conv else None,
                layer.padding if conv else None,
            )
        )
        names.append(name)
    return names


@dataclass(frozen=True)
class LowRank(Transform):
    """SVDQuant's 16-bit branch of rank ``rank`` (the paper: 32); list it after :class:`Smooth`."""

    rank: int = 32
    kind = "low_rank"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LowRank.rank={self.rank!r} must be an integer >= 1")

    def apply(self, qmodel: nn.Module, data, batch_size: int) -> list[str]:
        return add_low_rank(qmodel, self.rank)
