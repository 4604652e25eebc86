"""The transform maths on plain arrays, checked against direct (brute-force) computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.transforms import functional as F


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    """An int32 instance map with one disc per centre, ids 1, 2, ..."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return inst


def brute_force_distances(instance: np.ndarray) -> np.ndarray:
    """(n_instances, H, W): distance from each pixel to the nearest pixel of each instance, by brute force."""
    pix = np.stack(np.mgrid[: instance.shape[0], : instance.shape[1]], -1).reshape(-1, 2).astype(float)
    out = []
    for i in np.unique(instance[instance > 0]):
        pts = np.argwhere(instance == i).astype(float)
        d = np.sqrt(((pix[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(1)
        out.append(d.reshape(instance.shape))
    return np.stack(out)


# ----------------------------------------------------------------------------- weight map


def test_border_weight_map_matches_brute_force_on_near_touching_discs() -> None:
    # discs of radius 12 at x = 18 and x = 44: one background column (x = 31) between them
    inst = discs((40, 64), [(20, 18), (20, 44)], 12)
    label = (inst > 0).astype(np.int64)
    assert inst[20, 30] == 1 and inst[20, 32] == 2 and inst[20, 31] == 0
    w0, sigma = 10.0, 5.0
    w = F.border_weight_map(inst, label, w0=w0, sigma=sigma, class_balance=True)
    assert w.dtype == np.float32 and w.shape == inst.shape

    n = label.size
    n_fg = int(label.sum())
    wc = np.where(label > 0, n / (2 * n_fg), n / (2 * (n - n_fg)))
    d = np.sort(brute_force_distances(inst), axis=0)
    border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)) * (label == 0)
    np.testing.assert_allclose(w, wc + border, rtol=0, atol=1e-5)

    wc_bg = n / (2 * (n - n_fg))
    # the gap pixel: d1 = d2 = 1
    assert w[20, 31] == pytest.approx(wc_bg + w0 * np.exp(-4 / (2 * sigma**2)), abs=1e-5)
    assert w[20, 31] > wc_bg + 0.9 * w0
    # far from both discs only the class weight remains; inside a disc exactly the class weight
    assert w[0, 63] == pytest.approx(wc_bg, abs=1e-6)
    assert w[20, 18] == pytest.approx(n / (2 * n_fg), abs=1e-5)


def test_border_weight_map_windowed_equals_full_edt_for_many_instances() -> None:
    rng = np.random.RandomState(3)
    inst = np.zeros((80, 90), np.int32)
    for i in range(1, 16):  # squares, some touching or overlapping (later ids win)
        y, x, s = rng.randint(0, 72), rng.randint(0, 82), rng.randint(2, 9)
        inst[y : y + s, x : x + s] = i
    label = (inst > 0).astype(np.int64)
    w0, sigma = 10.0, 3.0
    ids = np.unique(inst[inst > 0])
    full = np.sort(np.stack([ndimage.distance_transform_edt(inst != i) for i in ids]), axis=0)
    wc = F.class_balance_weights(label)
    expected = wc + w0 * np.exp(-((full[0] + full[1]) ** 2) / (2 * sigma**2)) * (inst == 0)
    got = F.border_weight_map(inst, label, w0=w0, sigma=sigma, class_balance=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the windowed distances are exact wherever the second-nearest instance is within the cutoff
    d1, d2 = F.two_nearest_distances(inst, max_distance=10)
    near = full[1] <= 10
    np.testing.assert_allclose(d1[near], full[0][near])
    np.testing.assert_allclose(d2[near], full[1][near])


@pytest.mark.parametrize("n_instances", [0, 1])
def test_border_term_is_zero_without_a_second_instance(n_instances: int) -> None:
    inst = discs((30, 30), [(15, 15)][:n_instances], 5)
    label = (inst > 0).astype(np.int64)
    w = F.border_weight_map(inst, label, w0=10.0, sigma=5.0, class_balance=False)
    np.testing.assert_array_equal(w, np.ones((30, 30), np.float32))
    d1, d2 = F.two_nearest_distances(inst)
    assert np.isinf(d2).all()
    assert np.isinf(d1).all() == (n_instances == 0)


def test_class_balance_weights_equalise_class_totals() -> None:
    label = np.zeros((10, 20), np.int64)
    label[2:4, 3:8] = 1  # 10 px
    label[6:9, 10:12] = 3  # 6 px; class 2 absent
    w = F.class_balance_weights(label)
    assert w.mean() == pytest.approx(1.0, abs=1e-6)
    for c in (0, 1, 3):  # every present class carries N / K
        assert w[label == c].sum() == pytest.approx(200 / 3, rel=1e-5)
    np.testing.assert_array_equal(F.class_balance_weights(np.zeros((4, 4), np.int64)), np.ones((4, 4)))


def test_weight_map_rejects_bad_input() -> None:
    inst = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match="same"):
        F.border_weight_map(inst, np.zeros((8, 9), np.int64))
    with pytest.raises(ValueError, match="integer"):
        F.border_weight_map(inst.astype(np.float32), np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        F.border_weight_map(inst - 1, np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match="sigma"):
        F.border_weight_map(inst, np.zeros((8, 8), np.int64), sigma=0.0)


# ----------------------------------------------------------------------------- elastic


def test_elastic_field_is_shared_by_image_label_and_instance() -> None:
    inst = discs((64, 64), [(22, 22), (40, 42)], 10)
    label = (inst > 0).astype(np.int64)[None]
    image = ndimage.gaussian_filter(label[0].astype(np.float32), 0.7)[None]  # intensity encodes the label
    disp = F.elastic_displacement(np.random.RandomState(5), sigma=10.0, points=3)
    image_d, label_d, inst_d = F.elastic_deform([image, label, inst[None]], disp, orders=[3, 0, 0])
    assert (image_d.dtype, label_d.dtype, inst_d.dtype) == (np.float32, np.int64, np.int32)
    assert (label_d != label).sum() > 50  # the field really moved the mask

    def agreement(lab: np.ndarray) -> tuple[float, float]:
        fg_img, fg_lab = image_d[0] > 0.5, lab[0] > 0
        return float((fg_img == fg_lab).mean()), float((fg_img & fg_lab).sum() / (fg_img | fg_lab).sum())

    acc, iou = agreement(label_d)
    assert acc >= 0.98 and iou >= 0.9
    # control: a label deformed with another field does not line up with the image
    other = F.elastic_deform([label], F.elastic_displacement(np.random.RandomState(6), 10.0, 3), [0])[0]
    assert agreement(other)[1] < iou - 0.1
    # nearest-neighbour id maps: identical foreground, no new ids
    np.testing.assert_array_equal(inst_d > 0, label_d > 0)
    assert set(np.unique(inst_d)) <= {0, 1, 2}


def test_elastic_zero_displacement_is_identity() -> None:
    rng = np.random.RandomState(0)
    image = rng.rand(3, 24, 40).astype(np.float32)
    label = (rng.rand(1, 24, 40) > 0.7).astype(np.int64)
    weight = rng.rand(1, 24, 40).astype(np.float32)
    disp = F.elastic_displacement(rng, sigma=0.0, points=3)
    image_d, label_d, weight_d = F.elastic_deform([image, label, weight], disp, orders=[3, 0, 1])
    np.testing.assert_array_equal(label_d, label)
    np.testing.assert_allclose(image_d, image, atol=1e-5)
    np.testing.assert_allclose(weight_d, weight, atol=1e-5)


def test_elastic_grouping_matches_one_array_at_a_time() -> None:
    rng = np.random.RandomState(1)
    label = (rng.rand(1, 32, 32) > 0.5).astype(np.int64)
    inst = (label * rng.randint(1, 50, label.shape)).astype(np.int32)
    disp = F.elastic_displacement(rng, 8.0, 3)
    together = F.elastic_deform([label, inst], disp, [0, 0])
    alone = [F.elastic_deform([a], disp, [0])[0] for a in (label, inst)]
    for t, a in zip(together, alone):
        assert t.dtype == a.dtype
        np.testing.assert_array_equal(t, a)


def test_elastic_rejects_bad_input() -> None:
    disp = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="same"):
        F.elastic_deform([np.zeros((1, 8, 8)), np.zeros((1, 8, 9))], disp, [3, 0])
    with pytest.raises(ValueError, match="orders"):
        F.elastic_deform([np.zeros((1, 8, 8))], disp, [3, 0])
    with pytest.raises(ValueError, match=r"\(2, P, Q\)"):
        F.elastic_deform([np.zeros((1, 8, 8))], np.zeros((3, 3)), [3])


# ----------------------------------------------------------------------------- cropping


def test_crop_or_pad_against_padding_then_slicing() -> None:
    a = np.arange(2 * 5 * 7, dtype=np.int32).reshape(2, 5, 7) + 1
    padded = np.pad(a, ((0, 0), (10, 10), (10, 10)))
    for start in [(-2, 3), (1, 1), (3, -4), (-3, -3)]:
        out = F.crop_or_pad(a, start, (6, 6))
        np.testing.assert_array_equal(
            out, padded[:, 10 + start[0] : 16 + start[0], 10 + start[1] : 16 + start[1]]
        )
        assert out.dtype == a.dtype


def test_crop_start_keeps_the_window_inside_or_centres_a_small_image() -> None:
    assert F.crop_start(100, 32, 50) == 34
    assert F.crop_start(100, 32, 3) == 0
    assert F.crop_start(100, 32, 99) == 68
    assert F.crop_start(20, 32, 5) == -6
    assert F.crop_start(32, 32, 0) == 0


def test_elastic_field_matches_elasticdeform_and_does_not_depend_on_the_window() -> None:
    import elasticdeform

    n = 160
    disp = F.elastic_displacement(np.random.RandomState(2), sigma=10.0, points=3)
    whole = F.elastic_field(disp, (n, n))
    # elasticdeform's own field, read off a deformed coordinate ramp (linear interpolation of a
    # ramp returns the sampled position exactly wherever it stays inside the image)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    ry, rx = elasticdeform.deform_grid([yy, xx], disp, order=1, mode="nearest")
    inner = (slice(40, 120), slice(40, 120))
    np.testing.assert_allclose(whole[0][inner], (ry - yy)[inner], atol=1e-9)
    np.testing.assert_allclose(whole[1][inner], (rx - xx)[inner], atol=1e-9)
    # a window is the window of the whole field; an extent moves and stretches the grid
    part = F.elastic_field(disp, (n, n), start=(17, 90), size=(50, 64))
    np.testing.assert_array_equal(part, whole[:, 17:67, 90:154])
    big = F.elastic_field(disp, (2 * n, 2 * n), start=(0, 0), size=(n, n), grid_origin=(-n / 2, -n / 2))
    assert not np.allclose(big, whole)


def test_elastic_warp_of_a_window_equals_the_window_of_the_whole_warp() -> None:
    import elasticdeform

    rng = np.random.RandomState(0)
    image = rng.rand(2, 120, 140).astype(np.float32)
    inst = discs((120, 140), [(30, 30), (60, 70), (90, 110)], 14)[None]
    disp = F.elastic_displacement(rng, 10.0, 3)
    full = F.elastic_warp([image, inst], F.elastic_field(disp, (120, 140)), (0, 0), [3, 0])
    ref = elasticdeform.deform_grid([image, inst], disp, order=[3, 0], mode="mirror", axis=[(1, 2)] * 2)
    np.testing.assert_allclose(full[0], ref[0], atol=1e-5)
    assert (full[1] != ref[1]).mean() < 1e-3  # nearest-neighbour ties may round apart
    start, size = (33, 51), (64, 64)
    part = F.elastic_warp([image, inst], F.elastic_field(disp, (120, 140), start, size), start, [3, 0])
    win = (slice(None), slice(33, 97), slice(51, 115))
    np.testing.assert_allclose(part[0], full[0][win], atol=1e-6)
    np.testing.assert_array_equal(part[1], full[1][win])
    assert part[0].dtype == np.float32 and part[1].dtype == np.int32
    with pytest.raises(ValueError, match="not inside"):
        F.elastic_warp([image], np.zeros((2, 64, 64)), (100, 0), [3])
