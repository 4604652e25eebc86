"""Metrics: pixel metrics from hand-written confusion numbers, HD95 / surface Dice against brute
force, lesion matching on a hand-made case, and diameters of ellipses of known size."""

from __future__ import annotations

import csv
import io
import math

import cv2
import numpy as np
import pytest
import torch

from medseg.metrics import (
    ConfusionMatrix,
    LesionMetrics,
    MetricSuite,
    hd95,
    label_components,
    match_lesions,
    pixel_metrics,
    size_stratum,
    surface_dice,
)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- pixel metrics

#: p_ij = pixels of true class i predicted as j; rows sum to 55, 27, 18 and columns to 57, 28, 15
P = np.array([[50, 3, 2], [6, 20, 1], [1, 5, 12]])


def _pixels_from(p: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (target, pred) pixel lists realising confusion matrix ``p``."""
    t, q = [], []
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            t += [i] * int(p[i, j])
            q += [j] * int(p[i, j])
    order = np.random.default_rng(seed).permutation(len(t))
    return np.array(t)[order], np.array(q)[order]


def test_confusion_matrix_hand_numbers() -> None:
    target, pred = _pixels_from(P)
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


def test_reduce_across_ranks(tmp_path) -> None:
    import torch.distributed as dist

    target, pred = _pixels_from(P)
    suite = MetricSuite(3)
    suite.update(pred.reshape(1, 10, 10), target.reshape(1, 10, 10), None, [(1.0, 1.0)], [{"id": "x"}])
    before = suite.compute()
    suite.reduce_across_ranks()  # no process group: a no-op
    assert suite.compute() == before
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        suite.reduce_across_ranks()  # one rank: the sums and gathered rows must not double
        after = suite.compute()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(suite.confusion.matrix, P)
    assert after == before
    assert len(suite.lesion_rows()) == before["lesion_count"]


# ----------------------------------------------------------------------------- boundary metrics


def _contour_brute(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` with a 4-neighbour outside it (outside the image counts as outside)."""
    h, w = m.shape
    out = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            if not m[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if not (0 <= yy < h and 0 <= xx < w) or not m[yy, xx]:
                    out[y, x] = True
    return out


def _directed_brute(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """For each contour pixel of ``a`` the distance (mm) to the nearest contour pixel of ``b``."""
    pa = np.argwhere(_contour_brute(a)) * np.array(spacing)
    pb = np.argwhere(_contour_brute(b)) * np.array(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def _shapes() -> list[tuple[np.ndarray, np.ndarray]]:
    """Small mask pairs: offset rectangles, a ring vs a disc, shapes touching the image border."""
    pairs = []
    a = np.zeros((12, 15), bool)
    a[2:7, 3:11] = True
    b = np.zeros((12, 15), bool)
    b[4:10, 1:9] = True
    pairs.append((a, b))
    yy, xx = np.mgrid[:14, :14]
    disc = (yy - 6.5) ** 2 + (xx - 6.0) ** 2 <= 25
    ring = disc & ((yy - 6.5) ** 2 + (xx - 6.0) ** 2 >= 9)
    pairs.append((ring, disc))
    c = np.zeros((10, 10), bool)
    c[0:4, 0:10] = True  # touches three image borders
    d = np.zeros((10, 10), bool)
    d[3:10, 6:10] = True
    d[8, 1] = True  # a stray pixel far away drives the upper percentiles
    pairs.append((c, d))
    rng = np.random.default_rng(4)
    pairs.append((rng.random((9, 11)) > 0.5, rng.random((9, 11)) > 0.6))
    return pairs


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_hd95_against_brute_force(spacing: tuple[float, float]) -> None:
    for a, b in _shapes():
        d_ab, d_ba = _directed_brute(a, b, spacing), _directed_brute(b, a, spacing)
        want = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
        assert hd95(a, b, spacing) == pytest.approx(want, rel=1e-9)
        # percentile 100 is the classical (max) Hausdorff distance
        assert hd95(a, b, spacing, percentile=100) == pytest.approx(max(d_ab.max(), d_ba.max()), rel=1e-9)
        assert hd95(a, b, spacing) == pytest.approx(hd95(b, a, spacing))  # symmetric
        assert hd95(a, a, spacing) == 0.0


def test_hd95_anisotropic_hand_case() -> None:
    # Two single-pixel masks 3 rows and 4 columns apart at spacing (2, 0.5) mm: √(6² + 2²) mm.
    a = np.zeros((6, 8), bool)
    b = np.zeros((6, 8), bool)
    a[1, 1] = True
    b[4, 5] = True
    assert hd95(a, b, (2.0, 0.5)) == pytest.approx(math.sqrt(40))
    assert surface_dice(a, b, tolerance_mm=6.3, spacing=(2.0, 0.5)) == 0.0
    assert surface_dice(a, b, tolerance_mm=6.4, spacing=(2.0, 0.5)) == 1.0


@pytest.mark.parametrize("tol", [0.5, 1.0, 2.5])
def test_surface_dice_against_brute_force(tol: float) -> None:
    spacing = (0.7, 1.3)
    for a, b in _shapes():
        d_ab, d_ba = _directed_brute(a, b, spacing), _directed_brute(b, a, spacing)
        want = ((d_ab <= tol).sum() + (d_ba <= tol).sum()) / (d_ab.size + d_ba.size)
        assert surface_dice(a, b, tol, spacing) == pytest.approx(want)


def test_boundary_metrics_empty_masks() -> None:
    empty = np.zeros((5, 5), bool)
    full = np.zeros((5, 5), bool)
    full[1:3, 1:3] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(full, empty) == math.inf and hd95(empty, full) == math.inf
    assert surface_dice(empty, empty) == 1.0
    assert surface_dice(full, empty) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        hd95(full, np.zeros((5, 6), bool))


# ----------------------------------------------------------------------------- lesion matching


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Four true lesions and three predicted components on a 40×40 image.

    A (1) and B (2): 5×5 squares 2 px apart, both covered by one predicted 5×12 bar (a merge);
    C (3): missed; E (4): 7×7, predicted as 7×6 inside it; D: a predicted 4×4 blob on nothing.
    """
    true = np.zeros((40, 40), np.int32)
    true[5:10, 5:10] = 1
    true[5:10, 12:17] = 2
    true[25:30, 25:30] = 3
    true[25:32, 5:12] = 4
    pred = np.zeros((40, 40), np.uint8)
    pred[5:10, 5:17] = 1  # merge of A and B (60 px)
    pred[25:32, 6:12] = 1  # E (42 px)
    pred[33:37, 33:37] = 1  # D, false positive
    return pred, true


def test_match_lesions_overlap_rule_hand_case() -> None:
    pred, true = _hand_case()
    comps = label_components(pred)
    assert comps.max() == 3
    m = match_lesions(comps, true, rule="overlap")
    np.testing.assert_array_equal(m.true_ids, [1, 2, 3, 4])
    merge, e_comp, d_comp = comps[5, 5], comps[25, 6], comps[33, 33]
    col = {int(p): j for j, p in enumerate(m.pred_ids)}
    np.testing.assert_array_equal(m.overlap[:, col[merge]], [25, 25, 0, 0])
    np.testing.assert_array_equal(m.overlap[:, col[e_comp]], [0, 0, 0, 42])
    assert m.iou[0, col[merge]] == pytest.approx(25 / 60)
    assert m.iou[3, col[e_comp]] == pytest.approx(42 / 49)
    np.testing.assert_array_equal(m.detected, [True, True, False, True])
    np.testing.assert_array_equal(m.false_positive_ids, [d_comp])
    np.testing.assert_array_equal(m.merged_ids, [merge])
    assert m.split_ids.size == 0


def test_match_lesions_iou_rule_hand_case() -> None:
    pred, true = _hand_case()
    comps = label_components(pred)
    m = match_lesions(comps, true, rule="iou", iou_threshold=0.5)
    # the merged bar has IoU 25/60 with A and with B: under the IoU rule it matches neither
    np.testing.assert_array_equal(m.detected, [False, False, False, True])
    assert sorted(m.false_positive_ids.tolist()) == sorted([comps[5, 5], comps[33, 33]])
    assert m.merged_ids.size == 0
    with pytest.raises(ValueError, match="overlap, iou"):
        match_lesions(comps, true, rule="centroid")  # type: ignore[arg-type]


def test_match_lesions_split() -> None:
    true = np.zeros((10, 10), np.int32)
    true[2:8, 2:8] = 5
    pred = np.zeros((10, 10), np.int32)
    pred[2:8, 2:4] = 1
    pred[2:8, 6:8] = 2
    m = match_lesions(pred, true)
    np.testing.assert_array_equal(m.split_ids, [5])
    assert m.detected.all() and m.false_positive_ids.size == 0


def test_lesion_metrics_hand_case() -> None:
    pred, true = _hand_case()
    lm = LesionMetrics(rule="overlap")
    lm.update(pred, true, (1.0, 1.0), {"id": "img0"})
    lm.update(np.zeros((40, 40)), np.zeros((40, 40)), (1.0, 1.0), {"id": "img1"})  # an empty slice
    rows = {r["lesion_id"]: r for r in lm.rows()}
    assert rows[1]["dice"] == pytest.approx(50 / 85) and rows[2]["dice"] == pytest.approx(50 / 85)
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
    assert s["lesion_dice"] == pytest.approx((2 * 50 / 85 + 84 / 91) / 4)

    iou = LesionMetrics(rule="iou", iou_threshold=0.5)
    iou.update(pred, true, (1.0, 1.0), {"id": "img0"})
    s = iou.compute()
    assert s["lesion_sensitivity"] == pytest.approx(1 / 4)
    assert s["fp_per_image"] == 2.0
    assert s["lesion_dice"] == pytest.approx((84 / 91) / 4)


def _ellipse(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
    """A filled axis-aligned ellipse; semi-axes (a, b) px span 2a + 1 by 2b + 1 pixels."""
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)
    return m


def test_diameter_error_on_ellipses_of_known_size() -> None:
    s = 0.8  # mm/px
    true = _ellipse((80, 80), (40, 40), (20, 10)).astype(np.int32)  # 41 × 21 px = 32.8 × 16.8 mm
    pred = _ellipse((80, 80), (40, 40), (15, 8))  # 31 × 17 px = 24.8 × 13.6 mm
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


def test_size_strata_bounds() -> None:
    assert [size_stratum(v) for v in (0.0, 9.99, 10.0, 30.0, 30.01)] == ["lt10", "lt10", "10to30", "10to30", "gt30"]


# ----------------------------------------------------------------------------- the suite


def test_metric_suite_end_to_end() -> None:
    pred1, true1 = _hand_case()
    label = np.stack([true1 > 0, true1 > 0]).astype(np.int64)
    inst = np.stack([true1, true1])
    pred = np.stack([pred1, (true1 > 0).astype(np.uint8)]).astype(np.int64)  # image 2 is perfect
    spacing = [(0.5, 0.5), (0.5, 0.5)]
    metas = [{"id": "a"}, {"id": "b"}]
    suite = MetricSuite(2)
    suite.update(torch.as_tensor(pred)[:, None], torch.as_tensor(label)[:, None], torch.as_tensor(inst), spacing, metas)
    m = suite.compute()
    cm = ConfusionMatrix(2)
    cm.update(pred, label)
    for k, v in cm.compute().items():
        assert m[k] == pytest.approx(v)
    assert m["hd95"] == pytest.approx((hd95(pred[0], label[0], spacing[0]) + 0.0) / 2)
    assert m["surface_dice"] == pytest.approx((surface_dice(pred[0], label[0], 2.0, spacing[0]) + 1.0) / 2)
    assert m["lesion_sensitivity"] == pytest.approx(7 / 8)
    assert m["fp_per_image"] == pytest.approx(1 / 2)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    rows = suite.lesion_rows()
    assert len(rows) == 8 and len({tuple(r) for r in rows}) == 1  # same keys, same order

    # the rows write to CSV and read back unchanged
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    back = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["image_id"] for r in back] == [r["image_id"] for r in rows]
    assert [float(r["dice"]) for r in back] == pytest.approx([r["dice"] for r in rows])

    # without an instance map the lesions are the connected components of the label:
    # A and B stay apart (2 px gap), so the same eight lesions are found
    bare = MetricSuite(2)
    bare.update(pred, label, None, spacing, metas)
    assert bare.compute()["lesion_count"] == 8
    assert bare.compute()["lesion_sensitivity"] == pytest.approx(7 / 8)
    suite.reset()
    with pytest.raises(ValueError, match="no pixels"):
        suite.compute()


def test_metric_suite_one_empty_image_is_counted_not_averaged() -> None:
    label = np.zeros((2, 10, 10), np.int64)
    label[0, 2:5, 2:5] = 1
    pred = np.zeros_like(label)
    pred[0, 2:5, 3:6] = 1
    pred[1, 7:9, 7:9] = 1  # a lesion predicted on an empty slice
    suite = MetricSuite(2)
    suite.update(pred, label, None, [(1.0, 1.0)] * 2, None)
    m = suite.compute()
    assert m["hd95"] == pytest.approx(hd95(pred[0], label[0]))
    assert m["hd95_one_empty"] == 1.0
    assert m["fp_per_image"] == pytest.approx(1 / 2)
