"""Scoring segmenters on held-out shape scenes with the demo model.

Labels live in one global space: background plus every "colour shape" name,
so the mIoU is the standard confusion-matrix one (per-class IoU over all
pixels of all images, averaged over the classes that occur), background
included. Thresholds are chosen on a tuning split and applied to the test
split, never picked on the images they are scored on."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from attnseg_pack.attnseg import AttentionStore, SegPrompt
from attnseg_pack.attnseg.fusion import diffsegmenter
from attnseg_pack.attnseg.goca import goca
from attnseg_pack.attnseg.iseg import iseg
from attnseg_pack.attnseg.layers import LayerPick
from attnseg_pack.attnseg.masks import label_map, make_masks
from attnseg_pack.attnseg.presets import PRESETS, Preset
from attnseg_pack.attnseg.scores import ScoreMaps, resize
from attnseg_pack.hosts.comfyui.capture import GOCA_REFERENCE_FACTOR, CapturePlan
from attnseg_pack.hosts.comfyui.concept import segment_concepts
from attnseg_pack.hosts.comfyui.passes import capture_sample, segment_image
from attnseg_pack.hosts.comfyui.presets import segment_with_preset
from attnseg_pack.hosts.comfyui.text import encode_cat_cross, encode_segmentation_prompt
from demo.scenes import COLOURS, SHAPES, Scene, _downsample, _rasterise, colour_mask, make_scene

TEST_SEEDS = range(0, 200)  # training uses seeds from 1_000_000
TUNE_SEEDS = range(50_000, 50_050)
# (height, width) by seed % 4: half the scenes are non-square, both orientations.
SIZES = ((128, 128), (128, 192), (128, 128), (192, 128))
LABELS = ["background"] + [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 19))
# GoCA's presets label against a background map plus an offset, which its authors sweep over -0.4..0.4.
OFFSETS = tuple(round(0.1 * i, 1) for i in range(-4, 5))
TIMESTEPS = [100]
# The segmentation pass runs at twice the scene's size, as DiffSegmenter and iSeg
# upscale images to 512 px for SD1.5: the attention maps get twice as fine. Chosen
# on the tuning scenes (the demo weights: 0.757 at the scene's size, 0.807 at 2x);
# one table row scores the scene's own size.
SEGMENT_SCALE = 2
# The tokens of a "colour shape" class to score with: both (the class as the
# user names it), or one word alone, to see which words localise.
TOKEN_PARTS = {"colour + shape": slice(None), "colour": slice(0, 1), "shape": slice(-1, None)}


def scene(seed: int) -> Scene:
    height, width = SIZES[seed % len(SIZES)]
    return make_scene(seed, width, height)


def truth_labels(item: Scene) -> torch.Tensor:
    """(H, W) int64 ids into LABELS (topmost object wins)."""
    local = torch.from_numpy(item.label_map())
    lookup = torch.tensor([0] + [LABELS.index(o.name) for o in item.objects])
    return lookup[local]


class Confusion:
    """A LABELS x LABELS pixel count matrix (rows: truth, columns: prediction)."""

    def __init__(self) -> None:
        self.matrix = torch.zeros(len(LABELS), len(LABELS), dtype=torch.int64)

    def add(self, truth: torch.Tensor, prediction: torch.Tensor) -> None:
        index = truth.flatten() * len(LABELS) + prediction.flatten()
        self.matrix += torch.bincount(index, minlength=len(LABELS) ** 2).view(len(LABELS), len(LABELS))

    def iou(self) -> torch.Tensor:
        """Per-label IoU; NaN for labels neither present nor predicted."""
        hits = self.matrix.diag().double()
        union = self.matrix.sum(0).double() + self.matrix.sum(1).double() - hits
        return torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, float("nan")))

    def miou(self) -> float:
        return float(self.iou().nanmean())


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[AttentionStore], ScoreMaps] | None
    token_parts: tuple[str, ...] = ("colour + shape",)
    capture: str = "plain"  # a key of CAPTURES
    preset: Preset | None = None  # run end to end as AttnSeg Segment runs it (its own prompt and passes)
    # A method with passes of its own (ConceptAttention): (model, clip, vae, scene, token part) -> ScoreMaps.
    direct: Callable | None = None


# iSeg's paper preset weighs SD1.5's 16x16 and 32x32 cross-attention 0.7 / 0.3 (4x
# and 2x below its latent); this model's two cross-attention levels, the coarse one
# (2x below the latent: 8x8 for a 128-px image) and the fine one (1x), take those weights.
def _iseg(iterations: int, variant: str = "code", lam: float = 0.015, factors=(2, 1), weights=(0.7, 0.3)):
    return lambda store: iseg(store, lam, iterations, variant, factors, weights)


# The demo model's coarse level localises; its fine one hardly does (see the
# table). Besides each paper preset, the table scores DiffSegmenter with weights
# chosen on the tuning scenes and iSeg on the coarse level alone.
DEMO_LEVEL = dict(factors=(2,), weights=(1.0,))
DEMO_WEIGHTS = (0.7, 0.3)  # DiffSegmenter weights, coarsest first
# The quality benchmark's tuned threshold for DiffSegmenter with DEMO_WEIGHTS (at twice
# the scene's size); generate() applies it to its samples' masks too.
DEMO_THRESHOLD = 0.6


def _plain(clip, text, classes):
    return encode_segmentation_prompt(clip, text, classes)[0]


# GoCA's captures: every layer's self-attention and the reference queries, heads by output share or mean.
GOCA_AUTO_HEADS = CapturePlan(cross_heads="auto", self_every_layer=True, reference_factor=GOCA_REFERENCE_FACTOR)
GOCA_MEAN_HEADS = dataclasses.replace(GOCA_AUTO_HEADS, cross_heads="mean")

# How each capture encodes the scene's caption and classes, what it records, and at
# what multiple of the scene's size it runs.
CAPTURES = {
    "plain": (_plain, CapturePlan(), SEGMENT_SCALE),
    "plain, scene size": (_plain, CapturePlan(), 1),
    "cat-cross keys": (lambda clip, text, classes: encode_cat_cross(clip, text, classes, 1.6, "keys")[0],
                       CapturePlan(), SEGMENT_SCALE),
    "cat-cross embedding": (lambda clip, text, classes: encode_cat_cross(clip, text, classes, 1.6, "embedding")[0],
                            CapturePlan(), SEGMENT_SCALE),
    "goca auto heads": (_plain, GOCA_AUTO_HEADS, SEGMENT_SCALE),
    "goca mean heads": (_plain, GOCA_MEAN_HEADS, SEGMENT_SCALE),
}


def _goca(layers: str = "auto", rescaling: bool = True, order: int = 2):
    return lambda store: goca(store, layers, rescaling, order=order)


def adapted(name: str, change: str, settings: dict = {}, capture: dict = {}) -> Method:  # noqa: B006 (read only)
    """A released-code preset moved onto the demo model, whose UNet is a smaller
    copy of SD1.5's: two attention levels (the latent's size and half of it) where
    SD has four, two heads per layer, one encoder layer per level. ``change`` says
    what had to move."""
    chosen = PRESETS[name]
    moved = dataclasses.replace(chosen, settings=dataclasses.replace(chosen.settings, **settings),
                                capture=dataclasses.replace(chosen.capture, **capture))
    return Method(f"{name}, on the demo model: {change}", None, preset=moved)


# SD's 16x16 and 32x32 levels (4x and 2x below its latent) are the demo's coarse and fine levels.
_ISEG_DEMO = dict(settings=dict(factors=(2, 1)), capture=dict(cross_layers=None, cross_head_lists=(), self_heads=None))
_ISEG_CHANGE = "its two levels for SD's 16x16 and 32x32, every head"
PRESET_METHODS = (
    Method("DiffSegmenter (demo model, tuned) preset", None, preset=PRESETS["DiffSegmenter (demo model, tuned)"]),
    Method("DiffSegmenter (released code) preset", None, preset=PRESETS["DiffSegmenter (released code)"]),
    Method("DiffSegmenter (paper, 4 timesteps) preset", None, preset=PRESETS["DiffSegmenter (paper, 4 timesteps)"]),
    adapted("iSeg VOC (released code)", _ISEG_CHANGE + " (the demo has 2 per layer, the VOC lists pick SD2.1's 20)",
            **_ISEG_DEMO),
    adapted("iSeg COCO (released code)", _ISEG_CHANGE, **_ISEG_DEMO),
    adapted("iSeg (paper text)", _ISEG_CHANGE, **_ISEG_DEMO),
    adapted("GoCA SD1.5 (released code)", "propagation over the demo's one encoder layer at the finest level "
            "in place of SD1.5's second", dict(propagation_layers=(LayerPick("output", 0, 0), LayerPick("output", 0, 1),
                                                                   LayerPick("input", 0, 0)))),
)


METHODS = (
    Method("cross-attention (DiffSegmenter fusion, paper weights)",
           lambda store: diffsegmenter(store, self_completion=False), tuple(TOKEN_PARTS)),
    Method("DiffSegmenter (fusion + completion, paper weights)", lambda store: diffsegmenter(store),
           tuple(TOKEN_PARTS)),
    Method("cross-attention (fusion, demo weights 0.7 x coarse + 0.3 x fine level)",
           lambda store: diffsegmenter(store, DEMO_WEIGHTS, self_completion=False),
           tuple(TOKEN_PARTS)),
    Method("DiffSegmenter (fusion + completion, demo weights)", lambda store: diffsegmenter(store, DEMO_WEIGHTS),
           tuple(TOKEN_PARTS)),
    Method("DiffSegmenter (fusion + completion, demo weights), at the scene's own size",
           lambda store: diffsegmenter(store, DEMO_WEIGHTS), tuple(TOKEN_PARTS), "plain, scene size"),
    # Each level alone, to see which words localise where.
    *(Method(f"DiffSegmenter, {level} level + completion", lambda store, w=weights: diffsegmenter(store, w),
             tuple(TOKEN_PARTS)) for level, weights in (("coarse", (1.0, 0.0)), ("fine", (0.0, 1.0)))),
    Method("iSeg, SD's level weights (0.7 x coarse + 0.3 x fine level), Ent-Self code, lambda 0.015, N = 10 "
           "(the VOC values)", _iseg(10, "code", 0.015)),
    Method("iSeg coarse level, N = 0 (cross-attention only)", _iseg(0, **DEMO_LEVEL)),
    Method("iSeg coarse level, naive iteration, N = 1 (the iseg-segment workflow)", _iseg(1, "naive", **DEMO_LEVEL)),
    Method("iSeg coarse level, naive iteration, N = 10", _iseg(10, "naive", **DEMO_LEVEL)),
    *(Method(f"iSeg coarse level, Ent-Self code, lambda 0.015, N = {n}", _iseg(n, "code", 0.015, **DEMO_LEVEL),
             tuple(TOKEN_PARTS) if n == 10 else ("colour + shape",)) for n in (1, 2, 5, 10)),
    Method("iSeg coarse level, Ent-Self code, lambda 0.1, N = 1",
           _iseg(1, "code", 0.1, **DEMO_LEVEL)),
    Method("iSeg coarse level, Ent-Self paper, lambda 0.01, N = 10 (the paper's values)",
           _iseg(10, "paper", 0.01, **DEMO_LEVEL)),
    Method("iSeg coarse level, Ent-Self code, lambda 0.1, N = 1, Cat-Cross keys",
           _iseg(1, "code", 0.1, **DEMO_LEVEL), capture="cat-cross keys"),
    Method("iSeg coarse level, Ent-Self code, lambda 0.1, N = 1, Cat-Cross embedding",
           _iseg(1, "code", 0.1, **DEMO_LEVEL), capture="cat-cross embedding"),
    Method("GoCA (auto heads, auto layers, rescaling, k = 2)", _goca(), tuple(TOKEN_PARTS), "goca auto heads"),
    Method("GoCA, head mean", _goca(), capture="goca mean heads"),
    Method("GoCA, uniform layers", _goca("uniform"), capture="goca auto heads"),
    Method("GoCA, no rescaling", _goca(rescaling=False), capture="goca auto heads"),
    Method("GoCA, no propagation (k = 0)", _goca(order=0), capture="goca auto heads"),
    Method("GoCA, every stage off (mean over heads and layers)", _goca("uniform", False, 0),
           capture="goca mean heads"),
)


def restrict_tokens(prompt: SegPrompt, part: str) -> SegPrompt:
    """The prompt metadata with each class reduced to some of its tokens."""
    pick = TOKEN_PARTS[part]
    classes = tuple(dataclasses.replace(c, positions=c.positions[pick]) for c in prompt.classes)
    return dataclasses.replace(prompt, classes=classes)


def capture(model, clip, vae, item: Scene, kind: str = "plain", timesteps=TIMESTEPS) -> AttentionStore:
    """One segmentation pass over the scene, prompted with its caption and its object names."""
    encode, plan, scale = CAPTURES[kind]
    conditioning = encode(clip, item.caption, ", ".join(o.name for o in item.objects))
    image = torch.from_numpy(item.image).float().div(255)[None]
    return segment_image(model, vae, image, conditioning, list(timesteps), 0, scale * max(item.image.shape[:2]), plan)


@dataclass
class Scores:
    """Confusion matrices per (method, token part, threshold) and seconds spent."""

    confusion: dict[tuple[str, str, float], Confusion] = dataclasses.field(default_factory=dict)
    capture_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    method_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    capture_of: dict[str, str] = dataclasses.field(default_factory=dict)
    images: int = 0

    def miou(self, method: str, part: str, threshold: float) -> float:
        return self.confusion[(method, part, threshold)].miou()

    def best_threshold(self, method: str, part: str) -> float:
        found = [t for (m, p, t) in self.confusion if m == method and p == part]
        return max(found, key=lambda t: self.miou(method, part, t))

    def seconds_per_image(self, method: str) -> float:
        capture = self.capture_seconds[self.capture_of[method]]
        return (capture + self.method_seconds[method]) / max(self.images, 1)


def candidate_thresholds(method: str, part: str) -> tuple[float, ...]:
    """The thresholds tuned over: background offsets for GoCA's presets, else 0.1..0.9."""
    found = next((m for m in METHODS + PRESET_METHODS if m.name == method), None)
    return OFFSETS if found is not None and found.preset is not None and found.preset.method == "goca" else THRESHOLDS


