"""From RECIST marks to pixel masks: the MULAN ellipse and GrabCut refinement.

DeepLesion has no pixel masks; each lesion has a RECIST long and short diameter (8 coordinates,
``x1, y1, x2, y2`` long axis then ``x3, y3, x4, y4`` short axis, 0-based pixels here) and a box.

* :func:`ellipse_mask` — MULAN's pseudo-mask: four quarter-ellipse arcs around the diameters'
  intersection joining the endpoints in the order long-1, short-1, long-2, short-2.
* :func:`grabcut_mask` — Cai et al. (MICCAI 2018): GrabCut initialised from the ellipse, keeping the
  candidate whose measured axes best match the RECIST diameters; the ellipse is the fallback.
* :func:`recist_to_masks` — every lesion of a slice → a class mask and an instance map.

Example:
    >>> import numpy as np
    >>> coords = np.array([10.0, 20.0, 40.0, 20.0, 25.0, 12.0, 25.0, 28.0])  # 30 × 16 px, 0-based
    >>> m = ellipse_mask(coords, (48, 64))
    >>> int(m.sum())  # the continuous ellipse: π · 15 · 8 ≈ 377
    367
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

from medseg.data.base import DataError
from medseg.lesion import measure_recist

log = logging.getLogger("medseg.data")

RECIST_MODES = ("ellipse", "grabcut")

#: vertices per quarter-ellipse arc of the MULAN polygon
_ARC_POINTS = 32


def _as_coords(coords: Sequence[float] | np.ndarray) -> np.ndarray:
    """The 8 RECIST coordinates as a ``(4, 2)`` float64 array of (x, y) endpoints."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1)
    if c.size != 8 or not np.isfinite(c).all():
        raise DataError(f"RECIST coordinates must be 8 finite numbers, got {list(c)}")
    return c.reshape(4, 2)


def recist_centre(coords: Sequence[float] | np.ndarray) -> np.ndarray:
    """The intersection ``(x, y)`` of the long and short diameters.

    For diameters that do not cross (a skewed annotation) the nearest points of the two segments
    are averaged; for parallel ones the long axis' midpoint is used.
    """
    p1, p2, p3, p4 = _as_coords(coords)
    d1, d2 = p2 - p1, p4 - p3
    a_mat = np.array([d1, -d2]).T
    if abs(np.linalg.det(a_mat)) < 1e-9:
        return (p1 + p2) / 2
    a, b = np.clip(np.linalg.solve(a_mat, p3 - p1), 0.0, 1.0)
    return ((p1 + a * d1) + (p3 + b * d2)) / 2


def recist_polygon(coords: Sequence[float] | np.ndarray, points_per_arc: int = _ARC_POINTS) -> np.ndarray:
    """The MULAN polygon ``(4 · points_per_arc, 2)`` of (x, y) vertices through the 4 endpoints.

    Each arc runs from one endpoint ``A`` to the next ``B`` (order long-1, short-1, long-2, short-2)
    along a quarter ellipse with radii ``|A − c|`` and ``|B − c|`` about the centre ``c``. Real
    RECIST diameters are only roughly perpendicular, so the arc's polar angle is stretched to span
    the actual angle between ``A`` and ``B``: the polygon passes through all four endpoints (MULAN's
    rotation-only arcs leave small kinks there) and its diameters stay those of the annotation.
    """
    p = _as_coords(coords)
    c = recist_centre(coords)
    vec = p - c
    radius = np.hypot(vec[:, 0], vec[:, 1])
    angle = np.arctan2(vec[:, 1], vec[:, 0])
    tau = np.arange(points_per_arc) / points_per_arc
    t = tau * (np.pi / 2)
    out = []
    for i, j in ((0, 2), (2, 1), (1, 3), (3, 0)):
        ra, rb = radius[i], radius[j]
        gap = (angle[j] - angle[i] + np.pi) % (2 * np.pi) - np.pi
        phi = angle[i] + tau * gap
        # Polar form of an ellipse with semi-axes ra (at t = 0) and rb (at t = π/2).
        denom = np.sqrt((rb * np.cos(t)) ** 2 + (ra * np.sin(t)) ** 2)
        r = np.divide(ra * rb, denom, out=np.zeros_like(denom), where=denom > 0)
        out.append(c + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1))
    return np.concatenate(out, axis=0)


