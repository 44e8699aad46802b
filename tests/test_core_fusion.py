"""DiffSegmenter fusion, the store and mask making on hand-built maps."""

import pytest
import torch

from attnseg import AttentionStore, AttnSegError, LayerKey
from attnseg.fusion import diffsegmenter
from attnseg.masks import class_masks, label_map, make_masks, overlay
from attnseg.scores import ScoreMaps, min_max
from attnseg.tokens import ClassTokens, SegPrompt

PROMPT = SegPrompt("a cat and dog", (ClassTokens("cat", (2,)), ClassTokens("dog", (4, 5))), 8,
                   ("", "a", "cat", "and", "dog", "", "", ""))


def cross(grid, hot):
    """(1, N, 8) maps where token t attends the cells ``hot[t]`` (others uniform)."""
    n = grid[0] * grid[1]
    maps = torch.full((1, n, 8), 0.01)
    for token, cells in hot.items():
        maps[0, cells, token] = 1.0
    return maps


def store_with(layers, self_maps=None):
    store = AttentionStore("test", 1, (4, 4), (32, 32), PROMPT)
    for key, grid, maps in layers:
        store.add(key, "cond", grid, maps)
    if self_maps is not None:
        store.add(LayerKey("self", "output", 9, 0, 1), "cond", (4, 4), self_maps)
    return store


def test_store_accumulates_a_mean_over_steps():
    store = AttentionStore("test", 1, (2, 2), (16, 16))
    key = LayerKey("cross", "input", 1, 0, 1)
    store.add(key, "cond", (2, 2), torch.ones(1, 4, 3))
    store.add(key, "cond", (2, 2), torch.zeros(1, 4, 3))
    (_, stored), = store.layers("cross")
    assert stored.count == 2 and stored.total.dtype == torch.float16
    torch.testing.assert_close(stored.mean(), torch.full((1, 4, 3), 0.5))
    assert store.layers("cross", "uncond") == []
    with pytest.raises(AttnSegError, match="no self-attention maps of the cond branch"):
        store.require("self")


def test_fusion_follows_class_tokens_and_multi_token_mean():
    fine = LayerKey("cross", "output", 9, 0, 1)
    # cat (token 2) in the top-left cell, dog (tokens 4 and 5) in the bottom-right
    maps = cross((4, 4), {2: [0], 4: [15], 5: [15, 14]})
    scores = diffsegmenter(store_with([(fine, (4, 4), maps)]), weights=[1.0], self_completion=False)
    assert scores.class_names == ["cat", "dog"] and scores.maps.shape == (1, 2, 4, 4)
    assert scores.maps[0, 0].flatten().argmax() == 0
    assert scores.maps[0, 1].flatten().argmax() == 15
    assert 0 < scores.maps[0, 1].flatten()[14] < 1  # only one of dog's two tokens looks there


def test_weights_apply_coarsest_first():
    coarse = LayerKey("cross", "middle", 0, 0, 2)
    fine = LayerKey("cross", "output", 9, 0, 1)
    layers = [(coarse, (2, 2), cross((2, 2), {2: [3]})), (fine, (4, 4), cross((4, 4), {2: [0]}))]
    coarse_only = diffsegmenter(store_with(layers), weights=[1.0, 0.0], self_completion=False)
    fine_only = diffsegmenter(store_with(layers), weights=[0.0, 1.0], self_completion=False)
    assert coarse_only.maps[0, 0].flatten().argmax() == 15  # coarse cell 3 covers the bottom-right
    assert fine_only.maps[0, 0].flatten().argmax() == 0
    with pytest.raises(AttnSegError, match="weights: 1 weights for 2 resolutions"):
        diffsegmenter(store_with(layers), weights=[1.0], self_completion=False)


def test_self_completion_is_one_product_with_self_attention():
    fine = LayerKey("cross", "output", 9, 0, 1)
    maps = cross((4, 4), {2: [0], 4: [15], 5: [15]})
    torch.manual_seed(0)
    self_attn = torch.rand(1, 16, 16).softmax(-1)
    plain = diffsegmenter(store_with([(fine, (4, 4), maps)]), weights=[1.0], self_completion=False)
    completed = diffsegmenter(store_with([(fine, (4, 4), maps)], self_attn), weights=[1.0])
    stored_self = self_attn.half().float()
    expected = min_max(torch.bmm(stored_self, plain.maps.flatten(-2).transpose(1, 2)).transpose(1, 2).view(1, 2, 4, 4))
    torch.testing.assert_close(completed.maps, expected, atol=1e-4, rtol=1e-3)


