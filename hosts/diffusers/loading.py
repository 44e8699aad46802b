"""Load a diffusers pipeline from a local folder or a single-file checkpoint, with
no hub access unless the caller allows it."""

from __future__ import annotations

from pathlib import Path

import torch

from ...attnseg import AttnSegError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
# A key only SDXL's single-file checkpoints have (its second text encoder).
SDXL_KEY = "conditioner.embedders.1"
DENOISERS = ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise AttnSegError(f"device: '{device}' is not a torch device; give e.g. 'cpu', 'cuda' or 'cuda:1'.")


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AttnSegError(f"dtype: {dtype} is not one of torch.float32, torch.float16, torch.bfloat16.")
    return dtype


def _single_file_class(path: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as handle:
            if any(key.startswith(SDXL_KEY) for key in handle.keys()):
                return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_pipeline(path_or_file, device=None, dtype=None, allow_hub: bool = False, config=None):
    """A diffusers pipeline from ``path_or_file``: a local pipeline folder (with
    model_index.json), or a single-file SD1.x/2.x/SDXL checkpoint (loaded by diffusers'
    ``from_single_file``; offline it needs the pipeline's configs, from ``config`` (a
    local diffusers folder of the same model) or the local Hugging Face cache). A hub
    id ("org/name") is only tried with ``allow_hub``. ``device``: None for CUDA when
    available, else the CPU; ``dtype``: None for fp16 on CUDA, fp32 elsewhere. The
    pipeline must have a UNet2DConditionModel (SD1.x/2.x/SDXL), or a FluxTransformer2DModel
    or SD3Transformer2DModel (Flux, SD3/SD3.5: from a pipeline folder; single files here
    are SD checkpoints); anything else is a one-line AttnSegError."""
    from diffusers import DiffusionPipeline

    target = _device(device)
    torch_dtype = _dtype(dtype, target)
    path = Path(str(path_or_file)).expanduser()
    offline = not allow_hub
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise AttnSegError(f"path_or_file: '{path}' is not a diffusers pipeline folder (it has no "
                                   f"model_index.json); give a folder saved with pipe.save_pretrained() or a "
                                   f"single-file .safetensors / .ckpt checkpoint.")
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, local_files_only=offline)
        elif path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise AttnSegError(f"path_or_file: '{path.name}' is neither a pipeline folder nor a checkpoint "
                                   f"({', '.join(SINGLE_FILE_SUFFIXES)}).")
            extra = {"config": str(config)} if config is not None else {}
            pipe = _single_file_class(path).from_single_file(str(path), torch_dtype=torch_dtype,
                                                             local_files_only=offline, **extra)
        elif allow_hub and str(path_or_file).count("/") == 1:
            pipe = DiffusionPipeline.from_pretrained(str(path_or_file), torch_dtype=torch_dtype)
        else:
            raise AttnSegError(f"path_or_file: '{path_or_file}' does not exist" + (
                "." if allow_hub else " (hub ids are only looked up with allow_hub=True)."))
    except AttnSegError:
        raise
    except Exception as error:  # diffusers' own errors: missing configs, an unrecognised checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if allow_hub or config is not None else (
            " Offline, a single file needs config=<a local diffusers folder of that model>, or allow_hub=True.")
        raise AttnSegError(f"path_or_file: '{path_or_file}' did not load as a diffusers pipeline ({reason[:200]})."
                           + (hint if path.is_file() else ""))
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if type(denoiser).__name__ not in DENOISERS:
        raise AttnSegError(f"path_or_file: '{path_or_file}' is a {type(pipe).__name__} whose denoiser is a "
                           f"{type(denoiser).__name__}; the diffusers host segments with SD1.x, SD2.x, SDXL, Flux "
                           f"and SD3/SD3.5 pipelines ({', '.join(DENOISERS)}).")
    return pipe.to(target)
