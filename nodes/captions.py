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
from ..hosts.captioning import RunProgress, caption, clip_probabilities
from ..hosts.comfyui.progress import comfy_progress
from .types import TEXT

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
            "clip_threshold": ("FLOAT", {"default": 0.97, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "With a clip_filter: keep the candidates whose CLIP probability, a softmax over all candidates "
                "(0-1), exceeds this (DiffSegmenter: 0.97). Unused without a CLIP model.")}),
            "max_new_tokens": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": (
                "Caption length cap, in tokens the captioner generates after the prefix (about one word each).")}),
        }}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "classes")
    OUTPUT_TOOLTIPS = ("'a photograph of {c1} and {c2}' over the kept classes, continued by the caption (no "
                       "captioner: the template alone); for AttnSeg Text Encode's prompt.",
                       "The kept classes, comma-separated, in the candidates' order; for AttnSeg Text Encode's "
                       "classes.")
    FUNCTION = "build"
    CATEGORY = TEXT

    def build(self, image, classes, captioner, clip_filter, filter_by_caption, clip_threshold, max_new_tokens):
        candidates = parse_class_list(classes)
        device = comfy.model_management.get_torch_device()
        captioner_folder = model_folder(CAPTIONERS, captioner, "captioner") if captioner != NONE else None
        if filter_by_caption and captioner_folder is None:
            raise AttnSegError("filter_by_caption: needs a captioner; choose one or turn the caption filter off.")
        # The progress bar counts the planned model runs' steps: each caption's tokens, one for CLIP.
        progress = RunProgress([max_new_tokens] * filter_by_caption + [1] * (clip_filter != NONE)
                               + [max_new_tokens] * (captioner_folder is not None))

        def run(size: int, work):
            comfy.model_management.throw_exception_if_processing_interrupted()  # between model runs
            with progress.run(size) as step:
                return work(step)

        with comfy_progress():  # a tick per generated token also checks the interrupt
            found = []
            if filter_by_caption:
                plain = run(max_new_tokens, lambda step: caption(captioner_folder, image, "", device,
                                                                 max_new_tokens, on_token=step))
                found.append(classes_in_caption(plain, candidates))
            if clip_filter != NONE:
                folder = model_folder(CLIP_MODELS, clip_filter, "clip_filter")
                probabilities = run(1, lambda step: clip_probabilities(folder, image, candidates, device))
                found.append(confident_classes(probabilities, candidates, clip_threshold))
            chosen = union_in_order(candidates, *found) if found else candidates
            if not chosen:
                raise AttnSegError(f"clip_threshold: none of the {len(candidates)} candidate classes was found in "
                                   f"the image (caption filter {'on' if filter_by_caption else 'off'}, CLIP "
                                   f"probability > {clip_threshold}). Lower clip_threshold or check the class names.")
            prefix = template_prompt(chosen)
            prompt = prefix
            if captioner_folder is not None:
                prompt = run(max_new_tokens, lambda step: caption(captioner_folder, image, prefix, device,
                                                                  max_new_tokens, on_token=step))
        return (prompt, ", ".join(chosen))


NODE_CLASS_MAPPINGS = {"AttnSegCaptionPrompt": AttnSegCaptionPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegCaptionPrompt": "AttnSeg Caption Prompt (DiffSegmenter)"}
