"""Guidance from the model's own attention: S-CFG."""

from ..attnseg.scfg import RATE_LIMITS
from ..hosts.comfyui.scfg import SCFGSettings, install_scfg
from .types import CATEGORY


class AttnSegSCFG:
    """S-CFG: spatially adaptive classifier-free guidance."""

    DESCRIPTION = ("Patches the model so every sampling step rescales CFG per region: the step's attention (the two "
                   "coarsest resolutions, both CFG halves) splits the latent into one region per prompt token, and "
                   "each region's guidance is scaled so its mean strength matches the foreground's: "
                   "eps = eps_u + cfg * rho * (eps_c - eps_u). Works with KSampler, SamplerCustom and guiders.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "rate_min": ("FLOAT", {"default": RATE_LIMITS[0], "min": 0.01, "max": 10.0, "step": 0.05,
                                   "tooltip": "Lower clamp of the per-region rate rho (paper 0.8)."}),
            "rate_max": ("FLOAT", {"default": RATE_LIMITS[1], "min": 0.01, "max": 10.0, "step": 0.05,
                                   "tooltip": "Upper clamp of rho (paper 3.0); rho is also kept <= 15 / cfg."}),
            "blur": ("INT", {"default": 3, "min": 0, "max": 15, "step": 1,
                             "tooltip": "Gaussian blur kernel of the token maps and of rho (odd; 0 = off)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Plain CFG outside start..end of the schedule."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, rate_min, rate_max, blur, start_percent, end_percent):
        patched = model.clone()
        install_scfg(patched, SCFGSettings(rate_min, rate_max, blur, start_percent, end_percent))
        return (patched,)


NODE_CLASS_MAPPINGS = {"AttnSegSCFG": AttnSegSCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegSCFG": "AttnSeg S-CFG (spatially adaptive CFG)"}
