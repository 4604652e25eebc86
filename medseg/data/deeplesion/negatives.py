"""Slices without a lesion for training (``data.negative_rate``): so whole-series prediction learns
to leave organs alone.

DeepLesion ships, around each key slice, the slices of its ``Slice_range``; only the key slice is
annotated. A slice of the series is a **negative** when

* the release has true masks (``Masks_png/``, generated data): its mask is absent or empty;
* otherwise (real DeepLesion): it lies outside every lesion's ``Slice_range`` in the series, or —
  since the ranges of a series usually cover every shipped slice — farther from every annotated key
  slice than that lesion's RECIST long axis (in mm along the slice normal). A lesion is rarely longer
  along the body axis than its longest in-plane diameter; unannotated lesions remain possible
  (DeepLesion is incompletely labelled), which is why the rate is configurable.

Example:
    >>> negative_slices(rows, masks_dir=None)  # doctest: +SKIP
    [('000001_01_01', 1), ...]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from medseg.data.deeplesion.format import LesionRecord

__all__ = ["choose_negatives", "negative_slices"]


def _empty_mask(path: Path) -> bool:
    """True when the mask file is absent or all zero."""
    if not path.is_file():
        return True
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return m is None or not np.any(m)


def negative_slices(rows: Iterable[LesionRecord], masks_dir: Path | None) -> list[tuple[str, int, LesionRecord]]:
    """Every lesion-free slice of the series the rows belong to, in (series, slice) order.

    Args:
        rows: every ``DL_info.csv`` row of the series considered (all of a series' rows, whatever
            the filters keep: a filtered-out lesion is still a lesion).
        masks_dir: ``Masks_png/`` when the release has true masks, else None.

    Returns:
        ``(series, slice, row)`` triples; ``row`` is a row of that series whose ``Slice_range``
        holds the slice (its window, spacing and range build the sample).
    """
    by_series: dict[str, list[LesionRecord]] = {}
    for r in rows:
        by_series.setdefault(r.series, []).append(r)
    out: list[tuple[str, int, LesionRecord]] = []
    for series in sorted(by_series):
        rs = by_series[series]
        owner: dict[int, LesionRecord] = {}
        for r in rs:
            for n in range(r.slice_range[0], r.slice_range[1] + 1):
                owner.setdefault(n, r)
        for n in sorted(owner):
            if masks_dir is not None:
                ok = _empty_mask(masks_dir / series / f"{n:03d}.png")
            else:
                ok = all(_far(n, r) for r in rs)
            if ok:
                out.append((series, n, owner[n]))
    return out


def _far(n: int, r: LesionRecord) -> bool:
    """Slice ``n`` lies outside lesion ``r``'s extent: beyond its ``Slice_range``, or farther from its key
    slice than its RECIST long axis."""
    first, last = r.slice_range
    if n < first or n > last:
        return True
    long_mm = float(r.diameters_px[0]) * float(r.spacing[0])
    interval = float(r.slice_interval or 0.0)
    return interval > 0 and abs(n - r.key_slice) * interval > long_mm


def choose_negatives(candidates: list[tuple[str, int, LesionRecord]], count: int, seed: int
                     ) -> list[tuple[str, int, LesionRecord]]:
    """``count`` candidates drawn without replacement by a seeded generator (all when fewer), in order."""
    if count <= 0 or not candidates:
        return []
    if count >= len(candidates):
        return list(candidates)
    idx = np.sort(np.random.default_rng(seed).choice(len(candidates), size=count, replace=False))
    return [candidates[int(i)] for i in idx]
