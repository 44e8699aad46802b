"""Test-only ComfyUI nodes, installed by tests/comfy_server.py (test_nodes=True).

AttnSeg Test Tiny DiT Text Encoder stands in for DualCLIPLoader / TripleCLIPLoader,
whose full-size T5-XXL and CLIP-G cannot run in the tests: it returns the tiny
Flux / SD3 text encoders of tests/tiny_dit.py (ComfyUI's own encoder classes on
the tokenizers ComfyUI ships), with the weights tests/dit_files.py saved."""

import os
import sys
from pathlib import Path

import folder_paths

# The server imports this package through a symlink in its custom_nodes/; the real
# path leads back to the repository's tests/ folder and the modules there.
TESTS = Path(__file__).resolve().parents[2]
# comfy_env (imported by those modules) then finds the ComfyUI this server runs.
os.environ.setdefault("COMFYUI_PATH", os.path.dirname(os.path.abspath(folder_paths.__file__)))


class AttnSegTestTinyTextEncoder:
    DESCRIPTION = "Test only: a tiny Flux (CLIP-L + T5) or SD3 (CLIP-L + CLIP-G + T5) text encoder."
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing/attnseg"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["flux", "sd3"], {"tooltip": "The model family the encoder is for."})}}

    def load(self, family):
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        from dit_files import load_text_encoder

        return (load_text_encoder(family),)


NODE_CLASS_MAPPINGS = {"AttnSegTestTinyTextEncoder": AttnSegTestTinyTextEncoder}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnSegTestTinyTextEncoder": "AttnSeg Test Tiny DiT Text Encoder"}
