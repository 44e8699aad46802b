"""The command line: ``python -m hosts.diffusers {segment,pseudo-labels,evaluate,demo-dataset}``.

segment        images (files, folders, globs) + classes -> label PNGs, per-class masks, overlays
pseudo-labels  a VOC-layout or COCO-Object dataset -> one label PNG per image (resumable)
evaluate       label PNGs (or saved score maps, --sweep) vs ground truth -> mIoU, per-class IoU
demo-dataset   writes the tiny VOC-layout dataset of demo scenes

Bad input ends the command with one line naming the argument and exit code 2;
an image that does not decode mid-run is reported, skipped, and the run goes on
(exit code 1 at the end if any was skipped)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ...attnseg.errors import AttnSegError
from ...attnseg.evaluation import IGNORE_LABEL, ConfusionMatrix, ThresholdSweep, sweep_thresholds
from ...attnseg.presets import PRESETS, SEGMENTERS, find_preset
from ...attnseg.tokens import parse_class_list
from . import datasets
from .engines import Job, ModelSettings, Outputs, pending, run_local, run_ray

DEFAULT_PRESET = "DiffSegmenter (released code)"
MANIFEST = "manifest.json"
PROTOCOLS = ("wsss", "open-vocabulary")


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="a local diffusers pipeline folder (with model_index.json; SD1.x/2.x/SDXL, Flux, SD3/SD3.5) "
                            "or a single-file SD1.x/2.x/SDXL checkpoint (.safetensors/.ckpt)")
    group.add_argument("--model-config", help="offline, a single-file checkpoint needs the configs of its model: a "
                                              "local diffusers folder of the same model")
    group.add_argument("--allow-hub", action="store_true",
                       help="allow downloads from the Hugging Face hub (--model may then be a hub id); off by default")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="default: float16 on CUDA, float32 on the CPU")
    presets = [f"{name} [{p.family}]" for name, p in PRESETS.items() if p.method in SEGMENTERS]
    group.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                       help=f"the segmenter's preset (default: {DEFAULT_PRESET}); one of the model family's: "
                            f"{'; '.join(presets)}")
    group.add_argument("--threshold", type=float, help="background threshold (default: the preset's)")
    group.add_argument("--resolution", type=int, help="working resolution in pixels (default: the preset's)")
    group.add_argument("--seed", type=int, help="noise seed (default: the preset's)")
    group.add_argument("--prompt", default="", help="a prompt naming every class (default: the preset's template)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, help="output folder (a run there with the same settings is resumed)")
    group.add_argument("--scores", action="store_true", help="also save each image's score maps "
                                                             "(scores/<id>.npz, float16) for evaluate --sweep")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: a Ray Data pipeline (pip install 'ray[data]')")
    group.add_argument("--batch-size", type=int, default=1, help="images per segmenter call (default 1)")
    group.add_argument("--num-workers", type=int,
                       help="ray: model actors (default: one per GPU of the cluster, else 1)")
    group.add_argument("--ray-address", help="ray: an existing cluster's address (default: start a local one)")
    group.add_argument("--limit", type=int, help="only the first N images (a trial run)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> Parser:
    parser = Parser(prog="python -m hosts.diffusers",
                    description="AttnSeg outside ComfyUI: training-free segmentation from a diffusers pipeline's "
                                "attention, for images and datasets, and the papers' evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    segment = commands.add_parser("segment", help="images + classes -> label PNGs, masks, overlays")
    segment.add_argument("images", nargs="+", help="image files, folders and globs ('photos/*.jpg')")
    which = segment.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", help="the classes of every image, comma-separated ('cat, sofa')")
    which.add_argument("--labels", help="per-image classes: a .csv (image,class;class) or .json "
                                        "({image: [classes]}) of image-level labels")
    segment.add_argument("--no-masks", action="store_true", help="no per-class mask PNGs")
    segment.add_argument("--no-overlays", action="store_true", help="no overlay PNGs")
    _model_arguments(segment)
    _run_arguments(segment)

    labels = commands.add_parser("pseudo-labels", help="a dataset -> one label PNG per image (resumable)")
    _dataset_arguments(labels)
    labels.add_argument("--protocol", choices=PROTOCOLS, default="wsss",
                        help="wsss: each image's classes from its ground truth (or --labels); open-vocabulary: every "
                             "class of the dataset (or each image's candidates from --labels)")
    labels.add_argument("--labels", help="image-level labels (.csv/.json): wsss: the image's classes instead of "
                                         "its ground truth's; open-vocabulary: its candidate classes")
    labels.add_argument("--prompt-names", help="the words put in the prompt for each class, one per line in "
                                               "--class-names order (e.g. 'potted plant' for pottedplant)")
    _model_arguments(labels)
    _run_arguments(labels)

    evaluate = commands.add_parser("evaluate", help="predictions vs ground truth -> mIoU, per-class IoU")
    evaluate.add_argument("--predictions", required=True,
                          help="a run's --out folder (its labels/<id>.png; scores/<id>.npz with --sweep)")
    _dataset_arguments(evaluate, truth_folder=True)
    evaluate.add_argument("--sweep", metavar="START:STOP:STEP",
                          help="DiffSegmenter's evaluation: score the saved score maps at every background "
                               "threshold (e.g. 0.30:0.74:0.02, stop included; or a comma list) and report each")
    evaluate.add_argument("--json", help="also write the scores to this JSON file")

    demo = commands.add_parser("demo-dataset", help="write the tiny VOC-layout dataset of demo scenes")
    demo.add_argument("out", help="folder to write (JPEGImages, SegmentationClass, ImageSets, labels)")
    demo.add_argument("--train", type=int, default=8, help="train images (default 8)")
    demo.add_argument("--val", type=int, default=4, help="val images (default 4)")
    return parser


def _dataset_arguments(parser: argparse.ArgumentParser, truth_folder: bool = False) -> None:
    group = parser.add_argument_group("dataset")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--voc", help="a PASCAL VOC folder (VOC2012: JPEGImages, SegmentationClass, "
                                     "ImageSets/Segmentation)")
    which.add_argument("--coco", help="COCO-Object: a COCO instances json (with --images)")
    if truth_folder:
        which.add_argument("--truth", help="a folder of ground-truth label PNGs named <id>.png (with --class-names)")
    group.add_argument("--split", default="train", help="VOC: ImageSets/Segmentation/<split>.txt (default train)")
    group.add_argument("--images", help="COCO: the images folder (e.g. val2017)")
    group.add_argument("--class-names", help="one class per line, background first (default: VOC's 21 classes; "
                                             "COCO: the json's categories)")


# --- datasets -----------------------------------------------------------------

def load_dataset(args) -> datasets.Dataset:
    names = datasets.read_class_names(Path(args.class_names)) if args.class_names else None
    if args.voc:
        return datasets.voc(Path(args.voc), args.split, names or datasets.VOC_CLASSES)
    if args.coco:
        if not args.images:
            raise AttnSegError("--images: COCO needs its images folder (e.g. --images coco/val2017).")
        return datasets.coco_object(Path(args.coco), Path(args.images), names)
    folder = Path(args.truth)
    if not folder.is_dir():
        raise AttnSegError(f"--truth: {folder} is not a folder of label PNGs.")
    samples = [datasets.Sample(p.stem, p) for p in sorted(folder.glob("*.png"))]
    if not samples:
        raise AttnSegError(f"--truth: {folder} holds no .png label maps.")
    return datasets.Dataset("voc", names or datasets.VOC_CLASSES, samples, truth_folder=folder)


def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise AttnSegError(f"--limit: {limit}; give a positive number of images.")
    return items[:limit] if limit else items


def _prompt_names(args, class_names: tuple[str, ...]) -> tuple[str, ...]:
    if not args.prompt_names:
        return class_names
    words = datasets.read_class_names(Path(args.prompt_names), "--prompt-names")
    if len(words) != len(class_names):
        raise AttnSegError(f"--prompt-names: {len(words)} lines for {len(class_names)} classes; give one per class "
                           f"of --class-names, background first.")
    return words


def dataset_jobs(args, dataset: datasets.Dataset) -> list[Job]:
    """One job per image: the classes the protocol segments, by their prompt words,
    labelled with their dataset ids."""
    words = _prompt_names(args, dataset.class_names)
    labels = datasets.read_image_labels(Path(args.labels)) if args.labels else None
    jobs = []
    for sample in _limited(dataset.samples, args.limit):
        if labels is not None:
            if sample.id not in labels:
                raise AttnSegError(f"--labels: {args.labels} has no entry for image {sample.id}.")
            ids = datasets.class_ids(labels[sample.id], dataset.class_names, sample.id, "--labels")
        elif args.protocol == "wsss":
            if not dataset.has_truth(sample):
                raise AttnSegError(f"--labels: image {sample.id} has no ground truth to take its classes from "
                                   f"(WSSS protocol); give its image-level labels with --labels.")
            ids = dataset.truth_classes(sample)
        else:
            ids = tuple(range(1, len(dataset.class_names)))
        jobs.append(Job(sample.id, str(sample.image), tuple(words[i] for i in ids), ids))
    return jobs


def image_jobs(args) -> tuple[list[Job], tuple[str, ...]]:
    """segment's jobs and its output classes (background first): --classes for every
    image, or the union of --labels' classes in the order they first appear."""
    files = _limited(datasets.image_files(args.images), args.limit)
    for file in files:
        datasets.check_image(file)
    if args.classes is not None:
        names = tuple(parse_class_list(args.classes, "--classes"))
        per_image = {f.stem: list(names) for f in files}
    else:
        per_image = datasets.read_image_labels(Path(args.labels))
        missing = [f.name for f in files if f.stem not in per_image]
        if missing:
            raise AttnSegError(f"--labels: {args.labels} has no entry for {missing[0]}"
                               + (f" (and {len(missing) - 1} more images)." if len(missing) > 1 else "."))
        names = tuple(dict.fromkeys(n for f in files for n in per_image[f.stem]))
    class_names = ("background",) + names
    datasets.check_class_names(class_names, "--classes" if args.classes is not None else "--labels")
    jobs = [Job(f.stem, str(f), tuple(per_image[f.stem]),
                datasets.class_ids(per_image[f.stem], class_names, f.stem, "--labels")) for f in files]
    return jobs, class_names


