"""Writes workflows/<name>.jpg, the thumbnails ComfyUI's template browser shows:
each workflow run as it opens (the demo model and the demo picture ship with the
pack) on a real ComfyUI server with this pack, its main output scaled to 256 px
wide.

    python scripts/thumbnails.py [NAME ...]    (default: every workflow)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from PIL import Image  # noqa: E402

from comfy_server import ComfyServer  # noqa: E402

# The output node whose image stands for each workflow.
MAIN_OUTPUT = {"segment-image": "4", "diffsegmenter-segment": "7", "generate-and-segment": "10", "iseg-segment": "8", "iseg-seeds": "7",
               "goca-segment": "7", "scfg-generate": "8", "p2p-edit-generated": "12", "p2p-edit-image": "11",
               "unsupervised-segments": "6", "flux-demo-segment-image": "7", "flux-demo-generate-and-segment": "10",
               "flux-demo-edit-image": "11"}
WIDTH = 256


def main() -> None:
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server:
        for name, node in MAIN_OUTPUT.items():
            if sys.argv[1:] and name not in sys.argv[1:]:
                continue
            workflow = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
            picture, = server.output_files(server.run(workflow))[node]
            with Image.open(picture) as image:
                image = image.convert("RGB")
                image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
                image.save(REPO / "workflows" / f"{name}.jpg", quality=88)
            print(f"workflows/{name}.jpg")


if __name__ == "__main__":
    main()
