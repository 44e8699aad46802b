"""Datasets on disk for the command line: PASCAL VOC's layout, COCO-Object from a
COCO instances json, image-level label files, label PNGs in the VOC palette.

Labels are dataset ids: 0 is background, i is ``class_names[i]``, 255 is
ignored (VOC's object borders, COCO's crowd regions). Nothing here needs a
model; images are decoded with Pillow."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...attnseg.errors import AttnSegError
from ...attnseg.evaluation import IGNORE_LABEL

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def voc_palette() -> np.ndarray:
    """(256, 3) uint8: PASCAL VOC's colour map (label i's bits spread over the
    high bits of R, G and B; 255 comes out cream, the border colour)."""
    labels = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((labels >> (3 * shift + channel)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def write_atomically(path: Path, write) -> None:
    """``write(file_object)`` into a temporary file beside ``path``, then rename it
    over ``path``: a run killed mid-write leaves no half file that a resumed run
    would take for done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """(H, W) uint8 ids -> a palette PNG (the VOC format: the pixel values are the ids)."""
    picture = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    picture.putpalette(voc_palette().flatten().tolist())
    write_atomically(Path(path), lambda file: picture.save(file, format="PNG"))


def read_label_png(path: Path, argument: str = "ground truth") -> np.ndarray:
    """A label PNG -> (H, W) uint8 ids: a palette or grey PNG holds the ids; an RGB
    one (a palette image saved as colours) is read back through the VOC palette."""
    try:
        with Image.open(path) as picture:
            picture.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise AttnSegError(f"{argument}: {path} is not a readable label PNG ({error}).") from None
    if picture.mode in ("P", "L"):
        return np.array(picture, dtype=np.uint8)
    if picture.mode not in ("RGB", "RGBA"):
        raise AttnSegError(f"{argument}: {path} is a {picture.mode} image; label PNGs are palette, grey or RGB.")
    rgb = np.array(picture.convert("RGB"), dtype=np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours = voc_palette().astype(np.int64)
    palette_keys = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    order = np.argsort(palette_keys)
    found = np.clip(np.searchsorted(palette_keys[order], keys), 0, 255)
    ids = order[found]
    if not bool((palette_keys[ids] == keys).all()):
        raise AttnSegError(f"{argument}: {path} has colours outside the VOC palette; save labels as palette PNGs.")
    return ids.astype(np.uint8)


def read_image(path: Path, argument: str = "images") -> np.ndarray:
    """(H, W, 3) uint8 RGB; an image that does not decode is an AttnSegError naming it."""
    try:
        with Image.open(path) as picture:
            return np.array(picture.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise AttnSegError(f"{argument}: {path} does not decode as an image ({error}).") from None


def check_image(path: Path, argument: str = "images") -> None:
    """Reads the header (and, for PNG, checks the chunks' checksums) without
    decoding the pixels: a file that is not an image fails here, before a run."""
    try:
        with Image.open(path) as picture:
            picture.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise AttnSegError(f"{argument}: {path} does not decode as an image ({error}).") from None


def read_class_names(path: Path, argument: str = "--class-names") -> tuple[str, ...]:
    """One class per line, the first the background (label 0); '#' lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise AttnSegError(f"{argument}: {path} is not a file; give one class per line, background first.")
    names = tuple(line.strip() for line in path.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    check_class_names(names, argument)
    return names


def check_class_names(names, argument: str) -> None:
    if len(names) < 2:
        raise AttnSegError(f"{argument}: a dataset needs the background and at least one class; got {list(names)}.")
    if len(names) > IGNORE_LABEL:
        raise AttnSegError(f"{argument}: {len(names)} classes do not fit 8-bit label PNGs "
                           f"(at most {IGNORE_LABEL}, {IGNORE_LABEL} is the ignore label).")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise AttnSegError(f"{argument}: {', '.join(repeated)} listed twice.")


def read_image_labels(path: Path, argument: str = "--labels") -> dict[str, list[str]]:
    """Image-level labels: image id (a file name's stem; a name with its suffix
    works too) -> class names. JSON: {"2007_000032": ["aeroplane", "person"], ...}
    or a list of {"image": ..., "classes": [...]}. CSV: one row per image, the image
    then its classes, one per cell or ';'-separated in one cell; a first row
    starting with "image" is a header."""
    path = Path(path)
    if not path.is_file():
        raise AttnSegError(f"{argument}: {path} is not a file (a .json or .csv of image-level labels).")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise AttnSegError(f"{argument}: {path} is not valid JSON ({error}).") from None
        if isinstance(data, list):
            try:
                data = {row["image"]: row["classes"] for row in data}
            except (TypeError, KeyError):
                raise AttnSegError(f"{argument}: {path} is a list whose rows are not "
                                   f'{{"image": ..., "classes": [...]}}.') from None
        if not isinstance(data, dict):
            raise AttnSegError(f"{argument}: {path} must map image ids to class lists.")
        rows = list(data.items())
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as file:
            cells = [[cell.strip() for cell in row] for row in csv.reader(file) if any(c.strip() for c in row)]
        if cells and cells[0][0].lower() == "image":
            cells = cells[1:]
        rows = [(row[0], [name.strip() for cell in row[1:] for name in cell.split(";") if name.strip()])
                for row in cells]
    else:
        raise AttnSegError(f"{argument}: {path} is neither .json nor .csv.")
    labels: dict[str, list[str]] = {}
    for image, classes in rows:
        if isinstance(classes, str):
            classes = [name.strip() for name in classes.replace(";", ",").split(",") if name.strip()]
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise AttnSegError(f"{argument}: image {image!r} in {path} has no list of class names.")
        labels[Path(str(image)).stem if Path(str(image)).suffix.lower() in IMAGE_SUFFIXES else str(image)] = classes
    return labels


def class_ids(names: list[str], class_names: tuple[str, ...], image: str, argument: str) -> tuple[int, ...]:
    """Class names -> dataset ids (background excluded), each name checked."""
    ids = []
    for name in names:
        if name not in class_names[1:]:
            raise AttnSegError(f"{argument}: image {image} lists '{name}', which is not one of the dataset's "
                               f"classes ({', '.join(class_names[1:])}); fix the name or pass --class-names.")
        if class_names.index(name) not in ids:
            ids.append(class_names.index(name))
    return tuple(ids)


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path


@dataclass
class Dataset:
    """Images with ground truth: ``truth(sample)`` is the (H, W) uint8 label map."""

    kind: str
    class_names: tuple[str, ...]
    samples: list[Sample]
    truth_folder: Path | None = None            # VOC: SegmentationClass
    annotations: dict = field(default_factory=dict, repr=False)   # COCO: image id -> (size, annotations)

    def truth(self, sample: Sample) -> np.ndarray:
        if self.kind == "voc":
            return read_label_png(self.truth_folder / f"{sample.id}.png", "--voc")
        size, annotations = self.annotations[sample.id]
        return coco_label_map(size, annotations)

    def has_truth(self, sample: Sample) -> bool:
        return self.kind == "coco" or (self.truth_folder / f"{sample.id}.png").is_file()

    def truth_classes(self, sample: Sample) -> tuple[int, ...]:
        """The classes in the image's ground truth (the WSSS protocol's class list)."""
        if self.kind == "coco":
            _, annotations = self.annotations[sample.id]
            return tuple(sorted({label for label, _, crowd in annotations if not crowd}))
        present = np.unique(self.truth(sample))
        return tuple(int(i) for i in present if 0 < i < len(self.class_names))


def voc(root: Path, split: str = "train", class_names: tuple[str, ...] = VOC_CLASSES) -> Dataset:
    """A PASCAL VOC folder (VOC2012/): JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
    ImageSets/Segmentation/<split>.txt. A split's images need not all have ground
    truth (train_aug lists have image-level labels only); those without it can be
    labelled from --labels but not scored."""
    root = Path(root)
    if not root.is_dir():
        raise AttnSegError(f"--voc: {root} is not a folder; give the VOC2012 folder (with JPEGImages, "
                           f"SegmentationClass and ImageSets/Segmentation).")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        splits = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
        raise AttnSegError(f"--split: {listing} does not exist; the splits here are "
                           f"{', '.join(splits) or 'none (no ImageSets/Segmentation/*.txt)'}.")
    images = root / "JPEGImages"
    if not images.is_dir():
        raise AttnSegError(f"--voc: {root} has no JPEGImages folder.")
    samples = []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        image_id = line.split()[0]
        found = [images / f"{image_id}{suffix}" for suffix in (".jpg", ".png", ".jpeg")
                 if (images / f"{image_id}{suffix}").is_file()]
        if not found:
            raise AttnSegError(f"--split: {listing} lists {image_id}, which has no image in {images}.")
        samples.append(Sample(image_id, found[0]))
    return Dataset("voc", tuple(class_names), samples, truth_folder=root / "SegmentationClass")


def coco_object(annotations_file: Path, images: Path, class_names: tuple[str, ...] | None = None) -> Dataset:
    """COCO-Object: a COCO instances json (e.g. instances_val2017.json) and its image
    folder. Label i is the i-th category in id order (the 80 things, background 0);
    instances are painted largest first (a small object on a large one stays
    visible) and crowd regions are ignored (255)."""
    annotations_file, images = Path(annotations_file), Path(images)
    if not annotations_file.is_file():
        raise AttnSegError(f"--coco: {annotations_file} is not a file; give a COCO instances json.")
    if not images.is_dir():
        raise AttnSegError(f"--images: {images} is not a folder; give the COCO images folder (e.g. val2017).")
    try:
        data = json.loads(annotations_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        entries, instances = data["images"], data["annotations"]
    except (ValueError, KeyError, TypeError) as error:
        raise AttnSegError(f"--coco: {annotations_file} is not a COCO instances json ({error}).") from None
    names = ("background",) + tuple(c["name"] for c in categories)
    if class_names is not None and tuple(class_names) != names:
        raise AttnSegError(f"--class-names: the json's categories are {', '.join(names[1:])}; a COCO dataset's "
                           f"class list comes from its json.")
    check_class_names(names, "--coco")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    by_image: dict[int, list] = {entry["id"]: [] for entry in entries}
    for instance in instances:
        by_image[instance["image_id"]].append(instance)
    samples, table = [], {}
    for entry in entries:
        sample = Sample(Path(entry["file_name"]).stem, images / entry["file_name"])
        painted = sorted(by_image[entry["id"]], key=lambda a: -a.get("area", 0))
        table[sample.id] = ((entry["height"], entry["width"]),
                            [(label_of[a["category_id"]], a["segmentation"], bool(a.get("iscrowd"))) for a in painted])
        samples.append(sample)
    return Dataset("coco", names, samples, annotations=table)


def coco_label_map(size: tuple[int, int], annotations) -> np.ndarray:
    height, width = size
    labels = np.zeros((height, width), dtype=np.uint8)
    for label, segmentation, crowd in annotations:
        labels[coco_mask(segmentation, height, width)] = IGNORE_LABEL if crowd else label
    return labels


def coco_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or run-length counts, plain or compressed) -> (H, W) bool.
    Polygons are filled with Pillow, whose edge pixels can differ from pycocotools'."""
    if isinstance(segmentation, list):
        canvas = Image.new("L", (width, height), 0)
        for polygon in segmentation:
            if len(polygon) >= 6:
                ImageDraw.Draw(canvas).polygon([float(v) for v in polygon], fill=1)
        return np.array(canvas, dtype=bool)
    counts = segmentation["counts"]
    if isinstance(counts, str):
        counts = decode_rle_string(counts)
    flat = np.zeros(height * width, dtype=bool)
    position = 0
    for index, run in enumerate(counts):
        if index % 2:
            flat[position:position + run] = True
        position += run
    return flat.reshape(width, height).T  # COCO runs go down the columns


def decode_rle_string(text: str) -> list[int]:
    """COCO's compressed run lengths: each run in 5-bit groups (6 bits per
    character, offset by 48, bit 5 = more groups follow, the last group's bit 4 the
    sign); from the fourth run on, a run is stored as its difference from the run
    two before."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def image_files(sources: list[str], argument: str = "images") -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, in the order
    given; a source that matches nothing is an error naming it."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        elif any(ch in source for ch in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path(".")
            pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else source
            matches = sorted(p for p in anchor.glob(pattern) if p.is_file())
        else:
            raise AttnSegError(f"{argument}: {source} is not a file, a folder or a glob that matches files.")
        if not matches:
            raise AttnSegError(f"{argument}: {source} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        found.extend(m for m in matches if m not in found)
    stems = [p.stem for p in found]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise AttnSegError(f"{argument}: several images are named {twice[0]} (outputs are named by the file's "
                           f"stem); rename them or run them separately.")
    return found
