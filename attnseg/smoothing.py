"""iSeg's KL k-means smoothing of the fused cross-attention.

Each pixel carries a vector over the prompt's tokens (every token's map, each
normalised to sum 1 over the image, then fused). Pixels are clustered with
k-means under a symmetric Kullback-Leibler distance, starting from prototypes
at pixels on a regular grid, and each pixel's vector is replaced by its
cluster's mean: the maps become piecewise constant over regions whose token
profiles agree, which removes speckle before the class maps are read off."""

from __future__ import annotations

import math

import torch

from .attention import CHUNK_ELEMENTS
from .errors import AttnSegError
from .progress import tick

# The released code asks for 32 clusters, which its grid rule turns into anchors
# every floor(64 / sqrt(32)) = 11 pixels: a 6 x 6 grid on a 64 x 64 map.
KL_CLUSTERS = 32
KL_ITERATIONS = 20
ZERO_FLOOR = 1e-6  # exact zeros are lifted before the logarithms
KL_EPS = 1e-5


def anchor_cells(grid: tuple[int, int], clusters: int = KL_CLUSTERS) -> torch.Tensor:
    """Flat indices of the initial prototypes: every ``floor(side / sqrt(clusters))``
    pixels along each axis, from 0."""
    h, w = grid
    rows = range(0, h, max(1, int(h / math.sqrt(clusters))))
    cols = range(0, w, max(1, int(w / math.sqrt(clusters))))
    return torch.tensor([r * w + c for r in rows for c in cols])


def symmetric_kl(points: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(N, T) x (K, T) -> (N, K): ``(KL(p || q) + KL(q || p)) / 2`` = ``sum (p - q)(ln p - ln q) / 2``."""
    p, q = points + KL_EPS, prototypes + KL_EPS
    log_p, log_q = p.log(), q.log()
    # sum_t (p - q)(ln p - ln q) = sum p ln p + sum q ln q - p . ln q - q . ln p
    return 0.5 * ((p * log_p).sum(-1, keepdim=True) + (q * log_q).sum(-1)[None]
                  - p @ log_q.T - log_p @ q.T)


def kl_kmeans(vectors: torch.Tensor, grid: tuple[int, int], clusters: int = KL_CLUSTERS,
              iterations: int = KL_ITERATIONS, progress: tuple[int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster one image's (N, T) pixel vectors. Returns (labels (N,) int64,
    smoothed (N, T): each pixel's vector replaced by its cluster's mean). A
    cluster that loses all its pixels is dropped. Each iteration ticks once;
    ``progress`` = (iterations done before, total) when this image is one of a
    batch that shares one bar (None: this image's iterations alone)."""
    if iterations < 0:
        raise AttnSegError(f"smoothing_iterations: {iterations} is negative; use 0 (off) or more (iSeg: 20).")
    points = vectors.float().clamp_min(0)
    points = torch.where(points == 0, torch.full_like(points, ZERO_FLOOR), points)
    prototypes = points[anchor_cells(grid, clusters).to(points.device)]
    labels = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    step = max(1, CHUNK_ELEMENTS // max(1, prototypes.shape[0] * points.shape[1]))
    rounds = max(1, iterations)
    before, total = progress or (0, rounds)
    for index in range(rounds):
        labels = torch.cat([symmetric_kl(points[i:i + step], prototypes).argmin(-1)
                            for i in range(0, points.shape[0], step)])
        counts = torch.bincount(labels, minlength=prototypes.shape[0])
        sums = prototypes.new_zeros(prototypes.shape).index_add_(0, labels, points)
        kept = counts > 0
        prototypes = sums[kept] / counts[kept, None]
        labels = (torch.cumsum(kept.long(), 0) - 1)[labels]  # renumber past the dropped clusters
        tick("KL k-means", before + index + 1, total)
    return labels, prototypes[labels]


def smooth_token_maps(tokens: torch.Tensor, clusters: int = KL_CLUSTERS,
                      iterations: int = KL_ITERATIONS) -> torch.Tensor:
    """(B, T, h, w) fused token maps -> the same maps, piecewise constant over
    each image's KL k-means clusters. ``iterations`` 0 returns them unchanged."""
    if iterations == 0:
        return tokens
    batch, count, h, w = tokens.shape
    flat = tokens.flatten(-2).transpose(1, 2)  # (B, N, T)
    smoothed = torch.stack([kl_kmeans(flat[b], (h, w), clusters, iterations, (b * iterations, batch * iterations))[1]
                            for b in range(batch)])  # one bar over the batch's iterations
    return smoothed.transpose(1, 2).reshape(batch, count, h, w).to(tokens.dtype)
