"""S-CFG (Shen et al., CVPR 2024): classifier-free guidance whose scale varies by region.

Every step, the step's own attention splits the latent into one region per
text token; the guidance in each region is rescaled so that its mean strength
``||eps_c - eps_u||`` matches the foreground's, which keeps small or weakly
guided objects from being under-guided. The maps, the foreground rule and the
blur follow the authors' released code (github.com/SmilesDZgk/S-CFG)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import AttnSegError
from .scores import gaussian_blur, resize

RATE_LIMITS = (0.8, 3.0)
RATE_TIMES_SCALE_CAP = 15.0  # rho <= 15 / w keeps w * rho bounded
RELEASED_BLUR = 3
# The released kernel is exp(-((x - mu) / (2 * 0.5))^2): a Gaussian whose
# standard sigma is 0.5 * sqrt(2) (3x3 weights: corners 0.0449, edges 0.1221,
# centre 0.3319), applied with reflected edges.
RELEASED_BLUR_SIGMA = 0.5 * math.sqrt(2)
_TINY = 1e-12


def blur_sigma(kernel: int) -> float:
    """The standard-Gaussian sigma of S-CFG's blur: the released one at kernel 3,
    growing in proportion to the kernel otherwise (kernel * sqrt(2) / 6), so that
    a larger kernel blurs more instead of only adding taps of weight ~0."""
    return kernel / RELEASED_BLUR * RELEASED_BLUR_SIGMA


def smooth(maps: torch.Tensor, kernel: int = RELEASED_BLUR) -> torch.Tensor:
    """(B, C, h, w) blurred with S-CFG's separable Gaussian (:func:`blur_sigma`),
    reflected edges; kernel <= 1 returns the maps."""
    return gaussian_blur(maps, kernel, blur_sigma(kernel), padding="reflect")


def refine(self_attention: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """S-CFG's per-layer refinement ``(S + 3 S^2) / 4 . C`` of (B, N, T) maps by a
    (B, N, N) self-attention, in fp32, without forming ``S^2``."""
    s, c = self_attention.float(), cross.float()
    return (torch.bmm(s, c) + 3 * torch.bmm(s, torch.bmm(s, c))) / 4


def _layer_maps(layers, target_grid: tuple[int, int], blur: int, columns=None):
    """Per layer ``(grid, self (B, N, N), cross (B, N, T))``: ``C <- (S + 3 S^2) / 4 . C``
    (``columns`` first maps C's tokens to other columns), upsampled to
    ``target_grid``, blurred. Yields (B, T', h, w) fp32."""
    if not layers:
        raise AttnSegError("S-CFG: this step captured no attention maps.")
    for grid, self_attention, cross in layers:
        c = cross.float()
        if columns is not None:
            c = columns(c)
        yield smooth(resize(refine(self_attention, c).transpose(1, 2).unflatten(-1, grid), target_grid), blur)


def mean_normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each (B, T, h, w) map divided by its spatial mean (S-CFG's per-layer normalisation)."""
    return maps / maps.mean(dim=(-2, -1), keepdim=True).clamp_min(_TINY)


def _mean_normalised_average(maps_per_layer) -> torch.Tensor:
    """Each map divided by its spatial mean, then the mean over layers."""
    total, count = None, 0
    for maps in maps_per_layer:
        maps = mean_normalised(maps)
        total = maps if total is None else total + maps
        count += 1
    return total / count


def refined_token_maps(layers: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]], target_grid: tuple[int, int],
                       blur: int = RELEASED_BLUR) -> torch.Tensor:
    """S-CFG's per-token maps from one step's layers, each ``(grid, self (B, N, N),
    cross (B, N, T))``: ``C <- (S + 3 S^2) / 4 . C``, upsampled to ``target_grid``,
    blurred, each token map divided by its spatial mean; mean over layers.
    Returns (B, T, h, w) fp32."""
    return _mean_normalised_average(_layer_maps(layers, target_grid, blur))


def _bos_and_rest(cross: torch.Tensor) -> torch.Tensor:
    return torch.stack([cross[..., 0], cross[..., 1:].sum(-1)], dim=-1)


def foreground_maps(layers: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]], target_grid: tuple[int, int],
                    blur: int = RELEASED_BLUR) -> torch.Tensor:
    """(B, 2, h, w): per layer the BOS map and the sum of every other token's map
    (EOS and padding included), built like :func:`refined_token_maps` up to the
    blur, then each of the two divided by its own spatial mean; mean over layers.
    The tokens are summed before propagation, upsampling and blur, which all are
    linear, so this equals summing the finished per-token maps at 2/T of the cost."""
    return _mean_normalised_average(_layer_maps(layers, target_grid, blur, _bos_and_rest))


