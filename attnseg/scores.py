"""Per-class score maps: what every segmenter produces and the mask maker reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import AttnSegError


@dataclass
class ScoreMaps:
    """``maps`` (B, C, h, w) fp32 in [0, 1], one channel per class, on a grid
    with the aspect ratio of ``image_size`` (h, w in pixels)."""

    maps: torch.Tensor
    class_names: list[str]
    image_size: tuple[int, int]
    method: str = ""
    # (B, 1, h, w) in [0, 1]: evidence for background (GoCA's background words),
    # added to the background's threshold when labelling; None: no such evidence.
    background: torch.Tensor | None = None
    image_key: tuple | None = None  # the input image's fingerprint, from its store (see AttentionStore)

    def at_image_size(self) -> torch.Tensor:
        return resize(self.maps, self.image_size)


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def min_max(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each (B, C) map to [0, 1] over its spatial axes."""
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True)
    high = flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def gaussian_blur(maps: torch.Tensor, kernel: int, sigma: float | None = None,
                  padding: str = "replicate") -> torch.Tensor:
    """(B, C, h, w) blurred with a separable ``kernel`` x ``kernel`` Gaussian
    (``sigma`` None: kernel / 3); kernel <= 1 returns the maps."""
    if kernel <= 1:
        return maps
    if kernel % 2 == 0:
        raise AttnSegError(f"blur: {kernel} must be odd (or 0 to turn blurring off).")
    sigma = kernel / 3 if sigma is None else sigma
    offsets = torch.arange(kernel, device=maps.device, dtype=maps.dtype) - kernel // 2
    weights = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    channels = maps.shape[1]
    pad = kernel // 2
    if padding == "reflect" and min(maps.shape[-2:]) <= pad:
        padding = "replicate"  # reflection needs more pixels than the pad
    padded = F.pad(maps, [pad] * 4, mode=padding)
    horizontal = F.conv2d(padded, weights.view(1, 1, 1, -1).expand(channels, 1, 1, kernel), groups=channels)
    return F.conv2d(horizontal, weights.view(1, 1, -1, 1).expand(channels, 1, kernel, 1), groups=channels)
