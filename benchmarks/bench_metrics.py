"""Metrics: medseg's HD95 vs MONAI's, and the torch.bincount confusion matrix vs NumPy / sklearn.

* ``medseg.metrics.hd95`` (contours and a KD-tree on the union's bounding box) against MONAI's
  ``compute_hausdorff_distance(percentile=95)`` on pairs of 512² lesion masks with anisotropic
  spacing; the values must agree (max |Δ| in mm is reported); the ratio is the time per pair.
* ``ConfusionMatrix.update`` (one ``torch.bincount``) against ``np.bincount`` on the same
  ``t·K + p`` codes and against sklearn's ``confusion_matrix`` — or, when sklearn is not installed
  (it is no medseg dependency), the ``scipy.sparse.coo_matrix`` summation sklearn performs inside
  it. Inputs are ``(B, H, W)`` int64 NumPy arrays, as :class:`medseg.metrics.MetricSuite` passes them.

Run: ``python benchmarks/bench_metrics.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from common import max_abs_diff, report, set_threads, time_pair
from scipy import sparse

from medseg.metrics import ConfusionMatrix, hd95

SPACING = (0.7, 0.85)  # (sy, sx) mm/px, anisotropic so that an axis mix-up would show
#: relative tolerance: MONAI computes the distances in float32 (≈ 1e-7 relative), medseg in float64
HD_RTOL = 1e-6


def _ellipse(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
    """A filled ellipse as an ``(size, size)`` bool mask (centre and axes in pixels, x first)."""
    m = np.zeros((size, size), np.uint8)
    c = (int(round(centre[0])), int(round(centre[1])))
    ax = (max(int(round(axes[0])), 1), max(int(round(axes[1])), 1))
    cv2.ellipse(m, c, ax, angle, 0, 360, 1, thickness=-1)
    return m.astype(bool)


def make_mask_pairs(size: int, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (prediction, truth) pairs: a true ellipse, a shifted / resized predicted one, and in
    every other pair a small false-positive blob far from the lesion (which dominates HD95)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        r = rng.uniform(0.03, 0.2) * size
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        axes = (r, r * rng.uniform(0.5, 1.0))
        angle = float(rng.uniform(0, 180))
        true = _ellipse(size, (cx, cy), axes, angle)
        shift = rng.normal(0, 0.1 * r, 2)
        scale = rng.uniform(0.8, 1.2)
        pred = _ellipse(size, (cx + shift[0], cy + shift[1]), (axes[0] * scale, axes[1] * scale), angle + 10)
        if i % 2:
            pred |= _ellipse(size, (0.1 * size, 0.9 * size), (0.02 * size, 0.015 * size), 0)
        pairs.append((pred, true))
    return pairs


def _monai_hd95(pred: torch.Tensor, true: torch.Tensor) -> float:
    """MONAI's symmetric HD95 of two ``(1, 1, H, W)`` masks in mm."""
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated get_mask_edges(always_return_as_numpy=...) internally
        warnings.simplefilter("ignore", FutureWarning)
        d = compute_hausdorff_distance(pred, true, include_background=True, percentile=95, spacing=list(SPACING))
    return float(d.reshape(-1)[0])


def bench_hd95(quick: bool) -> dict[str, Any]:
    """medseg.metrics.hd95 vs MONAI, ms per mask pair."""
    size, n_pairs, n = (128, 2, 2) if quick else (512, 6, 5)
    pairs = make_mask_pairs(size, n_pairs)
    tensors = [(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None]) for p, t in pairs]
    ours = [hd95(p, t, SPACING) for p, t in pairs]
    ref = [_monai_hd95(p, t) for p, t in tensors]
    diff = max_abs_diff(ours, ref)
    ok = all(abs(a - b) <= HD_RTOL * max(abs(b), 1.0) for a, b in zip(ours, ref))
    t_ours, t_ref = time_pair(
        lambda: [hd95(p, t, SPACING) for p, t in pairs],
        lambda: [_monai_hd95(p, t) for p, t in tensors],
        n,
    )
    return report(
        f"hd95 {size}² mask pair: medseg vs MONAI compute_hausdorff_distance",
        t_ours / n_pairs * 1e3,
        t_ref / n_pairs * 1e3,
        "ms",
        check=f"max abs Δ = {diff:.1e} mm over {n_pairs} pairs (HD95 {min(ref):.1f}–{max(ref):.1f} mm)",
        ok=ok,
    )


def _numpy_confusion(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """``(K, K)`` confusion matrix with ``np.bincount`` (targets outside [0, K) skipped)."""
    t, p = target.reshape(-1), pred.reshape(-1)
    valid = (t >= 0) & (t < k)
    return np.bincount(t[valid] * k + p[valid], minlength=k * k).reshape(k, k)


def _sklearn_like_confusion() -> tuple[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]]:
    """sklearn's ``confusion_matrix`` when installed, else the coo_matrix summation it performs."""
    try:
        from sklearn.metrics import confusion_matrix
    except ImportError:

        def coo(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
            t, p = target.reshape(-1), pred.reshape(-1)
            valid = (t >= 0) & (t < k)
            ones = np.ones(int(valid.sum()), np.int64)
            return sparse.coo_matrix((ones, (t[valid], p[valid])), shape=(k, k)).toarray()

        return "scipy coo_matrix (sklearn's method; sklearn not installed)", coo

    def sk(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
        return confusion_matrix(target.reshape(-1), pred.reshape(-1), labels=list(range(k)))

    return "sklearn confusion_matrix", sk


def make_label_batch(batch: int, size: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, target)`` int64 ``(B, H, W)``: class blobs on background, 2 % of pixels mispredicted."""
    rng = np.random.default_rng(seed)
    target = np.zeros((batch, size, size), np.int64)
    for b in range(batch):
        for c in range(1, k):
            for _ in range(3):
                m = _ellipse(size, tuple(rng.uniform(0.2, 0.8, 2) * size), tuple(rng.uniform(0.03, 0.15, 2) * size), 0)
                target[b][m] = c
    pred = target.copy()
    flip = rng.random(target.shape) < 0.02
    pred[flip] = rng.integers(0, k, int(flip.sum()))
    return pred, target


def bench_confusion(quick: bool) -> list[dict[str, Any]]:
    """ConfusionMatrix.update vs np.bincount and sklearn (or its coo_matrix method), ms per batch."""
    batch, size, k, n = (2, 128, 2, 3) if quick else (8, 512, 2, 15)
    pred, target = make_label_batch(batch, size, k)

    def ours() -> np.ndarray:
        cm = ConfusionMatrix(k)
        cm.update(pred, target)
        return cm.matrix

    ours_m = ours()
    sk_name, sk_fn = _sklearn_like_confusion()
    rows = []
    for name, fn in (("numpy bincount", _numpy_confusion), (sk_name, sk_fn)):
        ref_m = fn(pred, target, k)
        diff = max_abs_diff(ours_m, ref_m)
        t_ours, t_ref = time_pair(ours, lambda fn=fn: fn(pred, target, k), n)
        rows.append(
            report(
                f"ConfusionMatrix.update {batch}×{size}², K={k}: torch.bincount vs {name}",
                t_ours * 1e3,
                t_ref * 1e3,
                "ms",
                check=f"max abs Δ = {diff:g} counts of {pred.size}",
                ok=diff == 0,
            )
        )
    return rows


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Run both metric benchmarks; returns the report rows."""
    set_threads()
    return [bench_hd95(quick), *bench_confusion(quick)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    rows = main(parser.parse_args().quick)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
