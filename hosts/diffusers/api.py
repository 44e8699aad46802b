"""The diffusers host's Python API: images + classes -> masks with a preset, and
generate + segment in one pipeline call.

    from attnseg.hosts.diffusers import load_pipeline, segment   # package path of this folder
    pipe = load_pipeline("models/my-sd15-pipeline")               # a local folder, no hub access
    [result] = segment(pipe, Image.open("cat.png"), ["cat", "sofa"], preset="iSeg VOC (released code)")
    result.labels      # (H, W) int64: 0 background, k = result.class_names[k - 1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ...attnseg import AttentionStore, AttnSegError
from ...attnseg.layers import resolve
from ...attnseg.masks import make_masks
from ...attnseg.methods import run_method
from ...attnseg.plan import CapturePlan, StepRange
from ...attnseg.presets import SEGMENTERS, Preset, find_preset
from ...attnseg.scores import ScoreMaps
from ...attnseg.tokens import parse_class_list
from .loading import load_pipeline
from .capture import head_counter
from .dit import DiffusersDiTInfo, dit_head_counter
from .passes import capture_pass, capture_sample, describe_model, encode_image
from .text import encode_for_preset, locate_pipeline_words

__all__ = ["Segmentation", "segment", "generate_and_segment", "load_pipeline", "DEFAULT_PRESET"]

DEFAULT_PRESET = "DiffSegmenter (released code)"


@dataclass
class Segmentation:
    """One image's result, every tensor on the CPU at the input image's size (H, W).

    ``labels`` (H, W) int64: 0 is background, k in 1..C is ``class_names[k - 1]``.
    ``masks`` (C, H, W) bool: ``masks[i] == (labels == i + 1)``.
    ``scores`` (C, H, W) float32 in [0, 1]: the method's score map of each class (the
    labels are their argmax against the preset's background rule)."""

    class_names: list[str]
    labels: torch.Tensor
    masks: torch.Tensor
    scores: torch.Tensor
    image_size: tuple[int, int]
    preset: str


def _pixels(image, index: int) -> torch.Tensor:
    """One image as (1, 3, H, W) float32 in [0, 1] on the CPU."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != 3 or tensor.shape[0] != 1:
            raise AttnSegError(f"images: image {index} has shape {tuple(image.shape)}; give (3, H, W) or a batch "
                               f"(B, 3, H, W) of RGB pixels.")
        if tensor.dtype == torch.uint8:
            return tensor.float().cpu() / 255.0
        if not tensor.is_floating_point():
            raise AttnSegError(f"images: image {index} is {tensor.dtype}; give float pixels in [0, 1] or uint8.")
        tensor = tensor.float().cpu()
        if not bool(torch.isfinite(tensor).all()) or tensor.min() < 0 or tensor.max() > 1:
            raise AttnSegError(f"images: image {index} has pixels outside [0, 1] (or NaN); float images must be "
                               f"scaled to [0, 1] (uint8 images may be given as they are).")
        return tensor
    raise AttnSegError(f"images: image {index} is a {type(image).__name__}; give PIL images or torch tensors.")


def _images(images) -> list[torch.Tensor]:
    """Every image as (1, 3, H, W); a (B, 3, H, W) tensor is B images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise AttnSegError("images: no image given.")
    return [_pixels(image, i) for i, image in enumerate(images)]


def _class_lists(classes, count: int) -> list[list[str]]:
    """One class list per image from "a, b", ["a", "b"] (every image) or one entry per image."""
    if isinstance(classes, str):
        return [parse_class_list(classes)] * count
    if not isinstance(classes, (list, tuple)) or not classes:
        raise AttnSegError("classes: give 'cat, dog', ['cat', 'dog'], or one class list per image.")
    if all(isinstance(c, str) for c in classes):
        return [parse_class_list(", ".join(classes))] * count
    if len(classes) != count:
        raise AttnSegError(f"classes: {len(classes)} class lists for {count} images; give one per image, or one "
                           f"list for all.")
    return [parse_class_list(c if isinstance(c, str) else ", ".join(c), f"classes[{i}]")
            for i, c in enumerate(classes)]


def _preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):  # a researcher's own settings (e.g. dataclasses.replace of a preset)
        if name.method not in SEGMENTERS:
            raise AttnSegError(f"preset: '{name.name}' is a {name.method} preset; segment() runs "
                               f"{', '.join(SEGMENTERS)} presets.")
        return name
    chosen = find_preset(name, SEGMENTERS)
    if chosen is None:
        raise AttnSegError(f"preset: 'custom' has no settings of its own here; choose one of the presets (e.g. "
                           f"'{DEFAULT_PRESET}'), or build a CapturePlan and call the core methods.")
    return chosen


def heads_of(info):
    return dit_head_counter(info) if isinstance(info, DiffusersDiTInfo) else head_counter(info)


def _result(scores: ScoreMaps, chosen: Preset, threshold: float) -> Segmentation:
    labels, masks, maps = make_masks(scores, threshold, chosen.background)
    count = maps.shape[1]
    return Segmentation(list(scores.class_names), labels[0].cpu(), masks.view(-1, count, *labels.shape[-2:])[0].bool()
                        .cpu(), maps[0].float().cpu(), tuple(scores.image_size), chosen.name)


