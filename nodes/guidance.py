"""Guidance from the model's own attention: S-CFG."""

from ..attnseg import AttnSegError
from ..attnseg.layers import parse_picks
from ..attnseg.presets import find_preset, names
from ..attnseg.scfg import RATE_LIMITS, RELEASED_BLUR
from ..hosts.comfyui.scfg import WORDS_CHOICE, SCFGSettings, install_scfg
from .types import GUIDANCE

RELEASED_PRESET = "S-CFG (released code)"
# display name -> the host's foreground rule
FOREGROUND_CHOICES = {"released code (BOS vs the sum of the other tokens)": "released", WORDS_CHOICE: "words"}
# display name -> the host's map source
MAP_SOURCE_CHOICES = {"S-CFG (released code)": "scfg", "GoCA": "goca"}


class AttnSegSCFG:
    """S-CFG: spatially adaptive classifier-free guidance."""

    DESCRIPTION = ("Patches the model so every sampling step rescales CFG per region: the step's attention (a UNet's "
                   "two coarsest resolutions, a DiT's dit_blocks; both CFG halves) splits the latent into one "
                   "region per prompt token, and "
                   "each region's guidance is scaled so its mean strength matches the foreground's: "
                   "eps = eps_u + cfg * rho * (eps_c - eps_u). The preset 'S-CFG (released code)' computes what the "
                   "authors' released code does; 'custom' uses rate_min, rate_max, blur and foreground. map_source "
                   "'GoCA' builds the regions with GoCA's aggregation of the same layers instead (GoCA's S-CFG "
                   "integration). Works with KSampler, SamplerCustom and guiders.")

    @classmethod
    def INPUT_TYPES(cls):
        custom = " Used only with preset 'custom'."
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch; a patched clone is returned."}),
            "rate_min": ("FLOAT", {"default": RATE_LIMITS[0], "min": 0.01, "max": 10.0, "step": 0.05,
                                   "tooltip": "Lower clamp of the per-region rate rho (released 0.8); also rho "
                                              "everywhere when a step finds no foreground." + custom}),
            "rate_max": ("FLOAT", {"default": RATE_LIMITS[1], "min": 0.01, "max": 10.0, "step": 0.05,
                                   "tooltip": "Upper clamp of rho (released 3.0); rho is also kept <= 15 / cfg."
                                              + custom}),
            "blur": ("INT", {"default": RELEASED_BLUR, "min": 0, "max": 15, "step": 1,
                             "tooltip": "Gaussian blur kernel of the token maps and of rho (odd; 0 = off; reflected "
                                        "edges). 3 is the released kernel (sigma 0.5 * sqrt(2)); other sizes scale "
                                        "sigma with the kernel (kernel * sqrt(2) / 6)." + custom}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Where in the schedule S-CFG starts (0 = first step); plain CFG "
                                                   "before. Applies with either preset."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Where in the schedule S-CFG stops (1 = last step); plain CFG "
                                                 "after. Applies with either preset."}),
        }, "optional": {
            # optional and last, so workflows saved before they existed still load and validate
            "preset": (names("scfg"), {"default": RELEASED_PRESET,
                                       "tooltip": "'S-CFG (released code)': the authors' released values (rate "
                                                  "0.8..3.0, blur 3 with their kernel, their foreground rule), "
                                                  "ignoring rate_min, rate_max, blur and foreground. 'custom': "
                                                  "those inputs are used."}),
            "foreground": (list(FOREGROUND_CHOICES), {
                "default": next(iter(FOREGROUND_CHOICES)),
                "tooltip": "How the foreground, whose mean guidance strength every region is scaled to, is found. "
                           "Released code: from the uncond half, pixels where the sum of all non-BOS token maps (EOS "
                           "and padding included) is above the BOS map, each map divided by its mean. Words (ours, "
                           "for Flux, whose T5 sequence has no BOS): from the cond half, pixels where the positive "
                           "prompt's word tokens together are above the other tokens (EOS, padding) together; needs "
                           "the positive from AttnSeg Text Encode." + custom}),
            "rescale_multiplier": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "RescaleCFG's rescale applied after S-CFG's spatial guidance (RescaleCFG's default 0.7; 0 = off). "
                "Use this instead of a RescaleCFG node: ComfyUI has one CFG-function slot, and a RescaleCFG "
                "after S-CFG replaces it (the run then stops with an error). Applies with either preset.")}),
            "map_source": (list(MAP_SOURCE_CHOICES), {"default": next(iter(MAP_SOURCE_CHOICES)), "tooltip": (
                "Where each step's region maps come from (the same layers are captured either way). 'S-CFG "
                "(released code)': S-CFG's own maps (head mean, (S + 3 S^2)/4 per layer, blur, mean-normalised; "
                "regions over every token; foreground by the rule above). 'GoCA': GoCA's S-CFG integration: "
                "output-weighted heads, automatic layer weights, rescaling by the prompt's word tokens, S^2 "
                "propagation; regions among BOS and the word tokens; foreground where the uncond half's BOS map "
                "is below 0.5 (blur and foreground inputs then apply to the rate only). GoCA needs the positive "
                "prompt from AttnSeg Text Encode (preset custom, class_weight 1), which records the token layout. "
                "Applies with either preset.")}),
            "dit_blocks": ("STRING", {"default": "", "tooltip": (
                "DiT models only: the blocks whose I2T and I2I maps S-CFG reads each step, as 'TYPE INDEX' "
                "separated by ';' (TYPE double, single or joint; INDEX from 0 or *), e.g. 'single 0'. Empty: "
                "Seg4Diff's block 9 on SD3, GoCA's blocks 12 and 18 on Flux (the middle block on a model without "
                "them). Leave empty on a UNet. Applies with either preset.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched clone of the model whose CFG is S-CFG's, for KSampler, SamplerCustom or a guider "
                       "(the connected model is not modified).",)
    FUNCTION = "patch"
    CATEGORY = GUIDANCE

    def patch(self, model, rate_min, rate_max, blur, start_percent, end_percent, preset=RELEASED_PRESET,
              foreground=next(iter(FOREGROUND_CHOICES)), rescale_multiplier=0.0,
              map_source=next(iter(MAP_SOURCE_CHOICES)), dit_blocks=""):
        chosen = find_preset(preset, "scfg")
        if chosen is not None:
            released = chosen.settings
            rate_min, rate_max, blur, rule = released.rate_min, released.rate_max, released.blur, released.foreground
        else:
            rule = FOREGROUND_CHOICES.get(foreground, foreground)  # the display name or the rule itself
        source = MAP_SOURCE_CHOICES.get(map_source, map_source)  # the display name or the source itself
        if source not in MAP_SOURCE_CHOICES.values():
            raise AttnSegError(f"map_source: {map_source!r} is not one of {', '.join(map(repr, MAP_SOURCE_CHOICES))}.")
        settings = SCFGSettings(rate_min, rate_max, blur, start_percent, end_percent, rule, rescale_multiplier,
                                source, dit_blocks=parse_picks(dit_blocks, "dit_blocks"))
        patched = model.clone()
        install_scfg(patched, settings)
        return (patched,)


NODE_CLASS_MAPPINGS = {"AttnSegSCFG": AttnSegSCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegSCFG": "AttnSeg S-CFG (spatially adaptive CFG)"}
