"""Image pools to model-ready tensors: resize, three channels, per-channel normalisation.

Statistics are taken at the model's resolution (upsampling smooths, so source-resolution
statistics would leave the std below one) and from the training pool alone, as a client
could only ever compute them from training data; they are applied to every pool. Work goes
in chunks so that a large pool never exists twice in full.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_images", "channel_stats", "normalise_"]

CHUNK = 1024
"""Images processed at a time."""


def resize_images(images: np.ndarray, *, image_size: int) -> torch.Tensor:
    """`[N, C, h, w]` images (uint8 or float; C is 1 or 3) -> float32 `[N, 3, S, S]`,
    bilinearly resized (antialiased when shrinking), grey repeated over three channels."""
    n, _, h, w = images.shape
    out = torch.empty((n, 3, image_size, image_size), dtype=torch.float32)
    for lo in range(0, n, CHUNK):
        x = torch.from_numpy(np.asarray(images[lo:lo + CHUNK], dtype=np.float32))
        if (h, w) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=image_size < max(h, w))
        out[lo:lo + CHUNK] = x.expand(-1, 3, -1, -1)
    return out


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std `[C]` of `[N, C, H, W]` images, accumulated in float64."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for lo in range(0, len(images), CHUNK):
        x = images[lo:lo + CHUNK].double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def normalise_(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place: (x - mean) / std per channel."""
    shift = mean.float().view(1, -1, 1, 1)
    scale = std.float().view(1, -1, 1, 1)
    for lo in range(0, len(images), CHUNK):
        images[lo:lo + CHUNK].sub_(shift).div_(scale)
    return images
