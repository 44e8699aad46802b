"""S-CFG (Shen et al.): classifier-free guidance whose scale varies by region.

Every step, the step's own attention splits the latent into one region per
text token; the guidance in each region is rescaled so that its mean strength
``||eps_c - eps_u||`` matches the foreground's, which keeps small or weakly
guided objects from being under-guided."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import AttnSegError
from .scores import gaussian_blur, resize

RATE_LIMITS = (0.8, 3.0)
RATE_TIMES_SCALE_CAP = 15.0  # rho <= 15 / w keeps w * rho bounded
_TINY = 1e-12


def refined_token_maps(layers: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]], target_grid: tuple[int, int],
                       blur: int = 3) -> torch.Tensor:
    """S-CFG's per-token maps from one step's layers, each ``(grid, self (B, N, N),
    cross (B, N, T))``: ``C <- (S + 3 S^2) / 4 . C``, upsampled to ``target_grid``,
    blurred, each token map divided by its spatial mean; mean over layers.
    Returns (B, T, h, w) fp32."""
    if not layers:
        raise AttnSegError("S-CFG: this step captured no attention maps.")
    total = None
    for grid, self_attention, cross in layers:
        s = self_attention.float()
        c = cross.float()
        c = (torch.bmm(s, c) + 3 * torch.bmm(s, torch.bmm(s, c))) / 4  # (S + 3 S^2) C without forming S^2
        maps = resize(c.transpose(1, 2).unflatten(-1, grid), target_grid)
        maps = gaussian_blur(maps, blur)
        maps = maps / maps.mean(dim=(-2, -1), keepdim=True).clamp_min(_TINY)
        total = maps if total is None else total + maps
    return total / len(layers)


def token_regions(cond_maps: torch.Tensor, uncond_maps: torch.Tensor, size: tuple[int, int]):
    """(regions (B, H, W) int64: the argmax token of the cond maps; foreground (B, H, W)
    bool: where the uncond maps' argmax is not token 0 (BOS)), nearest-upsampled to ``size``."""
    regions = cond_maps.argmax(dim=1, keepdim=True).float()
    foreground = (uncond_maps.argmax(dim=1, keepdim=True) != 0).float()
    regions = F.interpolate(regions, size=size, mode="nearest")[:, 0].long()
    foreground = F.interpolate(foreground, size=size, mode="nearest")[:, 0].bool()
    return regions, foreground


def guidance_rate(delta: torch.Tensor, regions: torch.Tensor, foreground: torch.Tensor, scale: float,
                  limits: tuple[float, float] = RATE_LIMITS, blur: int = 3, count: int | None = None) -> torch.Tensor:
    """rho (B, 1, H, W): the foreground's mean guidance norm over the mean in each
    pixel's region, clamped to ``limits`` and to <= 15 / scale, blurred. ``delta``
    is eps_c - eps_u (B, C, H, W); ``count`` the number of regions (tokens), read
    from ``regions`` when not given (a device sync). With no foreground, rho is 1."""
    low, high = limits
    if not 0 < low <= high:
        raise AttnSegError(f"rate limits: need 0 < min ({low}) <= max ({high}); S-CFG uses 0.8 and 3.0.")
    norm = delta.float().norm(dim=1)  # (B, H, W)
    if count is None:
        count = int(regions.max()) + 1 if regions.numel() else 1
    one_hot = F.one_hot(regions, count).to(norm.dtype)  # (B, H, W, K)
    region_mean = (one_hot * norm[..., None]).sum((1, 2)) / one_hot.sum((1, 2)).clamp_min(1)  # (B, K)
    fg = foreground.to(norm.dtype)
    fg_mean = (fg * norm).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1)  # (B,)
    per_pixel = torch.gather(region_mean, 1, regions.flatten(1)).view_as(norm)
    rho = fg_mean[:, None, None] / per_pixel.clamp_min(_TINY)
    rho = rho.clamp(low, high)
    if scale > 0:
        rho = rho.clamp(max=RATE_TIMES_SCALE_CAP / scale)
    rho = torch.where(fg.sum((1, 2), keepdim=True) > 0, rho, torch.ones_like(rho))
    return gaussian_blur(rho[:, None], blur)


def spatial_cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rate: torch.Tensor) -> torch.Tensor:
    """eps_u + w rho (eps_c - eps_u)."""
    return eps_uncond + scale * rate.to(eps_cond.dtype) * (eps_cond - eps_uncond)
