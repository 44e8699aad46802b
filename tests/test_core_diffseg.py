"""DiffSeg's merging, NMS, iSeg's unsupervised refinement and segment naming on
constructed attention whose regions are known."""

import math

import pytest
import torch

from attnseg import AttentionStore, AttnSegError, LayerKey
from attnseg.diffseg import (Aggregate, aggregate, anchor_cells, diffseg, merge_anchors, name_segments, nms,
                             proposals, renumber, resolution_weights, symmetric_kl)
from attnseg.iseg import ent_self, iterate
from attnseg.scores import min_max, resize
from attnseg.tokens import ClassTokens, SegPrompt


def regions_of(grid, boxes):
    """(h, w) int labels 0..: each box (r0, c0, r1, c1) over the previous ones; 0 the rest."""
    labels = torch.zeros(grid, dtype=torch.long)
    for index, (r0, c0, r1, c1) in enumerate(boxes):
        labels[r0:r1, c0:c1] = index + 1
    return labels


def region_attention(labels, inside=4.0, noise=0.0, seed=0):
    """(1, N, N): each pixel attends softmax(inside on its own region, 0 elsewhere, + noise)."""
    flat = labels.flatten()
    logits = (flat[:, None] == flat[None, :]).float() * inside
    if noise:
        logits = logits + noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(logits, -1)[None]


def pooled(labels, factor):
    """The region labels of a coarser grid (each coarse cell's top-left fine cell)."""
    return labels[::factor, ::factor]


def make_store(levels, image_size=None, prompt=None, cross=None):
    """A store with one self-attention layer per (labels, attention) level, finest last."""
    finest = levels[-1][0].shape
    store = AttentionStore("test", 1, finest, image_size or finest, prompt, dtype=torch.float32)
    for depth, (labels, attn) in enumerate(levels):
        factor = finest[0] // labels.shape[0]
        store.add(LayerKey("self", "output", 0, depth, factor), "cond", tuple(labels.shape), attn)
    for depth, (grid, maps) in enumerate(cross or ()):
        store.add(LayerKey("cross", "output", 0, depth, finest[0] // grid[0]), "cond", grid, maps)
    return store


def same_partition(a, b):
    """Two label maps split the pixels alike (whatever their numbers)."""
    pairs = set(zip(a.flatten().tolist(), b.flatten().tolist()))
    return len(pairs) == len(set(a.flatten().tolist())) == len(set(b.flatten().tolist()))


BOXES = ((0, 0, 8, 8), (8, 4, 16, 12), (2, 10, 6, 16))


def test_merging_recovers_block_diagonal_regions_exactly():
    truth = regions_of((16, 16), BOXES)
    coarse = pooled(truth, 2)
    store = make_store([(coarse, region_attention(coarse)), (truth, region_attention(truth))])
    found = diffseg(store, anchors=8)
    assert found.counts == [4]  # three boxes and the rest
    assert same_partition(found.labels[0], truth)
    assert torch.equal(found.labels[0], renumber(truth)[0])  # numbered in raster order of first pixels


def test_segments_survive_noise_and_upsampling_to_the_image():
    truth = regions_of((16, 16), BOXES)
    coarse = pooled(truth, 2)
    store = make_store([(coarse, region_attention(coarse, noise=0.3, seed=1)),
                        (truth, region_attention(truth, noise=0.3, seed=2))], image_size=(64, 64))
    found = diffseg(store, anchors=16)
    assert found.counts == [4] and found.labels.shape == (1, 64, 64)
    centres = found.labels[0][2::4, 2::4]  # the image pixel nearest each grid cell's centre
    assert same_partition(centres, truth)
    big = truth.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert (found.labels[0] == renumber(big)[0]).float().mean() > 0.9  # boundaries move with the noise


def test_symmetric_kl_is_symmetric_zero_on_identical_maps_and_the_direct_sum():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 40, generator=g), -1)
    q = torch.softmax(torch.randn(3, 40, generator=g), -1)
    kl = symmetric_kl(p, q)
    direct = 0.5 * ((p[:, None] - q[None]) * (p[:, None].log() - q[None].log())).sum(-1)
    assert torch.allclose(kl, direct, atol=1e-5)
    assert torch.allclose(kl, symmetric_kl(q, p).T, atol=1e-5)
    assert symmetric_kl(p, p).diag().abs().max() < 1e-5
    assert kl.min() > 0.1


