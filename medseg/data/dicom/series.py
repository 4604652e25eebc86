"""A DICOM series as one stack: slice order and geometry from headers, then HU pixels and its window.

* :func:`series_geometry` orders a series' slices by ImagePositionPatient projected on the slice
  normal (never by InstanceNumber) and checks the series is one consistent stack
  → :class:`~medseg.data.dicom.records.SeriesGeometry`.
* :func:`read_series_hu` / :func:`read_frames_hu` / :func:`read_instance_hu` decode pixels (any
  transfer syntax :mod:`medseg.data.dicom.decoders` serves) and rescale them to HU;
  :func:`read_series` gives both → :class:`~medseg.data.dicom.records.Volume`.
* :func:`dicom_window` is the one rule for the intensity window of a DICOM series, shared by the
  ``dicom`` training dataset and ``medseg predict``: ``data.window: dicom`` → the series' first
  WindowCenter / WindowWidth pair (:func:`header_window`), ``fixed`` (or a series without one)
  → ``data.window_range``.

Example:
    >>> geom = series_geometry(series[0])                  # from find_series
    >>> hu = read_series_hu(geom)                          # float32 (Z, H, W)
    >>> low, high = dicom_window(cfg.data, geom.windows)[0]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.data.base import DataError
from medseg.data.dicom.decoders import register_decoders
from medseg.data.dicom.discover import group_item, num_frames
from medseg.data.dicom.records import (
    COSINE_TOL,
    POSITION_TOL,
    SeriesGeometry,
    SeriesInfo,
    Volume,
    describe,
)
from medseg.data.windowing import window_set

if TYPE_CHECKING:
    import pydicom

    from medseg.config import DataConfig

__all__ = [
    "PLUGIN_HELP",
    "dicom_window",
    "header_window",
    "read_frames_hu",
    "read_instance_hu",
    "read_series",
    "read_series_hu",
    "series_geometry",
    "volume_of",
]

log = logging.getLogger("medseg.data")
register_decoders()

PLUGIN_HELP = (
    "compressed DICOM needs pydicom decoder plugins; medseg depends on python-gdcm, pylibjpeg-openjpeg, "
    "pylibjpeg-rle, pyjpegls and imagecodecs (reinstall medseg if one is missing)"
)


def series_geometry(info: SeriesInfo) -> SeriesGeometry:
    """Order a series' slices along the slice normal and check it is one consistent stack.

    The order comes from ImagePositionPatient projected on the normal (the cross product of the
    ImageOrientationPatient row and column cosines), never from InstanceNumber. Non-uniform slice
    intervals, missing slices (an interval > 1.5 × the median) and positions that do not move
    along the normal (gantry tilt) are logged and recorded in ``warnings``; slices are kept as
    acquired (not resampled).

    Raises:
        DataError: differing orientation, image size or pixel spacing within the series, or two
            slices at one position (the message names the series and the files).
    """
    inst = list(info.instances)
    if not inst:
        raise DataError(f"{describe(info)} has no image instances")
    name = describe(info)
    iop = np.array([i.orientation for i in inst], dtype=np.float64)
    bad = np.flatnonzero(np.abs(iop - iop[0]).max(axis=1) > COSINE_TOL)
    if bad.size:
        j = int(bad[0])
        raise DataError(
            f"{name}: ImageOrientationPatient differs within the series ({inst[0].path}: "
            f"{list(iop[0])}; {inst[j].path}: {list(iop[j])}); expected one orientation per series"
        )
    sizes = {(i.rows, i.columns) for i in inst}
    if len(sizes) > 1:
        first = {s: next(i.path for i in inst if (i.rows, i.columns) == s) for s in sizes}
        raise DataError(f"{name}: image size differs within the series ("
                        + "; ".join(f"{p}: {r}×{c}" for (r, c), p in first.items())
                        + "); expected one Rows × Columns per series")
    ps = np.array([i.pixel_spacing for i in inst])
    bad = np.flatnonzero(np.abs(ps - ps[0]).max(axis=1) > POSITION_TOL)
    if bad.size:
        j = int(bad[0])
        raise DataError(f"{name}: PixelSpacing differs within the series ({inst[0].path}: {list(ps[0])}; "
                        f"{inst[j].path}: {list(ps[j])}); expected one spacing per series")
    row, col = iop[0, :3], iop[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > COSINE_TOL:
        raise DataError(f"{name}: ImageOrientationPatient row and column cosines are not orthogonal ({inst[0].path})")
    normal = np.cross(row, col)
    pos = np.array([i.position for i in inst], dtype=np.float64)
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    pos, proj = pos[order], proj[order]
    inst = [inst[int(k)] for k in order]
    intervals = np.diff(proj)
    dup = np.flatnonzero(intervals < POSITION_TOL)
    if dup.size:
        k = int(dup[0])
        raise DataError(
            f"{name}: {inst[k].path} and {inst[k + 1].path} lie at the same position along the slice "
            f"normal (several acquisitions, echoes or phases in one series?); expected one slice per position"
        )
    warnings: list[str] = []
    if intervals.size:
        sz = float(np.median(intervals))
        if float(intervals.max() - intervals.min()) > max(0.01 * sz, 0.01):
            warnings.append(f"non-uniform slice spacing: intervals {intervals.min():.3f}..{intervals.max():.3f} mm "
                            f"(median {sz:.3f} mm)")
        for k in np.flatnonzero(intervals > 1.5 * sz):
            warnings.append(f"missing slices between {inst[k].path.name} and {inst[k + 1].path.name}: "
                            f"gap of {intervals[k]:.3f} mm, expected {sz:.3f} mm")
        lateral = pos - pos[0] - np.outer(proj - proj[0], normal)
        drift = float(np.linalg.norm(lateral, axis=1).max())
        if drift > max(0.01 * sz, 0.01):
            angle = float(np.degrees(np.arctan2(np.linalg.norm(lateral[-1]), proj[-1] - proj[0])))
            warnings.append(f"slice positions do not move along the slice normal (gantry tilt ≈ {angle:.1f}°); "
                            f"slices are kept as acquired, not resampled")
    else:
        sz = inst[0].slice_thickness or 1.0
    for w in warnings:
        log.warning("%s: %s", name, w)
    rows, cols = inst[0].rows, inst[0].columns
    return SeriesGeometry(
        series_uid=info.series_uid,
        shape=(len(inst), rows, cols),
        spacing=(sz, float(ps[0, 0]), float(ps[0, 1])),
        origin=pos[0].copy(),
        direction=np.stack([row, col, normal]),
        positions=pos,
        slice_positions=proj,
        sop_instance_uids=[i.sop_instance_uid for i in inst],
        files=[i.path for i in inst],
        slice_thickness=inst[0].slice_thickness,
        warnings=warnings,
        frames=[i.frame for i in inst],
        windows=[i.window for i in inst],
    )


def _open_pixels(path: Path) -> pydicom.Dataset:
    """``dcmread`` a file for its pixels; a file without file meta gets the transfer syntax it parsed with."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read DICOM file ({type(e).__name__}: {e})") from None
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        # a file without file meta (no preamble): its encoding is known from how it parsed
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        if not hasattr(ds, "file_meta"):
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def _decode_error(path: Path, ds: pydicom.Dataset, e: Exception) -> DataError:
    ts = ds.file_meta.TransferSyntaxUID
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if getattr(ts, "is_compressed", False):
        return DataError(f"{path}: cannot decode pixel data in transfer syntax {ts.name} ({msg}); {PLUGIN_HELP}")
    return DataError(f"{path}: cannot read pixel data ({msg}); the file may be truncated")