def _others_and_words(words: torch.Tensor):
    def columns(cross: torch.Tensor) -> torch.Tensor:
        on_words = cross[..., words].sum(-1)
        return torch.stack([cross.sum(-1) - on_words, on_words], dim=-1)
    return columns


def word_foreground_maps(layers: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]],
                         target_grid: tuple[int, int], words: torch.Tensor,
                         blur: int = RELEASED_BLUR) -> torch.Tensor:
    """(B, 2, h, w) for the cond half: per layer the sum of the maps of every token
    that is not a word (EOS and padding; BOS where there is one) and the sum of the
    ``words`` tokens' maps, built as :func:`foreground_maps` builds its pair, so
    :func:`foreground_mask` marks where the words together beat the rest. Ours, not
    the authors': the released rule needs a BOS, which a T5 sequence (Flux) lacks."""
    return _mean_normalised_average(_layer_maps(layers, target_grid, blur, _others_and_words(words)))


def token_regions(cond_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int64: the argmax token (BOS included) of the cond half's
    :func:`refined_token_maps`, nearest-upsampled to ``size``."""
    regions = cond_maps.argmax(dim=1, keepdim=True).float()
    return F.interpolate(regions, size=size, mode="nearest")[:, 0].long()


def foreground_mask(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool from the uncond half's :func:`foreground_maps`: where the sum
    of the other tokens is strictly above BOS (ties are background; likewise the
    words over the rest for :func:`word_foreground_maps`),
    nearest-upsampled to ``size``."""
    foreground = (maps[:, 1:2] > maps[:, 0:1]).float()
    return F.interpolate(foreground, size=size, mode="nearest")[:, 0].bool()


def guidance_rate(delta: torch.Tensor, regions: torch.Tensor, foreground: torch.Tensor, scale: float,
                  limits: tuple[float, float] = RATE_LIMITS, blur: int = RELEASED_BLUR,
                  count: int | None = None) -> torch.Tensor:
    """rho (B, 1, H, W): the foreground's mean guidance norm over the mean in each
    pixel's region, clamped to ``limits`` and to <= 15 / scale, blurred. ``delta``
    is eps_c - eps_u (B, C, H, W); ``count`` the number of regions (tokens), read
    from ``regions`` when not given (a device sync). With no foreground the
    foreground's mean is 0, so rho is the lower limit everywhere (as released)."""
    low, high = limits
    if not 0 < low <= high:
        raise AttnSegError(f"rate limits: need 0 < min ({low}) <= max ({high}); S-CFG uses 0.8 and 3.0.")
    norm = delta.float().norm(dim=1)  # (B, H, W)
    if count is None:
        count = int(regions.max()) + 1 if regions.numel() else 1
    one_hot = F.one_hot(regions, count).to(norm.dtype)  # (B, H, W, K)
    region_mean = (one_hot * norm[..., None]).sum((1, 2)) / one_hot.sum((1, 2)).clamp_min(1)  # (B, K)
    fg = foreground.to(norm.dtype)
    fg_mean = (fg * norm).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1)  # (B,); 0 without foreground
    per_pixel = torch.gather(region_mean, 1, regions.flatten(1)).view_as(norm)
    rho = fg_mean[:, None, None] / per_pixel.clamp_min(_TINY)
    rho = rho.clamp(low, high)
    if scale > 0:
        rho = rho.clamp(max=RATE_TIMES_SCALE_CAP / scale)
    return smooth(rho[:, None], blur)


def spatial_cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rate: torch.Tensor) -> torch.Tensor:
    """eps_u + w rho (eps_c - eps_u)."""
    return eps_uncond + scale * rate.to(eps_cond.dtype) * (eps_cond - eps_uncond)


def rescale_cfg(guided: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                multiplier: float) -> torch.Tensor:
    """RescaleCFG's rescale (Lin et al., as ComfyUI's RescaleCFG node computes it) applied
    to an already guided prediction, so it can follow S-CFG's spatial guidance.
    ``guided`` and ``cond`` are in the CFG function's space (``x - denoised``), ``x``
    the noisy input, ``sigma`` (B,). In v-prediction space the guided result is
    scaled to the conditional prediction's standard deviation and mixed with
    itself by ``multiplier``; with ``guided`` the plain CFG result this is RescaleCFG."""
    sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
    scale = (sigma ** 2 + 1.0) ** 0.5 / sigma
    x_v = x / (sigma * sigma + 1.0)
    to_v = lambda value: (x_v - (x - value)) * scale  # noqa: E731  (the map RescaleCFG applies)
    cond_v, guided_v = to_v(cond), to_v(guided)
    dims = tuple(range(1, cond.ndim))
    rescaled = guided_v * (cond_v.std(dim=dims, keepdim=True) / guided_v.std(dim=dims, keepdim=True))
    final = multiplier * rescaled + (1.0 - multiplier) * guided_v
    return x - (x_v - final / scale)
