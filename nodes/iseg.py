"""iSeg: Cat-Cross text encoding, its cross-attention maps, the Ent-Self
refiner and seeded (point / line / box) segmentation."""

from ..attnseg import AttnSegError
from ..attnseg.iseg import ENT_SELF_VARIANTS, ISEG_CROSS_FACTORS, ISEG_CROSS_WEIGHTS, ent_self_refine, iseg_cross
from ..attnseg.fusion import mean_self_attention
from ..attnseg.seeds import parse_seeds, seeded_maps
from ..hosts.comfyui.text import CAT_CROSS_MODES, encode_cat_cross
from .segmenters import parse_weights, require_store
from .types import ATTN_SCORES, ATTN_STORE, CATEGORY

VARIANT_TOOLTIP = ("paper: S + lambda(1 + ln S); code: column-max normalised S^ + lambda log10(e S^) (the released "
                   "code); both clamped >= 0 with rows renormalised. naive: plain S, the baseline.")


def ent_self_inputs():
    return {
        "lam": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                          "tooltip": "Entropy-reduction strength lambda (paper 0.01, VOC code 0.015)."}),
        "iterations": ("INT", {"default": 10, "min": 0, "max": 100, "tooltip": "Ent-Self iterations N (paper 10)."}),
        "variant": (list(ENT_SELF_VARIANTS), {"default": "paper", "tooltip": VARIANT_TOOLTIP}),
    }


class AttnSegCatCrossEncode:
    """iSeg's Cat-Cross text encoding."""

    DESCRIPTION = ("Encodes a segmentation prompt with the class tokens weighted by gamma. keys (the paper): the "
                   "class tokens' keys are scaled inside cross-attention, cond branch only, by AttnSeg's capture "
                   "nodes. embedding (the released code): the text embedding is scaled, which also scales the "
                   "values and works with any sampler. An empty prompt becomes 'a photograph of {c1} and {c2} "
                   "and other objects and background', plus the background words.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Empty: iSeg's template."}),
            "classes": ("STRING", {"default": "", "tooltip": "Comma-separated class words, as in the prompt."}),
            "gamma": ("FLOAT", {"default": 1.6, "min": 0.01, "max": 10.0, "step": 0.05,
                                "tooltip": "Class-token weight (iSeg 1.6; 1 = off)."}),
            "mode": (list(CAT_CROSS_MODES), {"default": "keys", "tooltip": "keys: the paper's W.K; "
                                             "embedding: the code's scaled text embedding."}),
            "background_words": ("STRING", {"default": "", "tooltip": "Comma-separated words appended to the "
                                                                      "template, e.g. 'ground, sky, wall'."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "tokens")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, prompt, classes, gamma, mode, background_words):
        conditioning, meta = encode_cat_cross(clip, prompt, classes, gamma, mode, background_words)
        report = meta.readable + "\n" + "\n".join(f"{c.name}: tokens {list(c.positions)}" for c in meta.classes)
        return (conditioning, report)


class AttnSegISegCrossAttention:
    """iSeg's class maps from cross-attention."""

    DESCRIPTION = ("Per chosen resolution (default 4x and 2x below the latent: 16x16 and 32x32 for SD at 512 px), "
                   "each token's cross-attention L1-normalised over the image, upsampled to the self-attention "
                   "grid and weighted (0.7, 0.3); a class is the mean of its tokens. Feed to Ent-Self.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTN_STORE,),
            "factors": ("STRING", {"default": ",".join(map(str, ISEG_CROSS_FACTORS)),
                                   "tooltip": "Latent downscale factors of the layers to fuse."}),
            "weights": ("STRING", {"default": ",".join(map(str, ISEG_CROSS_WEIGHTS)),
                                   "tooltip": "One weight per factor (iSeg 0.7, 0.3)."}),
        }}

    RETURN_TYPES = (ATTN_SCORES,)
    RETURN_NAMES = ("scores",)
    FUNCTION = "segment"
    CATEGORY = CATEGORY

    def segment(self, attention, factors, weights):
        store = require_store(attention)
        factor_list = [int(f) for f in parse_weights(factors, "factors")]
        weight_list = parse_weights(weights)
        if len(factor_list) != len(weight_list):
            raise AttnSegError(f"weights: {len(weight_list)} weights for {len(factor_list)} factors; "
                               f"give one weight per factor.")
        return (iseg_cross(store, factor_list, weight_list),)


class AttnSegEntSelf:
    """iSeg's Ent-Self refiner for any score maps."""

    DESCRIPTION = ("Refines score maps N times with the entropy-reduced self-attention of the store's finest "
                   "layers (C <- S_ent C, then min-subtract and L1), then min-max per class.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"scores": (ATTN_SCORES,), "attention": (ATTN_STORE,), **ent_self_inputs()}}

    RETURN_TYPES = (ATTN_SCORES,)
    RETURN_NAMES = ("scores",)
    FUNCTION = "refine"
    CATEGORY = CATEGORY

    def refine(self, scores, attention, lam, iterations, variant):
        return (ent_self_refine(scores, require_store(attention), lam, iterations, variant),)


class AttnSegSeeds:
    """Segment what the user marked: points, lines, boxes."""

    DESCRIPTION = ('Seeds in image pixels as JSON, e.g. [{"point": [120, 80]}, {"box": [10, 10, 60, 50], "label": '
                   '"cup"}, {"line": [[5, 5], [40, 30]]}], become maps on the self-attention grid and are spread '
                   "by the Ent-Self iteration; one score map per seed. No text needed (any conditioning works).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTN_STORE,),
            "seeds": ("STRING", {"multiline": True, "default": '[{"point": [64, 64]}]'}),
            **ent_self_inputs(),
        }}

    RETURN_TYPES = (ATTN_SCORES,)
    RETURN_NAMES = ("scores",)
    FUNCTION = "segment"
    CATEGORY = CATEGORY

    def segment(self, attention, seeds, lam, iterations, variant):
        store = require_store(attention)
        grid, self_attention = mean_self_attention(store, "attention")
        parsed = parse_seeds(seeds, store.image_size, grid)
        return (seeded_maps(self_attention, grid, parsed, store.image_size, lam, iterations, variant),)


NODE_CLASS_MAPPINGS = {"AttnSegCatCrossEncode": AttnSegCatCrossEncode,
                       "AttnSegISegCrossAttention": AttnSegISegCrossAttention,
                       "AttnSegEntSelf": AttnSegEntSelf, "AttnSegSeeds": AttnSegSeeds}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegCatCrossEncode": "AttnSeg Cat-Cross Text Encode (iSeg)",
                              "AttnSegISegCrossAttention": "AttnSeg iSeg Cross-Attention",
                              "AttnSegEntSelf": "AttnSeg Ent-Self Refine (iSeg)",
                              "AttnSegSeeds": "AttnSeg Seeds (points / lines / boxes)"}
