"""A tiny Flux and a tiny SD3 built from ComfyUI's own classes
(supported_models.Flux -> model_base.Flux -> comfy.ldm.flux.model.Flux;
supported_models.SD3 -> model_base.SD3 -> mmdit.OpenAISignatureMMDITWrapper),
random seeded weights, CPU fp32, a stock sampling call on them, and small text
encoders of ComfyUI's Flux / SD3 classes on the real tokenizers ComfyUI ships."""

from __future__ import annotations

import torch

from comfy_env import import_comfy
from tiny_models import init_weights

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed  # noqa: E402
from comfy.text_encoders.flux import FluxClipModel, FluxTokenizer  # noqa: E402
from comfy.text_encoders.sd3_clip import SD3ClipModel, SD3Tokenizer  # noqa: E402

CONTEXT_DIM = 16
VEC_DIM = 8
LATENT_CHANNELS = 16  # Flux's latent; the patch size 2 makes 64 input features per token
# Flux-dev's layout in miniature: 2 heads of 32 channels (RoPE axes 8 + 12 + 12), 2 double + 2 single blocks.
FLUX_CONFIG = dict(image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                   vec_in_dim=VEC_DIM, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=2.0, num_heads=2,
                   depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                   qkv_bias=True, guidance_embed=True)


# The text encoders' widths, which the models below read: T5's states are the
# context (SD3: after CLIP-L+G's, zero-padded to the same width); the pooled
# vector is CLIP-L's unprojected one (Flux) or CLIP-L's then CLIP-G's projected one (SD3).
T5_WIDTH = 128
CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 64
SD3_POOLED_DIM = CLIP_L_WIDTH + CLIP_G_WIDTH
# Real vocabularies (kept from ComfyUI's JSON configs), so the real tokenizers' ids work.
TEXT_ENCODER_OPTIONS = {
    "t5xxl_model_config": dict(d_model=T5_WIDTH, d_kv=32, num_heads=2, d_ff=256, num_layers=2),
    # three layers each: SD3 reads CLIP-L's and CLIP-G's penultimate layer (index -2, which needs 3)
    "clip_l_model_config": dict(hidden_size=CLIP_L_WIDTH, intermediate_size=64, num_attention_heads=2,
                                num_hidden_layers=3, projection_dim=CLIP_L_WIDTH),
    "clip_g_model_config": dict(hidden_size=CLIP_G_WIDTH, intermediate_size=128, num_attention_heads=2,
                                num_hidden_layers=3, projection_dim=CLIP_G_WIDTH),
}
# The Flux that stock detection (model_detection.detect_unet_config) rebuilds from
# a file: it fixes 24 heads, RoPE axes 16 + 56 + 56 (heads of 128) and mlp_ratio 4,
# so the width must be Flux-dev's 3072; the depths (one block of each kind) and the
# text widths are read from the weights. ~531M parameters.
FLUX_FILE_CONFIG = dict(FLUX_CONFIG, hidden_size=3072, num_heads=24, mlp_ratio=4.0, axes_dim=[16, 56, 56],
                        depth=1, depth_single_blocks=1, context_in_dim=T5_WIDTH, vec_in_dim=CLIP_L_WIDTH)
# SD3 (MMDiT) exactly as detection reads it back: width 64 * depth, `depth` heads of 64
# and `depth` joint blocks (the last one's context stream pre-only); the position
# table covers 64 x 64 patches (images up to 1024 px).
SD3_DEPTH = 4
SD3_CONFIG = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2, depth=SD3_DEPTH,
                  input_size=None, adm_in_channels=SD3_POOLED_DIM, num_patches=64 * 64, pos_embed_max_size=64,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": T5_WIDTH, "out_features": 64 * SD3_DEPTH}},
                  pos_embed_scaling_factor=None, x_block_self_attn_layers=[])


def tiny_flux(seed: int = 0, config: dict = FLUX_CONFIG):
    """A ModelPatcher of a random Flux with ``config`` (the benchmark passes a full-width one)."""
    model_config = comfy.supported_models.Flux(config)
    model_config.unet_config = dict(config)  # keep our layout, as a detected checkpoint's config would be
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_sd3(seed: int = 0, config: dict = SD3_CONFIG):
    """A ModelPatcher of a random SD3 (MMDiT) with ``config``."""
    model = comfy.supported_models.SD3(config).get_model({})
    net = model.diffusion_model
    init_weights(net, seed)
    # A buffer, which init_weights leaves empty: SD3's fixed sin-cos table, as its files hold.
    table = get_2d_sincos_pos_embed(net.hidden_size, net.pos_embed_max_size)
    net.pos_embed.copy_(torch.from_numpy(table).float()[None])
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(tokens: int = 5, batch: int = 1, seed: int = 0, guidance: float = 3.5):
    """A Flux-style conditioning: T5-like token states and a pooled CLIP vector."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=g),
             {"pooled_output": torch.randn(batch, VEC_DIM, generator=g), "guidance": guidance}]]


def sd3_conditioning(tokens: int = 5, batch: int = 1, seed: int = 0):
    """An SD3-style conditioning for tiny_sd3: context token states and the pooled vector."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, T5_WIDTH, generator=g),
             {"pooled_output": torch.randn(batch, SD3_POOLED_DIM, generator=g)}]]


class TinySD3ClipModel(SD3ClipModel):
    """SD3ClipModel with its one fixed width changed: it zero-pads the CLIP-L+G
    states to 4096 (T5-XXL's width) before appending T5's; here to T5_WIDTH."""

    def encode_token_weights(self, token_weight_pairs):
        l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
        cut = min(l_out.shape[1], g_out.shape[1])
        lg_out = torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1)
        lg_out = torch.nn.functional.pad(lg_out, (0, T5_WIDTH - lg_out.shape[-1]))
        t5_out = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])[0]
        return torch.cat([lg_out, t5_out], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1), {}


TEXT_ENCODERS = {"flux": (FluxTokenizer, FluxClipModel), "sd3": (SD3Tokenizer, TinySD3ClipModel)}


def text_encoder(family: str, seed: int | None = 0):
    """A comfy.sd.CLIP of ``family``'s encoder structure with TEXT_ENCODER_OPTIONS,
    seeded random weights (``seed=None``: left as built, for loading weights into)."""
    tokenizer, model = TEXT_ENCODERS[family]
    target = comfy.supported_models_base.ClipTarget(tokenizer, model)
    clip = comfy.sd.CLIP(target=target, model_options=TEXT_ENCODER_OPTIONS)
    if seed is not None:
        init_weights(clip.cond_stage_model, seed)
    return clip


def flux_clip(seed: int = 0):
    """Flux's CLIP-L + T5 (FluxClipModel): T5 states (B, 256 or more, T5_WIDTH), pooled (B, CLIP_L_WIDTH)."""
    return text_encoder("flux", seed)


def sd3_clip(seed: int = 0):
    """SD3's CLIP-L + CLIP-G + T5: context (B, 77 + 77 per chunk, T5_WIDTH), pooled (B, SD3_POOLED_DIM)."""
    return text_encoder("sd3", seed)


def latent(batch: int = 1, h: int = 8, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(seed))


def sample(model, positive, lat: torch.Tensor, steps: int = 2, cfg: float = 1.0, negative=None, seed: int = 0):
    """comfy.sample.sample as KSampler runs it (euler, simple schedule)."""
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative or positive,
                               lat, denoise=1.0, disable_pbar=True, seed=seed)
