"""Lesion matching (medseg.metrics.matching) on a hand-made slice: merges, misses, splits, both rules."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics.matching import label_components, match_lesions, size_stratum
from tests.metrics.cases import hand_case


def test_match_lesions_overlap_rulehand_case() -> None:
    pred, true = hand_case()
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


def test_match_lesions_iou_rulehand_case() -> None:
    pred, true = hand_case()
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


def test_size_strata_bounds() -> None:
    assert [size_stratum(v) for v in (0.0, 9.99, 10.0, 30.0, 30.01)] == ["lt10", "lt10", "10to30", "10to30", "gt30"]
