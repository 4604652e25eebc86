"""Pictures people look at: validation overlay grids and the demo-data preview.

Every figure is drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medseg.data.base import DataError
from medseg.data.deeplesion import HU_OFFSET, LesionRecord, png_to_hu, read_dl_info
from medseg.data.synthetic import LESION_TYPES

__all__ = ["render_preview", "save_overlay_grid"]


def _save(fig: Any, path: Path, **kwargs: Any) -> Path:
    """``fig.savefig`` to a temp file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
    return path


def save_overlay_grid(examples: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """A PNG grid: one row per example with the image, the truth and the prediction outlined.

    Args:
        examples: dicts with ``image`` ``(C, H, W)`` in [0, 1] (the middle channel is drawn),
            ``truth`` and ``pred`` ``(H, W)`` masks, and ``title``.
        path: the PNG to write.
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(examples)
    fig = Figure(figsize=(9, 3 * n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, ex in zip(axes, examples):
        img = ex["image"][ex["image"].shape[0] // 2]
        for ax, (name, mask, color) in zip(row, [("image", None, None), ("truth", ex["truth"], "lime"),
                                                  ("prediction", ex["pred"], "red")]):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if mask is not None and mask.any():
                ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=1)
            ax.set_title(f"{name} {ex['title'] if name == 'image' else ''}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3 * n)))  # leave room for the title
    return _save(fig, path, dpi=80)


def render_preview(root: str | Path, out_png: str | Path, file_name: str | None = None) -> Path:
    """Draw one key slice with its true mask outlines and the RECIST axes from ``DL_info.csv``.

    The slice is shown in the first row's DICOM window, whole and zoomed on its lesions; each
    lesion's true outline (``Masks_png``, where present) is drawn in yellow, the long axis in red
    and the short axis in cyan, from the CSV's coordinates (read by
    :func:`medseg.data.deeplesion.read_dl_info`).

    Args:
        root: a DeepLesion-format release (``DL_info.csv`` + ``Images_png``).
        out_png: where to write the figure (PNG).
        file_name: the key slice's ``File_name`` (e.g. ``000001_01_01_109.png``); None picks the
            key slice with the most lesions (ties: the largest lesion).

    Returns:
        ``Path(out_png)``.

    Raises:
        DataError: the CSV, the file name or the image is missing or unreadable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    root = Path(root)
    csv_path = root / "DL_info.csv"
    by_file: dict[str, list[LesionRecord]] = {}
    for r in read_dl_info(csv_path):
        by_file.setdefault(r.file_name, []).append(r)
    if not by_file:
        raise DataError(f"{csv_path}: no lesion rows")
    if file_name is None:
        file_name = max(by_file, key=lambda f: (len(by_file[f]), max(r.diameters_px[0] for r in by_file[f])))
    if file_name not in by_file:
        raise DataError(f"{csv_path}: no row with File_name {file_name!r}")
    sel = by_file[file_name]
    series, sl = sel[0].series, f"{sel[0].key_slice:03d}"
    img_path = root / "Images_png" / series / f"{sl}.png"
    img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16:
        raise DataError(f"{img_path}: missing or not a 16-bit PNG (HU + {HU_OFFSET})")
    hu = png_to_hu(img)
    mask = cv2.imread(str(root / "Masks_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED)
    low, high = sel[0].window
    sp = sel[0].spacing[0]
    names = {v: k.replace("_", " ") for k, v in LESION_TYPES.items()}

    boxes = np.array([r.bbox for r in sel])
    x0, y0 = boxes[:, :2].min(0)
    x1, y1 = boxes[:, 2:].max(0)
    half = max(x1 - x0, y1 - y0) / 2 + 25
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    fig = Figure(figsize=(11, 5.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, zoom in zip(axes, (False, True)):
        ax.imshow(hu, cmap="gray", vmin=low, vmax=high, interpolation="nearest" if zoom else "antialiased")
        if mask is not None:
            for k in range(1, int(mask.max()) + 1):
                if (mask == k).any():
                    ax.contour(mask == k, levels=[0.5], colors=["yellow"], linewidths=1.0)
        for k, r in enumerate(sel, 1):
            c = np.array(r.coords).reshape(4, 2)  # 0-based already
            ax.plot(c[:2, 0], c[:2, 1], "-", color="red", lw=1.4)
            ax.plot(c[2:, 0], c[2:, 1], "-", color="cyan", lw=1.4)
            if zoom:
                ax.text(c[:, 0].max() + 2, c[:, 1].min(), str(k), color="yellow", fontsize=10, clip_on=True)
        if zoom:
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy + half, cy - half)
        ax.set_axis_off()
    axes[0].set_title(f"{file_name}  window [{low:g}, {high:g}] HU  {sp:.3g} mm/px", fontsize=10)
    axes[1].set_title("true mask (yellow), RECIST long (red) / short (cyan)", fontsize=10)
    legend = []
    for k, r in enumerate(sel, 1):
        long_mm, short_mm = (d * sp for d in r.diameters_px)
        kind = names.get(r.lesion_type, "type unlabelled")
        legend.append(f"{k}: {kind}, {long_mm:.0f} × {short_mm:.0f} mm")
    axes[1].text(0.02, 0.98, "\n".join(legend), transform=axes[1].transAxes, va="top", color="white",
                 fontsize=9, bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"})
    return _save(fig, Path(out_png))
