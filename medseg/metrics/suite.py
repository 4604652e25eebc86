"""Everything one evaluation reports: both lesion protocols, FROC and bootstrap confidence intervals.

:class:`EvaluationSuite` feeds one batch at a time to

* :class:`medseg.metrics.slice_suite.MetricSuite` — pixel and boundary metrics and the whole-slice lesion
  metrics (keys unchanged: ``dice``, ``lesion_dice``, …);
* :class:`medseg.metrics.roi.RoiLesionMetrics` — the lesion-ROI protocol (``roi_…``);
* :class:`medseg.metrics.froc.FrocMetrics` — FROC on whole slices (``froc_…``), from the foreground
  probabilities;

and merges their per-lesion rows into one table (one row per true lesion). :meth:`intervals`
adds a seeded bootstrap confidence interval to every headline metric (:data:`HEADLINE_KEYS`),
resampling **patients** where the data names them (DeepLesion's ``Patient_index``), else
**series**, else **images** (``metrics.bootstrap_unit`` forces one): a resample draws as many units
as there are, with replacement, and recomputes each metric from the drawn units' images and
lesions (:mod:`medseg.metrics.stats`). Metric-level definitions are unchanged, so the point estimate is the
plain value and the interval its sampling uncertainty over units.

Example:
    >>> suite = EvaluationSuite(cfg.metrics, num_classes=2)
    >>> suite.update(pred, label, instance, spacing, metas, fg_prob=prob)
    >>> metrics = suite.compute(); ci = suite.intervals()
    >>> ci.unit, ci.bounds["roi_dice"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.metrics.froc import FrocMetrics, froc_curve, froc_summary
from medseg.metrics.keys import FROC_FP_RATES, ROI_KEYS, froc_key
from medseg.metrics.matching import label_components
from medseg.metrics.pixel import pixel_metrics
from medseg.metrics.roi import RoiLesionMetrics
from medseg.metrics.slice_suite import MetricSuite
from medseg.metrics.stats import encode_units, percentile_interval, ratio_samples, resample_counts, unit_sums
from medseg.runtime import gather_objects

__all__ = ["HEADLINE_KEYS", "EvaluationSuite", "Intervals", "UNITS"]

#: resampling units, most to least clustered
UNITS = ("patient", "series", "image")

#: per-lesion means: metric key → the column of the lesion table it averages (finite values only)
_ROW_MEANS: dict[str, str] = {
    "lesion_dice": "dice",
    "lesion_sensitivity": "detected",
    "lesion_hd95": "hd95_mm",
    "diameter_error_mm": "long_error_mm",
    "sape_long": "sape_long",
    "recist_diameter_error_mm": "recist_long_error_mm",
    **{k: k for k in ROI_KEYS if k != "roi_empty"},
}
_FROC_CI_KEYS = (*(froc_key(r) for r in FROC_FP_RATES), "froc_sens_mean")

#: the metrics that get a confidence interval (``<key>_ci_low`` / ``<key>_ci_high``)
HEADLINE_KEYS: tuple[str, ...] = ("dice", "miou", "hd95", "surface_dice", "fp_per_image", *_ROW_MEANS, *_FROC_CI_KEYS)


@dataclass
class Intervals:
    """Bootstrap confidence intervals of one evaluation.

    Attributes:
        unit: what was resampled: ``"patient"``, ``"series"`` or ``"image"``.
        n_units: how many there were.
        n_resamples, seed, level: the bootstrap's settings.
        bounds: metric key → ``(low, high)``.
    """

    unit: str
    n_units: int
    n_resamples: int
    seed: int
    level: float
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for reports, e.g. ``95 % bootstrap CI over 6 patients (1000 resamples, seed 0)``."""
        if self.n_units < 2:
            return f"no interval: the split has {self.n_units} {self.unit} (a bootstrap needs at least 2)"
        return (f"{self.level * 100:g} % bootstrap CI over {self.n_units} {self.unit}{'s' if self.n_units != 1 else ''}"
                f" ({self.n_resamples} resamples, seed {self.seed})")

    def as_metrics(self) -> dict[str, float]:
        """``<key>_ci_low`` / ``<key>_ci_high`` for every bound, and ``ci_units``."""
        out = {"ci_units": float(self.n_units)}
        for k, (lo, hi) in self.bounds.items():
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = lo, hi
        return out


def _unit_labels(meta: dict[str, Any]) -> dict[str, str]:
    """The units an image belongs to, by kind (only those its meta names), each labelled ``"<kind> <id>"``."""
    out = {"image": f"image {meta['id']}"}
    if meta.get("patient_index") is not None:
        out["patient"] = f"patient {meta['patient_index']}"
    if meta.get("series") is not None:
        out["series"] = f"series {meta['series']}"
    return out


