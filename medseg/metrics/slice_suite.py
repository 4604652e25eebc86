"""Everything the Trainer's validation reports on whole slices, fed one batch at a time.

:class:`MetricSuite` bundles the three layers of the package: pixel metrics from a
:class:`~medseg.metrics.pixel.ConfusionMatrix`, boundary metrics (:func:`~medseg.metrics.boundary.boundary_metrics`)
per image and foreground class, and the whole-slice lesion metrics
(:class:`~medseg.metrics.lesion.LesionMetrics`). One ``update`` per batch; ``compute`` gives one
flat ``dict[str, float]`` for MLflow, :meth:`MetricSuite.lesion_rows` the per-lesion CSV and
:meth:`MetricSuite.image_records` what :class:`medseg.metrics.suite.EvaluationSuite` resamples.

Example:
    >>> suite = MetricSuite(num_classes=2)
    >>> suite.update(pred, label, instance, [m["spacing"] for m in metas], metas)  # (B, H, W) each
    >>> suite.compute()["dice"], suite.compute()["lesion_sensitivity"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.metrics.boundary import boundary_metrics
from medseg.metrics.lesion import LesionMetrics
from medseg.metrics.matching import MatchRule, label_components
from medseg.metrics.pixel import ArrayLike, ConfusionMatrix, to_numpy
from medseg.runtime import dist_ready, gather_objects

__all__ = ["MetricSuite"]


class MetricSuite:
    """Everything the Trainer and ``evaluate`` report, fed one batch at a time.

    Pixel metrics come from a :class:`ConfusionMatrix`; boundary metrics (HD95, surface Dice) are
    computed per image and foreground class and averaged over the (image, class) pairs where both
    truth and prediction are non-empty (``hd95_one_empty`` counts the pairs where exactly one is);
    lesion metrics come from :class:`LesionMetrics`.

    Args:
        num_classes: K, including background.
        lesion_metrics: also run the per-lesion evaluation.
        match_rule: lesion matching rule (``"overlap"`` or ``"iou"``, see :func:`match_lesions`).
        iou_threshold: IoU needed under ``"iou"``.
        nsd_tolerance_mm: surface Dice tolerance in mm.
        min_overlap_px: shared pixels needed under ``"overlap"``.
        connectivity: 2 = 8-connected predicted components, 1 = 4-connected.

    :meth:`from_config` builds one from the ``metrics`` config section, the protocol a run states.

    Example:
        >>> suite = MetricSuite(2)
        >>> for batch in loader:
        ...     suite.update(pred, batch["label"], batch["instance"],
        ...                  [m["spacing"] for m in batch["meta"]], batch["meta"])
        >>> metrics, rows = suite.compute(), suite.lesion_rows()
    """

    def __init__(
        self,
        num_classes: int,
        lesion_metrics: bool = True,
        match_rule: MatchRule = "overlap",
        iou_threshold: float = 0.5,
        nsd_tolerance_mm: float = 2.0,
        min_overlap_px: int = 1,
        connectivity: int = 2,
    ) -> None:
        self.num_classes = num_classes
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.confusion = ConfusionMatrix(num_classes)
        self.lesions = (LesionMetrics(match_rule, iou_threshold, min_overlap_px, connectivity)
                        if lesion_metrics else None)
        self._hd: list[float] = []
        self._nsd: list[float] = []
        self._one_empty = 0
        #: per image: (id, its (K, K) confusion matrix, its HD95 and surface-Dice values)
        self._images: list[tuple[str, np.ndarray, list[float], list[float]]] = []

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> MetricSuite:
        """The suite for a :class:`medseg.config.MetricsConfig` (``cfg.metrics``)."""
        if cfg.connectivity not in (1, 2):
            raise ValueError(f"metrics.connectivity must be 1 or 2, got {cfg.connectivity}")
        return cls(num_classes, cfg.lesion_metrics, cfg.match_rule, cfg.iou_threshold, cfg.nsd_tolerance_mm,
                   cfg.min_overlap_px, cfg.connectivity)

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.confusion.reset()
        if self.lesions is not None:
            self.lesions.reset()
        self._hd, self._nsd, self._one_empty = [], [], 0
        self._images = []

    def update(
        self,
        pred: ArrayLike,
        label: ArrayLike,
        instance: ArrayLike | None = None,
        spacing: Sequence[Sequence[float]] | None = None,
        meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred: ``(B, H, W)`` (or ``(B, 1, H, W)``) predicted class ids.
            label: ``(B, H, W)`` (or ``(B, 1, H, W)``) true class ids.
            instance: ``(B, H, W)`` (or ``(B, 1, H, W)``) true instance map; ``None`` takes the
                connected components of ``label > 0`` as the lesions.
            spacing: per image ``(sy, sx)`` mm/px; ``None`` uses ``meta[b]["spacing"]`` or 1 mm.
            meta: per image meta dicts (``id``, ``lesions``, ...).
        """
        p = self._batch(pred, "pred")
        y = self._batch(label, "label")
        if p.shape != y.shape:
            raise ValueError(f"pred {p.shape} and label {y.shape} differ in shape")
        inst = self._batch(instance, "instance") if instance is not None else None
        if inst is not None and inst.shape != y.shape:
            raise ValueError(f"instance {inst.shape} and label {y.shape} differ in shape")
        self.confusion.update(p, y)
        metas = list(meta) if meta is not None else [{}] * len(p)
        k = self.num_classes
        for b in range(len(p)):
            sp = spacing[b] if spacing is not None else metas[b].get("spacing", (1.0, 1.0))
            hds: list[float] = []
            nsds: list[float] = []
            for c in range(1, self.num_classes):
                pc, yc = p[b] == c, y[b] == c
                if not pc.any() and not yc.any():
                    continue
                hd, nsd = boundary_metrics(pc, yc, sp, tolerance_mm=self.nsd_tolerance_mm)
                if math.isfinite(hd):
                    hds.append(hd)
                    nsds.append(nsd)
                else:
                    self._one_empty += 1
            self._hd += hds
            self._nsd += nsds
            valid = (y[b] >= 0) & (y[b] < k)
            conf = np.bincount(y[b][valid] * k + p[b][valid], minlength=k * k).reshape(k, k)
            self._images.append((str(metas[b].get("id", f"image{len(self._images)}")), conf, hds, nsds))
            if self.lesions is not None:
                true_inst = inst[b] if inst is not None else label_components(y[b] > 0, self.lesions.connectivity)
                self.lesions.update(p[b], true_inst, sp, metas[b])

    @staticmethod
    def _batch(x: ArrayLike, name: str) -> np.ndarray:
        """A ``(B, H, W)`` int64 array from ``(B, H, W)`` or ``(B, 1, H, W)``."""
        a = to_numpy(x)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3:
            raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {a.shape}")
        return a.astype(np.int64, copy=False)

    def reduce_across_ranks(self) -> None:
        """Combine every rank's state (call before :meth:`compute` in DDP); a no-op otherwise."""
        if not dist_ready():
            return
        self.confusion.reduce_across_ranks()
        if self.lesions is not None:
            self.lesions.reduce_across_ranks()
        parts = gather_objects((self._hd, self._nsd, self._one_empty, self._images))
        self._hd = [v for p in parts for v in p[0]]
        self._nsd = [v for p in parts for v in p[1]]
        self._one_empty = sum(p[2] for p in parts)
        self._images = [v for p in parts for v in p[3]]

    def image_records(self) -> list[dict[str, Any]]:
        """Per image, in update order: ``id``, ``confusion`` ``(K, K)``, ``hd95`` and ``surface_dice``
        (lists over its foreground classes with both masks non-empty) and ``false_positives``
        (unmatched predicted components; 0 without lesion metrics). What
        :class:`medseg.metrics.suite.EvaluationSuite` resamples for confidence intervals."""
        fps = dict(self.lesions.image_false_positives()) if self.lesions is not None else {}
        return [{"id": i, "confusion": c, "hd95": list(h), "surface_dice": list(n), "false_positives": fps.get(i, 0)}
                for i, c, h, n in self._images]

    def compute(self) -> dict[str, float]:
        """A flat dict of floats: pixel metrics, ``hd95``, ``surface_dice``, ``hd95_one_empty`` and
        the :meth:`LesionMetrics.compute` keys (absent where undefined, never NaN)."""
        out = self.confusion.compute()
        if self._hd:
            out["hd95"] = float(np.mean(self._hd))
            out["surface_dice"] = float(np.mean(self._nsd))
        out["hd95_one_empty"] = float(self._one_empty)
        if self.lesions is not None:
            out.update(self.lesions.compute())
        return out

    def lesion_rows(self) -> list[dict[str, Any]]:
        """The per-lesion rows (see :meth:`LesionMetrics.rows`); empty without lesion metrics."""
        return self.lesions.rows() if self.lesions is not None else []
