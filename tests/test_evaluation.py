"""The papers' scores: the pixel confusion matrix (255 ignored, not background),
per-class IoU, mIoU and DiffSegmenter's threshold sweep, against hand counts."""

import math

import pytest
import torch

from attnseg import AttnSegError
from attnseg.evaluation import ConfusionMatrix, ThresholdSweep, predicted_labels, sweep_thresholds

TRUTH = torch.tensor([[0, 0, 1, 1],
                      [0, 255, 1, 2],
                      [2, 2, 255, 1]])
PREDICTION = torch.tensor([[0, 1, 1, 1],
                           [0, 0, 1, 2],
                           [2, 0, 2, 0]])
# Counted by hand from the ten labelled pixels (rows: truth, columns: prediction).
HAND_COUNTS = [[2, 1, 0],
               [1, 3, 0],
               [1, 0, 2]]
# TP / (row + column - TP): 2 / (3 + 4 - 2), 3 / (4 + 4 - 3), 2 / (3 + 2 - 2).
HAND_IOU = [2 / 5, 3 / 5, 2 / 3]


def test_the_confusion_matrix_iou_and_miou_match_a_hand_count():
    matrix = ConfusionMatrix(3)
    matrix.add(TRUTH, PREDICTION)
    assert matrix.counts.tolist() == HAND_COUNTS
    assert matrix.iou().tolist() == pytest.approx(HAND_IOU)
    assert matrix.miou() == pytest.approx(sum(HAND_IOU) / 3)
    assert matrix.pixel_accuracy() == pytest.approx(7 / 10)


def test_ignored_pixels_count_for_nothing_and_are_not_background():
    predicted_elsewhere = PREDICTION.clone()
    predicted_elsewhere[TRUTH == 255] = 1
    for prediction in (PREDICTION, predicted_elsewhere):
        matrix = ConfusionMatrix(3)
        matrix.add(TRUTH, prediction)
        assert matrix.counts.tolist() == HAND_COUNTS
    # Read as background instead, the two border pixels (predicted 0 and 2) would change IoU_0.
    as_background = ConfusionMatrix(3, ignore_label=-1)
    as_background.add(TRUTH.masked_fill(TRUTH == 255, 0), PREDICTION)
    assert as_background.iou()[0] == pytest.approx(3 / 7)


def test_images_accumulate_and_absent_classes_leave_the_mean():
    matrix = ConfusionMatrix(5)
    matrix.add(TRUTH, PREDICTION)
    matrix.add(TRUTH[:, :2], PREDICTION[:, :2])  # a second image: (0,0) (0,1) (0,0) (2,2) (2,0)
    assert matrix.counts[:3, :3].tolist() == [[4, 2, 0], [1, 3, 0], [2, 0, 3]]
    iou = matrix.iou()
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    expected = [4 / (6 + 7 - 4), 3 / (4 + 5 - 3), 3 / (5 + 3 - 3)]
    assert matrix.miou() == pytest.approx(sum(expected) / 3)


def test_bad_label_maps_are_named():
    matrix = ConfusionMatrix(3)
    with pytest.raises(AttnSegError, match="2007_000032: the prediction is"):
        matrix.add(TRUTH, PREDICTION[:2], name="2007_000032")
    with pytest.raises(AttnSegError, match="prediction holds label 7"):
        matrix.add(TRUTH, PREDICTION.masked_fill(PREDICTION == 2, 7))
    with pytest.raises(AttnSegError, match="ground truth holds label 4"):
        matrix.add(TRUTH.masked_fill(TRUTH == 2, 4), PREDICTION)


def test_predicted_labels_map_score_maps_to_dataset_ids():
    # Two classes of a 21-class dataset (dog = 12, person = 15) on a 1 x 3 image.
    scores = torch.tensor([[[0.9, 0.2, 0.5]],
                           [[0.1, 0.7, 0.6]]])
    ids = torch.tensor([12, 15])
    assert predicted_labels(scores, ids, 0.4).tolist() == [[12, 15, 15]]
    assert predicted_labels(scores, ids, 0.65).tolist() == [[12, 15, 0]]
    assert predicted_labels(scores, ids, 0.95).tolist() == [[0, 0, 0]]


def test_the_threshold_sweep_keeps_one_matrix_per_threshold_and_finds_the_best():
    truth = torch.tensor([[1, 1, 0, 255]])
    scores = torch.tensor([[[0.9, 0.5, 0.3, 0.8]]])
    sweep = ThresholdSweep(sweep_thresholds("0.2:0.6:0.2"), num_classes=2)
    sweep.add(truth, scores, torch.tensor([1]))
    result = sweep.result()
    assert result.thresholds == (0.2, 0.4, 0.6)
    # 0.2: all three pixels class 1 -> IoU_0 0, IoU_1 2/3; 0.4: exact -> 1, 1; 0.6: pixel 2 lost -> 1/2, 1/2.
    assert result.mious == pytest.approx((1 / 3, 1.0, 0.5))
    assert result.best == 1
    assert result.matrices[2].counts.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("text, message", [("0.3:0.7", "start:stop:step"), ("0.3:0.7:0", "positive step"),
                                           ("0.5,1.5", r"outside \[0, 1\]"), ("a,b", "comma list")])
def test_bad_sweeps_are_named(text, message):
    with pytest.raises(AttnSegError, match=f"sweep: .*{message}"):
        sweep_thresholds(text)


def test_the_sweep_parser_includes_the_stop_as_diffsegmenter_does():
    values = sweep_thresholds("0.30:0.74:0.02")
    assert len(values) == 23 and values[0] == 0.3 and values[-1] == 0.74
    assert sweep_thresholds("0.35, 0.5") == (0.35, 0.5)
