"""S-CFG's rate, maps, foreground and blur on synthetic eps and maps."""

import dataclasses
import math

import pytest
import torch

from attnseg import AttnSegError
from attnseg.scfg import (RELEASED_BLUR, blur_sigma, foreground_mask, foreground_maps, guidance_rate,
                          refined_token_maps, smooth, spatial_cfg, token_regions, word_foreground_maps)


def two_regions(h=8, w=8):
    """Region 1 = left half, region 2 = right half; all foreground."""
    regions = torch.ones(1, h, w, dtype=torch.long)
    regions[..., w // 2:] = 2
    return regions, torch.ones(1, h, w, dtype=torch.bool)


def test_the_rate_is_the_foreground_mean_over_the_region_mean():
    regions, foreground = two_regions()
    delta = torch.zeros(1, 4, 8, 8)
    delta[:, 0, :, :4] = 1.0  # left: guidance norm 1
    delta[:, 0, :, 4:] = 2.0  # right: twice as strong
    rate = guidance_rate(delta, regions, foreground, scale=5.0, blur=0)
    # foreground mean 1.5: left 1.5 / 1, right 1.5 / 2 -> clamped up to 0.8
    assert torch.allclose(rate[0, 0, :, :4], torch.full((8, 4), 1.5))
    assert torch.allclose(rate[0, 0, :, 4:], torch.full((8, 4), 0.8))
    capped = guidance_rate(delta, regions, foreground, scale=12.0, blur=0)
    assert torch.allclose(capped[0, 0, :, :4], torch.full((8, 4), 15 / 12.0))  # rho <= 15 / w


def test_uniform_guidance_strength_gives_plain_cfg():
    generator = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    direction = eps_c - eps_u
    eps_c = eps_u + direction / direction.norm(dim=1, keepdim=True)  # ||eps_c - eps_u|| = 1 everywhere
    regions = torch.randint(0, 5, (2, 8, 8), generator=generator)
    rate = guidance_rate(eps_c - eps_u, regions, regions > 0, scale=7.5)
    assert torch.allclose(spatial_cfg(eps_c, eps_u, 7.5, rate), eps_u + 7.5 * (eps_c - eps_u), atol=1e-5)


def test_no_foreground_gives_rate_min_everywhere():
    """The released code's foreground mean is then 0: rho 0, clamped up to rate_min (then the 15 / w cap)."""
    regions, _ = two_regions()
    none = torch.zeros(1, 8, 8, dtype=torch.bool)
    delta = torch.rand(1, 4, 8, 8)
    for limits, scale, expected in (((0.8, 3.0), 7.5, 0.8), ((0.5, 2.0), 7.5, 0.5), ((0.8, 3.0), 20.0, 0.75)):
        rate = guidance_rate(delta, regions, none, scale, limits)
        assert torch.allclose(rate, torch.full_like(rate, expected)), (limits, scale)


def test_the_foreground_is_where_the_other_tokens_sum_beats_bos():
    # 1x2 grid, 4 tokens (BOS, "a", "red", "cat"); identity self-attention. BOS averages 0.5 and so does the
    # sum of the others, so dividing each by its mean keeps the raw comparison.
    cross = torch.tensor([[[0.4, 0.2, 0.2, 0.2],    # BOS beats every single token, not their sum (0.6)
                           [0.6, 0.2, 0.1, 0.1]]])  # BOS beats their sum (0.4)
    assert (cross[0, 0, 0] > cross[0, 0, 1:]).all()
    maps = foreground_maps([((1, 2), torch.eye(2)[None], cross)], (1, 2), blur=0)
    assert maps.shape == (1, 2, 1, 2)
    assert torch.allclose(maps, torch.tensor([[[[0.8, 1.2]], [[1.2, 0.8]]]]))  # (BOS, sum) over their means
    foreground = foreground_mask(maps, (2, 4))  # nearest-upsampled
    assert foreground.shape == (1, 2, 4)
    assert foreground[0, :, :2].all() and not foreground[0, :, 2:].any()


def test_foreground_ties_are_background_and_each_map_is_divided_by_its_own_mean():
    # BOS and the other tokens' sum are proportional everywhere: after dividing each by its mean they tie.
    cross = torch.tensor([[[0.5, 0.3, 0.2], [0.5, 0.1, 0.4], [0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]])
    maps = foreground_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), blur=0)
    assert not foreground_mask(maps, (2, 2)).any()
    # BOS weak everywhere but weakest at pixel 0: only its relative size counts.
    cross = torch.tensor([[[0.05, 0.95], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]])
    maps = foreground_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), blur=0)
    assert foreground_mask(maps, (2, 2)).flatten().tolist() == [True, False, False, False]


