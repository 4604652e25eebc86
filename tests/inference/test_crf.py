"""Fully-connected CRF post-processing (medseg.crf)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.config import CRFConfig
from medseg.inference.crf import crf_labels, dense_crf


def _random_probs(k: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(k), size=(h, w)).transpose(2, 0, 1).astype(np.float32)


def _grouped_mean_field(probs: np.ndarray, groups: np.ndarray, weight: float, iterations: int) -> np.ndarray:
    """Exact mean field when the kernel is 1 inside each group and 0 across groups.

    With symmetric normalisation the message to pixel i is ``weight · mean_{j in group(i)} Q_j``
    (Krähenbühl's code keeps the self term), and ``Q ∝ P · exp(message)``.
    """
    q = probs / probs.sum(0)
    for _ in range(iterations):
        msg = np.zeros_like(q)
        for g in np.unique(groups):
            m = groups == g
            msg[:, m] = q[:, m].mean(1)[:, None]
        logit = np.log(probs) + weight * msg
        q = np.exp(logit - logit.max(0))
        q /= q.sum(0)
    return q


def _disc_case(noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright disc in noise, and blurred, shifted, noisy foreground probabilities for it."""
    rng = np.random.default_rng(seed)
    h, w = 64, 72
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 30) ** 2 + (xx - 38) ** 2 < 14**2
    image = np.clip(0.3 + 0.4 * disc + rng.normal(0, noise, (h, w)), 0, 1).astype(np.float32)
    fg = ndimage.gaussian_filter(np.roll(disc.astype(float), (3, -2), (0, 1)), 4)
    fg = np.clip(0.8 * fg + 0.1 + rng.normal(0, 0.15, (h, w)), 0.01, 0.99)
    return np.stack([1 - fg, fg]).astype(np.float32), image, disc


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_crf_recovers_disc_better_than_argmax():
    probs, image, disc = _disc_case()
    before = _dice(probs.argmax(0) == 1, disc)
    after = _dice(crf_labels(probs, image, CRFConfig()) == 1, disc)
    assert before < 0.85
    assert after > 0.95
    assert after > before + 0.1


def test_crf_labels_dtype_and_shape():
    probs, image, _ = _disc_case()
    lab = crf_labels(probs, image, CRFConfig(iterations=2))
    assert lab.shape == image.shape and lab.dtype == np.int64
    assert set(np.unique(lab)) <= {0, 1}


def test_probabilities_stay_normalised():
    probs, image, _ = _disc_case()
    q = dense_crf(probs, image, CRFConfig())
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.all(q >= 0) and np.all(q <= 1)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_zero_iterations_is_identity():
    probs = _random_probs(3, 17, 23)
    image = np.random.default_rng(0).random((17, 23))
    q = dense_crf(probs, image, CRFConfig(iterations=0))
    np.testing.assert_allclose(q, probs / probs.sum(0), atol=1e-6)


@pytest.mark.parametrize("iterations,weight", [(1, 0.5), (2, 3.0), (5, 3.0)])
def test_smoothness_kernel_matches_exact_mean_field(iterations, weight):
    # σ_xy far larger than the image: the Gaussian kernel is 1 everywhere, so mean field has a
    # closed form (message = weight · image-wide mean of Q) to compare the library against
    probs = _random_probs(3, 9, 11)
    cfg = CRFConfig(iterations=iterations, gaussian_weight=weight, gaussian_sxy=1e6, bilateral_weight=0)
    q = dense_crf(probs, np.zeros((9, 11)), cfg)
    expected = _grouped_mean_field(probs, np.zeros((9, 11)), weight, iterations)
    np.testing.assert_allclose(q, expected, atol=1e-5)


