"""Segmentation metrics: pixel confusion metrics, boundary distances, per-lesion evaluation, FROC, intervals.

Each accumulator has ``update`` / ``compute`` / ``reset`` (plus ``reduce_across_ranks`` for
multi-GPU validation, through :func:`medseg.runtime.gather_objects`). The modules, by concern:

* :mod:`~medseg.metrics.pixel` — :class:`ConfusionMatrix` and :func:`pixel_metrics` (PA, MPA, MIoU,
  FWIoU, Dice per class), the array helpers;
* :mod:`~medseg.metrics.boundary` — :func:`hd95`, :func:`surface_dice` (mm, between two masks);
* :mod:`~medseg.metrics.matching` — :func:`label_components`, :func:`match_lesions` (the explicit
  matching rule), size strata;
* :mod:`~medseg.metrics.lesion` — :class:`LesionMetrics`: per-lesion Dice, HD95, RECIST diameters
  and ULS23 SAPE, sensitivity and false positives per image, by size and lesion type;
* :mod:`~medseg.metrics.slice_suite` — :class:`MetricSuite`, all of the above per batch (validation);
* :mod:`~medseg.metrics.roi` — the lesion-ROI protocol; :mod:`~medseg.metrics.froc` — FROC;
  :mod:`~medseg.metrics.em` — the ISBI EM pixel / Rand errors;
* :mod:`~medseg.metrics.stats` — bootstrap intervals and the paired test;
  :mod:`~medseg.metrics.suite` — :class:`~medseg.metrics.suite.EvaluationSuite`, one evaluation;
* :mod:`~medseg.metrics.keys` — every key name (:func:`metric_names`), so ``train.monitor`` can be checked.

Example:
    >>> suite = MetricSuite(num_classes=2)
    >>> suite.update(pred, label, instance, [m["spacing"] for m in metas], metas)  # (B, H, W) each
    >>> suite.compute()["dice"], suite.compute()["lesion_sensitivity"]
"""

from medseg.metrics.boundary import boundary_metrics, hd95, surface_dice
from medseg.metrics.keys import FROC_FP_RATES, FROC_KEYS, ROI_GROUPED_KEYS, ROI_KEYS, froc_key, metric_names
from medseg.metrics.lesion import LesionMetrics
from medseg.metrics.matching import (
    MATCH_RULES,
    SIZE_STRATA,
    LesionMatch,
    MatchRule,
    label_components,
    match_lesions,
    size_stratum,
)
from medseg.metrics.pixel import ConfusionMatrix, pixel_metrics
from medseg.metrics.slice_suite import MetricSuite

__all__ = [
    "FROC_FP_RATES",
    "FROC_KEYS",
    "MATCH_RULES",
    "ROI_GROUPED_KEYS",
    "ROI_KEYS",
    "SIZE_STRATA",
    "ConfusionMatrix",
    "LesionMatch",
    "LesionMetrics",
    "MatchRule",
    "MetricSuite",
    "boundary_metrics",
    "froc_key",
    "hd95",
    "label_components",
    "match_lesions",
    "metric_names",
    "pixel_metrics",
    "size_stratum",
    "surface_dice",
]
