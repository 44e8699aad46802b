"""ConceptAttention (Flux): class words as concept tokens next to the model's own."""

from ..attnseg import AttnSegError
from ..attnseg.presets import CUSTOM, ConceptSettings, find_preset
from ..hosts.comfyui.concept import segment_concepts
from ..hosts.comfyui.progress import comfy_progress
from .presets import preset_input
from .types import ATTNSEG_SCORES, SEGMENT

DEFAULTS = ConceptSettings()


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(b) for b in text.replace(";", ",").split(",") if b.strip())
    except ValueError:
        blocks = ()
    if not blocks or any(b < 0 for b in blocks):
        raise AttnSegError(f"blocks: '{text}' is not a comma-separated list of double-block indices from 0, "
                           f"e.g. '15, 16, 17, 18' (the authors' choice on Flux.1).")
    return blocks


class AttnSegConceptAttention:
    """ConceptAttention over an input image on a Flux model."""

    DESCRIPTION = ("ConceptAttention (Flux.1): each class word, encoded alone, runs through the double blocks' text "
                   "layers as a token of its own that attends to the image and the other classes; the image never "
                   "attends to it, so the model computes what it always does. Per pixel: the softmax over classes "
                   "of <image token's attention output, class token's attention output>, averaged over the blocks. "
                   "The scores sum to 1 over the classes: label by argmax (Masks threshold 0) with background words "
                   "among the classes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Flux.1 model (dev, schnell, or a model of that layout); patched on a "
                                           "clone."}),
            "clip": ("CLIP", {"tooltip": "Flux's text encoders (DualCLIPLoader, type flux): each class is encoded "
                                         "alone by T5."}),
            "vae": ("VAE", {"tooltip": "Flux's VAE: encodes the image to a latent."}),
            "image": ("IMAGE", {"tooltip": "Any size and aspect ratio; a batch is segmented image by image."}),
            "positive": ("CONDITIONING", {"tooltip": "The image's prompt (a caption, or empty), from any Flux text "
                                                     "encode node; its guidance value is used."}),
            "classes": ("STRING", {"default": "", "tooltip": "Comma-separated class words, e.g. 'cat, sofa, "
                                                             "background'."}),
            "blocks": ("STRING", {"default": ", ".join(map(str, DEFAULTS.blocks)), "tooltip": (
                "The double blocks whose maps are averaged (authors: 15, 16, 17, 18 of Flux.1's 19).")}),
            "timestep": ("FLOAT", {"default": DEFAULTS.timestep, "min": 1.0, "max": 1000.0, "step": 1.0,
                                   "tooltip": "Noise level out of 1000 (sigma = t / 1000; authors: 500, half noise)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "The noise draw added to the latent."}),
            "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 64,
                                   "tooltip": "Longer side of the image the model sees (aspect kept)."}),
        }, "optional": preset_input("concept", "ConceptAttention Flux (released code)",
                                    "ConceptAttention (blocks and noise level)")}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = ("One map per class and image: the class's share of each pixel (the maps sum to 1 over the "
                       "classes); for AttnSeg Masks with threshold 0 (argmax) or a refiner.",)
    FUNCTION = "segment"
    CATEGORY = SEGMENT

    def segment(self, model, clip, vae, image, positive, classes, blocks, timestep, seed, resolution, preset=CUSTOM):
        chosen = find_preset(preset, "concept")
        if chosen is None:
            chosen_blocks = parse_blocks(blocks)
        else:
            chosen_blocks, timestep = chosen.settings.blocks, chosen.settings.timestep
        with comfy_progress():
            return (segment_concepts(model, clip, vae, image, positive, classes, chosen_blocks, timestep, seed,
                                     resolution),)


NODE_CLASS_MAPPINGS = {"AttnSegConceptAttention": AttnSegConceptAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegConceptAttention": "AttnSeg ConceptAttention (Flux)"}
