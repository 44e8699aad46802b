"""Prompt-to-Prompt editing on a ComfyUI ModelPatcher clone.

The source and the edit are two rows of one latent batch sampled from the
same noise with the source prompt's conditioning; an attn2 patch gives the
edit row its own prompt. Replace patches control the edit row's attention in
the cond half (as P2P does): cross-attention copied from the source through
the token alignment for the first ``cross_replace`` of the steps,
self-attention of layers with at most 32x32 tokens shared for the first
``self_replace``. A post-CFG function blends the edit's prediction with the
reference (the source row, or the input latent) outside the mask.

From an inversion (hosts/comfyui/inversion.py) both rows start at the
inverted latent instead of noise and follow the inversion's sigmas with the
Euler (DDIM) step, so the source row reconstructs the input image.

On Flux and SD3 (dit_edit.py) the edit row's text is its own in every block,
and the control is MM-DiT's: the source row's image queries and keys in the
chosen blocks for the first ``qk_replace`` of the steps; the blend reads the
blend words' image-to-text maps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import comfy.sample
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F

from ...attnseg import AttentionStore, AttnSegError
from ...attnseg.fusion import DIFFSEGMENTER_WEIGHTS, applied_weights, diffsegmenter
from ...attnseg.p2p import (TokenAlignment, align_tokens, blend_mask, check_fraction, controlled_cross_attention,
                            local_blend)
from ...attnseg.tokens import parse_class_list
from .capture import CapturePlan, cond_rows, fallback_attention, install_capture, step_index
from .text import locate_dit_words, locate_words, tokenized
from .dit import check_dit_conditioning, describe_dit, dit_family, install_dit_capture
from .dit_edit import AUTO, QK_REPLACE, ControlSteps, blend_plan, describe_numbers, install_mmdit_control, \
    resolve_blocks
from .inversion import INVERSION_SAMPLERS, install_inversion, model_identity, sample_from_inversion
from .unet import UNetInfo, check_conditioning, describe_unet

# P2P shares the self-attention of layers up to 32 x 32 tokens (SD at 512 px: all but the finest).
SELF_REPLACE_MAX_TOKENS = 32 * 32
KEEP_OUTSIDE = ("source sample", "input latent")


@dataclass(frozen=True)
class EditSettings:
    mode: str = "replace"
    cross_replace: float = 0.8
    self_replace: float = 0.4
    blend_words: str = ""
    blend_start: float = 0.2
    mask_threshold: float = 0.5
    dilate: int = 1
    feather: int = 1
    reweight_words: str = ""
    reweight_factor: float = 1.0
    keep_outside: str = "source sample"
    segmenter_weights: tuple[float, ...] = DIFFSEGMENTER_WEIGHTS
    # MM-DiT models (Flux, SD3): where and how long the edit takes the source's image queries and keys
    blocks: str = AUTO
    custom_blocks: str = ""
    qk_replace: float = QK_REPLACE

    def check(self) -> None:
        for name in ("cross_replace", "self_replace", "blend_start", "qk_replace"):
            check_fraction(getattr(self, name), name)
        if self.keep_outside not in KEEP_OUTSIDE:
            raise AttnSegError(f"keep_outside: '{self.keep_outside}' is not one of {', '.join(KEEP_OUTSIDE)}.")
        if self.dilate < 0 or self.feather < 0:
            raise AttnSegError("dilate / feather: use 0 (off) or a positive number of latent cells.")
        if not self.reweight_factor >= 0:
            raise AttnSegError(f"reweight_factor: {self.reweight_factor} must be >= 0 (1 = off).")


@dataclass(frozen=True)
class PromptPair:
    """Both prompts as the model sees them."""

    source_tokens: dict
    edit_tokens: dict
    alignment: TokenAlignment
    reweight: torch.Tensor | None  # (T_edit,)
    source_words: list[str]
    edit_words: list[str]


def _words(text: str, input_name: str) -> list[str]:
    """Comma-separated words; empty, or only commas and spaces, is no words."""
    if not any(part.strip() for part in text.replace("\n", ",").split(",")):
        return []
    return parse_class_list(text, input_name)


def pair_prompts(clip, source: str, edit: str, settings: EditSettings) -> PromptPair:
    if not source.strip() or not edit.strip():
        raise AttnSegError("source_prompt / edit_prompt: both prompts are needed (the edit changes the source).")
    source_tokens, source_flat, source_words = tokenized(clip, source)
    edit_tokens, edit_flat, edit_words = tokenized(clip, edit)
    if len(source_flat) != len(edit_flat):
        raise AttnSegError(f"edit_prompt: the prompts take {len(source_flat) // 77} and {len(edit_flat) // 77} "
                           f"77-token chunks; keep their lengths in the same chunk (75 tokens each).")
    alignment = align_tokens(source_flat, edit_flat, settings.mode)
    reweight = None
    names = _words(settings.reweight_words, "reweight_words")
    if names and settings.reweight_factor != 1.0:
        meta, _ = locate_words(clip, edit, names, "reweight_words")
        reweight = torch.ones(len(edit_flat))
        reweight[list(meta.class_positions)] = settings.reweight_factor
    return PromptPair(source_tokens, edit_tokens, alignment, reweight, source_words, edit_words)


def _tile(alignment: TokenAlignment, reweight, tokens: int):
    """The alignment for a context the host repeated to ``tokens`` tokens."""
    size = alignment.copied.shape[0]
    if tokens == size:
        return alignment, reweight
    copies = tokens // size
    tiled = TokenAlignment(torch.block_diag(*[alignment.mapper] * copies), alignment.copied.repeat(copies))
    return tiled, reweight.repeat(copies) if reweight is not None else None


def install_prompt_to_prompt(model, info: UNetInfo, edit_context: torch.Tensor, pair: PromptPair,
                             settings: EditSettings, steps: ControlSteps, edit_adm: torch.Tensor | None = None) -> None:
    """Patch ``model`` (a clone) for a latent batch [source rows, edit rows].
    ``edit_adm``: the edit prompt's ADM vector (SDXL: its pooled text embedding
    and the size embeddings) for the edit rows' ``y``."""
    tiled, contexts = {}, {}

    def swap_context(n, context, value, extra):
        rows = cond_rows(extra.get("cond_or_uncond"), context.shape[0])
        if rows is None:
            return n, context, value
        half = (rows.stop - rows.start) // 2
        # Kept per device, dtype and length: moved and tiled once, not in every block.
        key = (context.device, context.dtype, context.shape[1])
        if key not in contexts:
            own = edit_context.to(device=context.device, dtype=context.dtype)
            contexts[key] = own.repeat(1, context.shape[1] // own.shape[1], 1)
        own = contexts[key]
        context = context.clone()
        context[rows.start + half:rows.stop] = own
        return n, context, value if value is None else context

    model.set_model_attn2_patch(swap_context)
    replaces = model.model_options.setdefault("transformer_options", {}).get("patches_replace", {})

    def cross_patch(previous):
        fast = fallback_attention(previous)

        def patch(q, k, v, extra):
            rows = cond_rows(extra.get("cond_or_uncond"), q.shape[0])
            # As in P2P, both the copy and the re-weighting end with the cross-replace steps.
            if rows is None or not steps.before(settings.cross_replace):
                return fast(q, k, v, extra)
            key = (k.shape[1], q.device)
            if key not in tiled:
                alignment, reweight = _tile(pair.alignment, pair.reweight, k.shape[1])
                tiled[key] = (TokenAlignment(alignment.mapper.to(q.device), alignment.copied.to(q.device)),
                              reweight.to(q.device) if reweight is not None else None)
            alignment, reweight = tiled[key]
            heads = extra["n_heads"]
            batch, n, inner = q.shape
            dim = inner // heads
            split = lambda x: x[rows].view(x[rows].shape[0], -1, heads, dim).transpose(1, 2)  # noqa: E731
            probs = (torch.matmul(split(q).float(), split(k).float().transpose(-1, -2)) * dim ** -0.5).softmax(-1)
            half = probs.shape[0] // 2
            edited = controlled_cross_attention(probs[:half], probs[half:], alignment, True, reweight)
            probs = torch.cat([probs[:half], edited])
            out = fast(q, k, v, extra)
            out[rows] = torch.matmul(probs.to(v.dtype), split(v)).transpose(1, 2).reshape(-1, n, inner)
            return out

        return patch

    def self_patch(previous):
        fast = fallback_attention(previous)

        def patch(q, k, v, extra):
            rows = cond_rows(extra.get("cond_or_uncond"), q.shape[0])
            if rows is None or q.shape[1] > SELF_REPLACE_MAX_TOKENS or not steps.before(settings.self_replace):
                return fast(q, k, v, extra)
            half = (rows.stop - rows.start) // 2
            source, target = slice(rows.start, rows.start + half), slice(rows.start + half, rows.stop)
            # The edit rows attend with the source rows' queries and keys: the source's
            # attention probabilities applied to the edit's own values.
            q, k = q.clone(), k.clone()
            q[target], k[target] = q[source], k[source]
            return fast(q, k, v, extra)

        return patch

    for layer in info.layers:
        model.set_model_attn2_replace(cross_patch(replaces.get("attn2", {}).get(layer.patch_key)), *layer.patch_key)
        model.set_model_attn1_replace(self_patch(replaces.get("attn1", {}).get(layer.patch_key)), *layer.patch_key)

    previous_wrapper = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        options = args["c"].get("transformer_options", {})
        steps.step, steps.total = step_index(options.get("sample_sigmas"), args["timestep"])
        y = args["c"].get("y")
        rows = cond_rows(args.get("cond_or_uncond"), y.shape[0]) if edit_adm is not None and y is not None else None
        if rows is not None:
            half = (rows.stop - rows.start) // 2
            y = y.clone()
            y[rows.start + half:rows.stop] = edit_adm.to(y)
            args = {**args, "c": {**args["c"], "y": y}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)


def _blend_words(clip, pair_text: tuple[str, str], settings: EditSettings, dit: bool = False):
    """The blend words' class metadata in the source and in the edit prompt
    (each word must be in at least one of them); ``dit``: positions in a DiT's
    text sequence."""
    names = _words(settings.blend_words, "blend_words")

    def locate(text, words):
        if dit:
            return locate_dit_words(clip, text, words, input_name="blend_words")
        return locate_words(clip, text, words, "blend_words")

    metas = []
    found = set()
    for text in pair_text:
        present = []
        for name in names:
            try:
                locate(text, [name])
            except AttnSegError:
                continue
            present.append(name)
        found |= set(present)
        metas.append(locate(text, present)[0] if present else None)
    missing = [n for n in names if n not in found]
    if missing:
        raise AttnSegError(f"blend_words: {', '.join(missing)} is in neither prompt. Blend words name the object "
                           f"that changes, as written in the source or the edit prompt.")
    return metas


def _mask_from_store(store: AttentionStore, metas, settings: EditSettings, latent_size,
                     self_completion: bool = True) -> torch.Tensor:
    """Union of the source row's and the edit row's blend-word masks from the
    attention captured so far (DiffSegmenter: fusion, then completion unless
    off: on a DiT the image-to-text maps alone, as exploring-mmdit blends)."""
    masks = []
    for row, meta in enumerate(metas):
        if meta is None:
            continue
        scores = diffsegmenter(dataclasses.replace(store, prompt=meta), settings.segmenter_weights,
                               self_completion, what="edit attention")
        masks.append(scores.maps[row] >= settings.mask_threshold)
    return blend_mask(torch.cat(masks), latent_size, settings.dilate, settings.feather)


def _user_mask(mask: torch.Tensor, latent_size, settings: EditSettings) -> torch.Tensor:
    mask = mask.reshape(-1, *mask.shape[-2:])  # a MASK may come as (H, W)
    height, width = mask.shape[-2:]
    if abs((width / height) / (latent_size[1] / latent_size[0]) - 1) > 0.02:
        raise AttnSegError(f"mask: {width}x{height} does not have the latent's aspect ratio "
                           f"({latent_size[1] * 8}x{latent_size[0] * 8} px). Give a mask of the image being edited.")
    return blend_mask(mask[:1].float(), latent_size, settings.dilate, settings.feather)


def _edit_adm(model, source, edit, latent_size) -> torch.Tensor | None:
    """The edit prompt's ADM vector, as ComfyUI builds the source's (the source's
    size options, the edit's pooled output); None for models without one (SD1.x)."""
    pooled = edit[0][1].get("pooled_output")
    if pooled is None:
        return None
    options = {"width": latent_size[1] * 8, "height": latent_size[0] * 8, **source[0][1], "pooled_output": pooled}
    return model.model.encode_adm(**options, device=model.load_device, prompt_type="positive")


def _check_inversion(inversion, model, latent_image, source_prompt, steps, cfg, sampler_name, scheduler, denoise):
    if sampler_name not in INVERSION_SAMPLERS:
        raise AttnSegError(f"sampler_name: '{sampler_name}'; an inversion reverses the Euler (DDIM) step, so the "
                           f"edit from it samples with {' or '.join(INVERSION_SAMPLERS)}.")
    if denoise != 1.0:
        raise AttnSegError(f"denoise: {denoise}; with an inversion the edit runs the inversion's whole schedule "
                           f"from its noise. Set denoise to 1.")
    inversion.check_edit(model_identity(model), tuple(latent_image.shape[1:]), source_prompt, steps, cfg, scheduler)


def _prepare_unet(patched, clip, source_prompt, edit_prompt, negative, settings: EditSettings,
                  step_state: ControlSteps, latent_size, blend_names, capture: bool):
    """P2P's control on a UNet clone; (positive, blend metadata, blend store or
    None, alignment report)."""
    pair = pair_prompts(clip, source_prompt, edit_prompt, settings)
    metas = _blend_words(clip, (source_prompt, edit_prompt), settings) if blend_names else None
    positive = clip.encode_from_tokens_scheduled(pair.source_tokens)
    edit_conditioning = clip.encode_from_tokens_scheduled(pair.edit_tokens)
    info = describe_unet(patched)
    if blend_names:  # refused before sampling, not after
        levels = len({layer.factor for layer in info.layers})
        applied_weights(settings.segmenter_weights, levels, f"this model's {levels} attention resolutions",
                        "segmenter_weights")
    check_conditioning(info, positive, "clip")
    check_conditioning(info, negative, "negative")
    install_prompt_to_prompt(patched, info, edit_conditioning[0][0], pair, settings, step_state,
                             _edit_adm(patched, positive, edit_conditioning, latent_size))
    store = None
    if capture:
        # Every step's attention goes into a running average that locates the blend
        # words, as P2P's local blend does (self-attention pooled to 32 x 32 for the
        # completion). Either prompt's metadata folds repeated context copies: both
        # have the same token count.
        folding = next(meta for meta in metas if meta is not None)
        store = AttentionStore(info.model_id, 2, latent_size, (latent_size[0] * 8, latent_size[1] * 8), folding)
        install_capture(patched, info, store, CapturePlan(self_max_tokens=SELF_REPLACE_MAX_TOKENS))
    return positive, metas, store, "\n".join(pair.alignment.describe(pair.source_words, pair.edit_words))


def _prepare_dit(patched, clip, source_prompt, edit_prompt, negative, settings: EditSettings,
                 step_state: ControlSteps, latent_size, blend_names, capture: bool):
    """MM-DiT control on a Flux / SD3 clone (dit_edit.py); as _prepare_unet."""
    if not source_prompt.strip() or not edit_prompt.strip():
        raise AttnSegError("source_prompt / edit_prompt: both prompts are needed (the edit changes the source).")
    if _words(settings.reweight_words, "reweight_words") and settings.reweight_factor != 1.0:
        raise AttnSegError("reweight_words: attention re-weighting scales UNet cross-attention; MM-DiT models "
                           "(Flux, SD3) have none. Clear reweight_words or set reweight_factor to 1.")
    info = describe_dit(patched)
    blocks = resolve_blocks(info, settings.blocks, settings.custom_blocks)
    metas = _blend_words(clip, (source_prompt, edit_prompt), settings, dit=True) if blend_names else None
    if blend_names:
        applied_weights(settings.segmenter_weights, 1, f"{info.model_id}'s one attention resolution",
                        "segmenter_weights")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(source_prompt))
    edit_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(edit_prompt))
    check_dit_conditioning(info, positive, "clip")
    check_dit_conditioning(info, negative, "negative")
    source_tokens, edit_tokens = positive[0][0].shape[1], edit_conditioning[0][0].shape[1]
    if source_tokens != edit_tokens:
        raise AttnSegError(f"edit_prompt: encodes to {edit_tokens} text tokens, the source prompt to "
                           f"{source_tokens}; both rows of the batch need the same length. Keep the prompts within "
                           f"the same padded length (e.g. shorten the longer one).")
    install_mmdit_control(patched, info, blocks, settings.qk_replace, edit_conditioning[0][0],
                          edit_conditioning[0][1].get("pooled_output"), step_state)
    store = None
    if capture:
        # Installed over the control: the maps are of each row's own queries and keys.
        folding = next(meta for meta in metas if meta is not None)
        plan = blend_plan(info)
        store = AttentionStore(info.model_id, 2, latent_size, (latent_size[0] * 8, latent_size[1] * 8), folding)
        install_dit_capture(patched, info, store, plan)
        blend_blocks = [(layer.block, layer.block_id) for layer in plan.layers(info, "cross")]
    lines = [f"MM-DiT control: the source's image queries and keys in blocks {describe_numbers(info, blocks)} of "
             f"{info.model_id} for the first {settings.qk_replace:g} of the steps"]
    if capture:
        lines.append(f"blend maps: image-to-text attention of blocks {describe_numbers(info, blend_blocks)}")
    return positive, metas, store, "\n".join(lines)


