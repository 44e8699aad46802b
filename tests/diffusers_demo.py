"""The shipped demo model (demo/attnseg-shapes.safetensors) as a diffusers
StableDiffusionPipeline, converted at test time with diffusers' own single-file
conversion code (no second copy of the weights is committed).

The checkpoint's metadata holds the configs its ComfyUI loader
(hosts/comfyui/demo_model.py) builds the model from; the same configs become
diffusers' and transformers' configs here: the LDM UNet (levels of
``model_channels * channel_mult``, attention where ``transformer_depth`` says,
``num_head_channels`` wide heads, a middle block of one resnet) as a
UNet2DConditionModel, the LDM autoencoder as an AutoencoderKL, the SD1 CLIP text
model (ComfyUI's SD1 config with the checkpoint's width and depth) as a
transformers CLIPTextModel with the standard SD1 tokenizer, and SD1.5's noise
schedule (scaled-linear betas 0.00085..0.012) as a DDIMScheduler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "demo" / "attnseg-shapes.safetensors"


def checkpoint_config() -> dict:
    with safe_open(str(CHECKPOINT), "pt") as handle:
        return json.loads(handle.metadata()["attnseg_config"])


def unet_config(ldm: dict) -> dict:
    """diffusers' UNet2DConditionModel config of an LDM (ComfyUI) UNet config."""
    levels = len(ldm["channel_mult"])
    channels = [ldm["model_channels"] * m for m in ldm["channel_mult"]]
    attention = [depth > 0 for depth in ldm["transformer_depth"]]
    # LDM lists the output blocks' depths finest level first; diffusers' up blocks go coarsest first.
    per_level = ldm["num_res_blocks"][0] + 1
    output_depths = ldm["transformer_depth_output"]
    up_attention = [output_depths[level * per_level] > 0 for level in range(levels)][::-1]
    return dict(
        sample_size=ldm["image_size"], in_channels=ldm["in_channels"], out_channels=ldm["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        mid_block_type="UNetMidBlock2DCrossAttn" if ldm["transformer_depth_middle"] >= 0 else "UNetMidBlock2D",
        block_out_channels=tuple(channels), layers_per_block=ldm["num_res_blocks"][0],
        cross_attention_dim=ldm["context_dim"],
        # diffusers' attention_head_dim of SD1-style configs is the number of heads
        attention_head_dim=tuple(c // ldm["num_head_channels"] for c in channels),
        use_linear_projection=ldm["use_linear_in_transformer"], flip_sin_to_cos=True, freq_shift=0)


def vae_config(ldm: dict) -> dict:
    dd = ldm["ddconfig"]
    channels = tuple(dd["ch"] * m for m in dd["ch_mult"])
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=dd["z_channels"],
                down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                layers_per_block=dd["num_res_blocks"], sample_size=dd["resolution"], scaling_factor=0.18215)


def ldm_state() -> dict:
    """The checkpoint's tensors under the prefixes original (LDM) SD checkpoints use, which
    diffusers' converters and single-file loader read."""
    def renamed(key: str) -> str:
        for ours, theirs in (("unet.", "model.diffusion_model."), ("vae.", "first_stage_model."),
                             ("clip.clip_l.transformer.", "cond_stage_model.transformer.")):
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key
    return {renamed(k): v for k, v in load_file(str(CHECKPOINT)).items()}


def save_ldm_checkpoint(path: Path) -> None:
    """The demo model as an original-layout single-file checkpoint (for from_single_file tests)."""
    save_file({k: v.contiguous() for k, v in ldm_state().items()}, str(path))


def comfy_sd1_folder() -> Path:
    """ComfyUI's copy of SD1's CLIP config and tokenizer (comfy/sd1_clip_config.json, comfy/sd1_tokenizer)."""
    from comfy import sd1_clip
    return Path(sd1_clip.__file__).parent


def demo_pipeline(dtype: torch.dtype = torch.float32):
    """The demo model as a diffusers StableDiffusionPipeline on the CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = checkpoint_config()
    ldm = {k: v.float() for k, v in ldm_state().items()}

    unet = UNet2DConditionModel(**unet_config(config["unet"]))
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True)
    vae = AutoencoderKL(**vae_config(config["vae"]))
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm, vae.config), strict=True)
    folder = comfy_sd1_folder()
    text_config = {**json.loads((folder / "sd1_clip_config.json").read_text()), **config["clip"]}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_state = convert_ldm_clip_checkpoint(ldm)
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):  # transformers 5 drops the prefix
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    missing, unexpected = text_encoder.load_state_dict(text_state, strict=False)
    # ComfyUI's text model also carries a projection SD's UNet never reads.
    assert not missing and set(unexpected) <= {"text_projection.weight"}, (missing, unexpected)
    # ComfyUI raises the tokenizer's length limit (it chunks long prompts itself); a pipeline reads 77 tokens.
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "sd1_tokenizer"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(torch.device("cpu"), dtype)
