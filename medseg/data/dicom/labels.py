"""Labels of a DICOM series: a DICOM SEG, an RTSTRUCT or a NIfTI mask → a class map on its grid.

* :func:`read_seg_labels`: SEG frames placed by the source instance each one references (else by
  position); pixel value = segment number.
* :func:`read_rtstruct_labels`: CLOSED_PLANAR contours rasterised on the nearest slice; ROI k is
  class k (or every ROI class 1 with ``merge=True``).
* :func:`read_nifti_labels`: a NIfTI mask in the series' geometry, reoriented to its voxel axes.

Each returns a ``(Z, H, W)`` array on the grid of a
:class:`~medseg.data.dicom.records.SeriesGeometry` (0 = background) and raises
:class:`~medseg.data.base.DataError` naming the file when it does not fit the series.

Example:
    >>> vol = read_series(series[0])
    >>> labels = read_seg_labels(series[0].labels[0].path, vol)  # (Z, H, W) class map
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.base import DataError
from medseg.data.dicom.records import POSITION_TOL, SeriesGeometry, describe

__all__ = ["read_nifti_labels", "read_rtstruct_labels", "read_seg_labels"]

log = logging.getLogger("medseg.data")


def _label_dtype(n: int) -> type:
    """Smallest unsigned dtype for classes 0..n."""
    return np.uint8 if n <= 255 else np.uint16


def _nearest_slice(geom: SeriesGeometry, point: np.ndarray) -> tuple[int, float]:
    """``(slice index, distance mm)`` of the slice nearest to ``point`` along the normal."""
    d = float(np.asarray(point) @ geom.direction[2])
    k = int(np.argmin(np.abs(geom.slice_positions - d)))
    return k, abs(float(geom.slice_positions[k]) - d)


def _slice_tolerance(geom: SeriesGeometry) -> float:
    """How far (mm) from a slice a contour or frame may lie and still belong to it."""
    return 0.5 * geom.spacing[0] + POSITION_TOL if geom.shape[0] > 1 else max(geom.spacing[0], 1.0)


def read_seg_labels(seg_path: str | Path, volume: SeriesGeometry) -> np.ndarray:
    """A DICOM SEG as a ``(Z, H, W)`` class map on the series' grid: pixel value = segment number.

    Frames are placed by the source SOPInstanceUID each one references (highdicom's
    ``get_pixels_by_source_instance``), so frame order and omitted empty frames do not matter.
    A SEG whose frames do not reference source instances is placed by each frame's
    ImagePositionPatient projected on the slice normal instead. Where segments overlap, the higher
    segment number wins. FRACTIONAL segments count where the fraction is ≥ 0.5.

    Args:
        seg_path: the SEG file.
        volume: the referenced series (:class:`Volume` or :class:`SeriesGeometry`).

    Returns:
        uint8 (uint16 beyond 255 segments) ``(Z, H, W)``; 0 = background.

    Raises:
        DataError: unreadable SEG, another image size, or frames that match no slice (names the file).
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as e:
        raise DataError(f"{seg_path}: cannot read DICOM SEG ({type(e).__name__}: {e})") from None
    z, h, w = volume.shape
    if (int(seg.Rows), int(seg.Columns)) != (h, w):
        raise DataError(f"{seg_path}: SEG frames are {seg.Rows}×{seg.Columns} but {describe(volume)} "
                        f"has {h}×{w} slices; expected the series' image size")
    try:
        refs = {str(uids[2]) for uids in seg.get_source_image_uids()}
    except Exception:
        refs = set()
    if refs and refs.isdisjoint(volume.sop_instance_uids):
        raise DataError(f"{seg_path}: the SEG references none of the instances of {describe(volume)}; "
                        f"expected a SEG derived from this series")
    dtype = _label_dtype(max(seg.segment_numbers, default=1))
    try:
        arr = seg.get_pixels_by_source_instance(
            volume.sop_instance_uids, combine_segments=True, skip_overlap_checks=True,
            assert_missing_frames_are_empty=True, dtype=dtype,
        )
    except Exception as e:  # no per-frame source references: fall back to positions
        log.info("%s: placing frames by position (%s)", seg_path, e)
        arr = _seg_by_position(seg, seg_path, volume, dtype)
    if arr.shape != (z, h, w):
        raise DataError(f"{seg_path}: SEG gives labels of shape {arr.shape}; expected {(z, h, w)}")
    return np.asarray(arr, dtype=dtype)


