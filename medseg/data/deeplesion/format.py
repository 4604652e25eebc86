"""The DeepLesion ``DL_info.csv`` format: its columns, typed rows, and the PNGs' HU encoding.

``DL_info.csv`` has one row per annotated lesion, in the columns :data:`COLUMNS` (the real file's
order); multi-valued cells are quoted, ``", "``-separated numbers (``"142.391, 218.888, …"``).
:func:`read_dl_info` parses it into :class:`LesionRecord` rows with 1-based pixel coordinates made
0-based; :func:`format_numbers` writes a number cell as the real file does. The 16-bit PNGs store
``HU + 32768`` (:data:`HU_OFFSET`, :func:`png_to_hu`).

Example:
    >>> recs = read_dl_info("DeepLesion/DL_info.csv")  # doctest: +SKIP
    >>> recs[0].series, recs[0].coords[:2], recs[0].split  # doctest: +SKIP
    ('000001_01_01', (232.5, 105.1), 'train')
"""

from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.base import DataError

__all__ = ["COLUMNS", "HU_OFFSET", "SPLIT_CODES", "LesionRecord", "format_numbers", "png_to_hu", "read_dl_info",
           "read_dl_info_cached"]

COLUMNS = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)
SPLIT_CODES = {1: "train", 2: "val", 3: "test"}
#: the PNGs store HU + 32768 as uint16
HU_OFFSET = 32768

