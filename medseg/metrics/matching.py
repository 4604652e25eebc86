"""Lesion matching: connected components of a prediction matched to the true lesions by an explicit rule.

* :func:`label_components` — the predicted objects (8- or 4-connected components of a mask);
* :func:`match_lesions` — every (true lesion, predicted component) pair judged by the rule
  (:data:`MATCH_RULES`: shared pixels or IoU), returned as a :class:`LesionMatch` that names the
  detected lesions, false positives, merges and splits;
* :func:`credited_prediction` — the part of the matched components a true lesion is scored on: all of
  them, or, where a component also matches neighbouring lesions (touching lesions that one binary mask
  cannot keep apart), only the voxels nearer to this lesion than to those neighbours;
* :func:`size_stratum` — the size group of a lesion by its true long axis (:data:`SIZE_STRATA`).

Example:
    >>> comps = label_components(pred_mask)            # (H, W) int32, 0 = background
    >>> m = match_lesions(comps, true_instance, rule="overlap")
    >>> m.detected, m.false_positive_ids
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from medseg.metrics.pixel import ArrayLike, mask2d

__all__ = ["MATCH_RULES", "SIZE_STRATA", "LesionMatch", "MatchRule", "credited_prediction", "label_components",
           "match_lesions", "size_stratum"]

MatchRule = Literal["overlap", "iou"]

#: size strata of the true long axis, as in the literature: < 10 mm, 10–30 mm, > 30 mm
SIZE_STRATA: tuple[str, ...] = ("lt10", "10to30", "gt30")


def label_components(mask: ArrayLike, connectivity: int = 2) -> np.ndarray:
    """Connected components of ``mask != 0`` as an ``(H, W)`` int32 map (0 = background, 1..N).

    ``connectivity`` 2 joins diagonal neighbours (8-connectivity), 1 only edge neighbours.
    """
    m = mask2d(mask, "mask") != 0
    labels, _ = ndimage.label(m, structure=ndimage.generate_binary_structure(2, connectivity))
    return labels.astype(np.int32)


@dataclass(frozen=True)
class LesionMatch:
    """The result of :func:`match_lesions`.

    Attributes:
        true_ids: ``(T,)`` ids of the true lesions (sorted).
        pred_ids: ``(P,)`` ids of the predicted components (sorted).
        overlap: ``(T, P)`` shared pixels.
        iou: ``(T, P)`` intersection over union of each pair.
        matched: ``(T, P)`` bool, the pairs the rule accepts.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    overlap: np.ndarray
    iou: np.ndarray
    matched: np.ndarray

    @property
    def detected(self) -> np.ndarray:
        """``(T,)`` bool: a true lesion with at least one matched component."""
        return self.matched.any(1)

    @property
    def false_positive_ids(self) -> np.ndarray:
        """Predicted components matched to no true lesion."""
        return self.pred_ids[~self.matched.any(0)]

    @property
    def merged_ids(self) -> np.ndarray:
        """Predicted components matched to two or more true lesions (many-to-one merges)."""
        return self.pred_ids[self.matched.sum(0) >= 2]

    @property
    def split_ids(self) -> np.ndarray:
        """True lesions matched by two or more predicted components."""
        return self.true_ids[self.matched.sum(1) >= 2]

    def rivals(self, i: int) -> np.ndarray:
        """The other true lesions that share a matched component with the ``i``-th (ids; empty when none)."""
        shared = (self.matched & self.matched[i][None, :]).any(1)
        shared[i] = False
        return self.true_ids[shared]


#: the rules :func:`match_lesions` knows (``metrics.match_rule``)
MATCH_RULES = ("overlap", "iou")


