"""A full-size SD1.5 checkpoint with random weights, written by ComfyUI's own
save path so the stock CheckpointLoaderSimple loads it (detection needs the
real sizes: context 768, 320 channels). Built once, cached outside the repo.

    python tests/random_sd15.py        # prints the checkpoint's path
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# v2: the autoencoder's weights seeded like the UNet's (torch's default init made every
# latent NaN, so every captured map was NaN too).
NAME = "attnseg-random-sd15-v2.safetensors"

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                 use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, adm_in_channels=None,
                 use_temporal_attention=False, use_temporal_resblock=False, disable_self_attentions=None)
SD_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                       "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                       "attn_resolutions": [], "dropout": 0.0}}


def checkpoint_path() -> Path:
    home = Path(os.environ.get("ATTNSEG_HOME", Path.home() / ".cache" / "attnseg"))
    return home / "models" / "checkpoints" / NAME


def build(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import init_weights  # also puts ComfyUI on the path

    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy import sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.supported_models_base import ClipTarget

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.unet_config = dict(SD15_UNET)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(), "cpu")
    clip = comfy.sd.CLIP(target=ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel))
    init_weights(clip.cond_stage_model, seed=1)
    autoencoder = AutoencoderKL(**SD_VAE)
    init_weights(autoencoder, seed=2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    comfy.sd.save_checkpoint(str(partial), patcher, clip, vae, metadata={"attnseg": "random weights, for tests"})
    partial.rename(path)
    return path


def ensure() -> Path:
    path = checkpoint_path()
    return path if path.exists() else build(path)


if __name__ == "__main__":
    print(ensure())
