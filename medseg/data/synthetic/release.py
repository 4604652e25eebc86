"""The DeepLesion-format release writer: :func:`generate_demo_data` (images, ``DL_info.csv``, masks).

Plans the release (:mod:`~medseg.data.synthetic.plan`), places and validates the lesions
(:mod:`~medseg.data.synthetic.lesions`), measures RECIST on each true key-slice mask
(:func:`rows_for_group`), renders every slice of the key slices' blocks (anatomy, texture,
lesions, partial-volume blur, correlated noise: :func:`render_slice`) and writes them, all through
:mod:`medseg.io`. ``DL_info.csv`` is written last: a folder holding it is a finished release.

Example:
    >>> root = generate_demo_data("data/demo", patients=4, progress=False)
    >>> (root / "DL_info.csv").exists()
    True
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from medseg.data.base import DataError
from medseg.data.deeplesion.format import COLUMNS, HU_OFFSET
from medseg.data.deeplesion.format import format_numbers as fmt
from medseg.data.synthetic.anatomy import TEXTURE, render_anatomy, series_array
from medseg.data.synthetic.lesions import lesion_map, place_group, validate_group
from medseg.data.synthetic.plan import Group, Series, make_patients, make_series, plan_groups
from medseg.data.synthetic.shapes import choice
from medseg.io import atomic_write_bytes, atomic_write_text
from medseg.lesion import LESION_TYPES, measure_recist

__all__ = ["PNG_FAST", "generate_demo_data", "mark_noisy", "render_slice", "rows_for_group", "write_png",
           "write_series"]

log = logging.getLogger("medseg.data")

_INCOMPLETE = ".medseg_demo_incomplete"
#: fast zlib level with run-length matching: the smallest and quickest of OpenCV's options on noisy CT
PNG_FAST = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE)
_HU_MIN, _HU_MAX = -1024, 3071


def render_slice(
    se: Series, index: int, group: Group | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint16 PNG array (HU + 32768) of slice ``index`` and its instance mask (None if empty)."""
    t = se.t(index)
    n = se.size
    hu, tis, _ = render_anatomy(se, t)
    w = 2 * math.pi * t / 90.0
    tex0, tex1 = series_array(se, "tex0"), series_array(se, "tex1")
    tex = tex0 * np.float32(math.cos(w)) + tex1 * np.float32(math.sin(w))
    hu += TEXTURE[tis] * tex
    ids = None
    if group is not None and group.lesions:
        ids, lev = lesion_map(group.lesions, t, se.spacing, n)
        if ids.any():
            edge = np.array([0] + [x.hu_edge for x in group.lesions], np.float32)
            centre = np.array([0] + [x.hu_centre for x in group.lesions], np.float32)
            m = ids > 0
            k = ids[m]
            lv = lev[m]
            hu[m] = edge[k] + (centre[k] - edge[k]) * (1 - lv * lv) + 6.0 * tex[m]
        else:
            ids = None
    # partial-volume blur, then correlated quantum noise (CT noise is not white)
    hu = cv2.GaussianBlur(hu, (5, 5), 0.7)
    noise = rng.standard_normal((n, n), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (5, 5), 0.8)
    k1 = cv2.getGaussianKernel(5, 0.8, cv2.CV_64F).ravel()
    hu += noise * np.float32(se.noise / float((k1**2).sum()))
    hu[series_array(se, "fov").view(bool)] = _HU_MIN
    out = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int32) + HU_OFFSET
    return out.astype(np.uint16), ids


