"""S-CFG's per-step region maps from GoCA's aggregation (GoCA's S-CFG integration).

What GoCA's released integration computes each sampling step (``Darkbblue/goca``,
``src-additional/generation-experiment``: ``get_mask`` in ``utils_15.py``, the
denoising loop in ``generate_for_fid_15.py``, the layers in
``configs/config_model_15.py``), separately for the two CFG halves:

1. heads: every cross-attention layer's heads weighted per pixel by their share
   of the layer's output, ``<h_n, O> / ||O||^2`` (its "dot-product w/o clamp");
2. layers: each layer weighted by ``sum_ij R_ij S_l,ij``, with ``R`` the softmax
   of the reference layer's full-channel cross-attention queries against
   themselves and ``S_l`` the layer's head-mean self-attention resampled to the
   reference grid (queries nearest, keys bilinear), clamped at 0 and normalised
   over the layers; each layer's map upsampled (bilinear) to 64 x 64, the latent
   at 512 px, weighted, summed, clamped at 0 and renormalised over the tokens;
3. rescaling, cond half only: every token's map divided by the sum of the maps of
   the prompt's word tokens (all but BOS, EOS and padding: articles and
   punctuation count here, unlike GoCA's segmentation code), blurred (5 x 5,
   torchvision's sigma 1.1, reflected edges), min-max per map;
4. propagation: ``C <- S^2 C`` on both halves with ``S`` the mean head-mean
   self-attention of the cond half's propagation layers, each resized to the
   64 x 64 grid as in step 2 (queries nearest, keys bilinear, not renormalised);
   then min-max per map;
5. regions: the cond half's maps with EOS and padding zeroed (BOS and the word
   tokens compete), the argmax token per pixel, upsampled (nearest) to the latent;
6. foreground: the uncond half's BOS map (the negative prompt's start token, a
   token naming no object) blurred again (5 x 5) and min-maxed; the foreground is
   where ``1 - BOS > BOS``, i.e. the BOS map below 0.5; the rest is background.

S-CFG's rate then follows unchanged (``attnseg.scfg.guidance_rate``).

GoCA's integration reads all 16 cross-attention layers of SD1.5, the 32 x 32
reference layer ``up_blocks[2].attentions[1]`` and three 64 x 64 self-attention
layers for propagation. Here the layers are the ones S-CFG already captures each
step (its two coarsest resolutions, self-attention pooled to at most 16 x 16):
the reference is the middle decoder layer of the finer of them (SD1.5 at 512 px:
``up_blocks[1].attentions[1]``, 16 x 16) and propagation uses the mean
self-attention of the layers on the finest captured grid, applied as GoCA applies
a self-attention coarser than its maps (above, step 4) without forming the
upsampled matrix. The maps are made at GoCA's size (the model's finest attention
grid: 64 x 64 for SD1.x/2.x at 512 px and SDXL at 1024 px).

Every stage is switchable (:class:`GoCAStages`); a stage switched off is S-CFG's
own step in its place (head mean; the plain mean over layers; S-CFG's blur and
division of each map by its mean instead of GoCA's aggregation and rescaling;
S-CFG's per-layer ``(S + 3 S^2) / 4`` instead of ``S^2`` after aggregation), so
with every stage off the maps are S-CFG's."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .errors import AttnSegError
from .goca import GOCA_BLUR, GOCA_BLUR_SIGMA, GOCA_ORDER, aggregate, layer_weights, rescale
from .scfg import RELEASED_BLUR, _mean_normalised_average, mean_normalised, refine, smooth
from .scores import gaussian_blur, min_max, resize

GOCA_INTEGRATION_SOURCE = ("Darkbblue/goca", "src-additional/generation-experiment/utils_15.py (get_mask), "
                           "generate_for_fid_15.py, configs/config_model_15.py")


@dataclass(frozen=True)
class GoCAStages:
    """GoCA's stages in S-CFG's maps; one switched off is S-CFG's own step in its place.

    ``heads``: output-weighted heads (chosen by the capture hook) vs the head mean;
    ``layer_weights``: automatic layer weights vs the plain mean; ``rescaling``:
    GoCA's aggregation (clamp, renormalise over tokens) and rescaling by the word
    tokens (blur 5, min-max) vs S-CFG's blur and division by the mean per layer;
    ``propagation``: ``S^order C`` after aggregation vs S-CFG's per-layer
    ``(S + 3 S^2) / 4 C``."""

    heads: bool = True
    layer_weights: bool = True
    rescaling: bool = True
    propagation: bool = True
    order: int = GOCA_ORDER


ALL_OFF = GoCAStages(heads=False, layer_weights=False, rescaling=False, propagation=False)


class StepLayer(NamedTuple):
    """One captured transformer block of one CFG half at one step: its self-attention
    grid, head-reduced self-attention (B, N, N), cross-attention (B, N, T) on that
    grid, and ``density``: the self grid's cells over the layer's own tokens (1
    unless the self-attention was pooled), which turns pooled key sums back into
    per-key values for the layer weights."""

    grid: tuple[int, int]
    self_attention: torch.Tensor
    cross: torch.Tensor
    density: float = 1.0


@functools.lru_cache(maxsize=32)
def _linear_upsampling(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation (align_corners False) as a matrix; the
    2-D bilinear resize is this matrix on each axis."""
    basis = torch.eye(n_in, device=device)[:, None, :]
    return F.interpolate(basis, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


Operator = tuple[tuple[int, int], torch.Tensor]  # (grid, (B, N, N) self-attention)


def propagate(maps: torch.Tensor, operators: Sequence[Operator], order: int) -> torch.Tensor:
    """GoCA's affinity propagation on (B, T, H, W) maps: ``C <- S_up^order C`` with
    ``S_up`` the mean over ``operators`` ((grid, (B, N, N)) self-attentions) of
    each resized to (H, W), queries nearest and keys bilinear, values kept, then
    min-max per map. ``S_up = N S U^T`` (N the nearest query upsampling, U the
    bilinear one), so ``S_up C = N (S (U^T C))``: the (HW x HW) matrix is never
    formed. On its own grid ``S_up`` is ``S``."""
    if order < 0:
        raise AttnSegError(f"propagation order: {order} is negative; use 0 (off) or more (GoCA: 2).")
    if not operators:
        raise AttnSegError("S-CFG (GoCA maps): this step captured no self-attention to propagate with.")
    size = tuple(maps.shape[-2:])
    out = maps.float()
    for _ in range(order):
        total = None
        for grid, operator in operators:
            down = out
            if tuple(grid) != size:
                rows = _linear_upsampling(grid[0], size[0], out.device)
                cols = _linear_upsampling(grid[1], size[1], out.device)
                down = rows.T @ out @ cols  # U^T C, one axis at a time
            step = torch.bmm(operator.float().to(out.device), down.flatten(-2).transpose(1, 2))  # (B, N, T)
            step = step.transpose(1, 2).unflatten(-1, grid)
            if tuple(grid) != size:
                step = F.interpolate(step, size=size, mode="nearest")
            total = step if total is None else total + step
        out = total / len(operators)
    return min_max(out)


def automatic_layer_weights(reference: tuple[tuple[int, int], torch.Tensor],
                            layers: Sequence[StepLayer]) -> torch.Tensor:
    """(B, L) GoCA's layer weights of ``layers`` from the reference layer's (grid,
    (B, N_ref, C) queries), as :func:`attnseg.goca.layer_weights`."""
    grid, queries = reference
    return layer_weights(queries, grid, [(la.grid, la.self_attention, la.density) for la in layers])


def _summed_per_grid(per_layer, weights: torch.Tensor):
    """The layers' weighted sum on each grid (the resize is linear, so summing before it
    gives GoCA's sum of resized maps with one resize per grid): ([(grid, maps)], ones)."""
    sums = {}
    for index, (grid, maps) in enumerate(per_layer):
        term = maps * weights[:, index, None, None].to(maps)
        sums[grid] = term if grid not in sums else sums[grid] + term
    return list(sums.items()), weights.new_ones(weights.shape[0], len(sums))


def goca_token_maps(layers: Sequence[StepLayer], size: tuple[int, int], stages: GoCAStages = GoCAStages(),
                    reference: tuple[tuple[int, int], torch.Tensor] | None = None,
                    content: Sequence[int] | torch.Tensor | None = None,
                    operators: Sequence[Operator] = (),
                    scfg_blur: int = RELEASED_BLUR) -> torch.Tensor:
    """One CFG half's per-token maps (B, T, h, w) at ``size`` from one step's layers.

    ``reference``: (grid, queries) for the automatic layer weights (needed with
    ``stages.layer_weights`` and more than one layer); ``content``: the word
    tokens whose total rescales the maps (the cond half), or None (the uncond
    half: aggregated only, as GoCA's integration); ``operators``: the
    self-attention(s) that propagate; ``scfg_blur``: S-CFG's kernel where its own
    steps stand in. The heads were reduced by the capture. With every stage off
    (:data:`ALL_OFF`) this is :func:`attnseg.scfg.refined_token_maps` at ``size``."""
    if not layers:
        raise AttnSegError("S-CFG (GoCA maps): this step captured no attention maps.")
    weights = None
    if stages.layer_weights and len(layers) > 1:
        if reference is None:
            raise AttnSegError("S-CFG (GoCA maps): automatic layer weights need the reference layer's queries, "
                               "which this step did not capture.")
        weights = automatic_layer_weights(reference, layers)
    # S-CFG's per-layer refinement stands in for GoCA's propagation when that is off.
    per_layer = [(la.grid, la.cross.float() if stages.propagation else refine(la.self_attention, la.cross))
                 for la in layers]
    if stages.rescaling:
        if weights is None:
            weights = per_layer[0][1].new_full((per_layer[0][1].shape[0], len(per_layer)), 1 / len(per_layer))
        maps = aggregate(*_summed_per_grid(per_layer, weights), size)  # clamped at 0, renormalised over tokens
        if content is not None:
            if not len(content):
                raise AttnSegError("S-CFG (GoCA maps): the prompt has no word tokens to rescale by.")
            index = torch.as_tensor(content, device=maps.device)  # a tensor there already: no copy
            maps = rescale(maps, maps.index_select(1, index).sum(1, keepdim=True), GOCA_BLUR, GOCA_BLUR_SIGMA)
    else:
        upsampled = (smooth(resize(c.transpose(1, 2).unflatten(-1, grid), size), scfg_blur) for grid, c in per_layer)
        if weights is None:
            maps = _mean_normalised_average(upsampled)
        else:
            maps = sum(mean_normalised(m) * weights[:, i, None, None, None].to(m) for i, m in enumerate(upsampled))
    if stages.propagation and stages.order > 0:
        maps = propagate(maps, operators, stages.order)
    return maps


def goca_regions(cond_maps: torch.Tensor, candidates: Sequence[int] | torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int64 token index: per pixel the strongest of ``candidates`` (BOS
    and the prompt's word tokens; GoCA's integration zeroes EOS and padding), the
    cond half's :func:`goca_token_maps` nearest-upsampled to ``size``."""
    keep = torch.zeros(cond_maps.shape[1], dtype=torch.bool, device=cond_maps.device)
    keep[torch.as_tensor(candidates, device=cond_maps.device)] = True
    masked = cond_maps.masked_fill(~keep[None, :, None, None], float("-inf"))
    regions = masked.argmax(dim=1, keepdim=True).float()
    return F.interpolate(regions, size=size, mode="nearest")[:, 0].long()


def goca_foreground(uncond_maps: torch.Tensor, size: tuple[int, int], blur: int = GOCA_BLUR) -> torch.Tensor:
    """(B, H, W) bool: GoCA's integration's foreground from the uncond half's
    :func:`goca_token_maps`: its BOS map blurred (``blur``, reflected edges) and
    min-maxed, foreground where ``1 - BOS > BOS`` (ties are background),
    nearest-upsampled to ``size``."""
    bos = min_max(gaussian_blur(uncond_maps[:, :1].float(), blur, GOCA_BLUR_SIGMA if blur == GOCA_BLUR else None,
                                padding="reflect"))
    foreground = ((1 - bos) > bos).float()
    return F.interpolate(foreground, size=size, mode="nearest")[:, 0].bool()
