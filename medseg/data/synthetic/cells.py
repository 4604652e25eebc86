"""Generated EM-like cell data: the setting the U-Net paper was made for (ISBI 2012 neuronal structures).

:func:`generate_cells_data` writes an image/mask folder read by the ``folder`` dataset::

    root/images/cells_000.png ...   8-bit grayscale, 512×512: serial-section EM look-alikes
    root/masks/cells_000.png  ...   0 = membrane, 255 = cell interior (read as classes 0 / 1)

Each image is a dense tessellation of touching cells (an additively weighted Voronoi diagram of
cells of mixed sizes — large dendrite-like profiles among many small axon-like ones — on smoothly
warped coordinates, so borders curve), separated by thin dark membranes of varying thickness.
Cell interiors are textured (band-limited noise, a per-cell gray level) and hold organelles:
mitochondria (dark elongated bodies with brighter cristae stripes) and clusters of vesicles (small
dark rings); then the whole image is blurred (the microscope's point spread) and gets shot-like
noise and a slow illumination gradient. Organelles are dark like membranes but labelled cell, which
is what makes the task hard. As in the ISBI labels, the mask is cell (1) versus membrane (0); each
cell is a connected component of the mask (membranes are at least 2 px thick, so 8-connected
components never join two cells), so the folder dataset's instance map is the true cell map.

Example:
    >>> root = generate_cells_data("data/cells", images=4, seed=0)
    >>> sorted(p.name for p in (root / "images").iterdir())[:2]
    ['cells_000.png', 'cells_001.png']
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.data.synthetic.release import write_png
from medseg.io import atomic_write_bytes, fsync_dir

__all__ = ["CELLS_IMAGES", "generate_cells_data", "render_cells"]

#: images written by default (the ISBI 2012 training stack has 30)
CELLS_IMAGES = 30
_INCOMPLETE = ".medseg_cells_incomplete"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-12)


def _seeds(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres and additive weights: a few large profiles, many small ones, no two too close."""
    pts: list[np.ndarray] = []
    weights: list[float] = []
    area = (size / 512.0) ** 2  # the counts are for 512²: smaller images hold fewer cells of the same size
    for n, r_min, r_max in ((int(rng.integers(5, 10)), 34.0, 60.0), (int(rng.integers(90, 140)), 9.0, 18.0)):
        n = max(2, round(n * area))
        placed = 0
        for _ in range(40 * n):
            if placed == n:
                break
            r = float(rng.uniform(r_min, r_max))
            p = rng.uniform(-20, size + 20, 2)
            if all(np.hypot(*(p - q)) > 0.9 * (r + w) for q, w in zip(pts, weights)):
                pts.append(p)
                weights.append(r)
                placed += 1
    return np.array(pts), np.array(weights)


def _tessellate(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cell id map (0 = membrane), membrane strength in [0, 1])`` of a warped weighted Voronoi diagram."""
    pts, w = _seeds(rng, size)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    warp = 7.0
    qy = yy + warp * _smooth_noise(rng, (size, size), 18.0)
    qx = xx + warp * _smooth_noise(rng, (size, size), 18.0)
    q = np.stack([qy.ravel(), qx.ravel()], 1)
    first = np.empty(len(q))
    second = np.empty(len(q))
    owner = np.empty(len(q), np.int64)
    for a in range(0, len(q), 8192):  # additively weighted distance to every seed, in chunks
        # larger cells push their borders out (curved, hyperbolic borders)
        wd = np.hypot(q[a : a + 8192, :1] - pts[None, :, 0], q[a : a + 8192, 1:] - pts[None, :, 1]) - w[None]
        two = np.argpartition(wd, 1, axis=1)[:, :2]
        d2 = np.take_along_axis(wd, two, 1)
        swap = d2[:, 0] > d2[:, 1]
        owner[a : a + 8192] = np.where(swap, two[:, 1], two[:, 0])
        first[a : a + 8192], second[a : a + 8192] = d2.min(1), d2.max(1)
    gap = (second - first).reshape(size, size)  # ≈ 2 × distance to the border
    # membrane thickness varies smoothly along the membranes (≈ 2–4 px)
    thick = 5.5 + 1.5 * np.clip(_smooth_noise(rng, (size, size), 30.0), -1.0, 1.5)
    membrane = gap < thick
    cells = (owner.reshape(size, size) + 1).astype(np.int32)
    cells[membrane] = 0
    # no pixel of one cell may touch another cell, even diagonally
    big = np.iinfo(np.int32).max
    lo = ndimage.minimum_filter(np.where(cells > 0, cells, big), size=3)
    hi = ndimage.maximum_filter(cells, size=3)
    cells[(cells > 0) & ((lo != cells) | (hi != cells))] = 0
    # relabel so that every cell is one 4-connected component with its own id (clipped fragments
    # at the image border become their own cells)
    out = np.zeros_like(cells)
    nxt = 1
    for cid in np.unique(cells[cells > 0]):
        comps, n = ndimage.label(cells == cid)
        for c in range(1, n + 1):
            region = comps == c
            if region.sum() < 12:  # a speck: membrane
                continue
            out[region] = nxt
            nxt += 1
    strength = np.clip(1.0 - gap / (thick + 2.0), 0.0, 1.0)
    return out, strength


def _window(cy: float, cx: float, r: float, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The square window of half-width ``r`` around a point, and its pixel coordinates relative to it."""
    y0, x0 = min(max(int(cy - r), 0), size), min(max(int(cx - r), 0), size)
    y1, x1 = max(min(int(cy + r) + 2, size), y0), max(min(int(cx + r) + 2, size), x0)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), yy - np.float32(cy), xx - np.float32(cx)


