"""GoCA: automatic head and layer aggregation, per-pixel rescaling and affinity
propagation of the captured cross-attention."""

from ..attnseg.goca import GOCA_BLUR, GOCA_ORDER, LAYER_WEIGHTINGS, goca
from ..attnseg.layers import parse_picks
from ..attnseg.presets import CUSTOM, find_preset
from ..attnseg.tokens import parse_class_list
from ..hosts.comfyui.progress import comfy_progress
from .presets import preset_input
from .segmenters import require_store
from .types import ATTNSEG_SCORES, ATTNSEG_STORE, SEGMENT


class AttnSegGoCA:
    """GoCA's class maps, each stage switchable for the paper's ablation."""

    DESCRIPTION = ("GoCA's segmenter. Heads are aggregated at capture time (the capture node's heads input: "
                   "'auto (GoCA)' weighs each head per pixel by its share of the attention output). Layers: each "
                   "layer weighted by how well its self-attention matches a pseudo self-attention from a "
                   "reference layer's queries (capture with self_layers 'all (GoCA)'), or uniformly. Rescaling: "
                   "each class map divided by the attention of all content words, blurred, min-max. "
                   "Propagation: the maps multiplied k times by the finest self-attention.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTNSEG_STORE, {"tooltip": "From a capture node with heads 'auto (GoCA)' and self_layers "
                                                     "'all (GoCA)' (or its preset 'GoCA ...'); head mean: the ablation."}),
            "layer_weights": (list(LAYER_WEIGHTINGS), {"default": "auto", "tooltip": "auto: GoCA's weights from "
                              "the reference layer's queries; uniform: the plain mean over layers."}),
            "rescaling": ("BOOLEAN", {"default": True, "tooltip": "Divide each class map by the attention all "
                                                                  "content words get at that pixel (GoCA)."}),
            "blur": ("INT", {"default": GOCA_BLUR, "min": 0, "max": 15, "step": 1,
                             "tooltip": "Odd Gaussian kernel after rescaling (GoCA 5; 0 = off)."}),
            "propagation_order": ("INT", {"default": GOCA_ORDER, "min": 0, "max": 8, "tooltip": "k in S^k C "
                                          "(GoCA 2 for SD1.5/SDXL; 0 = off)."}),
            "background_classes": ("STRING", {"default": "", "tooltip": "Comma-separated classes of the text "
                                              "encoder that are background (e.g. 'sky, grass'): their strongest "
                                              "map is added to the mask node's background threshold."}),
        }, "optional": {
            "propagation_layers": ("STRING", {"default": "", "tooltip": (
                "custom: the self-attention layers whose mean propagates, as 'BLOCK LEVEL INDEX' separated by ';' "
                "(see the capture node's self_layer_picks; GoCA SD1.5: 'output 0 0; output 0 1; input 0 1'). "
                "Empty: every finest layer in the store.")}),
            "aggregate_factor": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": (
                "custom: aggregate the maps at the latent size divided by this (GoCA on SDXL: 2, i.e. 64x64 at "
                "1024 px).")}),
            **preset_input("goca", "GoCA SD1.5 (released code)", (
            "GoCA's stages (the store must be captured with the same preset: output-weighted heads, every layer's "
            "self-attention, the reference queries), its propagation layers and, on SDXL, 64x64 aggregation; "
            "background_classes still apply")),
        }}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = ("One score map per object class and image (background_classes get none: their strongest map "
                       "is carried as the background map the Masks node adds to its threshold).",)
    FUNCTION = "segment"
    CATEGORY = SEGMENT

    def segment(self, attention, layer_weights, rescaling, blur, propagation_order, background_classes,
                propagation_layers="", aggregate_factor=1, preset=CUSTOM):
        store = require_store(attention, preset=preset)
        backgrounds = parse_class_list(background_classes, "background_classes") if background_classes.strip() else []
        chosen = find_preset(preset, "goca")
        if chosen is None:
            args = (layer_weights, rescaling, blur, propagation_order, backgrounds, "attention",
                    parse_picks(propagation_layers, "propagation_layers"), aggregate_factor)
        else:
            settings = chosen.settings
            args = (settings.layer_weights, settings.rescaling, settings.blur, settings.order, backgrounds,
                    "attention", settings.propagation_layers, settings.aggregate_factor, chosen.name,
                    chosen.capture.heads)
        with comfy_progress():
            return (goca(store, *args),)


NODE_CLASS_MAPPINGS = {"AttnSegGoCA": AttnSegGoCA}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegGoCA": "AttnSeg GoCA"}
