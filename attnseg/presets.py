"""The authors' configurations, as named presets.

Each preset fixes every knob its source fixes: the prompt, the layers and heads
captured, the timesteps and resolution, the method's parameters and the
labelling rule. Values come from the released code (repository and script in
``source``); where the code and the paper differ there is a preset for each.
Layers are named by place (:class:`LayerPick`), so a preset reads the same
layers on every model of the family it was made for and refuses a model that
lacks them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .diffseg import DIFFSEG_TIMESTEP, DiffSegSettings
from .errors import AttnSegError
from .layers import LayerPick
from .scfg import RATE_LIMITS, RELEASED_BLUR
from .tokens import GOCA_BACKGROUND, goca_template_prompt, template_prompt

CUSTOM = "custom"

# iSeg's hand-picked cross-attention heads (VOC scripts), by layer: SD2.1-base
# has 20 heads in each 16x16 layer and 10 in each 32x32 one. The released code
# lists them as flat indices over the layers in execution order.
ISEG_VOC_HEADS_16 = (
    (LayerPick("input", 2, 0), (0, 1, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19)),
    (LayerPick("input", 2, 1), (0, 2, 4, 7, 8, 10, 12, 13, 14)),
    (LayerPick("output", 2, 0), (1, 3, 4, 6, 7, 11, 12, 18, 19)),
    (LayerPick("output", 2, 1), (0, 16, 17, 18)),
    (LayerPick("output", 2, 2), (1, 3, 7, 8, 13, 14, 16)),
)
ISEG_VOC_HEADS_32 = (
    (LayerPick("input", 1, 1), (5, 6, 8)),
    (LayerPick("output", 1, 0), (3,)),
    (LayerPick("output", 1, 1), (1, 2, 5, 7, 8)),
)
# The cross-attention layers iSeg fuses: every 16x16 layer, and three of the 32x32 ones.
ISEG_CROSS_LAYERS = (LayerPick("input", 2), LayerPick("output", 2),
                     *(pick for pick, _ in ISEG_VOC_HEADS_32))
# Ent-Self reads one layer: the last decoder level's second transformer
# (SD2.1 up_blocks[3].attentions[1].attn1), heads 1 and 2.
ISEG_SELF_LAYER = (LayerPick("output", 0, 1),)
ISEG_SELF_HEADS = (1, 2)
ISEG_BACKGROUND_WORDS = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water")
ISEG_COCO_BACKGROUND_WORDS = ISEG_BACKGROUND_WORDS + ("river", "sea", "railway")

# GoCA's propagation layers. SD1.5: the decoder's first two 64x64 transformers and
# the encoder's second (up_blocks[3].attentions[0, 1], down_blocks[0].attentions[1]).
GOCA_SD15_PROPAGATION = (LayerPick("output", 0, 0), LayerPick("output", 0, 1), LayerPick("input", 0, 1))
# SDXL (finest attention level, 64x64 at 1024 px): up_blocks[1] attentions 0 and 1
# (both depths) and attention 2 depth 0; down_blocks[1].attentions[0] (both depths).
GOCA_SDXL_PROPAGATION = tuple(LayerPick("output", 0, i) for i in range(5)) + (
    LayerPick("input", 0, 0), LayerPick("input", 0, 1))


@dataclass(frozen=True)
class Source:
    repository: str
    script: str
    reported: str  # the number the preset is meant to reproduce, with its protocol


@dataclass(frozen=True)
class TextSetup:
    """How the classes become a prompt. ``template``: "diffsegmenter" ('a photograph
    of {c1} and {c2}'), "iseg" (+ 'and other object and background, ' and the
    background words) or "goca" (+ ', background', a background class);
    ``per_class``: one prompt and one pass per class (DiffSegmenter's code)."""

    template: str = "diffsegmenter"
    class_weight: float = 1.0
    fuse_ing: bool = True
    cat_cross_gamma: float = 1.0
    cat_cross_mode: str = "embedding"
    background_words: tuple[str, ...] = ()
    per_class: bool = False


def preset_prompts(text: TextSetup, prompt: str, names: list[str]) -> list[tuple[str, str, list[str]]]:
    """The prompts a preset's text setup asks a host to encode, as (kind, prompt, class
    names): kind "cat_cross" (iSeg's Cat-Cross encoding, an empty prompt its template) or
    "segmentation" (an empty prompt DiffSegmenter's template). One for all the classes,
    or one per class (in class order) when the preset prompts each class alone and no
    prompt is given; GoCA's template adds its background class."""
    if text.per_class and not prompt.strip():
        return [("segmentation", template_prompt([name]), [name]) for name in names]
    if text.template == "iseg":
        return [("cat_cross", prompt, list(names))]
    if text.template == "goca":
        return [("segmentation", prompt.strip() or goca_template_prompt(names), list(names) + [GOCA_BACKGROUND])]
    return [("segmentation", prompt, list(names))]


@dataclass(frozen=True)
class CaptureSetup:
    """What one pass over the image records (see the host's CapturePlan)."""

    timesteps: tuple[int, ...] = (100,)
    resolution: int = 512
    seed: int = 0
    heads: str = "mean"  # "mean" or "auto" (GoCA's output-weighted heads)
    self_every_layer: bool = False
    self_layers: tuple[LayerPick, ...] | None = None  # None: the finest level
    self_heads: tuple[int, ...] | None = None
    cross_layers: tuple[LayerPick, ...] | None = None  # None: every layer
    cross_head_lists: tuple[tuple[LayerPick, tuple[int, ...]], ...] = ()
    reference: LayerPick | None = None  # GoCA's reference layer (its queries are stored)
    keep_timesteps: bool = False


@dataclass(frozen=True)
class DiffSegmenterSettings:
    weights: tuple[float, ...] = (0.3, 0.5, 0.1, 0.1)
    self_completion: bool = True
    timestep_average: str = "final maps"


@dataclass(frozen=True)
class ISegSettings:
    factors: tuple[int, ...] = (4, 2)
    weights: tuple[float, ...] = (0.7, 0.3)
    smoothing_iterations: int = 20
    clusters: int = 32
    lam: float = 0.015
    iterations: int = 10
    variant: str = "code"
    clamp_max: float | None = None


@dataclass(frozen=True)
class GoCASettings:
    layer_weights: str = "auto"
    rescaling: bool = True
    blur: int = 5
    order: int = 2
    propagation_layers: tuple[LayerPick, ...] | None = GOCA_SD15_PROPAGATION
    aggregate_factor: int = 1  # maps are aggregated at the latent size / this


@dataclass(frozen=True)
class ConceptSettings:
    """ConceptAttention: the double blocks whose maps are averaged, the noise level (of 1000)."""

    blocks: tuple[int, ...] = (15, 16, 17, 18)
    timestep: float = 500.0


@dataclass(frozen=True)
class SCFGPresetSettings:
    rate_min: float = RATE_LIMITS[0]
    rate_max: float = RATE_LIMITS[1]
    blur: int = RELEASED_BLUR
    foreground: str = "released"  # the sum of the non-BOS token maps against BOS, on the uncond half


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # "diffsegmenter", "iseg", "goca", "concept", "seeds" or "scfg"
    source: Source
    settings: object
    text: TextSetup = field(default_factory=TextSetup)
    capture: CaptureSetup = field(default_factory=CaptureSetup)
    threshold: float = 0.5
    background: str = "threshold"  # the Masks node's rule
    family: str = "unet"  # the models it was made for: "unet" (SD1.x/2.x/XL), "flux" or "sd3"


_ISEG_CAPTURE = CaptureSetup(seed=1101, self_layers=ISEG_SELF_LAYER, self_heads=ISEG_SELF_HEADS,
                             cross_layers=ISEG_CROSS_LAYERS)
_GOCA_CAPTURE = CaptureSetup(heads="auto", self_every_layer=True, reference=LayerPick("output", 1, 1))

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("DiffSegmenter (released code)", "diffsegmenter",
           Source("VCG-team/DiffSegmenter", "open_vocabulary/voc12/ptp_stable_voc12.py",
                  "VOC 2012 train pseudo-masks (WSSS): 70.5 mIoU (paper; the script adds BLIP's continuation "
                  "of the prompt, see AttnSeg Caption Prompt)"),
           DiffSegmenterSettings(),
           TextSetup("diffsegmenter", class_weight=1.21, per_class=True),
           CaptureSetup(timesteps=(100,)), threshold=0.5),
    Preset("DiffSegmenter (paper, 4 timesteps)", "diffsegmenter",
           Source("VCG-team/DiffSegmenter", "paper: timesteps {1, 50, 100, 150}, final maps averaged",
                  "VOC 2012 val, open vocabulary (paper's timestep ablation)"),
           DiffSegmenterSettings(),
           TextSetup("diffsegmenter", class_weight=1.21, per_class=True),
           CaptureSetup(timesteps=(1, 50, 100, 150), keep_timesteps=True), threshold=0.5),
    Preset("iSeg VOC (released code)", "iseg",
           Source("linsun449/iseg.code", "wsss/iSeg.py with wsss/arguments.py (VOC: ent 0.015, iter 10)",
                  "VOC 2012 train pseudo-masks (WSSS, SD2.1-base): 75.2 mIoU"),
           ISegSettings(),
           TextSetup("iseg", cat_cross_gamma=1.6, cat_cross_mode="embedding", background_words=ISEG_BACKGROUND_WORDS),
           dataclasses.replace(_ISEG_CAPTURE, cross_head_lists=ISEG_VOC_HEADS_16 + ISEG_VOC_HEADS_32),
           background="(1 - max)^2"),
    Preset("iSeg COCO (released code)", "iseg",
           Source("linsun449/iseg.code", "wsss/iSeg.py with wsss/arguments.py (COCO: ent 0.1, iter 10, all heads)",
                  "COCO 2014 train pseudo-masks (WSSS, SD2.1-base): 45.5 mIoU"),
           ISegSettings(lam=0.1),
           TextSetup("iseg", cat_cross_gamma=1.6, cat_cross_mode="embedding",
                     background_words=ISEG_COCO_BACKGROUND_WORDS),
           _ISEG_CAPTURE, threshold=0.45),
    Preset("iSeg (paper text)", "iseg",
           Source("linsun449/iseg.code", "paper: Cat-Cross on the keys, S + lambda (1 + ln S) on S^, lambda 0.01, "
                  "N 10, no smoothing, all heads", "VOC 2012 train pseudo-masks (WSSS): 75.2 mIoU"),
           ISegSettings(smoothing_iterations=0, lam=0.01, variant="paper"),
           TextSetup("iseg", cat_cross_gamma=1.6, cat_cross_mode="keys", background_words=ISEG_BACKGROUND_WORDS),
           CaptureSetup(self_layers=ISEG_SELF_LAYER, cross_layers=ISEG_CROSS_LAYERS),
           background="(1 - max)^2"),
    Preset("GoCA SD1.5 (released code)", "goca",
           Source("Darkbblue/goca", "src-main/configs/config-model/config_model_15.py",
                  "VOC 60.7 / Context 40.4 / COCO-Object 39.2 mIoU (SD1.5, background offset swept -0.4..0.4)"),
           GoCASettings(),
           TextSetup("goca", fuse_ing=False),
           _GOCA_CAPTURE, threshold=0.0),
    Preset("GoCA SDXL (released code)", "goca",
           Source("Darkbblue/goca", "src-main/configs/config-model/config_model_xl.py",
                  "VOC 65.6 / Context 42.3 / COCO-Object 44.3 mIoU (SDXL, 1024 px, maps at 64x64)"),
           GoCASettings(propagation_layers=GOCA_SDXL_PROPAGATION, aggregate_factor=2),
           TextSetup("goca", fuse_ing=False),
           CaptureSetup(resolution=1024, heads="auto", self_every_layer=True, reference=LayerPick("output", 0, 0)),
           threshold=0.0),
)}

