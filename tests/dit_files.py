"""Files for ComfyUI's stock loaders: a tiny Flux and a tiny SD3 for UNETLoader
(models/diffusion_models), a Flux/SD3 16-channel VAE for VAELoader (models/vae),
and the weights of tiny_dit's text encoders (models/text_encoders), which the
test-only node in tests/e2e_nodes rebuilds inside a server. Built once, cached
outside the repo; a file whose recorded recipe differs from the current one is
rebuilt.

    python tests/dit_files.py        # builds them, prints their paths
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from tiny_dit import FLUX_FILE_CONFIG, SD3_CONFIG, TEXT_ENCODER_OPTIONS, text_encoder, tiny_flux, tiny_sd3
from tiny_models import INIT_VERSION, init_weights

import comfy.sd  # (after tiny_dit, which puts ComfyUI on the path)
import comfy.utils

RECIPE_KEY = "attnseg_recipe"  # safetensors metadata: what the file was built from
WEIGHT_DTYPE = torch.bfloat16  # as Flux's own files; the loaders upcast to fp32 on CPU
# The VAE weights stock detection reads (see _vae_weights), by their shapes.
VAE_DETECTED_FROM = {"decoder.conv_in.weight": [512, 16, 3, 3], "decoder.up.3.upsample.conv.weight": [512, 512, 3, 3]}


def models_dir() -> Path:
    return Path(os.environ.get("ATTNSEG_HOME", Path.home() / ".cache" / "attnseg")) / "models"


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def saved_recipe(path: Path) -> dict:
    """What a file was built from, as recorded in it (e.g. the model config it was saved with)."""
    return json.loads(_metadata(path)[RECIPE_KEY])


def _ensure(subfolder: str, name: str, built: dict, state_dict) -> Path:
    """models_dir()/subfolder/name, (re)written from ``state_dict()`` unless it
    already records the recipe ``built``."""
    path = models_dir() / subfolder / name
    text = json.dumps(built, sort_keys=True)
    if path.exists() and _metadata(path).get(RECIPE_KEY) == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{name}.{os.getpid()}.partial")  # one per process: a server may build too
    tensors = {k: v.contiguous() for k, v in state_dict().items()}
    comfy.utils.save_torch_file(tensors, str(partial), metadata={RECIPE_KEY: text})
    os.replace(partial, path)
    return path


def _in_weight_dtype(module: torch.nn.Module) -> dict:
    return {k: v.to(WEIGHT_DTYPE) for k, v in module.state_dict().items()}


def flux_model_file(seed: int = 0) -> Path:
    """A diffusion-model file (bare Flux keys, as flux1-dev.safetensors) of tiny_dit.FLUX_FILE_CONFIG."""
    built = {"config": FLUX_FILE_CONFIG, "seed": seed, "init": INIT_VERSION, "dtype": str(WEIGHT_DTYPE)}
    return _ensure("diffusion_models", "attnseg-tiny-flux.safetensors", built,
                   lambda: _in_weight_dtype(tiny_flux(seed, FLUX_FILE_CONFIG).model.diffusion_model))


def sd3_model_file(seed: int = 0) -> Path:
    """A diffusion-model file (bare MMDiT keys) of tiny_dit.SD3_CONFIG."""
    built = {"config": SD3_CONFIG, "seed": seed, "init": INIT_VERSION, "dtype": str(WEIGHT_DTYPE)}
    return _ensure("diffusion_models", "attnseg-tiny-sd3.safetensors", built,
                   lambda: _in_weight_dtype(tiny_sd3(seed, SD3_CONFIG).model.diffusion_model))


def _vae_weights(seed: int) -> dict:
    # Stock detection (comfy.sd.VAE) reads two things: decoder.conv_in's input channels
    # and whether a 4th upsampler exists (without it, it builds the x4 upscaler's /4
    # VAE). 16 channels, the upsampler and no post_quant_conv make Flux's / SD3's
    # AutoencodingEngine at the one layout it builds (ch 128, ch_mult 1,2,4,4, 2 res
    # blocks: ~84M parameters). So ComfyUI builds it from those keys alone (and warns
    # of the keys they lack).
    vae = comfy.sd.VAE(sd={key: torch.zeros(shape) for key, shape in VAE_DETECTED_FROM.items()})
    init_weights(vae.first_stage_model, seed)
    return _in_weight_dtype(vae.first_stage_model)


def dit_vae_file(seed: int = 0) -> Path:
    """A VAE file (Flux's ae.safetensors keys) with random weights: full size, see _vae_weights."""
    built = {"detected_from": VAE_DETECTED_FROM, "seed": seed, "init": INIT_VERSION, "dtype": str(WEIGHT_DTYPE)}
    return _ensure("vae", "attnseg-random-dit-vae.safetensors", built, lambda: _vae_weights(seed))


def text_encoder_file(family: str, seed: int = 0) -> Path:
    """The weights of tiny_dit.text_encoder(family, seed) (cond_stage_model's state dict)."""
    built = {"family": family, "options": TEXT_ENCODER_OPTIONS, "seed": seed, "init": INIT_VERSION}
    return _ensure("text_encoders", f"attnseg-tiny-{family}-text-encoder.safetensors", built,
                   lambda: text_encoder(family, seed).cond_stage_model.state_dict())


def load_text_encoder(family: str, seed: int = 0):
    """tiny_dit.text_encoder(family, seed) rebuilt from its file (what the test node returns)."""
    clip = text_encoder(family, seed=None)
    clip.cond_stage_model.load_state_dict(comfy.utils.load_torch_file(str(text_encoder_file(family, seed))))
    return clip


def ensure_all() -> list[Path]:
    return [flux_model_file(), sd3_model_file(), dit_vae_file(), text_encoder_file("flux"), text_encoder_file("sd3")]


if __name__ == "__main__":
    for built_path in ensure_all():
        print(built_path)
