"""The embedded demo models: a tiny SD1-layout model and a tiny Flux-layout model,
both trained on shape scenes, that ship with the pack, so every workflow runs
without downloading weights."""

import os

import folder_paths

from ..attnseg import AttnSegError
from ..hosts.comfyui import demo_dit, demo_model
from .types import LOADERS

# models/attnseg/ holds checkpoints written by demo/train.py or demo/train_dit.py (retrained or other layouts).
MODEL_FOLDER = "attnseg"
SHIPPED = "attnseg-shapes (shipped)"
SHIPPED_DIT = "attnseg-shapes-dit (shipped, Flux layout)"
SHIPPED_FILES = {SHIPPED: demo_model.CHECKPOINT, SHIPPED_DIT: demo_dit.CHECKPOINT}
if MODEL_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (
        [os.path.join(folder_paths.models_dir, MODEL_FOLDER)], {".safetensors"})


class AttnSegDemoModelLoader:
    """Loads one of the pack's shipped demo checkpoints, or one retrained into models/attnseg/."""

    DESCRIPTION = ("Tiny models trained on coloured shapes: circle, square, triangle, star in red, green, blue, "
                   "yellow, purple, orange. 'attnseg-shapes': SD1 layout (ComfyUI's UNet, SD1 CLIP with the real "
                   "tokenizer, a small VAE); generates at 128 px and segments best at twice an image's size. "
                   "'attnseg-shapes-dit': Flux layout (ComfyUI's Flux: 2 double + 4 single blocks; T5 + CLIP-L "
                   "with the real tokenizers; the same VAE), Flux's flow-matching sampling with real CFG (no "
                   "guidance embedding); trained at 128 to 384 px. Prompt either like 'a red circle and a blue "
                   "square'. Use them to try the segmenters and guidance without downloading a model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "checkpoint": ([SHIPPED, SHIPPED_DIT] + folder_paths.get_filename_list(MODEL_FOLDER), {
                "default": SHIPPED, "tooltip": "A shipped model (the UNet one, or the Flux-layout DiT), or a "
                                              "checkpoint written by demo/train.py or demo/train_dit.py placed in "
                                              "models/attnseg/ (which of the two is read from the file)."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The demo diffusion model (UNet or Flux), loaded and offloaded by ComfyUI's model management "
                       "as any checkpoint.",
                       "The demo text encoder: SD1 CLIP 64 wide (UNet model), or Flux's T5 + CLIP-L pair, 64 and "
                       "32 wide (DiT model), on the real tokenizers.",
                       "The demo autoencoder, one for both (SD1 latent: 4 channels, 8x smaller, SD1.5's latent "
                       "factor).")
    FUNCTION = "load"
    CATEGORY = LOADERS

    def load(self, checkpoint=SHIPPED):
        if checkpoint in SHIPPED_FILES:
            path = SHIPPED_FILES[checkpoint]
            if not path.is_file():
                script = "demo/train_dit.py" if checkpoint == SHIPPED_DIT else "demo/train.py"
                raise AttnSegError(f"checkpoint: the shipped demo checkpoint {path} is missing. Reinstall the pack, "
                                   f"or rebuild it with 'python {script}'.")
        else:
            path = folder_paths.get_full_path(MODEL_FOLDER, checkpoint)
            if path is None:
                raise AttnSegError(f"checkpoint: '{checkpoint}' is not in models/{MODEL_FOLDER}/. Refresh the node "
                                   f"list, or choose '{SHIPPED}'.")
        loader = demo_dit.load if demo_dit.is_dit_checkpoint(path) else demo_model.load
        # Prompt embeddings from models/embeddings/, as Load Checkpoint reads them.
        return loader(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))


NODE_CLASS_MAPPINGS = {"AttnSegDemoModelLoader": AttnSegDemoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegDemoModelLoader": "AttnSeg Demo Model Loader"}
