"""Per-class score maps: what every segmenter produces and the mask maker reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ScoreMaps:
    """``maps`` (B, C, h, w) fp32 in [0, 1], one channel per class, on a grid
    with the aspect ratio of ``image_size`` (h, w in pixels)."""

    maps: torch.Tensor
    class_names: list[str]
    image_size: tuple[int, int]
    method: str = ""

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
