"""Run a segmenter over many images, one label PNG per image, by one of two
engines: ``local`` (this process; no Ray import) and ``ray`` (a Ray Data
pipeline: the file list, decoding on CPU tasks, segmentation on an actor pool
with one model per actor, writing on CPU tasks).

Both engines run the same three steps on each image (:func:`decode`, the
segmenter, :meth:`Outputs.write`), so they write the same bytes. Both are
resumable: an image whose label PNG exists is skipped, and the label PNG is
written last and atomically (a temporary file renamed), so it exists only once
all of the image's outputs do."""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ...attnseg.errors import AttnSegError
from .datasets import read_image, save_label_png, voc_palette, write_atomically

OVERLAY_ALPHA = 0.55
MAX_BLOCKS = 1024  # the Ray engine's input blocks, at most


@dataclass(frozen=True)
class Job:
    """One image to segment: its id (output file stem), path, the class names to
    segment and the label id each of them gets in the output PNG."""

    id: str
    image: str
    classes: tuple[str, ...]
    label_ids: tuple[int, ...]


@dataclass(frozen=True)
class Result:
    labels: np.ndarray   # (H, W) uint8 output label ids
    scores: np.ndarray   # (C, H, W) float16 score maps of the job's classes, in the job's order


@dataclass(frozen=True)
class Outputs:
    """Where a run writes: labels/<id>.png always (VOC palette, output label ids),
    scores/<id>.npz (float16 score maps and their label ids, for evaluate --sweep),
    masks/<id>/<class>.png (0 / 255 per class) and overlays/<id>.png when asked."""

    folder: str
    scores: bool = False
    masks: bool = False
    overlays: bool = False

    def label_png(self, image_id: str) -> Path:
        return Path(self.folder) / "labels" / f"{image_id}.png"

    def done(self, job: Job) -> bool:
        return self.label_png(job.id).is_file()

    def write(self, job: Job, pixels: np.ndarray, result: Result) -> None:
        root = Path(self.folder)
        if self.scores:
            write_atomically(root / "scores" / f"{job.id}.npz", lambda file: np.savez_compressed(
                file, scores=result.scores, label_ids=np.array(job.label_ids, dtype=np.int64)))
        if self.masks:
            for name, label in zip(job.classes, job.label_ids):
                mask = np.where(result.labels == label, 255, 0).astype(np.uint8)
                _write_png(root / "masks" / job.id / f"{name.replace('/', '_')}.png", mask)
        if self.overlays:
            colours = voc_palette()[result.labels].astype(np.float32)
            tinted = pixels * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA
            shown = np.where((result.labels > 0)[..., None], np.rint(tinted), pixels).astype(np.uint8)
            _write_png(root / "overlays" / f"{job.id}.png", shown)
        save_label_png(self.label_png(job.id), result.labels)


def _write_png(path: Path, array: np.ndarray) -> None:
    picture = Image.fromarray(array)
    write_atomically(path, lambda file: picture.save(file, format="PNG"))


def decode(job: Job) -> np.ndarray:
    """(H, W, 3) uint8 RGB; an image that does not decode raises AttnSegError naming it."""
    return read_image(Path(job.image), "image")


@dataclass(frozen=True)
class ModelSettings:
    """Everything a worker needs to build its segmenter (picklable: each Ray actor
    loads its own copy of the model from ``model``)."""

    model: str
    preset: str
    device: str | None = None
    dtype: str | None = None
    allow_hub: bool = False
    model_config: str | None = None
    threshold: float | None = None
    resolution: int | None = None
    seed: int | None = None
    prompt: str = ""

    def build(self) -> "Segmenter":
        return Segmenter(self)


# The API's argument names -> the command line's, for its error messages.
ARGUMENT_NAMES = {"path_or_file": "--model", "config": "--model-config", "device": "--device", "dtype": "--dtype",
                  "preset": "--preset", "prompt": "--prompt", "resolution": "--resolution",
                  "threshold": "--threshold", "seed": "--seed", "classes": "--classes"}


def command_line_error(error: AttnSegError) -> AttnSegError:
    """The same message with the API's argument name replaced by the option's."""
    text = str(error)
    name, colon, rest = text.partition(":")
    base = name.split("[")[0]
    if colon and base in ARGUMENT_NAMES:
        return AttnSegError(ARGUMENT_NAMES[base] + name[len(base):] + colon + rest)
    return error