def _draw_diameters(mask: np.ndarray, coords: np.ndarray) -> None:
    """Mark the two RECIST diameters (so a lesion smaller than a pixel still has pixels)."""
    p = np.rint(_as_coords(coords)).astype(np.int32)
    for a, b in ((p[0], p[1]), (p[2], p[3])):
        cv2.line(mask, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 1, 1)


def ellipse_mask(coords: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the MULAN RECIST ellipse (see :func:`recist_polygon`).

    Args:
        coords: 8 floats, long axis ``x1, y1, x2, y2`` then short axis ``x3, y3, x4, y4``,
            0-based pixel coordinates.
        shape: ``(H, W)`` of the output.

    Returns:
        ``(H, W)`` bool mask. A pixel is inside when its centre is: ``skimage.draw.polygon``
        rather than ``cv2.fillPoly``, which also fills every pixel the outline touches and so
        makes each measured diameter ≈ 1.5 px too long. A lesion too small to cover a pixel
        centre gets the pixels on its two diameters.
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), dtype=np.uint8)
    poly = recist_polygon(coords)
    rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=(h, w))
    mask[rr, cc] = 1
    if not mask.any():
        _draw_diameters(mask, np.asarray(coords, dtype=np.float64))
    return mask.astype(bool)


def _diameters(coords: np.ndarray) -> tuple[float, float]:
    """Long and short RECIST diameters in pixels."""
    p = _as_coords(coords)
    return float(np.linalg.norm(p[1] - p[0])), float(np.linalg.norm(p[3] - p[2]))