def test_store_without_classes_is_refused():
    store = AttentionStore("test", 1, (4, 4), (32, 32))
    with pytest.raises(AttnSegError, match="no class list"):
        diffsegmenter(store)


def test_labels_masks_and_overlay():
    scores = torch.zeros(1, 2, 2, 3)
    scores[0, 0, 0, 0] = 0.9
    scores[0, 1, 0, 0] = 0.6
    scores[0, 1, 1, 2] = 0.7
    labels = label_map(scores, 0.5)
    assert labels.tolist() == [[[1, 0, 0], [0, 0, 2]]]
    masks = class_masks(torch.cat([labels, labels]), 2)
    assert masks.shape == (4, 2, 3) and masks[1, 1, 2] == 1 and masks[0, 0, 0] == 1 and masks.sum() == 4
    image = torch.full((1, 2, 3, 3), 0.5)
    coloured = overlay(labels, 2, image)
    assert torch.equal(coloured[0, 0, 1], image[0, 0, 1]) and not torch.equal(coloured[0, 0, 0], image[0, 0, 0])
    with pytest.raises(AttnSegError, match="threshold"):
        label_map(scores, 1.5)
    # A negative threshold is GoCA's offset on a background map, refused without one.
    background = torch.full((1, 1, 2, 3), 0.5)
    assert label_map(scores, -0.2, background_map=background).tolist() == [[[1, 0, 0], [0, 0, 2]]]
    assert label_map(scores, -0.5, background_map=background).tolist() == [[[1, 1, 1], [1, 1, 2]]]
    with pytest.raises(AttnSegError, match="threshold: -0.2 is negative.*background map"):
        label_map(scores, -0.2)


def test_make_masks_resizes_to_the_image_aspect():
    maps = torch.rand(2, 3, 6, 8)
    labels, masks, soft = make_masks(ScoreMaps(maps, ["a", "b", "c"], (48, 64)), 0.5)
    assert labels.shape == (2, 48, 64) and masks.shape == (6, 48, 64) and soft.shape == (2, 3, 48, 64)
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1


def test_finest_self_attention_is_chosen_by_factor_even_when_pooled_to_a_coarser_grid():
    from attnseg import AttentionStore, LayerKey
    from attnseg.fusion import mean_self_attention
    store = AttentionStore("test", 1, (8, 8), (64, 64), dtype=torch.float32)
    fine, coarse = torch.eye(16)[None], torch.full((1, 16, 16), 1 / 16)
    store.add(LayerKey("self", "input", 1, 0, 1), "cond", (4, 4), fine)  # an 8x8 layer pooled to 4x4
    store.add(LayerKey("self", "input", 4, 0, 2), "cond", (4, 4), coarse)  # a 4x4 layer
    grid, maps = mean_self_attention(store)
    assert grid == (4, 4) and torch.equal(maps, fine)


def test_diffsegmenter_weights_name_what_applies_and_refuse_what_cannot():
    prompt = SegPrompt("a cat", (ClassTokens("cat", (2,)),), 4, ("", "a", "cat", ""))
    store = AttentionStore("test", 1, (4, 4), (32, 32), prompt, dtype=torch.float32)
    for factor, grid in ((1, (4, 4)), (2, (2, 2))):
        store.add(LayerKey("cross", "output", factor, 0, factor), "cond", grid,
                  torch.rand(1, grid[0] * grid[1], 4, generator=torch.Generator().manual_seed(factor)))
    # The paper's four weights on a two-level model: the two coarsest apply, and the method says so.
    assert diffsegmenter(store, self_completion=False).method == "diffsegmenter (weights 0.3, 0.5 on 2x2, 4x4)"
    with pytest.raises(AttnSegError, match="weights: 3 weights for 2 resolutions \\(2x2, 4x4\\)"):
        diffsegmenter(store, (0.2, 0.3, 0.5), self_completion=False)
    with pytest.raises(AttnSegError, match="at least one must be positive"):
        diffsegmenter(store, (0.0, 0.0), self_completion=False)