_FILE_RE = re.compile(r"^(\d+_\d+_\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class LesionRecord:
    """One row of ``DL_info.csv``, typed; coordinates converted to 0-based pixels.

    Attributes:
        file_name: key-slice file name, e.g. ``000001_01_01_109.png``.
        patient, study, series_id, key_slice: DeepLesion indices (not identifying).
        coords: 8 floats, long axis ``x1, y1, x2, y2`` then short axis ``x3, y3, x4, y4``, 0-based.
        bbox: ``x1, y1, x2, y2``, 0-based.
        diameters_px: RECIST long, short diameter in pixels.
        location: normalised lesion location ``x, y, z`` in [0, 1].
        lesion_type: coarse type 1–8, −1 unlabelled.
        noisy: the ``Possibly_noisy`` flag.
        slice_range: first, last slice index in the series folder.
        spacing: ``x, y`` pixel spacing and slice interval, mm.
        image_size: the two ``Image_size`` values as in the file.
        window: DICOM window low, high in HU (may be fractional).
        gender: ``Patient_gender`` (``M`` / ``F``) or None when empty.
        age: ``Patient_age`` or None when empty / NaN.
        split: ``train``, ``val`` or ``test`` (``Train_Val_Test`` 1, 2, 3).
        line: the row's line number in the CSV (the header is line 1).
    """

    file_name: str
    patient: int
    study: int
    series_id: int
    key_slice: int
    coords: tuple[float, ...]
    bbox: tuple[float, float, float, float]
    diameters_px: tuple[float, float]
    location: tuple[float, float, float]
    lesion_type: int
    noisy: bool
    slice_range: tuple[int, int]
    spacing: tuple[float, float, float]
    image_size: tuple[int, int]
    window: tuple[float, float]
    gender: str | None
    age: int | None
    split: str
    line: int

    @property
    def series(self) -> str:
        """The series folder, e.g. ``000001_01_01``."""
        return self.file_name.rsplit("_", 1)[0]

    @property
    def slice_interval(self) -> float:
        """Distance between neighbouring slices, mm."""
        return self.spacing[2]


# ----------------------------------------------------------------------------- CSV parsing


class _RowError(ValueError):
    """A value that does not parse; the caller adds file, line and column."""


def _int(text: str) -> int:
    """An integer, also written as ``12.0``."""
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        f = float(t)
        if not f.is_integer():
            raise _RowError(f"{text!r} is not an integer") from None
        return int(f)


def _floats(text: str, n: int) -> tuple[float, ...]:
    """Exactly ``n`` comma-separated finite floats."""
    parts = text.split(",")
    if len(parts) != n:
        raise _RowError(f"expected {n} comma-separated numbers, got {len(parts)} in {text!r}")
    vals = tuple(float(p) for p in parts)
    if not all(math.isfinite(v) for v in vals):
        raise _RowError(f"non-finite number in {text!r}")
    return vals


def _ints(text: str, n: int) -> tuple[int, ...]:
    """Exactly ``n`` comma-separated integers."""
    parts = text.split(",")
    if len(parts) != n:
        raise _RowError(f"expected {n} comma-separated integers, got {len(parts)} in {text!r}")
    return tuple(_int(p) for p in parts)


def _age(text: str) -> int | None:
    """Age in years; empty / NaN → None."""
    t = text.strip()
    if t == "" or t.lower() == "nan":
        return None
    return _int(t)


def _flag(text: str) -> bool:
    """A 0/1 flag."""
    v = _int(text)
    if v not in (0, 1):
        raise _RowError(f"expected 0 or 1, got {text!r}")
    return bool(v)


def _split(text: str) -> str:
    """``Train_Val_Test`` 1/2/3 → split name."""
    v = _int(text)
    if v not in SPLIT_CODES:
        raise _RowError(f"expected 1 (train), 2 (val) or 3 (test), got {text!r}")
    return SPLIT_CODES[v]


def _file_name(text: str) -> str:
    """A key-slice file name ``<patient>_<study>_<series>_<slice>.png``."""
    t = text.strip()
    if not _FILE_RE.match(t):
        raise _RowError(f"expected a name like 000001_01_01_109.png, got {text!r}")
    return t


def _minus_one(vals: tuple[float, ...]) -> tuple[float, ...]:
    """1-based → 0-based pixel coordinates."""
    return tuple(v - 1.0 for v in vals)


def _parse_row(row: list[str], col: dict[str, int], line: int, path: Path) -> LesionRecord:
    """Typed record of one CSV row; any bad cell → DataError naming file, line and column."""
    current = "?"

    def cell(name: str) -> str:
        nonlocal current
        current = name
        return row[col[name]]

    try:
        rec = LesionRecord(
            file_name=_file_name(cell("File_name")),
            patient=_int(cell("Patient_index")),
            study=_int(cell("Study_index")),
            series_id=_int(cell("Series_ID")),
            key_slice=_int(cell("Key_slice_index")),
            coords=_minus_one(_floats(cell("Measurement_coordinates"), 8)),
            bbox=_minus_one(_floats(cell("Bounding_boxes"), 4)),
            diameters_px=_floats(cell("Lesion_diameters_Pixel_"), 2),
            location=_floats(cell("Normalized_lesion_location"), 3),
            lesion_type=_int(cell("Coarse_lesion_type")),
            noisy=_flag(cell("Possibly_noisy")),
            slice_range=_ints(cell("Slice_range"), 2),
            spacing=_floats(cell("Spacing_mm_px_"), 3),
            image_size=_ints(cell("Image_size"), 2),
            window=_floats(cell("DICOM_windows"), 2),
            gender=cell("Patient_gender").strip() or None,
            age=_age(cell("Patient_age")),
            split=_split(cell("Train_Val_Test")),
            line=line,
        )
    except (ValueError, IndexError) as e:
        raise DataError(f"{path}, line {line}, column {current}: {e}") from None
    current = "Key_slice_index"
    if int(rec.file_name[:-4].rsplit("_", 1)[1]) != rec.key_slice:
        raise DataError(
            f"{path}, line {line}, column {current}: {rec.key_slice} does not match File_name {rec.file_name}"
        )
    current = "DICOM_windows"
    if not rec.window[1] > rec.window[0]:
        raise DataError(f"{path}, line {line}, column {current}: window {rec.window} is empty (high <= low)")
    return rec


def read_dl_info(path: str | Path) -> list[LesionRecord]:
    """Parse ``DL_info.csv`` into typed records (coordinates and boxes converted to 0-based).

    Args:
        path: the CSV file.

    Returns:
        One :class:`LesionRecord` per row, in file order.

    Raises:
        DataError: a missing file; a header without one of :data:`COLUMNS` (the message names the
            file and the expected header); a malformed row (file, line number and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: DL_info.csv not found")
    expected = ",".join(COLUMNS)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path} is empty; expected the header {expected}") from None
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected the header {expected}")
        col = {name: header.index(name) for name in COLUMNS}
        records = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, expected {len(header)} "
                    f"(column {header[len(row)]} is missing)"
                )
            records.append(_parse_row(row, col, reader.line_num, path))
    return records


@functools.lru_cache(maxsize=8)
def read_dl_info_cached(path: str, mtime_ns: int, size: int) -> tuple[LesionRecord, ...]:
    """:func:`read_dl_info`, parsed once per file version (train/val/test datasets share it)."""
    return tuple(read_dl_info(path))


def png_to_hu(png: np.ndarray) -> np.ndarray:
    """DeepLesion 16-bit PNG values → HU (int32): ``value − 32768`` after a signed cast.

    Subtracting in uint16 would wrap around, so the cast comes first.
    """
    return png.astype(np.int32) - HU_OFFSET


def format_numbers(values: list[float] | tuple[float, ...] | np.ndarray) -> str:
    """A multi-valued cell as the real DL_info.csv writes it: 6 significant digits, ``", "`` separated.

    The writer's counterpart of the parsing above (``-0`` is written ``0``).

    Example:
        >>> format_numbers([0.7421875, 0.7421875, 5.0])
        '0.742188, 0.742188, 5'
    """
    out = []
    for v in values:
        s = f"{float(v):g}"
        out.append("0" if s == "-0" else s)
    return ", ".join(out)
