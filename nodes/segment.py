"""One node for the common case: image + classes -> masks, with a method's
published configuration."""

from ..attnseg.presets import ONE_PASS_METHODS, PRESETS, find_preset
from ..hosts.comfyui.presets import segment_with_preset
from ..hosts.comfyui.progress import comfy_progress
from .masks import mask_outputs
from .types import ATTNSEG_SCORES, SEGMENT

SEGMENT_PRESETS = [name for name, p in PRESETS.items() if p.method in ONE_PASS_METHODS]
DEFAULT = "DiffSegmenter (released code)"


class AttnSegSegment:
    """Segment an image into the named classes with one method preset."""

    DESCRIPTION = ("Image + classes -> masks, in one node: encodes the preset's prompt with the CLIP, runs one "
                   "denoising pass over the image (one per class where the preset prompts each class alone) "
                   "recording the attention the method needs, runs the method with the authors' settings and "
                   "labels the pixels with the preset's background rule. The granular nodes expose every knob.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x, SDXL; Flux, SD3/SD3.5 with a preset "
                                           "made for them) whose attention segments; "
                                           "patched on a clone, never modified."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder: encodes the preset's prompt."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE: encodes the image to a latent."}),
            "image": ("IMAGE", {"tooltip": "Any size and aspect ratio (kept); a batch is segmented image by image."}),
            "classes": ("STRING", {"default": "", "tooltip": "Comma-separated class words, e.g. 'cat, sofa'."}),
            "preset": (SEGMENT_PRESETS, {"default": DEFAULT, "tooltip": (
                "The method and its authors' configuration (prompt, layers, heads, timesteps, resolution, "
                "parameters, background rule); the README's preset table gives each one's source.")}),
        }, "optional": {
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "Empty: the preset's template ('a photograph of {c1} and {c2}' ...). A prompt of your own must name "
                "every class; it is one prompt for all classes, even where the preset prompts each class alone.")}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip": (
                "Longer side of the image the model sees; 0 = the preset's (512 for SD1.x/2.x, 1024 for SDXL, Flux "
                "and SD3). "
                "Small models like the demo model want about twice the image's size.")}),
        }}

    RETURN_TYPES = ("MASK", "MASK", "IMAGE", "MASK", ATTNSEG_SCORES)
    RETURN_NAMES = ("masks", "label_map", "preview", "soft_masks", "scores")
    OUTPUT_TOOLTIPS = ("One mask per class and image, image-major: image 0's classes, then image 1's.",
                       "Class index per pixel (0 background, 1.. in class order), as a float MASK.",
                       "Labels coloured over the image with a legend strip below (H + 14 x (classes + 1) px "
                       "tall, so not for ImageBlend with the input).",
                       "The scores themselves in [0, 1], same order as masks.",
                       "The score maps, for AttnSeg Masks with a threshold of your own, or a refiner.")
    FUNCTION = "segment"
    CATEGORY = SEGMENT
    OUTPUT_NODE = True

    def segment(self, model, clip, vae, image, classes, preset, prompt="", resolution=0):
        chosen = find_preset(preset)
        with comfy_progress():
            scores = segment_with_preset(model, clip, vae, image, classes, chosen, prompt, resolution or None)
        return mask_outputs(scores, chosen.threshold, chosen.background, image, (scores,))


NODE_CLASS_MAPPINGS = {"AttnSegSegment": AttnSegSegment}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegSegment": "AttnSeg Segment (image + classes -> masks)"}
