"""A demo image that needs no file: the pack's shipped picture or a procedural
shape scene, with its caption and class names for the demo model's prompts."""

import torch

from ..attnseg import AttnSegError
from ..demo.images import CHOICES, MAX_SIZE, MIN_SIZE, RANDOM, SHIPPED, demo_image
from .types import LOADERS


class AttnSegDemoImage:
    DESCRIPTION = ("The picture the demo templates segment, without copying a file into input/: the shipped "
                   f"{SHIPPED} (a red circle and a blue square, 192x128) or a random scene of the shapes the "
                   "demo model knows. Swap it for Load Image to segment your own picture.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (list(CHOICES), {"default": SHIPPED, "tooltip": f"{SHIPPED}: the shipped picture. "
                                      f"{RANDOM}: one to three coloured shapes drawn from the seed."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1,
                             "tooltip": "Which random scene (the same seed always draws the same scene)."}),
            "width": ("INT", {"default": 192, "min": MIN_SIZE, "max": MAX_SIZE, "step": 8,
                              "tooltip": "Random scene width in pixels (the shipped picture is 192)."}),
            "height": ("INT", {"default": 128, "min": MIN_SIZE, "max": MAX_SIZE, "step": 8,
                               "tooltip": "Random scene height in pixels (the shipped picture is 128)."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "caption", "classes")
    OUTPUT_TOOLTIPS = ("The picture, 1 x H x W x 3.",
                       "What it shows, as the demo model was trained to read it ('a red circle and a blue square').",
                       "Its objects as a comma-separated class list ('red circle, blue square').")
    FUNCTION = "load"
    CATEGORY = LOADERS

    def load(self, image, seed, width, height):
        try:
            pixels, caption, classes = demo_image(image, seed, width, height)
        except ValueError as error:
            raise AttnSegError(f"{error}. Choose {SHIPPED}, or a random scene of {MIN_SIZE}..{MAX_SIZE} px.") from None
        return torch.from_numpy(pixels).float().div(255).unsqueeze(0), caption, ", ".join(classes)


NODE_CLASS_MAPPINGS = {"AttnSegDemoImage": AttnSegDemoImage}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegDemoImage": "AttnSeg Demo Image"}
