"""Unsupervised segmentation (DiffSeg, iSeg's unsupervised mode) on the demo
model's held-out scenes, and the merging's speed on a full-size SD1.5.

Quality: each scene is captured once (its caption as the prompt, every layer's
self-attention, t = 300 as DiffSeg, twice the scene's size as the other demo
benchmarks). Segments are matched to the ground-truth labels of their image
(background included) by the Hungarian assignment that maximises the matched
pixels (DiffSeg's protocol: a segment left unmatched counts its pixels as
missed for their true label); mIoU over the labels, pixel accuracy = matched
pixels / all pixels. tau is tuned for DiffSeg on the tuning scenes and used by
every row (iSeg refines DiffSeg's proposals); the preset's tau 1.1 is scored
too. Named segments: each segment named by cross-attention (threshold tuned on
the tuning scenes; unknown = background), scored with the ordinary mIoU of
benchmarks/segmentation_quality.py.

Speed: a 512-px capture on tests/random_sd15.py's random full-size SD1.5
(self-attention 64x64, 32x32, 16x16, 8x8), then the segmenter alone, timed, and
its peak RSS above the store's, at 8x8, 16x16 and 32x32 anchors.

    python benchmarks/unsupervised_quality.py [--test 200 --tune 50] [--no-speed] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

import_pack()

import comfy.sd  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from capture_overhead import peak_rss  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

from attnseg_pack.attnseg.diffseg import diffseg, name_segments  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from demo import evaluate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "unsupervised_quality.json"
START, END = "<!-- unsupervised-quality:start -->", "<!-- unsupervised-quality:end -->"
TIMESTEP = 300  # DiffSeg's
CAPTURE_KIND = "goca mean heads"  # evaluate's capture of every layer's self-attention (head mean)
TAUS = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.1)
PRESET_TAU = 1.1
SPEED_TAU_NO_MERGE = 1e-6
NAME_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(0, 10))
REFINEMENTS = {  # row name: diffseg() keywords
    "DiffSeg": dict(refinement="off"),
    "DiffSeg + naive refinement (S, N = 10)": dict(refinement="naive", iterations=10),
    "DiffSeg + Ent-Self code (lambda 0.015, N = 10)": dict(refinement="code", lam=0.015, iterations=10),
    "DiffSeg + Ent-Self paper (lambda 0.01, N = 10): iSeg unsupervised preset": dict(refinement="paper", lam=0.01,
                                                                                    iterations=10),
}
NAMED = ("DiffSeg", "DiffSeg + Ent-Self paper (lambda 0.01, N = 10): iSeg unsupervised preset")


class Hungarian:
    """DiffSeg's matched TP / FP / FN per ground-truth label, over all images."""

    def __init__(self) -> None:
        self.tp = np.zeros(len(evaluate.LABELS))
        self.fp = np.zeros(len(evaluate.LABELS))
        self.fn = np.zeros(len(evaluate.LABELS))
        self.pixels = 0
        self.found, self.true = [], []

    def add(self, truth: torch.Tensor, segments: torch.Tensor) -> None:
        labels = torch.unique(truth)
        rows = torch.searchsorted(labels, truth.flatten())
        count = int(segments.max())
        hist = torch.bincount(rows * count + segments.flatten() - 1, minlength=len(labels) * count)
        hist = hist.view(len(labels), count).double().numpy()
        row, col = linear_sum_assignment(hist, maximize=True)
        matched = np.zeros(len(labels))
        matched[row] = hist[row, col]
        column_sum = np.zeros(len(labels))
        column_sum[row] = hist[:, col].sum(0)
        ids = labels.numpy()
        self.tp[ids] += matched
        self.fn[ids] += hist.sum(1) - matched
        self.fp[ids] += column_sum - matched
        self.pixels += truth.numel()
        self.found.append(count)
        self.true.append(len(labels))

    def miou(self) -> float:
        union = self.tp + self.fp + self.fn
        return float(np.mean(self.tp[union > 0] / union[union > 0]))

    def accuracy(self) -> float:
        return float(self.tp.sum() / self.pixels)


def capture(model, clip, vae, item):
    return evaluate.capture(model, clip, vae, item, CAPTURE_KIND, [TIMESTEP])