def _seg_by_position(seg: Any, seg_path: Path, geom: SeriesGeometry, dtype: type) -> np.ndarray:
    """Place each SEG frame on the slice nearest its ImagePositionPatient (FRACTIONAL ≥ 0.5)."""
    out = np.zeros(geom.shape, dtype)
    pix = np.asarray(seg.pixel_array)
    if pix.ndim == 2:
        pix = pix[None]
    labelmap = str(seg.get("SegmentationType", "")).upper() == "LABELMAP"
    fractional = str(seg.get("SegmentationType", "")).upper() == "FRACTIONAL"
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 1)) if fractional else 0.5
    tol = _slice_tolerance(geom)
    shared = seg.get("SharedFunctionalGroupsSequence")
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        plane = group.get("PlanePositionSequence") or (shared[0].get("PlanePositionSequence") if shared else None)
        if not plane:
            raise DataError(f"{seg_path}: frame {f + 1} has neither a source reference nor a position")
        p = np.array([float(v) for v in plane[0].ImagePositionPatient])
        k, dist = _nearest_slice(geom, p)
        offset = p - geom.positions[k]
        inplane = np.abs(offset @ geom.direction[:2].T)
        if dist > tol or inplane.max() > 0.5 * min(geom.spacing[1:]):
            raise DataError(f"{seg_path}: frame {f + 1} at {list(p)} lies on no slice of {describe(geom)}")
        frame = pix[f]
        if labelmap:
            out[k] = np.where(frame > 0, frame, out[k])
        else:
            num = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            out[k][frame >= threshold if fractional else frame > 0] = num
    return out


def read_rtstruct_labels(rt_path: str | Path, volume: SeriesGeometry, merge: bool = False) -> np.ndarray:
    """An RTSTRUCT's ROIs rasterised on the series' grid → ``(Z, H, W)`` class map.

    Each CLOSED_PLANAR contour (patient mm) is projected on the volume's row and column cosines
    to pixel coordinates and filled with ``cv2.fillPoly`` (sub-pixel vertices) on the slice
    nearest its mean position along the normal (contours farther than half a slice interval from
    every slice are skipped with a warning). Contours of one ROI on one slice are combined by XOR,
    so an inner contour cuts a hole, as most planning systems write holes. POINT and OPEN_PLANAR
    contours have no area and are ignored.

    Classes: with ``merge=False`` the k-th ROI of StructureSetROISequence is class k (1-based;
    where ROIs overlap the later ROI wins); with ``merge=True`` every ROI is class 1.

    Args:
        rt_path: the RTSTRUCT file.
        volume: the referenced series (:class:`Volume` or :class:`SeriesGeometry`).
        merge: all ROIs as one foreground class.

    Returns:
        uint8 (uint16 beyond 255 ROIs) ``(Z, H, W)``; 0 = background.

    Raises:
        DataError: unreadable file or malformed contour data (names the file).
    """
    import cv2
    import pydicom

    rt_path = Path(rt_path)
    try:
        ds = pydicom.dcmread(rt_path, force=True)
        rois = [int(r.ROINumber) for r in ds.get("StructureSetROISequence") or []]
        contours = list(ds.get("ROIContourSequence") or [])
    except Exception as e:
        raise DataError(f"{rt_path}: cannot read RTSTRUCT ({type(e).__name__}: {e})") from None
    cls_of = {num: 1 if merge else i + 1 for i, num in enumerate(rois)}
    out = np.zeros(volume.shape, _label_dtype(max(cls_of.values(), default=1)))
    shift = 8  # fillPoly takes fixed-point vertices: 8 fractional bits = 1/256 px
    tol = _slice_tolerance(volume)
    sy, sx = volume.spacing[1:]
    for roi in contours:
        num = int(roi.get("ReferencedROINumber", -1))
        if num not in cls_of:
            log.warning("%s: contours of ROI %s, which StructureSetROISequence does not list, are ignored",
                        rt_path, num)
            continue
        masks: dict[int, np.ndarray] = {}
        for c in roi.get("ContourSequence") or []:
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue
            try:
                pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64).reshape(-1, 3)
            except (AttributeError, ValueError) as e:
                raise DataError(f"{rt_path}: ROI {num} has malformed ContourData ({e}); "
                                f"expected x, y, z triples in mm") from None
            if len(pts) < 3:
                continue
            k, dist = _nearest_slice(volume, pts.mean(axis=0))
            if dist > tol:
                log.warning("%s: a contour of ROI %s lies %.2f mm from the nearest slice of %s; ignored",
                            rt_path, num, dist, describe(volume))
                continue
            rel = pts - volume.positions[k]
            xy = np.stack([rel @ volume.direction[0] / sx, rel @ volume.direction[1] / sy], axis=1)
            poly = np.round(xy * (1 << shift)).astype(np.int32)
            buf = np.zeros(volume.shape[1:], np.uint8)
            cv2.fillPoly(buf, [poly], 1, lineType=cv2.LINE_8, shift=shift)
            masks[k] = masks[k] ^ buf if k in masks else buf
        for k, m in masks.items():
            out[k][m > 0] = cls_of[num]
    return out


