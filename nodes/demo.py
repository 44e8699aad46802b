"""The embedded demo model: a tiny SD1-layout model trained on shape scenes that
ships with the pack, so every workflow runs without downloading weights."""

import os

import folder_paths

from ..attnseg import AttnSegError
from ..hosts.comfyui import demo_model
from .types import LOADERS

# models/attnseg/ holds checkpoints written by demo/train.py (retrained or other layouts).
MODEL_FOLDER = "attnseg"
SHIPPED = "attnseg-shapes (shipped)"
if MODEL_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (
        [os.path.join(folder_paths.models_dir, MODEL_FOLDER)], {".safetensors"})


class AttnSegDemoModelLoader:
    """Loads the pack's shipped demo checkpoint."""

    DESCRIPTION = ("A tiny SD1-layout model (ComfyUI's UNet, SD1 CLIP with the real tokenizer, a small "
                   "VAE) trained on coloured shapes: circle, square, triangle, star in red, green, blue, yellow, "
                   "purple, orange. It generates at 128 px and segments best at twice an image's size; prompt it "
                   "like 'a red circle and a blue square'. "
                   "Use it to try the segmenters and guidance without downloading a model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "checkpoint": ([SHIPPED] + folder_paths.get_filename_list(MODEL_FOLDER), {
                "default": SHIPPED, "tooltip": "The shipped model, or a checkpoint written by demo/train.py "
                                              "placed in models/attnseg/."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The demo UNet, loaded and offloaded by ComfyUI's model management as any checkpoint.",
                       "The demo text encoder (SD1 CLIP layout with the real tokenizer, 64 wide).",
                       "The demo autoencoder (SD1 latent: 4 channels, 8x smaller, SD1.5's latent factor).")
    FUNCTION = "load"
    CATEGORY = LOADERS

    def load(self, checkpoint=SHIPPED):
        if checkpoint == SHIPPED:
            if not demo_model.CHECKPOINT.is_file():
                raise AttnSegError(f"checkpoint: the shipped demo checkpoint {demo_model.CHECKPOINT} is missing. "
                                   f"Reinstall the pack, or rebuild it with 'python demo/train.py'.")
            path = demo_model.CHECKPOINT
        else:
            path = folder_paths.get_full_path(MODEL_FOLDER, checkpoint)
            if path is None:
                raise AttnSegError(f"checkpoint: '{checkpoint}' is not in models/{MODEL_FOLDER}/. Refresh the node "
                                   f"list, or choose '{SHIPPED}'.")
        # Prompt embeddings from models/embeddings/, as Load Checkpoint reads them.
        return demo_model.load(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))


NODE_CLASS_MAPPINGS = {"AttnSegDemoModelLoader": AttnSegDemoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegDemoModelLoader": "AttnSeg Demo Model Loader"}