def quality(model, clip, vae, tune, test) -> dict:
    tune_stores = [(evaluate.truth_labels(item), capture(model, clip, vae, item)) for item in tune]
    tuned = {}
    for tau in TAUS:
        score = Hungarian()
        for truth, store in tune_stores:
            score.add(truth, diffseg(store, tau=tau).labels[0])
        tuned[tau] = score.miou()
        print(f"tune tau {tau}: DiffSeg Hungarian mIoU {tuned[tau]:.3f}", flush=True)
    best_tau = max(tuned, key=tuned.get)
    # Naming thresholds, on the tuning scenes at the tuned tau.
    name_tuning = {(row, t): evaluate.Confusion() for row in NAMED for t in NAME_THRESHOLDS}
    for truth, store in tune_stores:
        lookup = torch.tensor([0] + [evaluate.LABELS.index(n) for n in store.prompt.class_names])
        for row in NAMED:
            found = diffseg(store, tau=best_tau, **REFINEMENTS[row])
            for t in NAME_THRESHOLDS:
                name_tuning[(row, t)].add(truth, lookup[name_segments(found, store, t).class_labels()[0]])
    thresholds = {row: max(NAME_THRESHOLDS, key=lambda t: name_tuning[(row, t)].miou()) for row in NAMED}
    del tune_stores

    taus = dict.fromkeys((best_tau, PRESET_TAU))
    scores = {(row, tau): Hungarian() for row in REFINEMENTS for tau in taus}
    named = {(row, tau, t): evaluate.Confusion() for row in NAMED for tau in taus for t in (0.0, thresholds[row])}
    seconds = {row: 0.0 for row in REFINEMENTS}
    capture_seconds = 0.0
    for index, item in enumerate(test):
        began = time.perf_counter()
        store = capture(model, clip, vae, item)
        capture_seconds += time.perf_counter() - began
        truth = evaluate.truth_labels(item)
        lookup = torch.tensor([0] + [evaluate.LABELS.index(n) for n in store.prompt.class_names])
        for row, keywords in REFINEMENTS.items():
            for tau in taus:
                began = time.perf_counter()
                found = diffseg(store, tau=tau, **keywords)
                if tau == best_tau:
                    seconds[row] += time.perf_counter() - began
                scores[(row, tau)].add(truth, found.labels[0])
                if row in NAMED:
                    for t in (0.0, thresholds[row]):
                        named[(row, tau, t)].add(truth, lookup[name_segments(found, store, t).class_labels()[0]])
        if (index + 1) % 25 == 0:
            print(f"{index + 1} test scenes", flush=True)
    rows = []
    for row in REFINEMENTS:
        for tau in taus:
            s = scores[(row, tau)]
            entry = {"method": row, "tau": tau, "miou": round(s.miou(), 4), "accuracy": round(s.accuracy(), 4),
                     "segments_mean": round(float(np.mean(s.found)), 2), "true_mean": round(float(np.mean(s.true)), 2),
                     "count_exact": round(float(np.mean(np.array(s.found) == np.array(s.true))), 3),
                     "seconds_per_image": round(seconds[row] / len(test), 4)}
            if row in NAMED:
                entry["named"] = {str(t): round(named[(row, tau, t)].miou(), 4) for t in (0.0, thresholds[row])}
                entry["name_threshold"] = thresholds[row]
            rows.append(entry)
            print(entry, flush=True)
    return {"test_scenes": len(test), "tune_scenes": len(tune), "timestep": TIMESTEP, "tuned_tau": best_tau,
            "tau_tuning": {str(k): round(v, 4) for k, v in tuned.items()}, "rows": rows,
            "capture_seconds_per_image": round(capture_seconds / len(test), 4)}


def speed() -> dict:
    """The segmenter alone on a 512-px capture of the random full-size SD1.5."""
    from random_sd15 import ensure

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ensure()), output_vae=True, output_clip=True)
    positive, _ = encode_segmentation_prompt(clip, "a photograph of a cat sitting on a sofa", "cat, sofa")
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    store = segment_image(model, vae, image, positive, [TIMESTEP], 0, 512, CapturePlan(self_every_layer=True))
    grids = sorted({stored.grid for _, stored in store.layers("self")})
    out = {"grids": [f"{h}x{w}" for h, w in grids], "threads": torch.get_num_threads(), "runs": []}
    store.check_finite("the random SD1.5's capture")
    diffseg(store, anchors=8)  # warm up
    # The random model's self-attention is nearly uniform: at DiffSeg's tau everything merges
    # into one segment after pass 1; at SPEED_TAU_NO_MERGE no two maps merge, the later
    # passes' worst case (every anchor stays a proposal).
    for anchors, refinement, tau in ((8, "off", PRESET_TAU), (16, "off", PRESET_TAU), (32, "off", PRESET_TAU),
                                     (16, "paper", PRESET_TAU), (16, "off", SPEED_TAU_NO_MERGE),
                                     (32, "off", SPEED_TAU_NO_MERGE)):
        timing = {}

        def timed():
            began = time.perf_counter()
            timing["found"] = diffseg(store, anchors=anchors, refinement=refinement, tau=tau)
            timing["seconds"] = time.perf_counter() - began

        before, peak = peak_rss(timed)
        found = timing["found"]
        run = {"anchors": anchors * anchors, "refinement": refinement, "tau": tau,
               "seconds": round(timing["seconds"], 3),
               "peak_rss_above_store_mib": round(peak - before, 1), "segments": found.counts[0]}
        out["runs"].append(run)
        print(run, flush=True)
    return out


