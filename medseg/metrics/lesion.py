"""Segmentation metrics: pixel confusion metrics, boundary distances and per-lesion evaluation.

Three layers, each an accumulator with ``update`` / ``compute`` / ``reset`` (plus
``reduce_across_ranks`` for multi-GPU validation):

* :class:`ConfusionMatrix` — PA, MPA, MIoU, FWIoU (definitions in the design notes: ``p_ij`` = pixels
  of class i predicted as j) and Dice per class, from one ``torch.bincount`` per batch.
* :func:`hd95` / :func:`surface_dice` — boundary metrics in mm between two binary masks.
* :func:`match_lesions` / :class:`LesionMetrics` — connected components of the prediction matched
  to the true lesions by an explicit rule; per-lesion Dice, HD95, RECIST diameters and ULS23 SAPE,
  detection sensitivity and false positives per image, stratified by size and lesion type.

:class:`MetricSuite` bundles them for the Trainer and ``evaluate``: one ``update`` per batch, one
flat ``dict[str, float]`` for MLflow, and :meth:`MetricSuite.lesion_rows` for the per-lesion CSV.
The lesion-ROI protocol (:mod:`medseg.lesion_eval`), FROC (:mod:`medseg.froc`) and the bootstrap
intervals (:mod:`medseg.eval_suite`) build on this module; their key names are listed here
(:data:`ROI_KEYS`, :func:`froc_key`, :func:`metric_names`) so that ``train.monitor`` can be checked.

Example:
    >>> suite = MetricSuite(num_classes=2)
    >>> suite.update(pred, label, instance, [m["spacing"] for m in metas], metas)  # (B, H, W) each
    >>> suite.compute()["dice"], suite.compute()["lesion_sensitivity"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.lesion import COARSE_LESION_TYPES, axes_mm, measure_recist

__all__ = [
    "COARSE_LESION_TYPES",
    "FROC_FP_RATES",
    "FROC_KEYS",
    "ROI_GROUPED_KEYS",
    "ROI_KEYS",
    "SIZE_STRATA",
    "ConfusionMatrix",
    "LesionMatch",
    "LesionMetrics",
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

ArrayLike = np.ndarray | torch.Tensor
MatchRule = Literal["overlap", "iou"]

#: size strata of the true long axis, as in the literature: < 10 mm, 10–30 mm, > 30 mm
SIZE_STRATA: tuple[str, ...] = ("lt10", "10to30", "gt30")



def _numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy view/copy of a tensor or array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mask2d(x: ArrayLike, name: str) -> np.ndarray:
    """A 2-D array, dropping leading singleton axes (``(1, H, W)`` → ``(H, W)``)."""
    a = _numpy(x)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {a.shape}")
    return a


# ----------------------------------------------------------------------------- pixel metrics


def pixel_metrics(matrix: ArrayLike) -> dict[str, float]:
    """PA, MPA, MIoU, FWIoU and Dice from a ``(K, K)`` confusion matrix (rows true, columns predicted).

    With ``p_ij`` the pixels of class i predicted as j, ``t_i = Σ_j p_ij`` and ``s_i = Σ_j p_ji``:
    PA = Σ p_ii / Σ p_ij; MPA = mean_i p_ii / t_i; MIoU = mean_i p_ii / (t_i + s_i − p_ii);
    FWIoU = Σ_i t_i · IoU_i / Σ p_ij; Dice_i = 2 p_ii / (t_i + s_i).

    A class absent from both truth and prediction (t_i = s_i = 0) has no defined IoU or Dice: it is
    left out of the means, and its ``dice_class_<i>`` is reported as 1.0 (nothing to find, nothing
    found). MPA averages the classes present in the truth (t_i > 0; recall is undefined otherwise).
    ``"dice"`` is the mean Dice of the foreground classes 1..K−1 that are present (for K = 2 the
    lesion Dice); 1.0 when no foreground class is present anywhere.

    Returns:
        ``{"pa", "mpa", "miou", "fwiou", "dice", "dice_class_0", ..., "dice_class_<K-1>"}``.

    Raises:
        ValueError: an empty matrix (no pixels) or one that is not square.
    """
    p = _numpy(matrix).astype(np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"a confusion matrix is (K, K); got shape {p.shape}")
    n = p.sum()
    if n == 0:
        raise ValueError("the confusion matrix is empty: no pixels were accumulated (update() first)")
    k = p.shape[0]
    tp = np.diag(p)
    t = p.sum(1)
    s = p.sum(0)
    present = (t + s) > 0
    iou = np.divide(tp, t + s - tp, out=np.ones(k), where=present)
    dice = np.divide(2 * tp, t + s, out=np.ones(k), where=present)
    acc = np.divide(tp, t, out=np.zeros(k), where=t > 0)
    fg = present[1:]
    out = {
        "pa": float(tp.sum() / n),
        "mpa": float(acc[t > 0].mean()),
        "miou": float(iou[present].mean()),
        # t_i = 0 for an absent class, so its placeholder IoU carries no weight
        "fwiou": float((t * iou).sum() / n),
        "dice": float(dice[1:][fg].mean()) if fg.any() else 1.0,
    }
    out.update({f"dice_class_{i}": float(dice[i]) for i in range(k)})
    return out


def _dist_ready() -> bool:
    """True inside an initialised torch.distributed job."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank (just ``[obj]`` outside a distributed job)."""
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` pixel confusion matrix (rows true class, columns predicted).

    Args:
        num_classes: K, including the background class 0.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(pred, label)  # class ids, any equal shapes
        >>> cm.compute()["miou"]
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        self.num_classes = num_classes
        self._mat: torch.Tensor | None = None

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add a batch. ``pred`` and ``target`` are class ids of any (equal) shape.

        Target values outside ``[0, K)`` (e.g. an ignore index of 255) are skipped; a predicted id
        outside ``[0, K)`` is an error.
        """
        pred_t = torch.as_tensor(pred)
        target_t = torch.as_tensor(target, device=pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"pred {tuple(pred_t.shape)} and target {tuple(target_t.shape)} differ in shape")
        k = self.num_classes
        p = pred_t.reshape(-1).long()
        t = target_t.reshape(-1).long()
        if p.numel() == 0:
            return
        pmin, pmax = torch.aminmax(p)
        if pmin < 0 or pmax >= k:
            bad = (p < 0) | (p >= k)
            raise ValueError(f"pred holds class ids outside [0, {k}): {sorted(p[bad].unique().tolist())[:5]}")
        tmin, tmax = torch.aminmax(t)
        if tmin < 0 or tmax >= k:  # boolean indexing is slow: only when an ignore value is present
            valid = (t >= 0) & (t < k)
            t, p = t[valid], p[valid]
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self._mat is None:
            self._mat = counts
        else:
            self._mat += counts.to(self._mat.device)

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated ``(K, K)`` int64 matrix (zeros before any update)."""
        if self._mat is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self._mat.cpu().numpy().astype(np.int64)

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._mat = None

    def reduce_across_ranks(self) -> None:
        """Sum the matrix over all ranks (``torch.distributed.all_reduce``); a no-op outside DDP."""
        if not _dist_ready():
            return
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        nccl = torch.distributed.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        mat = torch.as_tensor(self.matrix, device=dev)
        torch.distributed.all_reduce(mat)
        self._mat = mat

    def compute(self) -> dict[str, float]:
        """The metrics of :func:`pixel_metrics` on the accumulated matrix."""
        return pixel_metrics(self.matrix)


# ----------------------------------------------------------------------------- boundary metrics


def _surface_distances(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each contour pixel of ``pred`` to ``true``'s contour, and back.

    Hand-written with SciPy rather than MONAI's ``get_edge_surface_distance``: the same contours
    (mask XOR its 4-connected erosion) and the same KD-tree query, but 3–4× faster on 512² slices
    (``benchmarks/bench_metrics.py`` measures both in one run), and this runs on every validation
    slice and every lesion.
    """
    # Crop to the union's bounding box: everything outside is background in both masks, so the
    # contours are unchanged (erosion treats the image border as background either way).
    union = pred | true
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    scale = np.array([float(spacing[0]), float(spacing[1])])
    edge = [np.argwhere(m & ~ndimage.binary_erosion(m)) * scale for m in (pred[box], true[box])]
    d_pt = cKDTree(edge[1]).query(edge[0])[0]
    d_tp = cKDTree(edge[0]).query(edge[1])[0]
    return d_pt, d_tp


def _binary_pair(pred_mask: ArrayLike, true_mask: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-shape 2-D bool masks (non-zero = inside)."""
    p = _mask2d(pred_mask, "pred_mask") != 0
    t = _mask2d(true_mask, "true_mask") != 0
    if p.shape != t.shape:
        raise ValueError(f"pred_mask {p.shape} and true_mask {t.shape} differ in shape")
    return p, t


def boundary_metrics(
    pred_mask: ArrayLike,
    true_mask: ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0),
    percentile: float = 95.0,
    tolerance_mm: float = 2.0,
) -> tuple[float, float]:
    """HD95 and surface Dice from one contour-distance computation (see :func:`hd95`, :func:`surface_dice`)."""
    p, t = _binary_pair(pred_mask, true_mask)
    if not p.any() and not t.any():
        return 0.0, 1.0
    if not p.any() or not t.any():
        return math.inf, 0.0
    d_pt, d_tp = _surface_distances(p, t, spacing)
    hd = max(float(np.percentile(d_pt, percentile)), float(np.percentile(d_tp, percentile)))
    nsd = float(((d_pt <= tolerance_mm).sum() + (d_tp <= tolerance_mm).sum()) / (d_pt.size + d_tp.size))
    return hd, nsd


def hd95(
    pred_mask: ArrayLike,
    true_mask: ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0),
    percentile: float = 95.0,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two masks' contours, in mm.

    The contour of a mask is its pixels with a 4-neighbour outside it (the mask XOR its erosion;
    outside the image counts as outside). For each contour pixel of one mask the distance to the
    nearest contour pixel of the other is taken (pixel centres, scaled by ``spacing``); HD95 is the
    larger of the two directed 95th percentiles (linear interpolation) — MONAI's
    ``compute_hausdorff_distance`` definition (medpy's ``hd95`` pools both directions before taking
    the percentile, which usually gives a slightly smaller value).

    Args:
        pred_mask: ``(H, W)`` mask, non-zero = inside.
        true_mask: ``(H, W)`` mask.
        spacing: ``(sy, sx)`` mm per pixel.
        percentile: 95 for HD95; 100 gives the classic Hausdorff distance.

    Returns:
        The distance in mm; 0.0 when both masks are empty; ``math.inf`` when exactly one is empty
        (there is no contour to measure to — averages such as :class:`MetricSuite`'s leave it out
        and count it separately).
    """
    return boundary_metrics(pred_mask, true_mask, spacing, percentile)[0]


def surface_dice(
    pred_mask: ArrayLike,
    true_mask: ArrayLike,
    tolerance_mm: float = 2.0,
    spacing: Sequence[float] = (1.0, 1.0),
) -> float:
    """Normalised surface Dice: the share of both contours within ``tolerance_mm`` of the other.

    ``(|{p ∈ ∂P : d(p, ∂T) ≤ τ}| + |{t ∈ ∂T : d(t, ∂P) ≤ τ}|) / (|∂P| + |∂T|)`` with the contours of
    :func:`hd95` (MONAI's ``compute_surface_dice`` definition without sub-voxel areas).

    Returns:
        A value in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    return boundary_metrics(pred_mask, true_mask, spacing, tolerance_mm=tolerance_mm)[1]


# ----------------------------------------------------------------------------- lesion matching


def label_components(mask: ArrayLike, connectivity: int = 2) -> np.ndarray:
    """Connected components of ``mask != 0`` as an ``(H, W)`` int32 map (0 = background, 1..N).

    ``connectivity`` 2 joins diagonal neighbours (8-connectivity), 1 only edge neighbours.
    """
    m = _mask2d(mask, "mask") != 0
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
    pi = _mask2d(pred_instances, "pred_instances").astype(np.int64)
    ti = _mask2d(true_instances, "true_instances").astype(np.int64)
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


# ----------------------------------------------------------------------------- per-lesion metrics


def size_stratum(long_mm: float) -> str:
    """The size stratum of a true long axis: ``"lt10"`` (< 10 mm), ``"10to30"`` (10–30 mm) or ``"gt30"``."""
    if long_mm < 10.0:
        return "lt10"
    return "10to30" if long_mm <= 30.0 else "gt30"


def _type_name(code: Any) -> str | None:
    """Metric-key name of a coarse lesion type code (None when unknown)."""
    if code is None:
        return None
    try:
        c = int(code)
    except (TypeError, ValueError):
        return None
    return COARSE_LESION_TYPES.get(c, f"type{c}")


def _sape(pred: float, true: float) -> float:
    """ULS23 symmetric absolute percentage error ``|p − g| / (|g| + |p|)`` (0 when both are 0)."""
    den = abs(true) + abs(pred)
    return abs(pred - true) / den if den > 0 else 0.0


def _recist_mm(lesion: Mapping[str, Any], spacing: Sequence[float]) -> tuple[float, float]:
    """Annotated long/short axes (mm) from 8 RECIST coordinates ``x1,y1,x2,y2,x3,y3,x4,y4`` (px)."""
    c = np.asarray(lesion["coords"], dtype=np.float64).reshape(4, 2)
    scale = np.array([float(spacing[1]), float(spacing[0])])  # (x, y) ← (sx, sy)
    return (float(np.linalg.norm((c[1] - c[0]) * scale)), float(np.linalg.norm((c[3] - c[2]) * scale)))


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values, or None when there are none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else None


class LesionMetrics:
    """Per-lesion evaluation accumulated over images.

    For each image, the predicted mask's connected components are matched to the true lesions with
    :func:`match_lesions`. A lesion's predicted mask is the union of its matched components (a
    merged component counts whole for each lesion it touches, so merges cost Dice). Diameters are
    measured with :func:`medseg.measure.measure_recist` on both the true and the predicted mask
    (so the error isolates the segmentation). Where ``meta["lesions"][id - 1]`` (lesion ``i`` of
    the row order has instance id ``i + 1``, as :func:`medseg.data.recist.recist_to_masks` assigns)
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
        pred = _mask2d(pred_mask, "pred_mask")
        true = _mask2d(true_instance, "true_instance").astype(np.int64)
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
            p_mask = np.isin(comps, pids) if len(pids) else np.zeros_like(t_mask)
            detected = bool(len(pids))
            inter = float(np.logical_and(t_mask, p_mask).sum())
            t_area, p_area = float(t_mask.sum()), float(p_mask.sum())
            t_long, t_short = axes_mm(measure_recist(t_mask), spacing)  # type: ignore[arg-type]
            if detected:
                p_long, p_short = axes_mm(measure_recist(p_mask), spacing)  # type: ignore[arg-type]
            else:
                p_long = p_short = math.nan
            info = lesions[tid - 1] if 0 < tid <= len(lesions) and isinstance(lesions[tid - 1], Mapping) else {}
            r_long, r_short = _recist_mm(info, spacing) if "coords" in info else (math.nan, math.nan)
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
                    "sape_long": _sape(p_long, t_long) if detected else 1.0,
                    "sape_short": _sape(p_short, t_short) if detected else 1.0,
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
        if not _dist_ready():
            return
        parts = _gather_objects((self._rows, self._n_images, self._n_fp, self._n_merges, self._image_fp))
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
            "lesion_hd95": _mean([r["hd95_mm"] for r in self._rows if r["detected"]]),
            "short_axis_error_mm": _mean([r["short_error_mm"] for r in self._rows]),
            "sape_short": _mean([r["sape_short"] for r in self._rows]),
            "recist_diameter_error_mm": _mean([r["recist_long_error_mm"] for r in self._rows]),
        }
        out.update({k: v for k, v in extra.items() if v is not None})
        for name in SIZE_STRATA:
            out.update(self._summary([r for r in self._rows if r["size_stratum"] == name], f"_{name}"))
        types = {_type_name(r["lesion_type"]) for r in self._rows} - {None}
        for tname in sorted(types):  # type: ignore[type-var]
            out.update(self._summary([r for r in self._rows if _type_name(r["lesion_type"]) == tname], f"_{tname}"))
        return out

    @staticmethod
    def _summary(rows: list[dict[str, Any]], suffix: str) -> dict[str, float]:
        """Count, Dice, sensitivity, long-axis error and SAPE of a group of rows."""
        if not rows:
            return {}
        vals = {
            "lesion_count": float(len(rows)),
            "lesion_dice": _mean([r["dice"] for r in rows]),
            "lesion_sensitivity": float(np.mean([r["detected"] for r in rows])),
            "diameter_error_mm": _mean([r["long_error_mm"] for r in rows]),
            "sape_long": _mean([r["sape_long"] for r in rows]),
        }
        return {k + suffix: v for k, v in vals.items() if v is not None}


# ----------------------------------------------------------------------------- the suite

#: the lesion keys that are also reported per size stratum and per lesion type (``<key>_<group>``)
_GROUPED_LESION_KEYS = ("lesion_count", "lesion_dice", "lesion_sensitivity", "diameter_error_mm", "sape_long")
_LESION_KEYS = ("lesion_count", "fp_per_image", "lesion_merges", "lesion_dice", "lesion_sensitivity",
                "diameter_error_mm", "sape_long", "lesion_hd95", "short_axis_error_mm", "sape_short",
                "recist_diameter_error_mm")


#: the lesion-ROI protocol's keys (:class:`medseg.lesion_eval.RoiLesionMetrics`)
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


#: the FROC keys besides the per-rate sensitivities (:class:`medseg.froc.FrocMetrics`)
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
        names += list(_LESION_KEYS)
        groups = list(SIZE_STRATA) + sorted(set(COARSE_LESION_TYPES.values()))
        names += [f"{k}_{g}" for g in groups for k in _GROUPED_LESION_KEYS]
        if roi:
            names += list(ROI_KEYS) + [f"{k}_{g}" for g in groups for k in ROI_GROUPED_KEYS]
        if froc:
            names += [froc_key(r) for r in FROC_FP_RATES] + list(FROC_KEYS)
    return names



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
        a = _numpy(x)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3:
            raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {a.shape}")
        return a.astype(np.int64, copy=False)

    def reduce_across_ranks(self) -> None:
        """Combine every rank's state (call before :meth:`compute` in DDP); a no-op otherwise."""
        if not _dist_ready():
            return
        self.confusion.reduce_across_ranks()
        if self.lesions is not None:
            self.lesions.reduce_across_ranks()
        parts = _gather_objects((self._hd, self._nsd, self._one_empty, self._images))
        self._hd = [v for p in parts for v in p[0]]
        self._nsd = [v for p in parts for v in p[1]]
        self._one_empty = sum(p[2] for p in parts)
        self._images = [v for p in parts for v in p[3]]

    def image_records(self) -> list[dict[str, Any]]:
        """Per image, in update order: ``id``, ``confusion`` ``(K, K)``, ``hd95`` and ``surface_dice``
        (lists over its foreground classes with both masks non-empty) and ``false_positives``
        (unmatched predicted components; 0 without lesion metrics). What
        :class:`medseg.eval_suite.EvaluationSuite` resamples for confidence intervals."""
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
