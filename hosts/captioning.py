"""Prompt helpers through transformers: BLIP captions and CLIP image-text
scores, from model folders the user placed locally. Nothing is downloaded:
every load is ``local_files_only``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..attnseg import AttnSegError

# (kind, folder, device) -> (model, processor); loading a captioner per run would dominate its cost.
_LOADED: dict[tuple[str, str, str], tuple] = {}


def _load(kind: str, folder: Path, device: torch.device, input_name: str):
    key = (kind, str(folder), str(device))
    if key not in _LOADED:
        if not (folder / "config.json").is_file():
            raise AttnSegError(f"{input_name}: {folder} has no config.json. Place a transformers model folder "
                               f"there (files from the model's Hugging Face page: config, weights, processor).")
        import transformers

        model_class, processor_class = {
            "caption": (transformers.BlipForConditionalGeneration, transformers.BlipProcessor),
            "clip": (transformers.CLIPModel, transformers.CLIPProcessor),
        }[kind]
        try:
            model = model_class.from_pretrained(folder, local_files_only=True).to(device).eval()
            processor = processor_class.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise AttnSegError(f"{input_name}: {folder.name} could not be loaded as a {model_class.__name__} "
                               f"with its processor ({error}).") from error
        _LOADED[key] = (model, processor)
    return _LOADED[key]


def to_pil(image: torch.Tensor) -> Image.Image:
    """The first image of an IMAGE batch (B, H, W, C in [0, 1])."""
    return Image.fromarray((image[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def caption(folder: Path, image: torch.Tensor, prefix: str, device: torch.device, max_new_tokens: int = 30,
            input_name: str = "captioner") -> str:
    """``prefix`` continued by a BLIP caption of the image (unconditional when
    ``prefix`` is empty). The prefix is kept exactly as given; only the
    generated words are decoded."""
    model, processor = _load("caption", folder, device, input_name)
    inputs = processor(images=to_pil(image), text=prefix or None, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    # BLIP's generate returns the prompt's tokens (without its [SEP]) before the new ones.
    given = inputs["input_ids"].shape[1] - 1 if prefix else 0
    continuation = processor.decode(out[0, given:], skip_special_tokens=True).strip()
    return f"{prefix} {continuation}".strip() if prefix else continuation


@torch.no_grad()
def clip_probabilities(folder: Path, image: torch.Tensor, names: list[str], device: torch.device,
                       input_name: str = "clip_filter") -> torch.Tensor:
    """Softmax over ``names`` of CLIP's image-text logits for 'a photo of a {name}'."""
    model, processor = _load("clip", folder, device, input_name)
    inputs = processor(text=[f"a photo of a {name}" for name in names], images=to_pil(image), return_tensors="pt",
                       padding=True).to(device)
    return model(**inputs).logits_per_image.softmax(-1)[0].float().cpu()
