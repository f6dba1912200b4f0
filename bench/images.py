"""Sample grids as PNG, for eyeballing what a metric summarises, and their thumbnails in reports.

A grid records its layout in a PNG text chunk (``qdiff-bench-grid``), so a report can cut the
first few samples out of it without knowing the model: the same noise seeds side by side for FP
and every method.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

GRID_KEY = "qdiff-bench-grid"


def preview_name(
    model: str, method: str, backend: str | None, bits: str, seed: int, calib_seed: int | None
) -> str:
    """The file name of one run's grid: ``backend`` None for FP and simulated runs,
    ``calib_seed`` None for FP."""
    on = "" if backend is None else f"-{backend}"
    calib = "" if calib_seed is None else f"c{calib_seed}"
    return f"{model}-{method}{on}-{bits}-s{seed}{calib}.png"


def save_grid(images: torch.Tensor, path: Path, columns: int = 16, scale: int = 3) -> Path:
    """Save uint8 images (N, C, H, W) as one PNG grid; small images are ``scale``× enlarged."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    n, c, h, w = images.shape
    scale = scale if h < 64 else 1
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.full((c, rows * (h + 1) + 1, columns * (w + 1) + 1), 255, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    info = PngInfo()
    info.add_text(GRID_KEY, json.dumps({"n": n, "height": h, "width": w, "columns": columns, "scale": scale}))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, pnginfo=info)
    return path


def strip(path: Path, count: int = 8, height: int = 96) -> bytes | None:
    """PNG bytes of the first ``count`` samples of the grid at ``path`` in one row, ``height``
    pixels high (never enlarged); the whole grid scaled down for a grid written without its
    layout. None when the file is missing or not a readable PNG: a picture's loss never costs a
    report."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                return None
            img.load()
            layout = _layout(img.text.get(GRID_KEY))
            if layout is not None:
                n, h, w, columns, scale = layout
                k = min(count, n, columns)
                img = img.crop((0, 0, (k * (w + 1) + 1) * scale, (h + 2) * scale))
                shown = min(height, img.height)
            else:  # a grid of unknown layout: all of it, at most ``count`` thumbnails wide
                shown = min(img.height, round(count * height * img.height / img.width))
            thumb = img.resize(
                (max(1, round(img.width * shown / img.height)), max(1, shown)), Image.Resampling.LANCZOS
            )
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    out = io.BytesIO()
    thumb.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _layout(text: str | None) -> tuple[int, int, int, int, int] | None:
    """The grid layout a :func:`save_grid` PNG records, or None (absent or malformed)."""
    try:
        meta = json.loads(text) if text else None
        values = tuple(int(meta[k]) for k in ("n", "height", "width", "columns", "scale"))
    except (TypeError, KeyError, ValueError):
        return None
    return values if all(v > 0 for v in values) else None


def fit(image, height: int, width: int):
    """An HWC uint8 array centre-cropped to ``height:width``'s aspect and resized to it (PIL
    bicubic): how a data set of mixed sizes (COCO) is brought to the samples' resolution before
    an FID extractor's own resizing."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = min(h / height, w / width)
    crop_h, crop_w = round(height * scale), round(width * scale)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = Image.fromarray(image[top : top + crop_h, left : left + crop_w])
    return np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC))
