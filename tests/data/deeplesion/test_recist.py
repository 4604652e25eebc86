"""RECIST → mask conversion (medseg.data.deeplesion.recist): MULAN ellipse, GrabCut, and per-slice masks."""

from __future__ import annotations

import logging
import math
import threading

import cv2
import numpy as np
import pytest
from skimage.draw import ellipse as sk_ellipse

from medseg.data.base import DataError
from medseg.data.deeplesion.recist import (
    ellipse_mask,
    grabcut_mask,
    recist_centre,
    recist_polygon,
    recist_to_masks,
)
from medseg.lesion import measure_recist

# Measurement_coordinates (1-based, as in the file) and Lesion_diameters_Pixel_ of the real rows in
# the public DL_info.csv sample (shared/data/DL_info_sample.csv), copied verbatim.
REAL_ROWS = [
    ("142.391, 218.888, 134.817, 186.32, 128, 207.527, 148.45, 199.953", "33.4371, 21.8072"),
    ("132.366, 296.654, 141.834, 269.366, 124.569, 282.732, 145.732, 290.528", "28.8842, 22.5531"),
    ("289.186, 191.424, 278.766, 191.238, 285.092, 186.772, 285.092, 195.146", "10.4219, 8.37346"),
    ("242.885, 250.727, 236.748, 232.657, 236.066, 242.885, 242.203, 240.801", "19.0836, 6.4812"),
    ("357.287, 317.217, 333.357, 296.626, 338.365, 319.444, 356.174, 293.844", "31.57, 31.1851"),
    ("234.71, 317.422, 228.227, 317.422, 231.581, 315.634, 231.581, 318.987", "6.48284, 3.35319"),
    ("179.684, 308.268, 171.496, 314.068, 178.724, 314.636, 173.568, 307.358", "10.0341, 8.91925"),
    ("104.958, 196.836, 95.9909, 216.881, 92.826, 202.111, 106.541, 210.024", "21.959, 15.8335"),
    ("171.949, 144.087, 178.807, 191.034, 150.85, 168.879, 191.466, 162.022", "47.4447, 41.1914"),
    ("266.116, 262.212, 254.758, 261.502, 260.969, 265.939, 261.502, 259.195", "11.3808, 6.76517"),
    ("164.139, 283.262, 191.396, 253.481, 160.101, 261.557, 181.301, 280.96", "40.3709, 28.7386"),
]


def _floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split(",")])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("coords_text,diam_text", REAL_ROWS)
def test_ellipse_real_rows_measures_like_the_recist(coords_text: str, diam_text: str) -> None:
    coords = _floats(coords_text) - 1.0  # 1-based in the file
    long_px, short_px = _floats(diam_text)
    p = coords.reshape(4, 2)
    # the file's diameters are the distances between the endpoints
    assert np.linalg.norm(p[1] - p[0]) == pytest.approx(long_px, abs=1e-3)
    assert np.linalg.norm(p[3] - p[2]) == pytest.approx(short_px, abs=1e-3)
    mask = ellipse_mask(coords, (512, 512))
    ax = measure_recist(mask)
    assert ax.long_px == pytest.approx(long_px, abs=1.0)
    assert ax.short_px == pytest.approx(short_px, abs=1.0)
    # the mask sits on the lesion: it contains the pixel at the diameters' crossing
    c = np.rint(recist_centre(coords)).astype(int)
    assert mask[c[1], c[0]]


def test_polygon_passes_through_the_four_endpoints_in_order() -> None:
    coords = _floats(REAL_ROWS[0][0]) - 1.0
    poly = recist_polygon(coords, points_per_arc=16)
    p = coords.reshape(4, 2)
    # arcs start at long-1, short-1, long-2, short-2
    for k, end in enumerate((p[0], p[2], p[1], p[3])):
        assert poly[16 * k] == pytest.approx(end, abs=1e-9)


def test_perpendicular_axes_give_the_true_ellipse() -> None:
    """Perpendicular diameters crossing at their midpoints → the ellipse with those axes."""
    cx, cy, a, b, th = 40.3, 37.6, 22.0, 11.0, math.radians(30)
    u, v = np.array([math.cos(th), math.sin(th)]), np.array([-math.sin(th), math.cos(th)])
    c = np.array([cx, cy])
    coords = np.concatenate([c - a * u, c + a * u, c - b * v, c + b * v])
    assert recist_centre(coords) == pytest.approx(c)
    ours = ellipse_mask(coords, (80, 80))
    ref = np.zeros((80, 80), bool)
    rr, cc = sk_ellipse(cy, cx, b, a, shape=ref.shape, rotation=-th)
    ref[rr, cc] = True
    assert _dice(ours, ref) > 0.98
    assert ours.sum() == pytest.approx(math.pi * a * b, rel=0.04)