def score(model, clip, vae, scenes: list[Scene], methods=METHODS,
          thresholds: Callable[[str, str], tuple[float, ...]] = candidate_thresholds,
          timesteps=TIMESTEPS) -> Scores:
    """Segment every scene with every method and token part, at each threshold."""
    result = Scores()
    for item in scenes:
        stores = {}
        for kind in dict.fromkeys(m.capture for m in methods if m.preset is None and m.direct is None):
            began = time.perf_counter()
            stores[kind] = capture(model, clip, vae, item, kind, timesteps)
            result.capture_seconds[kind] = result.capture_seconds.get(kind, 0.0) + time.perf_counter() - began
        truth = truth_labels(item)
        lookup = torch.tensor([0] + [LABELS.index(o.name) for o in item.objects])
        for method in methods:
            store = stores.get(method.capture)
            own_passes = method.preset is not None or method.direct is not None
            result.capture_of[method.name] = method.name if own_passes else method.capture
            for part in method.token_parts:
                began = time.perf_counter()
                if method.preset is not None:  # its own passes, timed as the method's
                    maps = run_preset(model, clip, vae, item, method.preset)
                    result.capture_seconds.setdefault(method.name, 0.0)
                elif method.direct is not None:
                    maps = method.direct(model, clip, vae, item, part)
                    result.capture_seconds.setdefault(method.name, 0.0)
                else:
                    maps = method.run(dataclasses.replace(store, prompt=restrict_tokens(store.prompt, part)))
                scores = maps.at_image_size()[0:1].clamp(0, 1)
                background = None if maps.background is None else resize(maps.background, maps.image_size)
                if part == "colour + shape":  # what a user runs; the other parts are diagnostics
                    result.method_seconds[method.name] = (result.method_seconds.get(method.name, 0.0)
                                                          + time.perf_counter() - began)
                for threshold in thresholds(method.name, part):
                    key = (method.name, part, threshold)
                    if key not in result.confusion:
                        result.confusion[key] = Confusion()
                    rule = method.preset.background if method.preset is not None else "threshold"
                    labels = label_map(scores, threshold, rule, background_map=background)
                    result.confusion[key].add(truth, lookup[labels[0]])
        result.images += 1
    return result