def test_foreground_maps_average_the_layers_and_match_the_summed_token_maps():
    generator = torch.Generator().manual_seed(1)
    layers = []
    for grid in ((4, 4), (2, 2)):
        n = grid[0] * grid[1]
        self_attention = torch.rand(2, n, n, generator=generator).softmax(-1)
        cross = torch.rand(2, n, 6, generator=generator).softmax(-1)
        layers.append((grid, self_attention, cross))
    maps = foreground_maps(layers, (4, 4), blur=3)
    expected = 0
    for grid, self_attention, cross in layers:  # every token's blurred map, summed after the fact
        c = (self_attention @ cross + 3 * self_attention @ (self_attention @ cross)) / 4
        raw = smooth(torch.nn.functional.interpolate(c.transpose(1, 2).unflatten(-1, grid), size=(4, 4),
                                                     mode="bilinear", align_corners=False))
        pair = torch.stack([raw[:, 0], raw[:, 1:].sum(1)], 1)
        expected = expected + pair / pair.mean((-2, -1), keepdim=True)
    assert torch.allclose(maps, expected / 2, atol=1e-5)


def test_the_words_rule_compares_the_word_tokens_with_every_other_token():
    # 2x2 grid, T5-style tokens ("a", "red", "cat", EOS, pad): no BOS; identity self-attention.
    cross = torch.tensor([[[0.3, 0.3, 0.2, 0.1, 0.1],     # the words hold 0.8
                           [0.1, 0.1, 0.1, 0.3, 0.4],     # 0.3
                           [0.2, 0.2, 0.2, 0.2, 0.2],     # 0.6
                           [0.0, 0.1, 0.1, 0.4, 0.4]]])   # 0.2
    words = torch.tensor([0, 1, 2])
    maps = word_foreground_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), words, blur=0)
    on_words = torch.tensor([0.8, 0.3, 0.6, 0.2])
    expected = torch.stack([1 - on_words, on_words]).view(1, 2, 2, 2)
    assert torch.allclose(maps, expected / expected.mean((-2, -1), keepdim=True))
    # each sum over its mean (0.475 and 0.525): the words win where they hold more than 0.475 of the attention
    assert foreground_mask(maps, (2, 2)).flatten().tolist() == [True, False, True, False]
    # the same layer and a different word set: only the named tokens count as words
    maps = word_foreground_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), torch.tensor([3, 4]), blur=0)
    assert foreground_mask(maps, (2, 2)).flatten().tolist() == [False, True, False, True]


def test_token_maps_and_regions():
    # 2x2 grid, 3 tokens (BOS, "cat", "sky"); identity self-attention.
    cross = torch.tensor([[[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]])
    maps = refined_token_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), blur=0)
    assert torch.allclose(maps.mean(dim=(-2, -1)), torch.ones(1, 3))  # each token divided by its mean
    regions = token_regions(maps, (4, 4))
    assert regions.shape == (1, 4, 4) and regions.dtype == torch.long
    assert regions[0, 0, 0] == 1 and regions[0, 0, 3] == 1 and regions[0, 3, 0] == 2
    assert regions[0, 3, 3] == 0  # BOS is a region too


