"""A tiny dataset in PASCAL VOC's layout, drawn from the demo scenes, so the command
line's dataset path (pseudo-labels, evaluate, the Ray engine) runs end to end on
the demo model without a download.

    <root>/JPEGImages/<id>.png                 the scene (lossless, so runs compare exactly)
    <root>/SegmentationClass/<id>.png          palette PNG: 0 background, i = CLASS_NAMES[i],
                                               255 on a one-pixel band each side of every edge
    <root>/ImageSets/Segmentation/{train,val,trainval}.txt
    <root>/class_names.txt                     CLASS_NAMES, one per line (for --class-names)
    <root>/image_labels.json, image_labels.csv the image-level labels (each image's classes)

The held-out demo seeds (0 on; the demo model trained on seeds from 1 000 000)
make the scenes; sizes cycle through square, wide and tall as in the quality
benchmark."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..attnseg.evaluation import IGNORE_LABEL
from ..hosts.diffusers.datasets import save_label_png, write_atomically
from .scenes import COLOURS, SHAPES, Scene, make_scene

CLASS_NAMES = ("background",) + tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
SIZES = ((128, 128), (128, 192), (128, 128), (192, 128))  # (height, width) by seed % 4


def scene(seed: int) -> Scene:
    height, width = SIZES[seed % len(SIZES)]
    return make_scene(seed, width, height)


def truth(item: Scene) -> np.ndarray:
    """(H, W) uint8 dataset ids with VOC's ignore band: a pixel whose 3 x 3
    neighbourhood holds another label is 255."""
    local = item.label_map()
    ids = np.array([0] + [CLASS_NAMES.index(o.name) for o in item.objects], dtype=np.uint8)[local]
    padded = np.pad(ids, 1, mode="edge")
    height, width = ids.shape
    border = np.zeros_like(ids, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            border |= padded[dy:dy + height, dx:dx + width] != ids
    return np.where(border, IGNORE_LABEL, ids).astype(np.uint8)


def image_id(seed: int) -> str:
    return f"scene_{seed:06d}"


def write(root: Path, train: int = 8, val: int = 4) -> list[str]:
    """Writes the dataset (train: seeds 0.., val: the next ones) and returns its ids."""
    root = Path(root)
    splits = {"train": [image_id(s) for s in range(train)],
              "val": [image_id(s) for s in range(train, train + val)]}
    splits["trainval"] = splits["train"] + splits["val"]
    labels = {}
    for seed in range(train + val):
        item = scene(seed)
        name = image_id(seed)
        buffer = io.BytesIO()
        Image.fromarray(item.image).save(buffer, format="PNG")
        write_atomically(root / "JPEGImages" / f"{name}.png", lambda file: file.write(buffer.getvalue()))
        save_label_png(root / "SegmentationClass" / f"{name}.png", truth(item))
        labels[name] = [o.name for o in item.objects]
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "class_names.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
    (root / "image_labels.json").write_text(json.dumps(labels, indent=1))
    with (root / "image_labels.csv").open("w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["image", "classes"])
        rows.writerows([name, ";".join(classes)] for name, classes in labels.items())
    return splits["trainval"]