def two_region_store(p, q):
    """Left half of an 8x8 grid attends with p, right half with q."""
    rows = torch.stack([p if c < 4 else q for r in range(8) for c in range(8)])[None]
    return make_store([(regions_of((8, 8), ((0, 4, 8, 8),)), rows)])


def test_tau_decides_whether_two_regions_merge():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(64, generator=g), -1)
    q = torch.softmax(torch.randn(64, generator=g), -1)
    distance = float(symmetric_kl(p[None], q[None]))
    store = two_region_store(p, q)
    assert diffseg(store, anchors=4, tau=distance * 0.95).counts == [2]
    assert diffseg(store, anchors=4, tau=distance * 1.05).counts == [1]
    # One pass keeps one proposal per anchor; the later passes merge the duplicates.
    agg = aggregate(store)[0]
    assert merge_anchors(agg, anchor_cells((8, 8), 4), distance * 0.95).shape[0] == 16
    assert proposals(agg, anchor_cells((8, 8), 4), distance * 0.95, passes=2).shape[0] == 2


def test_row_blocks_give_the_unblocked_result():
    truth = regions_of((16, 16), BOXES)
    coarse = pooled(truth, 2)
    store = make_store([(coarse, region_attention(coarse, 2.0, noise=0.8, seed=4)),
                        (truth, region_attention(truth, 2.0, noise=0.8, seed=5))])
    agg = aggregate(store)[0]
    cells = anchor_cells((16, 16), 8)
    whole = proposals(agg, cells, 1.1, rows_per_block=256)
    for block in (1, 7, 100):
        assert torch.allclose(proposals(agg, cells, 1.1, rows_per_block=block), whole, atol=1e-6)
    assert torch.equal(diffseg(store, 8, rows_per_block=7).labels, diffseg(store, 8, rows_per_block=256).labels)


