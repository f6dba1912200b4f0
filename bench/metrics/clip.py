"""CLIP score of text-to-image samples through open_clip (Hessel et al., 2021; Radford et al., 2021).

Per image, ``max(100 · cos(E_image, E_text), 0)`` with its own prompt, averaged: the scale and
clipping of torchmetrics' ``CLIPScore``, so numbers read like the papers'. Images go through
open_clip's own evaluation transform for the model (resize, crop, normalise); only the model
forward is batched, on the run's device.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from bench.errors import AvailabilityError
from bench.metrics.quality import EvalContext, Measurement, Metric, with_intervals
from bench.registry import METRICS
from bench.spec import resolve_device

SCALE = "100 * cosine(image, text), clipped at 0 (torchmetrics CLIPScore)"


@lru_cache(maxsize=1)
def load_clip(model_name: str, pretrained: str, device: str):
    """open_clip model, evaluation transform and tokenizer; ``pretrained`` is a tag (its normal
    download) or a local checkpoint file."""
    import open_clip

    local = Path(pretrained).is_file()
    if not local and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        raise ValueError(f"clip_pretrained {pretrained}: no such file")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError) as exc:
        if local:
            raise
        # Hub downloads fail offline as OSError (connection, LocalEntryNotFound) or RuntimeError.
        raise AvailabilityError(
            f"CLIP weights {model_name}/{pretrained} are not available offline ({str(exc).splitlines()[0]}); "
            "download them once, or set clip_pretrained: /path/to/open_clip_model.safetensors"
        ) from None
    return model.eval().requires_grad_(False), preprocess, tokenizer


@torch.no_grad()
def clip_scores(
    images: torch.Tensor,
    prompts: list[str],
    model,
    preprocess,
    tokenizer,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-image CLIP scores of uint8 NCHW ``images`` against their ``prompts``."""
    from torchvision.transforms.functional import to_pil_image  # torchvision takes seconds to import

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W) with values 0-255; got {images.dtype} "
                         f"{tuple(images.shape)}")  # fmt: skip
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP score pairs them one to one")
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(to_pil_image(img)) for img in images[i : i + batch_size]])
        image = model.encode_image(pixels.to(device), normalize=True)
        text = model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True)
        out.append((100 * (image * text).sum(-1)).clamp(min=0).float().cpu())
    return torch.cat(out)


class CLIPScore(Metric):
    """Mean CLIP score of the samples against their prompts (text-to-image models)."""

    name = "clip_score"
    unit = "clip"
    higher_is_better = True
    requires = frozenset({"text-to-image"})
    settings = ("clip_model", "clip_pretrained")

    def check(self, evaluation) -> str | None:
        import open_clip

        if evaluation.clip_model not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if m.startswith(evaluation.clip_model.split("-")[0])]
            return f"unknown clip_model {evaluation.clip_model!r}; open_clip has e.g. {', '.join(close[:8])}"
        return None

    def __call__(self, ctx: EvalContext) -> Measurement:
        ev = ctx.spec.evaluation
        device = resolve_device(ctx.spec.sampling.device)
        model, preprocess, tokenizer = load_clip(ev.clip_model, ev.clip_pretrained, str(device))
        prompts = ctx.adapter.prompts(len(ctx.images))
        scores = clip_scores(ctx.images, prompts, model, preprocess, tokenizer, device).double().cpu().numpy()
        fp_scores = None
        if ctx.fp_images is not None:  # the same prompts and noise: a paired difference
            fp_scores = clip_scores(ctx.fp_images, prompts, model, preprocess, tokenizer, device)
            fp_scores = fp_scores.double().cpu().numpy()
        extra = {
            "clip_model": ev.clip_model,
            "clip_pretrained": ev.clip_pretrained,
            "scale": SCALE,
            "std": scores.std(ddof=1).item() if len(scores) > 1 else None,
        }

        def mean(idx, fp_idx):
            return float(scores[idx].mean() if idx is not None else fp_scores[fp_idx].mean())

        return with_intervals(mean, len(scores), paired=fp_scores is not None, extra=extra)


CLIP_SCORE = METRICS.add(CLIPScore())
