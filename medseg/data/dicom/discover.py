"""Find the DICOM image series in a hospital folder, reading each file's header once.

:func:`find_series` walks a folder, reads every file's header (pixel data only located, so a
truncated file is caught without reading it) and groups image instances by SeriesInstanceUID
into :class:`~medseg.data.dicom.records.SeriesInfo`. Every other file is reported as a
:class:`~medseg.data.dicom.records.SkippedFile` with its reason (SR, RTPLAN, RTDOSE, DICOMDIR,
waveforms, secondary captures without geometry, truncated or non-DICOM files...), except SEG and
RTSTRUCT objects, which become :class:`~medseg.data.dicom.records.LabelFile` label candidates of
the series they reference. A series whose slices have several orientations is split into one
stack per orientation (:func:`split_by_orientation`).

Enhanced (multi-frame) CT / MR objects give one :class:`~medseg.data.dicom.records.InstanceHeader`
per frame, from their functional groups (:func:`group_item`).

Example:
    >>> series, skipped = find_series("/data/hospital_export")
    >>> [(s.key, s.modality, len(s.instances), s.orientation) for s in series]
    >>> [(f.path, f.reason) for f in skipped]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.data.base import DataError
from medseg.data.dicom.records import (
    COSINE_TOL,
    InstanceHeader,
    LabelFile,
    SeriesInfo,
    SkippedFile,
    describe,
)

if TYPE_CHECKING:
    import pydicom

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASSES",
    "HeaderRecord",
    "attach_labels",
    "duplicate_reason",
    "find_series",
    "group_headers",
    "group_item",
    "list_files",
    "num_frames",
    "orientation_name",
    "read_header",
    "split_by_orientation",
    "split_parts",
    "stack_key",
]

log = logging.getLogger("medseg.data")

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
    if num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        if not _frame_geometry(ds, 0)[0]:
            return "skip", f"multi-frame image without per-frame positions ({_sop_name(sop)}, " \
                           f"{num_frames(ds)} frames); expected an enhanced CT/MR object or single-frame slices"
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


def num_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent or malformed)."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def group_item(ds: pydicom.Dataset, frame: int, seq: str) -> Any:
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
    pos = group_item(ds, frame, "PlanePositionSequence")
    iop = group_item(ds, frame, "PlaneOrientationSequence")
    meas = group_item(ds, frame, "PixelMeasuresSequence")
    voi = group_item(ds, frame, "FrameVOILUTSequence")
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
    if num_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for f in range(num_frames(ds)):
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


@dataclass
class HeaderRecord:
    """What one file's header says, as :func:`find_series` groups it (small and picklable, so the
    headers of an archive can be read by parallel workers and grouped by one reduce).

    ``kind`` is ``image`` (``heads`` and the series fields set), ``SEG`` / ``RTSTRUCT`` (``refs``:
    referenced series UIDs, SOP instance UIDs, frames of reference; ``reason`` set when they could
    not be read) or ``skip`` (``reason``).
    """

    path: Path
    kind: str
    reason: str = ""
    heads: list[InstanceHeader] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    refs: tuple[list[str], list[str], set[str]] = field(default_factory=lambda: ([], [], set()))


def read_header(path: Path) -> HeaderRecord:
    """Read one file's header (pixel data only located: a truncated file is caught) and classify it."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
        kind, reason = _classify(ds, path)
    except Exception as e:  # pydicom raises many types on garbage: all mean "not readable"
        return HeaderRecord(path, "skip", f"unreadable as DICOM ({type(e).__name__}: {e})")
    if kind == "skip":
        return HeaderRecord(path, "skip", reason)
    if kind in ("SEG", "RTSTRUCT"):
        try:
            ref_series, ref_sops = _label_references(ds, kind)
            fors = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence") or []}
        except Exception as e:
            return HeaderRecord(path, kind, f"{kind} with unreadable references ({type(e).__name__}: {e})")
        return HeaderRecord(path, kind, refs=(ref_series, ref_sops, fors))
    try:
        heads = _instance_headers(ds, path)
    except Exception as e:
        heads = f"malformed header ({type(e).__name__}: {e})"
    if isinstance(heads, str):
        return HeaderRecord(path, "skip", heads)
    return HeaderRecord(path, "image", heads=heads, series={
        "uid": str(ds.SeriesInstanceUID),
        "modality": str(ds.get("Modality", "")),
        "study": str(ds.get("StudyInstanceUID", "")),
        "for": str(ds.get("FrameOfReferenceUID", "")) or None,
        "description": str(ds.get("SeriesDescription", "")),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
    })


