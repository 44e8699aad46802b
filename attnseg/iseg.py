"""iSeg (Sun et al.): entropy-reduced self-attention (Ent-Self) applied
iteratively to cross-attention class maps, or to user seeds.

Maps on a grid are carried flat as (B, N, K) with N = h * w pixels on the
self-attention grid and K maps (classes or seeds); the self-attention is
(B, N, N) with query rows. The refined operator is applied N times as a
matrix product on the maps, never raised to a power."""

from __future__ import annotations

import math

import torch

from .errors import AttnSegError
from .scores import ScoreMaps, min_max, resize
from .store import AttentionStore
from .fusion import finest_self_grid, mean_by_resolution, mean_self_attention
from .progress import tick
from .smoothing import KL_CLUSTERS, smooth_token_maps

ENT_SELF_VARIANTS = ("paper", "code", "naive")
# iSeg's cross-attention fusion: SD at 512 px uses the 16x16 and 32x32 layers,
# i.e. the grids 4x and 2x below the latent, weighted 0.7 / 0.3.
ISEG_CROSS_FACTORS = (4, 2)
ISEG_CROSS_WEIGHTS = (0.7, 0.3)
_TINY = 1e-12


def ent_self(self_attention: torch.Tensor, lam: float, variant: str = "code", clamp_max: float | None = None,
             ) -> torch.Tensor:
    """The refined operator, row-stochastic, fp32.

    Both entropy variants first normalise each key column by its maximum over the
    queries, ``S^ = S / max_q S`` (the released code; on the raw S a 64x64 map
    loses every entry below ~0.026 to the clamp), then take one gradient step
    that lowers the entropy, on the positive entries:
    "code": ``S^ + lam log10(e S^)`` (the released code's ``ent``);
    "paper": ``S^ + lam (1 + ln S^)`` (the paper's formula; the same step as
    "code" with lam scaled by ln 10).
    The result is clamped >= 0 (and <= ``clamp_max`` when given: the authors'
    interactive mode uses 1) and its rows renormalised. A row the clamp would
    empty keeps its original attention.
    "naive": ``S`` itself (lambda ignored), the baseline the paper compares against."""
    if not lam >= 0:
        raise AttnSegError(f"lambda: {lam} is not a non-negative number; use 0 for plain self-attention or a small "
                           f"positive value (released code: 0.015).")
    s = self_attention.float()
    if variant in ("paper", "code"):
        s_hat = s / s.amax(dim=-2, keepdim=True).clamp_min(_TINY)
        log = torch.log(s_hat.clamp_min(_TINY))
        step = 1 + log if variant == "paper" else (1 + log) * math.log10(math.e)  # log10(e x) = (1 + ln x) log10 e
        refined = torch.where(s_hat > 0, s_hat + lam * step, s_hat)
    elif variant == "naive":
        refined = s
    else:
        raise AttnSegError(f"variant: '{variant}' is not one of {', '.join(ENT_SELF_VARIANTS)}.")
    refined = refined.clamp(0, clamp_max)
    refined = torch.where(refined.sum(-1, keepdim=True) > 0, refined, s)
    return refined / refined.sum(-1, keepdim=True).clamp_min(_TINY)


def normalise_l1(maps: torch.Tensor) -> torch.Tensor:
    """(B, N, K): subtract each map's minimum over pixels, then divide by its sum."""
    shifted = maps - maps.amin(dim=1, keepdim=True)
    return shifted / shifted.sum(dim=1, keepdim=True).clamp_min(_TINY)


def iterate(maps: torch.Tensor, operator: torch.Tensor, iterations: int) -> torch.Tensor:
    """``C <- operator C`` then min-subtract + L1, ``iterations`` times. (B, N, K) fp32."""
    if iterations < 0:
        raise AttnSegError(f"iterations: {iterations} is negative; use 0 (no refinement) or more (paper: 10).")
    maps = normalise_l1(maps.float())
    for index in range(iterations):
        maps = normalise_l1(torch.bmm(operator, maps))
        tick("Ent-Self", index + 1, iterations)
    return maps