def test_the_blur_is_the_released_kernel():
    # exp(-((x - mu) / (2 * 0.5))^2) on x - mu in {-1, 0, 1}, normalised; the 2-D kernel is its outer product.
    line = torch.tensor([math.exp(-((x / (2 * 0.5)) ** 2)) for x in (-1, 0, 1)])
    line = line / line.sum()
    closed_form = torch.outer(line, line)
    assert torch.allclose(closed_form, torch.tensor([[0.0449, 0.1221, 0.0449], [0.1221, 0.3319, 0.1221],
                                                     [0.0449, 0.1221, 0.0449]]), atol=1e-4)
    assert RELEASED_BLUR == 3 and blur_sigma(3) == pytest.approx(0.5 * math.sqrt(2))
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0
    blurred = smooth(impulse)
    assert torch.allclose(blurred[0, 0, 1:4, 1:4], closed_form, atol=1e-6)
    assert blurred.sum().item() == pytest.approx(1.0)
    corner = torch.zeros(1, 1, 5, 5)
    corner[0, 0, 0, 0] = 1.0
    # reflected edges (the mirror excludes the edge pixel): the corner keeps only the centre weight
    assert smooth(corner)[0, 0, 0, 0].item() == pytest.approx(closed_form[1, 1].item(), abs=1e-6)
    assert blur_sigma(5) > blur_sigma(3) and smooth(impulse, 0) is impulse


