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
recist_short_mm      (:func:`medseg.lesion.measure_recist`)
mean_hu, max_hu      of the source values (HU for CT; stored values for other input)
mean_probability     mean softmax probability of the predicted class over the lesion
area_mm2_per_slice   ``slice:area`` pairs, ``;``-separated
==================== =====================================================================

Each component is measured inside its bounding box from per-slice sums (no per-voxel coordinate
arrays), so the table's memory does not grow with the foreground.

Example:
    >>> rows = lesion_table(labels, prob, hu, (0.8, 0.8), slice_extents(z_mm), to_world)
    >>> rows[0]["volume_mm3"], rows[0]["_anchor_yx"]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.inference.postprocess import PROB_SCALE
from medseg.lesion import axes_mm, measure_recist

__all__ = ["COLUMNS", "lesion_map", "lesion_table", "release_freed_memory", "slice_extents"]

COLUMNS = [
    "lesion_id", "class", "first_slice", "last_slice", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "volume_mm3", "largest_slice", "largest_area_mm2", "recist_long_mm", "recist_short_mm", "mean_hu", "max_hu",
    "mean_probability", "area_mm2_per_slice",
]

#: (slice, row, column) index arrays → (N, 3) world coordinates in mm; slice indices are integers, rows
#: and columns may be fractional. It must be affine in (row, column) on each slice (true of DICOM,
#: NIfTI and pixel coordinates): the centroid is taken from per-slice mean rows and columns.
ToWorld = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

#: components measured between two returns of freed memory to the system (:func:`release_freed_memory`)
TRIM_EVERY = 4096

#: pixels of one chunk of a component's bounding box: the table's temporaries stay this size whatever
#: the foreground covers
CHUNK_PIXELS = 1 << 20


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    After ``medseg predict``'s window has freed large blocks, glibc serves every later allocation below
    its (raised) mmap threshold from the heap, where freed temporaries stay resident between the rows
    that outlive them: ~0.6 KiB a lesion of the table's per-component temporaries, or the model's
    activations after the window (~200 MiB) — memory the next stage's arrays cannot reuse, so it would
    add to the process's peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None where there is none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # type: ignore[arg-type]
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


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


@dataclass
class _Sums:
    """Per-slice counts and index sums of one component, and the sums of its values and probabilities."""

    count: np.ndarray  # (nz,) voxels per slice of the box
    sum_r: np.ndarray  # (nz,) Σ row index
    sum_c: np.ndarray  # (nz,) Σ column index
    first_row: np.ndarray  # (nz,) first row holding the component (−1: none)
    value_sum: float = 0.0
    value_max: float = -np.inf
    prob_sum: float = 0.0


