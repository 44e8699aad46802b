"""Segments without words: DiffSeg, iSeg's unsupervised mode, and naming the
segments by cross-attention."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..attnseg import AttnSegError
from ..attnseg.diffseg import REFINEMENTS, UNKNOWN, DiffSegSettings, describe, diffseg, name_segments
from ..attnseg.masks import class_masks, overlay, palette
from ..attnseg.presets import CUSTOM, find_preset
from ..hosts.comfyui.progress import comfy_progress
from .masks import LEGEND_ROW, MAX_SHOWN, save_previews
from .presets import preset_input
from .segmenters import parse_weights, require_store
from .types import ATTNSEG_SCORES, ATTNSEG_STORE, SEGMENT

DIFFSEG_PRESET = "DiffSeg COCO-Stuff (released code)"
NAMING = ("auto", "on", "off")
DEFAULTS = DiffSegSettings()


def legend(names: list[str], width: int, first: str) -> torch.Tensor:
    """A strip of swatches: ``first`` (label 0, black) then one per name."""
    colours = (palette(len(names)).numpy() * 255).astype(np.uint8)
    strip = Image.new("RGB", (width, LEGEND_ROW * (len(names) + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for row, (name, colour) in enumerate(zip([first] + names, colours)):
        top = row * LEGEND_ROW
        draw.rectangle([2, top + 2, 12, top + 12], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((16, top + 1), name, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(strip).astype(np.float32) / 255.0)


def to_image_size(labels: torch.Tensor, image, image_size) -> torch.Tensor:
    """Labels at the connected image's size (nearest), after checking it is the segmented batch."""
    if image is None:
        return labels
    if image.shape[0] != labels.shape[0]:
        raise AttnSegError(f"image: {image.shape[0]} images but {labels.shape[0]} were segmented. Connect the image "
                           f"batch that was captured.")
    size = tuple(image.shape[1:3])
    if size == tuple(labels.shape[-2:]):
        return labels
    if abs((size[1] / size[0]) / (image_size[1] / image_size[0]) - 1) > 0.02:
        raise AttnSegError(f"image: {size[1]}x{size[0]} does not have the aspect ratio of the segmented image "
                           f"({image_size[1]}x{image_size[0]}). Connect the image that was captured.")
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class AttnSegUnsupervised:
    """DiffSeg's segments, optionally refined by Ent-Self (iSeg) and named."""

    DESCRIPTION = ("Splits the image into segments with no class words (DiffSeg): every resolution's "
                   "self-attention aggregated on the finest grid, anchors on a regular grid merged while their "
                   "symmetric KL is below tau, each pixel given the largest merged map. Optionally refined by the "
                   "Ent-Self iteration (iSeg's unsupervised mode), and each segment named by the class whose "
                   "cross-attention it holds most (or 'unknown'). Capture with self_layers 'all (GoCA)' so every "
                   "resolution is there (the finest alone works too).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "attention": (ATTNSEG_STORE, {"tooltip": "From Capture Image Attention with self_layers 'all (GoCA)' "
                                                     "(DiffSeg reads every resolution; t = 300). Any conditioning "
                                                     "works; AttnSeg Text Encode's lets the segments be named."}),
            "anchors": ("INT", {"default": DEFAULTS.anchors, "min": 1, "max": 128, "tooltip": (
                "Anchors per side on the finest self-attention grid (DiffSeg: 16, i.e. 256 anchors); at most the "
                "grid's shorter side.")}),
            "tau": ("FLOAT", {"default": DEFAULTS.tau, "min": 0.001, "max": 20.0, "step": 0.05, "tooltip": (
                "Maps merge while their symmetric KL divergence is below tau (DiffSeg: COCO-Stuff 1.1, Cityscapes "
                "0.9). Larger: fewer, bigger segments.")}),
            "passes": ("INT", {"default": DEFAULTS.passes, "min": 1, "max": 20, "tooltip": (
                "Merging passes (DiffSeg: 3): the first merges pixels into the anchors, the others merge the "
                "proposals.")}),
            "refinement": (list(REFINEMENTS), {"default": DEFAULTS.refinement, "tooltip": (
                "off: DiffSeg. code / paper: iSeg's unsupervised mode, the proposals refined by Ent-Self (the same "
                "operator as AttnSeg Ent-Self Refine); naive: plain self-attention, the paper's baseline.")}),
            "lam": ("FLOAT", {"default": DEFAULTS.lam, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                "Ent-Self lambda (refinement on; iSeg paper 0.01, VOC code 0.015).")}),
            "iterations": ("INT", {"default": DEFAULTS.iterations, "min": 0, "max": 100, "tooltip": (
                "Ent-Self iterations N (refinement on; iSeg 10).")}),
        }, "optional": {
            "weights": ("STRING", {"default": "", "tooltip": (
                "Weights of the self-attention resolutions, coarsest first (SD1.5 at 512 px: 8, 16, 32, 64); "
                "empty: DiffSeg's, proportional to resolution (8, 16, 32, 64 over 120).")}),
            "kmeans_iterations": ("INT", {"default": DEFAULTS.kmeans_iterations, "min": 0, "max": 1000, "tooltip": (
                "DiffSeg's optional k-means of every pixel's map from the merged maps, up to this many rounds "
                "(0 = off, its benchmark; its demo notebook: on, up to 300).")}),
            "naming": (list(NAMING), {"default": "auto", "tooltip": (
                "Name each segment by the class whose cross-attention it holds most. auto: when the capture's "
                "conditioning carries classes (AttnSeg Text Encode); on: require them; off: segments only.")}),
            "name_threshold": ("FLOAT", {"default": DEFAULTS.name_threshold, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": (
                "A segment whose best class scores below this (the mean over its pixels of the class's min-max "
                "cross-attention) is 'unknown' (label 0). 0: every segment named, as DiffSeg does.")}),
            "image": ("IMAGE", {"tooltip": "Draw the preview over this image (the one that was captured)."}),
            **preset_input("diffseg", DIFFSEG_PRESET, "DiffSeg (and iSeg's unsupervised mode)"),
        }}

    RETURN_TYPES = ("MASK", "MASK", "MASK", "IMAGE", ATTNSEG_SCORES, "STRING")
    RETURN_NAMES = ("masks", "label_map", "segments", "preview", "scores", "names")
    OUTPUT_TOOLTIPS = (
        "Named: one mask per class and image, image-major (as AttnSeg Masks). Unnamed: one per segment "
        "('segment 1'..., images with fewer segments padded with empty masks).",
        "Named: class index per pixel (0 unknown, 1.. in class order); unnamed: the segment index.",
        "The raw segments: segment index per pixel (1.., numbered in raster order of their first pixel).",
        "Segments coloured over the image (named: coloured by class, unknown uncoloured), legend below.",
        "One score map per segment (min-max), for AttnSeg Masks (threshold 0 gives the segments).",
        "Per image: the segment count and, when named, each segment's class and score.")
    FUNCTION = "segment"
    CATEGORY = SEGMENT
    OUTPUT_NODE = True

    def segment(self, attention, anchors, tau, passes, refinement, lam, iterations, weights="",
                kmeans_iterations=0, naming="auto", name_threshold=0.0, image=None, preset=CUSTOM):
        store = require_store(attention, preset=preset)
        chosen = find_preset(preset, "diffseg")
        if chosen is not None:
            s = chosen.settings
            anchors, tau, passes, refinement, lam, iterations = (s.anchors, s.tau, s.passes, s.refinement, s.lam,
                                                                 s.iterations)
            weight_list, kmeans_iterations, name_threshold = s.weights, s.kmeans_iterations, s.name_threshold
        else:
            weight_list = parse_weights(weights) if weights.strip() else ()
        if naming not in NAMING:
            raise AttnSegError(f"naming: '{naming}' is not one of {', '.join(NAMING)}.")
        has_classes = store.prompt is not None and bool(store.prompt.classes)
        if naming == "on" and not has_classes:
            raise AttnSegError("naming: 'on' needs classes, but the capture's conditioning has none. Capture with "
                               "AttnSeg Text Encode's conditioning (classes set), or set naming to auto or off.")
        with comfy_progress():
            found = diffseg(store, anchors, tau, passes, weight_list, kmeans_iterations, refinement, lam, iterations)
        named = naming != "off" and has_classes
        if named:
            found = name_segments(found, store, name_threshold)
        segments = to_image_size(found.labels, image, store.image_size).cpu()
        most = max(found.counts)
        base = image[..., :3].cpu() if image is not None else None
        width = segments.shape[-1]
        seg_legend = legend([f"segment {k + 1}" for k in range(most)], width, "-")
        with_strip = lambda pictures, strip: torch.cat(  # noqa: E731
            [pictures, strip.expand(pictures.shape[0], -1, -1, -1)], dim=1)
        seg_preview = with_strip(overlay(segments, most, base), seg_legend)
        if named:
            lookup = [torch.tensor([0] + [n + 1 for n in names]) for names in found.names]
            labels = torch.stack([lookup[b][segments[b]] for b in range(segments.shape[0])])
            classes = len(found.class_names)
            preview = with_strip(overlay(labels, classes, base), legend(found.class_names, width, UNKNOWN))
            shown = [*preview[:MAX_SHOWN], *seg_preview[:MAX_SHOWN]]
        else:
            labels, classes, preview = segments, most, seg_preview
            shown = list(seg_preview[:MAX_SHOWN])
        masks = class_masks(labels, classes)
        return {"ui": {"images": save_previews(shown)},
                "result": (masks, labels.float(), segments.float(), preview, found.score_maps(), describe(found))}


NODE_CLASS_MAPPINGS = {"AttnSegUnsupervised": AttnSegUnsupervised}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegUnsupervised": "AttnSeg Unsupervised Segments (DiffSeg / iSeg)"}
