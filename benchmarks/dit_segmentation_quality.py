"""Segmentation quality of the DiT methods on the DiT demo model's held-out scenes.

The UNet table's protocol (benchmarks/segmentation_quality.py) on the DiT demo model
(hosts/comfyui/demo_dit.py): thresholds tuned per method and token choice on the 50
tuning scenes, mIoU (background included) on the 200 test scenes, half of them
non-square, passes at twice the scene's size at evaluate.DIT_TIMESTEPS (first
checked against the other candidate timesteps on the tuning scenes). The methods
(demo/evaluate.py's ``dit_methods``) read one capture of every block's I2T and I2I
maps: I2T of block groups and of each block (the Seg4Diff-style choice of one block,
made on the tuning scenes), DiffSegmenter's completion, iSeg's Ent-Self, GoCA's
stages; ConceptAttention runs passes of its own. Writes
benchmarks/results/dit_segmentation_quality.json (the CI slice test reads its floor
from there) and prints the Markdown table.

    python benchmarks/dit_segmentation_quality.py [--test 200 --tune 50] [--no-results]
    python benchmarks/segmentation_quality.py --dit [...]  (the same)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402

from attnseg_pack.hosts.comfyui import demo_dit  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit  # noqa: E402
from demo import evaluate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dit_segmentation_quality.json"
SLICE_SCENES = 20
MAIN = "colour + shape"


def markdown_table(caption: str, header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([caption, "", "| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def passes(timesteps: list[int]) -> str:
    sigmas = " and ".join(str(t / 1000) for t in timesteps)
    if len(timesteps) == 1:
        return f"one pass at {evaluate.SEGMENT_SCALE}x the scene's size at timestep {timesteps[0]} (sigma {sigmas})"
    return (f"one pass at {evaluate.SEGMENT_SCALE}x the scene's size at each of timesteps "
            f"{' and '.join(map(str, timesteps))} (sigma {sigmas}; the passes' attention averaged)")


def table(result: dict) -> str:
    def cell(parts: dict, part: str) -> str:
        return f"{parts[part]['miou']:.3f}" if part in parts else "–"

    best_block = result["best_single_block"]
    caption = (
        f"DiT demo model, {result['test_scenes']} held-out scenes (half non-square), thresholds tuned on "
        f"{result['tune_scenes']} other scenes, {passes(result['timesteps'])}, CPU. mIoU includes background; the "
        f"token columns segment each \"colour shape\" class with one of its words alone. I2I: the image x image "
        f"part of a block's joint attention. ConceptAttention labels by the argmax against a \"background\" "
        f"concept, its threshold column an offset on that concept's probability (0: the authors' argmax). Best "
        f"single block, chosen on the tuning scenes: {best_block['block']} (tuning {best_block['tune_miou']:.3f}). "
        f"s / image: the one capture of every block's I2T and I2I (all methods but ConceptAttention read it) plus "
        f"the method's own time. For scale, labellings that read no attention: "
        + ", ".join(f"{n} {m:.3f}" for n, m in result["references"].items()) + ".")
    rows = [[row["method"], f"**{cell(row['parts'], MAIN)}**", cell(row["parts"], "colour"),
             cell(row["parts"], "shape"), f"{row['parts'][MAIN]['threshold']:.2f}", f"{row['seconds_per_image']:.3f}"]
            for row in result["methods"]]
    return markdown_table(caption, ["method", "mIoU", "colour token only", "shape token only", "threshold",
                                    "s / image"], rows)


def timestep_sweep(model, clip, vae, tune: list, methods) -> tuple[list[dict], dict[tuple, evaluate.Scores]]:
    """Each of evaluate.DIT_TIMESTEP_CANDIDATES (and DIT_TIMESTEPS) on the tuning scenes:
    the attention-reading methods (not ConceptAttention, which runs passes of its own) at
    their best threshold. Returns per candidate the I2T block groups and the best method,
    and each candidate's scores (the table's thresholds are tuned on DIT_TIMESTEPS')."""
    swept = [m for m in methods if m.direct is None]
    out, kept = [], {}
    for timesteps in dict.fromkeys(map(tuple, (*evaluate.DIT_TIMESTEP_CANDIDATES, evaluate.DIT_TIMESTEPS))):
        scores = kept[timesteps] = evaluate.score(model, clip, vae, tune, methods=swept,
                                                  thresholds=evaluate.dit_thresholds, timesteps=list(timesteps))
        tuned = {m.name: round(scores.miou(m.name, MAIN, scores.best_threshold(m.name, MAIN)), 4) for m in swept}
        best = max(tuned, key=tuned.get)
        out.append({"timesteps": list(timesteps), "best": {"method": best, "tune_miou": tuned[best]},
                    **{name: tuned[name] for name in ("I2T, all blocks", "I2T, double blocks", "I2T, single blocks")
                       if name in tuned}})
        print(f"timesteps {list(timesteps)}: best {best} {tuned[best]:.3f}", flush=True)
    return out, kept


