"""ComfyUI node classes: parse inputs, call the host and core, format outputs.

Each feature module is loaded on its own, so one that fails to import (an
incompatible ComfyUI, say) is logged and skipped instead of taking the whole
pack down."""

import importlib
import logging

MODULES = ("demo", "demo_image", "text", "captions", "capture", "segment", "segmenters", "iseg", "goca", "concept",
           "masks", "guidance", "inversion", "editing",
           "unsupervised")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for name in MODULES:
    try:
        module = importlib.import_module(f".{name}", __name__)
    except Exception:
        logging.exception("AttnSeg: the %s nodes could not be loaded and are left out", name)
        continue
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)
