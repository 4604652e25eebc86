"""The lesion-ROI protocol against independent NumPy computations on hand-built masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.roi import RoiLesionMetrics, lesion_box, roi_window


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


# ----------------------------------------------------------------------------- crops


def test_roi_window_enlarges_the_box_by_the_margin() -> None:
    # a 10 × 6 box (columns 20..29, rows 40..45), margin 0.5 → 5 columns and 3 rows more on each side
    rows, cols = roi_window((20, 40, 29, 45), 0.5, (100, 100))
    assert (cols.start, cols.stop, rows.start, rows.stop) == (15, 35, 37, 49)
    rows, cols = roi_window((20, 40, 29, 45), 0.0, (100, 100))
    assert (cols.start, cols.stop, rows.start, rows.stop) == (20, 30, 40, 46)
    # fractional DeepLesion coordinates: pixels whose centre lies inside the enlarged box
    rows, cols = roi_window((10.4, 10.6, 13.2, 12.1), 0.0, (50, 50))
    assert (cols.start, cols.stop, rows.start, rows.stop) == (11, 14, 11, 13)


def test_roi_window_is_cut_at_every_image_border() -> None:
    shape = (32, 48)
    rows, cols = roi_window((0, 0, 5, 3), 1.0, shape)  # top-left corner
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 8, 0, 12)
    rows, cols = roi_window((40, 28, 47, 31), 1.0, shape)  # bottom-right corner
    assert (rows.start, rows.stop, cols.start, cols.stop) == (24, 32, 32, 48)
    rows, cols = roi_window((-3.0, -2.0, 2.0, 1.0), 0.5, shape)  # a box partly outside the image
    assert rows.start == 0 and cols.start == 0 and cols.stop == 6 and rows.stop == 4


def test_a_lesion_at_the_image_corner_is_scored_on_the_cut_crop() -> None:
    true = np.zeros((30, 30), np.int32)
    true[0:6, 0:6] = 1
    pred = np.zeros((30, 30), bool)
    pred[0:6, 2:9] = True  # shifted right, partly outside the 6-px box but inside the margin
    pred[20:25, 20:25] = True  # far away: outside the crop, ignored by this protocol
    roi = RoiLesionMetrics(margin=0.5)
    roi.update(pred, true)
    row = roi.rows()[0]
    assert (row["roi_x0"], row["roi_y0"], row["roi_x1"], row["roi_y1"]) == (0, 0, 8, 8)
    crop = (slice(0, 9), slice(0, 9))
    assert row["roi_dice"] == pytest.approx(_dice(pred[crop], true[crop] > 0))
    assert row["roi_pred_px"] == 42 and row["roi_truth_clipped_px"] == 0


def test_two_lesions_in_one_crop_background_or_ignored() -> None:
    true = np.zeros((60, 60), np.int32)
    true[20:30, 20:30] = 1  # lesion 1, 10 × 10: crop rows/cols 15..34
    true[22:28, 32:38] = 2  # lesion 2, 6 × 6 right of it: crop rows 19..30, cols 29..40
    pred = true > 0  # a perfect prediction of both
    for mode in ("background", "ignore"):
        roi = RoiLesionMetrics(margin=0.5, other_lesions=mode)
        roi.update(pred, true)
        r1, r2 = roi.rows()
        c1 = (slice(15, 35), slice(15, 35))
        c2 = (slice(19, 31), slice(29, 41))
        if mode == "background":
            # the neighbour's predicted pixels inside the crop are false positives of this lesion
            assert r1["roi_dice"] == pytest.approx(_dice(pred[c1], (true == 1)[c1]))
            assert r2["roi_dice"] == pytest.approx(_dice(pred[c2], (true == 2)[c2]))
            assert r1["roi_dice"] < 1 and r2["roi_dice"] < 1
            assert r1["roi_pred_px"] == 100 + 6 * 3  # lesion 2's columns 32..34 lie in lesion 1's crop
        else:
            assert r1["roi_dice"] == r2["roi_dice"] == 1.0
            assert r1["roi_hd95"] == r2["roi_hd95"] == 0.0 and r1["roi_surface_dice"] == 1.0
        # RECIST: measured on the largest predicted component in the crop (here the lesion itself)
        assert r1["roi_long_error_mm"] == pytest.approx(0.0, abs=1e-6)


def test_deeplesion_box_is_used_unless_it_misses_the_lesion() -> None:
    t = np.zeros((40, 40), bool)
    t[10:20, 10:16] = True
    box, src = lesion_box(t, {"bbox": [8.0, 7.0, 18.0, 22.0]})  # RECIST extent + 5 px, around it
    assert src == "bbox" and box == (8.0, 7.0, 18.0, 22.0)
    box, src = lesion_box(t, {"bbox": [25.0, 25.0, 35.0, 35.0]})  # a box elsewhere: a mislabelled row
    assert src == "mask" and box == (10.0, 10.0, 15.0, 19.0)
    assert lesion_box(t, None) == ((10.0, 10.0, 15.0, 19.0), "mask")


def test_missed_lesion_conventions() -> None:
    true = np.zeros((30, 30), np.int32)
    true[10:15, 10:15] = 1
    roi = RoiLesionMetrics(margin=0.5)
    roi.update(np.zeros((30, 30), bool), true, meta={"id": "s", "lesions": [{"type": 4}]})
    row = roi.rows()[0]
    assert row["roi_dice"] == 0.0 and row["roi_surface_dice"] == 0.0 and math.isinf(row["roi_hd95"])
    assert row["roi_sape_long"] == 1.0 and math.isnan(row["roi_long_error_mm"])
    out = roi.compute()
    assert out["roi_dice"] == 0.0 and out["roi_empty"] == 1.0 and "roi_hd95" not in out
    assert "roi_long_error_mm" not in out and out["roi_dice_liver"] == 0.0 and out["roi_dice_lt10"] == 0.0


def test_aggregates_and_groups_equal_hand_means() -> None:
    true = np.zeros((80, 80), np.int32)
    true[5:15, 5:15] = 1
    true[50:70, 50:60] = 2
    pred = np.zeros((80, 80), bool)
    pred[5:15, 5:12] = True  # 70 of lesion 1's 100 px
    pred[50:70, 50:60] = True  # lesion 2 exact
    meta = {"id": "img", "lesions": [{"type": 5, "coords": [5, 10, 14, 10, 9, 5, 9, 14]}, {"type": 4}]}
    roi = RoiLesionMetrics(margin=0.5)
    roi.update(pred, true, spacing=(2.0, 2.0), meta=meta)
    r1, r2 = roi.rows()
    d1 = 2 * 70 / 170
    assert r1["roi_dice"] == pytest.approx(d1) and r2["roi_dice"] == 1.0
    assert r1["roi_iou"] == pytest.approx(70 / 100)
    out = roi.compute()
    assert out["roi_dice"] == pytest.approx((d1 + 1) / 2)
    assert out["roi_dice_lung"] == pytest.approx(d1) and out["roi_dice_liver"] == 1.0
    # 10 px at 2 mm = 20 mm → 10–30 mm stratum; 20 px × 2 mm = 40 mm (diagonal more) → > 30 mm
    assert out["roi_dice_10to30"] == pytest.approx(d1) and out["roi_dice_gt30"] == 1.0
    # annotated RECIST of lesion 1: 9 px long axis × 2 mm; only lesion 1 has one
    assert r1["roi_recist_long_error_mm"] == pytest.approx(abs(r1["roi_pred_long_mm"] - 18.0))
    assert math.isnan(r2["roi_recist_long_error_mm"])
    assert out["roi_recist_long_error_mm"] == pytest.approx(r1["roi_recist_long_error_mm"])


# ----------------------------------------------------------------------------- RECIST on rasterised shapes


def _raster(shape: tuple[int, int], inside) -> np.ndarray:  # noqa: ANN001
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    return inside(xx, yy)


@pytest.mark.parametrize(("a", "b", "deg"), [(20, 10, 0), (18, 7, 30), (25, 12, 65), (12, 11, 120)])
def test_recist_of_rasterised_ellipses_within_one_pixel(a: float, b: float, deg: float) -> None:
    th = math.radians(deg)
    cx, cy = 40.3, 38.7

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = (x - cx) * math.cos(th) + (y - cy) * math.sin(th)
        v = -(x - cx) * math.sin(th) + (y - cy) * math.cos(th)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0

    mask = _raster((80, 80), inside)
    roi = RoiLesionMetrics(margin=0.3)
    roi.update(mask, mask.astype(np.int32))
    row = roi.rows()[0]
    assert row["roi_pred_long_mm"] == pytest.approx(2 * a, abs=1.0)
    assert row["roi_pred_short_mm"] == pytest.approx(2 * b, abs=1.0)


def _rectangle_axes(length: float, width: float) -> tuple[float, float]:
    """Long axis (the diagonal) and the longest chord perpendicular to it, by slab clipping."""
    d = math.hypot(length, width)
    best = 0.0
    for t in np.linspace(-d / 2, d / 2, 4001):
        # points t·diag + s·normal (local frame); |x| ≤ L/2 and |y| ≤ W/2 bound s
        lo1, hi1 = (t * length - length * d / 2) / width, (t * length + length * d / 2) / width
        lo2, hi2 = (-width * d / 2 - t * width) / length, (width * d / 2 - t * width) / length
        best = max(best, min(hi1, hi2) - max(lo1, lo2))
    return d, best


@pytest.mark.parametrize(("length", "width", "deg"), [(30, 10, 0), (28, 12, 25), (36, 8, 70), (20, 18, 45)])
def test_recist_of_rotated_rectangles_within_one_pixel(length: float, width: float, deg: float) -> None:
    th = math.radians(deg)
    cx, cy = 40.5, 39.2

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = (x - cx) * math.cos(th) + (y - cy) * math.sin(th)
        v = -(x - cx) * math.sin(th) + (y - cy) * math.cos(th)
        return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)

    mask = _raster((80, 80), inside)
    long_ref, short_ref = _rectangle_axes(length, width)
    roi = RoiLesionMetrics(margin=0.3)
    roi.update(mask, mask.astype(np.int32), spacing=(0.5, 0.5))  # mm = px / 2
    row = roi.rows()[0]
    assert row["roi_pred_long_mm"] / 0.5 == pytest.approx(long_ref, abs=1.0)
    assert row["roi_pred_short_mm"] / 0.5 == pytest.approx(short_ref, abs=1.0)


# ----------------------------------------------------------------------------- DeepLesion data


def test_deeplesion_samples_carry_boxes_scaled_with_resampling(demo_root) -> None:  # noqa: ANN001
    """The dataset's ``meta["lesions"][i]["bbox"]`` follows the image when it is resampled, and is
    the box the ROI protocol uses (it covers the generated true mask)."""
    from medseg.config import DataConfig
    from medseg.data import build_dataset

    native = build_dataset(DataConfig(root=str(demo_root), spacing_mm=None), "all")
    sample = native[0]
    sp = sample["meta"]["spacing"][0]
    resampled = build_dataset(DataConfig(root=str(demo_root), spacing_mm=sp * 2), "all")[0]
    s = resampled["meta"]["resample_scale"]
    for a, b in zip(sample["meta"]["lesions"], resampled["meta"]["lesions"]):
        x1, y1, x2, y2 = a["bbox"]
        # pixel centres map as x' + 0.5 = (x + 0.5) · scale
        assert b["bbox"] == pytest.approx([(x1 + .5) * s[1] - .5, (y1 + .5) * s[0] - .5,
                                           (x2 + .5) * s[1] - .5, (y2 + .5) * s[0] - .5])
    for smp in (sample, resampled):
        truth = smp["truth"][0]
        roi = RoiLesionMetrics(margin=0.5)
        roi.update(truth > 0, truth, smp["meta"]["spacing"], smp["meta"])
        rows = roi.rows()
        assert rows and all(r["roi_box_source"] == "bbox" for r in rows)
        assert sum(r["roi_truth_clipped_px"] for r in rows) == 0
