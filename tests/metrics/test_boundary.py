"""Boundary metrics (medseg.metrics.boundary): HD95 and surface Dice against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics.boundary import hd95, surface_dice


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
