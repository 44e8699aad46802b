"""S-CFG as a ComfyUI model patch: a per-step attention capture on the two
coarsest attention resolutions (both CFG halves) feeding a sampler CFG function.
Works with any sampler or guider that goes through ComfyUI's cfg_function."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension
import torch.nn.functional as F

from ...attnseg import AttentionStore, AttnSegError
from ...attnseg.scfg import (RATE_LIMITS, RELEASED_BLUR, foreground_mask, foreground_maps, guidance_rate,
                              refined_token_maps, rescale_cfg, spatial_cfg, token_regions)
from ...attnseg.layers import LayerPick
from .capture import CapturePlan
from .dit import DiTInfo
from .models import describe_model, install_model_capture
from .unet import UNetInfo

# Self-attention is pooled to at most this many tokens: S-CFG works on 16x16
# maps (SD1.5 at 512 px), and this bounds memory on SDXL at 1024 px.
SELF_TOKENS = 16 * 16
# How the foreground (the rate's benchmark region) is found from the uncond half;
# "released": where the sum of the non-BOS token maps is above the BOS map.
FOREGROUND_RULES = ("released",)


@dataclass(frozen=True)
class SCFGSettings:
    rate_min: float = RATE_LIMITS[0]
    rate_max: float = RATE_LIMITS[1]
    blur: int = RELEASED_BLUR
    start_percent: float = 0.0
    end_percent: float = 1.0
    foreground: str = FOREGROUND_RULES[0]
    rescale: float = 0.0  # RescaleCFG's multiplier, applied after S-CFG (0 = off)


def scfg_factors(info: UNetInfo) -> frozenset[int]:
    """The two coarsest attention resolutions (SD1.5: 16x16 and 8x8 at 512 px)."""
    return frozenset(sorted({layer.factor for layer in info.layers})[-2:])


def scfg_plan(info) -> CapturePlan:
    """What S-CFG records each step, both CFG halves. A UNet: its two coarsest
    resolutions. SD3: the I2T and I2I of Seg4Diff's block (the middle one on a model
    without it), pooled to 16x16 as S-CFG's maps are. Flux is refused: guidance-
    distilled Flux samples at cfg 1, and its T5 sequence has no start token for
    S-CFG's foreground rule."""
    both = frozenset({"cond", "uncond"})
    if isinstance(info, DiTInfo):
        if info.family != "sd3":
            raise AttnSegError(
                f"model: S-CFG needs real classifier-free guidance and a start token (BOS) in the text sequence; "
                f"{info.model_id} samples guidance-distilled at cfg 1 and its T5 sequence has no BOS. Use S-CFG on "
                f"SD1.x, SD2.x, SDXL or SD3/SD3.5.")
        picks = tuple(LayerPick.dit(la.block, la.block_id) for la in info.default_self_layers())
        return CapturePlan(cross_layers=picks, self_layers=picks, branches=both, self_max_tokens=SELF_TOKENS)
    factors = scfg_factors(info)
    return CapturePlan(cross_factors=factors, self_factors=factors, branches=both, self_max_tokens=SELF_TOKENS)


def _layers(store: AttentionStore, branch: str):
    """(grid, self, cross) per transformer block of one branch, cross pooled to the self grid."""
    selfs = {(k.block, k.block_id, k.depth): v for k, v in store.layers("self", branch)}
    out = []
    for key, cross in store.layers("cross", branch):
        stored_self = selfs.get((key.block, key.block_id, key.depth))
        if stored_self is None:
            continue
        maps = cross.mean().transpose(1, 2).unflatten(-1, cross.grid)
        if cross.grid != stored_self.grid:
            maps = F.adaptive_avg_pool2d(maps, stored_self.grid)
        out.append((stored_self.grid, stored_self.mean(), maps.flatten(-2).transpose(1, 2)))
    return out


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
    info = describe_model(model)
    store = AttentionStore(info.model_id, 0, (0, 0), (0, 0))
    install_model_capture(model, info, store, scfg_plan(info))
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
                cond_layers, uncond_layers = _layers(store, "cond"), _layers(store, "uncond")
                if cond_layers and uncond_layers:
                    grid = max((g for g, _, _ in cond_layers), key=lambda g: g[0] * g[1])
                    size = tuple(cond.shape[-2:])
                    cond_maps = refined_token_maps(cond_layers, grid, settings.blur)
                    regions = token_regions(cond_maps, size)
                    foreground = foreground_mask(foreground_maps(uncond_layers, grid, settings.blur), size)
                    rate = guidance_rate(cond - uncond, regions, foreground, scale,
                                         (settings.rate_min, settings.rate_max), settings.blur, cond_maps.shape[1])
                    return rescaled(spatial_cfg(cond, uncond, scale, rate), args)
            return rescaled(uncond + scale * (cond - uncond), args)
        finally:
            store.entries.clear()  # only the current step's maps are ever kept

    def rescaled(guided, args):
        if settings.rescale == 0:
            return guided
        return rescale_cfg(guided, args["cond"], args["input"], args["sigma"], settings.rescale)

    cfg_function.attnseg_scfg = True
    model.set_model_sampler_cfg_function(cfg_function, disable_cfg1_optimization=False)

    def fresh_run(executor, *args, **kwargs):
        # A run interrupted inside a UNet call leaves that call's maps behind (the CFG
        # function that clears them never ran): every run starts from an empty store.
        store.entries.clear()
        # ComfyUI has one CFG-function slot: a node applied after this one replaces
        # S-CFG without a word unless the run checks.
        current = executor.class_obj.model_options.get("sampler_cfg_function")
        if current is not cfg_function:
            raise AttnSegError(
                f"model: {cfg_function_name(current) if current else 'a later node'} replaced S-CFG's CFG formula "
                f"after the S-CFG node, so S-CFG would not run. Remove one of them; for RescaleCFG, remove it and "
                f"set S-CFG's rescale_multiplier instead.")
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "attnseg_scfg", fresh_run)