def _component_sums(comp: np.ndarray, i: int, box: tuple[slice, ...], prob: np.ndarray, values: np.ndarray
                    ) -> _Sums:
    """Sums over component ``i`` inside its bounding box, in chunks of at most :data:`CHUNK_PIXELS`."""
    (z0, z1), (r0, r1), (c0, c1) = ((b.start, b.stop) for b in box)
    nz = z1 - z0
    out = _Sums(np.zeros(nz, np.int64), np.zeros(nz), np.zeros(nz), np.full(nz, -1, np.int64))
    rows = np.arange(r0, r1, dtype=np.float64)
    cols = np.arange(c0, c1, dtype=np.float64)
    step = max(1, CHUNK_PIXELS // (c1 - c0))
    for j, z in enumerate(range(z0, z1)):
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            m = comp[z, a:b, c0:c1] == i
            per_row = m.sum(1)
            n = int(per_row.sum())
            if n == 0:
                continue
            if out.first_row[j] < 0:
                out.first_row[j] = a + int(np.argmax(per_row > 0))
            out.count[j] += n
            out.sum_r[j] += float(per_row @ rows[a - r0: b - r0])
            out.sum_c[j] += float(m.sum(0) @ cols)
            v = values[z, a:b, c0:c1][m]
            out.value_sum += float(v.sum(dtype=np.float64))
            out.value_max = max(out.value_max, float(v.max()))
            out.prob_sum += float(prob[z, a:b, c0:c1][m].sum(dtype=np.float64))
    return out


#: crops of at most this many pixels share their RECIST measurement with every identical crop (a bounded
#: cache of :data:`RECIST_CACHE_SIZE` entries): thousands of small components repeat a few shapes
RECIST_CACHE_PIXELS = 1024
RECIST_CACHE_SIZE = 8192


def _box_array(objects: list[tuple[slice, ...] | None]) -> np.ndarray:
    """``(N, 6)`` (z0, z1, r0, r1, c0, c1) of :func:`scipy.ndimage.find_objects`' boxes; −1 where None."""
    out = np.full((len(objects), 6), -1, np.int64)
    for n, box in enumerate(objects):
        if box is not None:
            out[n] = (box[0].start, box[0].stop, box[1].start, box[1].stop, box[2].start, box[2].stop)
    return out


def _recist_mm(crop: np.ndarray, spacing: tuple[float, float],
               seen: dict[tuple[tuple[int, ...], bytes], tuple[float, float]]) -> tuple[float, float]:
    """RECIST long and short axes (mm) of a bool crop (:func:`medseg.lesion.measure_recist`; 0, 0 when
    empty). The measurement depends on the crop alone, so an identical small crop (same shape and
    pixels: the key is exact) reuses the lengths in ``seen``, which holds at most
    :data:`RECIST_CACHE_SIZE` entries."""
    key = None
    if crop.size <= RECIST_CACHE_PIXELS:
        key = (crop.shape, np.packbits(crop).tobytes())
        if key in seen:
            return seen[key]
    ax = measure_recist(crop)
    out = axes_mm(ax, spacing) if ax is not None else (0.0, 0.0)
    if key is not None:
        if len(seen) >= RECIST_CACHE_SIZE:
            seen.clear()
        seen[key] = out
    return out


def lesion_table(labels: np.ndarray, prob: np.ndarray, values: np.ndarray, spacing: tuple[float, float],
                 extents: np.ndarray, to_world: ToWorld, connectivity: int = 3) -> list[dict[str, Any]]:
    """One row per 3-D connected lesion of a ``(Z, H, W)`` class map (see the module doc for columns).

    Each component is measured inside its bounding box (:func:`scipy.ndimage.find_objects`), a chunk
    of rows at a time: centroids and means come from per-slice sums, so besides the inputs the table
    holds one class mask and its component map (5 bytes a pixel), one chunk, and the largest slice's
    box of the lesion being measured for RECIST — never arrays per foreground voxel.

    Each row also carries ``_anchor_yx``: the ``(row, column)`` pixel centroid of the lesion on its
    largest slice, where the overlays draw its id (not a ``lesions.csv`` column).

    Args:
        labels: ``(Z, H, W)`` integer class map, 0 = background.
        prob: ``(Z, H, W)`` probability of the predicted class: float, or uint16 fixed point
            (:func:`~medseg.inference.postprocess.quantise_probability`, as ``medseg predict`` keeps it).
        values: ``(Z, H, W)`` source values (HU).
        spacing: ``(sy, sx)`` mm/px.
        extents: ``(Z,)`` slice extents (mm), see :func:`slice_extents`.
        to_world: voxel indices → world mm (see :data:`ToWorld`).
        connectivity: 1, 2 or 3 (faces, + edges, + corners).
    """
    sy, sx = float(spacing[0]), float(spacing[1])
    px_area = sy * sx
    prob_unit = PROB_SCALE if prob.dtype == np.uint16 else 1.0
    recist_seen: dict[tuple[tuple[int, ...], bytes], tuple[float, float]] = {}
    # one string object per distinct cell value (areas, axes, HU, probabilities repeat across thousands of
    # small lesions): the rows are most of the table's memory that grows with the lesion count
    strings: dict[str, str] = {}

    def same(text: str) -> str:
        return strings.setdefault(text, text)

    def fmt(v: float, nd: int = 2) -> str:
        return same(_fmt(v, nd))
    structure = ndimage.generate_binary_structure(3, int(connectivity))
    pending: list[tuple[Any, ...]] = []
    top = int(labels.max()) if labels.size else 0
    for cls in range(1, top + 1):
        # one class in an unsigned map: the map is its own mask (no bool copy beside the component map)
        mask = labels if top == 1 and labels.dtype.kind == "u" else labels == cls
        if not mask.any():
            continue
        comp, _n = ndimage.label(mask, structure=structure)
        del mask
        # the boxes as one int array (find_objects' list of slice tuples: ~0.4 KiB a lesion)
        objects = ndimage.find_objects(comp)
        boxes = _box_array(objects)
        del objects
        for i, bx in enumerate(boxes, start=1):
            if bx[0] < 0:
                continue
            box = (slice(int(bx[0]), int(bx[1])), slice(int(bx[2]), int(bx[3])), slice(int(bx[4]), int(bx[5])))
            s = _component_sums(comp, i, box, prob, values)
            z0 = box[0].start
            present = np.flatnonzero(s.count)
            ks = [int(z0 + j) for j in present]
            areas = {k: float(s.count[k - z0]) * px_area for k in ks}
            n_k = s.count[present].astype(np.float64)
            r_k, c_k = s.sum_r[present] / n_k, s.sum_c[present] / n_k
            centroid = (to_world(np.asarray(ks), r_k, c_k) * n_k[:, None]).sum(0) / n_k.sum()
            largest = max(ks, key=lambda k: (areas[k], -k))
            # one pixel of margin where the image has one: measure_recist samples a bilinear mask that
            # is zero beyond the array's edge, so a crop flush with the lesion would cut its border
            (r0, r1), (c0, c1) = (box[1].start, box[1].stop), (box[2].start, box[2].stop)
            h, w = comp.shape[1:]
            crop = comp[largest, max(r0 - 1, 0): min(r1 + 1, h), max(c0 - 1, 0): min(c1 + 1, w)] == i
            long_mm, short_mm = _recist_mm(crop, (sy, sx), recist_seen)
            n_all = float(n_k.sum())
            j = largest - z0
            # a flat tuple while the component map is alive (floats kept, formatted with the dict): ~0.5 KiB
            # a row less than the dict it becomes
            pending.append((
                ks[0], int(s.first_row[ks[0] - z0]), cls, ks[-1], float(centroid[0]), float(centroid[1]),
                fmt(centroid[2], 3), fmt(sum(areas[k] * float(extents[k]) for k in ks)), largest,
                fmt(areas[largest]), fmt(long_mm), fmt(short_mm), fmt(s.value_sum / n_all, 1), fmt(s.value_max, 1),
                fmt(s.prob_sum / n_all / prob_unit, 4), same(";".join(f"{k}:{areas[k]:.2f}" for k in ks)),
                float(s.sum_r[j] / s.count[j]), float(s.sum_c[j] / s.count[j]), i,
            ))
            if len(pending) % TRIM_EVERY == 0:
                release_freed_memory()
        del comp
    release_freed_memory()
    pending.sort(key=lambda t: t[:3])  # stable: raster order of each lesion's first voxel (slice, row), class
    pending.reverse()
    rows: list[dict[str, Any]] = []
    while pending:  # each tuple freed as its dict is made
        (first, _row, cls, last, cx, cy, cz, vol, largest, area, long_mm, short_mm, mean_hu, max_hu, mean_p, per_slice,
         ay, ax, i) = pending.pop()
        rows.append({
            "lesion_id": len(rows) + 1, "class": cls, "first_slice": first, "last_slice": last,
            "centroid_x_mm": _fmt(cx, 3), "centroid_y_mm": _fmt(cy, 3), "centroid_z_mm": cz, "volume_mm3": vol,
            "largest_slice": largest, "largest_area_mm2": area, "recist_long_mm": long_mm, "recist_short_mm": short_mm,
            "mean_hu": mean_hu, "max_hu": max_hu, "mean_probability": mean_p, "area_mm2_per_slice": per_slice,
            "_anchor_yx": (ay, ax), "_component": (cls, i),
        })
    return rows


def lesion_map(labels: np.ndarray, rows: list[dict[str, Any]], connectivity: int = 3) -> np.ndarray:
    """``(Z, H, W)`` uint16 map voxel → ``lesion_id`` of :func:`lesion_table`'s ``rows`` (0 = background):
    the same components (``_component``: class, label index), so a SEG segment number is the table's id."""
    out = np.zeros(labels.shape, np.uint16)
    structure = ndimage.generate_binary_structure(3, int(connectivity))
    by_class: dict[int, dict[int, int]] = {}
    for r in rows:
        cls, i = r["_component"]
        by_class.setdefault(int(cls), {})[int(i)] = int(r["lesion_id"])
    for cls, ids in by_class.items():
        comp, _n = ndimage.label(labels == cls, structure=structure)
        lut = np.zeros(int(comp.max()) + 1, np.uint16)
        for i, lid in ids.items():
            lut[i] = lid
        out += lut[comp]
        del comp
    return out