def _organelles(rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
    """Darkening (``0..1``) from mitochondria (with cristae stripes) and vesicles, inside cells only."""
    size = cells.shape[0]
    dark = np.zeros(cells.shape, np.float32)
    inner = ndimage.binary_erosion(cells > 0, iterations=3)
    ids = np.unique(cells[cells > 0])
    for cid in rng.choice(ids, size=max(1, len(ids) // 4), replace=False):
        ys, xs = np.nonzero((cells == cid) & inner)
        if len(ys) < 150:
            continue
        for _ in range(int(rng.integers(1, 3))):  # mitochondria: elongated, dark, striped
            i = int(rng.integers(len(ys)))
            a, b = float(rng.uniform(6, 16)), float(rng.uniform(3, 6))
            sy, sx, dy, dx = _window(float(ys[i]), float(xs[i]), a + 1, size)
            ang = float(rng.uniform(0, math.pi))
            u = (dx * math.cos(ang) + dy * math.sin(ang)) / a
            v = (-dx * math.sin(ang) + dy * math.cos(ang)) / b
            body = (u * u + v * v <= 1.0) & (cells[sy, sx] == cid) & inner[sy, sx]
            cristae = 0.5 + 0.5 * np.cos(2.0 * math.pi * u * a / 3.2)
            win = dark[sy, sx]
            win[body] = np.maximum(win[body], 0.55 + 0.3 * cristae[body])
    for _ in range(int(rng.integers(8, 16))):  # vesicle clusters: small dark rings
        cy, cx = (int(v) for v in rng.integers(0, size, 2))
        if not inner[cy, cx]:
            continue
        cid = cells[cy, cx]
        for _ in range(int(rng.integers(5, 14))):
            r = float(rng.uniform(1.8, 3.2))
            sy, sx, dy, dx = _window(cy + rng.normal(0, 7), cx + rng.normal(0, 7), r + 2, size)
            ring = (np.abs(np.hypot(dy, dx) - r) < 0.9) & (cells[sy, sx] == cid) & inner[sy, sx]
            win = dark[sy, sx]
            win[ring] = np.maximum(win[ring], 0.7)
    return dark


def render_cells(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like image and its cells.

    Returns:
        ``(image uint8, cell id map int32)``: 0 = membrane, 1..N one id per cell.
    """
    cells, strength = _tessellate(rng, size)
    gray = np.zeros((size, size), np.float32)
    levels = rng.uniform(150, 200, cells.max() + 1).astype(np.float32)
    gray[:] = levels[cells]
    texture = 0.6 * _smooth_noise(rng, (size, size), 1.2) + 0.4 * _smooth_noise(rng, (size, size), 4.0)
    gray += 12.0 * texture.astype(np.float32)
    dark = _organelles(rng, cells)
    gray = gray * (1.0 - 0.6 * dark)
    membrane_level = rng.uniform(35, 70)
    gray = gray * (1.0 - strength) + membrane_level * strength
    gray = ndimage.gaussian_filter(gray, float(rng.uniform(0.8, 1.4)))  # the microscope's blur
    grad = rng.uniform(-15, 15, 2)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    gray += grad[0] * yy + grad[1] * xx  # slow illumination change
    gray += rng.normal(0, float(rng.uniform(8, 14)), gray.shape)  # shot-like noise
    return np.clip(gray, 0, 255).astype(np.uint8), cells


def generate_cells_data(out_dir: str | Path, images: int = CELLS_IMAGES, seed: int = 0, size: int = 512) -> Path:
    """Write ``images`` EM-like images and cell masks to ``out_dir/images`` and ``out_dir/masks``.

    Every file is written through :func:`medseg.io.atomic_write_bytes` (complete and on
    disk) into a staging folder next to ``out_dir``, whose ``images/`` and ``masks/`` are then
    renamed into place: an interrupted run never leaves a half-written dataset under ``out_dir``.

    Args:
        out_dir: the dataset root (``data.root`` of ``pipelines/cells.yaml``).
        images: number of image/mask pairs (≥ 3, so that train, val and test are all non-empty).
        seed: generator seed (the same seed writes the same files).
        size: image side in pixels (≥ 64).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if images < 3:
        raise ValueError(f"images must be >= 3 (one each for train, validation and test), got {images}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px, got {size}")
    root = Path(out_dir)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_bytes(tmp / _INCOMPLETE, b"")
    rng = np.random.default_rng(seed)
    for i in range(images):
        image, cells = render_cells(rng, size)
        write_png(tmp / "images" / f"cells_{i:03d}.png", image, params=())
        mask = np.where(cells > 0, 255, 0).astype(np.uint8)
        write_png(tmp / "masks" / f"cells_{i:03d}.png", mask, params=())
    (tmp / _INCOMPLETE).unlink()
    # the staged folders are complete and durable: move them into place (a rename each)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        for sub in ("images", "masks"):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(tmp / sub, root / sub)
        shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(root)
    else:
        os.replace(tmp, root)
    fsync_dir(root.parent)
    return root

