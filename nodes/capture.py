import dataclasses

import comfy.samplers

from ..attnseg import AttnSegError
from ..attnseg.layers import parse_heads, parse_picks
from ..attnseg.presets import CAPTURE_METHODS, CUSTOM, find_preset
from ..hosts.comfyui.capture import GOCA_REFERENCE_FACTOR, CapturePlan, StepRange
from ..hosts.comfyui.passes import capture_sample, parse_timesteps, segment_image
from .presets import preset_input
from .types import ATTNSEG_STORE, CAPTURE

DEFAULT_PRESET = "DiffSegmenter (released code)"

SELF_ATTENTION_MODES = ("last step", "captured steps", "off")
HEADS = {"mean": "mean", "auto (GoCA)": "auto"}
SELF_LAYERS = ("finest", "all (GoCA)")


def goca_inputs(what: str):
    """Optional capture inputs: GoCA's, layer and head picks, and the preset (optional
    so older workflows still validate)."""
    return {
        "heads": (list(HEADS), {"default": "mean", "tooltip": "How cross-attention heads are reduced as they are "
                                "captured: their mean, or GoCA's per-pixel weights from each head's share of "
                                "the attention output."}),
        "self_layers": (SELF_LAYERS, {"default": "finest", "tooltip": "Self-attention of the finest layers "
                                      "(enough for DiffSegmenter, iSeg and GoCA's propagation), or of every layer "
                                      "plus a reference layer's queries, which GoCA's automatic layer weights need."}),
        "self_layer_picks": ("STRING", {"default": "", "tooltip": (
            "custom: the self-attention layers to record instead of self_layers, as 'BLOCK LEVEL INDEX' separated "
            "by ';' (BLOCK input, middle or output; LEVEL 0 = the finest resolution with attention; INDEX the "
            "layer's place among that block's layers there, from 0, or * for all). iSeg's layer on SD1.5/2.1: "
            "'output 0 1'. On a DiT 'TYPE INDEX' (double, single or joint), e.g. 'double 12; double 18'. "
            "Empty: self_layers decides (a DiT: GoCA's blocks 12 and 18 on Flux, block 9 on SD3).")}),
        "self_heads": ("STRING", {"default": "", "tooltip": (
            "custom: the heads (from 0) whose mean is kept for those self-attention layers, e.g. '1, 2' "
            "(iSeg); chosen inside the hook, the others are never stored. Empty: every head.")}),
        **preset_input(CAPTURE_METHODS, DEFAULT_PRESET, what),
    }


def with_goca(plan: CapturePlan, heads: str, self_layers: str, self_layer_picks: str = "",
              self_heads: str = "") -> CapturePlan:
    if heads not in HEADS or self_layers not in SELF_LAYERS:
        raise AttnSegError(f"heads / self_layers: '{heads}' / '{self_layers}' are not among "
                           f"{', '.join(HEADS)} / {', '.join(SELF_LAYERS)}.")
    every = self_layers != "finest"
    return dataclasses.replace(plan, cross_heads=HEADS[heads], self_every_layer=every,
                               reference_factor=GOCA_REFERENCE_FACTOR if every else None,
                               self_layers=parse_picks(self_layer_picks, "self_layer_picks"),
                               self_heads=parse_heads(self_heads, "self_heads"), source="custom")


class AttnSegSegmentImage:
    """One denoising pass over an input image that records the model's attention."""

    DESCRIPTION = ("Encodes the image, noises it to the timestep and runs the model once (cond branch), "
                   "recording cross-attention of every layer and self-attention of the finest layers. "
                   "Several timesteps are averaged (DiffSegmenter: 1,50,100,150).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model whose attention is recorded (SD1.x, SD2.x, SDXL, "
                                           "Flux, SD3/SD3.5; on a DiT the image x text and image x image parts of "
                                           "its joint attention); "
                                           "it is patched on a clone, never modified."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: the image is encoded to a latent (posterior mean)."}),
            "image": ("IMAGE", {"tooltip": "Any size and aspect ratio; a batch is segmented image by image "
                                           "in one pass."}),
            "conditioning": ("CONDITIONING", {"tooltip": "From AttnSeg Text Encode."}),
            "timesteps": ("STRING", {"default": "100", "tooltip": "Noise level(s) out of 1000, comma separated; "
                                                                   "the maps are averaged over them."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The noise draw added to the latent (one draw for all timesteps)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                   "tooltip": "Longer side of the image the model sees (aspect kept); "
                                              "512 for SD1.x/2.x, 1024 for SDXL, Flux and SD3."}),
        }, "optional": goca_inputs("what the pass records (layers, heads, timesteps, resolution, seed)")}

    RETURN_TYPES = (ATTNSEG_STORE,)
    RETURN_NAMES = ("attention",)
    OUTPUT_TOOLTIPS = ("The recorded attention (cross-attention maps per layer, self-attention of the chosen "
                       "layers, the prompt's class positions), for a segmenter: DiffSegmenter, iSeg, GoCA, Seeds.",)
    FUNCTION = "segment"
    CATEGORY = CAPTURE

    def segment(self, model, vae, image, conditioning, timesteps, seed, resolution, heads="mean",
                self_layers="finest", self_layer_picks="", self_heads="", preset=CUSTOM):
        chosen = find_preset(preset, CAPTURE_METHODS)
        if chosen is None:
            plan = with_goca(CapturePlan(), heads, self_layers, self_layer_picks, self_heads)
            steps, keep = parse_timesteps(timesteps), False
        else:
            setup = chosen.capture
            plan, steps, keep = CapturePlan.from_setup(setup, chosen.name), list(setup.timesteps), setup.keep_timesteps
            seed, resolution = setup.seed, setup.resolution
        store = segment_image(model, vae, image, conditioning, steps, seed, resolution, plan, keep)
        return (store,)


