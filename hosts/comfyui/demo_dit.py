"""The DiT demo model: a tiny Flux-layout latent flow-matching model trained on the
procedural shape scenes by demo/train_dit.py, beside the UNet demo (demo_model).

- The diffusion model is ComfyUI's own Flux (``supported_models.Flux`` ->
  ``model_base.Flux`` -> ``comfy.ldm.flux.model.Flux``): double- and single-stream
  blocks, RoPE over (index, row, column), modulation from the timestep and the
  pooled vector, patches of 2. Guidance embedding off (Flux-schnell's choice): the
  model is trained with caption dropout and guided with real CFG.
- The text encoder is ComfyUI's ``FluxClipModel`` (T5-XXL's classes, CLIP-L for the
  pooled vector) at a tiny width on the real T5 and CLIP tokenizers ComfyUI ships,
  frozen at its seeded initialisation. Its T5 tokenizer pads to 32 tokens where
  Flux's pads to 256 (ComfyUI's own ``t5xxl_min_length`` tokenizer option): the
  scenes' captions take under 20, and 256 would make every training step ~3x dearer.
- The autoencoder is the UNet demo's (4 latent channels, 8x smaller, scaled for
  SD1.5's latent factor), so the model config takes SD1.5's latent format: the stock
  Empty Latent Image, VAE Encode / Decode and KSampler handle it as they handle SD1.5.
  Sampling is Flux's: ``ModelType.FLUX`` -> ``ModelSamplingFlux`` (shift 1.15) with
  ``CONST`` (x_t = (1 - sigma) x_0 + sigma eps, the model predicts eps - x_0).

:func:`load` goes through Load Checkpoint's steps as demo_model.load does (model
management's dtype and device choices, ``BaseModel.load_model_weights``, a
``ModelPatcher`` with its load and offload devices; ``comfy.sd.CLIP`` and
``comfy.sd.VAE``), with the configs the checkpoint's metadata holds: stock detection
cannot read this layout (4 latent channels, 128 wide)."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch
from comfy.supported_models_base import ClipTarget
from comfy.text_encoders.flux import FluxClipModel, FluxTokenizer
from safetensors import safe_open

from ...attnseg import AttnSegError
from . import demo_model

CHECKPOINT = Path(__file__).resolve().parents[2] / "demo" / "attnseg-shapes-dit.safetensors"
DIT, TEXT, VAE = "dit.", "text.", "vae."
FORMAT = "attnseg-demo-dit"  # the metadata's attnseg_model: what tells this file from a UNet demo one

T5_MIN_LENGTH = 32  # Flux's tokenizer pads T5 to 256

CONFIG = {
    # Flux-dev's layout in miniature: heads of 64 (RoPE axes 8 + 28 + 28, Flux's 16 + 56 + 56
    # halved), single blocks twice the double ones as Flux's 38 and 19, mlp_ratio 4.
    "dit": dict(image_model="flux", in_channels=4, out_channels=4, vec_in_dim=32, context_in_dim=64,
                hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False),
    # FluxClipModel's two encoders on their JSON configs (real vocabularies), narrowed.
    "text": {"t5xxl_model_config": dict(d_model=64, d_kv=32, num_heads=2, d_ff=128, num_layers=2),
             "clip_l_model_config": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         num_hidden_layers=2, projection_dim=32)},
    "t5_min_length": T5_MIN_LENGTH,
    "vae": demo_model.CONFIG["vae"],
}


class DemoFluxConfig(comfy.supported_models.Flux):
    """Flux's model config (ModelType.FLUX: ModelSamplingFlux + CONST, Flux's text
    encoder target) with the demo autoencoder's latent (SD1.5's format: 4 channels,
    factor 0.18215) and the stored layout taken whole."""

    unet_config = {"image_model": "flux", "guidance_embed": False}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SD15
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, config: dict):
        super().__init__(dict(config))
        self.unet_config = dict(config)  # as detected from a file: our layout, not Flux's defaults


def _clip_target() -> ClipTarget:
    return ClipTarget(FluxTokenizer, FluxClipModel)


def _text_options(config: dict, dtype: torch.dtype | None) -> dict:
    options = {k: dict(v) for k, v in config["text"].items()}
    if dtype is not None:
        options["dtype"] = dtype
    return options


def _tokenizer_data(config: dict, state: dict | None = None) -> dict:
    return {**(state or {}), "t5xxl_min_length": config["t5_min_length"]}


def _patcher(model):
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_dit(config: dict):
    """A fresh (uninitialised: ComfyUI's ops skip init) Flux ModelPatcher of ``config["dit"]``."""
    return _patcher(DemoFluxConfig(config["dit"]).get_model({}))


def build_clip(config: dict, dtype: torch.dtype | None = None, embedding_directory=None, state: dict | None = None):
    """FluxClipModel (tiny T5 + CLIP-L) on the real tokenizers, T5 padded to ``t5_min_length``."""
    parameters = comfy.utils.calculate_parameters(state) if state else 0
    return comfy.sd.CLIP(_clip_target(), embedding_directory=embedding_directory,
                         tokenizer_data=_tokenizer_data(config, state), parameters=parameters,
                         model_options=_text_options(config, dtype))


def is_dit_checkpoint(path: Path) -> bool:
    """Whether ``path`` was written by :func:`save` (not by demo/train.py)."""
    try:
        with safe_open(str(path), "pt") as f:  # the header only, not the weights
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file: the UNet loader names what is wrong with it
        return False
    return metadata.get("attnseg_model") == json.dumps(FORMAT)


def load(path: Path = CHECKPOINT, dtype: torch.dtype | None = None, embedding_directory=None):
    """(MODEL, CLIP, VAE) from a checkpoint written by :func:`save`. ``dtype`` None: the
    dtypes ComfyUI chooses for the devices (training resumes with torch.float32)."""
    state, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    if not metadata or metadata.get("attnseg_model") != json.dumps(FORMAT):
        raise AttnSegError(f"checkpoint: {Path(path).name} was not written by demo/train_dit.py (it has no AttnSeg "
                           f"DiT config). AttnSeg Demo Model Loader tells the UNet demo's files from it by their "
                           f"metadata; load other checkpoints with ComfyUI's loaders.")
    config = json.loads(metadata["attnseg_config"])
    model = demo_model.load_diffusion_model(path, state, DemoFluxConfig(config["dit"]), dtype, DIT,
                                             "diffusion model")
    vae_sd = demo_model._part(state, VAE)
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": demo_model._vae_params(config["vae"])}, dtype=dtype)
    expected = set(vae.first_stage_model.state_dict())
    demo_model._check_keys(path, "autoencoder", expected - set(vae_sd), set(vae_sd) - expected)
    text_sd = demo_model._part(state, TEXT)
    clip = build_clip(config, dtype, embedding_directory, text_sd)
    demo_model._check_keys(path, "text encoder", *clip.load_sd(text_sd, full_model=True))
    return model, clip, vae


def training_config(path: Path = CHECKPOINT) -> dict:
    _, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return json.loads(metadata["attnseg_config"])


def training_info(path: Path = CHECKPOINT) -> dict:
    _, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return {k: json.loads(v) for k, v in metadata.items() if k not in ("attnseg_config", "attnseg_model")}


def save(path: Path, diffusion_model: torch.nn.Module, text_model: torch.nn.Module, autoencoder: torch.nn.Module,
         config: dict, info: dict) -> None:
    """fp16 weights of the three parts, the configs and ``info`` as metadata."""
    state = {}
    for prefix, module in ((DIT, diffusion_model), (TEXT, text_model), (VAE, autoencoder)):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    metadata = {"attnseg_model": json.dumps(FORMAT), "attnseg_config": json.dumps(config),
                **{k: json.dumps(v) for k, v in info.items()}}
    comfy.utils.save_torch_file(state, str(path), metadata=metadata)