def test_appearance_kernel_groups_pixels_by_intensity():
    # two intensity levels 255 apart (σ_rgb = 3) and an infinite spatial σ: the bilateral kernel is
    # 1 within a level and 0 across, so each level's pixels only talk to each other
    probs = _random_probs(3, 9, 11)
    image = (np.random.default_rng(2).random((9, 11)) > 0.5).astype(np.float32)
    cfg = CRFConfig(iterations=3, gaussian_weight=0, bilateral_weight=4, bilateral_sxy=1e6, bilateral_srgb=3)
    expected = _grouped_mean_field(probs, image, 4.0, 3)
    np.testing.assert_allclose(dense_crf(probs, image, cfg), expected, atol=1e-4)
    # a multi-channel image: the same grouping from any channel that separates the levels
    stacked = np.stack([image, 1 - image, np.zeros_like(image)])
    np.testing.assert_allclose(dense_crf(probs, stacked, cfg), expected, atol=1e-4)
    # a huge σ_rgb ignores intensity: one group
    flat = _grouped_mean_field(probs, np.zeros_like(image), 4.0, 3)
    cfg_blind = CRFConfig(iterations=3, gaussian_weight=0, bilateral_weight=4, bilateral_sxy=1e6, bilateral_srgb=1e6)
    np.testing.assert_allclose(dense_crf(probs, image, cfg_blind), flat, atol=1e-4)
    assert np.abs(flat - expected).max() > 0.05


def test_spacing_scales_positions():
    # rows 1e6 mm apart, columns 1 mm: with σ_xy = 1000 px only pixels of one row interact
    probs = _random_probs(2, 9, 11)
    cfg = CRFConfig(iterations=3, gaussian_weight=2, gaussian_sxy=1e3, bilateral_weight=0)
    rows, cols = np.mgrid[:9, :11]
    np.testing.assert_allclose(
        dense_crf(probs, np.zeros((9, 11)), cfg, spacing=(1e6, 1.0)), _grouped_mean_field(probs, rows, 2, 3), atol=1e-3
    )
    np.testing.assert_allclose(
        dense_crf(probs, np.zeros((9, 11)), cfg, spacing=(1.0, 1e6)), _grouped_mean_field(probs, cols, 2, 3), atol=1e-3
    )
    # isotropic spacing keeps σ_xy in pixels: any square pixel size gives the spacing-free result
    probs, image, _ = _disc_case()
    np.testing.assert_allclose(
        dense_crf(probs, image, CRFConfig(), spacing=(0.7, 0.7)), dense_crf(probs, image, CRFConfig()), atol=1e-6
    )


def test_larger_smoothness_weight_smooths_more():
    # salt-and-pepper probabilities on a flat image: label changes between neighbours drop
    rng = np.random.default_rng(3)
    fg = np.clip(0.5 + rng.normal(0, 0.2, (48, 48)), 0.01, 0.99)
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    image = np.full((48, 48), 0.5, np.float32)

    def changes(weight: float) -> int:
        lab = crf_labels(probs, image, CRFConfig(gaussian_weight=weight, bilateral_weight=0))
        return int((np.diff(lab, axis=0) != 0).sum() + (np.diff(lab, axis=1) != 0).sum())

    raw = int((np.diff(probs.argmax(0), axis=0) != 0).sum() + (np.diff(probs.argmax(0), axis=1) != 0).sum())
    assert changes(0.0) == raw
    assert changes(1.0) < raw
    assert changes(10.0) < changes(1.0) / 2


def test_image_drives_the_boundary():
    # the same probabilities with the intensity replaced by a constant lose the disc
    probs, image, disc = _disc_case()
    with_image = _dice(crf_labels(probs, image, CRFConfig()) == 1, disc)
    without = _dice(crf_labels(probs, np.full_like(image, 0.5), CRFConfig()) == 1, disc)
    assert with_image > without + 0.2


@pytest.mark.parametrize(
    "probs_shape,image_shape,match",
    [((9, 11), (9, 11), "probs must be"), ((1, 9, 11), (9, 11), "K >= 2"), ((2, 9, 11), (9, 12), "image must be")],
)
def test_bad_shapes_raise(probs_shape, image_shape, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(np.full(probs_shape, 0.5, np.float32), np.zeros(image_shape), CRFConfig())


def test_bad_values_raise():
    probs = _random_probs(2, 5, 5)
    with pytest.raises(ValueError, match="finite"):
        dense_crf(np.where(probs > 0.5, np.nan, probs), np.zeros((5, 5)), CRFConfig())
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(probs - 1, np.zeros((5, 5)), CRFConfig())
    with pytest.raises(ValueError, match="iterations"):
        dense_crf(probs, np.zeros((5, 5)), CRFConfig(iterations=-1))
    with pytest.raises(ValueError, match="bilateral_srgb"):
        dense_crf(probs, np.zeros((5, 5)), CRFConfig(bilateral_srgb=0))
