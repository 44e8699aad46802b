"""GoCA's stages on plain tensors (no ComfyUI)."""

import pytest
import torch

from attnseg import AttentionStore, AttnSegError, ClassTokens, LayerKey, SegPrompt
from attnseg.attention import attention_with_maps
from attnseg.goca import (aggregate, goca, layer_weights, output_weighted_heads, propagate, rescale,
                          self_on_reference_grid)
from attnseg.progress import reporting
from attnseg.scores import min_max


def explicit_head_weights(head_out, weight):
    """w_n = <h_n, O> / ||O||^2 with every h_n materialised: (B, heads, n, d) -> (B, n, heads)."""
    heads, dim = head_out.shape[1], head_out.shape[3]
    per_head = torch.stack([head_out[:, n] @ weight[:, n * dim:(n + 1) * dim].T for n in range(heads)], dim=2)
    total = per_head.sum(2, keepdim=True)
    return (per_head * total).sum(-1) / (total ** 2).sum(-1)


def test_head_weights_match_the_definition_and_sum_to_one():
    torch.manual_seed(0)
    heads, dim, n, tokens = 4, 8, 10, 6
    probs = torch.rand(2, heads, n, tokens).softmax(-1)
    head_out = torch.randn(2, heads, n, dim)
    weight = torch.randn(24, heads * dim)
    shares = explicit_head_weights(head_out, weight)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, n))
    assert bool((shares < 0).any())  # GoCA keeps negative weights (no clamp)
    expected = torch.einsum("bhnt,bnh->bnt", probs, shares)
    torch.testing.assert_close(output_weighted_heads(weight)(probs, head_out), expected, atol=1e-5, rtol=1e-4)


def test_identical_heads_give_the_head_mean():
    torch.manual_seed(1)
    heads, dim = 3, 4
    probs = torch.rand(1, heads, 5, 7).softmax(-1)  # the maps differ ...
    head_out = torch.randn(1, 1, 5, dim).expand(1, heads, 5, dim)  # ... the heads' outputs do not
    weight = torch.randn(6, dim).repeat(1, heads)
    torch.testing.assert_close(output_weighted_heads(weight)(probs, head_out), probs.mean(1), atol=1e-6, rtol=1e-5)


