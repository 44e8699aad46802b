"""AttnSeg: training-free open-vocabulary segmentation from the diffusion model
already in your ComfyUI graph."""

import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:  # the web extension's routes; the nodes work without them (and without a server)
    from . import routes  # noqa: F401  (registers the routes)
except Exception:
    logging.getLogger(__name__).info("AttnSeg: server routes not registered (no ComfyUI server running)")

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
