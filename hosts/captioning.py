"""Prompt helpers through transformers: BLIP captions and CLIP image-text
scores, from model folders the user placed locally. Nothing is downloaded:
every load is ``local_files_only``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ..attnseg import AttnSegError
from ..attnseg.progress import tick

PROGRESS_STAGE = "captions"

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


class RunProgress:
    """Progress over a node's planned model runs, in steps: a caption counts its
    generated tokens (at most ``max_new_tokens``), a CLIP scoring counts one. Each
    step is a core :func:`~attnseg.progress.tick`, so the host's reporter advances
    its bar and checks its interrupt there; the values rise and end at the total."""

    def __init__(self, run_sizes: list[int]):
        self.total = max(1, sum(run_sizes))
        self.done = self.end = 0

    @contextlib.contextmanager
    def run(self, size: int) -> Iterator[Callable[[], None]]:
        """One run of ``size`` steps; yields the per-step callback. A run that takes
        fewer steps (a caption that ends early) jumps to its end when it returns."""
        self.end = min(self.total, self.done + size)
        yield self.step
        if self.done < self.end:
            self.done = self.end
            tick(PROGRESS_STAGE, self.done, self.total)

    def step(self) -> None:
        if self.done < self.end:
            self.done += 1
            tick(PROGRESS_STAGE, self.done, self.total)


def _every_token(on_token: Callable[[], None]):
    """A stopping criterion that never stops: it calls ``on_token`` once per generated
    token (greedy, sampling and beam search alike)."""
    import transformers

    class EveryToken(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            on_token()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return transformers.StoppingCriteriaList([EveryToken()])


@torch.no_grad()
def caption(folder: Path, image: torch.Tensor, prefix: str, device: torch.device, max_new_tokens: int = 30,
            input_name: str = "captioner", on_token: Callable[[], None] | None = None) -> str:
    """``prefix`` continued by a BLIP caption of the image (unconditional when
    ``prefix`` is empty). The prefix is kept exactly as given; only the
    generated words are decoded. ``on_token`` is called after each generated token."""
    model, processor = _load("caption", folder, device, input_name)
    inputs = processor(images=to_pil(image), text=prefix or None, return_tensors="pt").to(device)
    extra = {"stopping_criteria": _every_token(on_token)} if on_token is not None else {}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra)
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
