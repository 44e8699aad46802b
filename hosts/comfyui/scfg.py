"""S-CFG as a ComfyUI model patch: a per-step attention capture on the two
coarsest attention resolutions (both CFG halves) feeding a sampler CFG function.
Works with any sampler or guider that goes through ComfyUI's cfg_function.

The region maps come from a map source: S-CFG's own (its released code) or
GoCA's aggregation of the same layers (GoCA's S-CFG integration, see
``attnseg.scfg_goca``). Each step's maps are dropped once its guidance is
computed, so nothing grows over the steps."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch
import torch.nn.functional as F

from ...attnseg import AttentionStore, AttnSegError, SegPrompt
from ...attnseg.attention import fold_repeated_tokens
from ...attnseg.scfg import (RATE_LIMITS, RELEASED_BLUR, foreground_mask, foreground_maps, guidance_rate,
                              refined_token_maps, rescale_cfg, spatial_cfg, token_regions, word_foreground_maps)
from ...attnseg.scfg_goca import GoCAStages, StepLayer, goca_foreground, goca_regions, goca_token_maps
from ...attnseg.layers import LayerPick
from .capture import CapturePlan
from .dit import DiTInfo
from .models import describe_model, install_model_capture
from .text import PROMPT_KEY
from .unet import UNetInfo

# Self-attention is pooled to at most this many tokens: S-CFG works on 16x16
# maps (SD1.5 at 512 px), and this bounds memory on SDXL at 1024 px.
SELF_TOKENS = 16 * 16
# How the foreground (the rate's benchmark region) is found. "released": on the
# uncond half, where the sum of the non-BOS token maps is above the BOS map.
# "words": on the cond half, where the prompt's word tokens together are above the
# other tokens (ours, for T5 sequences, which have no BOS).
FOREGROUND_RULES = ("released", "words")
# Where the per-step region maps come from: "scfg" (S-CFG's released code) or
# "goca" (GoCA's aggregation of the same layers, its S-CFG integration).
MAP_SOURCES = ("scfg", "goca")
# The node's name for the "words" rule, which errors point to.
WORDS_CHOICE = "words vs the other tokens (cond half; ours, for T5 without BOS)"


@dataclass(frozen=True)
class SCFGSettings:
    rate_min: float = RATE_LIMITS[0]
    rate_max: float = RATE_LIMITS[1]
    blur: int = RELEASED_BLUR
    start_percent: float = 0.0
    end_percent: float = 1.0
    foreground: str = FOREGROUND_RULES[0]
    rescale: float = 0.0  # RescaleCFG's multiplier, applied after S-CFG (0 = off)
    map_source: str = MAP_SOURCES[0]
    goca: GoCAStages = field(default_factory=GoCAStages)  # the stages of the "goca" map source
    dit_blocks: tuple[LayerPick, ...] | None = None  # a DiT's blocks to read (None: the family's default)


def scfg_factors(info: UNetInfo) -> frozenset[int]:
    """The two coarsest attention resolutions (SD1.5: 16x16 and 8x8 at 512 px)."""
    return frozenset(sorted({layer.factor for layer in info.layers})[-2:])


def dit_blocks(info: DiTInfo, picks: tuple[LayerPick, ...]) -> list:
    """The blocks the ``dit_blocks`` picks name, in execution order."""
    chosen = []
    for pick in picks:
        found = [la for la in info.layers if la.block == pick.block and pick.index in (None, la.block_id)]
        if not found:
            raise AttnSegError(f"dit_blocks: {info.model_id} has no {pick}; its blocks are {info.describe_blocks()}.")
        chosen += [la for la in found if la not in chosen]
    return sorted(chosen, key=list(info.layers).index)


def scfg_plan(info, map_source: str = "scfg", stages: GoCAStages = GoCAStages(),
              blocks: tuple[LayerPick, ...] | None = None, foreground: str = "released") -> CapturePlan:
    """What S-CFG records each step, both CFG halves. A UNet: its two coarsest
    resolutions. A DiT: the I2T and I2I of ``blocks`` (the ``dit_blocks`` input), by
    default Seg4Diff's block 9 on SD3 and GoCA's blocks 12 and 18 on Flux (the middle
    block on a model without them), pooled to 16x16 as S-CFG's maps are. Flux's T5
    sequence has no BOS: there the released foreground rule and the GoCA map source
    (whose regions and foreground need one) are refused; the "words" rule reads the
    cond half only, so the uncond half is not captured. The GoCA map source reads the
    same layers; on a UNet their heads are output-weighted inside the hook and the
    middle decoder layer of the finer level also keeps its queries (the layer
    weights' reference); on a DiT the heads are averaged (GoCA's DiT configurations)
    and one block needs no layer weights."""
    goca = map_source == "goca"
    both = frozenset({"cond"} if foreground == "words" and not goca else {"cond", "uncond"})
    if isinstance(info, DiTInfo):
        if goca and info.family == "flux":
            raise AttnSegError(
                f"map_source: GoCA's S-CFG integration takes its regions among BOS and the words and its "
                f"foreground from the BOS map, and {info.model_id}'s T5 sequence has no BOS. Set map_source to "
                f"'S-CFG (released code)' (with preset custom and foreground '{WORDS_CHOICE}').")
        if foreground == "released" and info.family == "flux":
            raise AttnSegError(
                f"foreground: S-CFG's released rule finds the foreground where the uncond half's tokens beat its "
                f"BOS map, and {info.model_id}'s T5 sequence has no BOS. Set preset to 'custom' and foreground to "
                f"'{WORDS_CHOICE}' (ours: the positive prompt's words against the other tokens; encode the "
                f"positive with AttnSeg Text Encode).")
        chosen = dit_blocks(info, blocks) if blocks else info.default_self_layers()
        picks = tuple(LayerPick.dit(la.block, la.block_id) for la in chosen)
        return CapturePlan(cross_layers=picks, self_layers=picks, branches=both, self_max_tokens=SELF_TOKENS)
    if blocks:
        raise AttnSegError(f"dit_blocks: {info.model_id} is a UNet, whose S-CFG layers are its two coarsest "
                           f"resolutions; leave dit_blocks empty (it names the blocks of a DiT: Flux, SD3).")
    factors = scfg_factors(info)
    return CapturePlan(cross_factors=factors, self_factors=factors, branches=both, self_max_tokens=SELF_TOKENS,
                       cross_heads="auto" if goca and stages.heads else "mean",
                       reference_factor=min(factors) if goca and stages.layer_weights else None)


def goca_size(info, latent: tuple[int, int]) -> tuple[int, int]:
    """GoCA's map size: the model's finest attention grid (SD1.x/2.x: the latent;
    SDXL: half of it; a DiT: its patch grid)."""
    factor = min(layer.factor for layer in info.layers)
    return tuple(max(1, math.ceil(side / factor)) for side in latent)


def _blocks(store: AttentionStore, branch: str):
    """(cross, self) of each transformer block of one branch that has both maps."""
    selfs = {(k.block, k.block_id, k.depth): v for k, v in store.layers("self", branch)}
    for key, cross in store.layers("cross", branch):
        stored_self = selfs.get((key.block, key.block_id, key.depth))
        if stored_self is not None:
            yield cross, stored_self


def _pooled_cross(maps, cross_grid: tuple[int, int], self_grid: tuple[int, int]):
    """(B, N, T) cross maps on ``cross_grid`` pooled to ``self_grid``: (B, N', T)."""
    maps = maps.transpose(1, 2).unflatten(-1, cross_grid)
    if cross_grid != self_grid:
        maps = F.adaptive_avg_pool2d(maps, self_grid)
    return maps.flatten(-2).transpose(1, 2)


def _layers(store: AttentionStore, branch: str):
    """(grid, self, cross) per transformer block of one branch, cross pooled to the self grid."""
    return [(stored_self.grid, stored_self.mean(), _pooled_cross(cross.mean(), cross.grid, stored_self.grid))
            for cross, stored_self in _blocks(store, branch)]


def _goca_layers(store: AttentionStore, branch: str, token_count: int | None) -> list[StepLayer]:
    """Each transformer block of one branch with both maps, the cross-attention pooled to
    its self grid; ``token_count`` folds the host's repeats of a shorter context back."""
    out = []
    for cross, stored_self in _blocks(store, branch):
        maps = cross.mean()
        if token_count:
            maps = fold_repeated_tokens(maps, token_count)
            if maps.shape[-1] != token_count:
                raise AttnSegError(
                    f"positive: the model attends over {maps.shape[-1]} text tokens, which is not a multiple of the "
                    f"{token_count} tokens of the prompt AttnSeg Text Encode recorded. map_source 'GoCA' reads the "
                    f"positive prompt's token layout: give the sampler one positive prompt, encoded by AttnSeg Text "
                    f"Encode.")
        density = math.prod(stored_self.grid) / math.prod(cross.grid)
        out.append(StepLayer(stored_self.grid, stored_self.mean(), _pooled_cross(maps, cross.grid, stored_self.grid),
                             density))
    return out


def _reference(store: AttentionStore, branch: str):
    found = store.layers("query", branch)
    return (found[0][1].grid, found[0][1].mean()) if found else None


class TokenLayout:
    """The positive prompt's word tokens and region candidates (BOS and the words) as
    index tensors, made once per run on the model's device so no step copies them."""

    def __init__(self, prompt: SegPrompt, device):
        self.prompt = prompt
        words = [i for i, word in enumerate(prompt.words) if word]
        self.words = torch.tensor(words, device=device)
        self.candidates = torch.tensor([0] + words, device=device)


def goca_rate_inputs(store: AttentionStore, layout: TokenLayout, info, latent: tuple[int, int],
                     settings: "SCFGSettings"):
    """(regions, foreground, token count) of one step from GoCA's maps (see
    ``attnseg.scfg_goca``): the cond half's maps rescaled by the prompt's word
    tokens, regions among BOS and the word tokens; the foreground from the uncond
    half's BOS map; both halves propagated with the cond half's self-attention of
    the finest captured grid."""
    stages, prompt = settings.goca, layout.prompt
    cond_layers = _goca_layers(store, "cond", prompt.token_count)
    uncond_layers = _goca_layers(store, "uncond", None)
    if not cond_layers or not uncond_layers:
        return None
    finest = max((la.grid for la in cond_layers), key=lambda g: g[0] * g[1])
    on_finest = [la.self_attention for la in cond_layers if la.grid == finest]
    operators = [(finest, sum(on_finest[1:], on_finest[0]) / len(on_finest))]
    device = cond_layers[0].cross.device
    size = goca_size(info, latent)
    common = dict(size=size, stages=stages, operators=operators, scfg_blur=settings.blur)
    cond_maps = goca_token_maps(cond_layers, reference=_reference(store, "cond"), content=layout.words.to(device),
                                **common)
    uncond_maps = goca_token_maps(uncond_layers, reference=_reference(store, "uncond"), content=None, **common)
    regions = goca_regions(cond_maps, layout.candidates.to(device), latent)
    return regions, goca_foreground(uncond_maps, latent), cond_maps.shape[1]


def positive_prompt(guider) -> SegPrompt | None:
    """The token layout AttnSeg's text encoders record on the guider's positive conditioning."""
    for entry in (getattr(guider, "conds", None) or {}).get("positive") or []:
        prompt = entry.get(PROMPT_KEY) if isinstance(entry, dict) else None
        if prompt is not None:
            return prompt
    return None


def check_word_prompt(prompt: SegPrompt | None, goca: bool) -> SegPrompt:
    """The positive prompt's recorded token layout, which the GoCA map source and the
    "words" foreground rule need."""
    what, why, other = (("map_source: 'GoCA'", "its rescaling and regions leave out BOS, EOS and padding",
                         "set map_source to 'S-CFG (released code)'") if goca else
                        (f"foreground: '{WORDS_CHOICE}'", "its foreground is where they beat the other tokens",
                         "use the released foreground rule on a model whose text has a BOS"))
    if prompt is None:
        raise AttnSegError(
            f"{what} needs to know which of the positive prompt's tokens are words ({why}), and this positive "
            f"conditioning does not record it (a stock text encoder's does not). Encode the positive prompt with "
            f"AttnSeg Text Encode (preset custom and class_weight 1 give CLIPTextEncode's conditioning; classes: "
            f"any word of the prompt), or {other}.")
    if not any(prompt.words):
        raise AttnSegError(f"positive: the prompt has no word tokens, so {what} has nothing to read. Write a "
                           f"prompt, or {other}.")
    return prompt


def scfg_rate_inputs(store: AttentionStore, latent: tuple[int, int], settings: "SCFGSettings",
                     layout: "TokenLayout | None" = None):
    """(regions, foreground, token count) of one step from S-CFG's own maps (its
    released code); the "words" foreground rule reads ``layout``'s word tokens on the
    cond half. None when the step captured no maps the rule needs."""
    words = settings.foreground == "words"
    cond_layers, uncond_layers = _layers(store, "cond"), (None if words else _layers(store, "uncond"))
    if not cond_layers or not (words or uncond_layers):
        return None
    grid = max((g for g, _, _ in cond_layers), key=lambda g: g[0] * g[1])
    cond_maps = refined_token_maps(cond_layers, grid, settings.blur)
    regions = token_regions(cond_maps, latent)
    if words:
        check_token_count(layout.prompt, cond_maps.shape[1], "foreground")
        maps = word_foreground_maps(cond_layers, grid, layout.words.to(cond_maps.device), settings.blur)
    else:
        maps = foreground_maps(uncond_layers, grid, settings.blur)
    return regions, foreground_mask(maps, latent), cond_maps.shape[1]


def check_token_count(prompt: SegPrompt, count: int, input_name: str) -> None:
    if count != prompt.token_count:
        raise AttnSegError(
            f"positive: the model attends over {count} text tokens, not the {prompt.token_count} tokens of the "
            f"prompt AttnSeg Text Encode recorded. {input_name} reads the positive prompt's token layout: give the "
            f"sampler one positive prompt, encoded by AttnSeg Text Encode.")


def cfg_function_name(function) -> str:
    """A CFG function's node, as far as its name tells ('RescaleCFG' from
    comfy_extras.nodes_model_advanced.RescaleCFG.patch.<locals>.rescale_cfg)."""
    if getattr(function, "attnseg_scfg", False):
        return "AttnSeg S-CFG"
    qualname = getattr(function, "__qualname__", type(function).__name__)
    return qualname.split(".<locals>")[0].removesuffix(".patch") or qualname


def install_scfg(model, settings: SCFGSettings) -> None:
    """Patch ``model`` (a clone the caller owns) with S-CFG."""
    existing = model.model_options.get("sampler_cfg_function")
    if getattr(existing, "attnseg_scfg", False):
        raise AttnSegError("model: S-CFG is already applied to this model; remove the second AttnSeg S-CFG node.")
    if existing is not None:
        raise AttnSegError(
            f"model: {cfg_function_name(existing)} already replaced this model's CFG formula (a sampler_cfg_function), and S-CFG "
            f"replaces it too: only one can run, in either order. Remove one of them; for RescaleCFG, remove it "
            f"and set S-CFG's rescale_multiplier instead (its rescale, applied after S-CFG's guidance).")
    if not 0 <= settings.start_percent <= settings.end_percent <= 1:
        raise AttnSegError(f"start_percent, end_percent: need 0 <= start ({settings.start_percent}) <= end "
                           f"({settings.end_percent}) <= 1.")
    if not 0 < settings.rate_min <= settings.rate_max:
        raise AttnSegError(f"rate_min, rate_max: need 0 < rate_min ({settings.rate_min}) <= rate_max "
                           f"({settings.rate_max}); S-CFG uses 0.8 and 3.0.")
    if settings.foreground not in FOREGROUND_RULES:
        raise AttnSegError(f"foreground: {settings.foreground!r} is not one of {', '.join(FOREGROUND_RULES)}.")
    if not 0 <= settings.rescale <= 1:
        raise AttnSegError(f"rescale_multiplier: {settings.rescale} must be between 0 (off) and 1 (RescaleCFG: 0.7).")
    if settings.blur > 1 and settings.blur % 2 == 0:
        raise AttnSegError(f"blur: {settings.blur} must be odd (or 0 to turn blurring off).")
    if settings.map_source not in MAP_SOURCES:
        raise AttnSegError(f"map_source: {settings.map_source!r} is not one of {', '.join(MAP_SOURCES)}.")
    if settings.goca.order < 0:
        raise AttnSegError(f"propagation order: {settings.goca.order} is negative; use 0 (off) or more (GoCA: 2).")
    goca = settings.map_source == "goca"
    needs_words = goca or settings.foreground == "words"  # both read the positive prompt's token layout
    info = describe_model(model)
    store = AttentionStore(info.model_id, 0, (0, 0), (0, 0))
    plan = scfg_plan(info, settings.map_source, settings.goca, settings.dit_blocks, settings.foreground)
    install_model_capture(model, info, store, plan)
    # The positive prompt's token layout, read when each run starts (GoCA's maps, the words rule).
    run = {"layout": None}
    sampling = model.get_model_object("model_sampling")
    sigma_range = (float(sampling.percent_to_sigma(settings.start_percent)),
                   float(sampling.percent_to_sigma(settings.end_percent)))
    said = set()

    def note(message: str) -> None:
        if message not in said:
            said.add(message)
            logging.info("AttnSeg S-CFG: %s", message)

    def cfg_function(args):
        cond, uncond, scale = args["cond"], args["uncond"], float(args["cond_scale"])
        try:
            sigma = float(args["sigma"].max())
            if abs(scale - 1.0) < 1e-6:
                note("cfg is 1, so there is no guidance to rescale; sampling as plain CFG.")
            elif sigma_range[1] <= sigma <= sigma_range[0]:
                size = tuple(cond.shape[-2:])
                if needs_words and run["layout"] is None:
                    check_word_prompt(None, goca)  # a sampler that went around the run wrapper
                found = (goca_rate_inputs(store, run["layout"], info, size, settings) if goca
                         else scfg_rate_inputs(store, size, settings, run["layout"]))
                if found is not None:
                    regions, foreground, count = found
                    rate = guidance_rate(cond - uncond, regions, foreground, scale,
                                         (settings.rate_min, settings.rate_max), settings.blur, count)
                    return rescaled(spatial_cfg(cond, uncond, scale, rate), args)
            return rescaled(uncond + scale * (cond - uncond), args)
        finally:
            store.entries.clear()  # only the current step's maps are ever kept
            store.steps.clear()

    def rescaled(guided, args):
        if settings.rescale == 0:
            return guided
        return rescale_cfg(guided, args["cond"], args["input"], args["sigma"], settings.rescale)

    cfg_function.attnseg_scfg = True
    cfg_function.attnseg_store = store  # what the patch holds between steps (tests, benchmarks)
    model.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=False)

    def fresh_run(executor, *args, **kwargs):
        # A run interrupted inside a UNet call leaves that call's maps behind (the CFG
        # function that clears them never ran): every run starts from an empty store.
        store.entries.clear()
        store.steps.clear()
        # ComfyUI has one CFG-function slot: a node applied after this one replaces
        # S-CFG without a word unless the run checks.
        current = executor.class_obj.model_options.get("sampler_cfg_function")
        if current is not cfg_function:
            raise AttnSegError(
                f"model: {cfg_function_name(current) if current else 'a later node'} replaced S-CFG's CFG formula "
                f"after the S-CFG node, so S-CFG would not run. Remove one of them; for RescaleCFG, remove it and "
                f"set S-CFG's rescale_multiplier instead.")
        if needs_words:
            guider = executor.class_obj
            device = getattr(getattr(guider, "model_patcher", None), "load_device", None)
            run["layout"] = TokenLayout(check_word_prompt(positive_prompt(guider), goca), device)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "attnseg_scfg", fresh_run)
