"""Sample grids as PNG, for eyeballing what a metric summarises."""

from __future__ import annotations

from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, columns: int = 16, scale: int = 3) -> Path:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid, each pixel ``scale``× enlarged."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte()
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
