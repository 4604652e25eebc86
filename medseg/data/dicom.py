"""DICOM series: find them in a hospital folder, read them as HU volumes, read their labels.

This is medseg's one DICOM reader; the ``dicom`` training dataset and batch inference share it.

* :func:`find_series` walks a folder, reads every file's header once and groups image instances
  by SeriesInstanceUID. Every other file is reported as a :class:`SkippedFile` with its reason
  (SR, RTPLAN, RTDOSE, DICOMDIR, waveforms, secondary captures without geometry, truncated or
  non-DICOM files...), except SEG and RTSTRUCT objects, which become :class:`LabelFile` label
  candidates of the series they reference.
* :func:`series_geometry` orders the slices by ImagePositionPatient projected on the slice
  normal (never by InstanceNumber) and checks the series is one consistent stack;
  :func:`read_series` adds the pixels, rescaled to HU → :class:`Volume`.
* :func:`read_seg_labels`, :func:`read_rtstruct_labels` and :func:`read_nifti_labels` turn a
  DICOM SEG, an RTSTRUCT or a NIfTI mask into a ``(Z, H, W)`` class map on the volume's grid.
* :class:`DicomDataset` (``data.name: dicom``) yields 2-D / 2.5-D training samples from
  labelled series.

Conventions: volume arrays are ``(Z, H, W)`` = (slice, row, column), slices ascending along the
slice normal. Patient coordinates are DICOM's (LPS, mm). The centre of pixel ``(r, c)`` of
slice ``k`` lies at ``positions[k] + c·sx·direction[0] + r·sy·direction[1]``.

Example:
    >>> series, skipped = find_series("/data/hospital_export")
    >>> vol = read_series(series[0])
    >>> vol.hu.shape, vol.spacing                              # (Z, H, W), (sz, sy, sx) mm
    >>> labels = read_seg_labels(series[0].labels[0].path, vol)  # (Z, H, W) class map
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from medseg.data.base import (
    DataError,
    apply_window,
    check_split,
    context_indices,
    fingerprint_files,
    label_instances,
    mask_to_classes,
    resample_sample,
    split_cases,
    stack_context,
)
from medseg.data.decoders import register_decoders
from medseg.registry import DATASETS

if TYPE_CHECKING:
    import pydicom

    from medseg.config import DataConfig

log = logging.getLogger("medseg.data")
register_decoders()

SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}  # SEG, label map SEG
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: SOP class prefixes of objects that are never image series
_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: values up to this size are read with the header; larger ones (pixel data) are only located,
#: so a header scan costs little I/O yet still sees a truncated pixel data element
_DEFER_SIZE = "16 KB"
#: tolerances for geometry checks (cosines; mm)
_COSINE_TOL = 1e-3
_POSITION_TOL = 1e-3
PLUGIN_HELP = (
    "compressed DICOM needs pydicom decoder plugins; medseg depends on python-gdcm, pylibjpeg-openjpeg, "
    "pylibjpeg-rle, pyjpegls and imagecodecs (reinstall medseg if one is missing)"
)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SkippedFile:
    """A file :func:`find_series` did not use, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class LabelFile:
    """A SEG or RTSTRUCT object and the image series it references."""

    path: Path
    #: ``"SEG"`` or ``"RTSTRUCT"``
    kind: str
    series_uid: str


@dataclass(frozen=True)
class InstanceHeader:
    """What :func:`find_series` keeps from one image instance's header (no patient data)."""

    path: Path
    sop_instance_uid: str
    #: ImagePositionPatient (mm): centre of the first pixel
    position: tuple[float, float, float]
    #: ImageOrientationPatient: row then column direction cosines
    orientation: tuple[float, float, float, float, float, float]
    #: PixelSpacing: (row spacing sy, column spacing sx) in mm
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slice_thickness: float | None
    #: 0-based frame of a multi-frame (enhanced) object; None for a single-frame instance
    frame: int | None = None
    #: the first (WindowCenter, WindowWidth) pair of the header, when it has one
    window: tuple[float, float] | None = None