def read_nifti_labels(mask_path: str | Path, volume: SeriesGeometry) -> np.ndarray:
    """A NIfTI mask in the series' geometry → ``(Z, H, W)`` array on the series' grid.

    The mask is reoriented to the series' voxel axes using both affines (the series' affine is
    :meth:`SeriesGeometry.affine_ras`), so a mask written by SimpleITK, dcm2niix or nibabel with
    the series' geometry lines up whatever its axis order or flips. Values are returned as stored
    (check them with :func:`medseg.data.base.mask_to_classes`).

    Raises:
        DataError: unreadable file, a shape that differs from the series (both named), or an
            affine that does not match the series' geometry.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    mask_path = Path(mask_path)
    try:
        img = nib.load(str(mask_path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
    except Exception as e:
        raise DataError(f"{mask_path}: cannot read NIfTI mask ({type(e).__name__}: {e})") from None
    z, h, w = volume.shape
    if len(img.shape) != 3:
        raise DataError(f"{mask_path}: NIfTI mask of shape {img.shape}; expected a 3-D mask of "
                        f"{w}×{h}×{z} (columns × rows × slices) for {describe(volume)}")
    target = volume.affine_ras()
    img = img.as_reoriented(ornt_transform(io_orientation(img.affine), io_orientation(target)))
    if tuple(img.shape) != (w, h, z):
        raise DataError(
            f"mask {mask_path} has shape {tuple(img.shape)} (in the series' axis order) but "
            f"{describe(volume)} is {w}×{h}×{z} (columns × rows × slices); a mask must match its series"
        )
    tol_dir = 1e-2 * np.linalg.norm(target[:3, :3], axis=0) + 1e-3
    tol_org = 0.5 * min(volume.spacing) + POSITION_TOL
    if (np.abs(img.affine[:3, :3] - target[:3, :3]).max(axis=0) > tol_dir).any() or \
            np.linalg.norm(img.affine[:3, 3] - target[:3, 3]) > tol_org:
        raise DataError(
            f"{mask_path}: its affine does not match the geometry of {describe(volume)} "
            f"(mask origin {np.round(img.affine[:3, 3], 2).tolist()}, series origin "
            f"{np.round(target[:3, 3], 2).tolist()}); write the mask with the series' affine"
        )
    return np.transpose(np.asanyarray(img.dataobj), (2, 1, 0))
