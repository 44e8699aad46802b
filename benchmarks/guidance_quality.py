"""S-CFG against plain CFG on the demo model: the fraction of named objects a
sample draws where its caption says (the named colour present, stronger than
any unnamed colour, and mostly inside the object's own attention mask; see
demo/evaluate.py), over held-out captions, at several CFG scales, S-CFG with
its released-code preset and its two map sources (S-CFG's own maps, and GoCA's
aggregation of the same layers: GoCA's S-CFG integration), every variant on
the same captions and seeds; also the share of named objects whose shape is
drawn in any colour (demo/evaluate.py shapes_present: prompt adherence that
does not depend on the demo model's colour binding), and the share of latent
pixels each S-CFG variant's foreground holds, over all its steps. Writes the table into
README.md between the guidance-quality markers (not with --no-readme).

    python benchmarks/guidance_quality.py [--captions 40] [--scales 3,5,7.5] [--no-readme]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui import scfg as scfg_host  # noqa: E402
from demo import evaluate  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

SCALES = (3.0, 5.0, 7.5)
START, END = "<!-- guidance-quality:start -->", "<!-- guidance-quality:end -->"


def recording(rule, shares: list):
    """``rule`` (a foreground function of the S-CFG host) that also notes its mask's pixel share."""
    def record(*args, **kwargs):
        mask = rule(*args, **kwargs)
        shares.append(mask.float().mean().item())
        return mask
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES), help="comma-separated CFG scales")
    parser.add_argument("--no-readme", action="store_true", help="print the table only; leave README.md alone")
    args = parser.parse_args()
    model, clip, vae = demo_model.load()
    node = PACK.NODE_CLASS_MAPPINGS["AttnSegSCFG"]()
    released = (0.8, 3.0, 3, 0.0, 1.0, "S-CFG (released code)")
    variants = {"CFG": model,
                "S-CFG": node.patch(model, *released, map_source="S-CFG (released code)")[0],
                "S-CFG (GoCA maps)": node.patch(model, *released, map_source="GoCA")[0]}
    shares = []  # per S-CFG step: the share of latent pixels in the foreground (either map source)
    for rule in ("foreground_mask", "goca_foreground"):  # each source's foreground, as the patch looks it up
        setattr(scfg_host, rule, recording(getattr(scfg_host, rule), shares))
    scenes = [evaluate.scene(seed) for seed in evaluate.TEST_SEEDS[:args.captions]]
    captions = [item.caption for item in scenes]
    ceiling = [ok for item in scenes for ok in evaluate.shapes_present(item.image, item.caption)]
    rows = []
    for scale in map(float, args.scales.split(",")):
        row = [f"{scale:g}"]
        for name, guided in variants.items():
            shares.clear()
            began, results, shapes = time.perf_counter(), [], []
            for index, caption in enumerate(captions):  # the same captions and seeds for every variant
                image, masks = evaluate.generate(guided, clip, vae, caption, index, cfg=scale)
                results += evaluate.drawn(image, masks, caption)
                shapes += evaluate.shapes_present(image, caption)
            seconds = (time.perf_counter() - began) / len(captions)
            share = sum(ok for _, ok, _ in results) / len(results)
            row += [f"{share:.3f}", f"{sum(shapes) / len(shapes):.3f}", f"{seconds:.2f}"]
            if name != "CFG":
                row.append(f"{sum(shares) / max(1, len(shares)):.2f}")
        rows.append(row)
        print(" | ".join(row), flush=True)
    columns = ["cfg"]
    for name in variants:
        columns += [f"{name}: objects drawn", f"{name}: shapes present", f"{name}: s / image"]
        if name != "CFG":
            columns.append(f"{name}: foreground share")
    text = markdown_table(
        f"Demo model, {len(captions)} held-out captions (1-3 objects), one seed each, 20 euler steps, CPU: the "
        f"share of named objects drawn where the caption says; S-CFG with its released-code preset and its own "
        f"maps or GoCA's (map_source GoCA: GoCA's S-CFG integration on the same layers), and the share of latent "
        f"pixels each one's foreground holds (mean over steps). Shapes present: the share of named objects whose "
        f"shape is drawn in any colour (colour-blind prompt adherence; on the captions' own rendered scenes it is "
        f"{sum(ceiling) / len(ceiling):.3f}, the misses being objects mostly hidden by another).", columns, rows)
    print(text)
    if not args.no_readme:
        write_readme(text, START, END)


if __name__ == "__main__":
    main()