def list_files(root: str | Path, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Every regular file under ``root`` in the order :func:`find_series` reads them (sorted walk)."""
    return list(_walk(Path(root), [Path(e) for e in exclude]))


def find_series(
    root: str | Path, exclude: Sequence[str | Path] = (),
    read_headers: Callable[[list[Path]], Iterable[HeaderRecord]] | None = None,
    index: Path | None = None,
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
        read_headers: reads the headers of a list of files, returning :func:`read_header`'s records in
            the same order (default: one after the other, here; ``medseg predict --engine ray``
            passes parallel tasks); the grouping that follows is the same either way.
        index: an SQLite file to hold the instance headers (:func:`medseg.data.dicom.index.index_headers`):
            the same series and skipped files, each series' ``instances`` read from the file when used,
            so that an archive's headers are never all in memory. None: in memory (:func:`group_headers`).

    Returns:
        ``(series, skipped)``: series sorted by folder then SeriesInstanceUID; skipped files in
        path order, each with a reason.

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a folder of DICOM series")
    paths = list_files(root, exclude)
    records = read_headers(paths) if read_headers is not None else map(read_header, paths)
    if index is not None:
        from medseg.data.dicom.index import index_headers

        return index_headers(root, records, index)
    return group_headers(root, records)


def duplicate_reason(first: Path) -> str:
    """Why a file whose SOPInstanceUID an earlier file (in path order) has is skipped."""
    return f"duplicate of {first} (same SOPInstanceUID)"


def stack_key(inst: InstanceHeader) -> tuple:
    """The stack of a split series an instance belongs to (:func:`split_by_orientation`): its
    orientation (to :data:`COSINE_TOL`) and image size."""
    return (tuple(np.round(np.asarray(inst.orientation) / COSINE_TOL).astype(int).tolist()), inst.rows, inst.columns)


def attach_labels(root: Path, series: dict[str, SeriesInfo], label_cands: Iterable[HeaderRecord],
                  series_of_sop: Callable[[str], str | None], skipped: list[SkippedFile]) -> None:
    """Attach each SEG / RTSTRUCT record to the series it references (``series`` by UID, before any
    split): its referenced series, else the series of its first referenced SOP instance
    (``series_of_sop``), else (RTSTRUCT) the one series of its frame of reference; else it is skipped."""
    for rec in label_cands:
        path, kind = rec.path, rec.kind
        if rec.reason:
            skipped.append(SkippedFile(path, rec.reason))
            continue
        ref_series, ref_sops, fors = rec.refs
        target = next((s for s in ref_series if s in series), None)
        if target is None:
            target = next((t for s in ref_sops if (t := series_of_sop(s)) is not None), None)
        if target is None and kind == "RTSTRUCT":
            cands = [s for s in series.values() if s.frame_of_reference_uid in fors]
            target = cands[0].series_uid if len(cands) == 1 else None
        if target is None:
            refs = ", ".join(ref_series) or "no series"
            skipped.append(SkippedFile(path, f"{kind} references {refs}, which is not among the image series under {root}"))
            continue
        series[target].labels.append(LabelFile(path, kind, target))


def group_headers(root: Path, records: Iterable[HeaderRecord]) -> tuple[list[SeriesInfo], list[SkippedFile]]:
    """The reduce of :func:`find_series`: header records in path order → series and skipped files."""
    skipped: list[SkippedFile] = []
    groups: dict[str, dict[str, Any]] = {}
    sop_to_series: dict[str, str] = {}
    label_cands: list[HeaderRecord] = []
    for rec in records:
        path = rec.path
        if rec.kind == "skip":
            skipped.append(SkippedFile(path, rec.reason))
            continue
        if rec.kind in ("SEG", "RTSTRUCT"):
            label_cands.append(rec)
            continue
        heads = rec.heads
        uid = rec.series["uid"]
        sop_uid = heads[0].sop_instance_uid
        if sop_uid in sop_to_series:
            first = next(i.path for i in groups[sop_to_series[sop_uid]]["instances"] if i.sop_instance_uid == sop_uid)
            skipped.append(SkippedFile(path, duplicate_reason(first)))
            continue
        g = groups.setdefault(uid, {**{k: v for k, v in rec.series.items() if k != "uid"}, "instances": []})
        g["instances"].extend(heads)
        sop_to_series[sop_uid] = uid

    series = {
        uid: SeriesInfo(uid, g["modality"], g["study"], g["for"], g["description"],
                        Path(os.path.commonpath([str(i.path.parent) for i in g["instances"]])),
                        g["instances"], body_part=g["body_part"],
                        orientation=orientation_name(g["instances"][0].orientation))
        for uid, g in groups.items()
    }
    attach_labels(root, series, label_cands, sop_to_series.get, skipped)
    ordered = sorted(series.values(), key=lambda s: (str(s.folder), s.series_uid))
    return [part for s in ordered for part in split_by_orientation(s)], skipped


def split_by_orientation(info: SeriesInfo) -> list[SeriesInfo]:
    """A series whose slices have several orientations (or image sizes) → one stack per orientation.

    Stacks are ordered by their first file and named ``o1``, ``o2``, ... in :attr:`SeriesInfo.part`
    (a warning names the series); a consistent series is returned as it is.
    """
    groups: dict[tuple, list[InstanceHeader]] = {}
    for inst in info.instances:
        groups.setdefault(stack_key(inst), []).append(inst)
    if len(groups) == 1:
        return [info]
    return split_parts(info, [(insts, Path(os.path.commonpath([str(i.path.parent) for i in insts])),
                               insts[0].orientation) for insts in sorted(groups.values(), key=lambda g: str(g[0].path))])


def split_parts(info: SeriesInfo, stacks: Sequence[tuple[Sequence[InstanceHeader], Path, Sequence[float]]]
                ) -> list[SeriesInfo]:
    """The stacks of a split series as :class:`SeriesInfo` ``o1``, ``o2``, ...: each ``(instances,
    folder, first instance's orientation)``, ordered by first file; the labels go to the first."""
    log.warning("%s holds %d orientations / image sizes: split into one stack each", describe(info), len(stacks))
    return [SeriesInfo(info.series_uid, info.modality, info.study_uid, info.frame_of_reference_uid, info.description,
                       folder, insts, list(info.labels) if n == 1 else [], body_part=info.body_part,  # type: ignore[arg-type]
                       orientation=orientation_name(orientation), part=f"o{n}")
            for n, (insts, folder, orientation) in enumerate(stacks, start=1)]
