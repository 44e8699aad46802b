"""The embedded demo model: a tiny SD1-layout latent diffusion model (ComfyUI's
UNet, SD1 CLIP text model with the real tokenizer, AutoencoderKL) trained on
procedural shape scenes by demo/train.py. Its checkpoint is one safetensors
file whose metadata holds the configs, so this module can rebuild it.

:func:`load` goes through the functions ComfyUI's Load Checkpoint runs
(``comfy.sd.load_state_dict_guess_config``), with explicit configs where that
loader detects them, so the model is placed, cast, loaded, partially
loaded (low VRAM) and offloaded by ComfyUI's model management like any
checkpoint, in every memory mode:

- the UNet's weight dtype and compute (manual cast) dtype come from
  ``model_management.unet_dtype`` / ``unet_manual_cast`` for the load device and
  are set on the model config before the model is built, on
  ``unet_inital_load_device``; ``BaseModel.load_model_weights`` loads the
  weights, and the ``ModelPatcher`` gets model management's load and offload
  devices (loaded to the GPU at once when it was built there, as that loader does);
- the text encoder is ``comfy.sd.CLIP`` given its parameter count (which picks its
  initial device), tokenizer data and options, its weights by ``CLIP.load_sd``;
- the autoencoder is ``comfy.sd.VAE`` given the state dict and its config.

Detection cannot stand in for the configs, whatever the checkpoint's keys: no
supported model matches this UNet (``model_detection.model_config_from_unet``
logs "no match" for context_dim 64, model_channels 64), ``comfy.sd.VAE`` without
a config builds SD's full-size autoencoder (ch 128) and SD1.5's text encoder
config is 768 wide. So the checkpoint keeps its own layout (unet., clip.,
vae. prefixes and the configs in its metadata). The steps are ComfyUI 0.3.75's:
a ComfyUI whose loader orders them otherwise (with dynamic VRAM its patcher comes
before the weights, which it assigns) needs the same order here.

The ``build_*`` functions make fresh, untrained parts for demo/train.py."""

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
UNET, CLIP, VAE = "unet.", "clip.", "vae."

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


class DemoModelConfig(comfy.supported_models.SD15):
    """SD1.5's model config (latent format, eps prediction and its noise schedule,
    SD1 text encoder target) for the demo UNet's shape, taken whole from the
    stored config: SD15 would replace its heads with SD1.5's eight."""

    unet_extra_config = {}


def _clip_target() -> ClipTarget:
    """SD1.5's text encoder target (what SD15.clip_target gives Load Checkpoint)."""
    return ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel)


def _text_encoder_options(config: dict, dtype: torch.dtype | None) -> dict:
    """The text encoder's model_options: its width and depth (SD1 CLIP reads them
    from clip_l_model_config), and ``dtype`` when given (None: ComfyUI chooses)."""
    options = {"clip_l_model_config": dict(config)}
    if dtype is not None:
        options["dtype"] = dtype
    return options


def _vae_params(config: dict) -> dict:
    return {"embed_dim": config["embed_dim"], "ddconfig": dict(config["ddconfig"])}


def build_unet(config: dict):
    model = DemoModelConfig(config).get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_clip(config: dict, dtype: torch.dtype | None = None):
    """``dtype`` None lets ComfyUI choose (fp16 on some devices); training passes fp32."""
    return comfy.sd.CLIP(target=_clip_target(), model_options=_text_encoder_options(config, dtype))


def build_vae(config: dict):
    params = _vae_params(config)
    return comfy.sd.VAE(sd=AutoencoderKL(**params).state_dict(), config={"params": params})


def _check_keys(path: Path, part: str, missing, unexpected) -> None:
    """A checkpoint in models/attnseg/ whose weights do not fit its own configs is
    refused (ComfyUI's loader would only log it and run on uninitialised weights)."""
    if missing or unexpected:
        raise AttnSegError(f"checkpoint: the {part} weights of {Path(path).name} do not fit its config "
                           f"({len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(unexpected)} unexpected, "
                           f"e.g. {sorted(unexpected)[:2]}). Rewrite it with demo/train.py.")


def load_diffusion_model(path: Path, sd: dict, model_config, dtype: torch.dtype | None, prefix: str = UNET,
                         part: str = "UNet"):
    """Load Checkpoint's diffusion-model steps (load_state_dict_guess_config), with our model
    config; the weights under ``prefix``. Shared by the UNet and the DiT demo models."""
    mm = comfy.model_management
    parameters = comfy.utils.calculate_parameters(sd, prefix)
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(sd, prefix))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                  model_config.supported_inference_dtypes))
    initial_device = mm.unet_inital_load_device(parameters, dtype)
    model = model_config.get_model(sd, prefix, device=initial_device)
    expected = set(model.diffusion_model.state_dict())
    given = {k[len(prefix):] for k in sd if k.startswith(prefix)}
    _check_keys(path, part, expected - given, given - expected)
    model.load_model_weights(sd, prefix)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    if initial_device != torch.device("cpu"):
        mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load(path: Path = CHECKPOINT, dtype: torch.dtype | None = None, embedding_directory=None):
    """(MODEL, CLIP, VAE) from a checkpoint written by :func:`save`, loaded as Load
    Checkpoint loads a checkpoint (see the module docstring). ``dtype`` None: the
    UNet, text encoder and autoencoder dtypes ComfyUI chooses for the devices;
    training resumes with torch.float32 for all three."""
    state, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not metadata or "attnseg_config" not in metadata:
        raise AttnSegError(f"checkpoint: {Path(path).name} was not written by demo/train.py (it has no AttnSeg "
                           f"config). Load other checkpoints with ComfyUI's Load Checkpoint.")
    config = json.loads(metadata["attnseg_config"])
    model_config = DemoModelConfig(config["unet"])
    model = load_diffusion_model(path, state, model_config, dtype)
    vae_sd = _part(state, VAE)
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": _vae_params(config["vae"])}, dtype=dtype)
    expected = set(vae.first_stage_model.state_dict())
    _check_keys(path, "autoencoder", expected - set(vae_sd), set(vae_sd) - expected)
    clip_sd = _part(state, CLIP)
    clip = comfy.sd.CLIP(_clip_target(), embedding_directory=embedding_directory, tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd),
                         model_options=_text_encoder_options(config["clip"], dtype))
    _check_keys(path, "text encoder", *clip.load_sd(clip_sd, full_model=True))
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
    for prefix, module in ((UNET, diffusion_model), (CLIP, text_model), (VAE, autoencoder)):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    metadata = {"attnseg_config": json.dumps(config), **{k: json.dumps(v) for k, v in info.items()}}
    comfy.utils.save_torch_file(state, str(path), metadata=metadata)
