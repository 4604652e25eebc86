"""Pixel metrics (medseg.metrics.pixel): the confusion matrix and its scores from hand-written numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.metrics.pixel import ConfusionMatrix, pixel_metrics
from tests.metrics.cases import P, pixels_from

torch.set_num_threads(1)


def test_confusion_matrix_hand_numbers() -> None:
    target, pred = pixels_from(P)
    cm = ConfusionMatrix(3)
    # two updates, one with tensors of shape (6, 10) and one with a flat NumPy array
    cm.update(torch.as_tensor(pred[:60]).reshape(6, 10), torch.as_tensor(target[:60]).reshape(6, 10))
    cm.update(pred[60:], target[60:])
    np.testing.assert_array_equal(cm.matrix, P)
    m = cm.compute()
    iou = [50 / (55 + 57 - 50), 20 / (27 + 28 - 20), 12 / (18 + 15 - 12)]
    assert m["pa"] == pytest.approx((50 + 20 + 12) / 100)
    assert m["mpa"] == pytest.approx((50 / 55 + 20 / 27 + 12 / 18) / 3)
    assert m["miou"] == pytest.approx(sum(iou) / 3)
    assert m["fwiou"] == pytest.approx((55 * iou[0] + 27 * iou[1] + 18 * iou[2]) / 100)
    assert m["dice_class_0"] == pytest.approx(100 / 112)
    assert m["dice_class_1"] == pytest.approx(40 / 55)
    assert m["dice_class_2"] == pytest.approx(24 / 33)
    assert m["dice"] == pytest.approx((40 / 55 + 24 / 33) / 2)
    assert set(m) == {"pa", "mpa", "miou", "fwiou", "dice", "dice_class_0", "dice_class_1", "dice_class_2"}
    cm.reset()
    assert cm.matrix.sum() == 0


def test_identical_masks_score_one_and_disjoint_dice_zero() -> None:
    y = np.zeros((2, 8, 8), dtype=np.int64)
    y[0, 2:5, 2:6] = 1
    y[1, 4:8, 0:3] = 1
    cm = ConfusionMatrix(2)
    cm.update(y, y)
    assert all(v == pytest.approx(1.0) for v in cm.compute().values())
    disjoint = np.zeros_like(y)
    disjoint[:, 0, 7] = 1  # predicted lesion pixels that never touch a true one
    cm = ConfusionMatrix(2)
    cm.update(disjoint, y)
    assert cm.compute()["dice"] == 0.0
    assert cm.compute()["dice_class_1"] == 0.0


def test_absent_class_is_excluded_not_nan() -> None:
    # class 2 appears neither in truth nor in prediction
    p = np.array([[6, 2, 0], [1, 3, 0], [0, 0, 0]])
    m = pixel_metrics(p)
    assert m["miou"] == pytest.approx((6 / 9 + 3 / 6) / 2)
    assert m["mpa"] == pytest.approx((6 / 8 + 3 / 4) / 2)
    assert m["dice"] == pytest.approx(6 / 9)  # the mean over present foreground classes = class 1
    assert m["dice_class_2"] == 1.0
    assert all(math.isfinite(v) for v in m.values())
    # class 2 only predicted (absent from the truth): counted in MIoU with IoU 0, not in MPA
    p2 = np.array([[6, 2, 1], [1, 3, 0], [0, 0, 0]])
    m2 = pixel_metrics(p2)
    assert m2["miou"] == pytest.approx((6 / 10 + 3 / 6 + 0) / 3)
    assert m2["mpa"] == pytest.approx((6 / 9 + 3 / 4) / 2)
    # no foreground anywhere: nothing to find, nothing found
    assert pixel_metrics(np.array([[10, 0], [0, 0]]))["dice"] == 1.0


def test_confusion_matrix_input_checks() -> None:
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="no pixels"):
        cm.compute()
    cm.update(np.array([0, 1, 1]), np.array([0, 255, 1]))  # the ignore value 255 is skipped
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        cm.update(np.array([2]), np.array([1]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(1)