@dataclass
class SeriesInfo:
    """One image series found by :func:`find_series`.

    ``instances`` are in file-path order; :func:`series_geometry` sorts them by position.
    """

    series_uid: str
    modality: str
    study_uid: str
    frame_of_reference_uid: str | None
    description: str
    #: the deepest folder holding all the series' files
    folder: Path
    instances: list[InstanceHeader]
    labels: list[LabelFile] = field(default_factory=list)
    #: BodyPartExamined ("" when absent)
    body_part: str = ""
    #: "axial", "coronal", "sagittal" or "oblique" (from the slice normal)
    orientation: str = ""
    #: "" for a whole series; "o1", "o2", ... for the stacks of a series split by orientation
    part: str = ""

    @property
    def files(self) -> list[Path]:
        """The image files (path order; a multi-frame file appears once per frame)."""
        return [i.path for i in self.instances]

    @property
    def key(self) -> str:
        """A short, stable, non-identifying name: :func:`series_key` of the UID (and the part)."""
        return series_key(self.series_uid + (f"/{self.part}" if self.part else ""))


@dataclass(eq=False)
class SeriesGeometry:
    """Slice order and geometry of a series (from headers; no pixels).

    Attributes:
        series_uid: SeriesInstanceUID.
        shape: ``(Z, H, W)``.
        spacing: ``(sz, sy, sx)`` mm: median slice interval along the normal, row and column
            spacing (PixelSpacing).
        origin: ``(3,)`` patient position (mm) of pixel (0, 0) of slice 0.
        direction: ``(3, 3)``; rows are the row cosine (along a row: increasing column index),
            the column cosine (increasing row index) and the slice normal (their cross product,
            increasing slice index).
        positions: ``(Z, 3)`` ImagePositionPatient of every slice, in slice order.
        slice_positions: ``(Z,)`` positions projected on the normal (mm), ascending.
        sop_instance_uids: SOPInstanceUID of every slice, in slice order.
        files: the file of every slice, in slice order.
        slice_thickness: SliceThickness of the first slice (mm), or None.
        warnings: non-uniform spacing, missing slices, gantry tilt (also logged).
    """

    series_uid: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    positions: np.ndarray
    slice_positions: np.ndarray
    sop_instance_uids: list[str]
    files: list[Path]
    slice_thickness: float | None
    warnings: list[str]
    #: the frame of every slice in its multi-frame file (None for single-frame files), in slice order
    frames: list[int | None] = field(default_factory=list, kw_only=True)
    #: the first (WindowCenter, WindowWidth) of every slice's header (None where absent), in slice order
    windows: list[tuple[float, float] | None] = field(default_factory=list, kw_only=True)

    def affine_lps(self) -> np.ndarray:
        """4×4 map from voxel indices ``(column, row, slice, 1)`` to patient LPS mm.

        Exact for a uniform, untilted stack; otherwise use :attr:`positions`.
        """
        sz, sy, sx = self.spacing
        a = np.eye(4)
        a[:3, 0] = self.direction[0] * sx
        a[:3, 1] = self.direction[1] * sy
        a[:3, 2] = self.direction[2] * sz
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """:meth:`affine_lps` in NIfTI's RAS convention (for an array transposed to ``(W, H, Z)``)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()


@dataclass(eq=False)
class Volume(SeriesGeometry):
    """A series read into memory: :class:`SeriesGeometry` plus ``hu``, float32 ``(Z, H, W)``.

    ``hu`` is the stored value × RescaleSlope + RescaleIntercept of each slice (HU for CT).
    """

    hu: np.ndarray


# ----------------------------------------------------------------------------- finding series


def _sop_name(uid: str) -> str:
    """Human-readable SOP class name."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """A multi-valued DS as n floats, or None when absent / malformed."""
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def _truncation(ds: pydicom.Dataset, path: Path) -> str | None:
    """A reason when the (deferred) pixel data runs past the end of the file."""
    try:
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
    except Exception:
        return None
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:  # undefined length: encapsulated
        return None
    size = os.path.getsize(path)
    if tell + length > size:
        return f"truncated DICOM file: pixel data needs {tell + length} bytes, the file has {size}"
    return None


def _classify(ds: pydicom.Dataset, path: Path) -> tuple[str, str]:
    """``(kind, reason)``: kind is "image", "SEG", "RTSTRUCT" or "skip"."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds or path.name.upper() == "DICOMDIR":
        return "skip", "DICOMDIR (media directory, not an image)"
    if not sop:
        from pydicom.misc import is_dicom

        if is_dicom(path):
            return "skip", "DICOM file whose header cannot be read (truncated or corrupt): no SOP Class UID"
        return "skip", "not a DICOM file"
    if sop in SEG_SOP_CLASSES:
        return "SEG", ""
    if sop == RTSTRUCT_SOP_CLASS:
        return "RTSTRUCT", ""
    for prefix, what in _NON_IMAGE_PREFIXES.items():
        if sop.startswith(prefix):
            return "skip", f"{what}: {_sop_name(sop)}, not an image series"
    if str(ds.get("Modality", "")) in ("SR", "KO", "PR", "RTPLAN", "RTDOSE", "RTRECORD", "DOC"):
        return "skip", f"{ds.Modality} object ({_sop_name(sop)}), not an image series"
    if "PixelData" not in ds:
        return "skip", f"no pixel data ({_sop_name(sop)})"
    if _num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        if not _frame_geometry(ds, 0)[0]:
            return "skip", f"multi-frame image without per-frame positions ({_sop_name(sop)}, " \
                           f"{_num_frames(ds)} frames); expected an enhanced CT/MR object or single-frame slices"
        geometry = []
    else:
        geometry = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if geometry:
        if sop.startswith(_SECONDARY_CAPTURE_PREFIX):
            return "skip", f"secondary capture without geometry ({_sop_name(sop)})"
        return "skip", f"image without geometry: no {', '.join(geometry)} ({_sop_name(sop)})"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "skip", f"colour image ({ds.get('PhotometricInterpretation', '?')}); expected grayscale slices"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "skip", "localizer (scout) image"
    trunc = _truncation(ds, path)
    if trunc:
        return "skip", trunc
    if not ds.get("SeriesInstanceUID") or not ds.get("SOPInstanceUID"):
        return "skip", "image without SeriesInstanceUID / SOPInstanceUID"
    return "image", ""


