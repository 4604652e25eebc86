"""The volume protocol's metrics against hand-built 3-D masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics.volume import VolumeMetrics, label_components_3d, volume_metric_names


def _ball(shape: tuple[int, int, int], c: tuple[int, int, int], r: float) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r


def test_components_join_across_slices_only_when_connected() -> None:
    m = np.zeros((3, 5, 5), bool)
    m[0, 1, 1] = m[1, 2, 2] = True  # corner neighbours across slices
    m[2, 4, 4] = True
    assert label_components_3d(m, 3).max() == 2  # 26-connected: the first two join
    assert label_components_3d(m, 1).max() == 3  # 6-connected: all apart


def test_two_lesions_one_missed_one_fp() -> None:
    shape = (7, 32, 32)
    a, b = _ball(shape, (3, 8, 8), 2.5), _ball(shape, (3, 22, 22), 2.5)
    truth = a.astype(np.int32) + 2 * b.astype(np.int32)
    pred_a = np.zeros(shape, bool)
    pred_a[2:5, 6:11, 6:11] = True  # overlaps lesion 1 in a cube
    fp = np.zeros(shape, bool)
    fp[0, 0:2, 28:30] = True  # far from both lesions
    pred = (pred_a | fp).astype(np.int64)
    key = np.zeros(7, bool)
    key[3] = True
    vm = VolumeMetrics(froc_threshold=None)
    vm.update(pred, truth, key, "v1")
    out = vm.compute()
    # independent: Dice of lesion 1 with the cube (lesion 2 is missed: 0)
    d1 = 2 * (a & pred_a).sum() / (a.sum() + pred_a.sum())
    assert out["vol_lesion_dice"] == pytest.approx((d1 + 0.0) / 2)
    assert out["vol_lesion_sensitivity"] == 0.5
    assert out["vol_fp_count"] == 1 and out["vol_fp_per_volume"] == 1.0
    fg = truth > 0
    assert out["vol_dice"] == pytest.approx(2 * (pred.astype(bool) & fg).sum() / (pred.astype(bool).sum() + fg.sum()))
    # per-slice Dice: key slice 3 alone; the non-key slices holding a lesion averaged
    pb = pred.astype(bool)
    per = [2 * (pb[z] & fg[z]).sum() / (pb[z].sum() + fg[z].sum()) for z in range(7) if fg[z].any()]
    zs = [z for z in range(7) if fg[z].any()]
    assert out["vol_slice_dice_key"] == pytest.approx(per[zs.index(3)])
    assert out["vol_slice_dice_nonkey"] == pytest.approx(np.mean([d for z, d in zip(zs, per) if z != 3]))
    # slice 0 has no lesion but a prediction; slice 6 neither
    empty = [z for z in range(7) if not fg[z].any()]
    assert out["vol_empty_slices_with_fp"] == pytest.approx(np.mean([pb[z].any() for z in empty]))
    rows = {r["lesion_id"]: r for r in vm.rows()}
    assert rows[2]["detected"] is False and rows[2]["dice_3d"] == 0.0
    assert rows[1]["slices"] == int(a.any((1, 2)).sum())


def test_perfect_prediction_and_binary_truth_split_into_components() -> None:
    shape = (5, 20, 20)
    a, b = _ball(shape, (2, 5, 5), 2), _ball(shape, (2, 14, 14), 2)
    truth = (a | b).astype(np.int32)  # one id: the 3-D components are the lesions
    vm = VolumeMetrics(froc_threshold=0.1)
    vm.update(truth, truth, np.array([False, False, True, False, False]), "v", prob=truth.astype(float) * 0.9)
    out = vm.compute()
    assert out["vol_lesion_count"] == 2 and out["vol_lesion_dice"] == 1.0 and out["vol_fp_count"] == 0
    assert out["vol_froc_max_sens"] == 1.0 and out["vol_froc_max_fp"] == 0.0  # no FP: no rate reached beyond 0
    assert set(out) <= set(volume_metric_names())


def test_froc_counts_fp_per_volume() -> None:
    shape = (3, 16, 16)
    truth = np.zeros(shape, np.int32)
    truth[1, 4:8, 4:8] = 1
    prob = np.zeros(shape)
    prob[1, 4:8, 4:8] = 0.6  # the lesion at 0.6
    prob[0, 12:14, 12:14] = 0.8  # a false positive scoring higher
    vm = VolumeMetrics(froc_threshold=0.1)
    for i in range(2):  # two identical volumes: FP per volume 1 at full sensitivity
        vm.update(prob > 0.5, truth, np.array([False, True, False]), f"v{i}", prob=prob)
    out = vm.compute()
    assert out["vol_froc_max_fp"] == 1.0 and out["vol_froc_max_sens"] == 1.0
    assert out["vol_froc_sens_fp0.5"] == 0.0  # at ≤ 0.5 FP/volume only the 0.8 candidates could be kept
    assert out["vol_froc_sens_fp1"] == 1.0
    assert "vol_froc_sens_fp8" not in out  # the sweep ends at 1 FP/volume: 8 is not reached


def test_touching_lesions_predicted_perfectly_score_one_and_a_merged_overgrowth_is_split_by_distance() -> None:
    """Two touching lesions are one object in any binary mask: each is scored on the part of the merged
    component nearer to it (the union would score a perfect prediction 2|A| / (2|A| + |B|), here 0.44 for
    the small one)."""
    shape = (5, 20, 30)
    truth = np.zeros(shape, np.int32)
    truth[1:4, 5:15, 2:15] = 1  # a large box, x 2..14
    truth[2:3, 8:11, 15:18] = 2  # a small one touching it at x = 15
    key = np.array([False, False, True, False, False])
    vm = VolumeMetrics(froc_threshold=None)
    vm.update(truth > 0, truth, key, "v")
    rows = vm.rows()
    assert [r["dice_3d"] for r in rows] == [1.0, 1.0]
    assert vm.compute()["vol_lesion_dice"] == 1.0
    # the same prediction grown by 2 voxels along +x (one merged component): each predicted voxel goes to
    # the lesion nearest to it (ties to both), distances computed here by brute force over voxel coordinates
    pred = truth > 0
    grown = pred.copy()
    grown[:, :, 2:] |= pred[:, :, :-2]
    vm = VolumeMetrics(froc_threshold=None)
    vm.update(grown, truth, key, "v")
    voxels = np.argwhere(grown)

    def nearest(lesion: int) -> np.ndarray:
        pts = np.argwhere(truth == lesion)
        return np.sqrt(((voxels[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(1)

    d_large, d_small = nearest(1), nearest(2)
    want = []
    for lesion, mine in ((1, d_large <= d_small), (2, d_small <= d_large)):
        credit = np.zeros(shape, bool)
        credit[tuple(voxels[mine].T)] = True
        t = truth == lesion
        want.append(2 * (t & credit).sum() / (t.sum() + credit.sum()))
    assert 0.3 < want[1] < 0.95  # the small lesion gets part of the overgrowth, not all of the large box
    assert [r["dice_3d"] for r in vm.rows()] == pytest.approx(want)
