"""FROC against hand-computed operating points, including FP rates the sweep never reaches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.froc import FrocMetrics, froc_candidates, froc_curve, froc_summary, sensitivity_at


def test_froc_on_a_hand_computed_list_with_unreached_rates() -> None:
    # four lesions (the last never hit) and four false positives on two images.
    # Sweeping the score down: 0.9 TP, 0.8 FP, 0.6 TP, 0.5 FP, 0.4 FP, 0.3 TP, 0.2 FP
    # → (FP/image, sensitivity): (0, 0), (0, .25), (.5, .25), (.5, .5), (1, .5), (1.5, .5), (1.5, .75), (2, .75)
    curve = froc_curve(np.array([0.9, 0.6, 0.3, -math.inf]), np.array([0.8, 0.5, 0.4, 0.2]), n_images=2)
    assert curve is not None
    assert curve.fp_per_image.tolist() == [0, 0, 0.5, 0.5, 1.0, 1.5, 1.5, 2.0]
    assert curve.sensitivity.tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75]
    assert sensitivity_at(curve, 0.5) == 0.5
    assert sensitivity_at(curve, 1.0) == 0.5
    assert sensitivity_at(curve, 2.0) == 0.75
    assert sensitivity_at(curve, 0.25) == 0.25  # between points: the best point at or below the rate
    assert sensitivity_at(curve, 4.0) is None and sensitivity_at(curve, 8.0) is None  # not extrapolated
    out = froc_summary(curve)
    assert out == {"froc_sens_fp0.5": 0.5, "froc_sens_fp1": 0.5, "froc_sens_fp2": 0.75,
                   "froc_max_fp": 2.0, "froc_max_sens": 0.75}  # no fp4 / fp8 and no mean of the five


def test_froc_mean_of_the_five_rates_when_all_are_reached() -> None:
    # 2 lesions found at 0.95 and 0.1; 10 FPs of score 0.5 on one image reach 10 FP/image
    curve = froc_curve(np.array([0.95, 0.1]), np.full(10, 0.5), n_images=1)
    out = froc_summary(curve)
    # up to 8 FP/image only the 0.95 lesion counts (the 10 FPs enter together at 0.5)
    assert [out[f"froc_sens_fp{r:g}"] for r in (0.5, 1, 2, 4, 8)] == [0.5] * 5
    assert out["froc_sens_mean"] == 0.5 and out["froc_max_fp"] == 10.0 and out["froc_max_sens"] == 1.0


def test_ties_between_a_hit_and_a_false_positive_enter_together() -> None:
    curve = froc_curve(np.array([0.7]), np.array([0.7]), n_images=1)
    assert curve.fp_per_image.tolist() == [0.0, 1.0] and curve.sensitivity.tolist() == [0.0, 1.0]
    assert sensitivity_at(curve, 0.5) == 0.0  # the lesion cannot be had without its tied FP


def test_weighted_curve_equals_the_curve_of_repeated_items() -> None:
    """The bootstrap reweights images: weight 2 must equal the image counted twice."""
    w = froc_curve(np.array([0.9, 0.4]), np.array([0.6]), n_images=3.0, lesion_weights=np.array([2.0, 1.0]),
                   fp_weights=np.array([2.0]))
    rep = froc_curve(np.array([0.9, 0.9, 0.4]), np.array([0.6, 0.6]), n_images=3.0)
    assert np.allclose(w.fp_per_image, rep.fp_per_image) and np.allclose(w.sensitivity, rep.sensitivity)


def test_no_lesions_no_curve() -> None:
    assert froc_curve(np.zeros(0), np.array([0.5]), 1) is None
    assert froc_summary(None) == {}


def _blob(shape: tuple[int, int], r0: int, c0: int, size: int, peak: float) -> np.ndarray:
    """A square probability blob rising to ``peak`` at its centre pixel."""
    p = np.zeros(shape)
    p[r0 : r0 + size, c0 : c0 + size] = peak * 0.5
    p[r0 + size // 2, c0 + size // 2] = peak
    return p


def test_candidates_are_components_above_threshold_scored_by_their_maximum() -> None:
    prob = _blob((20, 20), 2, 2, 4, 0.9) + _blob((20, 20), 12, 12, 3, 0.7) + _blob((20, 20), 2, 14, 3, 0.15)
    labels, scores = froc_candidates(prob, threshold=0.1)
    # the third blob's body is 0.075 < 0.1: only its 0.15 peak pixel is a candidate
    assert labels.max() == 3 and sorted(scores.tolist()) == [0.15, 0.7, 0.9]
    assert (labels > 0).sum() == 16 + 9 + 1


def test_froc_metrics_over_two_images_by_hand() -> None:
    shape = (20, 20)
    # image 1: lesion 1 under a 0.9 blob, lesion 2 under nothing; a 0.7 blob elsewhere (FP)
    t1 = np.zeros(shape, np.int32)
    t1[3:6, 3:6] = 1
    t1[15:18, 2:5] = 2
    p1 = _blob(shape, 2, 2, 4, 0.9) + _blob(shape, 12, 12, 3, 0.7)
    # image 2: one lesion hit by a 0.3 blob; a 0.05 blob below the candidate threshold
    t2 = np.zeros(shape, np.int32)
    t2[10:13, 10:13] = 1
    p2 = _blob(shape, 10, 10, 3, 0.3) + _blob(shape, 0, 0, 2, 0.05)
    froc = FrocMetrics(threshold=0.1)
    froc.update(p1, t1, "a")
    froc.update(p2, t2, "b")
    assert froc.lesion_scores() == [("a", 1, 0.9), ("a", 2, -math.inf), ("b", 1, 0.3)]
    assert froc.false_positives() == [("a", 0.7)]
    # sweep: 0.9 TP → (0, 1/3); 0.7 FP → (0.5, 1/3); 0.3 TP → (0.5, 2/3); lesion 2 never found
    out = froc.compute()
    assert out["froc_sens_fp0.5"] == pytest.approx(2 / 3)
    assert out["froc_max_fp"] == 0.5 and out["froc_max_sens"] == pytest.approx(2 / 3)
    assert "froc_sens_fp1" not in out and "froc_sens_mean" not in out


def test_iou_rule_turns_a_sprawling_candidate_into_a_false_positive() -> None:
    t = np.zeros((20, 20), np.int32)
    t[5:7, 5:7] = 1  # 4 px lesion
    p = np.zeros((20, 20))
    p[2:14, 2:14] = 0.8  # 144 px candidate over it: overlaps, IoU 4/144
    for rule, found in (("overlap", True), ("iou", False)):
        froc = FrocMetrics(threshold=0.1, rule=rule)
        froc.update(p, t, "x")
        assert (froc.lesion_scores()[0][2] == 0.8) is found
        assert len(froc.false_positives()) == (0 if found else 1)
