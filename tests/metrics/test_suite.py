"""EvaluationSuite: both protocols merged per lesion, and intervals that resample patients."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import MetricsConfig
from medseg.metrics.stats import resample_counts
from medseg.metrics.suite import EvaluationSuite


def _batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Four 32² slices of three patients; one lesion each, predicted with known overlaps."""
    n = 4
    label = np.zeros((n, 32, 32), np.int64)
    pred = np.zeros((n, 32, 32), np.int64)
    prob = np.zeros((n, 32, 32), np.float32)
    # lesion k: 8 × 8 square; the prediction covers its first w columns (w = 8, 6, 4, 0)
    for k, w in enumerate((8, 6, 4, 0)):
        label[k, 10:18, 10:18] = 1
        pred[k, 10:18, 10:10 + w] = 1
        prob[k, 10:18, 10:10 + w] = 0.9
    pred[3, 0:3, 0:3] = 1  # a false positive on slice 3
    prob[3, 0:3, 0:3] = 0.6
    patients = (1, 1, 2, 3)
    metas = [{"id": f"s{k}", "patient_index": p, "series": f"p{p}-s{k}", "spacing": [1.0, 1.0]}
             for k, p in enumerate(patients)]
    return pred, label, prob, metas


def _suite(**cfg: object) -> EvaluationSuite:
    pred, label, prob, metas = _batch()
    suite = EvaluationSuite(MetricsConfig(**cfg), num_classes=2)  # type: ignore[arg-type]
    suite.update(pred, label, None, [m["spacing"] for m in metas], metas, fg_prob=prob)
    return suite


def test_lesion_rows_merge_both_protocols_froc_and_unit() -> None:
    suite = _suite()
    rows = suite.lesion_rows()
    assert len(rows) == 4 and len({tuple(r) for r in rows}) == 1  # equal keys in equal order
    assert [r["unit"] for r in rows] == ["patient 1", "patient 1", "patient 2", "patient 3"]
    assert [r["dice"] for r in rows] == pytest.approx([1.0, 12 / 14, 8 / 12, 0.0])
    assert [r["roi_dice"] for r in rows] == pytest.approx([1.0, 12 / 14, 8 / 12, 0.0])
    assert [r["froc_score"] for r in rows] == pytest.approx([0.9, 0.9, 0.9, None])
    m = suite.compute()
    assert m["roi_dice"] == pytest.approx(np.mean([1.0, 12 / 14, 8 / 12, 0.0]))
    assert m["froc_max_fp"] == 0.25 and m["froc_max_sens"] == 0.75


def test_intervals_resample_patients_like_an_independent_computation() -> None:
    suite = _suite(bootstrap_resamples=500, bootstrap_seed=11)
    ci = suite.intervals()
    assert ci is not None and ci.unit == "patient" and ci.n_units == 3 and ci.n_resamples == 500
    w = resample_counts(3, 500, seed=11)  # patients 1, 2, 3 in order of first appearance
    # lesion Dice: each patient's lesions weighted by how often the patient is drawn
    dice = {1: [1.0, 12 / 14], 2: [8 / 12], 3: [0.0]}
    s = [sum(c * sum(dice[p]) for c, p in zip(wb, (1, 2, 3))) / sum(c * len(dice[p]) for c, p in zip(wb, (1, 2, 3)))
         for wb in w]
    assert ci.bounds["lesion_dice"] == pytest.approx(tuple(np.quantile(s, [0.025, 0.975])))
    # pixel Dice: the drawn patients' pixels pooled
    tp = {1: 64 + 48, 2: 32, 3: 0}
    fp = {1: 0, 2: 0, 3: 9}
    fn = {1: 16, 2: 32, 3: 64}
    pd = [2 * (wb @ [tp[p] for p in (1, 2, 3)]) / (wb @ [2 * tp[p] + fp[p] + fn[p] for p in (1, 2, 3)]) for wb in w]
    assert ci.bounds["dice"] == pytest.approx(tuple(np.quantile(pd, [0.025, 0.975])))
    # false positives per image: patient 3's one FP over the drawn images
    fpi = [(wb @ [0, 0, 1]) / (wb @ [2, 1, 1]) for wb in w]
    assert ci.bounds["fp_per_image"] == pytest.approx(tuple(np.quantile(fpi, [0.025, 0.975])))
    metrics = ci.as_metrics()
    assert metrics["ci_units"] == 3 and metrics["roi_dice_ci_low"] <= metrics["roi_dice_ci_high"]
    # the same seed gives the same intervals
    assert _suite(bootstrap_resamples=500, bootstrap_seed=11).intervals().bounds == ci.bounds


def test_unit_falls_back_to_series_then_images() -> None:
    pred, label, prob, metas = _batch()
    for drop, unit in ((("patient_index",), "series"), (("patient_index", "series"), "image")):
        suite = EvaluationSuite(MetricsConfig(), 2)
        suite.update(pred, label, None, None, [{k: v for k, v in m.items() if k not in drop} for m in metas],
                     fg_prob=prob)
        ci = suite.intervals(n_resamples=50)
        assert ci.unit == unit and ci.n_units == 4
        assert all(r["unit"].startswith(unit + " ") for r in suite.lesion_rows())
    forced = EvaluationSuite(MetricsConfig(bootstrap_unit="patient"), 2)
    forced.update(pred, label, None, None, [{"id": m["id"]} for m in metas], fg_prob=prob)
    with pytest.raises(ValueError, match="bootstrap_unit"):
        forced.intervals()


def test_no_interval_from_a_single_patient_or_without_resamples() -> None:
    pred, label, prob, metas = _batch()
    suite = EvaluationSuite(MetricsConfig(), 2)
    suite.update(pred, label, None, None, [{**m, "patient_index": 7} for m in metas], fg_prob=prob)
    ci = suite.intervals()
    assert ci.n_units == 1 and ci.bounds == {} and "no interval" in ci.describe()
    assert _suite(bootstrap_resamples=0).intervals() is None
