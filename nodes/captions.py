"""DiffSegmenter's prompt design for open vocabularies: a BLIP caption that
continues 'a photograph of {classes}', and the candidate classes filtered by
the caption's nouns and CLIP's image-text scores. Optional: it needs
transformers and model folders the user places in models/."""

import os
from pathlib import Path

import comfy.model_management
import folder_paths

from ..attnseg import AttnSegError
from ..attnseg.tokens import parse_class_list, template_prompt
from ..attnseg.vocabulary import classes_in_caption, confident_classes, union_in_order
from ..hosts.captioning import caption, clip_probabilities
from .types import CATEGORY

CAPTIONERS = "attnseg_captioners"  # models/attnseg_captioners/<folder>: a BLIP captioning model
CLIP_MODELS = "attnseg_clip"  # models/attnseg_clip/<folder>: a CLIP model
NONE = "none"
for _name in (CAPTIONERS, CLIP_MODELS):
    if _name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[_name] = ([os.path.join(folder_paths.models_dir, _name)], set())


def model_folders(kind: str) -> list[str]:
    """Sub-folders holding a transformers model (a config.json)."""
    found = set()
    for root in folder_paths.get_folder_paths(kind):
        if os.path.isdir(root):
            found |= {entry for entry in os.listdir(root) if os.path.isfile(os.path.join(root, entry, "config.json"))}
    return sorted(found)


def model_folder(kind: str, name: str, input_name: str) -> Path:
    for root in folder_paths.get_folder_paths(kind):
        if os.path.isfile(os.path.join(root, name, "config.json")):
            return Path(root) / name
    raise AttnSegError(f"{input_name}: no model folder '{name}' in models/{kind}/. Place a transformers model "
                       f"folder there (config.json, weights, processor files) and refresh, or choose '{NONE}'.")


class AttnSegCaptionPrompt:
    """DiffSegmenter's caption-completed prompt and class filtering."""

    DESCRIPTION = ("Builds a segmentation prompt for the first image: 'a photograph of {c1} and {c2}' continued by "
                   "a BLIP caption. With a filter, only the candidate classes the image shows are kept: those the "
                   "image's own caption names (plurals match) and those whose CLIP probability among the candidates "
                   "exceeds clip_threshold (DiffSegmenter: 0.97). Feed prompt and classes to AttnSeg Text Encode. "
                   "Models are read from models/attnseg_captioners/ and models/attnseg_clip/; nothing is "
                   "downloaded.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to segment (the first of a batch is captioned)."}),
            "classes": ("STRING", {"default": "", "multiline": True,
                                   "tooltip": "Comma-separated candidate classes (a whole vocabulary is fine "
                                              "when a filter is on)."}),
            "captioner": ([NONE] + model_folders(CAPTIONERS), {"tooltip": "A BLIP captioning model folder, e.g. "
                          "Salesforce/blip-image-captioning-large's files, in models/attnseg_captioners/."}),
            "clip_filter": ([NONE] + model_folders(CLIP_MODELS), {"tooltip": "A CLIP model folder (e.g. "
                            "openai/clip-vit-large-patch14's files) in models/attnseg_clip/; none: no CLIP filter."}),
            "filter_by_caption": ("BOOLEAN", {"default": False, "tooltip": "Keep the candidates the image's "
                                  "unconditional caption names (needs a captioner)."}),
            "clip_threshold": ("FLOAT", {"default": 0.97, "min": 0.0, "max": 1.0, "step": 0.01}),
            "max_new_tokens": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Caption length cap."}),
        }}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "classes")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, image, classes, captioner, clip_filter, filter_by_caption, clip_threshold, max_new_tokens):
        candidates = parse_class_list(classes)
        device = comfy.model_management.get_torch_device()
        captioner_folder = model_folder(CAPTIONERS, captioner, "captioner") if captioner != NONE else None
        if filter_by_caption and captioner_folder is None:
            raise AttnSegError("filter_by_caption: needs a captioner; choose one or turn the caption filter off.")
        found = []
        if filter_by_caption:
            found.append(classes_in_caption(caption(captioner_folder, image, "", device, max_new_tokens), candidates))
        if clip_filter != NONE:
            probabilities = clip_probabilities(model_folder(CLIP_MODELS, clip_filter, "clip_filter"), image,
                                               candidates, device)
            found.append(confident_classes(probabilities, candidates, clip_threshold))
        chosen = union_in_order(candidates, *found) if found else candidates
        if not chosen:
            raise AttnSegError(f"clip_threshold: none of the {len(candidates)} candidate classes was found in the "
                               f"image (caption filter {'on' if filter_by_caption else 'off'}, CLIP probability > "
                               f"{clip_threshold}). Lower clip_threshold or check the class names.")
        prefix = template_prompt(chosen)
        prompt = caption(captioner_folder, image, prefix, device, max_new_tokens) if captioner_folder else prefix
        return (prompt, ", ".join(chosen))


NODE_CLASS_MAPPINGS = {"AttnSegCaptionPrompt": AttnSegCaptionPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegCaptionPrompt": "AttnSeg Caption Prompt (DiffSegmenter)"}