def iseg_cross_maps(store: AttentionStore, factors=ISEG_CROSS_FACTORS, weights=ISEG_CROSS_WEIGHTS,
                    target_grid: tuple[int, int] | None = None, what: str = "store",
                    smoothing_iterations: int = 0, clusters: int = KL_CLUSTERS) -> torch.Tensor:
    """iSeg's class maps from cross-attention: per chosen resolution, each token's
    map L1-normalised over space and upsampled to ``target_grid``; weighted sum;
    optionally the KL k-means smoothing of the fused token maps (every token,
    as the released code runs it); each class the mean of its tokens. Returns
    (B, C, h, w). On a DiT store the blocks' one resolution is used whatever the
    factors say."""
    if store.prompt is None:
        raise AttnSegError(f"{what}: the store has no class list. Encode the prompt with an AttnSeg text encoder.")
    entries = store.require("cross", what=what)
    levels = mean_by_resolution(entries)
    by_factor = {key.factor: stored.grid[0] * stored.grid[1] for key, stored in entries}
    if store.architecture == "dit":  # every block is one resolution, the patch grid: it alone, weight 1
        factors, weights = tuple(by_factor), (1.0,)
    fused = None
    for factor, weight in zip(factors, weights):
        if factor not in by_factor:
            available = ", ".join(f"{f}x" for f in sorted(by_factor))
            raise AttnSegError(f"{what}: no cross-attention {factor}x below the latent size was captured "
                               f"(captured: {available}). Capture those layers.")
        grid, maps = levels[by_factor[factor]]
        maps = maps.float()
        maps = maps / maps.sum(dim=1, keepdim=True).clamp_min(_TINY)  # each token sums to 1 over space
        tokens = maps.transpose(1, 2).unflatten(-1, grid)  # (B, T, h, w)
        level = resize(tokens, target_grid or grid) * weight
        fused = level if fused is None else fused + level
    fused = smooth_token_maps(fused, clusters, smoothing_iterations)
    classes = [fused[:, list(c.positions)].mean(1) for c in store.prompt.classes]
    return torch.stack(classes, dim=1)


ISEG_LAMBDA = 0.015  # the released VOC scripts' ``ent``
ISEG_ITERATIONS = 10


def ent_self_refine(scores: ScoreMaps, store: AttentionStore, lam: float = ISEG_LAMBDA,
                    iterations: int = ISEG_ITERATIONS, variant: str = "code", what: str = "attention") -> ScoreMaps:
    """Any class maps refined by ``iterations`` Ent-Self steps on the store's
    finest self-attention grid, min-max per class."""
    grid, self_attention = mean_self_attention(store, what)
    if scores.maps.shape[0] != self_attention.shape[0]:
        raise AttnSegError(f"scores: {scores.maps.shape[0]} images but the {what} store holds "
                           f"{self_attention.shape[0]}; use scores and attention from the same capture.")
    if None not in (scores.image_key, store.image_key) and scores.image_key != store.image_key and \
            tuple(scores.image_size) == tuple(store.image_size):
        raise AttnSegError(f"scores: they were read from another image than this {what} store's (of the same "
                           f"size); refine scores with attention captured from the same image.")
    if tuple(scores.image_size) != tuple(store.image_size):
        (h, w), (sh, sw) = scores.image_size, store.image_size
        raise AttnSegError(f"scores: they describe a {w}x{h} image but the {what} store a {sw}x{sh} one; "
                           f"refine scores with the attention captured from the same image.")
    initial = resize(scores.maps.float(), grid).flatten(-2).transpose(1, 2)
    refined = iterate(initial.to(self_attention.device), ent_self(self_attention, lam, variant), iterations)
    maps = min_max(refined.transpose(1, 2).unflatten(-1, grid))
    return ScoreMaps(maps, scores.class_names, scores.image_size, f"{scores.method}+ent-self-{variant}",
                     scores.background, scores.image_key)


def iseg_cross(store: AttentionStore, factors=ISEG_CROSS_FACTORS, weights=ISEG_CROSS_WEIGHTS,
               what: str = "attention", smoothing_iterations: int = 0, clusters: int = KL_CLUSTERS) -> ScoreMaps:
    """iSeg's cross-attention class maps on the self-attention grid, min-max per class."""
    grid = finest_self_grid(store, what)
    maps = iseg_cross_maps(store, factors, weights, grid, what, smoothing_iterations, clusters)
    # Min-max here; the refiner's min-subtract + L1 gives the same maps either way.
    return ScoreMaps(min_max(maps), store.prompt.class_names, store.image_size, "iseg-cross",
                     image_key=store.image_key)


def iseg(store: AttentionStore, lam: float = ISEG_LAMBDA, iterations: int = ISEG_ITERATIONS, variant: str = "code",
         factors=ISEG_CROSS_FACTORS, weights=ISEG_CROSS_WEIGHTS, what: str = "attention",
         smoothing_iterations: int = 0, clusters: int = KL_CLUSTERS) -> ScoreMaps:
    """The whole method: iSeg's cross-attention maps (optionally KL-smoothed)
    refined by Ent-Self."""
    cross = iseg_cross(store, factors, weights, what, smoothing_iterations, clusters)
    return ent_self_refine(cross, store, lam, iterations, variant, what)
