"""Class-token weighting of a segmentation prompt, for every host: DiffSegmenter's
"class++" on the text embedding and iSeg's Cat-Cross (on the embedding, or on
the keys inside the attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AttnSegError

CAT_CROSS_MODES = ("keys", "embedding")


def check_class_weight(class_weight: float) -> float:
    if not class_weight > 0:
        raise AttnSegError(f"class_weight: {class_weight} must be positive (1 = off, DiffSegmenter 1.21).")
    return class_weight


def check_cat_cross(gamma: float, mode: str) -> None:
    if not gamma > 0:
        raise AttnSegError(f"gamma: {gamma} must be positive (iSeg: 1.6; 1 turns Cat-Cross off).")
    if mode not in CAT_CROSS_MODES:
        raise AttnSegError(f"mode: '{mode}' is not one of {', '.join(CAT_CROSS_MODES)}.")


def reweight_class_tokens(embeds: torch.Tensor, empty: torch.Tensor, positions, class_weight: float) -> torch.Tensor:
    """DiffSegmenter's class++ (Compel-style): ``z_empty + w (z - z_empty)`` at the
    class positions of ``embeds`` (B, T, C); ``empty`` the empty prompt's encoding,
    repeated where the host tiled the context longer."""
    positions = list(positions)
    tokens = embeds.shape[1]
    z_empty = empty.to(embeds).repeat(1, tokens // empty.shape[1] + 1, 1)[:, :tokens]
    out = embeds.clone()
    out[:, positions] = z_empty[:, positions] + class_weight * (embeds[:, positions] - z_empty[:, positions])
    return out


@dataclass(frozen=True)
class KeyScale:
    """Cat-Cross on the keys: multiply the keys at ``positions`` (of a
    ``token_count``-token prompt) by ``gamma``, cond rows only."""

    positions: tuple[int, ...]
    gamma: float
    token_count: int

    def weights(self, tokens: int, device, dtype) -> torch.Tensor:
        """(tokens,) weights; a context the host tiled to a longer length repeats the prompt."""
        w = torch.ones(tokens, device=device, dtype=dtype)
        for start in range(0, tokens, self.token_count):
            for p in self.positions:
                if start + p < tokens:
                    w[start + p] = self.gamma
        return w
