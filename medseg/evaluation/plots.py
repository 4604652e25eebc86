"""Pictures people look at: validation overlay grids, the demo-data preview and the evaluation plots.

Every figure is drawn with matplotlib's Agg backend (no display needed) and written atomically.
:func:`save_evaluation_plots` draws what ``medseg evaluate`` logs: the FROC curve, Dice by lesion
type (both protocols), the measured vs annotated long axis and the worst lesions as overlays.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medseg.data.base import DataError
from medseg.data.deeplesion import HU_OFFSET, LesionRecord, png_to_hu, read_dl_info
from medseg.io import atomic_write_bytes
from medseg.lesion import COARSE_LESION_TYPES, LESION_TYPES
from medseg.metrics import FROC_FP_RATES

__all__ = ["plot_dice_by_type", "plot_froc", "plot_long_axis", "plot_worst_lesions", "render_preview",
           "save_evaluation_plots", "save_overlay_grid"]


def _save(fig: Any, path: Path, **kwargs: Any) -> Path:
    """Render ``fig`` in memory (format from ``path``'s suffix, PNG by default) and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=kwargs.pop("format", path.suffix.lstrip(".").lower() or "png"), **kwargs)
    atomic_write_bytes(path, buf.getvalue())
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


# ----------------------------------------------------------------------------- evaluation plots


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _num(v: Any) -> float:
    """A float from a table cell (None / "" → NaN)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_froc(fp_per_image: np.ndarray, sensitivity: np.ndarray, path: Path, title: str = "") -> Path:
    """The FROC curve (log-2 FP axis) with the sensitivity marked at each reached operating point;
    rates the sweep never reached are shaded, not extrapolated."""
    fig = _figure(6, 4.2)
    ax = fig.subplots()
    fp, sens = np.asarray(fp_per_image, float), np.asarray(sensitivity, float)
    lo = min(FROC_FP_RATES) / 2
    x = np.maximum(fp, lo)
    ax.step(x, sens, where="post", color="tab:blue", lw=1.8, label="FROC")
    max_fp = float(fp[-1]) if fp.size else 0.0
    for r in FROC_FP_RATES:
        if r <= max_fp + 1e-9:
            s = float(sens[fp <= r + 1e-9].max())
            ax.plot([r], [s], "o", color="tab:blue")
            ax.annotate(f"{s:.2f}", (r, s), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if fp.size:
        ax.plot([max(max_fp, lo)], [float(sens[-1])], "s", color="tab:blue", mfc="white",
                label=f"all candidates: {max_fp:.2f} FP/image, sensitivity {float(sens[-1]):.2f}")
    hi = max(FROC_FP_RATES) * 1.5
    if max_fp < hi:
        ax.axvspan(max(max_fp, lo), hi, color="0.85", label=f"not reached (> {max_fp:.2f} FP/image)")
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(FROC_FP_RATES), [f"{r:g}" for r in FROC_FP_RATES])
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "FROC", fontsize=10)
    return _save(fig, path)


def _type_label(code: Any) -> str:
    try:
        return COARSE_LESION_TYPES.get(int(code), f"type {code}").replace("_", " ")
    except (TypeError, ValueError):
        return "all"


def plot_dice_by_type(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Per coarse lesion type: lesion Dice (whole slice) and ROI Dice of every lesion, with the means."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_type_label(r.get("lesion_type")), []).append(r)
    names = sorted(groups)
    fig = _figure(max(5.0, 1.2 * len(names) + 2), 4.2)
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # jitter only
    for j, (col, color, dx) in enumerate((("dice", "tab:orange", -0.17), ("roi_dice", "tab:blue", 0.17))):
        for i, name in enumerate(names):
            v = np.array([_num(r.get(col)) for r in groups[name]])
            v = v[np.isfinite(v)]
            if not v.size:
                continue
            ax.scatter(i + dx + rng.uniform(-0.06, 0.06, v.size), v, s=12, color=color, alpha=0.6,
                       label=("whole slice (lesion Dice)", "lesion ROI (ROI Dice)")[j] if i == 0 else None)
            ax.plot([i + dx - 0.12, i + dx + 0.12], [v.mean()] * 2, color=color, lw=2.5)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={len(groups[n])})" for n in names], fontsize=8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice per lesion (bar = mean)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "Dice by lesion type", fontsize=10)
    return _save(fig, path)


def plot_long_axis(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Long axis measured on the prediction against the annotated one (the RECIST mark where the data
    has it, else the true mask's), for the whole-slice match and the ROI; the diagonal is perfect."""
    fig = _figure(5, 5)
    ax = fig.subplots()
    ref = np.array([_num(r.get("recist_long_mm")) if np.isfinite(_num(r.get("recist_long_mm")))
                    else _num(r.get("true_long_mm")) for r in rows])
    top = 1.0
    drawn = False
    for col, color, label in (("pred_long_mm", "tab:orange", "whole slice (matched components)"),
                              ("roi_pred_long_mm", "tab:blue", "lesion ROI (largest component)")):
        y = np.array([_num(r.get(col)) for r in rows])
        ok = np.isfinite(y) & np.isfinite(ref)
        if ok.any():
            ax.scatter(ref[ok], y[ok], s=14, color=color, alpha=0.7, label=label)
            top = max(top, float(ref[ok].max()), float(y[ok].max()))
            drawn = True
    ax.plot([0, top * 1.05], [0, top * 1.05], color="0.4", lw=1, ls="--")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("annotated long axis (mm)")
    ax.set_ylabel("long axis measured on the prediction (mm)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no lesion was predicted", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "RECIST long axis", fontsize=10)
    return _save(fig, path)


def plot_worst_lesions(worst: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """The lowest-ROI-Dice lesions: each crop with the truth (green), prediction (red) and ROI (dashed)."""
    from matplotlib.patches import Rectangle

    n = max(len(worst), 1)
    cols = min(n, 5)
    rows_n = (n + cols - 1) // cols
    fig = _figure(2.6 * cols, 2.8 * rows_n)
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, w in zip(axes, worst):
        img = w.get("image")
        ax.imshow(img if img is not None else np.zeros(w["truth"].shape), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        for mask, color in ((w["truth"], "lime"), (w["pred"], "red")):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1)
        x0, y0, x1, y1 = w["box"]
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow", ls="--", lw=0.8))
        ax.set_title(f"{w['title']}\nROI Dice {w['dice']:.2f}", fontsize=7)
    if not worst:
        axes[0].text(0.5, 0.5, "no lesions", ha="center", va="center")
    fig.suptitle(title or "worst lesions (truth green, prediction red, ROI dashed)", fontsize=10)
    return _save(fig, path)


def save_evaluation_plots(
    rows: list[dict[str, Any]],
    out_dir: Path,
    froc: tuple[np.ndarray, np.ndarray] | None = None,
    worst: list[dict[str, Any]] | None = None,
    title: str = "",
    suffix: str = "",
) -> list[Path]:
    """Write the evaluation's PNG plots into ``out_dir``; returns their paths.

    ``froc<suffix>.png`` (when FROC ran), ``dice_by_type<suffix>.png`` and ``long_axis<suffix>.png``
    (from the per-lesion rows, when there are lesions), ``worst_lesions<suffix>.png`` (when crops
    were kept).
    """
    out_dir = Path(out_dir)
    paths = []
    if froc is not None:
        paths.append(plot_froc(froc[0], froc[1], out_dir / f"froc{suffix}.png", f"FROC · {title}" if title else ""))
    if rows:
        paths.append(plot_dice_by_type(rows, out_dir / f"dice_by_type{suffix}.png", f"Dice by lesion type · {title}"
                                       if title else ""))
        paths.append(plot_long_axis(rows, out_dir / f"long_axis{suffix}.png", f"long axis · {title}" if title else ""))
    if worst:
        paths.append(plot_worst_lesions(worst, out_dir / f"worst_lesions{suffix}.png",
                                        f"{len(worst)} lowest ROI Dice · {title} (truth green, prediction red, "
                                        "ROI dashed)" if title else ""))
    return paths