def match_lesions(
    pred_instances: ArrayLike,
    true_instances: ArrayLike,
    rule: MatchRule = "overlap",
    iou_threshold: float = 0.5,
    min_overlap_px: int = 1,
) -> LesionMatch:
    """Match predicted components to true lesions.

    The rule, pair by pair (each predicted component against each true lesion):

    * ``"overlap"`` (default; the DeepLesion "overlap with the RECIST mask" hit): matched when they
      share at least ``min_overlap_px`` pixels;
    * ``"iou"``: matched when their IoU ≥ ``iou_threshold``.

    A true lesion is **detected** when any component matches it. A component matching no lesion is
    a **false positive**. Many-to-one merges (one component matching several lesions) detect each
    of those lesions and are counted in :attr:`LesionMatch.merged_ids`; one-to-many splits are
    counted in :attr:`LesionMatch.split_ids`. IoU is judged per component, so the pieces of a split
    lesion are not pooled for the ``"iou"`` rule.

    Args:
        pred_instances: ``(H, W)`` int map of predicted components (0 = background), e.g. from
            :func:`label_components` of the predicted mask.
        true_instances: ``(H, W)`` int map of true lesions (0 = background).
        rule: ``"overlap"`` or ``"iou"``.
        iou_threshold: the IoU a match needs under ``"iou"``.
        min_overlap_px: the shared pixels a match needs under ``"overlap"``.

    Returns:
        A :class:`LesionMatch`.
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"lesion match rule {rule!r} is unknown; expected one of {', '.join(MATCH_RULES)}")
    pi = mask2d(pred_instances, "pred_instances").astype(np.int64)
    ti = mask2d(true_instances, "true_instances").astype(np.int64)
    if pi.shape != ti.shape:
        raise ValueError(f"pred_instances {pi.shape} and true_instances {ti.shape} differ in shape")
    true_ids = np.unique(ti[ti > 0])
    pred_ids = np.unique(pi[pi > 0])
    n_t, n_p = len(true_ids), len(pred_ids)
    # Dense indices 1..T / 1..P (0 = background) so one bincount gives every pair's overlap.
    t_idx = np.where(ti > 0, np.searchsorted(true_ids, ti) + 1, 0)
    p_idx = np.where(pi > 0, np.searchsorted(pred_ids, pi) + 1, 0)
    joint = np.bincount((t_idx * (n_p + 1) + p_idx).ravel(), minlength=(n_t + 1) * (n_p + 1))
    joint = joint.reshape(n_t + 1, n_p + 1)
    overlap = joint[1:, 1:]
    t_area = joint[1:, :].sum(1)
    p_area = joint[:, 1:].sum(0)
    union = t_area[:, None] + p_area[None, :] - overlap
    iou = overlap / np.maximum(union, 1)
    matched = iou >= iou_threshold if rule == "iou" else overlap >= max(int(min_overlap_px), 1)
    return LesionMatch(true_ids, pred_ids, overlap, iou, matched)


def credited_prediction(pred_instances: np.ndarray, true_instances: np.ndarray, match: LesionMatch, i: int,
                        sampling: tuple[float, ...] | None = None) -> np.ndarray:
    """The predicted voxels the ``i``-th true lesion of ``match`` is scored on (a bool map, any dimension).

    The union of the components matched to it — except where one of them also matches other true lesions
    (:meth:`LesionMatch.rivals`). Lesions that touch form one object in a binary mask, so the union would
    hold the neighbour too, and even a perfect prediction would score below 1 (a small lesion beside a
    large one near 0). Such a component is split between the lesions it matches by distance: a voxel is
    credited to this lesion when it is at least as near to it as to any of those rivals (a nearest-lesion,
    Voronoi partition, as region-based instance metrics do). A perfect prediction then scores 1 for every
    lesion; a component that swallows background still counts against the lesions nearest to that background.

    Args:
        pred_instances, true_instances: the component and lesion id maps ``match`` was computed on (same shape).
        match: :func:`match_lesions`' result.
        i: the lesion's row in ``match.true_ids``.
        sampling: the voxel size per axis for the distances (None = voxel units).
    """
    pids = match.pred_ids[match.matched[i]]
    if not len(pids):
        return np.zeros(true_instances.shape, bool)
    pred = np.isin(pred_instances, pids)
    rivals = match.rivals(i)
    if not len(rivals):
        return pred
    own = true_instances == match.true_ids[i]
    others = np.isin(true_instances, rivals)
    # the distance maps only need the box holding the prediction and every lesion involved (all of them,
    # so the nearest voxel of each lies inside it)
    box = ndimage.find_objects((pred | own | others).astype(np.uint8))[0]
    d_own = ndimage.distance_transform_edt(~own[box], sampling=sampling)
    d_others = ndimage.distance_transform_edt(~others[box], sampling=sampling)
    credited = np.zeros_like(pred)
    credited[box] = pred[box] & (d_own <= d_others)
    return credited


def size_stratum(long_mm: float) -> str:
    """The size stratum of a true long axis: ``"lt10"`` (< 10 mm), ``"10to30"`` (10–30 mm) or ``"gt30"``."""
    if long_mm < 10.0:
        return "lt10"
    return "10to30" if long_mm <= 30.0 else "gt30"

