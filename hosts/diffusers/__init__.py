"""The diffusers host: fills the core's attention store from a diffusers
pipeline's UNet2DConditionModel (SD1.x, SD2.x, SDXL) and runs the presets on it.
Nothing here imports ComfyUI; see api.py for the entry points."""
