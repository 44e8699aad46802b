"""Score maps -> labels, per-class masks and a colour overlay."""

from __future__ import annotations

import colorsys

import torch

from .errors import AttnSegError
from .scores import ScoreMaps, resize


BACKGROUND_RULES = ("threshold", "(1 - max)^2")


def label_map(scores: torch.Tensor, threshold: float, background: str = "threshold",
              background_map: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) scores -> (B, H, W) int64 labels, 0 = background, else 1 + the
    argmax class. The background competes in the argmax with a score of
    ``threshold`` ("threshold": iSeg's COCO rule, DiffSegmenter's sweep; plus
    ``background_map`` (B, 1, H, W) when given, GoCA's rule) or of
    ``(1 - max_c)^2`` ("(1 - max)^2": iSeg's VOC rule; ``threshold`` unused)."""
    if not -1.0 <= threshold <= 1.0:
        raise AttnSegError(f"threshold: {threshold} is outside [-1, 1]; scores are min-max normalised.")
    if threshold < 0 and background_map is None:
        raise AttnSegError(f"threshold: {threshold} is negative, which only means something as an offset on a "
                           f"segmenter's background map (GoCA with background_classes sweeps -0.4..0.4); here it "
                           f"would label every pixel a class. Use 0 to 1.")
    best, index = scores.max(dim=1)
    if background == "threshold":
        background_score = torch.full_like(best, threshold)
        if background_map is not None:
            background_score = background_score + background_map[:, 0]
    elif background == "(1 - max)^2":
        background_score = (1 - best) ** 2
    else:
        raise AttnSegError(f"background: '{background}' is not one of {', '.join(BACKGROUND_RULES)}.")
    return torch.where(best >= background_score, index + 1, torch.zeros_like(index))


def class_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) labels -> (B * C, H, W) float masks, image-major (image 0's classes first)."""
    classes = torch.arange(1, num_classes + 1, device=labels.device)
    return (labels[:, None] == classes[None, :, None, None]).flatten(0, 1).float()


def palette(n: int) -> torch.Tensor:
    """(n + 1, 3) colours in [0, 1]: black for background, then evenly spaced hues."""
    colours = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0) for i in range(n)]
    return torch.tensor(colours)


def overlay(labels: torch.Tensor, num_classes: int, image: torch.Tensor | None = None,
            alpha: float = 0.55) -> torch.Tensor:
    """Colour the labels; over ``image`` (B, H, W, 3) when given. Returns (B, H, W, 3)."""
    colours = palette(num_classes).to(labels.device)[labels]
    if image is None:
        return colours
    tinted = image * (1 - alpha) + colours * alpha
    return torch.where((labels > 0)[..., None], tinted, image)


def heat_map(scores: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) scores -> (B, H, W, 3): each pixel in its best class's colour,
    as bright as that class's score."""
    best, index = scores.max(dim=1)
    return palette(scores.shape[1]).to(scores.device)[index + 1] * best[..., None]


def make_masks(score_maps: ScoreMaps, threshold: float, background: str = "threshold"):
    """Everything the mask node outputs, at the image size: (labels, masks, scores)."""
    if not bool(torch.isfinite(score_maps.maps).all()):
        raise AttnSegError(f"scores: the {score_maps.method or 'segmenter'} score maps hold NaN or infinite values, "
                           f"so every pixel's label would be arbitrary. They come from the attention the model "
                           f"computed (fp16 overflow, NaN weights): load the model in bf16 or fp32 and capture again.")
    scores = score_maps.at_image_size().clamp(0, 1)
    background_map = None
    if score_maps.background is not None:
        background_map = resize(score_maps.background, score_maps.image_size).clamp(0, 1)
    labels = label_map(scores, threshold, background, background_map)
    return labels, class_masks(labels, scores.shape[1]), scores
