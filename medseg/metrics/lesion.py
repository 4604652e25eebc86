"""Whole-slice lesion metrics: each true lesion scored against the predicted components matched to it.

:class:`LesionMetrics` labels the predicted mask's connected components, matches them to the true
lesions (:func:`~medseg.metrics.matching.match_lesions`) and records one row per true lesion:
Dice, IoU, HD95, RECIST long / short axes (measured on both masks, and the annotated ones where the
data has them), ULS23 SAPE, detection, merges. ``compute`` summarises them: sensitivity, false
positives per image, means, and the same per size stratum and per coarse lesion type.

The small helpers the lesion-ROI protocol (:mod:`medseg.metrics.roi`) shares: :func:`sape`,
:func:`recist_mm` (annotated diameters), :func:`type_name` (a type code's key name) and
:func:`finite_mean`.

Example:
    >>> lesions = LesionMetrics(rule="overlap")
    >>> lesions.update(pred_mask, true_instance, spacing=(0.8, 0.8), meta=sample["meta"])
    >>> lesions.compute()["lesion_sensitivity"], lesions.rows()[0]["dice"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.lesion import COARSE_LESION_TYPES, axes_mm, measure_recist
from medseg.metrics.boundary import hd95
from medseg.metrics.matching import (
    MATCH_RULES,
    SIZE_STRATA,
    MatchRule,
    credited_prediction,
    label_components,
    match_lesions,
    size_stratum,
)
from medseg.metrics.pixel import ArrayLike, mask2d
from medseg.runtime import dist_ready, gather_objects

__all__ = ["LesionMetrics", "finite_mean", "recist_mm", "sape", "type_name"]


def type_name(code: Any) -> str | None:
    """Metric-key name of a coarse lesion type code (None when unknown)."""
    if code is None:
        return None
    try:
        c = int(code)
    except (TypeError, ValueError):
        return None
    return COARSE_LESION_TYPES.get(c, f"type{c}")


def sape(pred: float, true: float) -> float:
    """ULS23 symmetric absolute percentage error ``|p − g| / (|g| + |p|)`` (0 when both are 0)."""
    den = abs(true) + abs(pred)
    return abs(pred - true) / den if den > 0 else 0.0


def recist_mm(lesion: Mapping[str, Any], spacing: Sequence[float]) -> tuple[float, float]:
    """Annotated long/short axes (mm) from 8 RECIST coordinates ``x1,y1,x2,y2,x3,y3,x4,y4`` (px)."""
    c = np.asarray(lesion["coords"], dtype=np.float64).reshape(4, 2)
    scale = np.array([float(spacing[1]), float(spacing[0])])  # (x, y) ← (sx, sy)
    return (float(np.linalg.norm((c[1] - c[0]) * scale)), float(np.linalg.norm((c[3] - c[2]) * scale)))


def finite_mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values, or None when there are none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else None


class LesionMetrics:
    """Per-lesion evaluation accumulated over images.

    For each image, the predicted mask's connected components are matched to the true lesions with
    :func:`match_lesions`. A lesion's predicted mask is the union of its matched components (a
    merged component counts whole for each lesion it touches, so merges cost Dice). Diameters are
    measured with :func:`medseg.lesion.measure_recist` on both the true and the predicted mask
    (so the error isolates the segmentation). Where ``meta["lesions"][id - 1]`` (lesion ``i`` of
    the row order has instance id ``i + 1``, as :func:`medseg.data.deeplesion.recist.recist_to_masks` assigns)
    carries the RECIST ``coords`` (8 floats, in pixels of the returned arrays, as the DeepLesion
    dataset stores them), the annotated diameters are reported too (``recist_*`` columns); its
    ``type`` gives the coarse lesion type.

    Missed lesions score Dice 0, HD95 ``inf`` (left out of the HD95 mean) and SAPE 1 (the ULS23
    convention: an empty prediction has diameter 0); diameter errors in mm average detected
    lesions only.

    Args:
        rule: the matching rule of :func:`match_lesions` (``"overlap"`` or ``"iou"``).
        iou_threshold: IoU needed under ``"iou"``.
        min_overlap_px: shared pixels needed under ``"overlap"``.
        connectivity: 2 = 8-connected predicted components, 1 = 4-connected.
    """

    def __init__(
        self,
        rule: MatchRule = "overlap",
        iou_threshold: float = 0.5,
        min_overlap_px: int = 1,
        connectivity: int = 2,
    ) -> None:
        if rule not in MATCH_RULES:
            raise ValueError(f"lesion match rule {rule!r} is unknown; expected one of {', '.join(MATCH_RULES)}")
        self.rule: MatchRule = rule
        self.iou_threshold = iou_threshold
        self.min_overlap_px = min_overlap_px
        self.connectivity = connectivity
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._rows: list[dict[str, Any]] = []
        self._n_images = 0
        self._n_fp = 0
        self._n_merges = 0
        #: (image id, unmatched components) per image, for resampling images / patients
        self._image_fp: list[tuple[str, int]] = []

    def update(
        self,
        pred_mask: ArrayLike,
        true_instance: ArrayLike,
        spacing: Sequence[float] = (1.0, 1.0),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one image.

        Args:
            pred_mask: ``(H, W)`` predicted class map or binary mask; every non-zero pixel is lesion.
            true_instance: ``(H, W)`` true instance map (0 = background, one id per lesion).
            spacing: ``(sy, sx)`` mm per pixel of these arrays.
            meta: the sample's meta (``id``; optional ``lesions``).
        """
        meta = meta or {}
        pred = mask2d(pred_mask, "pred_mask")
        true = mask2d(true_instance, "true_instance").astype(np.int64)
        if pred.shape != true.shape:
            raise ValueError(f"pred_mask {pred.shape} and true_instance {true.shape} differ in shape")
        comps = label_components(pred, self.connectivity)
        m = match_lesions(comps, true, self.rule, self.iou_threshold, self.min_overlap_px)
        image_id = str(meta.get("id", f"image{self._n_images}"))
        self._n_images += 1
        self._n_fp += len(m.false_positive_ids)
        self._image_fp.append((image_id, len(m.false_positive_ids)))
        self._n_merges += len(m.merged_ids)
        merged = set(m.merged_ids.tolist())
        lesions = meta.get("lesions") or []
        for i, tid in enumerate(m.true_ids.tolist()):
            t_mask = true == tid
            pids = m.pred_ids[m.matched[i]]
            p_mask = credited_prediction(comps, true, m, i, tuple(spacing))  # a touching neighbour's part left out
            detected = bool(len(pids))
            inter = float(np.logical_and(t_mask, p_mask).sum())
            t_area, p_area = float(t_mask.sum()), float(p_mask.sum())
            t_long, t_short = axes_mm(measure_recist(t_mask), spacing)  # type: ignore[arg-type]
            if detected:
                p_long, p_short = axes_mm(measure_recist(p_mask), spacing)  # type: ignore[arg-type]
            else:
                p_long = p_short = math.nan
            info = lesions[tid - 1] if 0 < tid <= len(lesions) and isinstance(lesions[tid - 1], Mapping) else {}
            r_long, r_short = recist_mm(info, spacing) if "coords" in info else (math.nan, math.nan)
            self._rows.append(
                {
                    "image_id": image_id,
                    "lesion_id": int(tid),
                    "lesion_type": info.get("type"),
                    "size_stratum": size_stratum(t_long),
                    "true_long_mm": t_long,
                    "true_short_mm": t_short,
                    "recist_long_mm": r_long,
                    "recist_short_mm": r_short,
                    "pred_long_mm": p_long,
                    "pred_short_mm": p_short,
                    "long_error_mm": abs(p_long - t_long) if detected else math.nan,
                    "short_error_mm": abs(p_short - t_short) if detected else math.nan,
                    "recist_long_error_mm": abs(p_long - r_long) if detected else math.nan,
                    "sape_long": sape(p_long, t_long) if detected else 1.0,
                    "sape_short": sape(p_short, t_short) if detected else 1.0,
                    "dice": 2 * inter / (t_area + p_area),
                    "iou": inter / (t_area + p_area - inter),
                    "hd95_mm": hd95(p_mask, t_mask, spacing) if detected else math.inf,
                    "detected": detected,
                    "n_pred_components": len(pids),
                    "merged": bool(merged.intersection(pids.tolist())),
                }
            )

    def rows(self) -> list[dict[str, Any]]:
        """One dict per true lesion (equal keys in equal order, ready for ``csv.DictWriter``)."""
        return [dict(r) for r in self._rows]

    def reduce_across_ranks(self) -> None:
        """Gather every rank's rows and counts (``all_gather_object``); a no-op outside DDP."""
        if not dist_ready():
            return
        parts = gather_objects((self._rows, self._n_images, self._n_fp, self._n_merges, self._image_fp))
        self._rows = [r for p in parts for r in p[0]]
        self._n_images = sum(p[1] for p in parts)
        self._n_fp = sum(p[2] for p in parts)
        self._n_merges = sum(p[3] for p in parts)
        self._image_fp = [v for p in parts for v in p[4]]

    def image_false_positives(self) -> list[tuple[str, int]]:
        """``(image id, unmatched predicted components)`` for every image, in update order."""
        return list(self._image_fp)

    def compute(self) -> dict[str, float]:
        """Summary over all lesions and images (keys present only where defined, never NaN).

        Keys: ``lesion_count``, ``lesion_dice`` (mean over all true lesions, missed = 0),
        ``lesion_sensitivity`` (detected / all), ``fp_per_image`` (unmatched components per image),
        ``lesion_merges``, ``lesion_hd95`` (mm, detected lesions), ``diameter_error_mm`` and
        ``short_axis_error_mm`` (mean absolute error of the measured axes, detected lesions),
        ``recist_diameter_error_mm`` (vs annotated diameters, where known), ``sape_long`` and
        ``sape_short`` (ULS23 SAPE, all lesions); then per size stratum ``<key>_lt10``,
        ``<key>_10to30``, ``<key>_gt30`` and per coarse type ``<key>_<type name>`` for
        ``lesion_count``, ``lesion_dice``, ``lesion_sensitivity``, ``diameter_error_mm``, ``sape_long``.
        """
        out: dict[str, float] = {
            "lesion_count": float(len(self._rows)),
            "fp_per_image": self._n_fp / self._n_images if self._n_images else 0.0,
            "lesion_merges": float(self._n_merges),
        }
        out.update(self._summary(self._rows, ""))
        extra = {
            "lesion_hd95": finite_mean([r["hd95_mm"] for r in self._rows if r["detected"]]),
            "short_axis_error_mm": finite_mean([r["short_error_mm"] for r in self._rows]),
            "sape_short": finite_mean([r["sape_short"] for r in self._rows]),
            "recist_diameter_error_mm": finite_mean([r["recist_long_error_mm"] for r in self._rows]),
        }
        out.update({k: v for k, v in extra.items() if v is not None})
        for name in SIZE_STRATA:
            out.update(self._summary([r for r in self._rows if r["size_stratum"] == name], f"_{name}"))
        types = {type_name(r["lesion_type"]) for r in self._rows} - {None}
        for tname in sorted(types):  # type: ignore[type-var]
            out.update(self._summary([r for r in self._rows if type_name(r["lesion_type"]) == tname], f"_{tname}"))
        return out

    @staticmethod
    def _summary(rows: list[dict[str, Any]], suffix: str) -> dict[str, float]:
        """Count, Dice, sensitivity, long-axis error and SAPE of a group of rows."""
        if not rows:
            return {}
        vals = {
            "lesion_count": float(len(rows)),
            "lesion_dice": finite_mean([r["dice"] for r in rows]),
            "lesion_sensitivity": float(np.mean([r["detected"] for r in rows])),
            "diameter_error_mm": finite_mean([r["long_error_mm"] for r in rows]),
            "sape_long": finite_mean([r["sape_long"] for r in rows]),
        }
        return {k + suffix: v for k, v in vals.items() if v is not None}