class Segmenter:
    """The diffusers host's ``segment`` with one loaded pipeline: (images, jobs) -> results."""

    def __init__(self, settings: ModelSettings) -> None:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from .api import load_pipeline

        # A run reports its own progress: the libraries' loading bars and notes would break it up.
        for library in (diffusers_logging, transformers_logging):
            library.disable_progress_bar()
            library.set_verbosity_error()
        self.settings = settings
        try:
            self.pipe = load_pipeline(settings.model, settings.device, settings.dtype, settings.allow_hub,
                                      settings.model_config)
        except AttnSegError as error:
            raise command_line_error(error) from None

    def __call__(self, images: list[np.ndarray], jobs: list[Job]) -> list[Result]:
        import torch

        from .api import segment

        results: list[Result | None] = [None] * len(jobs)
        todo = [i for i, job in enumerate(jobs) if job.classes]
        for i, job in enumerate(jobs):
            if not job.classes:  # nothing to look for: all background, no model pass
                height, width = images[i].shape[:2]
                results[i] = Result(np.zeros((height, width), np.uint8), np.zeros((0, height, width), np.float16))
        if todo:
            s = self.settings
            pixels = [torch.from_numpy(np.array(images[i])).permute(2, 0, 1) for i in todo]  # writable copies
            try:
                found = segment(self.pipe, pixels, [list(jobs[i].classes) for i in todo], preset=s.preset,
                                prompt=s.prompt, resolution=s.resolution, threshold=s.threshold, seed=s.seed)
            except AttnSegError as error:
                raise command_line_error(error) from None
            for i, segmentation in zip(todo, found):
                lookup = np.array((0,) + jobs[i].label_ids, dtype=np.uint8)
                results[i] = Result(lookup[segmentation.labels.numpy()], segmentation.scores.numpy().astype(np.float16))
        return results


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0              # done by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)   # (image id, why)


def report_failure(summary: Summary, image_id: str, message: str) -> None:
    summary.failed.append((image_id, message))
    print(f"skipped {image_id}: {message}", file=sys.stderr, flush=True)


def pending(jobs: list[Job], outputs: Outputs) -> list[Job]:
    return [job for job in jobs if not outputs.done(job)]


def run_local(jobs: list[Job], build: Callable[[], Callable], outputs: Outputs, batch_size: int = 1,
              advance: Callable[[int], None] | None = None) -> Summary:
    """Segments every job not yet done, ``batch_size`` images per segmenter call;
    ``build()`` makes the segmenter (only when there is work). ``advance(n)`` after
    each batch (a progress bar's update), and ``advance(0)`` once the segmenter is built."""
    todo = pending(jobs, outputs)
    summary = Summary(skipped=len(jobs) - len(todo))
    if not todo:
        return summary
    segmenter = build()
    if advance is not None:
        advance(0)
    for start in range(0, len(todo), batch_size):
        batch, images = [], []
        for job in todo[start:start + batch_size]:
            try:
                images.append(decode(job))
                batch.append(job)
            except AttnSegError as error:
                report_failure(summary, job.id, str(error))
        if batch:
            for job, pixels, result in zip(batch, images, segmenter(images, batch)):
                outputs.write(job, pixels, result)
            summary.written += len(batch)
        if advance is not None:
            advance(len(todo[start:start + batch_size]))
    return summary


# --- Ray Data ---------------------------------------------------------------

