"""The volume protocol's metrics: lesions matched in 3-D, per-slice Dice by key / non-key slice, 3-D FROC.

Where true masks exist on every slice of a series (generated DeepLesion-format data, NIfTI or
DICOM + SEG data), a model is scored the way ``medseg predict`` uses it: on every slice of the
series. One **volume** is a stack of contiguous slices (for DeepLesion-format data: one key slice's
``Slice_range`` block). :class:`VolumeMetrics` accumulates volumes and reports (keys prefixed
``vol_`` so they sit beside the key-slice protocol's in one metrics dict and one MLflow run):

* ``vol_lesion_dice`` — mean over true lesions of the 3-D Dice between the lesion's voxels and the
  union of the predicted 3-D components matched to it (a missed lesion scores 0); where a component also
  matches a touching lesion, only its part nearer to this lesion counts
  (:func:`~medseg.metrics.matching.credited_prediction`); ``vol_lesion_count``,
  ``vol_lesion_sensitivity`` (share of lesions matched);
* ``vol_dice`` — voxel Dice pooled over all volumes;
* ``vol_slice_dice_key`` / ``vol_slice_dice_nonkey`` — mean per-slice pixel Dice over the key slices
  and over the other slices that hold a true lesion; ``vol_slice_count_key`` / ``_nonkey``;
* ``vol_fp_per_volume`` — predicted 3-D components matched to no true lesion, per volume
  (``vol_fp_count`` in all); ``vol_empty_slices_with_fp`` — share of lesion-free slices with any
  predicted pixel;
* ``vol_froc_sens_fp0.5`` … ``vol_froc_sens_fp8``, ``vol_froc_sens_mean``, ``vol_froc_max_fp``,
  ``vol_froc_max_sens`` — FROC with 3-D candidates (components of the foreground probability above
  ``metrics.froc_threshold``, scored by their maximum) against false positives per volume.

Matching is the run's rule (:func:`medseg.metrics.matching.match_lesions`: shared voxels or IoU) on
3-D components (:func:`label_components_3d`, 26-connected by default like ``medseg predict``'s
lesion table). The true lesions are the instance ids of the true mask (ids are one lesion across
slices); a mask with one id only is split into its 3-D components.

Example:
    >>> vm = VolumeMetrics()
    >>> vm.update(pred, truth, key=np.array([False, True, False]), volume_id="000001_01_01:100-110", prob=prob)
    >>> vm.compute()["vol_lesion_dice"]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.metrics.froc import froc_curve, froc_summary
from medseg.metrics.keys import FROC_FP_RATES, FROC_KEYS, froc_key
from medseg.metrics.matching import MatchRule, credited_prediction, match_lesions
from medseg.metrics.stats import bootstrap_mean_ci

__all__ = ["VOLUME_KEYS", "VOLUME_PREFIX", "VolumeMetrics", "label_components_3d", "match_3d", "volume_metric_names"]

#: the prefix of every volume-protocol key
VOLUME_PREFIX = "vol_"
#: the volume protocol's keys besides FROC
VOLUME_KEYS = ("vol_lesion_count", "vol_lesion_dice", "vol_lesion_sensitivity", "vol_dice", "vol_slice_dice_key",
               "vol_slice_dice_nonkey", "vol_slice_count_key", "vol_slice_count_nonkey", "vol_fp_per_volume",
               "vol_fp_count", "vol_volumes", "vol_empty_slices_with_fp")


def volume_metric_names(froc: bool = True) -> list[str]:
    """Every key :class:`VolumeMetrics` can report."""
    names = list(VOLUME_KEYS)
    if froc:
        names += [VOLUME_PREFIX + froc_key(r) for r in FROC_FP_RATES] + [VOLUME_PREFIX + k for k in FROC_KEYS]
    return names


def label_components_3d(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """3-D connected components of ``mask != 0`` as a ``(Z, H, W)`` int32 map (0 = background, 1..N).

    ``connectivity`` 3 joins voxels sharing a corner (26-connected), 2 an edge (18), 1 a face (6).
    """
    m = np.asarray(mask) != 0
    if m.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) mask, got shape {m.shape}")
    labels, _ = ndimage.label(m, structure=ndimage.generate_binary_structure(3, connectivity))
    return labels.astype(np.int32)


def _true_lesions(truth: np.ndarray, connectivity: int) -> np.ndarray:
    """True lesions: the instance ids, or the 3-D components of a mask holding a single id."""
    ids = np.unique(truth[truth > 0])
    return label_components_3d(truth > 0, connectivity) if len(ids) == 1 else truth.astype(np.int32)


def match_3d(pred_components: np.ndarray, true_lesions: np.ndarray, rule: MatchRule = "overlap",
             iou_threshold: float = 0.5, min_overlap_px: int = 1) -> Any:
    """:func:`~medseg.metrics.matching.match_lesions` on ``(Z, H, W)`` maps (overlaps count voxels)."""
    if pred_components.shape != true_lesions.shape:
        raise ValueError(f"prediction {pred_components.shape} and truth {true_lesions.shape} differ in shape")
    z, h, w = pred_components.shape
    return match_lesions(pred_components.reshape(z * h, w), true_lesions.reshape(z * h, w), rule, iou_threshold,
                         min_overlap_px)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else math.nan


class VolumeMetrics:
    """The volume protocol accumulated over volumes (``update`` / ``compute`` / ``rows``).

    Args:
        rule, iou_threshold, min_overlap_px: the matching rule (``metrics.*``).
        connectivity: of the 3-D components (3 = 26-connected, as ``predict.connectivity``).
        froc_threshold: the probability that makes a voxel part of a FROC candidate (None = no FROC).
    """

    def __init__(self, rule: MatchRule = "overlap", iou_threshold: float = 0.5, min_overlap_px: int = 1,
                 connectivity: int = 3, froc_threshold: float | None = 0.1) -> None:
        self.rule: MatchRule = rule
        self.iou_threshold = iou_threshold
        self.min_overlap_px = min_overlap_px
        self.connectivity = connectivity
        self.froc_threshold = froc_threshold
        self._rows: list[dict[str, Any]] = []
        self._slices: list[dict[str, Any]] = []
        self._volumes: list[dict[str, Any]] = []
        self._inter = 0.0
        self._sum = 0.0
        self._froc_lesions: list[float] = []
        self._froc_fps: list[float] = []

    @classmethod
    def from_config(cls, metrics_cfg: Any, connectivity: int = 3) -> VolumeMetrics:
        """From the ``metrics`` config section (FROC when ``metrics.froc``)."""
        m = metrics_cfg
        return cls(m.match_rule, m.iou_threshold, m.min_overlap_px, connectivity,
                   m.froc_threshold if m.froc else None)

    def update(self, pred: np.ndarray, truth: np.ndarray, key: np.ndarray, volume_id: str,
               prob: np.ndarray | None = None, unit: str | None = None) -> None:
        """Add one volume.

        Args:
            pred: ``(Z, H, W)`` predicted class map (every class > 0 is lesion).
            truth: ``(Z, H, W)`` true instance ids (0 = background).
            key: ``(Z,)`` bool, the key slices.
            volume_id: names the volume in the rows.
            prob: ``(Z, H, W)`` foreground probability for the FROC (None = no FROC for this volume).
            unit: the bootstrap unit (e.g. the patient; None = the volume).
        """
        pred = np.asarray(pred) > 0
        truth = np.asarray(truth)
        key = np.asarray(key, bool)
        if pred.shape != truth.shape or pred.ndim != 3 or key.shape != (pred.shape[0],):
            raise ValueError(f"pred {pred.shape}, truth {truth.shape} and key {key.shape} do not fit one (Z, H, W) volume")
        unit = unit or volume_id
        true = _true_lesions(truth, self.connectivity)
        comps = label_components_3d(pred, self.connectivity)
        m = match_3d(comps, true, self.rule, self.iou_threshold, self.min_overlap_px)
        for i, tid in enumerate(m.true_ids.tolist()):
            t_mask = true == tid
            pids = m.pred_ids[m.matched[i]]
            p_mask = credited_prediction(comps, true, m, i)
            zs = np.nonzero(t_mask.any((1, 2)))[0]
            self._rows.append({"image_id": volume_id, "unit": unit, "lesion_id": int(tid), "voxels": int(t_mask.sum()),
                               "slices": len(zs), "on_key_slice": bool(key[zs].any()), "detected": bool(len(pids)),
                               "dice_3d": _dice(t_mask, p_mask), "n_pred_components": len(pids)})
        fg = truth > 0
        self._inter += float(np.logical_and(pred, fg).sum())
        self._sum += float(pred.sum() + fg.sum())
        for z in range(len(pred)):
            self._slices.append({"volume": volume_id, "unit": unit, "slice": z, "key": bool(key[z]),
                                 "has_lesion": bool(fg[z].any()), "has_pred": bool(pred[z].any()),
                                 "dice": _dice(pred[z], fg[z])})
        n_fp = len(m.false_positive_ids)
        self._volumes.append({"volume": volume_id, "unit": unit, "fp": n_fp})
        if prob is not None and self.froc_threshold is not None:
            p = np.asarray(prob, dtype=np.float64)
            cand = label_components_3d(p > self.froc_threshold, self.connectivity)
            n = int(cand.max(initial=0))
            scores = np.asarray(ndimage.maximum(p, cand, index=np.arange(1, n + 1)), np.float64) if n else np.zeros(0)
            mc = match_3d(cand, true, self.rule, self.iou_threshold, self.min_overlap_px)
            cs = scores[mc.pred_ids - 1] if len(mc.pred_ids) else np.zeros(0)
            for i in range(len(mc.true_ids)):
                hits = cs[mc.matched[i]]
                self._froc_lesions.append(float(hits.max()) if hits.size else -math.inf)
            self._froc_fps += cs[~mc.matched.any(0)].tolist()

    def rows(self) -> list[dict[str, Any]]:
        """One row per true lesion: ``image_id`` (the volume), ``unit``, ``lesion_id``, voxels, slices, detected, ``dice_3d``."""
        return [dict(r) for r in self._rows]

    def slice_rows(self) -> list[dict[str, Any]]:
        """One row per slice: volume, slice index, key, has_lesion, has_pred, pixel ``dice`` (NaN when both empty)."""
        return [dict(r) for r in self._slices]

    def compute(self) -> dict[str, float]:
        """The ``vol_*`` keys (see the module docstring); empty before any volume."""
        if not self._volumes:
            return {}
        dice = [r["dice_3d"] for r in self._rows]
        key_d = [s["dice"] for s in self._slices if s["key"] and s["has_lesion"]]
        non_d = [s["dice"] for s in self._slices if not s["key"] and s["has_lesion"]]
        empty = [s["has_pred"] for s in self._slices if not s["has_lesion"]]
        n_vol = len(self._volumes)
        n_fp = sum(v["fp"] for v in self._volumes)
        out = {
            "vol_volumes": float(n_vol),
            "vol_lesion_count": float(len(dice)),
            "vol_lesion_dice": float(np.mean(dice)) if dice else math.nan,
            "vol_lesion_sensitivity": float(np.mean([r["detected"] for r in self._rows])) if dice else math.nan,
            "vol_dice": 2 * self._inter / self._sum if self._sum else math.nan,
            "vol_slice_dice_key": float(np.mean(key_d)) if key_d else math.nan,
            "vol_slice_dice_nonkey": float(np.mean(non_d)) if non_d else math.nan,
            "vol_slice_count_key": float(len(key_d)),
            "vol_slice_count_nonkey": float(len(non_d)),
            "vol_fp_count": float(n_fp),
            "vol_fp_per_volume": n_fp / n_vol,
            "vol_empty_slices_with_fp": float(np.mean(empty)) if empty else math.nan,
        }
        if self.froc_threshold is not None and self._froc_lesions:
            curve = froc_curve(np.array(self._froc_lesions), np.array(self._froc_fps), float(n_vol))
            out.update({VOLUME_PREFIX + k: v for k, v in froc_summary(curve).items()})
        return out

    def intervals(self, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
        """Cluster-bootstrap intervals (over ``unit``) of the per-lesion and per-slice means:
        ``vol_lesion_dice``, ``vol_slice_dice_key``, ``vol_slice_dice_nonkey`` as ``<key>_ci_low`` / ``_ci_high``."""
        out: dict[str, float] = {}
        sets = {"vol_lesion_dice": ([r["dice_3d"] for r in self._rows], [r["unit"] for r in self._rows])}
        for name, is_key in (("vol_slice_dice_key", True), ("vol_slice_dice_nonkey", False)):
            sl = [s for s in self._slices if s["key"] == is_key and s["has_lesion"]]
            sets[name] = ([s["dice"] for s in sl], [s["unit"] for s in sl])
        for name, (values, units) in sets.items():
            if not values:
                continue
            ci = bootstrap_mean_ci(values, units, n_resamples, seed, level)
            if ci is not None:
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = ci
        return out
