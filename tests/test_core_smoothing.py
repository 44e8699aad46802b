"""iSeg's KL k-means smoothing on constructed token maps."""

import torch

from attnseg.progress import reporting
from attnseg.smoothing import anchor_cells, kl_kmeans, smooth_token_maps, symmetric_kl


def test_anchors_follow_the_released_grid_rule():
    cells = anchor_cells((64, 64))
    rows, cols = sorted({int(c) // 64 for c in cells}), sorted({int(c) % 64 for c in cells})
    assert rows == cols == [0, 11, 22, 33, 44, 55]  # 64 // sqrt(32) = 11: a 6 x 6 grid


def test_symmetric_kl_matches_the_definition():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.3, 0.3, 0.4]])
    pe, qe = p + 1e-5, q + 1e-5
    by_hand = 0.5 * ((pe * (pe / qe).log()).sum(-1) + (qe * (qe / pe).log()).sum(-1))
    assert torch.allclose(symmetric_kl(p, q)[:, 0], by_hand, atol=1e-6)


def test_clusters_never_straddle_two_regions_and_each_pixel_takes_its_clusters_mean():
    """Left half attends token 1, right half token 2, with speckle: every cluster
    lies inside one half, the smoothed maps are the clusters' means (piecewise
    constant), and the halves keep their tokens."""
    generator = torch.Generator().manual_seed(0)
    h, w = 12, 16
    left = (torch.arange(w) < w // 2).expand(h, w).flatten()
    tokens = torch.full((1, 3, h, w), 0.05)
    tokens[0, 1].view(-1)[left] = 0.9
    tokens[0, 2].view(-1)[~left] = 0.9
    noisy = tokens * (1 + 0.3 * torch.rand(tokens.shape, generator=generator))
    vectors = noisy[0].flatten(1).T
    labels, smoothed = kl_kmeans(vectors, (h, w))
    for cluster in labels.unique():
        members = labels == cluster
        assert bool(left[members].all()) or bool((~left[members]).all())
        assert torch.allclose(smoothed[members], vectors[members].mean(0).expand(int(members.sum()), -1), atol=1e-5)
    assert len(labels.unique()) <= len(anchor_cells((h, w))) < h * w
    maps = smooth_token_maps(noisy)
    assert torch.allclose(maps[0].flatten(1).T, smoothed)
    assert float(maps[0, 1].view(-1)[left].min()) > float(maps[0, 1].view(-1)[~left].max())
    assert torch.equal(smooth_token_maps(noisy, iterations=0), noisy)


def test_a_batch_is_smoothed_on_one_progress_count():
    """One tick per iteration, after it, counted over the whole batch (one bar, not one per image)."""
    ticks = []
    with reporting(lambda stage, done, total: ticks.append((stage, done, total))):
        smooth_token_maps(torch.rand(2, 3, 8, 8), iterations=4)
    assert ticks == [("KL k-means", done, 8) for done in range(1, 9)]
