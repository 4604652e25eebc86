"""Inputs of ``medseg predict``: find the cases in INPUT, read one, and pre-process it as in training.

INPUT is a DICOM folder (any nesting; every series matching ``predict.*`` rules is a case), a NIfTI
file or folder (each volume is a case) or a folder of PNG / TIFF images (each image is a case);
a folder may mix them. Every file that is not used is reported with its reason.

Pre-processing repeats what the model's training dataset did (the model's own config):

* intensity: the model's window rule (:mod:`medseg.data.windowing`), as training applied it: a DICOM
  series by :func:`medseg.data.dicom.dicom_windows` (``fixed`` → ``data.window_range``; ``multi`` →
  ``data.windows`` as channels; ``dicom`` → the series' first WindowCenter / WindowWidth pair);
  NIfTI input → ``data.window_range`` (or ``data.windows``); PNG / TIFF →
  the ``folder`` dataset's rule (dtype range, or ``window_range`` when fixed);
* 2.5-D: ``data.context_slices`` channels ``data.slice_offset_mm`` apart, interpolated between the
  real slice positions (uneven spacing and gaps honoured) and clamped at the stack's ends;
* resampling to ``data.spacing_mm``; every output goes back to the source grid with
  :func:`medseg.data.base.to_source_grid`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.data.base import DataError, context_indices, resample_sample, resampled_shape, stack_context
from medseg.data.dicom import (
    HeaderRecord,
    SeriesGeometry,
    SeriesInfo,
    dicom_windows,
    find_series,
    read_series_hu,
    series_geometry,
)
from medseg.data.images import (
    SUFFIXES_2D,
    SUFFIXES_3D,
    file_stem,
    intensity_range,
    normalise_2d,
    read_image_2d,
)
from medseg.data.windowing import apply_windows, window_set

__all__ = ["Case", "Loaded", "discover", "load_case", "model_inputs", "safe_name"]

log = logging.getLogger("medseg.predict")

_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass
class Case:
    """One unit of work: a DICOM stack, a NIfTI volume or a 2-D image.

    ``key`` is stable and non-identifying (a hash for DICOM); ``study`` / ``name`` are the output
    folder names (hashes of UIDs for DICOM; a cleaned file stem plus a hash for files).
    """

    kind: str
    key: str
    study: str
    name: str
    #: the input files (a DICOM case's: :attr:`SeriesInfo.distinct_files`, read from the index file when
    #: the series was indexed into one)
    files: Sequence[Path]
    info: SeriesInfo | None = None
    path: Path | None = None

    @property
    def out_rel(self) -> str:
        """The output folder relative to OUTPUT_DIR."""
        return f"{self.study}/{self.name}"


@dataclass
class Loaded:
    """A case read into memory and pre-processed for the model.

    Attributes:
        values: ``(Z, H, W)`` source values on the source grid: float32 HU for DICOM, float32 for NIfTI,
            the stored dtype for PNG / TIFF (uint8, uint16, ...; no float copy of a large image).
        images: ``(Z, C, h, w)`` float32 model inputs (after windowing, 2.5-D stacking, resampling); with
            ``input_window``, the source values themselves (a ``(Z, 1, H, W)`` view of ``values``).
        input_window: ``(low, high)`` when the model input is ``apply_window(images, low, high)``, left for
            :func:`~medseg.predict.case.predict_case` to build a tile batch at a time (an integer PNG / TIFF
            the model sees on its own grid, one context channel: 1–2 bytes a pixel instead of 4).
        meta: the meta of a resampled sample (for :func:`to_source_grid`).
        spacing: ``(sy, sx)`` mm/px of the source grid (1, 1 for PNG / TIFF).
        geom: the DICOM geometry (None for files).
        nifti: ``{"affine", "header", "canonical"}`` for NIfTI input.
        info: what ``series.json`` records about the input (no patient data).
    """

    case: Case
    values: np.ndarray
    images: np.ndarray
    meta: dict[str, Any]
    spacing: tuple[float, float]
    geom: SeriesGeometry | None = None
    nifti: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    read_s: float = 0.0
    input_window: tuple[float, float] | None = None


def safe_name(stem: str, unique: str) -> str:
    """A folder / file name from a file stem: ``[A-Za-z0-9._-]`` only, ≤ 48 chars, plus a short hash."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:48].strip("._-") or "case"
    return f"{clean}-{hashlib.sha256(unique.encode()).hexdigest()[:8]}"