def _num_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent or malformed)."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _group_item(ds: pydicom.Dataset, frame: int, seq: str) -> Any:
    """The first item of functional-group sequence ``seq`` for ``frame`` (per-frame, else shared), or None."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups) or []
        if idx < len(items):
            inner = items[idx].get(seq)
            if inner:
                return inner[0]
    return None


def _frame_geometry(ds: pydicom.Dataset, frame: int) -> tuple[bool, Any, Any, Any, Any]:
    """``(found, position, orientation, pixel measures item, window item)`` of one frame of an enhanced object."""
    pos = _group_item(ds, frame, "PlanePositionSequence")
    iop = _group_item(ds, frame, "PlaneOrientationSequence")
    meas = _group_item(ds, frame, "PixelMeasuresSequence")
    voi = _group_item(ds, frame, "FrameVOILUTSequence")
    found = pos is not None and iop is not None and meas is not None
    return found, pos, iop, meas, voi


def _window_pair(item: Any) -> tuple[float, float] | None:
    """The first (WindowCenter, WindowWidth) pair of a dataset or VOI item, or None."""
    if item is None:
        return None
    c, w = item.get("WindowCenter"), item.get("WindowWidth")
    try:
        c = float(c[0] if isinstance(c, Sequence) and not isinstance(c, str) else c)
        w = float(w[0] if isinstance(w, Sequence) and not isinstance(w, str) else w)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if np.isfinite([c, w]).all() and w > 0 else None


def _thickness(item: Any) -> float | None:
    thick = item.get("SliceThickness") if item is not None else None
    try:
        return float(thick) if thick not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _instance_headers(ds: pydicom.Dataset, path: Path) -> list[InstanceHeader] | str:
    """The geometry of an image instance (one header per frame of a multi-frame object), or a reason."""
    rows, cols, sop = int(ds.Rows), int(ds.Columns), str(ds.SOPInstanceUID)
    if _num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for f in range(_num_frames(ds)):
            found, pos_i, iop_i, meas, voi = _frame_geometry(ds, f)
            pos = _floats(pos_i.get("ImagePositionPatient"), 3) if found else None
            iop = _floats(iop_i.get("ImageOrientationPatient"), 6) if found else None
            ps = _floats(meas.get("PixelSpacing"), 2) if found else None
            if pos is None or iop is None or ps is None or min(ps) <= 0:
                return f"frame {f + 1}: malformed or missing plane position / orientation / pixel measures"
            out.append(InstanceHeader(path, sop, pos, iop, ps, rows, cols, _thickness(meas),  # type: ignore[arg-type]
                                      frame=f, window=_window_pair(voi) or _window_pair(ds)))
        return out
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if pos is None or iop is None or ps is None or min(ps) <= 0:
        return "malformed ImagePositionPatient / ImageOrientationPatient / PixelSpacing"
    return [InstanceHeader(path, sop, pos, iop, ps,  # type: ignore[arg-type]
                           rows, cols, _thickness(ds), window=_window_pair(ds))]


def orientation_name(iop: Sequence[float]) -> str:
    """``axial``, ``coronal``, ``sagittal`` (slice normal within ≈18° of a patient axis) or ``oblique``."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    normal /= max(float(np.linalg.norm(normal)), 1e-12)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.95:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _walk(root: Path, exclude: Sequence[Path]) -> Iterable[Path]:
    """Every regular file under ``root`` (sorted), outside ``exclude``."""
    excl = [e.resolve() for e in exclude]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excl)
        for name in sorted(filenames):
            yield here / name


