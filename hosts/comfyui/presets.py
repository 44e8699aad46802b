"""A preset run end to end on ComfyUI objects: text encoding, the capture pass
and the method, as the one-node segmenter runs them."""

from __future__ import annotations

import dataclasses

import comfy.model_management
import torch

from ...attnseg.layers import resolve
from ...attnseg.methods import run_method
from ...attnseg.presets import ONE_PASS_METHODS, Preset, TextSetup, check_family, preset_prompts
from ...attnseg.scores import ScoreMaps
from ...attnseg.tokens import parse_class_list, template_prompt
from .capture import CapturePlan, head_counter
from .concept import segment_concepts
from .models import checked_model, describe_model
from .passes import capture_pass, check_memory, encode_image
from .text import encode_cat_cross, encode_segmentation_prompt


def encode(clip, text: TextSetup, prompt: str, classes: list[str]) -> list:
    """The preset's conditionings for ``classes`` (see ``preset_prompts``)."""
    conditionings = []
    for kind, words, names in preset_prompts(text, prompt, classes):
        if kind == "cat_cross":
            conditioning, _ = encode_cat_cross(clip, words, ", ".join(names), text.cat_cross_gamma,
                                               text.cat_cross_mode, ", ".join(text.background_words))
        else:
            conditioning, _ = encode_segmentation_prompt(clip, words, ", ".join(names), text.class_weight,
                                                         text.fuse_ing)
        conditionings.append(conditioning)
    return conditionings


def segment_with_preset(model, clip, vae, image: torch.Tensor, classes: str, chosen: Preset, prompt: str = "",
                        resolution: int | None = None) -> ScoreMaps:
    """Segment ``image`` into ``classes`` the way ``chosen`` does; ``resolution``
    overrides the preset's (None: the preset's)."""
    names = parse_class_list(classes)
    setup = chosen.capture
    if chosen.method == "concept":
        return concept_with_preset(model, clip, vae, image, classes, chosen, prompt, resolution)
    plan = CapturePlan.from_setup(setup, chosen.name)
    prompts = encode(clip, chosen.text, prompt, names)
    info = checked_model(model, prompts[0], "clip")
    plan.check(info, head_counter(info, model))  # a preset's layers and heads are refused before any work is spent
    propagation = getattr(chosen.settings, "propagation_layers", None)
    if propagation:
        resolve(info.layers, propagation, chosen.name)
    check_memory(model, image, resolution or setup.resolution)
    latent = encode_image(vae, image, resolution or setup.resolution)
    parts = []
    for conditioning in prompts:
        comfy.model_management.throw_exception_if_processing_interrupted()
        store = capture_pass(model, latent, conditioning, list(setup.timesteps), setup.seed, tuple(image.shape[1:3]),
                             plan, info, keep_timesteps=setup.keep_timesteps)
        store.check_finite("model")
        parts.append(run_method(store, chosen))
    if len(parts) == 1:
        return parts[0]
    # One pass per class: each pass's map is its class's.
    return dataclasses.replace(parts[0], maps=torch.cat([p.maps for p in parts], dim=1), class_names=names)


def concept_with_preset(model, clip, vae, image: torch.Tensor, classes: str, chosen: Preset, prompt: str = "",
                        resolution: int | None = None) -> ScoreMaps:
    """ConceptAttention as its preset runs it: the image's prompt (the template when
    empty) as the conditioning, the class words as concepts."""
    info = describe_model(model)
    check_family(chosen.name, getattr(info, "family", "unet"), info.model_id, ONE_PASS_METHODS)
    text = prompt.strip() or template_prompt(parse_class_list(classes))
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    settings = chosen.settings
    return segment_concepts(model, clip, vae, image, positive, classes, settings.blocks, settings.timestep,
                            chosen.capture.seed, resolution or chosen.capture.resolution)