# --- runs -----------------------------------------------------------------------

def model_settings(args) -> ModelSettings:
    preset = find_preset(args.preset, SEGMENTERS, "--preset")
    if preset is None:
        raise AttnSegError(f"--preset: '{args.preset}' has no settings of its own; the diffusers host runs the "
                           f"DiffSegmenter, iSeg and GoCA presets (see --help).")
    model = Path(args.model).expanduser()
    if not model.exists() and not args.allow_hub:
        raise AttnSegError(f"--model: {args.model} does not exist (hub ids are only looked up with --allow-hub).")
    if model.is_dir() and not (model / "model_index.json").is_file():
        raise AttnSegError(f"--model: {args.model} is not a diffusers pipeline folder (no model_index.json); give "
                           f"a folder saved with pipe.save_pretrained() or a single-file checkpoint.")
    for name in ("batch_size", "num_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AttnSegError(f"--{name.replace('_', '-')}: {value}; give 1 or more.")
    return ModelSettings(str(model) if model.exists() else args.model, args.preset, args.device, args.dtype,
                         args.allow_hub, args.model_config, args.threshold, args.resolution, args.seed, args.prompt)


def _check_manifest(out: Path, settings: dict) -> dict:
    """The run folder's manifest, created or checked: a resumed run must have the
    settings the folder's images were made with."""
    path = out / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        old = manifest.get("settings", {})
        changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if changed:
            key = changed[0]
            raise AttnSegError(f"--out: {out} holds a run made with other settings ({key}: {old.get(key)!r} there, "
                               f"{settings.get(key)!r} now); resume it with the same settings or choose a new --out.")
        return manifest
    return {"settings": settings, "runs": []}


def run(args, jobs: list[Job], class_names: tuple[str, ...], settings: dict, outputs: Outputs) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AttnSegError(f"--out: {out} is a file; give a folder.")
    model = model_settings(args)
    settings = {**settings, "model": str(Path(model.model).resolve()) if Path(model.model).exists() else model.model,
                "preset": model.preset, "threshold": model.threshold, "resolution": model.resolution,
                "seed": model.seed, "prompt": model.prompt, "class_names": list(class_names),
                "scores": outputs.scores, "masks": outputs.masks, "overlays": outputs.overlays}
    manifest = _check_manifest(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    datasets.write_atomically(out / "class_names.txt", lambda f: f.write("".join(f"{n}\n" for n in class_names)
                                                                         .encode()))
    todo = len(pending(jobs, outputs))
    record = {"engine": args.engine, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": len(jobs), "to_do": todo}
    manifest["runs"].append(record)
    datasets.write_atomically(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

    bar = None

    def advance(count: int) -> None:
        # The bar appears at the engine's first report (once the model has loaded), so a
        # model that fails to load leaves only its error line.
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=todo, unit="img", file=sys.stderr, desc=args.command, smoothing=0.1)
        bar.update(count)

    began = time.perf_counter()
    progress = None if args.no_progress else advance
    try:
        if args.engine == "ray":
            summary = run_ray(jobs, model.build, outputs, args.batch_size, args.num_workers, advance=progress,
                              address=args.ray_address)
        else:
            summary = run_local(jobs, model.build, outputs, args.batch_size, advance=progress)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - began
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), written=summary.written, skipped=summary.skipped,
                  failed=[{"image": i, "error": e} for i, e in summary.failed], seconds=round(seconds, 3))
    datasets.write_atomically(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    rate = f", {summary.written / seconds:.2f} images/s" if summary.written and seconds > 0 else ""
    print(f"{out}: wrote {summary.written}, {summary.skipped} already done, {len(summary.failed)} skipped "
          f"(did not decode){rate}")
    return 1 if summary.failed else 0


def segment_command(args) -> int:
    jobs, class_names = image_jobs(args)
    outputs = Outputs(args.out, args.scores, masks=not args.no_masks, overlays=not args.no_overlays)
    return run(args, jobs, class_names, {"command": "segment"}, outputs)


def pseudo_labels_command(args) -> int:
    dataset = load_dataset(args)
    jobs = dataset_jobs(args, dataset)
    settings = {"command": "pseudo-labels", "dataset": dataset.kind, "protocol": args.protocol,
                "labels": str(Path(args.labels).resolve()) if args.labels else None,
                "prompt_names": list(_prompt_names(args, dataset.class_names))}
    return run(args, jobs, dataset.class_names, settings, Outputs(args.out, args.scores))


# --- evaluation -------------------------------------------------------------------

def _iou_table(class_names, iou) -> list[str]:
    width = max(len(n) for n in class_names)
    return [f"  {name:<{width}}  " + ("    -" if np.isnan(value) else f"{100 * value:5.1f}")
            for name, value in zip(class_names, iou.tolist())]


def evaluate_command(args) -> int:
    dataset = load_dataset(args)
    predictions = Path(args.predictions)
    if not predictions.is_dir():
        raise AttnSegError(f"--predictions: {predictions} is not a folder; give a run's --out folder.")
    folder = predictions / ("scores" if args.sweep else "labels")
    suffix = ".npz" if args.sweep else ".png"
    samples = dataset.samples
    missing = [s.id for s in samples if not (folder / f"{s.id}{suffix}").is_file()]
    if missing:
        what = "score maps (run with --scores)" if args.sweep else "label PNGs"
        raise AttnSegError(f"--predictions: {len(missing)} of {len(samples)} images have no {what} in {folder} "
                           f"(first: {missing[0]}); finish the run, or evaluate the split it was run on.")
    classes = len(dataset.class_names)
    if args.sweep:
        sweep = ThresholdSweep(sweep_thresholds(args.sweep), classes)
        for sample in samples:
            with np.load(folder / f"{sample.id}.npz") as saved:
                scores, ids = saved["scores"], saved["label_ids"]
            truth = torch.from_numpy(dataset.truth(sample).astype(np.int64))
            if scores.shape[0] == 0:
                scores, ids = np.zeros((1, *truth.shape), np.float16), np.zeros(1, np.int64)
            sweep.add(truth, torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(ids), sample.id)
        result = sweep.result()
        matrix = result.matrices[result.best]
        print("threshold  mIoU")
        for i, (threshold, miou) in enumerate(zip(result.thresholds, result.mious)):
            print(f"  {threshold:.3f}   {100 * miou:5.1f}" + ("  <- best" if i == result.best else ""))
        heading = f"per-class IoU at the best threshold {result.thresholds[result.best]:.3f}:"
    else:
        matrix = ConfusionMatrix(classes)
        for sample in samples:
            truth = dataset.truth(sample)
            prediction = datasets.read_label_png(folder / f"{sample.id}.png", "--predictions")
            matrix.add(torch.from_numpy(truth.astype(np.int64)), torch.from_numpy(prediction.astype(np.int64)),
                       sample.id)
        heading = "per-class IoU:"
    iou = matrix.iou()
    print(heading)
    print("\n".join(_iou_table(dataset.class_names, iou)))
    present = int(iou.isfinite().sum())
    print(f"mIoU {100 * matrix.miou():.2f} over {present} classes, {len(samples)} images "
          f"(label {IGNORE_LABEL} ignored), pixel accuracy {100 * matrix.pixel_accuracy():.2f}")
    if args.json:
        report = {"miou": matrix.miou(), "pixel_accuracy": matrix.pixel_accuracy(), "images": len(samples),
                  "ignore_label": IGNORE_LABEL,
                  "per_class_iou": {n: (None if np.isnan(v) else v) for n, v in zip(dataset.class_names, iou.tolist())},
                  "confusion_matrix": matrix.counts.tolist()}
        if args.sweep:
            report["sweep"] = {"thresholds": list(result.thresholds), "miou": list(result.mious),
                               "best_threshold": result.thresholds[result.best]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def demo_dataset_command(args) -> int:
    from ...demo import voc_dataset  # the demo scenes: only this command needs them

    for name in ("train", "val"):
        if getattr(args, name) < 0:
            raise AttnSegError(f"--{name}: {getattr(args, name)}; give 0 or more images.")
    ids = voc_dataset.write(Path(args.out), args.train, args.val)
    print(f"{args.out}: {len(ids)} demo scenes in VOC layout (class names in {Path(args.out) / 'class_names.txt'})")
    return 0


COMMANDS = {"segment": segment_command, "pseudo-labels": pseudo_labels_command, "evaluate": evaluate_command,
            "demo-dataset": demo_dataset_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AttnSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the images written so far are kept; run the same command again to resume.",
              file=sys.stderr)
        return 130
