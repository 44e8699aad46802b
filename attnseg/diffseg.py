"""DiffSeg (Tian et al., CVPR 2024): segments from self-attention alone, no text;
iSeg's unsupervised mode on top of it; and naming segments by cross-attention.

1. Aggregation. Per resolution the mean self-attention of its layers (heads
   averaged at capture). Each query's map (over the keys) is upsampled
   bilinearly to the finest grid and renormalised to sum 1; the query axes are
   tiled (nearest) to the finest grid; the resolutions are summed with weights
   proportional to their side (DiffSeg's default: 64, 32, 16, 8 over 120). The
   result is a finest-grid (N, N) row-stochastic matrix ``A``, never built
   whole: its rows are made a block at a time from the per-resolution maps.
2. Merging. Anchors on a regular grid (16 x 16 by default, placed as DiffSeg
   places them). Pass 1: each anchor's map becomes the mean of every pixel's
   map whose symmetric KL to it, ``(KL(p||q) + KL(q||p)) / 2``, is below
   ``tau``. Later passes: the proposals, in raster order of their anchors, each
   take the mean of every proposal within ``tau`` of them, and those are
   consumed (DiffSeg's greedy rule). The KL of a block of rows to the anchors
   is two matrix products (``sum p ln p + sum q ln q - p . ln q - ln p . q``),
   so no (anchors x N x N) tensor exists.
3. Optional k-means (DiffSeg's "refinement", off in its benchmark): Euclidean
   k-means of the rows of ``A`` started from the proposals.
4. NMS: the proposals are upsampled to the image and each pixel takes the one
   that is largest there. Segments are numbered 1.. in raster order of their
   first pixel, so the labelling does not depend on the anchor order.

iSeg unsupervised: the proposals (each a distribution over the pixels) are
the initial maps of the Ent-Self iteration on the finest self-attention
(:mod:`attnseg.iseg`), min-max per map, then the same NMS.

Naming: per segment the mean, over its pixels, of each class's cross-attention
map (per resolution the mean of the class's tokens, the resolutions averaged
alike as DiffSeg's naming does, then min-max per class); the segment takes the
class of the largest mean, or "unknown" where that mean is below a threshold."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import AttnSegError
from .fusion import class_token_maps, mean_by_resolution, mean_self_attention
from .iseg import ENT_SELF_VARIANTS, ent_self, iterate
from .progress import tick
from .scores import ScoreMaps, min_max, resize
from .store import AttentionStore

DIFFSEG_ANCHORS = 16  # per side: 256 anchors
DIFFSEG_TAU = 1.1  # COCO-Stuff-27; Cityscapes 0.9
DIFFSEG_PASSES = 3
DIFFSEG_TIMESTEP = 300
REFINEMENTS = ("off",) + ENT_SELF_VARIANTS  # off: DiffSeg; code / paper / naive: iSeg's iteration
KL_FLOOR = 1e-8  # exact zeros (fp16 underflow) are lifted before the logarithms
ROW_BLOCK_ELEMENTS = 1 << 22  # rows of A built at once: 1024 rows of a 64 x 64 grid (16 MiB fp32)
UNKNOWN = "unknown"


@dataclass(frozen=True)
class DiffSegSettings:
    """Every knob. ``weights`` () = proportional to each resolution's side."""

    anchors: int = DIFFSEG_ANCHORS
    tau: float = DIFFSEG_TAU
    passes: int = DIFFSEG_PASSES
    weights: tuple[float, ...] = ()
    kmeans_iterations: int = 0
    refinement: str = "off"
    lam: float = 0.015
    iterations: int = 10
    name_threshold: float = 0.0


