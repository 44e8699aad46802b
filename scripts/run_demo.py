"""Runs workflows/api/segment-image.json headless on a real ComfyUI server as the
template opens: the embedded demo model (AttnSeg Demo Model Loader) on
demo/attnseg-demo.png (AttnSeg Demo Image). Copies the masks and the preview to
out/demo/ (or --out)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from comfy_server import ComfyServer  # noqa: E402

DEMO_IMAGE = REPO / "demo" / "attnseg-demo.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    args = parser.parse_args()
    workflow = json.loads((REPO / "workflows" / "api" / "segment-image.json").read_text())
    with tempfile.TemporaryDirectory(prefix="attnseg-demo-") as base:
        with ComfyServer(Path(base)) as server:
            print(f"ComfyUI at {server.url}: running segment-image on {DEMO_IMAGE.name} with the demo model")
            outputs = server.output_files(server.run(workflow))
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        names = {"4": "preview", "6": "mask"}
        for node_id, files in outputs.items():
            for i, path in enumerate(files):
                target = args.out / f"{names.get(node_id, node_id)}-{i}.png"
                shutil.copy(path, target)
                print(f"wrote {target}")
    print(f"masks and preview are in {args.out}")


if __name__ == "__main__":
    main()
