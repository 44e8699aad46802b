"""Deterministic procedural scenes: coloured shapes on neutral backgrounds.

Each scene comes with a caption ("a red circle and a blue square") and
ground-truth masks, so it can be used both to train a tiny text-to-image model
and to score attention-based segmentation (mIoU).

Only numpy and Pillow are used. Every random choice goes through
``np.random.default_rng(seed)``, so a (seed, width, height, max_objects)
tuple always gives the same scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")

# Saturated colours: every pair is >= 130 apart in RGB, and every colour is
# >= ~135 away from any background tone (neutral greys / beige, see
# _background), so object and background pixels never get confused.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 60, 255),
    "yellow": (250, 250, 0),
    "purple": (140, 0, 210),
    "orange": (255, 120, 0),
}

SUPERSAMPLE = 4          # shapes are rasterised at 4x, then box-downsampled
MIN_SIZE, MAX_SIZE = 0.25, 0.50   # object size as a fraction of min(W, H)
MIN_VISIBLE = 0.40       # visible area / own area required for every object
MIN_COLOUR_IOU = 0.80    # colour_mask must recover each visible region this well
PLACEMENT_TRIES = 50
MAX_NOISE = 12           # per-channel background noise amplitude


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    # The object's full (unoccluded) mask at final resolution: a pixel belongs
    # to the shape if at least half of it is covered.
    mask: np.ndarray = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray            # uint8, H x W x 3
    objects: list[SceneObject]   # in drawing order (later ones on top)
    caption: str
    seed: int

    def label_map(self) -> np.ndarray:
        """int64 H x W: 0 = background, i + 1 = objects[i] (topmost wins)."""
        labels = np.zeros(self.image.shape[:2], dtype=np.int64)
        for i, obj in enumerate(self.objects):
            labels[obj.mask] = i + 1
        return labels

    @property
    def class_names(self) -> list[str]:
        return [obj.name for obj in self.objects]


def _neutral_tone(rng: np.random.Generator) -> np.ndarray:
    """A grey, optionally warmed towards beige; never saturated."""
    grey = rng.uniform(40, 215)
    warmth = rng.uniform(0, 1) if rng.random() < 0.5 else 0.0
    return np.array([grey + 12 * warmth, grey, grey - 28 * warmth])


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Flat tone or a soft two-tone gradient, with optional mild noise."""
    kind = rng.integers(3)       # 0 flat, 1 vertical, 2 horizontal gradient
    top, bottom = _neutral_tone(rng), _neutral_tone(rng)
    if kind == 0:
        t = np.zeros((height, width, 1))
    elif kind == 1:
        t = np.broadcast_to(np.linspace(0, 1, height)[:, None, None], (height, width, 1))
    else:
        t = np.broadcast_to(np.linspace(0, 1, width)[None, :, None], (height, width, 1))
    bg = (1 - t) * top + t * bottom
    if rng.random() < 0.5:
        amp = rng.uniform(0, MAX_NOISE)
        bg = bg + rng.uniform(-amp, amp, size=bg.shape)
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8)


