"""LPIPS of each quantized sample against its FP twin (Zhang et al., 2018), through the ``lpips``
package: the paired perceptual fidelity that quantization papers report beside FID (SVDQuant,
MixDQ, ViDiT-Q), which FID against real data can hide (a broken W4A4 model may keep its FID).

AlexNet backbone, LPIPS v0.1 linear heads (shipped inside the package). The backbone's ImageNet
weights are torchvision's ``alexnet-owt-7be5be79.pth``: ``lpips_weights`` names a local copy, or
torch's hub cache already holds it; nothing is downloaded. Images smaller than 64 pixels (the
patch size LPIPS was calibrated on; AlexNet's strides leave nothing of a 16×16 digit) are
resized up to 64 first, and grey images repeat to three channels.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import AvailabilityError
from bench.fsio import missing_path
from bench.metrics.quality import EvalContext, Measurement, Metric, with_intervals
from bench.registry import METRICS
from bench.spec import resolve_device

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet ImageNet weights
MIN_SIDE = 64


def backbone_file(setting: str) -> Path:
    """The AlexNet weights to load: the setting's file, else torch's hub cache.

    Raises:
        AvailabilityError: neither exists.
    """
    if setting:
        return Path(setting)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if cached.is_file():
        return cached
    raise AvailabilityError(
        f"lpips_vs_fp needs torchvision's AlexNet ImageNet weights ({ALEXNET_FILE}) and nothing is "
        f"downloaded: set lpips_weights: /path/to/{ALEXNET_FILE}, or put it in {cached.parent}"
    )


@lru_cache(maxsize=2)
def load_lpips(weights: str, device: str) -> torch.nn.Module:
    """The LPIPS(AlexNet) model with the backbone from ``weights`` (a torch state dict, loaded
    as tensors only: nothing in it can execute)."""
    import lpips
    import torchvision

    # pnet_rand: build the backbone without torchvision's download; its weights follow.
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated ``pretrained=``
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    features = torchvision.models.alexnet().features
    state = torch.load(weights, map_location="cpu", weights_only=True)
    features.load_state_dict(
        {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    )
    for part in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index, module in part.named_children():
            module.load_state_dict(features[int(index)].state_dict())
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips_distances(
    images: torch.Tensor, fp_images: torch.Tensor, model: torch.nn.Module, device, batch_size: int = 64
) -> np.ndarray:
    """Per-pair LPIPS of uint8 NCHW images against their FP twins."""
    out = []
    for i in range(0, len(images), batch_size):
        pair = [_prepared(x[i : i + batch_size]).to(device) for x in (images, fp_images)]
        out.append(model(*pair).flatten().double().cpu())
    return torch.cat(out).numpy()


def _prepared(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1  # LPIPS reads [-1, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = min(x.shape[-2:])
    if side < MIN_SIDE:
        x = F.interpolate(x, scale_factor=MIN_SIDE / side, mode="bilinear", align_corners=False)
    return x


class LPIPSvsFP(Metric):
    """Mean LPIPS (AlexNet, v0.1) of the quantized samples against the FP samples from the same
    noise and prompts; 0 is the FP model itself. Interval: bootstrap over the image pairs."""

    name = "lpips_vs_fp"
    unit = "lpips"
    higher_is_better = False
    quantized_only = True
    settings = ("lpips_weights",)

    def check(self, evaluation) -> str | None:
        problem = missing_path(evaluation.lpips_weights) if evaluation.lpips_weights else None
        return f"lpips_weights {problem}" if problem else None

    def __call__(self, ctx: EvalContext) -> Measurement | None:
        if ctx.fp_images is None:
            return None
        weights = backbone_file(ctx.spec.evaluation.lpips_weights)
        device = resolve_device(ctx.spec.sampling.device)
        model = load_lpips(os.fspath(weights), str(device))
        per_pair = lpips_distances(ctx.images, ctx.fp_images, model, device)
        return with_intervals(lambda idx, _: float(per_pair[idx].mean()), len(per_pair), paired=False,
                              extra={"lpips_net": "alex", "lpips_version": "0.1"})  # fmt: skip


LPIPS_VS_FP = METRICS.add(LPIPSvsFP())