def _label_references(ds: pydicom.Dataset, kind: str) -> tuple[list[str], list[str]]:
    """``(series UIDs, SOP instance UIDs)`` a SEG / RTSTRUCT refers to."""
    series: list[str] = []
    sops: list[str] = []
    if kind == "SEG":
        for item in ds.get("ReferencedSeriesSequence") or []:
            if item.get("SeriesInstanceUID"):
                series.append(str(item.SeriesInstanceUID))
            sops += [str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedInstanceSequence") or []
                     if r.get("ReferencedSOPInstanceUID")]
        for item in ds.get("SourceImageSequence") or []:
            if item.get("ReferencedSOPInstanceUID"):
                sops.append(str(item.ReferencedSOPInstanceUID))
    else:
        for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
            for study in fr.get("RTReferencedStudySequence") or []:
                for ser in study.get("RTReferencedSeriesSequence") or []:
                    if ser.get("SeriesInstanceUID"):
                        series.append(str(ser.SeriesInstanceUID))
                    sops += [str(c.ReferencedSOPInstanceUID) for c in ser.get("ContourImageSequence") or []
                             if c.get("ReferencedSOPInstanceUID")]
    return series, sops


def find_series(
    root: str | Path, exclude: Sequence[str | Path] = ()
) -> tuple[list[SeriesInfo], list[SkippedFile]]:
    """Find the image series in a folder tree (any nesting), reading each file's header once.

    Files are read with ``pydicom.dcmread(force=True)`` (files without preamble or file meta
    work) without loading pixel data; the pixel data element is only located, which catches
    truncated files. Image instances (single-frame, grayscale, with ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing) are grouped by SeriesInstanceUID. SEG and RTSTRUCT
    objects are attached to the series they reference (ReferencedSeriesSequence /
    RTReferencedSeriesSequence, else their referenced SOP instances, else a unique
    FrameOfReferenceUID) as :class:`LabelFile`. Everything else is a :class:`SkippedFile`.

    Args:
        root: the folder to scan.
        exclude: folders not to enter (e.g. a ``masks/`` folder of NIfTI files).

    Returns:
        ``(series, skipped)``: series sorted by folder then SeriesInstanceUID; skipped files in
        path order, each with a reason.

    Raises:
        DataError: ``root`` is not a folder.
    """
    import pydicom

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a folder of DICOM series")
    skipped: list[SkippedFile] = []
    groups: dict[str, dict[str, Any]] = {}
    sop_to_series: dict[str, str] = {}
    label_cands: list[tuple[Path, str, pydicom.Dataset]] = []
    for path in _walk(root, [Path(e) for e in exclude]):
        try:
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
            kind, reason = _classify(ds, path)
        except Exception as e:  # pydicom raises many types on garbage: all mean "not readable"
            skipped.append(SkippedFile(path, f"unreadable as DICOM ({type(e).__name__}: {e})"))
            continue
        if kind == "skip":
            skipped.append(SkippedFile(path, reason))
            continue
        if kind in ("SEG", "RTSTRUCT"):
            label_cands.append((path, kind, ds))
            continue
        try:
            heads = _instance_headers(ds, path)
        except Exception as e:
            heads = f"malformed header ({type(e).__name__}: {e})"
        if isinstance(heads, str):
            skipped.append(SkippedFile(path, heads))
            continue
        uid = str(ds.SeriesInstanceUID)
        sop_uid = heads[0].sop_instance_uid
        if sop_uid in sop_to_series:
            first = next(i.path for i in groups[sop_to_series[sop_uid]]["instances"] if i.sop_instance_uid == sop_uid)
            skipped.append(SkippedFile(path, f"duplicate of {first} (same SOPInstanceUID)"))
            continue
        g = groups.setdefault(uid, {
            "modality": str(ds.get("Modality", "")),
            "study": str(ds.get("StudyInstanceUID", "")),
            "for": str(ds.get("FrameOfReferenceUID", "")) or None,
            "description": str(ds.get("SeriesDescription", "")),
            "body_part": str(ds.get("BodyPartExamined", "") or ""),
            "instances": [],
        })
        g["instances"].extend(heads)
        sop_to_series[sop_uid] = uid

    series = {
        uid: SeriesInfo(uid, g["modality"], g["study"], g["for"], g["description"],
                        Path(os.path.commonpath([str(i.path.parent) for i in g["instances"]])),
                        g["instances"], body_part=g["body_part"],
                        orientation=orientation_name(g["instances"][0].orientation))
        for uid, g in groups.items()
    }
    for path, kind, ds in label_cands:
        try:
            ref_series, ref_sops = _label_references(ds, kind)
        except Exception as e:
            skipped.append(SkippedFile(path, f"{kind} with unreadable references ({type(e).__name__}: {e})"))
            continue
        target = next((s for s in ref_series if s in series), None)
        if target is None:
            target = next((sop_to_series[s] for s in ref_sops if s in sop_to_series), None)
        if target is None and kind == "RTSTRUCT":
            fors = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence") or []}
            cands = [s for s in series.values() if s.frame_of_reference_uid in fors]
            target = cands[0].series_uid if len(cands) == 1 else None
        if target is None:
            refs = ", ".join(ref_series) or "no series"
            skipped.append(SkippedFile(path, f"{kind} references {refs}, which is not among the image series under {root}"))
            continue
        series[target].labels.append(LabelFile(path, kind, target))
    ordered = sorted(series.values(), key=lambda s: (str(s.folder), s.series_uid))
    return [part for s in ordered for part in split_by_orientation(s)], skipped