def test_off_centre_crossing_uses_each_endpoints_own_radius() -> None:
    # long axis x 10..50 on y = 30; short axis crosses it at x = 20 (10 px from long-1, 30 from long-2)
    coords = np.array([10.0, 30.0, 50.0, 30.0, 20.0, 22.0, 20.0, 38.0])
    assert recist_centre(coords) == pytest.approx([20.0, 30.0])
    m = ellipse_mask(coords, (64, 64))
    row = np.flatnonzero(m[30])
    assert (row.min(), row.max()) == (10, 50)
    col = np.flatnonzero(m[:, 20])
    assert (col.min(), col.max()) == (22, 38)
    # quarter-ellipse between long-1 (radius 10) and short-1 (radius 8): point at 45° polar angle
    r45 = 10 * 8 / math.hypot(8 * math.cos(math.pi / 4), 10 * math.sin(math.pi / 4))
    inside = np.array([20 - 0.9 * r45 / math.sqrt(2), 30 - 0.9 * r45 / math.sqrt(2)])
    outside = np.array([20 - 1.15 * r45 / math.sqrt(2), 30 - 1.15 * r45 / math.sqrt(2)])
    assert m[int(round(inside[1])), int(round(inside[0]))]
    assert not m[int(round(outside[1])), int(round(outside[0]))]


def test_tiny_lesion_still_has_pixels_and_bad_coords_fail() -> None:
    m = ellipse_mask(np.array([5.1, 5.2, 5.4, 5.2, 5.25, 5.1, 5.25, 5.3]), (12, 12))
    assert m.sum() >= 1 and m[5, 5]
    with pytest.raises(DataError, match="8 finite numbers"):
        ellipse_mask(np.arange(7.0), (12, 12))
    with pytest.raises(DataError, match="8 finite numbers"):
        ellipse_mask(np.array([1, 2, 3, np.nan, 5, 6, 7, 8.0]), (12, 12))


def _blob_case(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """A bright blob in noise, its RECIST (measured on the truth) and box (RECIST ± 5 px)."""
    truth = np.zeros((96, 96), np.uint8)
    if kind == "square":
        truth[30:62, 34:60] = 1
    else:  # two overlapping discs: far from an ellipse
        cv2.circle(truth, (40, 48), 14, 1, -1)
        cv2.circle(truth, (58, 44), 10, 1, -1)
    truth = truth.astype(bool)
    rng = np.random.default_rng(seed)
    img = np.clip(0.3 + 0.06 * rng.standard_normal(truth.shape) + 0.4 * truth, 0, 1).astype(np.float32)
    ax = measure_recist(truth)
    coords = np.concatenate([ax.long.ravel(), ax.short.ravel()])
    p = coords.reshape(4, 2)
    bbox = [*(p.min(0) - 5), *(p.max(0) + 5)]
    return truth, img, coords, bbox


@pytest.mark.parametrize("kind", ["square", "two_discs"])
def test_grabcut_recovers_a_bright_blob_at_least_as_well_as_the_ellipse(kind: str) -> None:
    truth, img, coords, bbox = _blob_case(kind)
    ell = ellipse_mask(coords, truth.shape)
    gc = grabcut_mask(img, coords, bbox, truth.shape)
    assert gc.dtype == bool and gc.shape == truth.shape
    assert _dice(gc, truth) >= _dice(ell, truth)
    assert _dice(gc, truth) > 0.95
    # uint8 input is accepted too and gives a comparable result
    gc8 = grabcut_mask((img * 255).astype(np.uint8), coords, bbox, truth.shape)
    assert _dice(gc8, truth) > 0.95


def test_grabcut_mask_is_the_same_in_any_thread_after_any_calls() -> None:
    # GrabCut's k-means start draws from OpenCV's per-thread RNG: unseeded, a key-slice mask made in a
    # sample-cache thread differed from the same mask made in the main process (2 pixels here)
    truth, _, coords, bbox = _blob_case("two_discs", 0)
    rng = np.random.default_rng(100)
    texture = cv2.GaussianBlur(rng.standard_normal(truth.shape).astype(np.float32), (0, 0), 3)
    img = np.clip(0.35 + 0.25 * texture + 0.08 * rng.standard_normal(truth.shape) + 0.12 * truth, 0, 1)
    img = img.astype(np.float32)
    cv2.setRNGSeed(1)
    cv2.randu(np.zeros((13, 1)), 0, 1)  # the main thread's RNG moved on by earlier calls
    here = grabcut_mask(img, coords, bbox, truth.shape)
    there: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: there.append(grabcut_mask(img, coords, bbox, truth.shape)))
    worker.start()
    worker.join()
    assert np.array_equal(here, there[0])


