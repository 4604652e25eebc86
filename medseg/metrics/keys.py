"""The metric key names validation and evaluation report, in one place, so that a run's
``train.monitor`` (and ``calibration.metric``) can be checked before anything runs.

* :data:`LESION_KEYS` / :data:`GROUPED_LESION_KEYS` — the whole-slice lesion metrics
  (:class:`~medseg.metrics.lesion.LesionMetrics`), the grouped ones also per size stratum and lesion type;
* :data:`ROI_KEYS` / :data:`ROI_GROUPED_KEYS` — the lesion-ROI protocol (:mod:`medseg.metrics.roi`);
* :data:`FROC_FP_RATES`, :func:`froc_key`, :data:`FROC_KEYS` — FROC (:mod:`medseg.metrics.froc`);
* :func:`metric_names` — all of them for one configuration.

Example:
    >>> froc_key(0.5)
    'froc_sens_fp0.5'
    >>> "lesion_dice_gt30" in metric_names(2)
    True
"""

from __future__ import annotations

from medseg.lesion import COARSE_LESION_TYPES
from medseg.metrics.matching import SIZE_STRATA

__all__ = ["FROC_FP_RATES", "FROC_KEYS", "GROUPED_LESION_KEYS", "LESION_KEYS", "ROI_GROUPED_KEYS", "ROI_KEYS",
           "froc_key", "metric_names"]

#: the lesion keys that are also reported per size stratum and per lesion type (``<key>_<group>``)
GROUPED_LESION_KEYS = ("lesion_count", "lesion_dice", "lesion_sensitivity", "diameter_error_mm", "sape_long")
#: the whole-slice lesion keys (:meth:`medseg.metrics.lesion.LesionMetrics.compute`)
LESION_KEYS = ("lesion_count", "fp_per_image", "lesion_merges", "lesion_dice", "lesion_sensitivity",
               "diameter_error_mm", "sape_long", "lesion_hd95", "short_axis_error_mm", "sape_short",
               "recist_diameter_error_mm")
#: the lesion-ROI protocol's keys (:class:`medseg.metrics.roi.RoiLesionMetrics`)
ROI_KEYS = ("roi_dice", "roi_iou", "roi_hd95", "roi_surface_dice", "roi_long_error_mm", "roi_short_error_mm",
            "roi_sape_long", "roi_sape_short", "roi_recist_long_error_mm", "roi_recist_short_error_mm",
            "roi_recist_sape_long", "roi_recist_sape_short", "roi_empty")
#: the ROI keys also reported per size stratum and per lesion type (``<key>_<group>``)
ROI_GROUPED_KEYS = ("roi_dice", "roi_iou", "roi_long_error_mm", "roi_sape_long")
#: false positives per image at which FROC sensitivities are reported (DeepLesion's operating points)
FROC_FP_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)


def froc_key(rate: float) -> str:
    """The metric key of the FROC sensitivity at ``rate`` false positives per image: ``froc_sens_fp0.5``."""
    return f"froc_sens_fp{rate:g}"


#: the FROC keys besides the per-rate sensitivities (:class:`medseg.metrics.froc.FrocMetrics`)
FROC_KEYS = ("froc_sens_mean", "froc_max_fp", "froc_max_sens")


def metric_names(num_classes: int, lesion_metrics: bool = True, roi: bool = True, froc: bool = True) -> list[str]:
    """Every key validation and evaluation can report (some only when defined, e.g. ``hd95``).

    ``roi`` adds the lesion-ROI protocol's keys and ``froc`` the FROC keys; both need
    ``lesion_metrics``. The confidence-interval keys (``<key>_ci_low`` / ``<key>_ci_high``) come
    only from ``medseg evaluate`` and are not listed.
    """
    names = ["pa", "mpa", "miou", "fwiou", "dice", *(f"dice_class_{i}" for i in range(num_classes)),
             "hd95", "surface_dice", "hd95_one_empty"]
    if lesion_metrics:
        names += list(LESION_KEYS)
        groups = list(SIZE_STRATA) + sorted(set(COARSE_LESION_TYPES.values()))
        names += [f"{k}_{g}" for g in groups for k in GROUPED_LESION_KEYS]
        if roi:
            names += list(ROI_KEYS) + [f"{k}_{g}" for g in groups for k in ROI_GROUPED_KEYS]
        if froc:
            names += [froc_key(r) for r in FROC_FP_RATES] + list(FROC_KEYS)
    return names