# GoCA on Flux: cross maps of all 57 blocks (19 double, then 38 single), head mean, layer
# weights against block 27's attention output, propagation with blocks 12 and 18.
FLUX_DOUBLE, FLUX_SINGLE = 19, 38
GOCA_FLUX_PROPAGATION = (LayerPick.dit("double", 12), LayerPick.dit("double", 18))
GOCA_FLUX_REFERENCE = LayerPick.dit("single", 27 - FLUX_DOUBLE)
# Its low-memory configuration keeps blocks 12, 18 and 27-29.
GOCA_FLUX_LOW_MEMORY = GOCA_FLUX_PROPAGATION + tuple(LayerPick.dit("single", b - FLUX_DOUBLE) for b in (27, 28, 29))
# Seg4Diff reads SD3's block 9 at the 8th-last of 28 steps: on SD3's shift-3 schedule
# (sigmas linear from 1 to 1/1000, then shifted) step 20 is sigma 0.513, t = 513.
SEG4DIFF_BLOCK = (LayerPick.dit("joint", 9),)
SEG4DIFF_TIMESTEP = 513

PRESETS.update({p.name: p for p in (
    Preset("GoCA Flux (released code)", "goca",
           Source("Darkbblue/goca", "src-main/configs/config-model/config_model_flux.py",
                  "VOC 70.7 / Context 51.1 / COCO-Object 48.1 mIoU (Flux.1-dev, 1024 px, maps at 64x64, t = 150)"),
           GoCASettings(propagation_layers=GOCA_FLUX_PROPAGATION, aggregate_factor=2),
           TextSetup("goca", fuse_ing=False),
           CaptureSetup(timesteps=(150,), resolution=1024, heads="mean", self_every_layer=True,
                        reference=GOCA_FLUX_REFERENCE),
           threshold=0.0, family="flux"),
    Preset("GoCA Flux low memory (released code)", "goca",
           Source("Darkbblue/goca", "src-main/configs/config-model/config_model_flux.py (the commented 'vram' "
                  "layer list: blocks 12, 18, 27, 28, 29)", "no number reported for this configuration"),
           GoCASettings(propagation_layers=GOCA_FLUX_PROPAGATION, aggregate_factor=2),
           TextSetup("goca", fuse_ing=False),
           CaptureSetup(timesteps=(150,), resolution=1024, heads="mean", cross_layers=GOCA_FLUX_LOW_MEMORY,
                        self_layers=GOCA_FLUX_LOW_MEMORY, reference=GOCA_FLUX_REFERENCE),
           threshold=0.0, family="flux"),
    Preset("Seg4Diff SD3 (paper)", "diffsegmenter",
           Source("Seg4Diff (NeurIPS 2025)", "paper: I2T probabilities of joint block 9, head mean, one pass at "
                  "1024 px at the 8th-last of 28 steps (t = 513 on SD3's schedule); no refinement",
                  "VOC20 89.2 mIoU with only the ground-truth classes prompted (its protocol)"),
           DiffSegmenterSettings(weights=(1.0,), self_completion=False),
           TextSetup("diffsegmenter", fuse_ing=False),
           CaptureSetup(timesteps=(SEG4DIFF_TIMESTEP,), resolution=1024, cross_layers=SEG4DIFF_BLOCK),
           family="sd3"),
    Preset("ConceptAttention Flux (released code)", "concept",
           Source("helblazer811/ConceptAttention", "concept_attention/flux/pipeline.py (encode_image: double blocks "
                  "15-18, a 4-step schedule noised at index 2, i.e. half noise; labels by argmax over the classes)",
                  "ImageNet-Seg 71.0 mIoU (Flux-schnell; raw Flux cross-attention 59.9)"),
           ConceptSettings(), TextSetup("diffsegmenter", fuse_ing=False), CaptureSetup(resolution=1024),
           threshold=0.0, family="flux"),
)})

