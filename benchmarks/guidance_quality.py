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

--dit: the same on the DiT demo model (Flux layout): S-CFG with the words foreground
rule (its T5 sequence has no BOS for the released one), reading the single blocks
(dit_blocks 'single *', the blocks that localise on this model), against CFG; also
the share of the drawn objects' pixels inside the foreground (mean over its steps),
to set against the foreground's own share. Its table goes between the
guidance-quality-dit markers.

    python benchmarks/guidance_quality.py [--captions 40] [--scales 3,5,7.5] [--dit] [--no-readme]
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

import torch  # noqa: E402

from attnseg_pack.hosts.comfyui import demo_dit, demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui import scfg as scfg_host  # noqa: E402
from demo import evaluate  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

SCALES = (3.0, 5.0, 7.5)
MARKERS = {False: ("<!-- guidance-quality:start -->", "<!-- guidance-quality:end -->"),
           True: ("<!-- guidance-quality-dit:start -->", "<!-- guidance-quality-dit:end -->")}
DIT_BLOCKS = "single *"  # the DiT demo's S-CFG blocks: its single blocks localise, its double blocks do not


def recording(rule, masks: list):
    """``rule`` (a foreground function of the S-CFG host) that also keeps each step's mask."""
    def record(*args, **kwargs):
        mask = rule(*args, **kwargs)
        masks.append(mask.float())
        return mask
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES), help="comma-separated CFG scales")
    parser.add_argument("--dit", action="store_true", help="the DiT demo model (S-CFG with the words rule)")
    parser.add_argument("--no-readme", action="store_true", help="print the table only; leave README.md alone")
    args = parser.parse_args()
    node = PACK.NODE_CLASS_MAPPINGS["AttnSegSCFG"]()
    if args.dit:
        model, clip, vae = demo_dit.load()
        words = (0.8, 3.0, 3, 0.0, 1.0, "custom", scfg_host.WORDS_CHOICE)  # the released rate and blur
        variants = {"CFG": model, "S-CFG (words rule)": node.patch(model, *words, dit_blocks=DIT_BLOCKS)[0]}
    else:
        model, clip, vae = demo_model.load()
        released = (0.8, 3.0, 3, 0.0, 1.0, "S-CFG (released code)")
        variants = {"CFG": model,
                    "S-CFG": node.patch(model, *released, map_source="S-CFG (released code)")[0],
                    "S-CFG (GoCA maps)": node.patch(model, *released, map_source="GoCA")[0]}
    masks = []  # per S-CFG step of the current sample: its foreground (either map source)
    for rule in ("foreground_mask", "goca_foreground"):  # each source's foreground, as the patch looks it up
        setattr(scfg_host, rule, recording(getattr(scfg_host, rule), masks))
    scenes = [evaluate.scene(seed) for seed in evaluate.TEST_SEEDS[:args.captions]]
    captions = [item.caption for item in scenes]
    ceiling = [ok for item in scenes for ok in evaluate.shapes_present(item.image, item.caption)]
    rows = []
    for scale in map(float, args.scales.split(",")):
        row = [f"{scale:g}"]
        for name, guided in variants.items():
            began, results, shapes, shares, inside = time.perf_counter(), [], [], [], []
            for index, caption in enumerate(captions):  # the same captions and seeds for every variant
                masks.clear()
                image, object_masks = evaluate.generate(guided, clip, vae, caption, index, cfg=scale, dit=args.dit)
                results += evaluate.drawn(image, object_masks, caption)
                shapes += evaluate.shapes_present(image, caption)
                shares += [mask.mean().item() for mask in masks]
                held = evaluate.share_inside(image, caption, torch.stack(masks).mean(0)[0]) if masks else None
                if held is not None:
                    inside.append(held)
            seconds = (time.perf_counter() - began) / len(captions)
            share = sum(ok for _, ok, _ in results) / len(results)
            row += [f"{share:.3f}", f"{sum(shapes) / len(shapes):.3f}", f"{seconds:.2f}"]
            if name != "CFG":
                row.append(f"{sum(shares) / max(1, len(shares)):.2f}")
                if args.dit:
                    row.append(f"{sum(inside) / max(1, len(inside)):.2f}")
        rows.append(row)
        print(" | ".join(row), flush=True)
    columns = ["cfg"]
    for name in variants:
        columns += [f"{name}: objects drawn", f"{name}: shapes present", f"{name}: s / image"]
        if name != "CFG":
            columns.append(f"{name}: foreground share")
            if args.dit:
                columns.append(f"{name}: object pixels in the foreground")
    if args.dit:
        text = markdown_table(
            f"DiT demo model, {len(captions)} held-out captions (1-3 objects), one seed each, 20 euler steps "
            f"(scheduler simple), CPU: the share of named objects drawn where the caption says (masks: every "
            f"block's I2T completed with the single blocks' I2I, as flux-demo-generate-and-segment); S-CFG with "
            f"the released rate and blur, the words foreground rule (ours: T5 has no BOS) and dit_blocks "
            f"'{DIT_BLOCKS}'; its foreground's share of the latent and the share of the drawn objects' pixels "
            f"(the caption's colours) inside it, means over the steps. Shapes present: the share of named objects "
            f"whose shape is drawn in any colour (on the captions' own rendered scenes "
            f"{sum(ceiling) / len(ceiling):.3f}).", columns, rows)
    else:
        text = markdown_table(
            f"Demo model, {len(captions)} held-out captions (1-3 objects), one seed each, 20 euler steps, CPU: the "
            f"share of named objects drawn where the caption says; S-CFG with its released-code preset and its own "
            f"maps or GoCA's (map_source GoCA: GoCA's S-CFG integration on the same layers), and the share of "
            f"latent pixels each one's foreground holds (mean over steps). Shapes present: the share of named "
            f"objects whose shape is drawn in any colour (colour-blind prompt adherence; on the captions' own "
            f"rendered scenes it is {sum(ceiling) / len(ceiling):.3f}, the misses being objects mostly hidden by "
            f"another).", columns, rows)
    print(text)
    if not args.no_readme:
        write_readme(text, *MARKERS[args.dit])


if __name__ == "__main__":
    main()