def test_blur_keeps_constants_and_refuses_even_kernels():
    flat = torch.full((1, 2, 5, 5), 3.0)
    assert torch.allclose(smooth(flat, 3), flat)
    assert torch.allclose(smooth(flat, 5), flat)
    with pytest.raises(AttnSegError, match="blur"):
        smooth(flat, 4)
    with pytest.raises(AttnSegError, match="rate limits"):
        guidance_rate(torch.rand(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                      torch.ones(1, 2, 2, dtype=torch.bool), 5.0, limits=(3.0, 0.8))


# ----- the GoCA map source (GoCA's S-CFG integration) -----

from attnseg.scfg_goca import (ALL_OFF, GoCAStages, StepLayer, automatic_layer_weights, goca_foreground,  # noqa: E402
                               goca_regions, goca_token_maps, propagate)

BG, CAT, DOG = 0, 1, 2
# Tokens: BOS, "a", "cat", "and", "dog", EOS, padding, padding; the words are 1-4.
WORDS = [1, 2, 3, 4]
# Per pixel kind, the token probabilities. EOS and padding take half of every pixel's
# attention (EOS is the strongest single token on the objects), BOS the background's.
COND = {CAT: [0.08, 0.01, 0.38, 0.01, 0.02, 0.3, 0.1, 0.1], DOG: [0.08, 0.01, 0.02, 0.01, 0.38, 0.3, 0.1, 0.1],
        BG: [0.46, 0.01, 0.01, 0.01, 0.01, 0.3, 0.1, 0.1]}
# A layer that sees the two objects swapped, and more sharply: with the plain layer mean it wins.
SWAPPED = {CAT: [0.02, 0.01, 0.02, 0.01, 0.9, 0.02, 0.01, 0.01], DOG: [0.02, 0.01, 0.9, 0.01, 0.02, 0.02, 0.01, 0.01],
           BG: COND[BG]}
# The negative prompt (BOS, EOS, padding): BOS strong on the background only.
UNCOND = {CAT: [0.1, 0, 0, 0, 0, 0.5, 0.2, 0.2], DOG: [0.1, 0, 0, 0, 0, 0.5, 0.2, 0.2],
          BG: [0.6, 0, 0, 0, 0, 0.2, 0.1, 0.1]}


def scene(side):
    """A side x side label grid, flattened: the cat top left, the dog bottom right."""
    labels = torch.full((side, side), BG)
    labels[:side // 2, :side // 2] = CAT
    labels[side // 2:, side // 2:] = DOG
    return labels.flatten()


def cross_of(labels, table):
    return torch.tensor([table[int(label)] for label in labels])[None]


def block_self(labels, within=0.9):
    """Self-attention that stays inside each pixel's region (rows sum to 1)."""
    same = (labels[:, None] == labels[None, :]).float()
    return (within * same / same.sum(1, keepdim=True) + (1 - within) / len(labels))[None]


def scene_layers(table, swapped=None):
    """The layers S-CFG captures on SD1.5 at 512 px, shrunk: an 8x8 and a 4x4 one, both
    seeing the scene; optionally an 8x8 layer that attends uniformly and sees it swapped."""
    fine, coarse = scene(8), scene(4)
    layers = [StepLayer((8, 8), block_self(fine), cross_of(fine, table)),
              StepLayer((4, 4), block_self(coarse), cross_of(coarse, table))]
    if swapped is not None:
        layers.append(StepLayer((8, 8), torch.full((1, 64, 64), 1 / 64), cross_of(fine, swapped)))
    return layers


def scene_step(stages=GoCAStages()):
    cond, uncond = scene_layers(COND, SWAPPED), scene_layers(UNCOND, SWAPPED)
    # The reference queries separate the three regions, so its pseudo self-attention is the scene's.
    reference = ((8, 8), 4.0 * torch.nn.functional.one_hot(scene(8), 3).float()[None])
    operators = [((8, 8), torch.stack([la.self_attention for la in cond if la.grid == (8, 8)]).mean(0))]
    cond_maps = goca_token_maps(cond, (16, 16), stages, reference, WORDS, operators)
    uncond_maps = goca_token_maps(uncond, (16, 16), stages, reference, None, operators)
    return (goca_regions(cond_maps, [0] + WORDS, (16, 16)), goca_foreground(uncond_maps, (16, 16)),
            automatic_layer_weights(reference, cond))


def test_goca_maps_give_the_constructed_scenes_regions_and_foreground():
    regions, foreground, weights = scene_step()
    truth = torch.nn.functional.interpolate(scene(8).view(1, 1, 8, 8).float(), size=(16, 16))[0, 0].long()
    token_of = {CAT: 2, DOG: 4, BG: 0}  # BOS takes the background
    assert torch.equal(regions[0], truth.clone().apply_(lambda label: token_of[label]))
    assert torch.equal(foreground[0], truth != BG)
    # The uniform layer agrees least with the reference's pseudo self-attention; the coarse
    # layer most (GoCA does not renormalise a resampled coarse map, so its rows sum to 4).
    assert weights[0, 2] < weights[0, 0] < weights[0, 1] and weights.sum().item() == pytest.approx(1.0)


def test_without_goca_layer_weights_the_swapped_layer_wins():
    regions, _, _ = scene_step(GoCAStages(layer_weights=False))
    assert regions[0, 0, 0] == 4 and regions[0, -1, -1] == 2  # cat and dog swapped


def test_regions_leave_out_eos_and_padding_and_scfg_would_not():
    cond = scene_layers(COND)
    no_propagation = GoCAStages(layer_weights=False, propagation=False)
    maps = goca_token_maps(cond, (8, 8), no_propagation, content=WORDS)
    assert (maps.argmax(1) >= 5).any()  # after rescaling, EOS/padding still top some pixels
    regions = goca_regions(maps, [0] + WORDS, (8, 8))
    assert (regions <= 4).all()
    assert regions[0, 0, 0] == 2 and regions[0, -1, -1] == 4 and regions[0, 0, -1] == 0


def random_layers(seed, batch=2, tokens=6):
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for grid in ((4, 4), (4, 4), (2, 2)):
        n = grid[0] * grid[1]
        self_attention = torch.rand(batch, n, n, generator=generator).pow(4).softmax(-1)
        cross = (3 * torch.rand(batch, n, tokens, generator=generator)).softmax(-1)
        layers.append(StepLayer(grid, self_attention, cross))
    reference = ((4, 4), torch.randn(batch, 16, 8, generator=generator))
    operators = [((4, 4), layers[0].self_attention)]
    return layers, reference, operators


def test_with_every_goca_stage_off_the_maps_are_scfgs_own():
    layers, reference, operators = random_layers(3)
    scfg = refined_token_maps([(la.grid, la.self_attention, la.cross) for la in layers], (4, 4), blur=3)
    off = goca_token_maps(layers, (4, 4), ALL_OFF, reference, [1, 2, 3], operators, scfg_blur=3)
    assert torch.equal(off, scfg)
    # each stage alone changes them, so the equality above is not a path that ignores the stages
    for stage in ("layer_weights", "rescaling", "propagation"):
        one = goca_token_maps(layers, (4, 4), dataclasses.replace(ALL_OFF, **{stage: True}), reference, [1, 2, 3],
                              operators, scfg_blur=3)
        assert not torch.allclose(one, scfg, atol=1e-3), stage


def test_propagation_equals_gocas_resized_self_attention_formed_whole():
    """GoCA resizes a coarser self-attention to the maps' grid (keys bilinear, queries
    nearest, not renormalised) and multiplies; the pack never forms that matrix."""
    generator = torch.Generator().manual_seed(5)
    grid, size = (3, 4), (7, 10)
    n = grid[0] * grid[1]
    self_attention = (8 * torch.rand(2, n, n, generator=generator)).softmax(-1)  # sharp: the maps keep contrast
    maps = torch.rand(2, 5, *size, generator=generator)
    whole = self_attention.view(2 * n, 1, *grid)  # per query: its map over the keys
    whole = torch.nn.functional.interpolate(whole, size=size, mode="bilinear", align_corners=False)
    whole = whole.view(2, *grid, size[0] * size[1]).permute(0, 3, 1, 2)  # (B, keys', qh, qw)
    whole = torch.nn.functional.interpolate(whole, size=size, mode="nearest").flatten(2).transpose(1, 2)
    flat = maps.flatten(2).transpose(1, 2)
    for _ in range(2):
        flat = whole @ flat
    expected = flat.transpose(1, 2).unflatten(-1, size)
    low, high = expected.amin((-2, -1), keepdim=True), expected.amax((-2, -1), keepdim=True)
    assert torch.allclose(propagate(maps, [(grid, self_attention)], 2), (expected - low) / (high - low), atol=1e-4)
    # on its own grid it is S^2 C
    same = torch.rand(2, 5, *grid, generator=generator)
    plain = self_attention @ (self_attention @ same.flatten(2).transpose(1, 2))
    plain = plain.transpose(1, 2).unflatten(-1, grid)
    low, high = plain.amin((-2, -1), keepdim=True), plain.amax((-2, -1), keepdim=True)
    assert torch.allclose(propagate(same, [(grid, self_attention)], 2), (plain - low) / (high - low), atol=1e-5)
    with pytest.raises(AttnSegError, match="order"):
        propagate(same, [(grid, self_attention)], -1)


def test_the_foreground_is_where_the_blurred_uncond_bos_map_is_below_half():
    bos = torch.tensor([[0.0, 0.2, 0.5, 0.9, 1.0]]).repeat(5, 1)[None, None]  # min-max already
    maps = torch.cat([bos, torch.rand(1, 3, 5, 5)], 1)
    foreground = goca_foreground(maps, (5, 5), blur=0)
    assert foreground[0, 0].tolist() == [True, True, False, False, False]  # 0.5 ties: background
    blurred = goca_foreground(maps, (10, 10))  # blur 5 (GoCA's), nearest upsampling
    assert blurred.shape == (1, 10, 10) and blurred[0, :, 0].all() and not blurred[0, :, -1].any()


def test_goca_maps_refuse_missing_inputs():
    layers, reference, operators = random_layers(4)
    with pytest.raises(AttnSegError, match="reference layer's queries"):
        goca_token_maps(layers, (4, 4), GoCAStages(), None, [1], operators)
    with pytest.raises(AttnSegError, match="no word tokens"):
        goca_token_maps(layers, (4, 4), GoCAStages(), reference, [], operators)
    with pytest.raises(AttnSegError, match="no self-attention to propagate"):
        goca_token_maps(layers, (4, 4), GoCAStages(), reference, [1], [])
    with pytest.raises(AttnSegError, match="captured no attention"):
        goca_token_maps([], (4, 4))
