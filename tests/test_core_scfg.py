"""S-CFG's rate, maps, foreground and blur on synthetic eps and maps."""

import math

import pytest
import torch

from attnseg import AttnSegError
from attnseg.scfg import (RELEASED_BLUR, blur_sigma, foreground_mask, foreground_maps, guidance_rate,
                          refined_token_maps, smooth, spatial_cfg, token_regions)


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
