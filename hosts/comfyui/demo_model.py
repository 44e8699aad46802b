"""The embedded demo model: a tiny SD1-layout latent diffusion model (ComfyUI's
UNet, SD1 CLIP text model with the real tokenizer, AutoencoderKL) trained on
procedural shape scenes by demo/train.py. Its checkpoint is one safetensors
file whose metadata holds the configs, so this module can rebuild it."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch
from comfy import sd1_clip
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.supported_models_base import ClipTarget

from ...attnseg import AttnSegError

CHECKPOINT = Path(__file__).resolve().parents[2] / "demo" / "attnseg-shapes.safetensors"

CONFIG = {
    "unet": dict(image_size=16, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1, 1],
                 channel_mult=[1, 1, 1], transformer_depth=[1, 1, 0], transformer_depth_middle=-1,
                 transformer_depth_output=[1, 1, 1, 1, 0, 0], num_head_channels=32, context_dim=64,
                 use_spatial_transformer=True, legacy=False, use_linear_in_transformer=True, adm_in_channels=None,
                 use_temporal_attention=False, use_temporal_resblock=False, disable_self_attentions=None),
    "clip": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
             "projection_dim": 64},
    "vae": {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}},
}


def build_unet(config: dict):
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.unet_config = dict(config)  # SD15 would otherwise fill in SD1.5's full-size defaults
    model = model_config.get_model({})
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def build_clip(config: dict, dtype: torch.dtype | None = None):
    """``dtype`` None lets ComfyUI choose (fp16 on some devices); training passes fp32."""
    options = {"clip_l_model_config": dict(config)}
    if dtype is not None:
        options["dtype"] = dtype
    return comfy.sd.CLIP(target=ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel), model_options=options)


def build_vae(config: dict, state_dict: dict | None = None):
    params = {"embed_dim": config["embed_dim"], "ddconfig": dict(config["ddconfig"])}
    if state_dict is None:
        state_dict = AutoencoderKL(**params).state_dict()
    return comfy.sd.VAE(sd=state_dict, config={"params": params})


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def load(path: Path = CHECKPOINT, clip_dtype: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) from a checkpoint written by :func:`save`; ``clip_dtype``
    as in :func:`build_clip` (training resumes in fp32)."""
    state, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not metadata or "attnseg_config" not in metadata:
        raise AttnSegError(f"checkpoint: {Path(path).name} was not written by demo/train.py (it has no AttnSeg "
                           f"config). Load other checkpoints with ComfyUI's Load Checkpoint.")
    config = json.loads(metadata["attnseg_config"])
    model = build_unet(config["unet"])
    model.model.diffusion_model.load_state_dict(_part(state, "unet."), strict=True)
    clip = build_clip(config["clip"], dtype=clip_dtype)
    clip.cond_stage_model.load_state_dict(_part(state, "clip."), strict=True)
    vae = build_vae(config["vae"], _part(state, "vae."))
    return model, clip, vae


def training_config(path: Path = CHECKPOINT) -> dict:
    """The configs :func:`save` stored (what :func:`load` rebuilds)."""
    _, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return json.loads(metadata["attnseg_config"])


def training_info(path: Path = CHECKPOINT) -> dict:
    """The ``info`` metadata :func:`save` stored (training log summary)."""
    _, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return {k: json.loads(v) for k, v in metadata.items() if k != "attnseg_config"}


def save(path: Path, diffusion_model: torch.nn.Module, text_model: torch.nn.Module, autoencoder: torch.nn.Module,
         config: dict, info: dict) -> None:
    """fp16 weights of the three parts, the configs and ``info`` as metadata."""
    state = {}
    for prefix, module in (("unet.", diffusion_model), ("clip.", text_model), ("vae.", autoencoder)):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    metadata = {"attnseg_config": json.dumps(config), **{k: json.dumps(v) for k, v in info.items()}}
    comfy.utils.save_torch_file(state, str(path), metadata=metadata)
