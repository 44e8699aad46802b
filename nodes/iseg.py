"""iSeg: Cat-Cross text encoding, its cross-attention maps, the Ent-Self
refiner and seeded (point / line / box) segmentation."""

from ..attnseg import AttnSegError
from ..attnseg.iseg import ENT_SELF_VARIANTS, ISEG_CROSS_FACTORS, ISEG_CROSS_WEIGHTS, ent_self_refine, iseg_cross
from ..attnseg.fusion import mean_self_attention
from ..attnseg.presets import CUSTOM, ISEG_BACKGROUND_WORDS, SEED_PRESET, SEED_SETTINGS, find_preset
from ..attnseg.seeds import parse_seeds, seeded_maps
from ..attnseg.smoothing import KL_ITERATIONS
from ..hosts.comfyui.progress import comfy_progress
from ..attnseg.prompt_weights import CAT_CROSS_MODES
from ..hosts.comfyui.text import encode_cat_cross
from .presets import preset_input
from .segmenters import parse_weights, require_store
from .types import ATTNSEG_SCORES, ATTNSEG_STORE, REFINE, SEGMENT, TEXT

ISEG_PRESET = "iSeg VOC (released code)"
STORE_TOOLTIP = "From a capture node (Capture Image Attention or the capture KSampler)."
SCORES_TOOLTIP = ("One score map per class and image, min-max normalised to [0, 1]; for AttnSeg Masks (iSeg VOC: "
                  "background '(1 - max)^2'; COCO: threshold 0.45) or Ent-Self.")
VARIANT_TOOLTIP = ("On the column-max normalised S^ = S / max_q S: code: S^ + lambda log10(e S^) (the released code); "
                   "paper: S^ + lambda (1 + ln S^) (the paper's formula, the same step with lambda x ln 10); both "
                   "clamped >= 0 with rows renormalised. naive: plain S, the baseline.")


def ent_self_inputs(lam: float = 0.015, iterations: int = 10):
    return {
        "lam": ("FLOAT", {"default": lam, "min": 0.0, "max": 1.0, "step": 0.001,
                          "tooltip": "Entropy-reduction strength lambda (released code: VOC 0.015, COCO 0.1, "
                                     "interactive 0.1)."}),
        "iterations": ("INT", {"default": iterations, "min": 0, "max": 100,
                               "tooltip": "Ent-Self iterations N (VOC 10, interactive 50)."}),
        "variant": (list(ENT_SELF_VARIANTS), {"default": "code", "tooltip": VARIANT_TOOLTIP}),
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
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (SD1.x/2.x, or SDXL's two encoders)."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Empty: iSeg's template."}),
            "classes": ("STRING", {"default": "", "tooltip": "Comma-separated class words, as in the prompt."}),
            "gamma": ("FLOAT", {"default": 1.6, "min": 0.01, "max": 10.0, "step": 0.05,
                                "tooltip": "Class-token weight (iSeg 1.6; 1 = off)."}),
            "mode": (list(CAT_CROSS_MODES), {"default": "embedding", "tooltip": "keys: the paper's W.K; "
                                             "embedding: the code's scaled text embedding."}),
            "background_words": ("STRING", {"default": ", ".join(ISEG_BACKGROUND_WORDS), "tooltip": (
                "Comma-separated words appended to the template (the released VOC list by default).")}),
        }, "optional": preset_input("iseg", ISEG_PRESET, "iSeg's text side (gamma, mode, background words)")}

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "tokens")
    OUTPUT_TOOLTIPS = ("The encoded prompt with the class tokens weighted (embedding mode: usable with any sampler; "
                       "keys mode: applied by AttnSeg's capture nodes); it carries each class's token positions.",
                       "Text: the prompt as the model tokenized it, and each class's token positions.")
    FUNCTION = "encode"
    CATEGORY = TEXT

    def encode(self, clip, prompt, classes, gamma, mode, background_words, preset=CUSTOM):
        chosen = find_preset(preset, "iseg")
        if chosen is not None:
            text = chosen.text
            gamma, mode, background_words = text.cat_cross_gamma, text.cat_cross_mode, ", ".join(text.background_words)
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
            "attention": (ATTNSEG_STORE, {"tooltip": STORE_TOOLTIP}),
            "factors": ("STRING", {"default": ",".join(map(str, ISEG_CROSS_FACTORS)),
                                   "tooltip": "Latent downscale factors of the layers to fuse."}),
            "weights": ("STRING", {"default": ",".join(map(str, ISEG_CROSS_WEIGHTS)),
                                   "tooltip": "One weight per factor (iSeg 0.7, 0.3)."}),
        }, "optional": {
            "smoothing_iterations": ("INT", {"default": KL_ITERATIONS, "min": 0, "max": 100, "tooltip": (
                "KL k-means smoothing of the fused token maps (anchors every floor(side / sqrt 32) cells: 6x6 on "
                "64x64; symmetric KL; each pixel takes its cluster's mean), this many iterations (released code "
                "20; 0 = off).")}),
            **preset_input("iseg", ISEG_PRESET, "iSeg's cross-attention fusion"),
        }}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = ("One class map per class and image on the self-attention grid, not yet refined: feed it to "
                       "Ent-Self with the same attention.",)
    FUNCTION = "segment"
    CATEGORY = SEGMENT

    def segment(self, attention, factors, weights, smoothing_iterations=0, preset=CUSTOM):
        store = require_store(attention, preset=preset)
        chosen = find_preset(preset, "iseg")
        if chosen is not None:
            settings = chosen.settings
            with comfy_progress():
                return (iseg_cross(store, settings.factors, settings.weights, "attention",
                                   settings.smoothing_iterations, settings.clusters),)
        factor_list = parse_weights(factors, "factors")
        if any(f != int(f) or f < 1 for f in factor_list):
            raise AttnSegError(f"factors: '{factors}' must be whole numbers of 1 or more (latent downscale factors, "
                               f"e.g. 4,2).")
        factor_list = [int(f) for f in factor_list]
        weight_list = parse_weights(weights)
        if len(factor_list) != len(weight_list):
            raise AttnSegError(f"weights: {len(weight_list)} weights for {len(factor_list)} factors; "
                               f"give one weight per factor.")
        with comfy_progress():
            return (iseg_cross(store, factor_list, weight_list, "attention", smoothing_iterations),)