def split_by_orientation(info: SeriesInfo) -> list[SeriesInfo]:
    """A series whose slices have several orientations (or image sizes) → one stack per orientation.

    Stacks are ordered by their first file and named ``o1``, ``o2``, ... in :attr:`SeriesInfo.part`
    (a warning names the series); a consistent series is returned as it is.
    """
    groups: dict[tuple, list[InstanceHeader]] = {}
    for inst in info.instances:
        key = (tuple(np.round(np.asarray(inst.orientation) / _COSINE_TOL).astype(int).tolist()),
               inst.rows, inst.columns)
        groups.setdefault(key, []).append(inst)
    if len(groups) == 1:
        return [info]
    log.warning("%s holds %d orientations / image sizes: split into one stack each", _describe(info), len(groups))
    out = []
    for n, insts in enumerate(sorted(groups.values(), key=lambda g: str(g[0].path)), start=1):
        out.append(SeriesInfo(info.series_uid, info.modality, info.study_uid, info.frame_of_reference_uid,
                              info.description, Path(os.path.commonpath([str(i.path.parent) for i in insts])),
                              insts, list(info.labels) if n == 1 else [], body_part=info.body_part,
                              orientation=orientation_name(insts[0].orientation), part=f"o{n}"))
    return out


# ----------------------------------------------------------------------------- geometry and pixels