# Not an author's configuration: the shipped demo model's settings, tuned on its
# tuning scenes by benchmarks/segmentation_quality.py (coarse and fine level 0.7 /
# 0.3, one joint prompt, twice the scene's size).
PRESETS["DiffSegmenter (demo model, tuned)"] = Preset(
    "DiffSegmenter (demo model, tuned)", "diffsegmenter",
    Source("this repository", "benchmarks/segmentation_quality.py (tuned on the demo's 50 tuning scenes)",
           "demo model, 200 held-out scenes: 0.784 mIoU"),
    DiffSegmenterSettings(weights=(0.7, 0.3)), TextSetup("diffsegmenter"), CaptureSetup(resolution=256),
    threshold=0.6)

SEED_PRESET = "iSeg interactive (released UI)"
SEED_SETTINGS = ISegSettings(smoothing_iterations=0, lam=0.1, iterations=50, variant="code", clamp_max=1.0)
PRESETS[SEED_PRESET] = Preset(
    SEED_PRESET, "seeds",
    Source("linsun449/iseg.code", "ui/run.py (lambda 0.1, N 50, S^ clamped to [0, 1], every head of the one layer)",
           "the authors' interactive demo (no reported number)"),
    SEED_SETTINGS, capture=CaptureSetup(self_layers=ISEG_SELF_LAYER))
