"""The records of medseg's DICOM reader: what a header scan keeps, and a series' geometry.

Nothing here reads a file; :mod:`medseg.data.dicom.discover` fills these records from headers and
:mod:`medseg.data.dicom.series` adds pixels.

* :class:`InstanceHeader`: one image instance (or one frame of a multi-frame object): position,
  orientation, pixel spacing, size and its first WindowCenter / WindowWidth pair.
* :class:`SeriesInfo`: the instances of one series (path order) and the SEG / RTSTRUCT objects
  (:class:`LabelFile`) referencing it; :class:`SkippedFile`: a file not used, with its reason.
* :class:`SeriesGeometry`: the slices in order along the normal, with spacing and affine;
  :class:`Volume` adds the HU pixels.

Conventions: volume arrays are ``(Z, H, W)`` = (slice, row, column), slices ascending along the
slice normal. Patient coordinates are DICOM's (LPS, mm). The centre of pixel ``(r, c)`` of
slice ``k`` lies at ``positions[k] + c·sx·direction[0] + r·sy·direction[1]``.

Example:
    >>> geom = series_geometry(info)                   # a SeriesGeometry
    >>> geom.shape, geom.spacing                       # (Z, H, W), (sz, sy, sx) mm
    >>> describe(geom)                                 # "series 1.2.3 (/data/ct)" for messages
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "COSINE_TOL",
    "POSITION_TOL",
    "InstanceHeader",
    "LabelFile",
    "SeriesGeometry",
    "SeriesInfo",
    "SkippedFile",
    "Volume",
    "describe",
    "series_key",
]

#: tolerances for geometry checks (cosines; mm)
COSINE_TOL = 1e-3
POSITION_TOL = 1e-3


def series_key(series_uid: str) -> str:
    """A short, stable, non-identifying name for a series (hash of its SeriesInstanceUID)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:12]


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

    ``instances`` are in file-path order; :func:`series_geometry` sorts them by position. They are a
    list, or (``medseg predict --engine ray``) a sequence read from an index file on each use.
    """

    series_uid: str
    modality: str
    study_uid: str
    frame_of_reference_uid: str | None
    description: str
    #: the deepest folder holding all the series' files
    folder: Path
    instances: Sequence[InstanceHeader]
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
    def distinct_files(self) -> Sequence[Path]:
        """The image files once each, in path order (read from the index file when used, when the
        instances are an index file's: :class:`medseg.data.dicom.index.IndexedInstances`)."""
        files = getattr(self.instances, "files", None)
        return files() if callable(files) else list(dict.fromkeys(self.files))

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



def describe(info: SeriesInfo | SeriesGeometry) -> str:
    """``series <uid> (<folder>)`` for messages."""
    folder = getattr(info, "folder", None)
    if folder is None and getattr(info, "files", None):
        folder = info.files[0].parent
    return f"series {info.series_uid} ({folder})"