class AttnSegCaptureSampler:
    """KSampler that also records attention while it samples."""

    DESCRIPTION = ("The stock KSampler (capture off: the same latent bit for bit; on: equal up to float rounding, "
                   "~1e-4, from the captured layers' chunked softmax) that also outputs the attention of the "
                   "chosen steps: cross-attention of every layer, self-attention of the finest layers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent; its attention is "
                                           "recorded on a patched clone."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise (as KSampler)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of denoising steps (as KSampler)."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (as KSampler): higher follows the prompt "
                                         "more closely; too high hurts quality."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm (as KSampler). "
                             "A fixed-step sampler: dpm_adaptive chooses its own steps and is refused with capture on."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "How noise is removed over the steps "
                                                                          "(as KSampler)."}),
            "positive": ("CONDITIONING", {"tooltip": "From AttnSeg Text Encode, so the maps carry the classes."}),
            "negative": ("CONDITIONING", {"tooltip": "What to steer away from (as KSampler); its branch is not "
                                                     "recorded."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise: an empty latent, or a VAE-encoded "
                                                   "image with denoise < 1."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "How much of the schedule runs (as KSampler; 1 = all of it); must be "
                                             "above 0 with capture on."}),
            "capture": ("BOOLEAN", {"default": True, "tooltip": "Off: exactly the stock KSampler, no store."}),
            "capture_start_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                           "tooltip": "First step whose attention is recorded (0 = the first)."}),
            "capture_end_step": ("INT", {"default": -1, "min": -10000, "max": 10000,
                                         "tooltip": "Inclusive; negative counts back from the last step (-1)."}),
            "self_attention": (SELF_ATTENTION_MODES, {"tooltip": "Self-attention is large: by default it is "
                                                                  "taken at the last captured step only."}),
        }, "optional": goca_inputs("which layers and heads are recorded (the step inputs still apply)")}

    RETURN_TYPES = ("LATENT", ATTNSEG_STORE)
    RETURN_NAMES = ("latent", "attention")
    OUTPUT_TOOLTIPS = ("The denoised latent (as KSampler's).",
                       "The attention recorded over the captured steps (averaged), for a segmenter. With "
                       "capture off it holds nothing, and a segmenter connected to it says so.")
    FUNCTION = "sample"
    CATEGORY = CAPTURE

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise, capture, capture_start_step, capture_end_step, self_attention, heads="mean",
               self_layers="finest", self_layer_picks="", self_heads="", preset=CUSTOM):
        plan = None
        chosen = find_preset(preset, CAPTURE_METHODS)
        if capture:
            plan = step_plan(steps, capture_start_step, capture_end_step, self_attention)
            if chosen is None:
                plan = with_goca(plan, heads, self_layers, self_layer_picks, self_heads)
            else:
                layers = CapturePlan.from_setup(chosen.capture, chosen.name)
                plan = dataclasses.replace(layers, cross_steps=plan.cross_steps, self_steps=plan.self_steps)
        latent, store = capture_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                       latent_image, denoise, plan)
        return (latent, store)


def step_plan(steps: int, start: int, end: int, self_attention: str) -> CapturePlan:
    """The sampler's step inputs as a plan, checked against the step count."""
    last = end if end >= 0 else steps + end
    if not 0 <= start <= last < steps:
        raise AttnSegError(f"capture_start_step / capture_end_step: steps {start}..{end} select nothing of a "
                           f"{steps}-step run. Use 0 and -1 to capture every step.")
    cross = StepRange(start, last)
    self_steps = {"last step": StepRange(last, last), "captured steps": cross, "off": None}[self_attention]
    return CapturePlan(cross_steps=cross, self_steps=self_steps)


NODE_CLASS_MAPPINGS = {"AttnSegSegmentImage": AttnSegSegmentImage, "AttnSegCaptureSampler": AttnSegCaptureSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegSegmentImage": "AttnSeg Capture Image Attention",
                              "AttnSegCaptureSampler": "AttnSeg KSampler (capture attention)"}
