"""FROC on whole slices: lesion sensitivity against false positives per image.

The detection figure of the DeepLesion literature: sensitivity at 0.5, 1, 2, 4 and 8 false
positives per image. A segmentation model has no boxes, so its **candidates** are the connected
components of its foreground probability map above a low threshold (``metrics.froc_threshold``,
default 0.1), and each candidate is **scored by its maximum probability**. The maximum rather than
the mean because (1) a component exists at any probability level below its peak, so sweeping a
threshold over the maxima is close to thresholding the probability map itself at that level, while
a mean mixes in the low-probability rim that the candidate threshold let in and so depends on
that threshold and on the lesion's size (a large lesion has proportionally less rim); (2) one
confident pixel is what a reader looking at the map would call a finding.

A candidate **hits** a true lesion under the run's matching rule (``metrics.match_rule``: shared
pixels or IoU, :func:`medseg.metrics.matching.match_lesions`); a lesion is found at score ``s`` when a
candidate with score ≥ ``s`` hits it (several hits on one lesion count once); a candidate that
hits no lesion is a false positive. Sweeping ``s`` from high to low traces the curve. An FP rate
beyond the largest one the sweep reaches (all candidates kept) is **not reached**: it is left out
of the metrics (no extrapolation) and ``froc_max_fp`` / ``froc_max_sens`` say where the curve ends.

Keys: ``froc_sens_fp0.5`` … ``froc_sens_fp8`` (reached rates only), ``froc_sens_mean`` (their
mean, when all five are reached), ``froc_max_fp``, ``froc_max_sens``.

Example:
    >>> froc = FrocMetrics(threshold=0.1)
    >>> froc.update(prob, true_instance, image_id="000001_01_01_109")
    >>> froc.compute()["froc_sens_fp1"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.metrics.keys import FROC_FP_RATES, froc_key
from medseg.metrics.matching import MatchRule, label_components, match_lesions
from medseg.metrics.pixel import mask2d
from medseg.runtime import gather_objects

__all__ = ["FrocCurve", "FrocMetrics", "froc_candidates", "froc_curve", "froc_summary", "sensitivity_at"]

#: float slack when comparing an FP rate with a target rate
_EPS = 1e-9


def froc_candidates(prob: Any, threshold: float, connectivity: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of one probability map: their ``(H, W)`` label map (1..N) and ``(N,)`` max scores."""
    p = mask2d(prob, "prob").astype(np.float64)
    labels = label_components(p > threshold, connectivity)
    n = int(labels.max(initial=0))
    scores = np.asarray(ndimage.maximum(p, labels, index=np.arange(1, n + 1)), dtype=np.float64) if n else np.zeros(0)
    return labels, scores


@dataclass
class FrocCurve:
    """Operating points of a sweep, from the strictest threshold (nothing kept) to the loosest.

    Attributes:
        fp_per_image: ``(M,)`` non-decreasing false positives per image.
        sensitivity: ``(M,)`` non-decreasing share of lesions found.
        thresholds: ``(M,)`` the score threshold of each point (``inf`` for the first).
    """

    fp_per_image: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray

    @property
    def max_fp(self) -> float:
        """The largest FP rate the sweep reaches (all candidates kept)."""
        return float(self.fp_per_image[-1])

    @property
    def max_sensitivity(self) -> float:
        """The sensitivity with all candidates kept."""
        return float(self.sensitivity[-1])


def froc_curve(
    lesion_scores: np.ndarray,
    fp_scores: np.ndarray,
    n_images: float,
    lesion_weights: np.ndarray | None = None,
    fp_weights: np.ndarray | None = None,
) -> FrocCurve | None:
    """The FROC curve from each lesion's best hit score and the false positives' scores.

    Args:
        lesion_scores: ``(L,)`` per true lesion, the highest score of a candidate hitting it
            (``-inf`` when none does).
        fp_scores: ``(F,)`` the scores of candidates hitting no lesion.
        n_images: images evaluated (the FP-per-image denominator; a weighted count under resampling).
        lesion_weights, fp_weights: per-item weights (bootstrap draw counts; None = 1).

    Returns:
        The curve, or None without lesions or images.
    """
    ls = np.asarray(lesion_scores, dtype=np.float64)
    fs = np.asarray(fp_scores, dtype=np.float64)
    lw = np.ones_like(ls) if lesion_weights is None else np.asarray(lesion_weights, dtype=np.float64)
    fw = np.ones_like(fs) if fp_weights is None else np.asarray(fp_weights, dtype=np.float64)
    total = float(lw.sum())
    if total <= 0 or n_images <= 0:
        return None
    hit = np.isfinite(ls)
    scores = np.concatenate([ls[hit], fs])
    w_tp = np.concatenate([lw[hit], np.zeros_like(fs)])
    w_fp = np.concatenate([np.zeros(int(hit.sum())), fw])
    thr = np.unique(scores)[::-1]  # distinct scores, high to low
    pos = np.searchsorted(-thr, -scores)  # the threshold at which each item enters
    tp = np.cumsum(np.bincount(pos, weights=w_tp, minlength=len(thr)))
    fp = np.cumsum(np.bincount(pos, weights=w_fp, minlength=len(thr)))
    return FrocCurve(np.concatenate([[0.0], fp / n_images]), np.concatenate([[0.0], tp / total]),
                     np.concatenate([[math.inf], thr]))