def _outline(shape: str, x0: int, y0: int, size: int) -> list[tuple[float, float]]:
    """Polygon (in final-resolution pixel units) of a shape filling the box
    [x0, x0 + size] x [y0, y0 + size]."""
    cx, cy, r = x0 + size / 2, y0 + size / 2, size / 2
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)
    elif shape == "square":
        pts = np.array([[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size]])
    elif shape == "triangle":
        # Upward, filling the box: base = height = size (sides ~1.12 size),
        # so the base lies on the pixel grid like the square's edges.
        pts = np.array([[cx, y0], [x0 + size, y0 + size], [x0, y0 + size]])
    elif shape == "star":
        # 5 points, first one straight up. Inner radius 0.5 R (a regular
        # star uses 0.38) keeps the arms thick enough to survive antialiasing
        # in small images. R is chosen so the star is exactly as wide as the
        # box (width = 2 R cos 18deg) with its top point on the box's top edge.
        big_r = size / (2 * np.cos(np.pi / 10))
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, big_r, 0.5 * big_r)
        pts = np.stack([cx + rad * np.cos(a), y0 + big_r + rad * np.sin(a)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(float(x), float(y)) for x, y in pts]


def _rasterise(shape: str, x0: int, y0: int, size: int,
               width: int, height: int) -> np.ndarray:
    """Boolean mask of the shape at SUPERSAMPLE x the final resolution."""
    s = SUPERSAMPLE
    # Pillow fills polygons inclusively (a box from 0 to 4 covers 5 pixels), so
    # map the box [x0, x0 + size] onto hi-res pixels s*x0 .. s*(x0 + size) - 1;
    # otherwise squares would leak a faint 1/4-pixel line on two sides.
    k = (s * size - 1) / size
    pts = [(s * x0 + (x - x0) * k, s * y0 + (y - y0) * k)
           for x, y in _outline(shape, x0, y0, size)]
    canvas = Image.new("L", (width * s, height * s), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def _downsample(hi: np.ndarray, width: int, height: int) -> np.ndarray:
    """Box-filter average of a (H*s, W*s, ...) array down to (H, W, ...)."""
    s = SUPERSAMPLE
    # Two single-axis sums are ~3x faster than .mean(axis=(1, 3)) here.
    blocks = hi.reshape(height, s, width, s, *hi.shape[2:])
    return blocks.sum(axis=1, dtype=np.float64).sum(axis=2) / (s * s)


def _to_uint8(hi_image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.clip(np.rint(_downsample(hi_image, width, height)), 0, 255).astype(np.uint8)


def _readable(image: np.ndarray, objects: list[SceneObject]) -> bool:
    """True if, with objects drawn in order, every object keeps at least
    MIN_VISIBLE of its own area and its visible region is recoverable from its
    colour alone (colour_mask IoU >= MIN_COLOUR_IOU). The second condition
    rejects thin occluded slivers (mostly star arms) whose antialiased edges
    would make the colour and the ground truth disagree."""
    labels = Scene(image, objects, "", 0).label_map()
    for i, obj in enumerate(objects):
        visible = labels == i + 1
        if visible.sum() < MIN_VISIBLE * obj.mask.sum():
            return False
        found = colour_mask(image, obj.colour)
        if (visible & found).sum() < MIN_COLOUR_IOU * (visible | found).sum():
            return False
    return True


def make_scene(seed: int, width: int = 64, height: int = 64, max_objects: int = 3) -> Scene:
    """One scene with 1..max_objects objects of distinct colours.

    Objects are placed at random (fully inside the image) and kept only if
    every object stays readable (see _readable); an object that cannot be
    placed in PLACEMENT_TRIES tries is dropped, so a scene may have fewer
    objects than first drawn, but never none.
    """
    if min(width, height) < 16:
        raise ValueError("width and height must be >= 16")
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects must be in 1..{len(COLOURS)}")
    rng = np.random.default_rng(seed)
    colour_names = list(COLOURS)

    bg = _background(rng, width, height)
    n = int(rng.integers(1, max_objects + 1))
    # Distinct colours, so a colour word identifies exactly one object.
    colours = [colour_names[i] for i in rng.choice(len(colour_names), size=n, replace=False)]

    hi_image = np.repeat(np.repeat(bg.astype(np.float64), SUPERSAMPLE, 0), SUPERSAMPLE, 1)
    objects: list[SceneObject] = []
    for colour in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        # Boxes are whole pixels: axis-aligned edges (square sides, triangle
        # base) then stay crisp instead of being a row of half-covered pixels,
        # which would blur the boundary between mask and colour.
        size = int(round(rng.uniform(MIN_SIZE, MAX_SIZE) * min(width, height)))
        for _ in range(PLACEMENT_TRIES):
            # The shape's bounding box lies fully inside the image.
            x0 = int(rng.integers(0, width - size + 1))
            y0 = int(rng.integers(0, height - size + 1))
            hi_mask = _rasterise(shape, x0, y0, size, width, height)
            candidate = hi_image.copy()
            candidate[hi_mask] = COLOURS[colour]
            obj = SceneObject(shape, colour, _downsample(hi_mask, width, height) >= 0.5)
            # The first object is always kept (nothing occludes it; in tiny
            # images a small star may still miss the colour-IoU bar).
            if not objects or _readable(_to_uint8(candidate, width, height), objects + [obj]):
                hi_image = candidate
                objects.append(obj)
                break
        # If no try kept every object readable, this object is dropped.

    image = _to_uint8(hi_image, width, height)
    caption = " and ".join(f"a {o.colour} {o.shape}" for o in objects)
    return Scene(image=image, objects=objects, caption=caption, seed=seed)


def make_dataset(seeds: range | list[int], width: int = 64, height: int = 64,
                 max_objects: int = 3) -> list[Scene]:
    """make_scene for each seed, in order."""
    return [make_scene(int(s), width, height, max_objects) for s in seeds]


def colour_mask(image: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    """Pixels of an H x W x 3 image within `tol` (Euclidean RGB) of a named colour."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {list(COLOURS)}")
    diff = np.asarray(image, dtype=np.float64)[..., :3] - np.array(COLOURS[colour], dtype=np.float64)
    return np.sqrt((diff ** 2).sum(axis=-1)) <= tol