def test_anchor_order_does_not_change_the_segments():
    truth = regions_of((16, 16), BOXES)
    store = make_store([(truth, region_attention(truth, 2.0, noise=0.8, seed=6))])
    agg = aggregate(store)[0]
    cells = anchor_cells((16, 16), 8)
    shuffled = cells[torch.randperm(cells.numel(), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(proposals(agg, cells, 1.1), proposals(agg, shuffled, 1.1))


def test_nms_gives_one_label_per_pixel_from_the_largest_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(20, 6, 6, generator=g)
    labels = nms(maps, (12, 18), per_block=3)
    assert labels.shape == (12, 18) and labels.dtype == torch.long
    assert torch.equal(labels, resize(maps[None], (12, 18))[0].argmax(0))


def test_anchors_are_placed_as_diffseg_places_them_and_too_many_are_refused():
    cells = anchor_cells((64, 64), 16)
    rows = sorted({int(c) // 64 for c in cells})
    assert rows == list(range(1, 62, 4)) and cells.numel() == 256
    assert anchor_cells((5, 5), 1).tolist() == [12]
    with pytest.raises(AttnSegError, match="anchors: 16 per side is more than the 8x8"):
        anchor_cells((8, 8), 16)


def test_resolution_weights_are_proportional_to_the_side_or_given():
    assert resolution_weights([(8, 8), (16, 16), (32, 32), (64, 64)]) == pytest.approx(
        [8 / 120, 16 / 120, 32 / 120, 64 / 120])
    assert resolution_weights([(8, 8), (16, 16)], (1, 3)) == pytest.approx([0.25, 0.75])
    with pytest.raises(AttnSegError, match="weights: 1 weights for 2 self-attention resolutions"):
        resolution_weights([(8, 8), (16, 16)], (1,))


def test_aggregated_rows_upsample_the_keys_renormalise_and_tile_the_queries():
    g = torch.Generator().manual_seed(1)
    coarse = torch.softmax(torch.randn(1, 16, 16, generator=g), -1)
    fine = torch.softmax(torch.randn(1, 64, 64, generator=g), -1)
    store = make_store([(torch.zeros(4, 4), coarse), (torch.zeros(8, 8), fine)])
    agg = aggregate(store)[0]
    up = torch.nn.functional.interpolate(coarse[0].view(16, 1, 4, 4), size=(8, 8), mode="bilinear",
                                         align_corners=False).view(16, 64)
    up = up / up.sum(-1, keepdim=True)
    parent = torch.tensor([(r // 2) * 4 + c // 2 for r in range(8) for c in range(8)])
    by_hand = up[parent] * (4 / 12) + fine[0] * (8 / 12)
    assert torch.allclose(agg.rows(torch.arange(64)), by_hand, atol=1e-6)
    assert torch.allclose(agg.rows(torch.arange(64)).sum(-1), torch.ones(64), atol=1e-5)


def test_iseg_refinement_iterates_ent_self_from_the_proposals():
    """On noisy attention DiffSeg's NMS mislabels pixels of the right four
    segments; Ent-Self spreads each proposal over its region and recovers them."""
    truth = regions_of((16, 16), BOXES)
    store = make_store([(truth, region_attention(truth, 2.0, noise=0.8, seed=7))])
    plain = diffseg(store, 8, tau=0.5)
    refined = diffseg(store, 8, tau=0.5, refinement="code", lam=0.015, iterations=5)
    agg = aggregate(store)[0]
    found = proposals(agg, anchor_cells((16, 16), 8), 0.5)
    by_hand = iterate(found.T[None], ent_self(store.layers("self")[0][1].mean(), 0.015, "code"), 5)[0].T
    by_hand = min_max(by_hand.unflatten(-1, (16, 16)))
    labels, order = renumber(by_hand.argmax(0))
    assert torch.equal(refined.labels[0], labels)
    assert torch.allclose(refined.maps[0], by_hand[order], atol=1e-6)
    assert "ent-self-code" in refined.method and "ent-self" not in plain.method
    assert plain.counts == refined.counts == [4]
    assert not same_partition(plain.labels[0], truth) and same_partition(refined.labels[0], truth)


def test_naming_picks_the_class_whose_cross_attention_the_segment_holds():
    truth = regions_of((16, 16), BOXES)
    flat = truth.flatten()
    # Tokens: 0 BOS, 1 "cat" (box 1), 2 "dog" (box 2); box 3 and the rest attend BOS.
    cross = torch.zeros(1, 256, 3)
    cross[0, :, 0] = 1.0
    cross[0, flat == 1] = torch.tensor([0.2, 0.8, 0.0])
    cross[0, flat == 2] = torch.tensor([0.3, 0.0, 0.7])
    prompt = SegPrompt("cat dog", (ClassTokens("cat", (1,)), ClassTokens("dog", (2,))), 3, ("<s>", "cat", "dog"))
    store = make_store([(truth, region_attention(truth))], prompt=prompt, cross=[((16, 16), cross)])
    found = diffseg(store, 8)
    named = name_segments(found, store, 0.5)
    region_of = {int(found.labels[0][truth == r][0]): r for r in range(4)}
    expected = {0: -1, 1: 0, 2: 1, 3: -1}
    assert [named.names[0][k - 1] for k in sorted(region_of)] == [expected[region_of[k]] for k in sorted(region_of)]
    classes = named.class_labels()[0]
    assert torch.equal(classes, torch.where(truth == 1, 1, torch.where(truth == 2, 2, 0)))
    everything = name_segments(found, store, 0.0)
    assert -1 not in everything.names[0]  # DiffSeg names every segment


def test_bad_input_names_the_input_and_the_fix():
    truth = regions_of((8, 8), ((0, 0, 4, 4),))
    store = make_store([(truth, region_attention(truth))])
    for kwargs, message in ((dict(tau=0), "tau: 0 must be a positive number"),
                            (dict(passes=0), "passes: 0 must be a whole number"),
                            (dict(refinement="sharp"), "refinement: 'sharp' is not one of"),
                            (dict(anchors=9), "anchors: 9 per side"),
                            (dict(kmeans_iterations=-1), "kmeans_iterations: -1"),
                            (dict(weights=(1, 2)), "weights: 2 weights for 1")):
        with pytest.raises(AttnSegError, match=message):
            diffseg(store, **{"anchors": 4, **kwargs})
    with pytest.raises(AttnSegError, match="naming: the attention store has no class list"):
        name_segments(diffseg(store, 4), store)
    empty = AttentionStore("test", 1, (8, 8), (8, 8))
    with pytest.raises(AttnSegError, match="no self-attention maps"):
        diffseg(empty)


def test_kmeans_refinement_keeps_clean_regions():
    truth = regions_of((16, 16), BOXES)
    store = make_store([(truth, region_attention(truth))])
    assert same_partition(diffseg(store, 8, kmeans_iterations=300).labels[0], truth)
