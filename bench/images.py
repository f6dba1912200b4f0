"""Sample grids as PNG, for eyeballing what a metric summarises."""

from __future__ import annotations

from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, columns: int = 16, scale: int = 3) -> Path:
    """Save uint8 images (N, C, H, W) as one PNG grid; small images are ``scale``× enlarged."""
    from PIL import Image

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
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
