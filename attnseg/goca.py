"""GoCA: cross-attention aggregated with the weights the model's own computation
implies, then rescaled per pixel and propagated along self-attention.

Stages, each switchable for the paper's ablation:
1. heads: each head's map weighted per pixel by its share of the attention
   output (``output_weighted_heads``, run inside the capture hook);
2. layers: each layer weighted by how well its self-attention agrees with a
   pseudo self-attention built from a reference layer's queries;
3. rescaling: class maps divided by the attention all content tokens get;
4. propagation: ``C <- S^k C`` along the finest self-attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import CHUNK_ELEMENTS, HeadReducer
from .errors import AttnSegError
from .fusion import mean_self_attention, picked_self_attention
from .progress import tick
from .scores import ScoreMaps, gaussian_blur, min_max, resize
from .store import AttentionStore
from .tokens import SegPrompt

LAYER_WEIGHTINGS = ("auto", "uniform")
GOCA_BLUR = 5
# torchvision's default sigma for a 5-tap kernel, which the authors' code uses.
GOCA_BLUR_SIGMA = 0.3 * ((GOCA_BLUR - 1) * 0.5 - 1) + 0.8
GOCA_ORDER = 2
STOPWORDS = frozenset({"a", "an", "the", "and"})
_TINY = 1e-12


def output_weighted_heads(out_weight: torch.Tensor) -> HeadReducer:
    """GoCA's head weights for a layer whose output projection is ``out_weight``
    (C_out, heads * d; the bias is left out). With ``h_n(p)`` head n's output at
    pixel p after its values and its slice of the projection, and ``O(p)`` their
    sum, head n weighs ``<h_n(p), O(p)> / ||O(p)||^2``: weights sum to 1 per pixel
    and may be negative. The per-head outputs are never materialised: with
    ``W_n`` head n's columns, ``<h_n, O> = <a_n, O W_n>`` for ``a_n`` its output
    before the projection."""
    weight = out_weight.float()

    def reduce(probs: torch.Tensor, head_out: torch.Tensor | None) -> torch.Tensor:
        if head_out is None:
            raise ValueError("output-weighted heads need the attention's values")
        batch, heads, n, dim = head_out.shape
        per_head = head_out.float().transpose(1, 2)  # (B, n, heads, d)
        total = per_head.reshape(batch, n, heads * dim) @ weight.T  # O(p)
        dots = (per_head * (total @ weight).view(batch, n, heads, dim)).sum(-1)  # <h_n(p), O(p)>
        norm = dots.sum(-1, keepdim=True)  # = ||O(p)||^2
        shares = torch.where(norm > 0, dots / norm.clamp_min(_TINY), torch.full_like(dots, 1.0 / heads))
        return torch.einsum("bhnt,bnh->bnt", probs.float(), shares)

    return reduce


def content_positions(prompt: SegPrompt) -> list[int]:
    """The tokens GoCA's rescaling sums over: every word token except BOS, EOS and
    padding (empty in ``prompt.words``), the words a/an/the/and, and punctuation."""
    return [i for i, word in enumerate(prompt.words)
            if word and word.lower() not in STOPWORDS and any(ch.isalnum() for ch in word)]


def _token_grid(latent_size: tuple[int, int], factor: int) -> tuple[int, int]:
    return math.ceil(latent_size[0] / factor), math.ceil(latent_size[1] / factor)


def self_on_reference_grid(maps: torch.Tensor, grid: tuple[int, int], rows: torch.Tensor,
                           ref_grid: tuple[int, int], density: float = 1.0) -> torch.Tensor:
    """Rows ``rows`` (reference-grid query indices) of a (B, N, N) self-attention
    resampled to ``ref_grid``: the query axis by nearest neighbour, the key axis
    bilinearly, values kept as they are (not renormalised, as in the authors'
    code: a coarse layer's rows then sum to more than 1). ``density`` turns a
    key-pooled map back into per-key values. Returns (B, len(rows), N_ref)."""
    (h, w), (ref_h, ref_w) = grid, ref_grid
    query_rows = (rows // ref_w) * h // ref_h
    query_cols = (rows % ref_w) * w // ref_w
    picked = maps[:, query_rows * w + query_cols].float()  # (B, c, N)
    batch, count = picked.shape[:2]
    if (h, w) != (ref_h, ref_w):
        picked = F.interpolate(picked.reshape(batch * count, 1, h, w), size=ref_grid, mode="bilinear",
                               align_corners=False).reshape(batch, count, ref_h * ref_w)
    return picked * density if density != 1.0 else picked


def layer_weights(queries: torch.Tensor, ref_grid: tuple[int, int],
                  self_layers: list[tuple[tuple[int, int], torch.Tensor, float]]) -> torch.Tensor:
    """GoCA's layer weights (B, L): ``s_l = sum_ij R_ij S_l,ij`` with ``R`` the
    pseudo self-attention softmax(q q^T / sqrt(C)) of the reference layer's
    full-channel queries (B, N_ref, C) and ``S_l`` each layer's self-attention
    ``(grid, (B, N, N), density)`` on the reference grid; clamped >= 0 and
    normalised over the layers (uniform where all are 0). R is built a block of
    rows at a time, never whole."""
    queries = queries.float()
    batch, n_ref, channels = queries.shape
    scores = queries.new_zeros(batch, len(self_layers))
    widest = max([n_ref] + [grid[0] * grid[1] for grid, _, _ in self_layers])
    step = max(1, CHUNK_ELEMENTS // max(1, batch * widest))
    for start in range(0, n_ref, step):
        rows = torch.arange(start, min(n_ref, start + step), device=queries.device)
        pseudo = torch.matmul(queries[:, rows], queries.transpose(1, 2)).mul_(channels ** -0.5).softmax(-1)
        for index, (grid, maps, density) in enumerate(self_layers):
            resampled = self_on_reference_grid(maps.to(queries.device), grid, rows, ref_grid, density)
            scores[:, index] += (pseudo * resampled).sum((1, 2))
        tick("GoCA layer weights", min(n_ref, start + step), n_ref)  # rows done, ending at all of them
    scores = scores.clamp_min(0)
    total = scores.sum(-1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp_min(_TINY), torch.full_like(scores, 1 / len(self_layers)))


def aggregate(cross_layers: list[tuple[tuple[int, int], torch.Tensor]], weights: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    """``sum_l s_l M_l`` with each (B, N, T) map upsampled to ``size``, clamped >= 0
    and renormalised over the tokens per pixel. Returns (B, T, h, w)."""
    total = None
    for index, (grid, maps) in enumerate(cross_layers):
        upsampled = resize(maps.float().transpose(1, 2).unflatten(-1, grid), size)
        term = upsampled * weights[:, index, None, None, None].to(upsampled)
        total = term if total is None else total + term
    total = total.clamp_min(0)
    return total / total.sum(1, keepdim=True).clamp_min(_TINY)


def rescale(maps: torch.Tensor, content: torch.Tensor, blur: int = GOCA_BLUR,
            sigma: float | None = GOCA_BLUR_SIGMA) -> torch.Tensor:
    """Per-pixel rescaling: (B, K, h, w) maps divided by the content tokens' total
    (B, 1, h, w), Gaussian-blurred (reflected edges), min-max per map."""
    ratio = maps / content.clamp_min(_TINY)
    return min_max(gaussian_blur(ratio, blur, sigma, padding="reflect"))


def propagate(maps: torch.Tensor, self_attention: torch.Tensor, grid: tuple[int, int], order: int) -> torch.Tensor:
    """Affinity propagation ``C <- S^k C`` (k = ``order`` products) on the
    self-attention grid, then min-max. (B, K, h, w) -> (B, K, grid)."""
    if order < 0:
        raise AttnSegError(f"propagation_order: {order} is negative; use 0 (off) or more (GoCA: 2).")
    flat = resize(maps.float(), grid).flatten(-2).transpose(1, 2).to(self_attention.device)
    operator = self_attention.float()
    for index in range(order):
        flat = torch.bmm(operator, flat)
        tick("propagation", index + 1, order)
    return min_max(flat.transpose(1, 2).unflatten(-1, grid))


def _pairs_by_block(store: AttentionStore, what: str):
    """Each captured cross layer with the self-attention of the same transformer block."""
    selves = {(k.block, k.block_id, k.depth): (k, v) for k, v in store.layers("self")}
    return [(key, stored, selves.get((key.block, key.block_id, key.depth)))
            for key, stored in store.require("cross", what=what)]


def _auto_layer_weights(store: AttentionStore, pairs, what: str) -> torch.Tensor:
    references = store.layers("query")
    missing = [key.name for key, _, paired in pairs if paired is None]
    if not references or missing:
        raise AttnSegError(
            f"{what}: automatic layer weights need the self-attention of every captured cross-attention layer "
            f"and the reference layer's queries (missing: {', '.join(missing[:4]) or 'reference queries'}). "
            f"On the capture node set preset to 'GoCA SD1.5 (released code)' or 'GoCA SDXL (released code)' "
            f"(custom: self_layers 'all (GoCA)'), or set layer_weights to uniform.")
    _, reference = references[0]
    self_layers = []
    for _, _, (self_key, stored) in pairs:
        pooled = stored.grid[0] * stored.grid[1]
        original = math.prod(_token_grid(store.latent_size, self_key.factor))
        self_layers.append((stored.grid, stored.mean(), pooled / original))
    return layer_weights(reference.mean(), reference.grid, self_layers)


def _split_classes(prompt: SegPrompt, background_classes: list[str], what: str):
    names = {c.name.lower(): c for c in prompt.classes}
    unknown = [b for b in background_classes if b.lower() not in names]
    if unknown:
        raise AttnSegError(
            f"background_classes: {', '.join(unknown)} is not among the encoded classes "
            f"({', '.join(prompt.class_names)}). List background words in the text encoder's classes too.")
    chosen = {b.lower() for b in background_classes}
    objects = [c for c in prompt.classes if c.name.lower() not in chosen]
    if not objects:
        raise AttnSegError("background_classes: every class is marked as background; leave at least one object.")
    return objects, [names[b] for b in chosen]


def goca(store: AttentionStore, layer_weighting: str = "auto", rescaling: bool = True, blur: int = GOCA_BLUR,
         order: int = GOCA_ORDER, background_classes: list[str] = (), what: str = "attention",
         propagation_layers=None, aggregate_factor: int = 1, preset: str = "custom",
         expected_heads: str | None = None) -> ScoreMaps:
    """GoCA's class maps from a store. Heads were reduced at capture time (the
    store's ``head_reduction``); ``background_classes`` (some of the prompt's
    classes) give the background map instead of classes of their own.
    ``propagation_layers``: layer picks whose mean self-attention propagates
    (None: every finest layer); ``aggregate_factor``: the maps are aggregated at
    the latent size divided by it (GoCA on SDXL: 2, i.e. 64x64 at 1024 px);
    ``expected_heads``: the head reduction a preset was captured with ("auto"
    or "mean"), refused when the store holds the other one."""
    if aggregate_factor < 1:
        raise AttnSegError(f"aggregate_factor: {aggregate_factor} must be 1 or more.")
    if expected_heads is not None and store.head_reduction != expected_heads:
        held = {"auto": "output-weighted heads", "mean": "the head mean"}
        raise AttnSegError(
            f"{what}: '{preset}' reads {held.get(expected_heads, expected_heads)}, but this store holds "
            f"{held.get(store.head_reduction, store.head_reduction)}. On the capture node set preset to '{preset}'; "
            f"for the other head reduction (the ablation) set this node's preset to custom.")
    if store.prompt is None:
        raise AttnSegError(f"{what}: the store has no class list. Encode the prompt with an AttnSeg text encoder.")
    if layer_weighting not in LAYER_WEIGHTINGS:
        raise AttnSegError(f"layer_weights: '{layer_weighting}' is not one of {', '.join(LAYER_WEIGHTINGS)}.")
    objects, backgrounds = _split_classes(store.prompt, list(background_classes), what)
    pairs = _pairs_by_block(store, what)
    if layer_weighting == "auto":
        weights = _auto_layer_weights(store, pairs, what)
    else:
        weights = torch.full((store.batch_size, len(pairs)), 1 / len(pairs))
    cross = [(stored.grid, stored.mean()) for _, stored, _ in pairs]
    size = tuple(max(1, math.ceil(side / aggregate_factor)) for side in store.latent_size)
    tokens = aggregate(cross, weights.to(cross[0][1].device), size)
    if tokens.shape[1] < store.prompt.token_count:
        raise AttnSegError(f"{what}: the captured cross-attention has {tokens.shape[1]} text tokens but the prompt "
                           f"has {store.prompt.token_count}; capture with the same segmentation conditioning.")
    maps = torch.stack([tokens[:, list(c.positions)].mean(1) for c in objects + backgrounds], dim=1)
    if rescaling:
        content = tokens[:, content_positions(store.prompt)].sum(1, keepdim=True)
        maps = rescale(maps, content, blur)
    if backgrounds:  # one background map, the strongest background word per pixel
        maps = torch.cat([maps[:, :len(objects)], maps[:, len(objects):].amax(1, keepdim=True)], dim=1)
    if order > 0:
        if propagation_layers is None:
            grid, self_attention = mean_self_attention(store, what)
        else:
            grid, self_attention = picked_self_attention(store, propagation_layers, preset, what)
        maps = propagate(maps, self_attention, grid, order)
    else:
        maps = min_max(maps)
    background = maps[:, len(objects):] if backgrounds else None
    method = (f"goca(heads {store.head_reduction}, layers {layer_weighting}, "
              f"rescaling {'on' if rescaling else 'off'}, k {order})")
    return ScoreMaps(maps[:, :len(objects)], [c.name for c in objects], store.image_size, method, background,
                     store.image_key)
