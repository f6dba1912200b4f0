"""SVDQuant's low-rank branch (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components
for 4-Bit Diffusion Models", ICLR 2025).

After smoothing (:mod:`qdiff.smooth`) the outliers sit in the weights, ``Ŵ = W · s``. SVDQuant
splits ``Ŵ = L₁L₂ + R`` with ``L₁L₂`` the rank-r truncated SVD of ``Ŵ`` (Eq. 7: ``L₁ = UΣ``,
``L₂ = Vᵀ``, top r singular values), keeps the branch in 16 bits and quantizes only the
residual, whose magnitude and outliers are much smaller:

    X̂Ŵᵀ ≈ X̂ L₂ᵀ L₁ᵀ  +  Q(X̂) Q(R)ᵀ        (X̂ = X / s)

Here the factors are stored in float16 (the paper's 16-bit branch) and ``weight_bytes`` counts
them. Applied to the same layers as smoothing: Linear and 1×1 conv with quantized inputs.
Deviation: the paper fuses the branch into the 4-bit kernel (Nunchaku); qdiff computes it as two
thin products beside the fake-quantized main path.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.prepare import quant_layers
from qdiff.smooth import smoothable


@torch.no_grad()
def add_low_rank(qmodel: nn.Module, rank: int) -> list[str]:
    """Give every smoothable layer a rank-``rank`` 16-bit branch from the SVD of its (smoothed)
    weight, and re-initialise its weight grids on the residual. Run after :func:`qdiff.smooth`
    and before :func:`qdiff.calibrate`.

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
        layer.lowrank_u = (u[:, :r] * sigma[:r]).to(torch.float16)
        layer.lowrank_v = vh[:r].contiguous().to(torch.float16)
        for q, part in zip(layer.weight_quantizer, layer.weight_parts(), strict=True):
            q.init_from(part)
        names.append(name)
    return names
