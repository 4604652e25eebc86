"""Facts about a lesion used across the pipeline: DeepLesion's lesion type codes (the one table) and the
RECIST measurement of a segmented lesion: the long axis and the perpendicular short axis.

Coordinates are 0-based ``(x, y)`` with pixel ``(r, c)`` centred at ``(c, r)``. Lengths include the
end pixels' own extent, so a shape of continuous diameter *D* rasterised by pixel centres measures
≈ *D* rather than *D* − 1 (the span of pixel centres).

* **Long axis** — the longest chord of the object: the diameter of the convex hull of its contour
  (OpenCV ``findContours`` + ``convexHull`` over pixel centres), extended by half a pixel at each
  end (the end pixels' own extent; treating pixels as unit-diameter discs rather than squares avoids
  the up-to-0.4 px excess of square corners on diagonal axes).
* **Short axis** — the longest chord perpendicular to the long axis that lies inside the object
  (where its bilinearly interpolated mask is ≥ 0.5): lines perpendicular to the long axis are
  sampled every half pixel across the object, each every quarter pixel, and the longest
  contiguous inside run on any of them is kept.

Example:
    >>> import numpy as np, cv2
    >>> m = cv2.ellipse(np.zeros((64, 64), np.uint8), (32, 32), (20, 10), 0, 0, 360, 1, -1)
    >>> ax = measure_recist(m)
    >>> round(ax.long_px), round(ax.short_px)
    (41, 21)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

#: DeepLesion ``Coarse_lesion_type`` codes → names (metric keys, plots, the generated release); -1 = unlabelled
COARSE_LESION_TYPES: dict[int, str] = {
    -1: "unlabelled",
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft_tissue",
    8: "pelvis",
}

#: the same table by name → code, for the labelled types (what the generator writes)
LESION_TYPES: dict[str, int] = {name: code for code, name in COARSE_LESION_TYPES.items() if code > 0}

#: finest spacing (px) between sampled perpendicular lines and between samples along each line
_LINE_STEP = 0.5
_SAMPLE_STEP = 0.25
#: most lines / samples per line, so a huge object stays fast (the chord length varies slowly
#: near its maximum, so coarser line spacing on a big object costs a negligible fraction)
_MAX_LINES = 256
_MAX_SAMPLES = 1024


@dataclass
class RecistAxes:
    """The RECIST axes of one object, in 0-based pixel coordinates.

    Attributes:
        long: ``(2, 2)`` endpoints ``[[x1, y1], [x2, y2]]`` of the long axis.
        short: ``(2, 2)`` endpoints ``[[x3, y3], [x4, y4]]`` of the short axis.
        long_px: long-axis length in pixels.
        short_px: short-axis length in pixels.
    """

    long: np.ndarray
    short: np.ndarray
    long_px: float
    short_px: float


def _hull_points(mask: np.ndarray) -> np.ndarray:
    """Vertices ``(N, 2)`` (x, y) of the convex hull of the object's boundary pixel centres."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours], axis=0)
    return cv2.convexHull(pts).reshape(-1, 2).astype(np.float64)


def _longest_run(inside: np.ndarray) -> tuple[int, int, int]:
    """``(row, start, stop)`` of the longest run of True along the rows of a bool ``(L, S)`` array."""
    # Run lengths via a cumulative count that resets at every False.
    padded = np.pad(inside, ((0, 0), (1, 0)))
    idx = np.where(~padded, np.arange(padded.shape[1])[None, :], 0)
    last_false = np.maximum.accumulate(idx, axis=1)
    run = (np.arange(padded.shape[1])[None, :] - last_false)[:, 1:]
    row, end = np.unravel_index(int(np.argmax(run)), run.shape)
    length = int(run[row, end])
    return int(row), int(end - length + 1), int(end + 1)