def rows_for_group(
    rng: np.random.Generator, se: Series, g: Group, masks: list[np.ndarray], bbox: tuple[int, int, int, int]
) -> None:
    """Measure RECIST on each true key-slice mask and fill ``g.rows`` (one CSV row per lesion)."""
    p = se.patient
    x0, y0, x1, y1 = bbox
    for les, mask in zip(g.lesions, masks):
        axes = measure_recist(mask)
        if axes is None:  # cannot happen after validate_group; kept as a guard
            raise DataError(f"{se.name}/{g.key:03d}.png: a generated lesion has an empty key-slice mask")
        pts = np.concatenate([np.asarray(axes.long, float), np.asarray(axes.short, float)]) + 1.0  # 1-based
        box = [pts[:, 0].min() - 5, pts[:, 1].min() - 5, pts[:, 0].max() + 5, pts[:, 1].max() + 5]
        diam = [axes.long_px, axes.short_px]
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean(), ys.mean()
        loc = [
            np.clip((cx - x0) / max(x1 - x0, 1), 0, 1),
            np.clip((cy - y0) / max(y1 - y0, 1), 0, 1),
            np.clip(0.12 + se.t(g.key) / 900.0, 0, 1),
        ]
        code = LESION_TYPES[les.kind]
        if p.split == 1 and rng.random() < 0.75:  # most training lesions carry no type label
            code = -1
        g.rows.append([
            f"{se.name}_{g.key:03d}.png", str(p.index), str(se.study), str(se.series_id), str(g.key),
            fmt(pts.ravel()), fmt(box), fmt(diam), fmt(loc), str(code), "0",
            fmt([g.first, g.last]), se.spacing_text, fmt([se.size, se.size]), fmt(les.window),
            p.gender, "" if se.age is None else str(se.age), str(p.split),
        ])  # fmt: skip


def mark_noisy(rng: np.random.Generator, rows: list[list[str]], share: float = 0.03) -> None:
    """Flag a few rows ``Possibly_noisy`` (at least one) and make their marks careless.

    The endpoints move by ~2 px; box and diameters are recomputed from them, as in the real file.
    """
    col = {name: i for i, name in enumerate(COLUMNS)}
    k = max(1, round(share * len(rows)))
    for i in rng.choice(len(rows), size=min(k, len(rows)), replace=False):
        r = rows[int(i)]
        pts = np.array([float(v) for v in r[col["Measurement_coordinates"]].split(",")]).reshape(4, 2)
        pts = np.maximum(pts + rng.normal(0, 2.0, pts.shape), 1.0)
        diam = [float(np.linalg.norm(pts[1] - pts[0])), float(np.linalg.norm(pts[3] - pts[2]))]
        if diam[1] > diam[0]:  # the long axis stays the first pair
            pts, diam = pts[[2, 3, 0, 1]], diam[::-1]
        r[col["Measurement_coordinates"]] = fmt(pts.ravel())
        r[col["Bounding_boxes"]] = fmt([*(pts.min(0) - 5), *(pts.max(0) + 5)])
        r[col["Lesion_diameters_Pixel_"]] = fmt(diam)
        r[col["Possibly_noisy"]] = "1"