def _describe(info: SeriesInfo | SeriesGeometry) -> str:
    """``series <uid> (<folder>)`` for messages."""
    folder = getattr(info, "folder", None)
    if folder is None and getattr(info, "files", None):
        folder = info.files[0].parent
    return f"series {info.series_uid} ({folder})"


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
        raise DataError(f"{_describe(info)} has no image instances")
    name = _describe(info)
    iop = np.array([i.orientation for i in inst], dtype=np.float64)
    bad = np.flatnonzero(np.abs(iop - iop[0]).max(axis=1) > _COSINE_TOL)
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
    bad = np.flatnonzero(np.abs(ps - ps[0]).max(axis=1) > _POSITION_TOL)
    if bad.size:
        j = int(bad[0])
        raise DataError(f"{name}: PixelSpacing differs within the series ({inst[0].path}: {list(ps[0])}; "
                        f"{inst[j].path}: {list(ps[j])}); expected one spacing per series")
    row, col = iop[0, :3], iop[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > _COSINE_TOL:
        raise DataError(f"{name}: ImageOrientationPatient row and column cosines are not orthogonal ({inst[0].path})")
    normal = np.cross(row, col)
    pos = np.array([i.position for i in inst], dtype=np.float64)
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    pos, proj = pos[order], proj[order]
    inst = [inst[int(k)] for k in order]
    intervals = np.diff(proj)
    dup = np.flatnonzero(intervals < _POSITION_TOL)
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
    item = _group_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
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
    n = _num_frames(ds)
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


# ----------------------------------------------------------------------------- labels


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
    return 0.5 * geom.spacing[0] + _POSITION_TOL if geom.shape[0] > 1 else max(geom.spacing[0], 1.0)


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
        raise DataError(f"{seg_path}: SEG frames are {seg.Rows}×{seg.Columns} but {_describe(volume)} "
                        f"has {h}×{w} slices; expected the series' image size")
    try:
        refs = {str(uids[2]) for uids in seg.get_source_image_uids()}
    except Exception:
        refs = set()
    if refs and refs.isdisjoint(volume.sop_instance_uids):
        raise DataError(f"{seg_path}: the SEG references none of the instances of {_describe(volume)}; "
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
            raise DataError(f"{seg_path}: frame {f + 1} at {list(p)} lies on no slice of {_describe(geom)}")
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
                            rt_path, num, dist, _describe(volume))
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
    (check them with :func:`medseg.data.folder.mask_to_classes`).

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
                        f"{w}×{h}×{z} (columns × rows × slices) for {_describe(volume)}")
    target = volume.affine_ras()
    img = img.as_reoriented(ornt_transform(io_orientation(img.affine), io_orientation(target)))
    if tuple(img.shape) != (w, h, z):
        raise DataError(
            f"mask {mask_path} has shape {tuple(img.shape)} (in the series' axis order) but "
            f"{_describe(volume)} is {w}×{h}×{z} (columns × rows × slices); a mask must match its series"
        )
    tol_dir = 1e-2 * np.linalg.norm(target[:3, :3], axis=0) + 1e-3
    tol_org = 0.5 * min(volume.spacing) + _POSITION_TOL
    if (np.abs(img.affine[:3, :3] - target[:3, :3]).max(axis=0) > tol_dir).any() or \
            np.linalg.norm(img.affine[:3, 3] - target[:3, 3]) > tol_org:
        raise DataError(
            f"{mask_path}: its affine does not match the geometry of {_describe(volume)} "
            f"(mask origin {np.round(img.affine[:3, 3], 2).tolist()}, series origin "
            f"{np.round(target[:3, 3], 2).tolist()}); write the mask with the series' affine"
        )
    return np.transpose(np.asanyarray(img.dataobj), (2, 1, 0))


# ----------------------------------------------------------------------------- dataset