PRESETS["S-CFG (released code)"] = Preset(
    "S-CFG (released code)", "scfg",
    Source("SmilesDZgk/S-CFG", "sd/utils.py (get_mask) and sd/sd.py (the rate)",
           "COCO-30k FID and CLIP score across CFG scales (SD1.5)"),
    SCFGPresetSettings())

# DiffSeg (unsupervised, no text) and iSeg's unsupervised mode on its proposals: every
# layer's self-attention at t = 300, 512 px (AttnSeg Unsupervised Segments).

_DIFFSEG_CAPTURE = CaptureSetup(timesteps=(DIFFSEG_TIMESTEP,), self_every_layer=True)
_DIFFSEG_CODE = "diffseg/segmentor.py with {} (KL_THRESHOLD [{}]*3, NUM_POINTS 16, REFINEMENT {}, timestep 300)"
PRESETS.update({p.name: p for p in (
    Preset("DiffSeg COCO-Stuff (released code)", "diffseg",
           Source("google/diffseg", _DIFFSEG_CODE.format("benchmarks.ipynb", 1.1, False),
                  "COCO-Stuff-27 unsupervised: 43.6 mIoU / 72.5 pixel accuracy (Hungarian matching, SD1.4)"),
           DiffSegSettings(tau=1.1), capture=_DIFFSEG_CAPTURE),
    Preset("DiffSeg Cityscapes (released code)", "diffseg",
           Source("google/diffseg", _DIFFSEG_CODE.format("benchmarks.ipynb", 0.9, False),
                  "Cityscapes unsupervised: 21.2 mIoU / 76.0 pixel accuracy (Hungarian matching)"),
           DiffSegSettings(tau=0.9), capture=_DIFFSEG_CAPTURE),
    Preset("DiffSeg demo notebook (released code)", "diffseg",
           Source("google/diffseg", _DIFFSEG_CODE.format("diffseg.ipynb", 0.9, True) + "; k-means up to 300 rounds",
                  "the authors' demo notebook (no reported number)"),
           DiffSegSettings(tau=0.9, kmeans_iterations=300), capture=_DIFFSEG_CAPTURE),
    Preset("iSeg unsupervised COCO-Stuff (paper)", "diffseg",
           Source("linsun449/iseg.code", "paper: unsupervised mode, DiffSeg's COCO-Stuff proposals as the initial "
                  "maps, Ent-Self paper form, lambda 0.01, N 10 (no released code for this mode)",
                  "COCO-Stuff-27 unsupervised: 45.2 mIoU / 74.5 pixel accuracy"),
           DiffSegSettings(tau=1.1, refinement="paper", lam=0.01, iterations=10), capture=_DIFFSEG_CAPTURE),
    Preset("iSeg unsupervised Cityscapes (paper)", "diffseg",
           Source("linsun449/iseg.code", "paper: as COCO-Stuff with DiffSeg's Cityscapes proposals (tau 0.9)",
                  "Cityscapes unsupervised: 25.0 mIoU / 78.7 pixel accuracy"),
           DiffSegSettings(tau=0.9, refinement="paper", lam=0.01, iterations=10), capture=_DIFFSEG_CAPTURE),
    *(Preset(f"DiffSeg {label} (COCO-Stuff settings)", "diffseg",
             Source("google/diffseg", "not an author's configuration: DiffSeg's COCO-Stuff settings (tau 1.1, 16x16 "
                    "anchors, 3 passes, t = 300) on the I2I part of every block's joint attention, at the family's "
                    "1024 px (one resolution, so the resolution weights do not apply)",
                    f"no number reported on {label}"),
             DiffSegSettings(tau=1.1),
             capture=CaptureSetup(timesteps=(DIFFSEG_TIMESTEP,), resolution=1024, self_every_layer=True),
             family=family)
      for label, family in (("Flux", "flux"), ("SD3", "sd3"))),
)})
SEGMENTERS = ("diffsegmenter", "iseg", "goca")
ONE_PASS_METHODS = SEGMENTERS + ("concept",)  # what the one-node segmenter runs
CAPTURE_METHODS = SEGMENTERS + ("seeds", "diffseg")  # the presets that say what a capture pass records


