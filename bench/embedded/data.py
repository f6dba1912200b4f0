"""The embedded data set: scikit-learn's handwritten digits (1,797 images, shipped inside the wheel).

The 8×8 images (17 grey levels) are upsampled to 16×16 so that the UNet has three resolutions
(16, 8, 4) and therefore real skip concatenations at every level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float images in [-1, 1], shape (1797, 1, 16, 16), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(digits.target).long()


def reference_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed disjoint halves (A, B) of the real digits.

    A is the reference set that generated samples are compared against; B gives the
    real-vs-real floor of the metric at the same sample count (see ``bench.embedded.metric``).
    """
    x, _ = load_digits_images()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = len(x) // 2
    return x[perm[:half]], x[perm[half:]]