def sensitivity_at(curve: FrocCurve, rate: float) -> float | None:
    """The best sensitivity at no more than ``rate`` FP per image; None when the sweep never reaches ``rate``."""
    if rate > curve.max_fp + _EPS:
        return None
    return float(curve.sensitivity[curve.fp_per_image <= rate + _EPS].max())


def froc_summary(curve: FrocCurve | None, rates: tuple[float, ...] = FROC_FP_RATES) -> dict[str, float]:
    """The FROC keys of one curve (reached rates only; ``froc_sens_mean`` when all are reached)."""
    if curve is None:
        return {}
    out: dict[str, float] = {}
    sens = [sensitivity_at(curve, r) for r in rates]
    for r, s in zip(rates, sens):
        if s is not None:
            out[froc_key(r)] = s
    if all(s is not None for s in sens):
        out["froc_sens_mean"] = float(np.mean(sens))  # type: ignore[arg-type]
    out["froc_max_fp"] = curve.max_fp
    out["froc_max_sens"] = curve.max_sensitivity
    return out


class FrocMetrics:
    """Candidates and hits accumulated over images (``update`` / ``compute`` / ``reset``).

    Args:
        threshold: ``metrics.froc_threshold``, the probability that makes a pixel part of a candidate.
        rule, iou_threshold, min_overlap_px: the hit rule (:func:`medseg.metrics.matching.match_lesions`).
        connectivity: of the candidate components (2 = 8-connected).
        rates: FP-per-image operating points.
    """

    def __init__(self, threshold: float = 0.1, rule: MatchRule = "overlap", iou_threshold: float = 0.5,
                 min_overlap_px: int = 1, connectivity: int = 2, rates: tuple[float, ...] = FROC_FP_RATES) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"metrics.froc_threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold
        self.rule: MatchRule = rule
        self.iou_threshold = iou_threshold
        self.min_overlap_px = min_overlap_px
        self.connectivity = connectivity
        self.rates = tuple(rates)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._lesions: list[tuple[str, int, float]] = []  # (image id, lesion id, best hit score)
        self._fps: list[tuple[str, float]] = []  # (image id, score)
        self._images: list[str] = []

    def update(self, prob: Any, true_instance: Any, image_id: str | None = None) -> None:
        """Add one image: ``prob`` ``(H, W)`` foreground probability, ``true_instance`` ``(H, W)`` lesion ids."""
        true = mask2d(true_instance, "true_instance").astype(np.int64)
        labels, scores = froc_candidates(prob, self.threshold, self.connectivity)
        if labels.shape != true.shape:
            raise ValueError(f"prob {labels.shape} and true_instance {true.shape} differ in shape")
        image_id = str(image_id if image_id is not None else f"image{len(self._images)}")
        self._images.append(image_id)
        m = match_lesions(labels, true, self.rule, self.iou_threshold, self.min_overlap_px)
        cand_score = scores[m.pred_ids - 1] if len(m.pred_ids) else np.zeros(0)
        for i, tid in enumerate(m.true_ids.tolist()):
            hits = cand_score[m.matched[i]]
            self._lesions.append((image_id, int(tid), float(hits.max()) if hits.size else -math.inf))
        for s in cand_score[~m.matched.any(0)].tolist():
            self._fps.append((image_id, float(s)))

    def reduce_across_ranks(self) -> None:
        """Gather every rank's candidates; a no-op outside DDP."""
        parts = gather_objects((self._lesions, self._fps, self._images))
        if len(parts) > 1:
            self._lesions = [v for p in parts for v in p[0]]
            self._fps = [v for p in parts for v in p[1]]
            self._images = [v for p in parts for v in p[2]]

    def lesion_scores(self) -> list[tuple[str, int, float]]:
        """``(image id, lesion id, best hit score or -inf)`` per true lesion."""
        return list(self._lesions)

    def false_positives(self) -> list[tuple[str, float]]:
        """``(image id, score)`` per candidate hitting no lesion."""
        return list(self._fps)

    def images(self) -> list[str]:
        """The ids of the images seen."""
        return list(self._images)

    def curve(self) -> FrocCurve | None:
        """The FROC curve of everything accumulated (None without lesions)."""
        return froc_curve(np.array([s for _, _, s in self._lesions]), np.array([s for _, s in self._fps]),
                          float(len(self._images)))

    def compute(self) -> dict[str, float]:
        """``froc_sens_fp<rate>`` for every reached rate, ``froc_sens_mean``, ``froc_max_fp``, ``froc_max_sens``."""
        return froc_summary(self.curve(), self.rates)
