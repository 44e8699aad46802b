import logging
import math

from ..attnseg import AttnSegError
from ..attnseg.fusion import DIFFSEGMENTER_WEIGHTS, TIMESTEP_AVERAGES, diffsegmenter
from ..attnseg.presets import CUSTOM, check_family, find_preset
from .presets import preset_input
from .types import ATTNSEG_SCORES, ATTNSEG_STORE, SEGMENT


def require_store(store, input_name: str = "attention", preset: str = CUSTOM):
    """The connected store; a preset made for another model family than the store's is refused,
    and so are maps with NaN or infinite values."""
    if store is None:
        raise AttnSegError(f"{input_name}: no attention was captured (capture is off on the sampler). "
                           f"Turn capture on.")
    if preset != CUSTOM:
        check_family(preset, store.family, f"{store.model_id}, whose attention this store holds")
    store.check_finite(input_name)
    return store


def parse_weights(text: str, input_name: str = "weights") -> list[float]:
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise AttnSegError(f"{input_name}: '{text}' is not a comma-separated list of numbers.")
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AttnSegError(f"{input_name}: '{text}' needs non-negative numbers with a positive sum.")
    return weights


class AttnSegDiffSegmenter:
    """DiffSegmenter: weighted fusion of per-resolution cross-attention plus
    self-attention completion."""

    DESCRIPTION = ("Per resolution, the mean cross-attention of each class's tokens over all layers, min-max "
                   "normalised and summed with the weights (coarsest resolution first), then refined once by "
                   "the mean finest self-attention (S . A) and min-max normalised.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTNSEG_STORE, {"tooltip": "From a capture node (Capture Image Attention or the "
                                                     "capture KSampler)."}),
            "weights": ("STRING", {"default": ",".join(str(w) for w in DIFFSEGMENTER_WEIGHTS),
                                   "tooltip": "One weight per attention resolution, coarsest first "
                                              "(SD1.5 at 512 px: 8, 16, 32, 64). Paper: 0.3,0.5,0.1,0.1."}),
            "self_completion": ("BOOLEAN", {"default": True, "tooltip": "Multiply by the finest "
                                                                        "self-attention once (the paper)."}),
        }, "optional": {
            "timestep_average": (list(TIMESTEP_AVERAGES), {"default": "final maps", "tooltip": (
                "With several timesteps (a store captured with a preset that keeps them apart): average each "
                "timestep's completed maps (the authors' code), or segment the averaged attention.")}),
            **preset_input("diffsegmenter", "DiffSegmenter (released code)", "DiffSegmenter's fusion"),
        }}

    RETURN_TYPES = (ATTNSEG_SCORES,)
    RETURN_NAMES = ("scores",)
    OUTPUT_TOOLTIPS = ("One score map per class and image, min-max normalised to [0, 1]; for AttnSeg Masks or "
                       "a refiner (Ent-Self).",)
    FUNCTION = "segment"
    CATEGORY = SEGMENT

    def segment(self, attention, weights, self_completion, timestep_average="attention", preset=CUSTOM):
        chosen = find_preset(preset, "diffsegmenter")
        # The text inputs are checked before the store is read (its finite check syncs the device).
        weight_list = parse_weights(weights) if chosen is None else None
        store = require_store(attention, preset=preset)
        if chosen is not None:
            settings = chosen.settings
            return (diffsegmenter(store, settings.weights, settings.self_completion, "attention",
                                  settings.timestep_average),)
        scores = diffsegmenter(store, weight_list, self_completion, "attention", timestep_average)
        logging.info("AttnSeg DiffSegmenter: %s", scores.method)  # which weights applied to which levels
        return (scores,)


NODE_CLASS_MAPPINGS = {"AttnSegDiffSegmenter": AttnSegDiffSegmenter}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegDiffSegmenter": "AttnSeg DiffSegmenter"}
