"""DiffSegmenter's cross-attention fusion and self-attention completion."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from .errors import AttnSegError
from .layers import resolve
from .scores import ScoreMaps, min_max, resize
from .store import AttentionStore, StoredMaps
from .tokens import SegPrompt

# Paper weights for the 8/16/32/64 maps of SD1.5 at 512 px, coarsest first.
DIFFSEGMENTER_WEIGHTS = (0.3, 0.5, 0.1, 0.1)


def class_token_maps(maps: torch.Tensor, grid: tuple[int, int], prompt: SegPrompt) -> torch.Tensor:
    """(B, N, T) cross-attention -> (B, C, h, w): each class is the mean of its tokens' maps."""
    if maps.shape[-1] < prompt.token_count:
        raise AttnSegError(
            f"store: the captured cross-attention has {maps.shape[-1]} text tokens but the prompt has "
            f"{prompt.token_count}. The store and the conditioning come from different prompts; "
            f"capture with the same segmentation conditioning.")
    cols = [maps[..., list(c.positions)].mean(-1) for c in prompt.classes]
    return torch.stack(cols, dim=1).unflatten(-1, grid)


def mean_by_resolution(entries: list[tuple[object, StoredMaps]]) -> dict[int, tuple[tuple[int, int], torch.Tensor]]:
    """Average the layers of each grid size, each weighted by the heads its maps
    average (equal weights unless heads were picked): {tokens: (grid, (B, N, T) mean)}."""
    groups: dict[int, list[StoredMaps]] = defaultdict(list)
    for _, stored in entries:
        groups[stored.grid[0] * stored.grid[1]].append(stored)
    return {n: (group[0].grid, sum(s.mean() * s.heads for s in group) / sum(s.heads for s in group))
            for n, group in groups.items()}


def finest_self_layers(store: AttentionStore, what: str = "store") -> list[StoredMaps]:
    """The self-attention of the finest latent factor captured. Chosen by factor,
    not by grid: a pooled fine layer can share its grid with a coarser one."""
    entries = store.require("self", what=what)
    finest = min(key.factor for key, _ in entries)
    return [stored for key, stored in entries if key.factor == finest]


def finest_self_grid(store: AttentionStore, what: str = "store") -> tuple[int, int]:
    """The grid of the finest captured self-attention (no maps averaged)."""
    return finest_self_layers(store, what)[0].grid


def mean_self_attention(store: AttentionStore, what: str = "store") -> tuple[tuple[int, int], torch.Tensor]:
    """Mean of the finest self-attention maps: (grid, (B, N, N))."""
    layers = finest_self_layers(store, what)
    return layers[0].grid, torch.stack([s.mean() for s in layers]).mean(0)


TIMESTEP_AVERAGES = ("final maps", "attention")


def applied_weights(weights, levels: int, what: str, input_name: str = "weights") -> tuple[float, ...]:
    """The weights that apply to a model's ``levels`` resolutions (coarsest first):
    one per level, or the paper's four on a model with fewer levels (the coarsest
    ones apply); at least one positive. ``what`` describes the levels in messages."""
    weights = tuple(weights)
    if len(weights) < levels or (len(weights) > levels and weights != DIFFSEGMENTER_WEIGHTS):
        raise AttnSegError(f"{input_name}: {len(weights)} weights for {what}; give one per resolution, "
                           f"coarsest first.")
    weights = weights[:levels]
    if not sum(weights) > 0:
        raise AttnSegError(f"{input_name}: the weights that apply to {what} are "
                           f"{', '.join(map(str, weights))}; at least one must be positive.")
    return weights


def picked_self_attention(store: AttentionStore, picks, preset: str, what: str = "store"):
    """The mean self-attention of the layers ``picks`` name among the store's
    self-attention layers: (grid, (B, N, N)). The layers must share a grid."""
    entries = dict(store.require("self", what=what))
    chosen = resolve(list(entries), picks, preset, what)
    grids = {entries[key].grid for key in chosen}
    if len(grids) > 1:
        raise AttnSegError(f"{what}: '{preset}' averages self-attention of different grids "
                           f"({', '.join(f'{h}x{w}' for h, w in sorted(grids))}); pick layers of one resolution.")
    return grids.pop(), torch.stack([entries[key].mean() for key in chosen]).mean(0)


def diffsegmenter(store: AttentionStore, weights=DIFFSEGMENTER_WEIGHTS, self_completion: bool = True,
                  what: str = "store", timestep_average: str = "final maps") -> ScoreMaps:
    """Weighted fusion of per-resolution cross-attention (coarsest first), then
    one step of self-attention completion ``S . A``, then min-max per class.

    With several timesteps kept apart in the store, "final maps" averages each
    timestep's completed maps ``S_t . A_t`` (the authors' code); "attention"
    (or a store without per-timestep parts) segments the averaged attention."""
    if timestep_average not in TIMESTEP_AVERAGES:
        raise AttnSegError(f"timestep_average: '{timestep_average}' is not one of {', '.join(TIMESTEP_AVERAGES)}.")
    if timestep_average == "final maps" and store.per_timestep:
        parts = [diffsegmenter(child, weights, self_completion, what, "attention") for child in store.per_timestep]
        return dataclasses.replace(parts[0], maps=min_max(torch.stack([p.maps for p in parts]).mean(0)),
                                   image_key=store.image_key)
    if store.prompt is None:
        raise AttnSegError(f"{what}: the store has no class list. Encode the prompt with the "
                           f"AttnSeg text encoder and use that conditioning for the capture.")
    levels = mean_by_resolution(store.require("cross", what=what))
    sizes = sorted(levels)  # coarsest first
    if self_completion:
        target_grid, self_attn = mean_self_attention(store, what)
    else:
        target_grid, self_attn = levels[sizes[-1]][0], None
    grids = ", ".join(f"{levels[n][0][0]}x{levels[n][0][1]}" for n in sizes)
    weights = applied_weights(weights, len(sizes), f"{len(sizes)} resolutions ({grids})")  # the method names them
    fused = None
    for size, weight in zip(sizes, weights):
        grid, maps = levels[size]
        level = min_max(resize(class_token_maps(maps, grid, store.prompt), target_grid)) * weight
        fused = level if fused is None else fused + level
    if self_attn is not None:
        flat = fused.flatten(-2).transpose(1, 2)  # (B, N, C)
        fused = torch.bmm(self_attn, flat).transpose(1, 2).unflatten(-1, target_grid)
    method = f"diffsegmenter (weights {', '.join(f'{w:g}' for w in weights)} on {grids})"
    return ScoreMaps(min_max(fused), store.prompt.class_names, store.image_size, method, image_key=store.image_key)
