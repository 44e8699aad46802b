"""The images the demo templates segment: the shipped picture, or a procedural
scene drawn on the spot, so a template runs without a file in ComfyUI's input/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import make_scene

SHIPPED = "attnseg-demo.png"
RANDOM = "random scene"
CHOICES = (SHIPPED, RANDOM)
SHIPPED_CAPTION, SHIPPED_CLASSES = "a red circle and a blue square", ["red circle", "blue square"]
MIN_SIZE, MAX_SIZE = 64, 1024


def demo_image(choice: str, seed: int, width: int, height: int) -> tuple[np.ndarray, str, list[str]]:
    """(uint8 H x W x 3 image, caption, class names). ``seed``, ``width`` and
    ``height`` only shape a random scene; the shipped picture is 192x128."""
    if choice == SHIPPED:
        with Image.open(Path(__file__).with_name(SHIPPED)) as picture:
            return np.array(picture.convert("RGB")), SHIPPED_CAPTION, list(SHIPPED_CLASSES)
    if choice != RANDOM:
        raise ValueError(f"image: '{choice}' is not one of {', '.join(CHOICES)}")
    for name, size in (("width", width), ("height", height)):
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"{name}: {size} is outside {MIN_SIZE}..{MAX_SIZE} px")
    scene = make_scene(seed, width, height)
    return scene.image, scene.caption, scene.class_names
