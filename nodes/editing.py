"""Prompt-to-Prompt editing: change one thing in an image by editing its
prompt, with everything outside the changed object kept."""

import comfy.samplers

from ..attnseg.p2p import EDIT_MODES
from ..hosts.comfyui.dit_edit import AUTO, BLOCK_CHOICES, QK_REPLACE
from ..hosts.comfyui.p2p import KEEP_OUTSIDE, EditSettings, edit_sample
from .segmenters import parse_weights
from .types import ATTNSEG_INVERSION, EDIT


class AttnSegPromptToPrompt:
    """Samples a source prompt and an edited prompt together from the same noise."""

    DESCRIPTION = ("Prompt-to-Prompt editing. The source and the edit are sampled together from the same noise. "
                   "For the first cross_replace of the steps the edit's cross-attention is the source's, token by "
                   "token (replace: swapped words take the source word's maps; refine: only unchanged tokens do); "
                   "for the first self_replace its self-attention (layers up to 32x32) is the source's. After "
                   "blend_start, outside the mask of the blend words (the union of the source's and the edit's "
                   "DiffSegmenter masks, or the mask input) the edit's prediction is the source's, so the rest of "
                   "the image is kept. To edit an input image, invert it (AttnSeg Invert Image) and connect the "
                   "inversion: both rows then start from the inverted noise, the source row reconstructs the image "
                   "and the edit keeps its layout (without one: VAE-encode it, set denoise below 1 and keep_outside "
                   "to 'input latent', which re-noises a copy). On Flux and SD3 (MM-DiT) the edit row has its own "
                   "text in every block, and for the first qk_replace of the steps it attends with the source row's "
                   "image queries and keys in the chosen blocks (exploring-mmdit); the blend reads the blend words' "
                   "image-to-text maps; cross_replace, self_replace and mode are UNet settings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x, SDXL, Flux, SD3); patched on "
                                           "a clone."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder: encodes both prompts and aligns their "
                                         "tokens."}),
            "source_prompt": ("STRING", {"multiline": True, "default": "a cat on a sofa", "tooltip": (
                "The prompt of the image to keep (the reference row).")}),
            "edit_prompt": ("STRING", {"multiline": True, "default": "a dog on a sofa", "tooltip": (
                "The source prompt with the change ('cat' -> 'dog'); both must fit the same number of 77-token "
                "chunks.")}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning for both rows (e.g. CLIPTextEncode of "
                                                     "an empty prompt)."}),
            "latent_image": ("LATENT", {"tooltip": "One latent: an empty latent, or a VAE-encoded image with "
                                                   "denoise < 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The noise seed; the source and the edit share the same noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of denoising steps (as KSampler)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (as KSampler; P2P's examples: 7.5)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm (as KSampler)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "How noise is removed over the steps "
                                                                          "(as KSampler)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "How much of the schedule runs (as KSampler): 1 for an empty latent; below 1 to edit an input "
                "image's latent.")}),
            "mode": (list(EDIT_MODES), {"default": "replace", "tooltip": "replace: word swaps keep the source "
                                        "word's layout; refine: changed words attend freely (added details)."}),
            "cross_replace": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "Fraction of the steps with the source's cross-attention."}),
            "self_replace": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "Fraction of the steps with the source's self-attention."}),
            "blend_words": ("STRING", {"default": "", "tooltip": "Comma-separated words of the object that "
                                       "changes, from either prompt (e.g. 'cat, dog'); empty: no local blend."}),
            "blend_start": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Fraction of the steps after which the blend applies."}),
            "mask_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Threshold on the blend words' DiffSegmenter maps."}),
            "dilate": ("INT", {"default": 1, "min": 0, "max": 16, "tooltip": "Grow the mask (latent cells)."}),
            "feather": ("INT", {"default": 1, "min": 0, "max": 16, "tooltip": "Soften its edge (latent cells)."}),
            "reweight_words": ("STRING", {"default": "", "tooltip": "Words of the edit prompt whose attention is "
                                          "scaled by reweight_factor (P2P's attention re-weighting)."}),
            "reweight_factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1, "tooltip": (
                "Multiplier of the reweight_words' attention during the cross-replace steps (1 = off; above 1 "
                "strengthens them, below 1 weakens them).")}),
            "keep_outside": (list(KEEP_OUTSIDE), {"default": KEEP_OUTSIDE[0], "tooltip": "What the image outside "
                             "the mask keeps: the source sample, or the input latent (editing an input image)."}),
            "segmenter_weights": ("STRING", {"default": "0.3,0.5,0.1,0.1", "tooltip": "DiffSegmenter's per-"
                                             "resolution weights for the blend mask, coarsest first."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Blend mask to use instead of the segmenter's (1 = edit)."}),
            "inversion": (ATTNSEG_INVERSION, {"tooltip": "An inversion of latent_image (AttnSeg Invert Image): "
                          "sampling starts from its noise (the seed is unused) on its schedule; steps, cfg, "
                          "scheduler and the source prompt must be the inversion's, the sampler euler or ddim, "
                          "denoise 1."}),
            "blocks": (list(BLOCK_CHOICES), {"default": AUTO, "tooltip": (
                "Flux / SD3: the blocks where the edit takes the source's image queries and keys, numbered as "
                "exploring-mmdit does (Flux: double blocks, then single). auto: the five the paper analysed for "
                "Flux-dev, SD3-medium or SD3.5-large, double blocks 0, 1 on the demo DiT, else all; custom: "
                "custom_blocks.")}),
            "custom_blocks": ("STRING", {"default": "", "tooltip": (
                "Flux / SD3, blocks 'custom': block numbers or ranges, e.g. '0, 1' or '11-18'.")}),
            "qk_replace": ("FLOAT", {"default": QK_REPLACE, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                "Flux / SD3: fraction of the steps with the source's image queries and keys (exploring-mmdit: "
                "0.2).")}),
        }}

    RETURN_TYPES = ("LATENT", "LATENT", "MASK", "STRING")
    RETURN_NAMES = ("edited", "source", "mask", "alignment")
    OUTPUT_TOOLTIPS = ("The edited latent (VAE Decode it).",
                       "The source prompt's latent, sampled from the same noise alongside the edit.",
                       "The blend mask used, at image size (1 = edited); all ones without blend words.",
                       "Text: where each token of the edit prompt takes its attention from in the source prompt (Flux / "
                       "SD3: the controlled blocks and steps).")
    FUNCTION = "edit"
    CATEGORY = EDIT

    def edit(self, model, clip, source_prompt, edit_prompt, negative, latent_image, seed, steps, cfg, sampler_name,
             scheduler, denoise, mode, cross_replace, self_replace, blend_words, blend_start, mask_threshold, dilate,
             feather, reweight_words, reweight_factor, keep_outside, segmenter_weights, mask=None, inversion=None,
             blocks=AUTO, custom_blocks="", qk_replace=QK_REPLACE):
        settings = EditSettings(mode, cross_replace, self_replace, blend_words, blend_start, mask_threshold, dilate,
                                feather, reweight_words, reweight_factor, keep_outside,
                                tuple(parse_weights(segmenter_weights, "segmenter_weights")), blocks, custom_blocks,
                                qk_replace)
        source, edited, used_mask, report = edit_sample(model, clip, source_prompt, edit_prompt, negative,
                                                        latent_image, seed, steps, cfg, sampler_name, scheduler,
                                                        denoise, settings, mask, inversion)
        return ({**latent_image, "samples": edited}, {**latent_image, "samples": source}, used_mask, report)


NODE_CLASS_MAPPINGS = {"AttnSegPromptToPrompt": AttnSegPromptToPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegPromptToPrompt": "AttnSeg Prompt-to-Prompt Edit"}