def _frame(geom: SeriesGeometry, k: int) -> int | None:
    return geom.frames[k] if geom.frames else None


def series_key(series_uid: str) -> str:
    """A short, stable, non-identifying name for a series (hash of its SeriesInstanceUID)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:12]


@dataclass
class _Labelled:
    """A labelled series the dataset samples from."""

    key: str
    geom: SeriesGeometry
    source: str
    label_file: Path
    labels: dict[int, np.ndarray]


@DATASETS.register("dicom")
class DicomDataset(Dataset):
    """Labelled DICOM series as 2-D / 2.5-D samples (like DeepLesion's).

    ``data.root`` is a folder of series (any nesting). A series is labelled by, in this order:
    ``data.root/masks/<SeriesInstanceUID>.nii[.gz]`` or ``masks/<series folder name>.nii[.gz]``
    (:func:`read_nifti_labels`), a SEG (:func:`read_seg_labels`; segment number = class) or an
    RTSTRUCT (:func:`read_rtstruct_labels`; with ``data.num_classes == 2`` all ROIs are class 1,
    else ROI k is class k) referencing it. Series without labels are skipped with a warning
    listing them; so are series whose pixels cannot be decoded (e.g. missing decoder plugins).

    * Samples: one per slice whose labels hold foreground.
    * 2.5-D: ``data.context_slices`` channels ``data.slice_offset_mm`` apart along the slice
      normal, interpolated between the nearest slices (by their real positions, so uneven
      spacing and gaps are honoured) and clamped at the series' ends.
    * Intensity: HU windowed with ``data.window_range`` (for either ``data.window``).
    * ``data.spacing_mm`` resamples in-plane; ``instance`` = 8-connected components per class.
    * Split: by series with :func:`~medseg.data.base.split_cases`. Series of one patient can fall
      in different splits.
    * ``meta`` holds no patient data: ``series`` is a hash of the SeriesInstanceUID, ``id`` is
      ``dicom-<series>-<slice>``; ``source`` is the key slice's path relative to ``data.root``.

    Args:
        cfg: the data config.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

    Raises:
        DataError: no series, no labelled series, a label file that does not fit its series or holds
            a class > ``num_classes − 1``, or inconsistent series geometry (names the file / series).
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        if cfg.window not in ("dicom", "fixed"):
            raise DataError(f"data.window = {cfg.window!r}; expected dicom or fixed")
        if cfg.context_slices < 1:
            raise DataError(f"data.context_slices must be >= 1, got {cfg.context_slices}")
        self.root = Path(cfg.root)
        masks_dir = self.root / "masks"
        found, skipped = find_series(self.root, exclude=[masks_dir])
        for s in skipped:
            log.warning("skipped %s: %s", s.path, s.reason)
        if not found:
            raise DataError(f"{self.root}: no DICOM image series found ({len(skipped)} files skipped, "
                            f"see the warnings); expected folders of CT/MR slices")
        labelled: list[tuple[SeriesInfo, str, Path]] = []
        unlabelled: list[SeriesInfo] = []
        for info in found:
            src = self._label_source(info, masks_dir, found)
            if src is None:
                unlabelled.append(info)
            else:
                labelled.append((info, *src))
        if unlabelled:
            log.warning("%d series without labels (no SEG, RTSTRUCT or masks/ NIfTI) skipped: %s", len(unlabelled),
                        "; ".join(_describe(s) for s in unlabelled))
        if not labelled:
            raise DataError(f"{self.root}: none of the {len(found)} series has labels; expected a SEG or RTSTRUCT "
                            f"referencing each series, or {masks_dir}/<SeriesInstanceUID>.nii.gz")
        assign = split_cases([i.key for i, _, _ in labelled],
                             cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        self.series: list[_Labelled] = []
        self.items: list[tuple[int, int]] = []
        unreadable: list[str] = []
        for info, kind, path in labelled:
            key = info.key
            if split != "all" and assign[key] != split:
                continue
            geom = series_geometry(info)
            labels = self._read_labels(kind, path, geom)
            fg = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
            if fg.size == 0:
                log.warning("%s: no foreground in the labels of %s; it gives no samples", path, _describe(info))
                continue
            try:  # one decode up front, so missing decoder plugins show before training starts
                read_instance_hu(geom.files[int(fg[0])], geom.shape[1:], _frame(geom, int(fg[0])))
            except DataError as e:
                unreadable.append(str(e))
                log.warning("%s skipped: %s", _describe(info), e)
                continue
            self.items += [(len(self.series), int(k)) for k in fg]
            self.series.append(_Labelled(key, geom, kind, path, {int(k): labels[k].copy() for k in fg}))
        if unreadable and not self.series:
            raise DataError(f"no readable labelled series in split {split!r}: " + " | ".join(unreadable[:3]))
        self._files = [str(p) for info, _, lab in labelled for p in [*info.files, lab]]

    @staticmethod
    def _label_source(info: SeriesInfo, masks_dir: Path, found: list[SeriesInfo]) -> tuple[str, Path] | None:
        """``(kind, path)`` of the label to use for ``info``, or None."""
        names = [info.series_uid]
        if sum(s.folder == info.folder for s in found) == 1:  # a folder name is unique to one series
            names.append(info.folder.name)
        for name in names:
            for suf in (".nii.gz", ".nii"):
                p = masks_dir / f"{name}{suf}"
                if p.is_file():
                    return "NIFTI", p
        for kind in ("SEG", "RTSTRUCT"):
            cands = sorted((lab.path for lab in info.labels if lab.kind == kind), key=str)
            if cands:
                if len(cands) > 1:
                    log.warning("%s has %d %s objects; using %s", _describe(info), len(cands), kind, cands[0])
                return kind, cands[0]
        return None

    def _read_labels(self, kind: str, path: Path, geom: SeriesGeometry) -> np.ndarray:
        """The class map of one series, values checked against ``num_classes``."""
        if kind == "SEG":
            raw = read_seg_labels(path, geom)
        elif kind == "RTSTRUCT":
            raw = read_rtstruct_labels(path, geom, merge=self.cfg.num_classes == 2)
        else:
            raw = read_nifti_labels(path, geom)
        return mask_to_classes(raw, self.cfg.num_classes, path)

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of every labelled series' file names and sizes (split-independent)."""
        return fingerprint_files(self._files, extra="dicom")

    def _read(self, s: _Labelled, i: int) -> np.ndarray | None:
        """Slice ``i`` in HU, or None (with a warning naming the file) when it cannot be read."""
        try:
            return read_instance_hu(s.geom.files[i], s.geom.shape[1:], _frame(s.geom, i))
        except DataError as e:
            log.warning("%s", e)
            return None

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        si, k = self.items[idx]
        s, cfg = self.series[si], self.cfg
        key = self._read(s, k)
        if key is None:
            return None
        z = s.geom.slice_positions
        # context positions in mm along the normal (an "interval" of 1 mm makes context_indices
        # work in mm), then fractional slice indices from the real positions: uneven spacing and
        # gaps are interpolated correctly
        mm = context_indices(float(z[k]), cfg.context_slices, cfg.slice_offset_mm, 1.0, float(z[0]), float(z[-1]))
        pos = [float(p) for p in np.round(np.interp(mm, z, np.arange(len(z))), 6)]
        hu = stack_context(lambda i: key if i == k else self._read(s, i), pos, available=range(len(z)))
        label = s.labels[k]
        try:
            source = str(s.geom.files[k].relative_to(self.root))
        except ValueError:
            source = s.geom.files[k].name
        sample = {
            "image": apply_window(hu, cfg.window_range[0], cfg.window_range[1]),
            "label": label[None].astype(np.int64),
            "instance": label_instances(label)[None],
            "meta": {
                "id": f"dicom-{s.key}-{k:04d}",
                "dataset": "dicom",
                "split": self.split,
                "spacing": [s.geom.spacing[1], s.geom.spacing[2]],
                "slice_interval": s.geom.spacing[0],
                "source": source,
                "series": s.key,
                "slice": k,
                "label_source": s.source,
                "window": list(cfg.window_range),
            },
        }
        return resample_sample(sample, cfg.spacing_mm)
