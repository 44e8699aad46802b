from ..attnseg.presets import CUSTOM, find_preset
from ..hosts.comfyui.text import DIT_TEXT_PARTS, encode_segmentation_prompt, remember_tokenizer
from .presets import preset_input
from .types import TEXT

TEXT_PRESET = "DiffSegmenter (released code)"


class AttnSegTextEncode:
    """CLIPTextEncode that also records where each class word sits in the prompt."""

    DESCRIPTION = ("Encodes a prompt for segmentation. The CONDITIONING works anywhere a normal one does and "
                   "also carries the token positions of each class, which the segmenters read.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (SD1.x/2.x, SDXL's two encoders, Flux's "
                                         "CLIP-L + T5 or SD3's CLIP-L + CLIP-G + T5)."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "Describes the image and names every class. Empty: "
                                             "'a photograph of {class1} and {class2} ...'."}),
            "classes": ("STRING", {"default": "", "tooltip": "Comma-separated class words, each "
                                                             "written as it appears in the prompt."}),
            "class_weight": ("FLOAT", {"default": 1.21, "min": 0.01, "max": 5.0, "step": 0.01,
                                       "tooltip": "Re-weight the class tokens, z_empty + w (z - z_empty) "
                                                  "(DiffSegmenter's class++: 1.21; 1 = off)."}),
            "fuse_ing_word": ("BOOLEAN", {"default": True, "tooltip": "A word ending in -ing right after a class "
                                          "word joins the class (DiffSegmenter: 'dog running')."}),
        }, "optional": {
            **preset_input("diffsegmenter", TEXT_PRESET, "DiffSegmenter's prompt design (class++ 1.21, -ing "
                           "fusion); for generation or other methods choose custom"),
            "dit_text": (DIT_TEXT_PARTS, {"default": "both", "tooltip": (
                "SD3 only (its sequence is CLIP-L+G's 77 tokens, then T5's): which copy of each class word the "
                "maps read, 'clip', 't5' or 'both' (their mean). Flux's sequence is T5 alone; UNets ignore it.")}),
        },
            "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "tokens")
    OUTPUT_TOOLTIPS = ("The encoded prompt, usable anywhere a CONDITIONING is; it also carries each class's "
                       "token positions for the capture and segmenter nodes.",
                       "Text: the prompt as the model tokenized it, and each class's token positions.")
    FUNCTION = "encode"
    CATEGORY = TEXT

    def encode(self, clip, prompt, classes, class_weight=1.0, fuse_ing_word=True, preset=CUSTOM, dit_text="both",
               unique_id=None):
        chosen = find_preset(preset, "diffsegmenter")
        if chosen is not None:
            class_weight, fuse_ing_word = chosen.text.class_weight, chosen.text.fuse_ing
        if clip is None:
            raise RuntimeError("clip: no CLIP model is connected; connect a checkpoint loader's CLIP output.")
        remember_tokenizer(unique_id, clip)  # the class picker then reads the prompt with this CLIP's tokenizer
        conditioning, meta = encode_segmentation_prompt(clip, prompt, classes, class_weight, fuse_ing_word, dit_text)
        report = meta.readable + "\n" + "\n".join(f"{c.name}: tokens {list(c.positions)}" for c in meta.classes)
        return (conditioning, report)


NODE_CLASS_MAPPINGS = {"AttnSegTextEncode": AttnSegTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegTextEncode": "AttnSeg Text Encode (segmentation)"}
