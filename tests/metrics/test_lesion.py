"""Per-lesion metrics (medseg.metrics.lesion): a hand-made slice, and diameters of ellipses of known size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.lesion import LesionMetrics
from tests.metrics.cases import ellipse, hand_case


def test_lesion_metricshand_case() -> None:
    pred, true = hand_case()
    lm = LesionMetrics(rule="overlap")
    lm.update(pred, true, (1.0, 1.0), {"id": "img0"})
    lm.update(np.zeros((40, 40)), np.zeros((40, 40)), (1.0, 1.0), {"id": "img1"})  # an empty slice
    rows = {r["lesion_id"]: r for r in lm.rows()}
    # the bar merges A and B: each is scored on the bar's columns nearer to it (A: x 5..10, B: x 11..16,
    # 30 px each), not on the whole 60-px bar (which gave 50 / 85 however well each square was covered)
    assert rows[1]["dice"] == pytest.approx(50 / 55) and rows[2]["dice"] == pytest.approx(50 / 55)
    assert rows[1]["merged"] and rows[2]["merged"] and not rows[4]["merged"]
    assert rows[3]["dice"] == 0.0 and not rows[3]["detected"] and rows[3]["hd95_mm"] == math.inf
    assert rows[3]["sape_long"] == 1.0 and math.isnan(rows[3]["pred_long_mm"])
    assert rows[4]["dice"] == pytest.approx(84 / 91)
    assert rows[4]["image_id"] == "img0"
    s = lm.compute()
    assert s["lesion_count"] == 4
    assert s["lesion_sensitivity"] == pytest.approx(3 / 4)
    assert s["fp_per_image"] == pytest.approx(1 / 2)  # one false positive over two images
    assert s["lesion_merges"] == 1
    assert s["lesion_dice"] == pytest.approx((2 * 50 / 55 + 84 / 91) / 4)

    iou = LesionMetrics(rule="iou", iou_threshold=0.5)
    iou.update(pred, true, (1.0, 1.0), {"id": "img0"})
    s = iou.compute()
    assert s["lesion_sensitivity"] == pytest.approx(1 / 4)
    assert s["fp_per_image"] == 2.0
    assert s["lesion_dice"] == pytest.approx((84 / 91) / 4)


def test_touching_lesions_predicted_perfectly_score_one_on_an_anisotropic_grid() -> None:
    """Two lesions sharing an edge are one component of any binary mask; each is scored on its own part."""
    true = np.zeros((30, 30), np.int32)
    true[5:20, 5:20] = 1
    true[10:14, 20:24] = 2  # touches lesion 1 along x = 19 | 20
    lm = LesionMetrics(rule="overlap")
    lm.update(true > 0, true, (0.7, 1.4), {"id": "img"})
    rows = lm.rows()
    assert [r["dice"] for r in rows] == [1.0, 1.0] and [r["hd95_mm"] for r in rows] == [0.0, 0.0]
    assert all(r["merged"] for r in rows) and lm.compute()["lesion_merges"] == 1
    assert rows[1]["pred_long_mm"] == rows[1]["true_long_mm"]


def test_diameter_error_on_ellipses_of_known_size() -> None:
    s = 0.8  # mm/px
    true = ellipse((80, 80), (40, 40), (20, 10)).astype(np.int32)  # 41 × 21 px = 32.8 × 16.8 mm
    pred = ellipse((80, 80), (40, 40), (15, 8))  # 31 × 17 px = 24.8 × 13.6 mm
    # the annotated RECIST axes, 0-based pixels: long 40 px (32 mm), short 20 px (16 mm)
    lesion = {"coords": [20, 40, 60, 40, 40, 30, 40, 50], "type": 4}
    lm = LesionMetrics()
    lm.update(pred, true, (s, s), {"id": "e", "lesions": [lesion]})
    (row,) = lm.rows()
    tol = 0.5 * s  # measurement is precise to well within half a pixel
    assert row["true_long_mm"] == pytest.approx(41 * s, abs=tol)
    assert row["true_short_mm"] == pytest.approx(21 * s, abs=tol)
    assert row["pred_long_mm"] == pytest.approx(31 * s, abs=tol)
    assert row["pred_short_mm"] == pytest.approx(17 * s, abs=tol)
    assert row["long_error_mm"] == pytest.approx(8.0, abs=2 * tol)
    assert row["recist_long_mm"] == pytest.approx(32.0) and row["recist_short_mm"] == pytest.approx(16.0)
    assert row["sape_long"] == pytest.approx(8.0 / (32.8 + 24.8), abs=0.02)
    assert row["size_stratum"] == "gt30" and row["lesion_type"] == 4
    summary = lm.compute()
    assert summary["diameter_error_mm"] == pytest.approx(row["long_error_mm"])
    assert summary["diameter_error_mm_gt30"] == pytest.approx(row["long_error_mm"])
    assert summary["lesion_sensitivity_liver"] == 1.0
    assert summary["recist_diameter_error_mm"] == pytest.approx(abs(row["pred_long_mm"] - 32.0))
    assert "lesion_count_lt10" not in summary  # empty strata are left out, not NaN

    # anisotropic pixels: the horizontal long axis scales with sx, the vertical short axis with sy
    lm = LesionMetrics()
    lm.update(pred, true, (0.5, 1.0), {"id": "e", "lesions": [lesion]})
    assert lm.rows()[0]["recist_long_mm"] == pytest.approx(40.0)
    assert lm.rows()[0]["recist_short_mm"] == pytest.approx(10.0)
