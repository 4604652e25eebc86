"""The lesion-ROI protocol: each annotated lesion scored inside a crop around its box.

Whole-slice lesion metrics (:class:`medseg.metrics.lesion.LesionMetrics`) mix two things: how well a
lesion is outlined and whether false-positive components appear elsewhere on the slice. The
DeepLesion segmentation literature — weakly-supervised RECIST-slice segmentation (Cai et al., MICCAI
2018, "Accurate weakly-supervised deep lesion segmentation using large-scale clinical annotations:
slice-propagated 3D mask generation from 2D RECIST"; Agarwal et al., 2020, co-segmentation; Tang
et al., MICCAI 2021, PDNet) — instead scores every annotated lesion inside a 2-D crop around its
RECIST box, the protocol behind its published Dice and diameter errors. This module adds that
protocol beside the whole-slice one (keys ``roi_…``):

* **Box** — DeepLesion's ``Bounding_boxes`` (``meta["lesions"][i]["bbox"]``: the RECIST extent
  padded by 5 px, in the sample's pixels, scaled like the other coordinates when the dataset
  resamples); for other data, or when that box holds less than half of the lesion's true mask
  (a mislabelled row), the true component's tight box.
* **Crop** — the box enlarged on each side by ``metrics.roi_margin`` × its width (left/right) and
  height (top/bottom), cut at the image border (never padded). Those papers crop the lesion with
  context proportional to its size before segmenting it; the exact padding differs between them
  and could not be checked for each paper here, so medseg's default 0.5 — a crop twice the box in
  each direction, i.e. the lesion plus as much context again — is our choice, stated in every run's
  config; set ``metrics.roi_margin`` to reproduce a particular paper's crop.
* **Score** — every predicted foreground pixel inside the crop against that lesion's true mask
  inside the crop: Dice, IoU, HD95 and surface Dice (mm). Predicted pixels on *another* true
  lesion in the same crop count as false positives (``roi_other_lesions: background``, the
  single-lesion crop protocol) or are left out (``ignore``).
* **RECIST** — long / short axis (:func:`medseg.lesion.measure_recist`) of the largest predicted
  component in the crop, against the axes measured on the lesion's whole true mask
  (``roi_long_error_mm`` …, as the whole-slice ``diameter_error_mm``) and, where the data has
  them, the annotated RECIST diameters (``roi_recist_…``); mm error and ULS23 SAPE.

A lesion with no predicted pixel in its crop scores Dice / IoU / surface Dice 0, SAPE 1 and HD95
``inf`` (left out of the HD95 mean, counted in ``roi_empty``); its diameter errors are undefined.

Example:
    >>> roi = RoiLesionMetrics(margin=0.5)
    >>> roi.update(pred_mask, true_instance, spacing=(0.8, 0.8), meta=sample["meta"])
    >>> roi.compute()["roi_dice"]
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from medseg.lesion import axes_mm, measure_recist
from medseg.metrics.boundary import boundary_metrics
from medseg.metrics.keys import ROI_GROUPED_KEYS
from medseg.metrics.lesion import finite_mean, recist_mm, sape, type_name
from medseg.metrics.matching import SIZE_STRATA, label_components, size_stratum
from medseg.metrics.pixel import mask2d
from medseg.runtime import gather_objects

__all__ = ["RoiLesionMetrics", "lesion_box", "roi_window", "score_roi"]

OtherLesions = Literal["background", "ignore"]
#: a DeepLesion box is used when at least this share of the lesion's true pixels lies inside it
_BOX_MIN_COVER = 0.5


def roi_window(box: Sequence[float], margin: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the crop around ``box``, cut at the image border.

    Args:
        box: ``(x1, y1, x2, y2)``, 0-based pixel coordinates of the first and last pixel covered
            (inclusive; fractional values allowed, as in DeepLesion's ``Bounding_boxes``).
        margin: added on each side, as a fraction of the box's extent ``x2 − x1 + 1`` (resp. y).
        shape: ``(H, W)`` of the image.

    Returns:
        ``(rows, cols)`` slices: pixel ``(r, c)`` is in the crop when its centre lies inside the
        enlarged box. Empty slices when the box lies outside the image.
    """
    if margin < 0:
        raise ValueError(f"metrics.roi_margin must be >= 0, got {margin}")
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = margin * (x2 - x1 + 1.0), margin * (y2 - y1 + 1.0)
    eps = 1e-6  # coordinates that are whole numbers up to float noise stay whole
    c0 = max(math.ceil(x1 - mx - eps), 0)
    c1 = min(math.floor(x2 + mx + eps), shape[1] - 1)
    r0 = max(math.ceil(y1 - my - eps), 0)
    r1 = min(math.floor(y2 + my + eps), shape[0] - 1)
    return slice(r0, max(r1 + 1, r0)), slice(c0, max(c1 + 1, c0))


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` of a non-empty mask's pixels (inclusive)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


def lesion_box(true_mask: np.ndarray, lesion: Mapping[str, Any] | None = None) -> tuple[tuple[float, ...], str]:
    """The box a lesion's ROI is built on, and where it came from (``"bbox"`` or ``"mask"``).

    ``lesion["bbox"]`` (DeepLesion) when it covers at least half of ``true_mask``'s pixels, else
    the mask's own tight box.
    """
    if lesion is not None and lesion.get("bbox") is not None and true_mask.any():
        box = tuple(float(v) for v in lesion["bbox"])
        rows, cols = roi_window(box, 0.0, true_mask.shape)
        if true_mask[rows, cols].sum() >= _BOX_MIN_COVER * true_mask.sum():
            return box, "bbox"
    return _mask_box(true_mask), "mask"


def _largest_component(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The largest connected component of a bool mask (empty stays empty)."""
    if not mask.any():
        return mask
    comps = label_components(mask, connectivity)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    return comps == int(np.argmax(sizes))


def score_roi(
    pred: np.ndarray,
    true: np.ndarray,
    window: tuple[slice, slice],
    spacing: Sequence[float] = (1.0, 1.0),
    others: np.ndarray | None = None,
    nsd_tolerance_mm: float = 2.0,
    connectivity: int = 2,
    other_lesions: OtherLesions = "background",
) -> dict[str, float]:
    """Score the predicted foreground inside one lesion's crop against that lesion's true mask.

    Args:
        pred: ``(H, W)`` bool, every predicted lesion pixel of the image.
        true: ``(H, W)`` bool, this lesion's true mask.
        window: the crop (:func:`roi_window`).
        spacing: ``(sy, sx)`` mm per pixel.
        others: ``(H, W)`` bool, the image's other true lesions (used with ``"ignore"``).
        nsd_tolerance_mm: surface-Dice tolerance.
        connectivity: of the predicted components (the largest one is measured).
        other_lesions: ``"background"`` or ``"ignore"`` (see the module docstring).

    Returns:
        ``roi_dice``, ``roi_iou``, ``roi_hd95`` (mm; ``inf`` with no prediction in the crop),
        ``roi_surface_dice``, ``roi_pred_long_mm``, ``roi_pred_short_mm`` (NaN without a
        prediction), ``roi_pred_px``, ``roi_true_px`` and ``roi_truth_clipped_px`` (true pixels
        outside the crop).
    """
    p = pred[window].astype(bool)
    t = true[window].astype(bool)
    if other_lesions == "ignore" and others is not None:
        p = p & ~others[window]
    elif other_lesions not in ("background", "ignore"):
        raise ValueError(f"metrics.roi_other_lesions must be background or ignore, got {other_lesions!r}")
    inter, ps, ts = float((p & t).sum()), float(p.sum()), float(t.sum())
    hd, nsd = boundary_metrics(p, t, spacing, tolerance_mm=nsd_tolerance_mm) if p.size else (math.inf, 0.0)
    if ps:
        ax = measure_recist(_largest_component(p, connectivity))
        p_long, p_short = axes_mm(ax, spacing)  # type: ignore[arg-type]
    else:
        p_long = p_short = math.nan
    return {
        "roi_dice": 2 * inter / (ps + ts) if ps + ts else 1.0,
        "roi_iou": inter / (ps + ts - inter) if ps + ts else 1.0,
        "roi_hd95": hd,
        "roi_surface_dice": nsd,
        "roi_pred_long_mm": p_long,
        "roi_pred_short_mm": p_short,
        "roi_pred_px": ps,
        "roi_true_px": ts,
        "roi_truth_clipped_px": float(true.sum()) - ts,
    }


def _middle_channel(image: Any) -> np.ndarray | None:
    """The key slice ``(H, W)`` of a ``(C, H, W)`` image (None when no image was given)."""
    if image is None:
        return None
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    return a[a.shape[0] // 2] if a.ndim == 3 else a


class RoiLesionMetrics:
    """The lesion-ROI protocol accumulated over images (``update`` / ``compute`` / ``reset``).

    Args:
        margin: ``metrics.roi_margin``.
        other_lesions: ``metrics.roi_other_lesions``.
        nsd_tolerance_mm: surface-Dice tolerance.
        connectivity: predicted components, 2 = 8-connected.
        keep_worst: keep crops of this many lowest-Dice lesions for an overlay figure.
    """

    def __init__(self, margin: float = 0.5, other_lesions: OtherLesions = "background",
                 nsd_tolerance_mm: float = 2.0, connectivity: int = 2, keep_worst: int = 0) -> None:
        if margin < 0:
            raise ValueError(f"metrics.roi_margin must be >= 0, got {margin}")
        if other_lesions not in ("background", "ignore"):
            raise ValueError(f"metrics.roi_other_lesions must be background or ignore, got {other_lesions!r}")
        self.margin = margin
        self.other_lesions: OtherLesions = other_lesions
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.connectivity = connectivity
        self.keep_worst = keep_worst
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._rows: list[dict[str, Any]] = []
        self._worst: list[tuple[float, int, dict[str, Any]]] = []  # a max-heap on Dice via negation

    def update(self, pred_mask: Any, true_instance: Any, spacing: Sequence[float] = (1.0, 1.0),
               meta: Mapping[str, Any] | None = None, image: Any = None) -> None:
        """Add one image.

        Args:
            pred_mask: ``(H, W)`` predicted class map or mask; non-zero = lesion.
            true_instance: ``(H, W)`` true instance map (lesion ``i`` of ``meta["lesions"]`` has id ``i + 1``).
            spacing: ``(sy, sx)`` mm per pixel.
            meta: ``id``; ``lesions`` with ``bbox``, ``coords`` and ``type`` where the data has them.
            image: ``(C, H, W)`` the input, for the worst-lesion crops (only with ``keep_worst``).
        """
        meta = meta or {}
        pred = mask2d(pred_mask, "pred_mask") != 0
        true = mask2d(true_instance, "true_instance").astype(np.int64)
        if pred.shape != true.shape:
            raise ValueError(f"pred_mask {pred.shape} and true_instance {true.shape} differ in shape")
        image_id = str(meta.get("id", f"image{len(self._rows)}"))
        lesions = meta.get("lesions") or []
        key_slice = _middle_channel(image) if self.keep_worst else None
        for tid in np.unique(true[true > 0]).tolist():
            t_mask = true == tid
            info = lesions[tid - 1] if 0 < tid <= len(lesions) and isinstance(lesions[tid - 1], Mapping) else {}
            box, source = lesion_box(t_mask, info)
            window = roi_window(box, self.margin, true.shape)
            s = score_roi(pred, t_mask, window, spacing, (true > 0) & ~t_mask, self.nsd_tolerance_mm,
                          self.connectivity, self.other_lesions)
            t_long, t_short = axes_mm(measure_recist(t_mask), spacing)  # type: ignore[arg-type]
            r_long, r_short = recist_mm(info, spacing) if "coords" in info else (math.nan, math.nan)
            p_long, p_short, hit = s["roi_pred_long_mm"], s["roi_pred_short_mm"], s["roi_pred_px"] > 0
            row = {
                "image_id": image_id,
                "lesion_id": int(tid),
                "lesion_type": info.get("type"),
                "size_stratum": size_stratum(t_long),
                # the crop, inclusive pixel coordinates
                "roi_x0": window[1].start, "roi_y0": window[0].start,
                "roi_x1": window[1].stop - 1, "roi_y1": window[0].stop - 1,
                "roi_box_source": source,
                **s,
                "roi_long_error_mm": abs(p_long - t_long) if hit else math.nan,
                "roi_short_error_mm": abs(p_short - t_short) if hit else math.nan,
                "roi_sape_long": sape(p_long, t_long) if hit else 1.0,
                "roi_sape_short": sape(p_short, t_short) if hit else 1.0,
                "roi_recist_long_error_mm": abs(p_long - r_long) if hit else math.nan,
                "roi_recist_short_error_mm": abs(p_short - r_short) if hit else math.nan,
                "roi_recist_sape_long": (sape(p_long, r_long) if hit else 1.0) if math.isfinite(r_long) else math.nan,
                "roi_recist_sape_short": (sape(p_short, r_short) if hit else 1.0) if math.isfinite(r_short)
                else math.nan,
            }
            self._rows.append(row)
            if self.keep_worst:
                self._keep(row, key_slice, pred, t_mask, window)

    def _keep(self, row: dict[str, Any], key_slice: np.ndarray | None, pred: np.ndarray, true: np.ndarray,
              window: tuple[slice, slice]) -> None:
        """Keep this lesion's crop when it is among the ``keep_worst`` lowest ROI Dice so far."""
        item = (-row["roi_dice"], len(self._rows), {})
        if len(self._worst) >= self.keep_worst and item[0] <= self._worst[0][0]:
            return
        # a little context beyond the crop makes the picture readable
        r, c = window
        ctx = max(4, (r.stop - r.start) // 4)
        big = (slice(max(r.start - ctx, 0), r.stop + ctx), slice(max(c.start - ctx, 0), c.stop + ctx))
        item[2].update({
            "image": key_slice[big].astype(np.float32) if key_slice is not None else None,
            "truth": true[big].copy(), "pred": pred[big].copy(),
            "box": (c.start - big[1].start, r.start - big[0].start, c.stop - big[1].start, r.stop - big[0].start),
            "title": f"{row['image_id']} #{row['lesion_id']}", "dice": row["roi_dice"],
        })
        if len(self._worst) < self.keep_worst:
            heapq.heappush(self._worst, item)
        else:
            heapq.heapreplace(self._worst, item)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per true lesion: ``image_id``, ``lesion_id``, group columns and the ``roi_*`` values."""
        return [dict(r) for r in self._rows]

    def worst(self) -> list[dict[str, Any]]:
        """The kept crops, lowest ROI Dice first: ``image``, ``truth``, ``pred``, ``box``, ``title``, ``dice``."""
        return [w[2] for w in sorted(self._worst, key=lambda w: (-w[0], w[1]))]

    def reduce_across_ranks(self) -> None:
        """Gather every rank's rows and kept crops; a no-op outside DDP."""
        parts = gather_objects((self._rows, self._worst))
        if len(parts) == 1:
            return
        self._rows = [r for p in parts for r in p[0]]
        merged = sorted((w for p in parts for w in p[1]), key=lambda w: w[0], reverse=True)[: self.keep_worst]
        # renumber: the tie-breaking counters of different ranks may collide
        self._worst = [(w[0], i, w[2]) for i, w in enumerate(merged)]
        heapq.heapify(self._worst)

    def compute(self) -> dict[str, float]:
        """Means over lesions (keys present only where defined, never NaN).

        ``roi_dice``, ``roi_iou``, ``roi_surface_dice``, ``roi_sape_long``, ``roi_sape_short``: all
        lesions; ``roi_hd95``, ``roi_long_error_mm``, ``roi_short_error_mm``: lesions with a
        prediction in their crop; ``roi_recist_*``: lesions with annotated RECIST diameters;
        ``roi_empty``: lesions without any predicted pixel in their crop. Per size stratum and
        per lesion type: ``roi_dice_<group>``, ``roi_iou_<group>``, ``roi_long_error_mm_<group>``,
        ``roi_sape_long_<group>``.
        """
        rows = self._rows
        if not rows:
            return {}
        out: dict[str, float] = {"roi_empty": float(sum(r["roi_pred_px"] == 0 for r in rows))}
        for key in ("roi_dice", "roi_iou", "roi_hd95", "roi_surface_dice", "roi_long_error_mm", "roi_short_error_mm",
                    "roi_sape_long", "roi_sape_short", "roi_recist_long_error_mm", "roi_recist_short_error_mm",
                    "roi_recist_sape_long", "roi_recist_sape_short"):
            v = finite_mean([r[key] for r in rows])
            if v is not None:
                out[key] = v
        groups: list[tuple[str, list[dict[str, Any]]]] = [
            (g, [r for r in rows if r["size_stratum"] == g]) for g in SIZE_STRATA]
        types = sorted({type_name(r["lesion_type"]) for r in rows} - {None})  # type: ignore[type-var]
        groups += [(t, [r for r in rows if type_name(r["lesion_type"]) == t]) for t in types]  # type: ignore[misc]
        for g, sub in groups:
            for key in ROI_GROUPED_KEYS:
                v = finite_mean([r[key] for r in sub]) if sub else None
                if v is not None:
                    out[f"{key}_{g}"] = v
        return out
