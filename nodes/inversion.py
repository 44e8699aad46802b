"""Inverting an input image, so an editor can resample it: the noise latent the
sampler draws the image from again, and null-text's per-step embeddings."""

import comfy.samplers

from ..attnseg.inversion import INVERSION_METHODS, NULL_TEXT_EPSILON, NULL_TEXT_ITERATIONS
from ..hosts.comfyui.inversion import invert
from ..hosts.comfyui.progress import comfy_progress
from .types import ATTNSEG_INVERSION, EDIT


class AttnSegInvert:
    """Inverts a VAE-encoded image with its prompt (UNet: DDIM, negative-prompt or null-text inversion; Flux and
    SD3: RF inversion)."""

    DESCRIPTION = ("Inverts an image: runs the Euler (DDIM) sampler's ODE backwards from the VAE-encoded image to "
                   "the noise it would be sampled from, on the scheduler's sigmas. DDIM inverts at the cfg it will "
                   "be sampled at (exact at cfg 1, drifts with guidance); negative-prompt (Miyake et al.) inverts "
                   "at cfg 1 and the editor samples with the source prompt as the negative; null-text (Mokady et "
                   "al.) inverts at cfg 1 and then optimises the unconditional embedding at every step so the "
                   "guided sampler lands on that trajectory (the closest reconstruction, the slowest). On Flux and "
                   "SD3 (rectified flow) RF inversion runs the flow ODE backwards with the Euler step, at the cfg "
                   "it will be sampled at. Feed the inversion to Prompt-to-Prompt, whose source row then "
                   "reconstructs the image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model that will edit the image (SD1.x, SD2.x, SDXL, "
                                           "Flux, SD3); used on clones."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder: encodes the source prompt."}),
            "source_prompt": ("STRING", {"multiline": True, "default": "a cat on a sofa", "tooltip": (
                "A prompt describing the image; the editor's source prompt must be the same.")}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (e.g. CLIPTextEncode of an empty "
                                                     "prompt): null-text starts from its embedding; give the "
                                                     "editor the same."}),
            "latent_image": ("LATENT", {"tooltip": "The VAE-encoded image to invert (one image)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                              "tooltip": "Sampling steps; the editor must sample with the same."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The cfg the editor will sample at (DDIM inverts at it; null-text "
                                         "optimises for it)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The sigma schedule (as KSampler); the "
                                                                          "editor must use the same."}),
            "method": (list(INVERSION_METHODS), {"default": INVERSION_METHODS[0], "tooltip": (
                "UNet models: null-text: optimised per step (best reconstruction, slowest); negative-prompt: no "
                "optimisation, source prompt as the negative when sampling; DDIM: plain inversion at cfg. Flux / "
                "SD3: RF inversion (the flow ODE backwards, Euler steps, at cfg).")}),
            "null_text_iterations": ("INT", {"default": NULL_TEXT_ITERATIONS, "min": 0, "max": 100, "tooltip": (
                "null-text: Adam iterations per step at most (the paper: 10); ignored by the other methods.")}),
            "early_stop_epsilon": ("FLOAT", {"default": NULL_TEXT_EPSILON, "min": 0.0, "max": 1.0,
                                             "step": 1e-6, "round": False, "tooltip": (
                "null-text: a step stops once its loss is below this plus a tolerance growing along the schedule "
                "(the paper: 1e-5 + 2e-5 per step of 50).")}),
        }}

    RETURN_TYPES = (ATTNSEG_INVERSION, "LATENT", "STRING")
    RETURN_NAMES = ("inversion", "noise", "report")
    OUTPUT_TOOLTIPS = ("The inversion, for Prompt-to-Prompt's inversion input.",
                       "The inverted latent at the first sigma (SamplerCustom with add_noise off, euler, the same "
                       "sigmas and cfg, redraws the image; UNet DDIM and negative-prompt only: on a rectified flow "
                       "its noise scaling drops the latent at sigma 1).",
                       "Text: the method, schedule, memory held and null-text's iterations per step.")
    FUNCTION = "invert"
    CATEGORY = EDIT

    def invert(self, model, clip, source_prompt, negative, latent_image, steps, cfg, scheduler, method,
               null_text_iterations, early_stop_epsilon):
        with comfy_progress():
            inversion = invert(model, clip, source_prompt, negative, latent_image, steps, cfg, scheduler, method,
                               null_text_iterations, early_stop_epsilon)
        return (inversion, {**latent_image, "samples": inversion.noise}, inversion.describe())


NODE_CLASS_MAPPINGS = {"AttnSegInvert": AttnSegInvert}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegInvert": "AttnSeg Invert Image"}