class EvaluationSuite:
    """Both lesion protocols, FROC and intervals, fed one batch at a time.

    Args:
        cfg: the ``metrics`` config section (:class:`medseg.config.MetricsConfig`).
        num_classes: K, including background.
        keep_worst: keep crops of this many lowest-ROI-Dice lesions (for the overlay figure).
    """

    def __init__(self, cfg: Any, num_classes: int, keep_worst: int = 0) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.metrics = MetricSuite.from_config(cfg, num_classes)
        lesions = bool(cfg.lesion_metrics)
        self.roi = (RoiLesionMetrics(cfg.roi_margin, cfg.roi_other_lesions, cfg.nsd_tolerance_mm, cfg.connectivity,
                                     keep_worst) if lesions and cfg.roi_protocol else None)
        self.froc = (FrocMetrics(cfg.froc_threshold, cfg.match_rule, cfg.iou_threshold, cfg.min_overlap_px,
                                 cfg.connectivity) if lesions and cfg.froc else None)
        self._units: dict[str, dict[str, str]] = {}

    @property
    def needs_probabilities(self) -> bool:
        """Whether :meth:`update` needs ``fg_prob`` (FROC is on)."""
        return self.froc is not None

    def update(
        self,
        pred: Any,
        label: Any,
        instance: Any = None,
        spacing: Any = None,
        meta: Any = None,
        fg_prob: Any = None,
        image: Any = None,
    ) -> None:
        """Add a batch.

        Args:
            pred, label, instance, spacing, meta: as :meth:`medseg.metrics.slice_suite.MetricSuite.update`.
            fg_prob: ``(B, H, W)`` foreground probability (1 − P(background)); needed for FROC.
            image: ``(B, C, H, W)`` inputs, for the worst-lesion crops.
        """
        p = MetricSuite._batch(pred, "pred")
        metas = [dict(m) for m in meta] if meta is not None else [{} for _ in range(len(p))]
        for m in metas:  # one id per image, shared by every accumulator and the unit map
            if "id" not in m:
                m["id"] = f"image{len(self._units)}"
            self._units[str(m["id"])] = _unit_labels(m)
        self.metrics.update(p, label, instance, spacing, metas)
        if self.roi is None and self.froc is None:
            return
        if self.froc is not None and fg_prob is None:
            raise ValueError("FROC (metrics.froc) needs the foreground probabilities: pass fg_prob")
        y = MetricSuite._batch(label, "label")
        inst = MetricSuite._batch(instance, "instance") if instance is not None else None
        prob = fg_prob.detach().cpu().numpy() if hasattr(fg_prob, "detach") else fg_prob
        for b in range(len(p)):
            sp = spacing[b] if spacing is not None else metas[b].get("spacing", (1.0, 1.0))
            true_inst = inst[b] if inst is not None else label_components(y[b] > 0, self.cfg.connectivity)
            if self.roi is not None:
                self.roi.update(p[b], true_inst, sp, metas[b], image[b] if image is not None else None)
            if self.froc is not None:
                self.froc.update(prob[b], true_inst, str(metas[b]["id"]))

    def reduce_across_ranks(self) -> None:
        """Combine every rank's state (before :meth:`compute` under DDP); a no-op otherwise."""
        self.metrics.reduce_across_ranks()
        for acc in (self.roi, self.froc):
            if acc is not None:
                acc.reduce_across_ranks()
        parts = gather_objects(self._units)
        if len(parts) > 1:
            self._units = {k: v for p in parts for k, v in p.items()}

    def compute(self) -> dict[str, float]:
        """Every metric as a flat dict (absent where undefined, never NaN)."""
        out = self.metrics.compute()
        if self.roi is not None:
            out.update(self.roi.compute())
        if self.froc is not None:
            out.update(self.froc.compute())
        return out

    # ------------------------------------------------------------------ the lesion table

    def unit_kind(self) -> str:
        """The resampling unit: ``metrics.bootstrap_unit``, or for ``auto`` the most clustered one
        that every image names (patient, else series, else image).

        Raises:
            ValueError: a forced unit that some image does not name.
        """
        want = self.cfg.bootstrap_unit
        if want != "auto":
            missing = [i for i, u in self._units.items() if want not in u]
            if missing:
                raise ValueError(f"metrics.bootstrap_unit = {want!r}, but {len(missing)} image(s) name no {want} "
                                 f"(e.g. {missing[0]!r}); use auto, series or image")
            return str(want)
        return next(k for k in UNITS if all(k in u for u in self._units.values()))

    def lesion_rows(self) -> list[dict[str, Any]]:
        """One row per true lesion: the whole-slice columns, the ``roi_*`` columns, ``froc_score``
        (the best score of a FROC candidate hitting it; empty when none does) and ``unit`` (its
        patient / series / image, the unit intervals resample, as ``"patient 12"``, ``"series …"``
        or ``"image …"``). Empty without lesion metrics."""
        rows = self.metrics.lesion_rows()
        if not rows:
            return []
        roi = {(r["image_id"], r["lesion_id"]): r for r in self.roi.rows()} if self.roi is not None else {}
        froc = ({(i, lid): s for i, lid, s in self.froc.lesion_scores()} if self.froc is not None else {})
        kind = self.unit_kind()
        out = []
        for r in rows:
            key = (r["image_id"], r["lesion_id"])
            row = dict(r)
            for k, v in roi.get(key, {}).items():
                row.setdefault(k, v)
            if self.froc is not None:
                s = froc.get(key)
                row["froc_score"] = s if s is not None and np.isfinite(s) else None
            row["unit"] = self._units.get(str(r["image_id"]), {}).get(kind, f"image {r['image_id']}")
            out.append(row)
        keys = list(dict.fromkeys(k for r in out for k in r))  # equal keys in equal order (CSV)
        return [{k: r.get(k) for k in keys} for r in out]

    def worst_lesions(self) -> list[dict[str, Any]]:
        """The kept lowest-ROI-Dice crops (see :meth:`medseg.metrics.roi.RoiLesionMetrics.worst`)."""
        return self.roi.worst() if self.roi is not None else []

    def froc_points(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(FP per image, sensitivity)`` of the FROC curve (None without FROC or lesions)."""
        curve = self.froc.curve() if self.froc is not None else None
        return (curve.fp_per_image, curve.sensitivity) if curve is not None else None

    # ------------------------------------------------------------------ intervals

    def intervals(self, metrics: dict[str, float] | None = None, n_resamples: int | None = None,
                  seed: int | None = None, level: float | None = None) -> Intervals | None:
        """Bootstrap intervals of the headline metrics present in ``metrics`` (default :meth:`compute`).

        ``n_resamples``, ``seed`` and ``level`` default to ``metrics.bootstrap_resamples``,
        ``bootstrap_seed`` and ``ci_level``. None when there are no resamples or no images; no
        bounds when there is a single unit.
        """
        b = self.cfg.bootstrap_resamples if n_resamples is None else n_resamples
        seed = self.cfg.bootstrap_seed if seed is None else seed
        level = self.cfg.ci_level if level is None else level
        if not 0.0 < level < 1.0:
            raise ValueError(f"metrics.ci_level must be in (0, 1), got {level}")
        if b <= 0 or not self._units:
            return None
        point = self.compute() if metrics is None else metrics
        kind = self.unit_kind()
        unit_idx, labels = encode_units([u[kind] for u in self._units.values()])
        of_image = dict(zip(self._units, unit_idx.tolist()))
        n_u = len(labels)
        if n_u < 2:  # resampling one unit only repeats it: no interval, not a zero-width one
            return Intervals(kind, n_u, b, seed, level, {})
        w = resample_counts(n_u, b, seed).astype(np.float64)
        samples: dict[str, np.ndarray] = {}

        records = self.metrics.image_records()
        rec_u = np.array([of_image[r["id"]] for r in records], dtype=np.int64)
        k = self.num_classes
        if {"dice", "miou"} & set(point):
            conf = np.zeros((n_u, k * k))
            np.add.at(conf, rec_u, np.stack([r["confusion"].ravel() for r in records]).astype(np.float64))
            pm = [pixel_metrics(c.reshape(k, k)) for c in w @ conf]
            for key in ("dice", "miou"):
                if key in point:
                    samples[key] = np.array([m[key] for m in pm])
        for key in ("hd95", "surface_dice"):
            if key in point:
                vals = [v for r in records for v in r[key]]
                owner = np.array([u for r, u in zip(records, rec_u) for _ in r[key]], dtype=np.int64)
                samples[key] = ratio_samples(*unit_sums(vals, owner, n_u), w)
        if "fp_per_image" in point:
            fp = np.bincount(rec_u, weights=[r["false_positives"] for r in records], minlength=n_u)
            samples["fp_per_image"] = ratio_samples(fp, np.bincount(rec_u, minlength=n_u).astype(float), w)

        rows = self.lesion_rows()
        row_u = np.array([of_image[str(r["image_id"])] for r in rows], dtype=np.int64)
        for key, col in _ROW_MEANS.items():
            if key in point and rows:
                vals = [np.nan if r.get(col) is None else float(r[col]) for r in rows]
                samples[key] = ratio_samples(*unit_sums(vals, row_u, n_u), w)

        froc_keys = [key for key in _FROC_CI_KEYS if key in point]
        if self.froc is not None and froc_keys:
            les = self.froc.lesion_scores()
            fps = self.froc.false_positives()
            ls = np.array([s for _, _, s in les])
            fs = np.array([s for _, s in fps])
            lu = np.array([of_image[i] for i, _, _ in les], dtype=np.int64)
            fu = np.array([of_image[i] for i, _ in fps], dtype=np.int64)
            iu = np.array([of_image[i] for i in self.froc.images()], dtype=np.int64)
            per = {key: np.full(b, np.nan) for key in froc_keys}
            for j in range(b):
                summary = froc_summary(froc_curve(ls, fs, float(w[j][iu].sum()), w[j][lu], w[j][fu]))
                for key in froc_keys:
                    per[key][j] = summary.get(key, np.nan)
            samples.update(per)

        bounds = {}
        for key, s in samples.items():
            iv = percentile_interval(s, level)
            if iv is not None:
                bounds[key] = iv
        return Intervals(kind, n_u, b, seed, level, bounds)
