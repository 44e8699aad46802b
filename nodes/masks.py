import dataclasses
import os
import uuid

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..attnseg import AttnSegError
from ..attnseg.masks import BACKGROUND_RULES, heat_map, make_masks, overlay, palette
from ..attnseg.scores import ScoreMaps
from .types import ATTNSEG_SCORES, MASKS

LEGEND_ROW = 14
MAX_SHOWN = 4  # images of a batch previewed on the node


def save_previews(pictures) -> list[dict]:
    """(H, W, 3) images in [0, 1] -> PNGs in ComfyUI's temp folder, as node ``ui`` images."""
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    stem = "attnseg_masks_" + uuid.uuid4().hex[:10]
    shown = []
    for index, picture in enumerate(pictures):
        name = f"{stem}_{index:02d}.png"
        Image.fromarray((picture.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(
            os.path.join(folder, name), compress_level=1)
        shown.append({"filename": name, "subfolder": "", "type": "temp"})
    return shown


def fit_to_image(scores: ScoreMaps, image: torch.Tensor | None) -> ScoreMaps:
    """Check an optional IMAGE against the scores and retarget them to its size."""
    if image is None:
        return scores
    batch = scores.maps.shape[0]
    if image.shape[0] != batch:
        raise AttnSegError(f"image: {image.shape[0]} images but the scores are of {batch}. Connect the image "
                           f"batch that was segmented.")
    size = tuple(image.shape[1:3])
    if size != scores.image_size:
        ratio = (size[1] / size[0]) / (scores.image_size[1] / scores.image_size[0])
        if abs(ratio - 1) > 0.02:
            raise AttnSegError(f"image: {size[1]}x{size[0]} does not have the aspect ratio of the segmented "
                               f"image ({scores.image_size[1]}x{scores.image_size[0]}). Connect the image that "
                               f"was segmented.")
        scores = dataclasses.replace(scores, image_size=size)
    return scores


def legend(names: list[str], width: int) -> torch.Tensor:
    """A (rows * 14, width, 3) strip: one swatch and name per label, background first."""
    colours = (palette(len(names)).numpy() * 255).astype(np.uint8)
    strip = Image.new("RGB", (width, LEGEND_ROW * (len(names) + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for row, (name, colour) in enumerate(zip(["background"] + names, colours)):
        top = row * LEGEND_ROW
        draw.rectangle([2, top + 2, 12, top + 12], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((16, top + 1), name, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(strip).astype(np.float32) / 255.0)


class AttnSegMasks:
    """Score maps -> per-class masks, a label map and a colour preview."""

    DESCRIPTION = ("Each pixel takes the class with the highest score, or background where the background rule "
                   "scores higher. Outputs are at the segmented image's size. The node shows the labels over the "
                   "image and a heat map of the scores, each with a legend, whether or not anything is connected "
                   "to its outputs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scores": (ATTNSEG_SCORES, {"tooltip": "From a segmenter (DiffSegmenter, iSeg, GoCA, Seeds) or a "
                                                   "refiner (Ent-Self)."}),
            "threshold": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Background below this score (DiffSegmenter sweeps 0.3-0.74). With a "
                                               "background map (GoCA's background_classes) it is an offset added "
                                               "to that map and may be negative (GoCA sweeps -0.4..0.4)."}),
            "background": (list(BACKGROUND_RULES), {"default": "threshold", "tooltip": (
                "threshold: background where no class reaches the threshold (iSeg COCO: 0.45). "
                "(1 - max)^2: background scores (1 - best class score)^2, threshold unused (iSeg VOC).")}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Draw the preview over this image (the one that was segmented)."}),
        }}

    RETURN_TYPES = ("MASK", "MASK", "IMAGE", "MASK")
    RETURN_NAMES = ("masks", "label_map", "preview", "soft_masks")
    OUTPUT_TOOLTIPS = ("One mask per class and image, image-major: image 0's classes, then image 1's.",
                       "Class index per pixel (0 background, 1.. in class order), as a float MASK.",
                       "Labels coloured over the image with a legend strip below (H + 14 x (classes + 1) px "
                       "tall, so not for ImageBlend with the input).",
                       "The scores themselves in [0, 1], same order as masks.")
    FUNCTION = "make"
    CATEGORY = MASKS
    OUTPUT_NODE = True  # its preview shows even when nothing downstream saves

    def make(self, scores, threshold, background="threshold", image=None):
        return mask_outputs(scores, threshold, background, image)


def mask_outputs(scores: ScoreMaps, threshold: float, background: str, image, extra: tuple = ()) -> dict:
    """The Masks node's result and previews: (masks, label_map, preview, soft masks) + ``extra``."""
    scores = fit_to_image(scores, image)
    labels, masks, soft = make_masks(scores, threshold, background)
    base = image[..., :3].to(soft.device) if image is not None else None
    strip = legend(scores.class_names, soft.shape[-1]).to(soft)
    with_legend = lambda pictures: torch.cat([pictures, strip.expand(pictures.shape[0], -1, -1, -1)], dim=1)  # noqa: E731
    preview = with_legend(overlay(labels, len(scores.class_names), base))
    heat = with_legend(heat_map(soft))
    shown = save_previews([*preview[:MAX_SHOWN], *heat[:MAX_SHOWN]])
    return {"ui": {"images": shown},
            "result": (masks.cpu(), labels.float().cpu(), preview.cpu(), soft.flatten(0, 1).cpu(), *extra)}


class AttnSegClassMask:
    """The mask of one class, by name, for every image of the batch."""

    DESCRIPTION = ("The mask of one class, picked by name, for every image of the batch: the pixels the Masks node "
                   "would label with that class (highest score, and at least the threshold; plus the segmenter's "
                   "background map where it gives one), at the segmented image's size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scores": (ATTNSEG_SCORES, {"tooltip": "From a segmenter or a refiner."}),
            "class_name": ("STRING", {"default": "", "tooltip": "One of the segmented classes, as written in the "
                                                                "class list (case ignored)."}),
            "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Background below this score, 0-1 (as the Masks node's 'threshold' rule; DiffSegmenter sweeps "
                "0.3-0.74). With a background map (GoCA's background_classes) it is an offset added to that map.")}),
        }}

    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("1 where the class wins, 0 elsewhere; one mask per image, at the segmented image's size.",)
    FUNCTION = "pick"
    CATEGORY = MASKS

    def pick(self, scores, class_name, threshold):
        names = [n.lower() for n in scores.class_names]
        if class_name.strip().lower() not in names:
            raise AttnSegError(f"class_name: '{class_name}' is not one of the segmented classes "
                               f"({', '.join(scores.class_names)}).")
        labels, _, _ = make_masks(scores, threshold)
        return (((labels == names.index(class_name.strip().lower()) + 1).float()).cpu(),)


NODE_CLASS_MAPPINGS = {"AttnSegMasks": AttnSegMasks, "AttnSegClassMask": AttnSegClassMask}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegMasks": "AttnSeg Masks", "AttnSegClassMask": "AttnSeg Class Mask"}