def run_preset(model, clip, vae, item: Scene, chosen: Preset) -> ScoreMaps:
    """The preset as AttnSeg Segment runs it (its own prompt template), at SEGMENT_SCALE x the scene's size."""
    image = torch.from_numpy(item.image).float().div(255)[None]
    return segment_with_preset(model, clip, vae, image, ", ".join(o.name for o in item.objects), chosen,
                               resolution=SEGMENT_SCALE * max(item.image.shape[:2]))


def reference_mious(scenes: list[Scene]) -> dict[str, float]:
    """The mIoU of three labellings that read no attention, for scale: every pixel
    background; the true objects all labelled as the scene's first one (objects
    found, not told apart); and each true object labelled as the scene's first
    object of its shape (what shape alone tells: a scene may hold two objects of
    one shape but never two of one colour)."""
    background, merged, same_shape = Confusion(), Confusion(), Confusion()
    for item in scenes:
        truth = truth_labels(item)
        background.add(truth, torch.zeros_like(truth))
        merged.add(truth, torch.where(truth > 0, LABELS.index(item.objects[0].name), 0))
        first_of_shape = {}
        for obj in item.objects:
            first_of_shape.setdefault(obj.shape, obj.name)
        lookup = torch.tensor([0] + [LABELS.index(first_of_shape[obj.shape]) for obj in item.objects])
        same_shape.add(truth, lookup[torch.from_numpy(item.label_map())])
    return {"all background": round(background.miou(), 4), "objects not told apart": round(merged.miou(), 4),
            "same-shape objects not told apart": round(same_shape.miou(), 4)}