def generate_demo_data(
    out_dir: str | Path, patients: int | None = None, seed: int = 0, progress: bool = True, image_size: int = 512
) -> Path:
    """Write a generated DeepLesion-format release (images, ``DL_info.csv``, true masks).

    The default (``data.demo_patients`` = 90 patients, seed 0) gives 227 lesions on 145 key slices
    (test split: 37 lesions on 24 key slices). Files are byte-identical for the same
    arguments. ``DL_info.csv`` is written last (atomically, :mod:`medseg.io`), so a directory holding it is a
    finished release and is left as it is (whatever the arguments); an interrupted run is redone
    from scratch.

    Args:
        out_dir: release root; gets ``Images_png/``, ``Masks_png/`` and ``DL_info.csv``.
        patients: number of patients (≥ 3, so that train, validation and test are all non-empty);
            None = ``DataConfig.demo_patients``, the quick start's count.
        seed: seed of the one ``numpy.random.Generator`` every random choice is drawn from.
        progress: show a tqdm progress bar over the series.
        image_size: slice size in pixels (square); 512 like DeepLesion, smaller for fast tests
            (the field of view stays, so the pixel spacing grows).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: ``patients < 3`` or ``image_size < 96``.
        DataError: ``out_dir`` already holds ``Images_png`` or ``Masks_png`` that an interrupted
            run of this function did not write.

    Example:
        >>> root = generate_demo_data("data/demo", patients=4, seed=1, progress=False)
        >>> sorted(p.name for p in root.iterdir())
        ['DL_info.csv', 'Images_png', 'Masks_png']
    """
    if patients is None:
        from medseg.config import DataConfig

        patients = DataConfig().demo_patients
    if patients < 3:
        raise ValueError(f"patients must be >= 3 (one each for train, validation and test), got {patients}")
    if image_size < 96:
        raise ValueError(f"image_size must be >= 96 px, got {image_size}")
    root = Path(out_dir)
    csv_path = root / "DL_info.csv"
    if csv_path.exists():
        log.info("%s exists: keeping the generated data in %s", csv_path, root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _INCOMPLETE
    for sub in ("Images_png", "Masks_png"):
        if (root / sub).exists():
            if not marker.exists():
                raise DataError(
                    f"{root / sub} exists but {csv_path} does not, and it was not written by an "
                    "interrupted demo-data run; expected an empty or new directory for generated data"
                )
            shutil.rmtree(root / sub)
    atomic_write_text(marker, "generate_demo_data in progress\n")

    rng = np.random.default_rng(seed)
    pats = make_patients(rng, patients)
    plan: list[Series] = []
    for p in pats:
        n_studies = int(choice(rng, (1, 2, 3), (0.75, 0.2, 0.05)))
        studies = np.sort(rng.choice(np.arange(1, 9), n_studies, replace=False))
        for k, st in enumerate(studies):
            age = None if p.age is None else p.age + k + int(rng.integers(0, 2)) * k
            ids = [1] if rng.random() < 0.92 else [1, 2]
            if len(ids) == 1:
                ids = [int(choice(rng, (1, 2, 3), (0.7, 0.2, 0.1)))]
            for sid in ids:
                plan.append(make_series(rng, p, int(st), sid, age, image_size))

    rows: list[list[str]] = []
    min_px = max(6, round(12 * (image_size / 512) ** 2))
    with tqdm(total=len(plan), desc="demo-data", unit="series", disable=not progress) as bar:
        for se in plan:
            plan_groups(rng, se)
            for g in list(se.groups):
                masks: list[np.ndarray] = []
                for _attempt in range(20):  # a crowded or tiny key slice may reject every lesion
                    g.lesions = []
                    place_group(rng, se, g, int(choice(rng, (1, 2, 3), (0.6, 0.28, 0.12))))
                    masks = validate_group(se, g, min_px)
                    if g.lesions:
                        break
                if not g.lesions:
                    se.groups.remove(g)
                    continue
                _, _, bbox = render_anatomy(se, se.t(g.key))
                rows_for_group(rng, se, g, masks, bbox)
            if se.groups:
                write_series(rng, root, se)
            se.cache.clear()
            rows.extend(r for g in se.groups for r in g.rows)
            bar.update(1)
            bar.set_postfix(lesions=len(rows))

    mark_noisy(rng, rows)
    missing = {1, 2, 3} - {int(r[-1]) for r in rows}
    if missing:  # cannot happen: every patient gets at least one lesion in practice
        raise RuntimeError(f"generated data has no lesion in split(s) {sorted(missing)}; try another seed")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    marker.unlink()
    log.info("generated %d lesions in %d series under %s", len(rows), len(plan), root)
    return root


def write_series(rng: np.random.Generator, root: Path, se: Series) -> None:
    """Render and write every slice of the series' blocks, and the masks where lesions show."""
    img_dir = root / "Images_png" / se.name
    img_dir.mkdir(parents=True, exist_ok=True)
    owner: dict[int, Group] = {}
    for g in se.groups:
        for i in range(g.first, g.last + 1):
            owner[i] = g
    for i in sorted(owner):
        img, ids = render_slice(se, i, owner[i], rng)
        write_png(img_dir / f"{i:03d}.png", img)
        if ids is not None:
            write_png(root / "Masks_png" / se.name / f"{i:03d}.png", ids)


def write_png(path: Path, array: np.ndarray, params: Sequence[int] = PNG_FAST) -> None:
    """Encode ``array`` as PNG (OpenCV ``params``) and write it through :func:`medseg.io.atomic_write_bytes`."""
    ok, buf = cv2.imencode(".png", array, list(params))
    if not ok:
        raise DataError(f"{path}: OpenCV could not encode a {array.dtype} array of shape {array.shape} as PNG")
    atomic_write_bytes(path, buf.tobytes())