def table(result: dict) -> str:
    q = result["quality"]
    lines = []
    header = ["method", "tau", "mIoU (Hungarian)", "pixel accuracy", "segments / image (true)", "count exact",
              "named mIoU (threshold 0 / tuned)", "s / image"]
    rows = []
    for r in q["rows"]:
        named = "–"
        if "named" in r:
            values = list(r["named"].values())
            named = f"{values[0]:.3f} / {values[-1]:.3f} @ {r['name_threshold']:.1f}"
        rows.append([r["method"], f"{r['tau']:g}" + (" (tuned)" if r["tau"] == q["tuned_tau"] else " (preset)"),
                     f"**{r['miou']:.3f}**", f"{r['accuracy']:.3f}", f"{r['segments_mean']:.1f} ({r['true_mean']:.1f})",
                     f"{r['count_exact']:.2f}", named, f"{r['seconds_per_image']:.3f}"])
    lines.append(markdown_table(
        f"Demo model, {q['test_scenes']} held-out scenes (half non-square), tau tuned for DiffSeg on "
        f"{q['tune_scenes']} other scenes (tried {', '.join(q['tau_tuning'])}), t = {q['timestep']}, every layer's "
        f"self-attention (the demo's 2 levels), 16x16 anchors, 3 passes, CPU" + (
        f"; capture {q['capture_seconds_per_image']:.3f} s / image besides the segmenter's time" if
        "capture_seconds_per_image" in q else "") + ". Segments are matched to the "
        f"true labels (background included) per image by the Hungarian assignment; the named mIoU is the ordinary "
        f"one of the text methods' table (unknown = background).", header, rows))
    if "speed" in result:
        s = result["speed"]
        lines += ["", markdown_table(
            f"Speed of the segmenter alone on the random full-size SD1.5 at 512 px (self-attention "
            f"{', '.join(s['grids'])}; finest grid 64x64, N = 4096), {s['threads']} CPU threads (shared); peak RSS "
            f"above the captured store's. The random model's self-attention is nearly uniform, so at DiffSeg's "
            f"tau 1.1 every map merges into one segment; tau {SPEED_TAU_NO_MERGE:g} merges none (the later passes' "
            f"worst case).", ["anchors", "refinement", "tau", "s / image", "peak RSS (MiB)", "segments"],
            [[str(r["anchors"]), r["refinement"], f"{r.get('tau', PRESET_TAU):g}", f"{r['seconds']:.2f}",
              f"{r['peak_rss_above_store_mib']:.0f}", str(r["segments"])] for r in s["runs"]])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=int, default=len(evaluate.TEST_SEEDS))
    parser.add_argument("--tune", type=int, default=len(evaluate.TUNE_SEEDS))
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="keep the quality numbers of the results file")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave README and results alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        if args.speed_only:
            result = {"quality": json.loads(RESULTS.read_text())["quality"]}
        else:
            model, clip, vae = demo_model.load(demo_model.CHECKPOINT)
            tune = [evaluate.scene(s) for s in evaluate.TUNE_SEEDS[:args.tune]]
            test = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:args.test]]
            result = {"quality": quality(model, clip, vae, tune, test)}
            if not args.no_readme:  # kept before the speed part runs
                RESULTS.parent.mkdir(exist_ok=True)
                RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_speed:
            result["speed"] = speed()
    text = table(result)
    print(text)
    if args.no_readme:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    write_readme(text, START, END)
    print(f"wrote {RESULTS} and the README table")


if __name__ == "__main__":
    main()