def object_names(caption: str) -> list[str]:
    return [part.removeprefix("a ").strip() for part in caption.split(" and ")]


def generate(model, clip, vae, caption: str, seed: int, cfg: float = 5.0, steps: int = 20, dit: bool = False):
    """A 128-px sample of ``caption`` with capture on: (image uint8 H x W x 3, masks (C, H, W)
    bool from DiffSegmenter on the sample's own attention, the demo weights; ``dit``: the
    DiT demo's, as its generate-and-segment workflow: every block's I2T completed with
    the single blocks' I2I, scheduler simple)."""
    positive, _ = encode_segmentation_prompt(clip, caption, ", ".join(object_names(caption)))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    plan, scheduler = (CapturePlan(self_every_layer=True), "simple") if dit else (CapturePlan(), "normal")
    with torch.inference_mode():  # as ComfyUI runs nodes
        out, store = capture_sample(model, seed, steps, cfg, "euler", scheduler, positive, negative, latent, 1.0,
                                    plan)
        image = (vae.decode(out["samples"])[0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    if dit:
        single = frozenset((k.block, k.block_id) for k, _ in store.layers("self") if k.block == "single")
        scores, threshold = diffsegmenter(with_blocks(store, self=single), (1.0,)), DIT_THRESHOLD
    else:
        scores, threshold = diffsegmenter(store, DEMO_WEIGHTS), DEMO_THRESHOLD
    _, masks, _ = make_masks(scores, threshold)
    return image, masks.numpy() > 0


def share_inside(image: np.ndarray, caption: str, region: torch.Tensor) -> float | None:
    """The share of the pixels painted in the caption's colours that lie in ``region``
    ((h, w) in [0, 1], any size: nearest-resized to the image); None when nothing is."""
    paint = np.zeros(image.shape[:2], bool)
    for name in object_names(caption):
        paint |= colour_mask(image, name.split()[0])
    if not paint.any():
        return None
    region = torch.nn.functional.interpolate(region.float()[None, None], size=paint.shape, mode="nearest")[0, 0]
    return float(region[torch.from_numpy(paint)].mean())


def drawn(image: np.ndarray, masks: np.ndarray, caption: str) -> list[tuple[str, bool, str]]:
    """Per named object: (name, drawn, why). Drawn = its colour covers >= 2% of the
    image and more than any colour the caption does not name, and mostly (> 50%)
    lies inside the object's own mask."""
    names = object_names(caption)
    colours = [name.split()[0] for name in names]
    strongest_other = max(colour_mask(image, c).mean() for c in COLOURS if c not in colours)
    out = []
    for index, (name, colour) in enumerate(zip(names, colours)):
        paint = colour_mask(image, colour)
        inside = (paint & masks[index]).sum() / max(paint.sum(), 1)
        ok = paint.mean() >= max(0.02, strongest_other) and inside > 0.5
        out.append((name, bool(ok), f"area {paint.mean():.3f}, inside its mask {inside:.2f}"))
    return out



# A component must fill this share of its best-fitting shape template (IoU) to count as that shape.
SHAPE_FIT = 0.6
MIN_COMPONENT = 0.01  # of the image: smaller specks are not objects


def shape_of(component: np.ndarray) -> tuple[str | None, float]:
    """The demo shape a connected component (H x W bool) best fits, and the fit
    (IoU with that shape rasterised into the component's box, as the scenes draw
    it: as wide as the box, top-aligned); None below SHAPE_FIT."""
    rows, cols = np.nonzero(component)
    y0, x0 = rows.min(), cols.min()
    size = max(cols.max() - x0 + 1, rows.max() - y0 + 1)
    height, width = component.shape
    fits = {}
    for shape in SHAPES:
        template = _downsample(_rasterise(shape, int(x0), int(y0), int(size), width, height), width, height) >= 0.5
        union = (template | component).sum()
        fits[shape] = (template & component).sum() / max(union, 1)
    best = max(fits, key=fits.get)
    return (best if fits[best] >= SHAPE_FIT else None), float(fits[best])


def shapes_drawn(image: np.ndarray) -> list[str]:
    """Every demo shape drawn in ``image``, whatever its colour: the connected
    components of each palette colour, each named by the template it fits."""
    found = []
    for colour in COLOURS:
        components, count = ndimage.label(colour_mask(image, colour))
        for index in range(1, count + 1):
            component = components == index
            if component.mean() >= MIN_COMPONENT:
                shape, _ = shape_of(component)
                if shape is not None:
                    found.append(shape)
    return found


def shapes_present(image: np.ndarray, caption: str) -> list[bool]:
    """Per named object: whether a shape of its kind is drawn (in any colour; each
    drawn shape answers for one object). A prompt-adherence score that does not
    depend on the demo model's colour binding, which is weaker than its shapes."""
    available = shapes_drawn(image)
    present = []
    for name in object_names(caption):
        shape = name.split()[-1]
        present.append(shape in available)
        if shape in available:
            available.remove(shape)
    return present

# The DiT demo model (hosts/comfyui/demo_dit.py): one resolution (the patch grid), so
# block groups stand where the UNet has levels. Its methods read one capture: every
# block's I2T (image queries x text keys) and I2I (image x image) parts of the joint
# attention, head mean (a DiT's only reduction: GoCA's Flux setting), and the image
# tokens' attention output at GoCA's reference block (the middle one on this model).
DIT_PLAN = CapturePlan(self_every_layer=True, reference_factor=GOCA_REFERENCE_FACTOR)
# The DiT demo's segmentation pass: one at t = 400 (sigma 0.4), not the UNet's 100.
# This model reads its words where they decide the picture: at t = 100 the image all
# but tells itself and its I2T barely localises. benchmarks/dit_segmentation_quality.py
# sweeps DIT_TIMESTEP_CANDIDATES on the tuning scenes (its first table) and reports
# whether this is still their best.
DIT_TIMESTEPS = [400]
# The best DiT method's threshold on the tuning scenes (the flux-demo workflows' too).
DIT_THRESHOLD = 0.5
DIT_TIMESTEP_CANDIDATES = ([100], [300], [400], [500], [600], [700], [800], [400, 600], [500, 700])
CAPTURES["dit"] = (_plain, DIT_PLAN, SEGMENT_SCALE)
DIT_BACKGROUND_CONCEPT = "background"  # ConceptAttention's background word (labels by argmax against it)


def dit_block_groups(blocks: list[tuple[str, int]]) -> dict[str, frozenset[tuple[str, int]]]:
    """{name: blocks}: all blocks, the double ones, the single ones and each block alone
    (``blocks``: (type, index) as DiTInfo.blocks() lists them)."""
    groups = {"all blocks": frozenset(blocks)}
    for kind in dict.fromkeys(kind for kind, _ in blocks):
        groups[f"{kind} blocks"] = frozenset(b for b in blocks if b[0] == kind)
    groups.update({f"{kind} {index}": frozenset({(kind, index)}) for kind, index in blocks})
    return groups


def with_blocks(store: AttentionStore, cross=None, self=None) -> AttentionStore:
    """The store with only the I2T maps of the ``cross`` blocks and the I2I maps of the
    ``self`` blocks (None: that kind as captured); other entries (GoCA's reference) kept."""
    wanted = {"cross": cross, "self": self}

    def kept(key) -> bool:
        blocks = wanted.get(key.kind)
        return blocks is None or (key.block, key.block_id) in blocks

    return dataclasses.replace(store, entries={k: v for k, v in store.entries.items() if kept(k[0])})


def dit_i2t(store: AttentionStore, blocks) -> ScoreMaps:
    """I2T of ``blocks``: each class the mean of its tokens' maps, averaged over the
    blocks (one resolution: DiffSegmenter's fusion with one weight), min-max per class."""
    return diffsegmenter(with_blocks(store, cross=blocks), (1.0,), self_completion=False)


def _dit_concept(blocks: tuple[int, ...], timestep: float):
    """ConceptAttention (output space) over the scene at SEGMENT_SCALE x its size, the
    caption as the prompt, each class's words (of the token part) encoded alone as its
    concept, plus a background concept: the object classes' probabilities as maps, the
    background concept's as the background map (offset 0 = the authors' argmax)."""
    pick = TOKEN_PARTS

    def run(model, clip, vae, item: Scene, part: str) -> ScoreMaps:
        words = [" ".join(o.name.split()[pick[part]]) for o in item.objects]
        unique = list(dict.fromkeys(words))  # two objects of one shape share the shape word's concept
        names = ", ".join(o.name for o in item.objects)
        positive = encode_segmentation_prompt(clip, item.caption, names)[0]
        image = torch.from_numpy(item.image).float().div(255)[None]
        maps = segment_concepts(model, clip, vae, image, positive, ", ".join(unique + [DIT_BACKGROUND_CONCEPT]),
                                blocks, timestep, 0, SEGMENT_SCALE * max(item.image.shape[:2]))
        objects = maps.maps[:, [unique.index(w) for w in words]]
        return dataclasses.replace(maps, maps=objects, class_names=[o.name for o in item.objects],
                                   background=maps.maps[:, -1:])

    return run


# ConceptAttention's own passes: the authors' t = 500 and the I2T rows' last timestep.
CONCEPT_TIMESTEPS = tuple(dict.fromkeys((500, DIT_TIMESTEPS[-1])))


def dit_methods(blocks: list[tuple[str, int]]) -> tuple[Method, ...]:
    """The DiT benchmark's methods for a model of ``blocks`` ((type, index) pairs)."""
    groups = dit_block_groups(blocks)
    every = groups["all blocks"]
    doubles = tuple(index for kind, index in blocks if kind == "double")
    parts = tuple(TOKEN_PARTS)

    def on(cross, run):  # ``run`` on the store with the I2T of ``cross`` only (I2I of every block)
        return lambda store: run(with_blocks(store, cross=cross))

    def ent(n: int, variant: str = "code", lam: float = 0.015):
        return lambda store: iseg(store, lam, n, variant)

    main_groups = [g for g in groups if g.endswith("blocks")]
    return (
        *(Method(f"I2T, {group}", lambda store, b=groups[group]: dit_i2t(store, b), parts, "dit") for group in groups),
        *(Method(f"DiffSegmenter: I2T of {group} + completion with every block's I2I",
                 on(groups[group], lambda store: diffsegmenter(store, (1.0,))), parts, "dit") for group in main_groups),
        Method("DiffSegmenter: I2T of all blocks + completion with the single blocks' I2I",
               lambda store: diffsegmenter(with_blocks(store, self=groups.get("single blocks", every)), (1.0,)),
               capture="dit"),
        Method("iSeg: I2T of all blocks (per-token L1), N = 0 (no refinement)", on(every, ent(0)), capture="dit"),
        Method("iSeg: all blocks, naive iteration (I2I of every block), N = 1", on(every, ent(1, "naive")),
               capture="dit"),
        Method("iSeg: all blocks, naive iteration, N = 10", on(every, ent(10, "naive")), capture="dit"),
        *(Method(f"iSeg: I2T of {group}, Ent-Self code, lambda 0.015, N = {n}", on(groups[group], ent(n)),
                 parts if group == "all blocks" else ("colour + shape",), "dit")
          for group in main_groups for n in (1, 10)),
        Method("iSeg: all blocks, Ent-Self code, lambda 0.1, N = 1", on(every, ent(1, lam=0.1)), capture="dit"),
        Method("iSeg: all blocks, Ent-Self paper, lambda 0.01, N = 10 (the paper's values)",
               on(every, ent(10, "paper", 0.01)), capture="dit"),
        Method("GoCA (head mean, auto layers, rescaling, k = 2)", _goca(), parts, "dit"),
        Method("GoCA, uniform layers", _goca("uniform"), capture="dit"),
        Method("GoCA, no rescaling", _goca(rescaling=False), capture="dit"),
        Method("GoCA, no propagation (k = 0)", _goca(order=0), capture="dit"),
        Method("GoCA, every stage off (mean over blocks)", _goca("uniform", False, 0), capture="dit"),
        *(Method(f"ConceptAttention (output space), double blocks, t = {t}, + background concept{label}", None,
                 parts if t == CONCEPT_TIMESTEPS[0] and not label else ("colour + shape",),
                 direct=_dit_concept(doubles, float(t)))
          for t in CONCEPT_TIMESTEPS for label in ("", ", argmax")),
    )


def dit_thresholds(method: str, part: str) -> tuple[float, ...]:
    """ConceptAttention labels against its background concept: offsets on it (0 alone
    for the argmax rows); every other DiT method thresholds min-max maps."""
    if method.startswith("ConceptAttention"):
        return (0.0,) if method.endswith("argmax") else OFFSETS
    return THRESHOLDS