def _to_uint8_bgr(image: np.ndarray) -> np.ndarray:
    """A ``(H, W)`` windowed image in [0, 1] (or uint8) as the 3-channel uint8 GrabCut wants."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img)


def _clean(fg: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected component of ``fg`` overlapping ``seed`` most, with its holes filled."""
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    counts = np.bincount(lab[seed], minlength=n + 1)
    counts[0] = 0
    keep = int(np.argmax(counts)) if counts.any() else int(np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(lab == keep)


def _diameter_coverage(mask: np.ndarray, coords: np.ndarray) -> float:
    """Fraction of the two RECIST diameters (their inner 80 %) that lies inside ``mask``."""
    p = _as_coords(coords)
    t = np.linspace(0.1, 0.9, 33)[:, None]
    pts = np.concatenate([p[0] + t * (p[1] - p[0]), p[2] + t * (p[3] - p[2])])
    inside = ndimage.map_coordinates(mask.astype(np.float32), [pts[:, 1], pts[:, 0]], order=1) >= 0.5
    return float(inside.mean())


def _candidate_score(mask: np.ndarray, coords: np.ndarray, long_px: float, short_px: float) -> float:
    """How far a candidate is from the RECIST: mean relative axis error + uncovered diameter fraction.

    The axis error alone misses under-segmentation that happens to keep the axes' lengths; the
    annotated diameters lie inside the lesion by definition, so a mask that loses part of them is off.
    """
    ax = measure_recist(mask)
    if ax is None:
        return float("inf")
    err = 0.5 * (
        abs(ax.long_px - long_px) / max(long_px, 1.0) + abs(ax.short_px - short_px) / max(short_px, 1.0)
    )
    return err + (1.0 - _diameter_coverage(mask, coords))


def seeded_grabcut(image: np.ndarray, trimap: np.ndarray, bgd: np.ndarray, fgd: np.ndarray, iterations: int,
                   mode: int) -> None:
    """``cv2.grabCut`` on ``trimap`` in place (no rectangle), with OpenCV's RNG seeded before an initialising
    call: the GMMs' k-means start draws from the calling thread's RNG, so without the seed a mask depends on
    the thread and on earlier calls (a sample-cache thread gave other key masks than the main process)."""
    if mode != cv2.GC_EVAL:
        cv2.setRNGSeed(0)
    cv2.grabCut(image, trimap, None, bgd, fgd, iterations, mode)


def grabcut_mask(
    image_windowed: np.ndarray,
    coords: Sequence[float] | np.ndarray,
    bbox: Sequence[float] | np.ndarray,
    shape: tuple[int, int],
    iterations: Sequence[int] = (1, 3, 5),
    erosion_divisors: Sequence[float] = (5.0, 3.0),
    max_error: float = 0.1,
) -> np.ndarray:
    """GrabCut pseudo-mask of one lesion from its RECIST marks (Cai et al. 2018).

    GrabCut (``cv2.grabCut`` with a mask init) is run on a crop around the lesion with the trimap:
    sure foreground = the RECIST ellipse eroded by ``short / d``, probable foreground = the
    ellipse, probable background = the box dilated by ``short / d``, sure background elsewhere. One
    candidate is kept per divisor ``d`` in ``erosion_divisors`` and per iteration count in
    ``iterations`` (the model is refined in place, so later counts continue earlier ones); each is
    reduced to its component overlapping the sure foreground with holes filled, and the one that
    best matches the RECIST wins: lowest mean relative error of its measured axes
    (:func:`medseg.lesion.measure_recist`) against the diameters, plus the fraction of the
    diameters' inner 80 % it leaves out.

    Args:
        image_windowed: ``(H, W)`` slice windowed to [0, 1] (float) or uint8; ``(H, W, 3)`` also works.
        coords: 8 RECIST floats, 0-based (see :func:`ellipse_mask`).
        bbox: ``x1, y1, x2, y2`` box, 0-based.
        shape: ``(H, W)`` of the output (the image's).
        iterations: GrabCut iteration counts whose results are candidates.
        erosion_divisors: ``d`` values for the trimap margins ``short / d`` (Cai et al.: 5).
        max_error: the ellipse is returned instead when the best candidate's score (above)
            exceeds this, or when GrabCut fails (e.g. no background around the box).

    Returns:
        ``(H, W)`` bool mask.
    """
    h, w = int(shape[0]), int(shape[1])
    coords = np.asarray(coords, dtype=np.float64)
    ell = ellipse_mask(coords, (h, w))
    long_px, short_px = _diameters(coords)
    img = _to_uint8_bgr(image_windowed)
    if img.shape[:2] != (h, w):
        raise DataError(f"grabcut_mask: image shape {img.shape[:2]} differs from mask shape {(h, w)}")

    # Work on a crop around the dilated box: GrabCut cost grows with the image, and pixels far
    # from the lesion only add background colours unrelated to its surroundings.
    x1, y1, x2, y2 = (float(v) for v in np.asarray(bbox, dtype=np.float64).reshape(-1)[:4])
    pad = int(np.ceil(max(short_px / min(erosion_divisors), 1.0))) + max(8, int(short_px))
    cx0, cy0 = max(int(np.floor(min(x1, x2))) - pad, 0), max(int(np.floor(min(y1, y2))) - pad, 0)
    cx1, cy1 = min(int(np.ceil(max(x1, x2))) + pad + 1, w), min(int(np.ceil(max(y1, y2))) + pad + 1, h)
    crop = np.ascontiguousarray(img[cy0:cy1, cx0:cx1])
    ell_c = ell[cy0:cy1, cx0:cx1]
    crop_coords = (_as_coords(coords) - [cx0, cy0]).ravel()

    best, best_score = None, float("inf")
    for d in erosion_divisors:
        k = max(1, int(round(short_px / d)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        trimap = np.full(crop.shape[:2], cv2.GC_BGD, dtype=np.uint8)
        bx0, by0 = max(int(np.floor(min(x1, x2))) - k - cx0, 0), max(int(np.floor(min(y1, y2))) - k - cy0, 0)
        bx1, by1 = int(np.ceil(max(x1, x2))) + k - cx0 + 1, int(np.ceil(max(y1, y2))) + k - cy0 + 1
        trimap[by0:by1, bx0:bx1] = cv2.GC_PR_BGD
        trimap[ell_c] = cv2.GC_PR_FGD
        sure = cv2.erode(ell_c.astype(np.uint8), kernel) > 0
        trimap[sure] = cv2.GC_FGD
        seed = sure if sure.any() else ell_c
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        done = 0
        try:
            for n_it in sorted(iterations):
                mode = cv2.GC_INIT_WITH_MASK if done == 0 else cv2.GC_EVAL
                seeded_grabcut(crop, trimap, bgd, fgd, n_it - done, mode)
                done = n_it
                fg = _clean((trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD), seed)
                score = _candidate_score(fg, crop_coords, long_px, short_px)
                if score < best_score:
                    best, best_score = fg, score
        except cv2.error as e:  # e.g. no sure/probable background left inside the crop
            log.debug("GrabCut failed (%s); trying the next setting", e)
            continue
    if best is None or best_score > max_error:
        log.debug("GrabCut candidates off by %.2f (> %.2f): using the ellipse", best_score, max_error)
        return ell
    out = np.zeros((h, w), dtype=bool)
    out[cy0:cy1, cx0:cx1] = best
    return out


def _lesion_field(lesion: Mapping[str, Any], key: str) -> Any:
    """Read ``key`` from a lesion dict, with an error naming the missing key."""
    try:
        return lesion[key]
    except KeyError:
        raise DataError(f"lesion {dict(lesion)!r} has no {key!r}") from None


def recist_to_masks(
    lesions: Sequence[Mapping[str, Any]],
    shape: tuple[int, int],
    mode: str = "ellipse",
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of every lesion on one slice.

    Args:
        lesions: dicts with ``coords`` (8 RECIST floats, 0-based) and optionally ``bbox``
            (``x1, y1, x2, y2``, 0-based, used by ``"grabcut"``; default: the RECIST extent ± 5 px,
            as DeepLesion's boxes are) and ``label`` (class id, default 1).
        shape: ``(H, W)``.
        mode: ``"ellipse"`` or ``"grabcut"``.
        image: ``(H, W)`` windowed slice in [0, 1], required for ``"grabcut"``.

    Returns:
        ``(label, instance)``: ``(H, W)`` int64 class mask and ``(H, W)`` int32 instance map where
        lesion ``i`` (row order) has id ``i + 1``. Where masks overlap, the pixel goes to the
        smaller lesion (ties: the later one), so a small lesion inside a large one stays visible.
    """
    if mode not in RECIST_MODES:
        raise DataError(f"data.recist_mask = {mode!r}; expected one of {', '.join(RECIST_MODES)}")
    if mode == "grabcut" and image is None:
        raise DataError("data.recist_mask = 'grabcut' needs the windowed slice (image=...)")
    h, w = int(shape[0]), int(shape[1])
    masks = []
    for les in lesions:
        coords = np.asarray(_lesion_field(les, "coords"), dtype=np.float64)
        if mode == "grabcut":
            bbox = les.get("bbox")
            if bbox is None:
                p = _as_coords(coords)
                bbox = [*(p.min(0) - 5), *(p.max(0) + 5)]
            masks.append(grabcut_mask(np.asarray(image), coords, bbox, (h, w)))
        else:
            masks.append(ellipse_mask(coords, (h, w)))
    label = np.zeros((h, w), dtype=np.int64)
    instance = np.zeros((h, w), dtype=np.int32)
    # Paint large first so smaller lesions overwrite them; stable sort keeps row order on ties.
    order = sorted(range(len(masks)), key=lambda i: (-int(masks[i].sum()), i))
    for i in order:
        instance[masks[i]] = i + 1
        label[masks[i]] = int(lesions[i].get("label", 1))
    return label, instance
