"""RECIST measurement (medseg.measure) on shapes of known size, rasterised independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk, ellipse, polygon

from medseg.lesion import RecistAxes, axes_mm, measure_recist


def _disc(d: float, size: int = 96) -> np.ndarray:
    """A disc of diameter ``d`` (pixel centres inside), centred off the pixel grid."""
    m = np.zeros((size, size), bool)
    rr, cc = disk((size / 2 + 0.3, size / 2 - 0.2), d / 2, shape=m.shape)
    m[rr, cc] = True
    return m


def _ellipse(a: float, b: float, theta: float, size: int = 128) -> np.ndarray:
    """Semi-axes ``a`` (along angle ``theta`` from +x, y down) and ``b``."""
    m = np.zeros((size, size), bool)
    rr, cc = ellipse(size / 2 + 0.25, size / 2 - 0.4, b, a, shape=m.shape, rotation=-theta)
    m[rr, cc] = True
    return m


def _length(ends: np.ndarray) -> float:
    return float(np.linalg.norm(ends[1] - ends[0]))


@pytest.mark.parametrize("d", [6.0, 11.0, 24.5, 60.0])
def test_disc_diameters(d: float) -> None:
    ax = measure_recist(_disc(d))
    assert isinstance(ax, RecistAxes)
    assert ax.long_px == pytest.approx(d, abs=1.0)
    assert ax.short_px == pytest.approx(d, abs=1.0)
    assert _length(ax.long) == pytest.approx(ax.long_px)
    assert _length(ax.short) == pytest.approx(ax.short_px)


@pytest.mark.parametrize("theta_deg", [0.0, 20.0, 45.0, 90.0, 133.0])
@pytest.mark.parametrize("a,b", [(30.0, 12.0), (15.0, 9.0), (8.0, 3.0)])
def test_rotated_ellipse_axes(a: float, b: float, theta_deg: float) -> None:
    theta = math.radians(theta_deg)
    m = _ellipse(a, b, theta)
    ax = measure_recist(m)
    assert ax is not None
    assert ax.long_px == pytest.approx(2 * a, abs=1.5)
    assert ax.short_px == pytest.approx(2 * b, abs=1.5)
    # the long axis points along the major axis (mod 180°); near-round shapes leave it ill-defined
    d = ax.long[1] - ax.long[0]
    ang = math.degrees(math.atan2(d[1], d[0])) % 180.0
    diff = min(abs(ang - theta_deg % 180.0), 180.0 - abs(ang - theta_deg % 180.0))
    assert diff < (6.0 if a / b >= 2 else 15.0)
    # the short axis is perpendicular to the long one and crosses the object
    s = ax.short[1] - ax.short[0]
    assert abs(np.dot(d, s)) / (np.linalg.norm(d) * np.linalg.norm(s)) < 1e-6
    mid = np.rint(ax.short.mean(0)).astype(int)
    assert m[mid[1], mid[0]]


def test_rectangle_diagonal_and_perpendicular_chord() -> None:
    m = np.zeros((60, 60), np.uint8)
    m[10:20, 5:45] = 1  # 40 × 10 pixels
    ax = measure_recist(m)
    w, h = 40.0, 10.0
    diag = math.hypot(w, h)
    assert ax.long_px == pytest.approx(diag, abs=1.0)
    # the longest chord perpendicular to the diagonal spans the full height, tilted: h · diag / w
    assert ax.short_px == pytest.approx(h * diag / w, abs=1.0)
    # endpoints sit near opposite corners of the pixel extent (x 4.5..44.5, y 9.5..19.5)
    xs = sorted(ax.long[:, 0])
    assert xs[0] == pytest.approx(4.5, abs=1.0) and xs[1] == pytest.approx(44.5, abs=1.0)


def test_polygon_shape_concave() -> None:
    """An L shape: the short axis is the longest perpendicular chord *inside* the object."""
    m = np.zeros((80, 80), bool)
    rr, cc = polygon([10, 10, 20, 20, 70, 70], [10, 60, 60, 20, 20, 10], shape=m.shape)
    m[rr, cc] = True
    ax = measure_recist(m)
    assert ax.long_px == pytest.approx(math.hypot(50, 60), abs=1.5)
    # every sampled point of the short axis lies inside the object
    t = np.linspace(0.05, 0.95, 50)
    pts = ax.short[0][None] + t[:, None] * (ax.short[1] - ax.short[0])[None]
    assert m[np.rint(pts[:, 1]).astype(int), np.rint(pts[:, 0]).astype(int)].all()


def test_empty_single_pixel_and_dtypes() -> None:
    assert measure_recist(np.zeros((8, 8), bool)) is None
    one = np.zeros((8, 8), np.uint8)
    one[3, 4] = 1
    ax = measure_recist(one)
    assert ax.long_px == pytest.approx(1.0)
    assert ax.long.mean(0) == pytest.approx([4.0, 3.0])
    m = _ellipse(10, 5, 0.3, size=40)
    a, b = measure_recist(m), measure_recist(m.astype(np.int32) * 7)
    assert a.long_px == b.long_px and a.short_px == b.short_px
    with pytest.raises(ValueError, match="2-D"):
        measure_recist(np.ones((2, 4, 4)))


def test_axes_mm_anisotropic() -> None:
    m = np.zeros((30, 60), bool)
    m[10:14, 10:50] = True  # 40 wide, 4 high
    ax = measure_recist(m)
    sy, sx = 2.0, 0.5
    long_mm, short_mm = axes_mm(ax, [sy, sx])
    d = ax.long[1] - ax.long[0]
    assert long_mm == pytest.approx(math.hypot(d[0] * sx, d[1] * sy))
    s = ax.short[1] - ax.short[0]
    assert short_mm == pytest.approx(math.hypot(s[0] * sx, s[1] * sy))
    assert long_mm == pytest.approx(40 * 0.5, abs=1.0)


def test_measure_recist_reads_a_large_bool_mask_without_copying_it() -> None:
    """A lesion's box can be most of an 8192² image: the mask is read as a uint8 view and interpolated
    from it (no uint8 and float32 copies: 5 bytes a pixel before); what remains is the fixed sampling grid."""
    import tracemalloc

    from scipy import ndimage

    m = np.zeros((3000, 3000), bool)
    m[100:2900, 200:2800] = True
    tracemalloc.start()
    try:
        ax = measure_recist(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ax is not None and ax.long_px == pytest.approx(np.hypot(2800, 2600), abs=1.0)
    assert peak < 2 * m.size  # the grid of ≤ 256 × 1024 samples (~13 MB), no copy of the box (before: +45 MB)
    # the uint8 mask interpolates exactly as its float32 copy did
    pts = np.random.default_rng(0).uniform(-2, 3002, (2, 5000))
    np.testing.assert_array_equal(
        ndimage.map_coordinates(m.view(np.uint8), pts, order=1, mode="constant", cval=0.0, output=np.float32),
        ndimage.map_coordinates(m.astype(np.float32), pts, order=1, mode="constant", cval=0.0))