FAMILY_NAMES = {"unet": "UNet models (SD1.x, SD2.x, SDXL)", "flux": "Flux", "sd3": "SD3/SD3.5"}


def check_family(preset: str, family: str, model_name: str, methods: tuple[str, ...] | None = None,
                 input_name: str = "preset") -> None:
    """Refuse a preset made for another model family, naming those of ``methods``
    (None: the preset's own method) made for this one."""
    chosen = PRESETS.get(preset)
    if chosen is None or chosen.family == family:
        return
    methods = methods or (chosen.method,)
    fitting = [n for n, p in PRESETS.items() if p.family == family and p.method in methods]
    raise AttnSegError(f"{input_name}: '{preset}' is made for {FAMILY_NAMES[chosen.family]}, but the model is "
                       f"{model_name}. Choose {', '.join(repr(n) for n in fitting + [CUSTOM])}.")


def _methods(method: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return (method,) if isinstance(method, str) else method


def names(method: str | tuple[str, ...] | None = None, custom: bool = True) -> list[str]:
    """The presets of one method (of several; of any for None), then "custom"."""
    methods = _methods(method)
    return [n for n, p in PRESETS.items() if methods is None or p.method in methods] + ([CUSTOM] if custom else [])


def find_preset(name: str, method: str | tuple[str, ...] | None = None, input_name: str = "preset") -> Preset | None:
    """The named preset of ``method`` (of several, of any for None; None for "custom");
    an unknown name or another method's preset is an error."""
    if name == CUSTOM:
        return None
    found = PRESETS.get(name)
    methods = _methods(method)
    if found is None or (methods is not None and found.method not in methods):
        raise AttnSegError(f"{input_name}: '{name}' is not one of {', '.join(names(method))}.")
    return found