def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connects to (or starts) Ray with workers that can import this pack; False
    if Ray was already initialised (then the caller's setup is kept: start it with
    this function, or make the pack importable on the workers yourself)."""
    try:
        import ray
        import ray.cloudpickle
    except ImportError:
        raise AttnSegError("--engine: ray is not installed; pip install 'ray[data]' (the pack's 'ray' extra), "
                           "or use --engine local.") from None
    if ray.is_initialized():
        return False
    from . import __main__ as launcher

    # A worker starts with this pack not importable (it is loaded under a package
    # name of its own, without ComfyUI): the setup hook loads it the same way
    # before anything of the pack is unpickled. The hook's module is sent by value.
    ray.cloudpickle.register_pickle_by_value(launcher)
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": launcher.load_pack})
    return True


def _job(row: dict) -> Job:
    return Job(str(row["id"]), str(row["image"]), tuple(json.loads(str(row["classes"]))),
               tuple(json.loads(str(row["label_ids"]))))


def _decode_row(row: dict) -> dict:
    try:
        row["pixels"], row["error"] = decode(_job(row)), ""
    except AttnSegError as error:
        row["pixels"], row["error"] = np.zeros((1, 1, 3), np.uint8), str(error)
    return row


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class _SegmentActor:
    """One model per actor, built once; a batch's decoded images -> label maps
    (and score maps as .npy bytes: a class-less image has none, and Arrow's
    tensor columns take no empty arrays). A bad-input error (a model that does
    not load, a prompt without the classes) is not raised here, where Ray would
    wrap it in its own errors and retries, but sent on in the "fatal" column for
    the driver to raise as the one-line error it is."""

    def __init__(self, build: Callable[[], Callable]) -> None:
        try:
            self.segmenter, self.fatal = build(), ""
        except AttnSegError as error:
            self.segmenter, self.fatal = None, str(error)

    def __call__(self, batch: dict) -> dict:
        rows = range(len(batch["id"]))
        ok = [i for i in rows if not batch["error"][i]]
        results, fatal = {}, self.fatal
        if ok and not fatal:
            try:
                results = dict(zip(ok, self.segmenter([batch["pixels"][i] for i in ok],
                                                      [_job({k: batch[k][i] for k in batch}) for i in ok])))
            except AttnSegError as error:
                fatal = str(error)
        batch["fatal"] = [fatal for _ in rows]
        batch["labels"] = [results[i].labels if i in results else np.zeros((1, 1), np.uint8) for i in rows]
        batch["scores"] = [_array_bytes(results[i].scores) if i in results else b"" for i in rows]
        return batch


def _write_batch(batch: dict, outputs: Outputs) -> dict:
    for i in range(len(batch["id"])):
        if not batch["error"][i] and not batch["fatal"][i]:
            scores = np.load(io.BytesIO(batch["scores"][i]), allow_pickle=False)
            outputs.write(_job({k: batch[k][i] for k in batch}), batch["pixels"][i],
                          Result(batch["labels"][i], scores))
    return {"id": batch["id"], "error": batch["error"], "fatal": batch["fatal"]}


def run_ray(jobs: list[Job], build: Callable[[], Callable], outputs: Outputs, batch_size: int = 1,
            num_workers: int | None = None, gpus_per_worker: float | None = None,
            advance: Callable[[int], None] | None = None, address: str | None = None) -> Summary:
    """The same work as :func:`run_local` as a Ray Data pipeline. ``num_workers``
    actors (default: one per GPU of the cluster, else 1) each build one segmenter;
    ``gpus_per_worker`` defaults to 1 on a cluster with GPUs. On a CPU-only cluster
    the actors leave one CPU to the decoding and writing tasks, so the pipeline
    cannot stall with every CPU held by an actor waiting for input."""
    todo = pending(jobs, outputs)
    summary = Summary(skipped=len(jobs) - len(todo))
    if not todo:
        return summary
    started = start_ray(address)
    import ray
    import ray.data

    try:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus else 0.0
        if num_workers is None:
            num_workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else 1
        if gpus_per_worker * num_workers > gpus:
            raise AttnSegError(f"--num-workers: {num_workers} workers with {gpus_per_worker:g} GPU each need "
                               f"{gpus_per_worker * num_workers:g} GPUs; the cluster has {gpus:g}.")
        cpus = resources.get("CPU", 1)
        cpus_per_worker = 1.0 if gpus_per_worker else max(0.1, min(1.0, (cpus - 1) / num_workers))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the command line's own bar counts images
        # Ray Data's notes on each execution would break up that bar; they stay in
        # its log files (/tmp/ray/session_*/logs/ray-data*).
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        rows = [{"id": j.id, "image": j.image, "classes": json.dumps(list(j.classes)),
                 "label_ids": json.dumps(list(j.label_ids))} for j in todo]
        # Decoding runs as CPU tasks ahead of the actors. On GPU workers the stages stay
        # apart; on a CPU-only cluster Ray Data fuses the decode into the actors when
        # both ask for the same CPUs (then each actor decodes its own images).
        # One decode task per image on small runs; on large ones at most MAX_BLOCKS blocks
        # (each block costs Ray Data a task and some bookkeeping).
        dataset = (ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
                   .map(_decode_row)
                   .map_batches(_SegmentActor, fn_constructor_args=(build,), batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=cpus_per_worker,
                                num_gpus=gpus_per_worker or None, batch_format="numpy")
                   .map_batches(_write_batch, fn_kwargs={"outputs": outputs}, batch_format="numpy"))
        written = iter(dataset.iter_rows())
        try:
            for row in written:
                if row["fatal"]:
                    raise AttnSegError(str(row["fatal"]))
                if row["error"]:
                    report_failure(summary, str(row["id"]), str(row["error"]))
                else:
                    summary.written += 1
                if advance is not None:
                    advance(1)
        finally:
            written.close()  # stops the pipeline now (an interrupted run leaves no tasks writing behind it)
    finally:
        if started:
            ray.shutdown()
    return summary