def measure_recist(mask: np.ndarray) -> RecistAxes | None:
    """Measure the RECIST long and short axes of one object.

    Args:
        mask: ``(H, W)`` bool or integer mask; every non-zero pixel belongs to the object.

    Returns:
        The axes (endpoints and lengths in pixels, precise to about a quarter pixel beyond the
        rasterisation itself), or ``None`` for an empty mask.
    """
    mask = np.asarray(mask)
    # 0/1 uint8 as a view of a bool mask (no copy; findContours and map_coordinates only read it): a
    # lesion's box can be most of a large image
    m = np.ascontiguousarray(mask if mask.dtype == bool else mask != 0).view(np.uint8)
    if m.ndim != 2:
        raise ValueError(f"measure_recist expects a 2-D mask, got shape {m.shape}")
    if not m.any():
        return None
    hull = _hull_points(m)
    # Brute force over hull vertices: hulls of lesion masks have at most a few hundred vertices.
    d2 = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    if d2[i, j] == 0:  # a single pixel
        p1, p2 = hull[0] - [0.5, 0.0], hull[0] + [0.5, 0.0]
    else:
        # Each end pixel adds half a pixel beyond its centre (pixels as unit-diameter discs).
        c1, c2 = hull[i], hull[j]
        u = (c2 - c1) / np.sqrt(d2[i, j])
        p1, p2 = c1 - 0.5 * u, c2 + 0.5 * u
    long_px = float(np.linalg.norm(p2 - p1))
    u = (p2 - p1) / long_px
    v = np.array([-u[1], u[0]])

    # Perpendicular lines at positions t along the long axis; samples at s along each line.
    proj_v = hull @ v
    line_step = max(_LINE_STEP, long_px / _MAX_LINES)
    width = float(proj_v.max() - proj_v.min()) + 2.0
    step = max(_SAMPLE_STEP, width / _MAX_SAMPLES)
    ts = np.arange(line_step / 2, long_px, line_step)
    ss = np.arange(proj_v.min() - 1.0, proj_v.max() + 1.0, step)
    xy = p1[None, None, :] + ts[:, None, None] * u + (ss[None, :, None] - p1 @ v) * v
    # Inside = the bilinearly interpolated mask >= 0.5: along rows and columns this is the pixel
    # squares' extent, but it cuts the squares' corners on oblique lines, which would otherwise
    # lengthen every oblique chord by up to ~0.4 px.
    inside = (
        ndimage.map_coordinates(  # interpolated in float64 from the uint8 mask: no float copy of the box
            m, [xy[..., 1].ravel(), xy[..., 0].ravel()], order=1, mode="constant", cval=0.0, output=np.float32
        ).reshape(xy.shape[:2])
        >= 0.5
    )
    if not inside.any():  # a sliver thinner than the sampling: the short axis is one pixel wide
        mid = (p1 + p2) / 2
        short = np.stack([mid - 0.5 * v, mid + 0.5 * v])
        return RecistAxes(np.stack([p1, p2]), short, long_px, 1.0)
    row, start, stop = _longest_run(inside)
    # Each sample stands for a step-long piece of the line centred on it.
    s0, s1 = ss[start] - step / 2, ss[stop - 1] + step / 2
    base = p1 + ts[row] * u - (p1 @ v) * v
    short = np.stack([base + s0 * v, base + s1 * v])
    return RecistAxes(np.stack([p1, p2]), short, long_px, float(s1 - s0))


def axes_mm(axes: RecistAxes, spacing: Sequence[float]) -> tuple[float, float]:
    """Long and short axis lengths in mm for pixel ``spacing`` ``[sy, sx]`` (mm/px).

    The endpoints found in pixel space are converted; with anisotropic pixels the longest chord in
    mm may differ slightly from the converted pixel-space one.
    """
    sy, sx = float(spacing[0]), float(spacing[1])
    scale = np.array([sx, sy])

    def length(ends: np.ndarray) -> float:
        return float(np.linalg.norm((ends[1] - ends[0]) * scale))

    return length(axes.long), length(axes.short)
