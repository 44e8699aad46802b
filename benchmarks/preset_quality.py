"""Every segmentation preset, run end to end as AttnSeg Segment runs it, on the
demo model's held-out scenes (thresholds tuned on other scenes, as in
segmentation_quality.py). Presets made for SD's layout are moved onto the demo
model's smaller UNet as each row says. Writes the README table between the
preset-quality markers.

    python benchmarks/preset_quality.py [--test 40 --tune 20] [--no-readme]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402

from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from demo import evaluate  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

START, END = "<!-- preset-quality:start -->", "<!-- preset-quality:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--tune", type=int, default=20)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, clip, vae = demo_model.load()
    methods = evaluate.PRESET_METHODS
    tune = [evaluate.scene(s) for s in evaluate.TUNE_SEEDS[:args.tune]]
    test = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:args.test]]
    part = "colour + shape"
    tuned = evaluate.score(model, clip, vae, tune, methods)
    chosen = {m.name: tuned.best_threshold(m.name, part) for m in methods}
    measured = evaluate.score(model, clip, vae, test, methods, thresholds=lambda m, p: (chosen[m],))
    rows = []
    for method in methods:
        miou = measured.miou(method.name, part, chosen[method.name])
        rule = method.preset.background
        rows.append([method.name, f"**{miou:.3f}**", rule if rule != "threshold" else f"threshold {chosen[method.name]:.2f}"
                     if method.preset.method != "goca" else f"offset {chosen[method.name]:+.1f}",
                     f"{measured.seconds_per_image(method.name):.2f}"])
        print(rows[-1], flush=True)
    text = markdown_table(
        f"Demo model, {len(test)} held-out scenes, thresholds tuned on {len(tune)} other scenes, each preset run as "
        f"AttnSeg Segment runs it (its own prompt template, passes and labelling) at twice the scene's size, CPU.",
        ["preset", "mIoU", "background rule", "s / image"], rows)
    print(text)
    if not args.no_readme:
        write_readme(text, START, END)


if __name__ == "__main__":
    main()