def _study_folder(uid: str) -> str:
    return "study-" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def select_reason(info: SeriesInfo, cfg: Config) -> str | None:
    """Why ``predict.*`` rules exclude a DICOM stack, or None when it is processed."""
    p = cfg.predict
    if p.modalities and info.modality.upper() not in {m.upper() for m in p.modalities}:
        return f"modality {info.modality[:16]!r} is not in predict.modalities {p.modalities}"
    if info.part and p.mixed_orientation == "skip":
        return "series with mixed orientations (predict.mixed_orientation = skip)"
    if p.orientations and info.orientation not in p.orientations:
        return f"{info.orientation} stack; predict.orientations = {p.orientations}"
    if p.body_parts and info.body_part.upper() not in {b.upper() for b in p.body_parts}:
        return f"body part {info.body_part[:16]!r} is not in predict.body_parts {p.body_parts}"
    if len(info.instances) < p.min_slices:
        return f"{len(info.instances)} slice(s) < predict.min_slices = {p.min_slices}"
    return None


def discover(root: str | Path, cfg: Config, exclude: list[Path] | None = None,
             read_headers: Callable[[list[Path]], Iterable[HeaderRecord]] | None = None,
             index: Path | None = None) -> tuple[list[Case], list[tuple[Path, str]]]:
    """The cases under INPUT and every file not used, with its reason.

    Args:
        root: a DICOM / NIfTI / PNG / TIFF folder, or one NIfTI / PNG / TIFF file.
        exclude: folders not to enter (OUTPUT_DIR when it lies inside INPUT).
        read_headers: how the DICOM headers are read (:func:`medseg.data.dicom.find_series`; the
            ray engine reads them in parallel tasks).
        index: the SQLite file that holds the DICOM instance headers (:func:`find_series`), None: in memory.

    Returns:
        ``(cases sorted by key, [(file, reason)] in path order)``.

    Raises:
        DataError: INPUT does not exist.
    """
    root = Path(root)
    if root.is_file():
        stem3, stem2 = file_stem(root.name, SUFFIXES_3D), file_stem(root.name, _IMAGE_SUFFIXES)
        if stem3 is not None:
            return [_file_case("nifti", root, root.parent)], []
        if stem2 is not None:
            return [_file_case("image", root, root.parent)], []
        raise DataError(f"{root}: expected a folder, a NIfTI (.nii, .nii.gz) or a PNG / TIFF file")
    if not root.is_dir():
        raise DataError(f"INPUT {root} does not exist")
    series, skipped_files = find_series(root, exclude=exclude or [], read_headers=read_headers, index=index)
    cases: list[Case] = []
    skipped: list[tuple[Path, str]] = []
    for sf in skipped_files:
        name = sf.path.name
        if file_stem(name, SUFFIXES_3D) is not None:
            cases.append(_file_case("nifti", sf.path, root))
        elif file_stem(name, _IMAGE_SUFFIXES) is not None:
            cases.append(_file_case("image", sf.path, root))
        else:
            skipped.append((sf.path, sf.reason))
    for info in series:
        for lab in info.labels:
            skipped.append((lab.path, f"{lab.kind} object (a label of another series), not an input image"))
        reason = select_reason(info, cfg)
        if reason:
            skipped += [(p, f"series skipped: {reason}") for p in info.distinct_files]
            continue
        cases.append(Case("dicom", info.key, _study_folder(info.study_uid or info.series_uid),
                          f"series-{info.key}", info.distinct_files, info=info))
    cases.sort(key=lambda c: c.key)
    skipped.sort(key=lambda t: str(t[0]))
    return cases, skipped


def _file_case(kind: str, path: Path, root: Path) -> Case:
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = path.name
    stem = file_stem(path.name, SUFFIXES_3D if kind == "nifti" else SUFFIXES_2D) or path.stem
    name = safe_name(stem, rel)
    key = f"{kind}-{hashlib.sha256(rel.encode()).hexdigest()[:12]}"
    return Case(kind, key, "nifti" if kind == "nifti" else "images", name, [path], path=path)


# ----------------------------------------------------------------------------- pre-processing


def model_inputs(values: np.ndarray, z_mm: np.ndarray, spacing: tuple[float, float], windows: list[tuple[float, float]],
                 cfg: Config) -> tuple[np.ndarray, dict[str, Any]]:
    """``(Z, C, h, w)`` model inputs of a stack, as the training datasets build them.

    Args:
        values: ``(Z, H, W)`` HU (or image values), slices ascending along the normal.
        z_mm: ``(Z,)`` slice positions along the normal (mm), ascending.
        spacing: ``(sy, sx)`` mm/px.
        windows: the window rule's ``(low, high)`` windows (:func:`medseg.data.windowing.window_set`),
            each applied to every slice's context stack (window-major channels).
        cfg: the model's config (``data.context_slices``, ``slice_offset_mm``, ``spacing_mm``).

    Returns:
        ``(images, meta)``; ``meta`` is the resampled samples' meta (same for every slice).
    """
    d = cfg.data
    n = len(z_mm)
    out = []
    meta: dict[str, Any] = {}
    for k in range(n):
        mm = context_indices(float(z_mm[k]), d.context_slices, d.slice_offset_mm, 1.0, float(z_mm[0]), float(z_mm[-1]))
        pos = [float(p) for p in np.round(np.interp(mm, z_mm, np.arange(n)), 6)] if n > 1 else [0.0] * len(mm)
        hu = stack_context(lambda i: values[i], pos, available=range(n))
        sample = {"image": apply_windows(hu, windows), "meta": {"spacing": [spacing[0], spacing[1]]}}
        sample = resample_sample(sample, d.spacing_mm)
        out.append(sample["image"])
        meta = sample["meta"]
    return np.stack(out).astype(np.float32), meta


