"""The per-lesion table of a predicted stack: one row per 3-D connected lesion.

Columns (``lesions.csv``):

==================== =====================================================================
lesion_id            1..N in raster order of the first voxel (slice, row, column)
class                predicted class (1..K−1)
first_slice,         slice indices (along the normal, the order of ``mask.nii.gz``'s third axis
last_slice           and of the ``seg.dcm`` frames)
centroid_x/y/z_mm    mean voxel centre: DICOM patient coordinates (LPS mm) for DICOM input,
                     NIfTI world coordinates (RAS mm) for NIfTI, pixels (x, y, 0) for PNG / TIFF
volume_mm3           Σ area × slice extent (half the distance to each neighbouring slice)
largest_slice        the slice where the lesion's area is largest
largest_area_mm2     its area there
recist_long_mm,      RECIST long axis and perpendicular short axis on the largest slice
recist_short_mm      (:func:`medseg.measure.measure_recist`)
mean_hu, max_hu      of the source values (HU for CT; stored values for other input)
mean_probability     mean softmax probability of the predicted class over the lesion
area_mm2_per_slice   ``slice:area`` pairs, ``;``-separated
==================== =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.lesion import axes_mm, measure_recist

__all__ = ["COLUMNS", "lesion_table", "slice_extents"]

COLUMNS = [
    "lesion_id", "class", "first_slice", "last_slice", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "volume_mm3", "largest_slice", "largest_area_mm2", "recist_long_mm", "recist_short_mm", "mean_hu", "max_hu",
    "mean_probability", "area_mm2_per_slice",
]

#: (slice, row, column) index arrays → (N, 3) world coordinates in mm
ToWorld = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def slice_extents(z_mm: np.ndarray, thickness: float | None = None) -> np.ndarray:
    """Each slice's extent along the normal (mm): half the distance to each neighbour (ends: one full step)."""
    z = np.asarray(z_mm, dtype=np.float64)
    if len(z) == 1:
        return np.array([thickness or 1.0])
    d = np.diff(z)
    ext = np.empty(len(z))
    ext[1:-1] = (d[:-1] + d[1:]) / 2
    ext[0], ext[-1] = d[0], d[-1]
    return ext


def _fmt(v: float, nd: int = 2) -> str:
    return f"{v:.{nd}f}"


def lesion_table(labels: np.ndarray, prob: np.ndarray, values: np.ndarray, spacing: tuple[float, float],
                 extents: np.ndarray, to_world: ToWorld, connectivity: int = 3) -> list[dict[str, Any]]:
    """One row per 3-D connected lesion of a ``(Z, H, W)`` class map (see the module doc for columns).

    Args:
        labels: ``(Z, H, W)`` integer class map, 0 = background.
        prob: ``(Z, H, W)`` probability of the predicted class.
        values: ``(Z, H, W)`` source values (HU).
        spacing: ``(sy, sx)`` mm/px.
        extents: ``(Z,)`` slice extents (mm), see :func:`slice_extents`.
        to_world: voxel indices → world mm.
        connectivity: 1, 2 or 3 (faces, + edges, + corners).
    """
    sy, sx = float(spacing[0]), float(spacing[1])
    px_area = sy * sx
    structure = ndimage.generate_binary_structure(3, int(connectivity))
    rows: list[dict[str, Any]] = []
    for cls in [int(c) for c in np.unique(labels) if c != 0]:
        comp, n = ndimage.label(labels == cls, structure=structure)
        for i, box in enumerate(ndimage.find_objects(comp), start=1):
            if box is None:
                continue
            sub = comp[box] == i
            z0 = box[0].start
            counts = sub.reshape(sub.shape[0], -1).sum(1)
            ks = [int(z0 + j) for j in np.flatnonzero(counts)]
            areas = {k: float(counts[k - z0]) * px_area for k in ks}
            zz, rr, cc = np.nonzero(sub)
            zz, rr, cc = zz + z0, rr + box[1].start, cc + box[2].start
            centroid = to_world(zz, rr, cc).mean(0)
            largest = max(ks, key=lambda k: (areas[k], -k))
            ax = measure_recist(comp[largest] == i)
            long_mm, short_mm = axes_mm(ax, (sy, sx)) if ax is not None else (0.0, 0.0)
            vals = values[zz, rr, cc]
            rows.append({
                "lesion_id": 0, "class": cls, "first_slice": ks[0], "last_slice": ks[-1],
                "centroid_x_mm": _fmt(centroid[0], 3), "centroid_y_mm": _fmt(centroid[1], 3),
                "centroid_z_mm": _fmt(centroid[2], 3),
                "volume_mm3": _fmt(sum(areas[k] * float(extents[k]) for k in ks)),
                "largest_slice": largest, "largest_area_mm2": _fmt(areas[largest]),
                "recist_long_mm": _fmt(long_mm), "recist_short_mm": _fmt(short_mm),
                "mean_hu": _fmt(float(vals.mean()), 1), "max_hu": _fmt(float(vals.max()), 1),
                "mean_probability": _fmt(float(prob[zz, rr, cc].mean()), 4),
                "area_mm2_per_slice": ";".join(f"{k}:{areas[k]:.2f}" for k in ks),
                "_first": (ks[0], int(rr[zz == ks[0]].min()), cls),
            })
    rows.sort(key=lambda r: r.pop("_first"))
    for n, r in enumerate(rows, start=1):
        r["lesion_id"] = n
    return rows
