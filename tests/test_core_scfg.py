"""S-CFG's rate and guidance on synthetic eps and maps."""

import pytest
import torch

from attnseg import AttnSegError
from attnseg.scores import gaussian_blur
from attnseg.scfg import guidance_rate, refined_token_maps, spatial_cfg, token_regions


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


def test_no_foreground_means_rate_one():
    regions, _ = two_regions()
    rate = guidance_rate(torch.rand(1, 4, 8, 8), regions, torch.zeros(1, 8, 8, dtype=torch.bool), 7.5)
    assert torch.allclose(rate, torch.ones_like(rate))


def test_token_maps_regions_and_foreground():
    # 2x2 grid, 3 tokens (BOS, "cat", "sky"); identity self-attention.
    cross = torch.tensor([[[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]])
    maps = refined_token_maps([((2, 2), torch.eye(4)[None], cross)], (2, 2), blur=0)
    assert torch.allclose(maps.mean(dim=(-2, -1)), torch.ones(1, 3))  # each token divided by its mean
    regions, foreground = token_regions(maps, maps, (4, 4))
    assert regions.shape == (1, 4, 4)
    assert regions[0, 0, 0] == 1 and regions[0, 0, 3] == 1 and regions[0, 3, 0] == 2
    assert bool(foreground[0, 0, 0]) and not bool(foreground[0, 3, 3])  # the BOS-dominated cell


def test_blur_keeps_constants_and_refuses_even_kernels():
    flat = torch.full((1, 2, 5, 5), 3.0)
    assert torch.allclose(gaussian_blur(flat, 3), flat)
    with pytest.raises(AttnSegError, match="blur"):
        gaussian_blur(flat, 4)
    with pytest.raises(AttnSegError, match="rate limits"):
        guidance_rate(torch.rand(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                      torch.ones(1, 2, 2, dtype=torch.bool), 5.0, limits=(3.0, 0.8))