def load_case(case: Case, cfg: Config) -> Loaded:
    """Read a case and build its model inputs (runs in the prefetch thread).

    Raises:
        DataError: inconsistent geometry, undecodable pixels, unreadable files (names the file).
    """
    t0 = time.perf_counter()
    if case.kind == "dicom":
        assert case.info is not None
        geom = series_geometry(case.info)
        values = read_series_hu(geom)
        warnings = list(geom.warnings)
        wins, note = dicom_windows(cfg.data, geom.windows)
        if note:
            warnings.append(note)
        spacing = (float(geom.spacing[1]), float(geom.spacing[2]))
        images, meta = model_inputs(values, geom.slice_positions, spacing, wins, cfg)
        loaded = Loaded(case, values, images, meta, spacing, geom=geom, warnings=warnings,
                        info={"window": list(wins[0]), "modality": case.info.modality[:16],
                              "orientation": case.info.orientation, "split_part": case.info.part})
    elif case.kind == "nifti":
        loaded = _load_nifti(case, cfg)
    else:
        loaded = _load_image(case, cfg)
    loaded.read_s = time.perf_counter() - t0
    return loaded


def _load_nifti(case: Case, cfg: Config) -> Loaded:
    import nibabel as nib

    assert case.path is not None
    try:
        img = nib.load(str(case.path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise DataError(f"{case.path}: NIfTI of shape {img.shape}; expected a 3-D volume")
        canon = nib.as_closest_canonical(img)
        vol = canon.get_fdata(dtype=np.float32)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{case.path}: cannot read the NIfTI volume ({type(e).__name__}: {e})") from None
    ax = cfg.data.axis
    zooms = [float(z) for z in canon.header.get_zooms()[:3]]
    values = np.ascontiguousarray(np.moveaxis(vol, ax, 0))
    spacing = tuple(zooms[a] for a in range(3) if a != ax)
    z_mm = np.arange(values.shape[0]) * zooms[ax]
    wins = window_set(cfg.data, None)[0]
    window = wins[0]
    images, meta = model_inputs(values, z_mm, spacing, wins, cfg)  # type: ignore[arg-type]
    return Loaded(case, values, images, meta, spacing, warnings=[],  # type: ignore[arg-type]
                  nifti={"affine": img.affine, "header": img.header, "canonical_affine": canon.affine,
                         "shape": tuple(int(s) for s in img.shape), "axis": ax},
                  info={"window": list(window), "axis": ax, "zooms": zooms})


def _load_image(case: Case, cfg: Config) -> Loaded:
    assert case.path is not None
    arr, colour = read_image_2d(case.path)
    warnings = ["colour image converted to grayscale (BT.601 luma)"] if colour else []
    c = cfg.data.context_slices
    if c != 1:
        warnings.append(f"2-D image: its one slice fills all {c} context channels")
    info = {"spacing_unit": "px", "window": cfg.data.window}
    target = cfg.data.spacing_mm
    h, w = arr.shape
    if c == 1 and np.issubdtype(arr.dtype, np.integer) and (
            target is None or resampled_shape((h, w), (1.0, 1.0), target) == (h, w)):
        # no resampling, one channel: the model input is normalise_2d's apply_window of the stored values,
        # left to predict_case (a tile batch at a time where the window allows) — no float32 copy here
        rng = intensity_range(arr, cfg.data.window, cfg.data.window_range)
        assert rng is not None  # an integer image always has its dtype's range, or the fixed window
        return Loaded(case, arr[None], arr[None, None], {"spacing": [1.0, 1.0]}, (1.0, 1.0), warnings=warnings,
                      info=info, input_window=rng)
    # one float32 image (normalise_2d), resampled once (every context channel is the same slice); only
    # c > 1 pays a copy per extra channel — no float64, repeat-then-resample or astype copies
    sample = resample_sample({"image": normalise_2d(arr, cfg.data.window, cfg.data.window_range)[None],
                              "meta": {"spacing": [1.0, 1.0]}}, cfg.data.spacing_mm)
    image = sample["image"].astype(np.float32, copy=False)
    if c != 1:
        image = np.repeat(image, c, 0)
    # the source values stay in their stored dtype (a uint8 PNG: 1 byte a pixel, not a float32 copy)
    return Loaded(case, arr[None], image[None], sample["meta"], (1.0, 1.0), warnings=warnings, info=info)