def edit_sample(model, clip, source_prompt: str, edit_prompt: str, negative, latent: dict, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, denoise: float, settings: EditSettings,
                mask: torch.Tensor | None = None, inversion=None):
    """Sample the source and the edit together, from noise or from
    ``inversion`` (an attnseg.inversion.Inversion of ``latent``). Returns
    (source latent, edited latent, blend mask (1, H, W) at pixel size, alignment report)."""
    settings.check()
    samples = latent["samples"]
    if samples.shape[0] != 1:
        raise AttnSegError(f"latent_image: {samples.shape[0]} latents; the editor edits one image per run.")
    latent_image = comfy.sample.fix_empty_latent_channels(model, samples)
    if inversion is not None:
        _check_inversion(inversion, model, latent_image, source_prompt, steps, cfg, sampler_name, scheduler, denoise)
    if settings.keep_outside == "input latent" and not bool(samples.any()):
        raise AttnSegError("keep_outside: 'input latent' keeps the input outside the mask, but latent_image is empty "
                           "(an Empty Latent Image), so everything outside would be blank. Use 'source sample', or "
                           "VAE-encode the image to edit.")
    blend_names = _words(settings.blend_words, "blend_words")
    blend = bool(blend_names) or mask is not None
    latent_size = tuple(latent_image.shape[-2:])
    patched = model.clone()
    step_state = ControlSteps()
    if inversion is not None:
        install_inversion(patched, inversion)  # null-text's embeddings, under P2P's wrapper
    prepare = _prepare_dit if dit_family(model) is not None else _prepare_unet
    positive, metas, store, report = prepare(patched, clip, source_prompt, edit_prompt, negative, settings,
                                             step_state, latent_size, blend_names, blend and mask is None)
    # The mask and the kept latent move to the sampling device once, on the first blended step.
    blend_state = {"mask": None if mask is None else _user_mask(mask, latent_size, settings), "reference": None}
    if settings.keep_outside == "input latent":
        blend_state["reference"] = patched.model.process_latent_in(latent_image)

    def blend_prediction(args):
        denoised = args["denoised"]
        if not blend or step_state.step < round(settings.blend_start * step_state.total):
            return denoised
        if store is not None:
            completion = store.architecture != "dit"
            blend_state["mask"] = _mask_from_store(store, metas, settings, latent_size, completion)
        half = denoised.shape[0] // 2
        for name in ("mask", "reference"):
            if blend_state[name] is not None and blend_state[name].device != denoised.device:
                blend_state[name] = blend_state[name].to(denoised)
        reference = blend_state["reference"]
        target = denoised[:half] if reference is None else reference
        blended = local_blend(denoised[half:], target, blend_state["mask"])
        return torch.cat([denoised[:half], blended])

    patched.set_model_sampler_post_cfg_function(blend_prediction)
    callback = latent_preview.prepare_callback(patched, steps)
    if inversion is not None:
        start = inversion.noise.to(latent_image).repeat(2, 1, 1, 1)
        out = sample_from_inversion(patched, inversion, positive, negative, start, cfg, callback, seed)
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed).repeat(2, 1, 1, 1)
        out = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image.repeat(2, 1, 1, 1), denoise=denoise, callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    used = blend_state["mask"]
    if used is None:  # no blend ran: the whole image was free to change
        used = torch.ones(1, 1, *latent_size)
    pixel_mask = F.interpolate(used.float().cpu(), size=(latent_size[0] * 8, latent_size[1] * 8), mode="bilinear",
                               align_corners=False)[:, 0]
    return out[:1], out[1:], pixel_mask, report
