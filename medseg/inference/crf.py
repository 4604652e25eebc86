"""Fully-connected CRF post-processing (Krähenbühl & Koltun 2011; DeepLab v1/v2).

The energy ``E(x) = Σ_i ψ_u(x_i) + Σ_{i<j} μ(x_i, x_j) k(f_i, f_j)`` has the unary
``ψ_u = −log P(x_i)`` from the network's softmax, a Potts compatibility μ and two Gaussian
kernels:

* smoothness: ``w₁ · exp(−|p_i − p_j|² / 2σ_xy²)`` (``gaussian_weight``, ``gaussian_sxy``);
* appearance: ``w₂ · exp(−|p_i − p_j|² / 2σ_xy'² − |I_i − I_j|² / 2σ_rgb²)``
  (``bilateral_weight``, ``bilateral_sxy``, ``bilateral_srgb``).

The defaults (:class:`medseg.config.CRFConfig`) are DeepLab v2's: 10 mean-field iterations,
w₁ = 3, σ_xy = 1, w₂ = 4, σ_xy' = 67, σ_rgb = 3. Positions ``p`` are in pixels and the intensity
``I`` is the windowed CT image scaled from [0, 1] to 0 … 255, the range those σ_rgb values were
chosen for on 8-bit photographs. A multi-channel image (e.g. 2.5-D context slices) contributes one
intensity feature per channel, as the R, G, B channels of a photograph do.

Inference is the original implementation's mean-field (``pydensecrf``, the Python binding of
Krähenbühl's code): each message passing step is a Gaussian filtering on the permutohedral lattice
(Adams et al. 2010), with the symmetric kernel normalisation of that code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.config import CRFConfig

#: probabilities are clipped here before ``−log`` so a hard 0 does not give an infinite unary
PROB_FLOOR = 1e-8


def _check_inputs(probs: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes / values and return float32 ``(K, H, W)`` probs and ``(C, H, W)`` image."""
    probs = np.asarray(probs)
    image = np.asarray(image)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"dense_crf: probs must be (K, H, W) with K >= 2 classes, got shape {probs.shape}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"dense_crf: image must be (H, W) or (C, H, W) matching probs {probs.shape[-2:]}, got {image.shape}"
        )
    if not (np.all(np.isfinite(probs)) and np.all(np.isfinite(image))):
        raise ValueError("dense_crf: probs and image must be finite")
    if probs.min() < 0:
        raise ValueError("dense_crf: probs must be non-negative (softmax probabilities)")
    return probs.astype(np.float32, copy=False), image.astype(np.float32, copy=False)


def _positions(h: int, w: int, spacing: Sequence[float] | None) -> np.ndarray:
    """``(2, H·W)`` row/column coordinates in units of the finer pixel side."""
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    if sy <= 0 or sx <= 0:
        raise ValueError(f"dense_crf: spacing must be positive (sy, sx) mm/px, got {spacing}")
    unit = min(sy, sx)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([yy.ravel() * (sy / unit), xx.ravel() * (sx / unit)])


def dense_crf(
    probs: np.ndarray, image: np.ndarray, cfg: CRFConfig, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Refine class probabilities with a fully-connected CRF (mean-field inference).

    Args:
        probs: ``(K, H, W)`` softmax probabilities (K >= 2; each pixel is renormalised).
        image: ``(H, W)`` or ``(C, H, W)`` windowed intensity in [0, 1] (values outside are
            clipped): the appearance kernel's features.
        cfg: iterations and kernel parameters (``inference.crf``).
        spacing: optional ``(sy, sx)`` pixel size in mm. With anisotropic pixels the positional
            features use physical distance measured in units of the finer pixel side, so the
            σ_xy values keep their pixel meaning on isotropic data; None means square pixels.

    Returns:
        ``(K, H, W)`` float32 refined probabilities (each pixel sums to 1). With
        ``cfg.iterations == 0`` this is the input, clipped at ``PROB_FLOOR`` and renormalised.

    Raises:
        ValueError: bad shapes, non-finite values, negative probabilities or parameters.

    Example:
        >>> q = dense_crf(probs, ct_slice, CRFConfig())   # probs (2, H, W), ct_slice (H, W)
        >>> labels = q.argmax(0)
    """
    import pydensecrf.densecrf as dcrf

    probs, image = _check_inputs(probs, image)
    if cfg.iterations < 0:
        raise ValueError(f"inference.crf.iterations must be >= 0, got {cfg.iterations}")
    for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"inference.crf.{name} must be > 0, got {getattr(cfg, name)}")
    k, h, w = probs.shape
    p = np.clip(probs, PROB_FLOOR, None)
    p = p / p.sum(axis=0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(p).reshape(k, -1), dtype=np.float32)

    crf = dcrf.DenseCRF(h * w, k)
    crf.setUnaryEnergy(unary)
    pos = _positions(h, w, spacing)
    if cfg.gaussian_weight:
        crf.addPairwiseEnergy(np.ascontiguousarray(pos / cfg.gaussian_sxy, dtype=np.float32), compat=float(cfg.gaussian_weight))
    if cfg.bilateral_weight:
        intensity = np.clip(image, 0.0, 1.0).reshape(image.shape[0], -1) * 255.0
        feats = np.concatenate([pos / cfg.bilateral_sxy, intensity / cfg.bilateral_srgb])
        crf.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=float(cfg.bilateral_weight))
    q = np.asarray(crf.inference(int(cfg.iterations)), dtype=np.float32).reshape(k, h, w)
    return q / q.sum(axis=0, keepdims=True)


def crf_labels(
    probs: np.ndarray, image: np.ndarray, cfg: CRFConfig, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """The CRF's class map: ``argmax`` of :func:`dense_crf` as ``(H, W)`` int64 (same arguments)."""
    return dense_crf(probs, image, cfg, spacing).argmax(axis=0).astype(np.int64)
