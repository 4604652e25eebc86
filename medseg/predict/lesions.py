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

All components of a class are measured in one pass over the component map, a band of rows at a
time, as per-(component, slice) sums (no per-voxel coordinate arrays), so the table's memory does not
grow with the foreground, and its time is one pass plus a short Python step per lesion (RECIST, text).

Example:
    >>> rows = lesion_table(labels, prob, hu, (0.8, 0.8), slice_extents(z_mm), to_world)
    >>> rows[0]["volume_mm3"], rows[0]["_anchor_yx"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.inference.postprocess import PROB_SCALE
from medseg.lesion import axes_mm, measure_recist
from medseg.runtime import release_freed_memory

__all__ = ["COLUMNS", "lesion_map", "lesion_table", "slice_extents"]

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

#: pixels of one band of the component map measured at a time (~40 bytes of temporaries a pixel): the
#: table's temporaries stay this size whatever the foreground covers
CHUNK_PIXELS = 1 << 16


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
class _Records:
    """Per-slice sums of every component of one component map, one record per (component, slice) it
    shows on, grouped by component in slice order; and per-component value and probability sums."""

    label: np.ndarray  # (R,) component index 1..n
    z: np.ndarray  # (R,) slice
    count: np.ndarray  # (R,) voxels of the component on the slice
    sum_r: np.ndarray  # (R,) Σ row index
    sum_c: np.ndarray  # (R,) Σ column index
    start: np.ndarray  # (n + 2,) records of component i are start[i]:start[i + 1]
    first_row: np.ndarray  # (n + 1,) first row holding the component on its first slice
    box: np.ndarray  # (n + 1, 4) row and column bounds (r0, r1, c0, c1; stop exclusive) over all slices
    value_sum: np.ndarray  # (n + 1,)
    value_max: np.ndarray  # (n + 1,)
    prob_sum: np.ndarray  # (n + 1,)


def _component_records(comp: np.ndarray, n: int, prob: np.ndarray, values: np.ndarray) -> _Records:
    """:class:`_Records` of a ``(Z, H, W)`` component map with components 1..n, all components at once.

    A band of at most :data:`CHUNK_PIXELS` pixels at a time: its foreground's component indices, rows
    and columns feed weighted ``bincount``s over the band's index range (``ufunc.at`` for the maxima and
    bounds). Work is one pass over the image whatever the number of components, and memory is the
    band's temporaries and a few numbers per component and slice.
    """
    _z, h, w = comp.shape
    cnt, sr, sc = np.zeros(n + 1, np.int64), np.zeros(n + 1), np.zeros(n + 1)
    v_sum, p_sum = np.zeros(n + 1), np.zeros(n + 1)
    v_max = np.full(n + 1, -np.inf)
    first_row = np.full(n + 1, -1, np.int64)
    box = np.empty((4, n + 1), np.int64)  # r0, r1 - 1, c0, c1 - 1 while accumulating
    box[0::2], box[1::2] = max(h, w), -1
    parts: list[tuple[np.ndarray, ...]] = []
    step = max(1, CHUNK_PIXELS // w)
    for z in range(comp.shape[0]):
        lo_z, hi_z = n + 1, 0
        for a in range(0, h, step):
            band = comp[z, a: a + step]
            fg = band != 0
            rr, cc = np.nonzero(fg)
            if rr.size == 0:
                continue
            lab = band[fg]
            lo, hi = int(lab.min()), int(lab.max())
            lo_z, hi_z = min(lo_z, lo), max(hi_z, hi)
            idx = lab - lo
            del lab
            m = hi - lo + 1
            k = np.bincount(idx, minlength=m)
            cnt[lo: hi + 1] += k
            sr[lo: hi + 1] += np.bincount(idx, rr, m) + a * k
            sc[lo: hi + 1] += np.bincount(idx, cc, m)
            vals = values[z, a: a + step][fg].astype(np.float64)  # ufunc.at is ~20x slower when it casts
            v_sum[lo: hi + 1] += np.bincount(idx, vals, m)
            np.maximum.at(v_max[lo: hi + 1], idx, vals)
            del vals
            p_sum[lo: hi + 1] += np.bincount(idx, prob[z, a: a + step][fg], m)
            top = np.full(m, h, np.int64)
            np.minimum.at(top, idx, rr)
            on = top < h
            new = (first_row[lo: hi + 1] < 0) & on
            first_row[lo: hi + 1][new] = top[new] + a
            np.minimum(box[0, lo: hi + 1], top + a, out=box[0, lo: hi + 1], where=on)
            np.maximum.at(box[1, lo: hi + 1], idx, rr + a)
            np.minimum.at(box[2, lo: hi + 1], idx, cc)
            np.maximum.at(box[3, lo: hi + 1], idx, cc)
        if hi_z == 0:
            continue
        on = np.flatnonzero(cnt[lo_z: hi_z + 1]) + lo_z
        parts.append((on, np.full(len(on), z, np.int64), cnt[on], sr[on], sc[on]))
        cnt[lo_z: hi_z + 1] = 0
        sr[lo_z: hi_z + 1] = 0
        sc[lo_z: hi_z + 1] = 0
    if len(parts) == 1:  # one slice (a 2-D image): its records are in component order already
        label, zs, count, sum_r, sum_c = parts[0]
    else:
        cols = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros(0, np.int64)] * 5
        del parts
        order = np.argsort(cols[0], kind="stable")  # by component; each component's slices stay in order
        label, zs, count, sum_r, sum_c = (x[order] for x in cols)
    start = np.searchsorted(label, np.arange(n + 2))
    box[1::2] += 1
    return _Records(label, zs, count, sum_r, sum_c, start, first_row, box.T, v_sum, v_max, p_sum)


#: crops of at most this many pixels share their RECIST measurement with every identical crop (a bounded
#: cache of :data:`RECIST_CACHE_SIZE` entries): thousands of small components repeat a few shapes
RECIST_CACHE_PIXELS = 1024
RECIST_CACHE_SIZE = 8192


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

    All components of a class are measured in one pass (:func:`_component_records`, a band of rows at
    a time): centroids and means come from per-slice sums, so besides the inputs the table holds one
    class mask and its component map (5 bytes a pixel), one band's temporaries, a few numbers per
    component and slice, and the largest slice's box of the lesion being measured for RECIST — never
    arrays per foreground voxel.

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
        comp, n_comp = ndimage.label(mask, structure=structure)
        del mask
        rec = _component_records(comp, n_comp, prob, values)
        n_rec = rec.count.astype(np.float64)
        world = to_world(rec.z, rec.sum_r / n_rec, rec.sum_c / n_rec) * n_rec[:, None]
        n_all = np.bincount(rec.label, n_rec, n_comp + 1)  # [0]: background, no records
        with np.errstate(invalid="ignore"):
            centroid = np.stack([np.bincount(rec.label, world[:, j], n_comp + 1) for j in range(3)], 1) / n_all[:, None]
        del world
        area = n_rec * px_area
        volume = np.bincount(rec.label, area * extents[rec.z], n_comp + 1)
        # the largest slice's record: most voxels, the first such slice on a tie (every component 1..n has
        # a record: ndimage.label numbers only components it found)
        largest_rec = np.lexsort((rec.z, -rec.count, rec.label))[rec.start[1:-1]]
        h, w = comp.shape[1:]
        anchor = np.stack([rec.sum_r[largest_rec] / rec.count[largest_rec],
                           rec.sum_c[largest_rec] / rec.count[largest_rec]], 1)
        for i0 in range(1, n_comp + 1, TRIM_EVERY):
            # Python numbers for a block of lesions (indexing numpy arrays one element at a time is slower;
            # lists of every lesion at once would hold ~0.7 KiB a lesion)
            i1 = min(i0 + TRIM_EVERY, n_comp + 1)
            s_lo, s_hi = int(rec.start[i0]), int(rec.start[i1])
            z_l, area_l = rec.z[s_lo:s_hi].tolist(), area[s_lo:s_hi].tolist()
            start = (rec.start[i0: i1 + 1] - s_lo).tolist()
            cx, cy, cz = centroid[i0:i1].T.tolist()
            vol, n_l, first_row = volume[i0:i1].tolist(), n_all[i0:i1].tolist(), rec.first_row[i0:i1].tolist()
            v_sum, v_max = rec.value_sum[i0:i1].tolist(), rec.value_max[i0:i1].tolist()
            p_sum, box, anc = rec.prob_sum[i0:i1].tolist(), rec.box[i0:i1].tolist(), anchor[i0 - 1: i1 - 1].tolist()
            for n, j in enumerate((largest_rec[i0 - 1: i1 - 1] - s_lo).tolist()):
                i = i0 + n
                s0, s1 = start[n], start[n + 1]
                largest = z_l[j]
                # one pixel of margin where the image has one: measure_recist samples a bilinear mask that
                # is zero beyond the array's edge, so a crop flush with the lesion would cut its border
                r0, r1, c0, c1 = box[n]
                crop = comp[largest, max(r0 - 1, 0): min(r1 + 1, h), max(c0 - 1, 0): min(c1 + 1, w)] == i
                long_mm, short_mm = _recist_mm(crop, (sy, sx), recist_seen)
                n_i = n_l[n]
                per_slice = ";".join(f"{z_l[k]}:{area_l[k]:.2f}" for k in range(s0, s1))
                # a flat tuple while the component map is alive (floats kept, formatted with the dict):
                # ~0.5 KiB a row less than the dict it becomes
                pending.append((
                    z_l[s0], first_row[n], cls, z_l[s1 - 1], cx[n], cy[n], fmt(cz[n], 3), fmt(vol[n]), largest,
                    fmt(area_l[j]), fmt(long_mm), fmt(short_mm), fmt(v_sum[n] / n_i, 1), fmt(v_max[n], 1),
                    fmt(p_sum[n] / n_i / prob_unit, 4), same(per_slice), anc[n][0], anc[n][1], i,
                ))
            del z_l, area_l, start, cx, cy, cz, vol, n_l, first_row, v_sum, v_max, p_sum, box, anc
            release_freed_memory()
        del rec, n_rec, area, centroid, volume, largest_rec, anchor
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