def test_head_weighting_inside_the_attention_chunks(monkeypatch):
    """Run through attention_with_maps in several query chunks: the same as on the whole output."""
    torch.manual_seed(2)
    heads, dim = 2, 8
    q, k, v = torch.randn(1, 20, heads * dim), torch.randn(1, 6, heads * dim), torch.randn(1, 6, heads * dim)
    weight = torch.randn(heads * dim, heads * dim)
    monkeypatch.setattr("attnseg.attention.CHUNK_ELEMENTS", heads * 6 * 3)
    out, maps = attention_with_maps(q, k, v, heads, reducer=output_weighted_heads(weight))
    qh, kh, vh = (t.view(1, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    probs = (qh @ kh.transpose(-1, -2) / dim ** 0.5).softmax(-1)
    expected = torch.einsum("bhnt,bnh->bnt", probs, explicit_head_weights(probs @ vh, weight))
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


def clustered_queries(grid, clusters, channels=8, strength=6.0):
    """Queries whose pseudo self-attention is (nearly) uniform within each cluster."""
    n = grid[0] * grid[1]
    labels = torch.arange(n) % clusters
    return (torch.eye(channels)[labels] * strength)[None], labels


def test_layer_weights_select_the_layer_whose_self_attention_is_the_pseudo_one():
    grid = (4, 4)
    queries, labels = clustered_queries(grid, clusters=4)
    pseudo = (queries @ queries.transpose(1, 2) / queries.shape[-1] ** 0.5).softmax(-1)
    shifted = pseudo[:, :, torch.roll(torch.arange(16), 1)]  # each row attends to another cluster
    uniform = torch.full((1, 16, 16), 1 / 16)
    weights = layer_weights(queries, grid, [(grid, shifted, 1.0), (grid, pseudo, 1.0), (grid, uniform, 1.0)])
    assert weights.shape == (1, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    assert int(weights.argmax()) == 1 and float(weights[0, 1]) > 0.6


def test_layer_weights_are_the_same_in_row_chunks(monkeypatch):
    torch.manual_seed(3)
    queries = torch.randn(2, 64, 16)
    layers = [((8, 8), torch.rand(2, 64, 64).softmax(-1), 1.0), ((4, 4), torch.rand(2, 16, 16).softmax(-1), 1.0)]
    whole = layer_weights(queries, (8, 8), layers)
    monkeypatch.setattr("attnseg.goca.CHUNK_ELEMENTS", 2 * 64 * 5)
    ticks = []
    with reporting(lambda stage, done, total: ticks.append((done, total))):
        torch.testing.assert_close(layer_weights(queries, (8, 8), layers), whole)
    # progress after each block of 5 rows, ending at all 64
    assert ticks == [(min(64, start + 5), 64) for start in range(0, 64, 5)]


def test_coarse_self_attention_is_resampled_without_renormalising():
    """Query axis nearest, key axis bilinear, values kept: a uniform 2x2 layer
    read on a 4x4 grid keeps 1/4 per key, so its rows sum to 4."""
    coarse = torch.full((1, 4, 4), 0.25)
    rows = torch.arange(16)
    resampled = self_on_reference_grid(coarse, (2, 2), rows, (4, 4))
    torch.testing.assert_close(resampled, torch.full((1, 16, 16), 0.25))
    # a one-hot row: the 4x4 reference query (0, 3) reads the coarse query (0, 1)
    peaked = torch.zeros(1, 4, 4)
    peaked[0, 1, 2] = 1.0
    row = self_on_reference_grid(peaked, (2, 2), torch.tensor([3]), (4, 4))[0, 0].view(4, 4)
    assert float(row[3, 0]) == 1.0 and float(row[0, 0]) == 0.0


def test_aggregate_renormalises_over_tokens_and_clamps_negatives():
    torch.manual_seed(4)
    coarse = torch.rand(1, 4, 5).softmax(-1)
    fine = torch.rand(1, 16, 5).softmax(-1) - 0.1  # auto heads can go negative
    tokens = aggregate([((2, 2), coarse), ((4, 4), fine)], torch.tensor([[0.3, 0.7]]), (4, 4))
    assert tokens.shape == (1, 5, 4, 4)
    assert bool((tokens >= 0).all())
    torch.testing.assert_close(tokens.sum(1), torch.ones(1, 4, 4))


def test_rescaling_divides_by_the_content_attention():
    """A class with a small share of a pixel's attention everywhere except where it has all of it."""
    cls = torch.full((1, 1, 6, 6), 0.1)
    content = torch.full((1, 1, 6, 6), 0.5)
    cls[..., 2:4, 2:4] = 0.5
    out = rescale(cls, content, blur=0)
    assert float(out[0, 0, 2, 2]) == 1.0 and float(out[0, 0, 0, 0]) == 0.0


def test_propagation_is_s_to_the_k_times_c():
    torch.manual_seed(5)
    s = (torch.randn(2, 12, 12) * 4).softmax(-1)  # peaked, so S^3 C keeps its contrast
    c = torch.rand(2, 3, 3, 4)
    flat = c.flatten(-2).transpose(1, 2)
    expected = min_max((s @ s @ s @ flat).transpose(1, 2).unflatten(-1, (3, 4)))
    torch.testing.assert_close(propagate(c, s, (3, 4), order=3), expected)


def synthetic_store(with_self=True, with_query=True):
    """A 4x4 latent with a cat on the left half: tokens BOS, 'a', 'cat', 'sky', EOS."""
    prompt = SegPrompt("a cat sky", (ClassTokens("cat", (2,)), ClassTokens("sky", (3,))), 5,
                       ("", "a", "cat", "sky", ""))
    store = AttentionStore("test", 1, (4, 4), (32, 32), prompt, dtype=torch.float32)
    left = (torch.arange(16) % 4 < 2).float()
    cross = torch.zeros(1, 16, 5)
    cross[0, :, 0] = 0.5
    cross[0, :, 2] = 0.4 * left + 0.05
    cross[0, :, 3] = 0.4 * (1 - left) + 0.05
    cross[0, :, 1] = 1 - cross[0].sum(-1)
    same_side = (left[:, None] == left[None, :]).float()
    for block, block_id in (("input", 1), ("output", 3)):
        store.add(LayerKey("cross", block, block_id, 0, 1), "cond", (4, 4), cross)
        if with_self:
            store.add(LayerKey("self", block, block_id, 0, 1), "cond", (4, 4), (same_side / same_side.sum(-1, True))[None])
    if with_query:
        store.add(LayerKey("query", "output", 3, 0, 1), "cond", (4, 4), left[None, :, None] * torch.ones(1, 16, 4))
    return store, left.view(4, 4)


def test_goca_finds_the_class_and_the_background_map():
    store, left = synthetic_store()
    scores = goca(store, background_classes=["sky"])
    assert scores.class_names == ["cat"]
    assert scores.background.shape == (1, 1, 4, 4)
    assert bool((scores.maps[0, 0] > 0.5).eq(left.bool()).all())
    assert bool((scores.background[0, 0] > 0.5).eq(~left.bool()).all())
    assert "heads mean" in scores.method and "layers auto" in scores.method


def test_goca_stages_switch_off():
    store, left = synthetic_store(with_self=False, with_query=False)
    scores = goca(store, layer_weighting="uniform", rescaling=False, order=0)
    assert scores.class_names == ["cat", "sky"] and scores.background is None
    assert bool((scores.maps[0, 0] > 0.5).eq(left.bool()).all())


def test_goca_explains_what_to_capture_and_which_classes_to_name():
    store, _ = synthetic_store(with_self=False)
    with pytest.raises(AttnSegError, match="self_layers"):
        goca(store)
    store, _ = synthetic_store()
    with pytest.raises(AttnSegError, match="background_classes: grass"):
        goca(store, background_classes=["grass"])
    with pytest.raises(AttnSegError, match="every class is marked"):
        goca(store, background_classes=["cat", "sky"])
    with pytest.raises(AttnSegError, match="layer_weights"):
        goca(store, layer_weighting="learned")
