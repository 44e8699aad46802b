"""The embedded demo model: a tiny SD1-layout model trained on shape scenes that
ships with the pack, so every workflow runs without downloading weights."""

from ..attnseg import AttnSegError
from ..hosts.comfyui import demo_model
from .types import CATEGORY


class AttnSegDemoModelLoader:
    """Loads the pack's shipped demo checkpoint."""

    DESCRIPTION = ("A tiny SD1-layout model (ComfyUI's UNet, SD1 CLIP with the real tokenizer, a small "
                   "VAE) trained on coloured shapes: circle, square, triangle, star in red, green, blue, yellow, "
                   "purple, orange. It works at 128 px; prompt it like 'a red circle and a blue square'. "
                   "Use it to try the segmenters and guidance without downloading a model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self):
        if not demo_model.CHECKPOINT.is_file():
            raise AttnSegError(f"The demo checkpoint {demo_model.CHECKPOINT} is missing. Reinstall the pack, "
                               f"or rebuild it with 'python demo/train.py'.")
        return demo_model.load()


NODE_CLASS_MAPPINGS = {"AttnSegDemoModelLoader": AttnSegDemoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegDemoModelLoader": "AttnSeg Demo Model Loader"}