def _rescale(ds: pydicom.Dataset, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of a frame (enhanced objects: Pixel Value Transformation) or of the instance."""
    item = group_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    src = item if item is not None else ds
    try:
        slope = float(src.get("RescaleSlope", 1) or 1)
        intercept = float(src.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    return slope, intercept


def read_frames_hu(path: str | Path, frames: Sequence[int | None], shape: tuple[int, int] | None = None
                   ) -> list[np.ndarray]:
    """Several frames of one file (read and decoded once) in HU, float32 ``(H, W)`` each.

    ``frames`` holds 0-based frame numbers of a multi-frame object, or ``None`` for a single-frame
    instance. Each frame is rescaled with its own slope / intercept (per-frame Pixel Value
    Transformation for enhanced objects; pydicom's modality LUT otherwise).

    Raises:
        DataError: unreadable file, pixel data that cannot be decoded (for a compressed transfer
            syntax the message names the decoder plugins) or of an unexpected shape.
    """
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = _open_pixels(path)
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise _decode_error(path, ds, e) from None
    n = num_frames(ds)
    if n > 1 and arr.ndim == 2:
        arr = arr[None]
    out = []
    for f in frames:
        if f is None:
            if arr.ndim != 2 or (shape is not None and tuple(arr.shape) != tuple(shape)):
                want = f"{shape[0]}×{shape[1]}" if shape else "one 2-D slice"
                raise DataError(f"{path}: pixel data of shape {arr.shape}; expected {want}")
            out.append(np.asarray(apply_modality_lut(arr, ds), dtype=np.float32))
            continue
        frame = arr if arr.ndim == 2 else arr[f] if f < len(arr) else None
        if frame is None or frame.ndim != 2 or (shape is not None and tuple(frame.shape) != tuple(shape)):
            raise DataError(f"{path}: frame {f + 1} missing or of an unexpected shape (pixel data {arr.shape})")
        slope, intercept = _rescale(ds, f)
        out.append((frame.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32))
    return out


def read_instance_hu(path: str | Path, shape: tuple[int, int] | None = None, frame: int | None = None) -> np.ndarray:
    """One slice's pixels × RescaleSlope + RescaleIntercept (pydicom's modality LUT), float32 ``(H, W)``.

    ``frame`` picks a frame of a multi-frame (enhanced) object (0-based; see :func:`read_frames_hu`).

    Raises:
        DataError: unreadable file, pixel data that cannot be decoded (for a compressed transfer
            syntax the message says which decoder plugins to install) or of an unexpected shape.
    """
    return read_frames_hu(path, [frame], shape)[0]


def read_series_hu(geom: SeriesGeometry) -> np.ndarray:
    """The HU pixels ``(Z, H, W)`` float32 of a series' slices, each file read and decoded once."""
    hw = geom.shape[1:]
    frames = geom.frames or [None] * len(geom.files)
    by_file: dict[Path, list[int]] = {}
    for k, p in enumerate(geom.files):
        by_file.setdefault(p, []).append(k)
    hu = np.empty(geom.shape, np.float32)
    for p, ks in by_file.items():
        for k, arr in zip(ks, read_frames_hu(p, [frames[k] for k in ks], hw)):
            hu[k] = arr
    return hu


def read_series(info: SeriesInfo) -> Volume:
    """Read a series into memory: geometry (:func:`series_geometry`) and HU pixels.

    Returns:
        a :class:`Volume`; ``hu`` is float32 ``(Z, H, W)``, each slice rescaled with its own
        RescaleSlope / RescaleIntercept.

    Raises:
        DataError: inconsistent geometry, or a slice that cannot be read or decoded (names the file).
    """
    geom = series_geometry(info)
    return volume_of(geom, read_series_hu(geom))


def volume_of(geom: SeriesGeometry, hu: np.ndarray) -> Volume:
    """A :class:`Volume` from a geometry and its pixels."""
    return Volume(**{f.name: getattr(geom, f.name) for f in fields(SeriesGeometry)}, hu=hu)


# ----------------------------------------------------------------------------- window


def header_window(windows: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    """The series' display window as ``(low, high)`` HU: its first WindowCenter / WindowWidth pair, or None.

    ``windows`` is :attr:`~medseg.data.dicom.records.SeriesGeometry.windows` (one ``(center,
    width)`` or None per slice); ``low, high = center ∓ width / 2``.
    """
    pair = next((w for w in windows if w is not None), None)
    if pair is None:
        return None
    c, w = pair
    return c - w / 2, c + w / 2


def dicom_window(data: DataConfig, windows: Sequence[tuple[float, float] | None]
                 ) -> tuple[tuple[float, float], str | None]:
    """The ``(low, high)`` HU window a DICOM series is normalised with, in training and in ``medseg predict``.

    ``data.window: dicom`` → the series' own window (:func:`header_window`, one for the whole
    series, as a DeepLesion row carries one); ``fixed`` → ``data.window_range``. A ``dicom``
    window of a series without WindowCenter / WindowWidth falls back to ``data.window_range``
    and says so.

    Args:
        data: the data config (``window``, ``window_range``).
        windows: the series' per-slice ``(center, width)`` pairs (``SeriesGeometry.windows``).

    Returns:
        ``((low, high), note)``: ``note`` is None, or the fallback's explanation for a warning.

    Example:
        >>> dicom_window(DataConfig(window="dicom"), [None, (40.0, 400.0)])
        ((-160.0, 240.0), None)
    """
    wins, note = dicom_windows(data, windows)
    return wins[0], note


def dicom_windows(data: DataConfig, windows: Sequence[tuple[float, float] | None]
                  ) -> tuple[list[tuple[float, float]], str | None]:
    """Every ``(low, high)`` window of the window rule (:func:`medseg.data.windowing.window_set`) for a
    DICOM series: several under ``data.window: multi``, else one (see :func:`dicom_window`)."""
    own = header_window(windows) if data.window == "dicom" else None
    wins, note = window_set(data, own)
    if note is not None:
        note = f"no WindowCenter / WindowWidth in the series: using data.window_range {list(data.window_range)}"
    return wins, note
