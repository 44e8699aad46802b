"""Small models built from ComfyUI's own classes, with deterministic random weights."""

from __future__ import annotations

import torch

from comfy_env import import_comfy

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy import sd1_clip  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

CONTEXT_DIM = 64

# SD1.5's layout, narrow: attention at latent/1, /2, /4, none at /8 (but the middle); depth 1.
# transformer_depth_output lists the output blocks finest first (ComfyUI pops from the end).
SD15_LAYOUT = dict(channel_mult=[1, 2, 4, 4], num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0],
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   use_linear_in_transformer=False)
# SDXL's layout, narrow: no attention at full latent size, depth 1 at /2 and 2 at /4.
SDXL_LAYOUT = dict(channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 2],
                   transformer_depth_output=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
                   use_linear_in_transformer=True)


# Bumped whenever init_weights changes, so files built from it are rebuilt.
INIT_VERSION = 2


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights; norm gains (``weight``, or ``scale`` as Flux's q/k
    RMSNorms name theirs) 1 and biases 0. A zero q/k gain would make every
    attention uniform, which no capture test could tell from a right one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("bias")):
                gain = "norm" in name and (name.endswith("weight") or name.endswith("scale"))
                p.copy_(torch.ones_like(p) if gain else torch.zeros_like(p))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)


def tiny_unet(layout: dict, seed: int = 0, model_channels: int = 32):
    config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
                  num_head_channels=16, context_dim=CONTEXT_DIM, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
                  disable_self_attentions=None, **layout)
    model_config = comfy.supported_models.SD15(config)
    model_config.unet_config = config  # keep our layout: SD15 would fill in its own defaults
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_clip(seed: int = 0):
    options = {"clip_l_model_config": {"hidden_size": CONTEXT_DIM, "intermediate_size": 128,
                                       "num_attention_heads": 2, "num_hidden_layers": 2,
                                       "projection_dim": CONTEXT_DIM}}
    clip = comfy.sd.CLIP(target=_clip_target(), model_options=options)
    init_weights(clip.cond_stage_model, seed)
    return clip


def _clip_target():
    target = comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel)
    return target


TINY_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}}


def tiny_vae(seed: int = 0):
    params = {**TINY_VAE, "ddconfig": dict(TINY_VAE["ddconfig"])}
    autoencoder = AutoencoderKL(**params)
    init_weights(autoencoder, seed)  # ComfyUI's ops leave weights uninitialised (garbage, even NaN)
    state = autoencoder.state_dict()
    return comfy.sd.VAE(sd=state, config={"params": params})


def write_demo_format_checkpoint(path, layout: dict, seed: int = 0) -> None:
    """A random-weight checkpoint in the demo model's format with the UNet ``layout``,
    which the demo loader node reads from models/attnseg/ (e.g. an SDXL layout)."""
    from comfy_env import import_pack

    import_pack()
    from attnseg_pack.hosts.comfyui import demo_model

    config = {**demo_model.CONFIG, "unet": {**demo_model.CONFIG["unet"], **layout}}
    unet = demo_model.build_unet(config["unet"])
    clip = demo_model.build_clip(config["clip"], torch.float32)
    vae = demo_model.build_vae(config["vae"])
    for offset, module in enumerate((unet.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model)):
        init_weights(module, seed + offset)
    demo_model.save(path, unet.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model, config,
                    {"note": "random weights, written by the tests"})