class AttnSegEntSelf:
    """iSeg's Ent-Self refiner for any score maps."""

    DESCRIPTION = ("Refines score maps N times with the entropy-reduced self-attention of the store's finest "
                   "layers (C <- S_ent C, then min-subtract and L1), then min-max per class.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scores": (ATTNSEG_SCORES, {"tooltip": "The maps to refine: iSeg Cross-Attention's, or any segmenter's."}),
            "attention": (ATTNSEG_STORE, {"tooltip": "The store the scores came from (same image and batch): its "
                                                     "finest self-attention refines them."}),
            **ent_self_inputs()},
                "optional": preset_input("iseg", ISEG_PRESET, "Ent-Self (lambda, N, variant)")}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = (SCORES_TOOLTIP,)
    FUNCTION = "refine"
    CATEGORY = REFINE

    def refine(self, scores, attention, lam, iterations, variant, preset=CUSTOM):
        chosen = find_preset(preset, "iseg")
        if chosen is not None:
            lam, iterations, variant = chosen.settings.lam, chosen.settings.iterations, chosen.settings.variant
        with comfy_progress():
            return (ent_self_refine(scores, require_store(attention, preset=preset), lam, iterations, variant),)


class AttnSegSeeds:
    """Segment what the user marked: points, lines, boxes."""

    DESCRIPTION = ('Seeds in image pixels as JSON, e.g. [{"point": [120, 80]}, {"box": [10, 10, 60, 50], "label": '
                   '"cup"}, {"line": [[5, 5], [40, 30]]}], become maps on the self-attention grid and are spread '
                   "by the Ent-Self iteration; one score map per seed. No text needed (any conditioning works).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTNSEG_STORE, {"tooltip": STORE_TOOLTIP + " Any conditioning works: seeds need no class "
                                                                     "words."}),
            "seeds": ("STRING", {"multiline": True, "default": '[{"point": [64, 64]}]', "tooltip": (
                'JSON list in image pixels (x right, y down): {"point": [x, y]}, {"box": [x0, y0, x1, y1]} (far '
                'edge exclusive), {"line": [[x, y], ...]}, each with an optional "label". One score map per '
                "seed; bad entries are refused by entry number.")}),
            **ent_self_inputs(SEED_SETTINGS.lam, SEED_SETTINGS.iterations),
        }, "optional": {
            "clamp_max": ("FLOAT", {"default": SEED_SETTINGS.clamp_max, "min": 0.0, "max": 10.0, "step": 0.1,
                                    "tooltip": "Upper clamp of the refined S^ before its rows are renormalised "
                                               "(the authors' interactive mode: 1; 0 = no upper clamp)."}),
            **preset_input("seeds", SEED_PRESET, "iSeg's interactive mode"),
        }}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = ("One score map per seed, in seed order, each divided by its maximum and named by its label "
                       "(else by its kind and number: 'point 1', 'box 2'); for AttnSeg Masks.",)
    FUNCTION = "segment"
    CATEGORY = REFINE

    def segment(self, attention, seeds, lam, iterations, variant, clamp_max=0.0, preset=CUSTOM):
        store = require_store(attention, preset=preset)
        chosen = find_preset(preset, "seeds")
        if chosen is not None:
            settings = chosen.settings
            lam, iterations, variant, clamp_max = settings.lam, settings.iterations, settings.variant, settings.clamp_max
        grid, self_attention = mean_self_attention(store, "attention")
        parsed = parse_seeds(seeds, store.image_size, grid)
        with comfy_progress():
            return (seeded_maps(self_attention, grid, parsed, store.image_size, lam, iterations, variant,
                                clamp_max or None),)


NODE_CLASS_MAPPINGS = {"AttnSegCatCrossEncode": AttnSegCatCrossEncode,
                       "AttnSegISegCrossAttention": AttnSegISegCrossAttention,
                       "AttnSegEntSelf": AttnSegEntSelf, "AttnSegSeeds": AttnSegSeeds}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegCatCrossEncode": "AttnSeg Cat-Cross Text Encode (iSeg)",
                              "AttnSegISegCrossAttention": "AttnSeg iSeg Cross-Attention",
                              "AttnSegEntSelf": "AttnSeg Ent-Self Refine (iSeg)",
                              "AttnSegSeeds": "AttnSeg Seeds (points / lines / boxes)"}
