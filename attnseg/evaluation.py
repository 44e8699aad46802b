"""Semantic-segmentation scores the papers report: the pixel confusion matrix
over a whole dataset, per-class IoU and their mean (mIoU), and DiffSegmenter's
background-threshold sweep.

Pixels whose ground truth is the ignore label (255 in PASCAL VOC: object
borders and difficult regions) count for nothing: they are dropped, never
mapped to background (GoCA's evaluation maps them to background, which rewards
a segmenter for leaving borders unlabelled)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AttnSegError
from .masks import label_map

IGNORE_LABEL = 255


class ConfusionMatrix:
    """A classes x classes pixel count (rows: ground truth, columns: prediction),
    accumulated image by image; ids are dataset labels (0 = background)."""

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL) -> None:
        if num_classes < 1:
            raise AttnSegError(f"num_classes: {num_classes}; a dataset has at least one class.")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def add(self, truth: torch.Tensor, prediction: torch.Tensor, name: str = "prediction") -> None:
        """Counts one image's pixels: ``truth`` and ``prediction`` are integer label
        maps of one shape. ``name`` (an image id) is quoted in errors."""
        if truth.shape != prediction.shape:
            raise AttnSegError(f"{name}: the prediction is {tuple(prediction.shape)} but its ground truth is "
                               f"{tuple(truth.shape)}; predict at the ground truth's size.")
        truth, prediction = truth.flatten().long().cpu(), prediction.flatten().long().cpu()
        kept = truth != self.ignore_label
        truth, prediction = truth[kept], prediction[kept]
        for what, labels in (("ground truth", truth), ("prediction", prediction)):
            outside = (labels < 0) | (labels >= self.num_classes)
            if bool(outside.any()):
                raise AttnSegError(f"{name}: the {what} holds label {int(labels[outside][0])}, outside the "
                                   f"dataset's {self.num_classes} classes (0..{self.num_classes - 1}, "
                                   f"{self.ignore_label} ignored).")
        index = truth * self.num_classes + prediction
        self.counts += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def iou(self) -> torch.Tensor:
        """(classes,) float64 IoU = TP / (TP + FP + FN); NaN for a class that is
        neither in the ground truth nor predicted (it does not enter the mean)."""
        hits = self.counts.diag().double()
        union = self.counts.sum(0).double() + self.counts.sum(1).double() - hits
        return torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes that occur (in the truth or the predictions)."""
        iou = self.iou()
        return float(iou.nanmean()) if bool(iou.isfinite().any()) else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.counts.sum())
        return float(self.counts.diag().sum()) / total if total else float("nan")


def predicted_labels(scores: torch.Tensor, class_ids: torch.Tensor, threshold: float,
                     background: str = "threshold") -> torch.Tensor:
    """(C, H, W) score maps of the classes ``class_ids`` (C dataset ids) -> (H, W)
    dataset labels: background (0) where the background rule wins, else the id of
    the best-scoring class (the rule of :func:`attnseg.masks.label_map`)."""
    local = label_map(scores[None].float(), threshold, background)[0]
    lookup = torch.cat([torch.zeros(1, dtype=torch.long), class_ids.long().cpu()]).to(local.device)
    return lookup[local]


@dataclass(frozen=True)
class SweepResult:
    thresholds: tuple[float, ...]
    mious: tuple[float, ...]
    matrices: tuple[ConfusionMatrix, ...]

    @property
    def best(self) -> int:
        """Index of the threshold with the highest mIoU (the first on ties)."""
        return max(range(len(self.mious)), key=lambda i: (self.mious[i], -i))


class ThresholdSweep:
    """DiffSegmenter's evaluation: one confusion matrix per background threshold,
    all filled from the same score maps, so the best constant threshold over the
    whole set can be read off (an oracle choice on the evaluated images; report
    it as such, or pick the threshold on another split)."""

    def __init__(self, thresholds, num_classes: int, ignore_label: int = IGNORE_LABEL) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds:
            raise AttnSegError("sweep: no thresholds; give start:stop:step, e.g. 0.30:0.74:0.02.")
        self.matrices = tuple(ConfusionMatrix(num_classes, ignore_label) for _ in self.thresholds)

    def add(self, truth: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor, name: str = "scores") -> None:
        """``scores`` (C, H, W) in [0, 1] at the ground truth's size, one map per
        entry of ``class_ids``."""
        if scores.shape[0] != class_ids.numel():
            raise AttnSegError(f"{name}: {scores.shape[0]} score maps but {class_ids.numel()} class ids.")
        for threshold, matrix in zip(self.thresholds, self.matrices):
            matrix.add(truth, predicted_labels(scores, class_ids, threshold), name)

    def result(self) -> SweepResult:
        return SweepResult(self.thresholds, tuple(m.miou() for m in self.matrices), self.matrices)


def sweep_thresholds(text: str) -> tuple[float, ...]:
    """'start:stop:step' (stop included, as DiffSegmenter's 0.30-0.74) or a
    comma list -> thresholds, each in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = tuple(round(start + i * step, 6) for i in range(max(count, 0)))
        else:
            values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise AttnSegError(f"sweep: '{text}' is not start:stop:step with a positive step (e.g. 0.30:0.74:0.02) "
                           f"nor a comma list of thresholds.") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise AttnSegError(f"sweep: '{text}' gives thresholds outside [0, 1] (or none); scores are min-max "
                           f"normalised to [0, 1].")
    return values