def segment_scores(pipe, pixels: torch.Tensor, names: list[str], chosen: Preset, prompt: str = "",
                   resolution: int | None = None, seed: int | None = None, info=None) -> ScoreMaps:
    """One image (1, 3, H, W) -> the preset method's score maps (before labelling)."""
    info = info or describe_model(pipe)
    setup = chosen.capture
    plan = CapturePlan.from_setup(setup, chosen.name)
    plan.check(info, heads_of(info))
    propagation = getattr(chosen.settings, "propagation_layers", None)
    if propagation:
        resolve(info.layers, propagation, chosen.name)
    conditionings = encode_for_preset(pipe, chosen.text, prompt, names)
    latent = encode_image(pipe, pixels, resolution or setup.resolution)
    parts = []
    for conditioning in conditionings:
        store = capture_pass(pipe, latent, conditioning, list(setup.timesteps), setup.seed if seed is None else seed,
                             tuple(pixels.shape[-2:]), plan, info, keep_timesteps=setup.keep_timesteps)
        store.check_finite("pipe")
        parts.append(run_method(store, chosen))
    if len(parts) == 1:
        return parts[0]
    # One pass per class: each pass's map is its class's.
    return dataclasses.replace(parts[0], maps=torch.cat([p.maps for p in parts], dim=1), class_names=list(names))


def segment(pipe, images, classes, preset: str = DEFAULT_PRESET, prompt: str = "", resolution: int | None = None,
            threshold: float | None = None, seed: int | None = None) -> list[Segmentation]:
    """Segment ``images`` into ``classes`` the way ``preset`` does; one :class:`Segmentation` per image.

    ``pipe``: a diffusers pipeline with a UNet2DConditionModel (SD1.x, SD2.x, SDXL), a
    FluxTransformer2DModel (Flux) or an SD3Transformer2DModel (SD3/SD3.5), its VAE,
    tokenizers, text encoders and scheduler (e.g. from :func:`load_pipeline`).
    ``images``: a PIL image, a (3, H, W) or (B, 3, H, W) tensor (float in [0, 1] or
    uint8), or a list of those; any size (resized to the preset's working resolution
    as the ComfyUI host does, results at each image's own size). ``classes``: "cat, dog"
    or ["cat", "dog"] for every image, or one list (or string) per image. ``preset``: a
    DiffSegmenter, iSeg or GoCA preset of ``attnseg.presets.PRESETS`` made for the
    pipeline's model family, or a Preset object. ``prompt``: ""
    for the preset's template, else a prompt naming every class. ``resolution``,
    ``threshold``, ``seed``: None for the preset's. Raises AttnSegError on bad input."""
    chosen = _preset(preset)
    pictures = _images(images)
    class_lists = _class_lists(classes, len(pictures))
    info = describe_model(pipe)
    cut = chosen.threshold if threshold is None else threshold
    results = []
    for pixels, names in zip(pictures, class_lists):
        scores = segment_scores(pipe, pixels, names, chosen, prompt, resolution, seed, info)
        results.append(_result(scores, chosen, cut))
    return results


def generate_and_segment(pipe, prompt: str, classes, preset: str = DEFAULT_PRESET, steps: StepRange = StepRange(),
                         threshold: float | None = None, **pipeline_kwargs):
    """Generate with ``pipe(prompt=prompt, **pipeline_kwargs)`` and segment the generated
    images from the attention of their own denoising (the cond branch over ``steps`` of
    the call, the preset's layers, heads and method). ``classes`` must be words of
    ``prompt``. Returns (the pipeline's output, one :class:`Segmentation` per image at
    the generated size). On Flux pipelines the branch of each transformer call follows
    FluxPipeline's true CFG (the prompt's call, then the negative prompt's)."""
    chosen = _preset(preset)
    names = _class_lists(classes, 1)[0]
    info = describe_model(pipe)
    plan = dataclasses.replace(CapturePlan.from_setup(chosen.capture, chosen.name), cross_steps=steps,
                               self_steps=steps)
    plan.check(info, heads_of(info))
    for other in ("prompt_2", "prompt_3"):
        if pipeline_kwargs.get(other) is not None:
            raise AttnSegError(f"{other}: the classes are found in `prompt`, which every text encoder then reads; "
                               f"leave {other} unset.")
    # refuses classes not in the prompt; T5's length as the call pads it
    meta = locate_pipeline_words(pipe, prompt, names, t5_tokens=pipeline_kwargs.get("max_sequence_length"))
    per_prompt = pipeline_kwargs.get("num_images_per_prompt", 1)
    # the pipelines' own default size: the UNet's sample size, a DiT pipeline's default_sample_size
    default = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    height = pipeline_kwargs.get("height") or default * pipe.vae_scale_factor
    width = pipeline_kwargs.get("width") or default * pipe.vae_scale_factor
    factor = pipe.vae_scale_factor
    store = AttentionStore(info.model_id, per_prompt, (height // factor, width // factor), (height, width), meta)
    output = capture_sample(pipe, store, plan, per_prompt, info, prompt=prompt, **pipeline_kwargs)
    store.check_finite("pipe")
    scores = run_method(store, chosen)
    cut = chosen.threshold if threshold is None else threshold
    results = []
    for index in range(per_prompt):
        one = dataclasses.replace(scores, maps=scores.maps[index:index + 1],
                                  background=None if scores.background is None else scores.background[index:index + 1])
        results.append(_result(one, chosen, cut))
    return output, results