def sweep_table(result: dict) -> str:
    groups = [k for k in result["timestep_sweep"][0] if k.startswith("I2T, ")]
    rows = [[" and ".join(map(str, r["timesteps"])) + (" (used)" if r["timesteps"] == result["timesteps"] else ""),
             *(f"{r[g]:.3f}" for g in groups), f"{r['best']['tune_miou']:.3f}", r["best"]["method"]]
            for r in result["timestep_sweep"]]
    return markdown_table(
        f"DiT demo model, the segmentation pass's timestep: tuning-scene mIoU ({result['tune_scenes']} scenes, "
        f"each method at its best threshold; the passes' attention averaged where two timesteps are listed).",
        ["timesteps", *groups, "best method", "which"], rows)


def comparisons(rows: list[dict]) -> dict:
    """The issue's rankings, each as the two mIoUs it compares: ConceptAttention (at the
    authors' t = 500) against the raw I2T of the same double blocks; the best
    self-attention refinement (DiffSegmenter, iSeg with N > 0, GoCA with propagation)
    against the best raw I2T."""
    miou = {r["method"]: r["parts"][MAIN]["miou"] for r in rows}
    concept = next(n for n in miou if n.startswith("ConceptAttention") and f"t = {evaluate.CONCEPT_TIMESTEPS[0]},"
                   in n and not n.endswith("argmax"))
    raw = {n: m for n, m in miou.items() if n.startswith("I2T, ")}
    def propagates(name: str) -> bool:
        if name.startswith("GoCA"):
            return "k = 0" not in name and "every stage off" not in name
        return name.startswith("DiffSegmenter") or (name.startswith("iSeg") and "N = 0" not in name)

    refined = {n: m for n, m in miou.items() if propagates(n)}
    best_raw, best_refined = max(raw, key=raw.get), max(refined, key=refined.get)
    return {"concept_vs_i2t": {concept: miou[concept], "I2T, double blocks": miou["I2T, double blocks"]},
            "refinement_vs_i2t": {best_refined: refined[best_refined], best_raw: raw[best_raw]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=int, default=len(evaluate.TEST_SEEDS))
    parser.add_argument("--tune", type=int, default=len(evaluate.TUNE_SEEDS))
    parser.add_argument("--checkpoint", type=Path, default=demo_dit.CHECKPOINT)
    parser.add_argument("--no-results", action="store_true", help="print only; leave the results file alone")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    began = time.time()
    torch.manual_seed(0)
    model, clip, vae = demo_dit.load(args.checkpoint)
    methods = evaluate.dit_methods(describe_dit(model).blocks())
    tune = [evaluate.scene(s) for s in evaluate.TUNE_SEEDS[:args.tune]]
    test = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:args.test]]

    timesteps = evaluate.DIT_TIMESTEPS
    sweep, swept = timestep_sweep(model, clip, vae, tune, methods)
    best_timesteps = max(sweep, key=lambda r: r["best"]["tune_miou"])["timesteps"]
    if best_timesteps != timesteps:
        print(f"NOTE: on these tuning scenes timesteps {best_timesteps} beat evaluate.DIT_TIMESTEPS {timesteps}: "
              f"consider updating it (the workflows, the training validation and this table read it)")
    own_passes = evaluate.score(model, clip, vae, tune, methods=[m for m in methods if m.direct is not None],
                                thresholds=evaluate.dit_thresholds, timesteps=timesteps)
    tuned = {m.name: own_passes if m.direct is not None else swept[tuple(timesteps)] for m in methods}
    chosen = {(m.name, p): tuned[m.name].best_threshold(m.name, p) for m in methods for p in m.token_parts}
    print(f"tuned on {len(tune)} scenes ({time.time() - began:.0f} s)", flush=True)
    measured = evaluate.score(model, clip, vae, test, methods=methods, thresholds=lambda m, p: (chosen[(m, p)],),
                              timesteps=timesteps)
    rows = []
    for method in methods:
        parts = {p: {"threshold": chosen[(method.name, p)],
                     "miou": round(measured.miou(method.name, p, chosen[(method.name, p)]), 4)}
                 for p in method.token_parts}
        rows.append({"method": method.name, "parts": parts,
                     "tune_miou": round(tuned[method.name].miou(method.name, MAIN, chosen[(method.name, MAIN)]), 4),
                     "seconds_per_image": round(measured.seconds_per_image(method.name), 4)})
        print(f"{method.name}: " + ", ".join(f"{p} {v['miou']:.3f} @ {v['threshold']:.2f}" for p, v in parts.items())
              + f", {measured.seconds_per_image(method.name):.3f} s/image", flush=True)

    # Seg4Diff's choice of one block, made where thresholds are: on the tuning scenes.
    blocks = [r for r in rows if r["method"].startswith("I2T, ") and not r["method"].endswith("blocks")]
    best_block = max(blocks, key=lambda r: r["tune_miou"])
    best = max(rows, key=lambda r: r["parts"][MAIN]["miou"])
    slice_method = next(m for m in methods if m.name == best["method"])
    slice_threshold = chosen[(slice_method.name, MAIN)]
    slice_scenes = test[:SLICE_SCENES]
    sliced = evaluate.score(model, clip, vae, slice_scenes, methods=(slice_method,),
                            thresholds=lambda m, p: (slice_threshold,), timesteps=timesteps)
    slice_miou = sliced.miou(slice_method.name, MAIN, slice_threshold)
    print(f"CI slice ({len(slice_scenes)} scenes, {slice_method.name}): {slice_miou:.4f}")
    result = {
        "test_scenes": len(test), "tune_scenes": len(tune), "timesteps": timesteps, "timestep_sweep": sweep,
        "segment_scale": evaluate.SEGMENT_SCALE, "threads": torch.get_num_threads(),
        "checkpoint": {"file": args.checkpoint.name, **demo_dit.training_info(args.checkpoint).get("training", {})},
        "methods": rows, "references": evaluate.reference_mious(test),
        "best_single_block": {"block": best_block["method"].removeprefix("I2T, "), "chosen_on": "tuning scenes",
                              "tune_miou": best_block["tune_miou"], "test_miou": best_block["parts"][MAIN]["miou"]},
        "best_method": {"method": best["method"], "miou": best["parts"][MAIN]["miou"]},
        "comparisons": comparisons(rows),
        "ci_slice": {"scenes": len(slice_scenes), "method": slice_method.name, "threshold": slice_threshold,
                     "miou": round(slice_miou, 4)},
        "seconds": round(time.time() - began)}
    for key in ("validation", "buckets"):  # the training log lives in demo/attnseg-shapes-dit.json
        result["checkpoint"].pop(key, None)
    print(sweep_table(result))
    print()
    print(table(result))
    for name, pair in result["comparisons"].items():
        print(f"{name}: " + " vs ".join(f"{m} {v:.3f}" for m, v in pair.items()))
    print(f"{time.time() - began:.0f} s")
    if args.no_results:
        return
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
