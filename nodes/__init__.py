"""ComfyUI node classes: parse inputs, call the host and core, format outputs."""

from . import capture, demo, guidance, iseg, masks, segmenters, text

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for module in (demo, text, capture, segmenters, iseg, masks, guidance):
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)
