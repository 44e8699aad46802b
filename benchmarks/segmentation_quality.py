"""Segmentation quality of every method on the demo model's held-out scenes.

Thresholds are tuned per method and token choice on 50 tuning scenes, then
mIoU (background included) is measured on 200 test scenes, half of them
non-square. Writes the table into README.md between the quality markers and
the numbers to benchmarks/results/segmentation_quality.json (the CI slice test
reads its floor from there).

    python benchmarks/segmentation_quality.py [--test 200 --tune 50] [--no-readme]

With --dit, the DiT demo model's table instead (benchmarks/dit_segmentation_quality.py,
which takes the other arguments): results in benchmarks/results/dit_segmentation_quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
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

RESULTS = REPO / "benchmarks" / "results" / "segmentation_quality.json"
README = REPO / "README.md"
START, END = "<!-- segmentation-quality:start -->", "<!-- segmentation-quality:end -->"
SLICE_SCENES = 20
SLICE_METHOD = evaluate.METHODS[3]  # DiffSegmenter with the demo model's level weights


def table(rows: list[dict], test_count: int, tune_count: int, references: dict[str, float]) -> str:
    def cell(parts: dict, part: str) -> str:
        return f"{parts[part]['miou']:.3f}" if part in parts else "–"

    return markdown_table(
        f"Demo model, {test_count} held-out scenes (half non-square), thresholds tuned on {tune_count} other scenes, "
        f"timestep {','.join(map(str, evaluate.TIMESTEPS))}, CPU. mIoU includes background; the token columns "
        f"segment each \"colour shape\" class with one of its words alone. "
        f"For scale, labellings that read no attention: "
        + ", ".join(f"{name} {miou:.3f}" for name, miou in references.items()) + ".",
        ["method", "mIoU", "colour token only", "shape token only", "threshold", "s / image"],
        [[row["method"], f"**{cell(row['parts'], 'colour + shape')}**", cell(row["parts"], "colour"),
          cell(row["parts"], "shape"), f"{row['parts']['colour + shape']['threshold']:.2f}",
          f"{row['seconds_per_image']:.3f}"] for row in rows])


def markdown_table(caption: str, header: list[str], rows: list[list[str]]) -> str:
    """A caption line, then a Markdown table of string cells."""
    return "\n".join([caption, "", "| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def write_readme(text: str, start: str = START, end: str = END) -> None:
    """Replace the README section between the ``start`` and ``end`` markers."""
    readme = README.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {start} ... {end} section")
    README.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", readme))


def main() -> None:
    if "--dit" in sys.argv[1:]:  # the DiT demo model's benchmark, its own arguments
        runpy.run_path(str(Path(__file__).with_name("dit_segmentation_quality.py")), run_name="dit_quality")["main"](
            [a for a in sys.argv[1:] if a != "--dit"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=int, default=len(evaluate.TEST_SEEDS))
    parser.add_argument("--tune", type=int, default=len(evaluate.TUNE_SEEDS))
    parser.add_argument("--no-readme", action="store_true", help="print only; leave README and results alone")
    parser.add_argument("--checkpoint", type=Path, default=demo_model.CHECKPOINT)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, clip, vae = demo_model.load(args.checkpoint)
    tune = [evaluate.scene(s) for s in evaluate.TUNE_SEEDS[:args.tune]]
    test = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:args.test]]

    tuned = evaluate.score(model, clip, vae, tune)
    chosen = {(m.name, p): tuned.best_threshold(m.name, p) for m in evaluate.METHODS for p in m.token_parts}
    measured = evaluate.score(model, clip, vae, test, thresholds=lambda m, p: (chosen[(m, p)],))
    rows = []
    for method in evaluate.METHODS:
        parts = {p: {"threshold": chosen[(method.name, p)], "miou": round(measured.miou(method.name, p, chosen[(method.name, p)]), 4)}
                 for p in method.token_parts}
        rows.append({"method": method.name, "parts": parts,
                     "seconds_per_image": round(measured.seconds_per_image(method.name), 4)})
        print(f"{method.name}: " + ", ".join(f"{p} {v['miou']:.3f} @ {v['threshold']:.2f}" for p, v in parts.items())
              + f", {measured.seconds_per_image(method.name):.3f} s/image", flush=True)

    slice_threshold = chosen[(SLICE_METHOD.name, "colour + shape")]
    sliced = evaluate.score(model, clip, vae, test[:SLICE_SCENES], methods=(SLICE_METHOD,),
                            thresholds=lambda m, p: (slice_threshold,))
    slice_miou = sliced.miou(SLICE_METHOD.name, "colour + shape", slice_threshold)
    print(f"CI slice ({SLICE_SCENES} scenes, {SLICE_METHOD.name}): {slice_miou:.4f}")
    references = evaluate.reference_mious(test)
    text = table(rows, len(test), len(tune), references)
    print(text)
    if args.no_readme:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "test_scenes": len(test), "tune_scenes": len(tune), "timesteps": evaluate.TIMESTEPS, "methods": rows,
        "references": references,
        "ci_slice": {"scenes": SLICE_SCENES, "method": SLICE_METHOD.name, "threshold": slice_threshold,
                     "miou": round(slice_miou, 4)}}, indent=1) + "\n")
    write_readme(text)
    print(f"wrote {RESULTS} and the README table")


if __name__ == "__main__":
    main()
