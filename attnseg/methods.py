"""A preset's segmentation method on a captured store, for every host's one-call
segmenter (ComfyUI's AttnSeg Segment, diffusers' segment())."""

from __future__ import annotations

from .errors import AttnSegError
from .fusion import diffsegmenter
from .goca import goca
from .iseg import iseg
from .presets import Preset
from .scores import ScoreMaps
from .store import AttentionStore
from .tokens import GOCA_BACKGROUND


def run_method(store: AttentionStore, chosen: Preset) -> ScoreMaps:
    """The preset's method (DiffSegmenter, iSeg or GoCA) with its settings."""
    settings = chosen.settings
    if chosen.method == "diffsegmenter":
        return diffsegmenter(store, settings.weights, settings.self_completion, "attention",
                             settings.timestep_average)
    if chosen.method == "iseg":
        return iseg(store, settings.lam, settings.iterations, settings.variant, settings.factors, settings.weights,
                    "attention", settings.smoothing_iterations, settings.clusters)
    if chosen.method == "goca":
        # GoCA's template adds a background class; a generation's own prompt may not have one.
        named = store.prompt.class_names if store.prompt else []
        backgrounds = [GOCA_BACKGROUND] if chosen.text.template == "goca" and GOCA_BACKGROUND in named else []
        return goca(store, settings.layer_weights, settings.rescaling, settings.blur, settings.order, backgrounds,
                    "attention", settings.propagation_layers, settings.aggregate_factor, chosen.name,
                    chosen.capture.heads)
    raise AttnSegError(f"preset: '{chosen.name}' is a {chosen.method} preset, which this node does not run.")
