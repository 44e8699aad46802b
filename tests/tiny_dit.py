"""A tiny Flux built from ComfyUI's own classes (supported_models.Flux ->
model_base.Flux -> comfy.ldm.flux.model.Flux), random seeded weights, CPU fp32,
and a stock sampling call on it."""

from __future__ import annotations

import torch

from comfy_env import import_comfy
from tiny_models import init_weights

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402

CONTEXT_DIM = 16
VEC_DIM = 8
LATENT_CHANNELS = 16  # Flux's latent; the patch size 2 makes 64 input features per token
# Flux-dev's layout in miniature: 2 heads of 32 channels (RoPE axes 8 + 12 + 12), 2 double + 2 single blocks.
FLUX_CONFIG = dict(image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                   vec_in_dim=VEC_DIM, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=2.0, num_heads=2,
                   depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                   qkv_bias=True, guidance_embed=True)


def tiny_flux(seed: int = 0, config: dict = FLUX_CONFIG):
    """A ModelPatcher of a random Flux with ``config`` (the benchmark passes a full-width one)."""
    model_config = comfy.supported_models.Flux(config)
    model_config.unet_config = dict(config)  # keep our layout, as a detected checkpoint's config would be
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(tokens: int = 5, batch: int = 1, seed: int = 0, guidance: float = 3.5):
    """A Flux-style conditioning: T5-like token states and a pooled CLIP vector."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=g),
             {"pooled_output": torch.randn(batch, VEC_DIM, generator=g), "guidance": guidance}]]


def latent(batch: int = 1, h: int = 8, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(seed))


def sample(model, positive, lat: torch.Tensor, steps: int = 2, cfg: float = 1.0, negative=None, seed: int = 0):
    """comfy.sample.sample as KSampler runs it (euler, simple schedule)."""
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative or positive,
                               lat, denoise=1.0, disable_pbar=True, seed=seed)