@dataclass
class Aggregate:
    """One image's aggregated self-attention ``A`` on ``grid``: rows are built on
    demand as ``sum_r w_r U_r[parent_r(q)]`` with ``U_r`` (N_r, N) the resolution's
    key-upsampled, renormalised maps and ``parent_r`` the coarse query cell of each
    fine query."""

    grid: tuple[int, int]
    levels: list[tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        out = None
        for maps, parent, weight in self.levels:
            part = maps[parent[index]] * weight
            out = part if out is None else out + part
        return out

    def blocks(self, rows_per_block: int | None = None):
        """(start, rows) over all of A, ``rows_per_block`` rows at a time."""
        step = rows_per_block or max(1, ROW_BLOCK_ELEMENTS // self.size)
        device = self.levels[0][0].device
        for start in range(0, self.size, step):
            yield start, self.rows(torch.arange(start, min(start + step, self.size), device=device))


def resolution_weights(grids: list[tuple[int, int]], weights=()) -> list[float]:
    """The weights of the resolutions (coarsest first), summing to 1: () gives
    DiffSeg's, proportional to each grid's side."""
    if not weights:
        sides = [math.sqrt(h * w) for h, w in grids]
        return [s / sum(sides) for s in sides]
    weights = [float(w) for w in weights]
    names = ", ".join(f"{h}x{w}" for h, w in grids)
    if len(weights) != len(grids):
        raise AttnSegError(f"weights: {len(weights)} weights for {len(grids)} self-attention resolutions ({names}); "
                           f"give one per resolution, coarsest first, or leave it empty for DiffSeg's (proportional "
                           f"to resolution).")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise AttnSegError(f"weights: {', '.join(map(str, weights))} need non-negative numbers with a positive sum.")
    return [w / sum(weights) for w in weights]


def parent_cells(grid: tuple[int, int], coarse: tuple[int, int], device=None) -> torch.Tensor:
    """(N,) the flat index of the coarse cell each fine cell lies in (nearest tiling)."""
    (h, w), (ch, cw) = grid, coarse
    rows = torch.arange(h, device=device) * ch // h
    cols = torch.arange(w, device=device) * cw // w
    return (rows[:, None] * cw + cols[None, :]).flatten()


def aggregate(store: AttentionStore, weights=(), what: str = "attention") -> list[Aggregate]:
    """One :class:`Aggregate` per image from every self-attention resolution the store holds."""
    levels = mean_by_resolution(store.require("self", what=what))
    sizes = sorted(levels)  # coarsest first
    grids = [levels[n][0] for n in sizes]
    applied = resolution_weights(grids, weights)
    grid = grids[-1]
    prepared = []
    for size, weight in zip(sizes, applied):
        coarse, maps = levels[size]
        maps = maps.float()
        if coarse != grid:  # upsample each query's map over the keys
            maps = resize(maps.flatten(0, 1).unflatten(-1, coarse)[:, None], grid).flatten(1).unflatten(
                0, maps.shape[:2])
        maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
        prepared.append((maps, parent_cells(grid, coarse, maps.device), weight))
    return [Aggregate(grid, [(maps[b], parent, w) for maps, parent, w in prepared if w > 0])
            for b in range(prepared[0][0].shape[0])]


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(n, N) x (k, N) distributions -> (n, k) ``(KL(p||q) + KL(q||p)) / 2``, as two
    matrix products: ``(sum p ln p + sum q ln q - p . ln q - ln p . q) / 2``."""
    p, q = p.float().clamp_min(KL_FLOOR), q.float().clamp_min(KL_FLOOR)
    log_p, log_q = p.log(), q.log()
    kl = (p * log_p).sum(-1, keepdim=True) + (q * log_q).sum(-1)[None] - p @ log_q.T - log_p @ q.T
    return (0.5 * kl).clamp_min(0)


def anchor_cells(grid: tuple[int, int], per_side: int = DIFFSEG_ANCHORS) -> torch.Tensor:
    """Flat indices of ``per_side`` x ``per_side`` anchors, spaced as DiffSeg spaces
    them: a whole-cell step ``(side - 1) // (n - 1)``, the span centred."""
    if not isinstance(per_side, int) or per_side < 1:
        raise AttnSegError(f"anchors: {per_side} must be a whole number of 1 or more (DiffSeg: 16 per side).")
    h, w = grid
    if per_side > min(h, w):
        raise AttnSegError(f"anchors: {per_side} per side is more than the {w}x{h} self-attention grid holds; use at "
                           f"most {min(h, w)}, or capture at a higher resolution.")

    def positions(side: int) -> list[int]:
        if per_side == 1:
            return [(side - 1) // 2]
        step = (side - 1) // (per_side - 1)
        start = ((side - 1) - step * (per_side - 1)) // 2
        return [start + step * i for i in range(per_side)]

    return torch.tensor([r * w + c for r in positions(h) for c in positions(w)])


def check_merging(tau: float, passes: int) -> None:
    if not (math.isfinite(tau) and tau > 0):
        raise AttnSegError(f"tau: {tau} must be a positive number (DiffSeg: 1.1 on COCO-Stuff, 0.9 on Cityscapes; "
                           f"larger merges more).")
    if not isinstance(passes, int) or passes < 1:
        raise AttnSegError(f"passes: {passes} must be a whole number of 1 or more (DiffSeg: 3).")


def merge_anchors(agg: Aggregate, anchors: torch.Tensor, tau: float, rows_per_block: int | None = None
                  ) -> torch.Tensor:
    """Pass 1: (K, N) proposals, each the mean of the rows of A within ``tau`` of its
    anchor's row. A proposal no row joins (a ``tau`` below rounding) is dropped."""
    device = agg.levels[0][0].device
    anchors = torch.unique(anchors.to(device))  # sorted: the result does not depend on their order
    points = agg.rows(anchors)
    sums = torch.zeros_like(points)
    counts = torch.zeros(points.shape[0], device=device)
    step = rows_per_block or max(1, ROW_BLOCK_ELEMENTS // agg.size)
    for start, rows in agg.blocks(step):
        close = (symmetric_kl(rows, points) < tau).float()  # (n, K)
        sums += close.T @ rows
        counts += close.sum(0)
        tick("DiffSeg anchors", start // step + 1, -(-agg.size // step))
    kept = counts > 0
    return sums[kept] / counts[kept, None]


def merge_proposals(proposals: torch.Tensor, tau: float) -> torch.Tensor:
    """A later pass: in order, each proposal not yet consumed takes the mean of every
    proposal within ``tau`` of it (consumed or not, as DiffSeg's code), and those
    are consumed."""
    close = symmetric_kl(proposals, proposals) < tau
    close |= torch.eye(close.shape[0], dtype=torch.bool, device=close.device)
    consumed = torch.zeros(close.shape[0], dtype=torch.bool, device=close.device)
    merged = []
    for i in range(close.shape[0]):
        if consumed[i]:
            continue
        consumed |= close[i]
        merged.append(proposals[close[i]].mean(0))
    return torch.stack(merged)


def kmeans(agg: Aggregate, centres: torch.Tensor, iterations: int, rows_per_block: int | None = None) -> torch.Tensor:
    """DiffSeg's optional refinement: Euclidean k-means of A's rows from ``centres``
    until no row changes cluster (at most ``iterations`` rounds); the centres are
    the final clusters' means; a cluster left empty is dropped."""
    if not isinstance(iterations, int) or iterations < 0:
        raise AttnSegError(f"kmeans_iterations: {iterations} must be 0 (off, DiffSeg's benchmark) or more (its demo "
                           f"notebook runs scikit-learn's k-means, up to 300).")
    previous = None
    for index in range(iterations):
        sums, counts, labels = torch.zeros_like(centres), torch.zeros(centres.shape[0], device=centres.device), []
        norms = (centres * centres).sum(-1)
        for start, rows in agg.blocks(rows_per_block):
            nearest = (norms[None] - 2 * rows @ centres.T).argmin(-1)
            sums.index_add_(0, nearest, rows)
            counts += torch.bincount(nearest, minlength=centres.shape[0]).float()
            labels.append(nearest)
        kept = counts > 0
        centres = sums[kept] / counts[kept, None]
        labels = (torch.cumsum(kept.long(), 0) - 1)[torch.cat(labels)]
        tick("DiffSeg k-means", index + 1, iterations)
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels
    return centres


def proposals(agg: Aggregate, anchors: torch.Tensor, tau: float = DIFFSEG_TAU, passes: int = DIFFSEG_PASSES,
              kmeans_iterations: int = 0, rows_per_block: int | None = None) -> torch.Tensor:
    """DiffSeg's merged maps of one image: (K, N), each a distribution over the pixels."""
    check_merging(tau, passes)
    merged = merge_anchors(agg, anchors, tau, rows_per_block)
    if merged.shape[0] == 0:
        raise AttnSegError("attention: no anchor's map lies within tau of itself, so the self-attention is not "
                           "finite (NaN or inf: a model that overflows, e.g. in fp16). Capture again at another "
                           "dtype or resolution.")
    tick("DiffSeg merging", 1, passes)
    for index in range(1, passes):
        merged = merge_proposals(merged, tau)
        tick("DiffSeg merging", index + 1, passes)
    if kmeans_iterations:
        merged = kmeans(agg, merged, kmeans_iterations, rows_per_block)
    return merged


def renumber(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) labels 0.. -> (labels 1..K in raster order of each one's first pixel,
    the old label of each new one (K,))."""
    flat = labels.flatten()
    count = int(flat.max()) + 1
    first = torch.full((count,), flat.numel(), dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel(), device=flat.device), "amin")
    present = torch.nonzero(first < flat.numel()).flatten()
    order = present[torch.argsort(first[present])]
    lookup = torch.zeros(count, dtype=torch.long, device=flat.device)
    lookup[order] = torch.arange(1, order.numel() + 1, device=flat.device)
    return lookup[labels], order


def nms(maps: torch.Tensor, image_size: tuple[int, int], per_block: int = 16) -> torch.Tensor:
    """(K, h, w) -> (H, W) the index of the largest map at each pixel after bilinear
    upsampling, a few maps at a time (no K x H x W tensor)."""
    best = value = None
    for start in range(0, maps.shape[0], per_block):
        up = resize(maps[None, start:start + per_block].float(), image_size)[0]
        top, index = up.max(0)
        if best is None:
            best, value = index + start, top
        else:
            better = top > value
            best, value = torch.where(better, index + start, best), torch.where(better, top, value)
    return best


@dataclass
class Segments:
    """Unsupervised segments of a batch. ``labels`` (B, H, W) int64 at the image
    size, 1..K_b per image; ``maps[b]`` (K_b, h, w) the segment maps on ``grid``
    in label order; with names, ``names[b][k]`` the class index of segment k + 1
    (-1 unknown) and ``name_scores[b]`` (K_b, C) the mean class scores."""

    labels: torch.Tensor
    maps: list[torch.Tensor]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    method: str
    class_names: list[str] | None = None
    names: list[list[int]] | None = None
    name_scores: list[torch.Tensor] | None = None
    image_key: tuple | None = None

    @property
    def counts(self) -> list[int]:
        return [m.shape[0] for m in self.maps]

    def score_maps(self) -> ScoreMaps:
        """The segment maps as score maps, one channel per segment (``segment 1``..;
        images with fewer segments padded with empty maps), min-max per map."""
        most = max(self.counts)
        padded = torch.zeros(len(self.maps), most, *self.grid)
        for b, maps in enumerate(self.maps):
            padded[b, :maps.shape[0]] = min_max(maps.float().cpu())
        return ScoreMaps(padded, [f"segment {k + 1}" for k in range(most)], self.image_size, self.method,
                         image_key=self.image_key)

    def class_labels(self) -> torch.Tensor:
        """(B, H, W): 0 for unknown segments, else 1 + the class index of the segment's name."""
        if self.names is None:
            raise AttnSegError("naming: the segments were not named; name them against a store with classes.")
        out = torch.zeros_like(self.labels)
        for b, names in enumerate(self.names):
            lookup = torch.tensor([0] + [n + 1 for n in names], device=self.labels.device)
            out[b] = lookup[self.labels[b]]
        return out


def diffseg(store: AttentionStore, anchors: int = DIFFSEG_ANCHORS, tau: float = DIFFSEG_TAU,
            passes: int = DIFFSEG_PASSES, weights=(), kmeans_iterations: int = 0, refinement: str = "off",
            lam: float = 0.015, iterations: int = 10, what: str = "attention",
            rows_per_block: int | None = None) -> Segments:
    """DiffSeg's segments of every image of the store; with ``refinement`` an
    Ent-Self variant ("code", "paper", "naive"), iSeg's unsupervised mode: the
    proposals refined ``iterations`` times on the finest self-attention."""
    if refinement not in REFINEMENTS:
        raise AttnSegError(f"refinement: '{refinement}' is not one of {', '.join(REFINEMENTS)}.")
    check_merging(tau, passes)
    images = aggregate(store, weights, what)
    grid = images[0].grid
    cells = anchor_cells(grid, anchors)
    operator_grid = operator = None
    if refinement != "off":
        operator_grid, operator = mean_self_attention(store, what)
    labels, maps = [], []
    for b, agg in enumerate(images):
        found = proposals(agg, cells, tau, passes, kmeans_iterations, rows_per_block).unflatten(-1, grid)
        if operator is not None:
            initial = resize(found[None], operator_grid)[0].flatten(1).T[None]  # (1, N, K)
            step = ent_self(operator[b:b + 1], lam, refinement)
            found = min_max(iterate(initial, step, iterations)[0].T.unflatten(-1, operator_grid))
        segment, order = renumber(nms(found, store.image_size))
        labels.append(segment)
        maps.append(found[order])
    method = f"diffseg (tau {tau:g}, {anchors}x{anchors} anchors, {passes} passes)"
    if refinement != "off":
        method += f" + ent-self-{refinement} (lambda {lam:g}, N {iterations})"
    return Segments(torch.stack(labels), maps, operator_grid or grid, tuple(store.image_size), method,
                    image_key=store.image_key)


def naming_maps(store: AttentionStore, grid: tuple[int, int], what: str = "attention") -> torch.Tensor:
    """(B, C, h, w) class maps for naming: per resolution the mean of each class's
    tokens, upsampled to ``grid``, the resolutions averaged, min-max per class."""
    if store.prompt is None or not store.prompt.classes:
        raise AttnSegError(f"naming: the {what} store has no class list to name segments with. Capture with AttnSeg "
                           f"Text Encode's conditioning (classes set), or turn naming off.")
    levels = mean_by_resolution(store.require("cross", what=what))
    fused = sum(resize(class_token_maps(maps.float(), level_grid, store.prompt), grid)
                for level_grid, maps in levels.values()) / len(levels)
    return min_max(fused)


def name_segments(segments: Segments, store: AttentionStore, threshold: float = 0.0,
                  what: str = "attention") -> Segments:
    """Each segment named by the class whose (min-max) cross-attention map has the
    largest mean over the segment's pixels; "unknown" (-1) where that mean is below
    ``threshold``."""
    if not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise AttnSegError(f"name_threshold: {threshold} is outside [0, 1] (class scores are min-max normalised; "
                           f"DiffSeg names every segment: 0).")
    if store.batch_size != segments.labels.shape[0] or tuple(store.image_size) != tuple(segments.image_size):
        raise AttnSegError(f"naming: the {what} store holds {store.batch_size} images of "
                           f"{store.image_size[1]}x{store.image_size[0]}, not the segmented ones; name segments with "
                           f"the store they came from.")
    maps = resize(naming_maps(store, segments.grid, what).cpu(), segments.image_size)
    names, scores = [], []
    for b, count in enumerate(segments.counts):
        flat = segments.labels[b].flatten().cpu() - 1
        sums = torch.zeros(count, maps.shape[1]).index_add_(0, flat, maps[b].flatten(1).T)
        mean = sums / torch.bincount(flat, minlength=count).clamp_min(1)[:, None].float()
        best, index = mean.max(-1)
        names.append(torch.where(best >= threshold, index, torch.full_like(index, -1)).tolist())
        scores.append(mean)
    return dataclasses.replace(segments, class_names=store.prompt.class_names, names=names, name_scores=scores)


def describe(segments: Segments) -> str:
    """One line per image: its segments and, when named, their names and scores."""
    lines = []
    for b, count in enumerate(segments.counts):
        if segments.names is None:
            lines.append(f"image {b + 1}: {count} segments")
            continue
        parts = []
        for k, name in enumerate(segments.names[b]):
            label = UNKNOWN if name < 0 else segments.class_names[name]
            parts.append(f"{k + 1} {label} ({float(segments.name_scores[b][k].max()):.2f})")
        lines.append(f"image {b + 1}: {count} segments: " + ", ".join(parts))
    return "\n".join(lines)