def test_grabcut_falls_back_to_the_ellipse_when_far_off(caplog: pytest.LogCaptureFixture) -> None:
    # the RECIST marks a small part of a much larger bright region: GrabCut takes the whole region,
    # whose axes are far from the RECIST diameters
    img = np.full((96, 96), 0.2, np.float32)
    img[20:80, 15:85] = 0.8
    coords = np.array([40.0, 50.0, 56.0, 50.0, 48.0, 44.0, 48.0, 56.0])
    bbox = [35.0, 39.0, 61.0, 61.0]
    with caplog.at_level(logging.DEBUG, logger="medseg.data"):
        out = grabcut_mask(img, coords, bbox, img.shape)
    assert np.array_equal(out, ellipse_mask(coords, img.shape))
    assert "using the ellipse" in caplog.text


def test_grabcut_falls_back_when_grabcut_fails(caplog: pytest.LogCaptureFixture) -> None:
    # the ellipse covers the whole image: no background samples, so cv2.grabCut raises
    img = np.random.default_rng(0).random((10, 10)).astype(np.float32)
    coords = np.array([-8.0, 4.5, 17.0, 4.5, 4.5, -8.0, 4.5, 17.0])
    with caplog.at_level(logging.DEBUG, logger="medseg.data"):
        out = grabcut_mask(img, coords, [-10.0, -10.0, 20.0, 20.0], img.shape)
    assert out.all() and np.array_equal(out, ellipse_mask(coords, img.shape))
    assert "GrabCut failed" in caplog.text
    with pytest.raises(DataError, match="differs from mask shape"):
        grabcut_mask(img, coords, [0, 0, 9, 9], (12, 12))


def test_recist_to_masks_ids_overlap_and_modes() -> None:
    big = {"coords": [10.0, 30.0, 50.0, 30.0, 30.0, 15.0, 30.0, 45.0]}
    small = {"coords": [26.0, 30.0, 34.0, 30.0, 30.0, 26.0, 30.0, 34.0]}
    other = {"coords": [52.0, 55.0, 60.0, 55.0, 56.0, 51.0, 56.0, 59.0], "label": 2}
    shape = (64, 64)
    for order in ([big, small, other], [small, big, other]):
        label, instance = recist_to_masks(order, shape)
        assert label.shape == shape and label.dtype == np.int64 and instance.dtype == np.int32
        ids = {id(les): i + 1 for i, les in enumerate(order)}
        # the smaller lesion keeps its pixels whichever row comes first
        small_m = ellipse_mask(small["coords"], shape)
        big_m = ellipse_mask(big["coords"], shape)
        assert (instance[small_m] == ids[id(small)]).all()
        assert (instance[big_m & ~small_m] == ids[id(big)]).all()
        assert (instance[ellipse_mask(other["coords"], shape)] == ids[id(other)]).all()
        assert np.array_equal(label == 2, instance == ids[id(other)])
        assert np.array_equal(label > 0, instance > 0)
        assert set(np.unique(instance)) == {0, 1, 2, 3}
    label, instance = recist_to_masks([], shape)
    assert not label.any() and not instance.any()
    with pytest.raises(DataError, match="recist_mask"):
        recist_to_masks([big], shape, mode="box")
    with pytest.raises(DataError, match="needs the windowed slice"):
        recist_to_masks([big], shape, mode="grabcut")
    with pytest.raises(DataError, match="coords"):
        recist_to_masks([{"bbox": [0, 0, 1, 1]}], shape)


def test_recist_to_masks_grabcut_uses_the_image() -> None:
    truth, img, coords, bbox = _blob_case("square", seed=1)
    _, inst = recist_to_masks([{"coords": coords, "bbox": bbox}], truth.shape, "grabcut", img)
    assert np.array_equal(inst > 0, grabcut_mask(img, coords, bbox, truth.shape))
    # without a box the RECIST extent ± 5 px is used, the same box as here
    _, inst2 = recist_to_masks([{"coords": coords}], truth.shape, "grabcut", img)
    assert np.array_equal(inst2, inst)


def test_candidate_score_penalises_masks_off_the_diameters() -> None:
    from medseg.data.deeplesion.recist import _candidate_score

    coords = np.array([10.0, 30.0, 50.0, 30.0, 30.0, 20.0, 30.0, 40.0])
    ell = ellipse_mask(coords, (64, 64))
    shifted = np.roll(ell, 8, axis=1)  # same size and axes, moved off the annotated diameters
    base = _candidate_score(ell, coords, 40.0, 20.0)
    assert base < 0.05
    # the diameters are sampled at 33 points each over their inner 80 % (long axis: x = 14, 15, …, 46);
    # the shifted mask starts at x = 18, losing 4 of the 66 samples; the axes are unchanged
    assert _candidate_score(shifted, coords, 40.0, 20.0) - base == pytest.approx(4 / 66, abs=1e-6)
    assert _candidate_score(np.zeros((64, 64), bool), coords, 40.0, 20.0) == float("inf")
