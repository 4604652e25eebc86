"""NIH DeepLesion, read byte-for-byte as distributed (folder or the 56 zips), as 2.5-D samples.

``data.root`` holds ``DL_info.csv`` and the images, either unpacked (``Images_png/<series>/<n>.png``)
or as the distributed archives ``Images_png_01.zip`` … ``Images_png_56.zip`` (read without
unpacking; both may be present, the folder wins). Generated DeepLesion-format data may also hold
true instance masks in ``Masks_png/<series>/<n>.png``; they become the sample's ``truth``.

One sample per key slice (the rows sharing a ``File_name``): the key slice and its neighbours
``data.slice_offset_mm`` apart as channels (linear interpolation between files, clamped at the
series edge), windowed, with RECIST-derived ``label`` / ``instance`` masks
(:func:`medseg.data.recist.recist_to_masks`) built from the rows kept by the filters.

Example:
    >>> from medseg.config import DataConfig
    >>> ds = DeepLesionDataset(DataConfig(root="data/demo"), "train")  # doctest: +SKIP
    >>> s = ds[0]; s["image"].shape, s["meta"]["series"]  # doctest: +SKIP
    ((3, 512, 512), '000001_01_01')
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from medseg.config import DataConfig
from medseg.data.base import (
    DataError,
    apply_window,
    check_split,
    context_indices,
    fingerprint_files,
    log,
    resample_sample,
    stack_context,
)
from medseg.data.recist import RECIST_MODES, recist_to_masks
from medseg.registry import DATASETS

#: DL_info.csv columns, in the distributed order
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
WINDOWS = ("dicom", "fixed")

_FILE_RE = re.compile(r"^(\d+_\d+_\d+)_(\d+)\.png$")
_MEMBER_RE = re.compile(r"^Images_png/(\d+_\d+_\d+)/(\d+)\.png$")


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
def _read_dl_info_cached(path: str, mtime_ns: int, size: int) -> tuple[LesionRecord, ...]:
    """:func:`read_dl_info`, parsed once per file version (train/val/test datasets share it)."""
    return tuple(read_dl_info(path))


# ----------------------------------------------------------------------------- images


def png_to_hu(png: np.ndarray) -> np.ndarray:
    """DeepLesion 16-bit PNG values → HU (int32): ``value − 32768`` after a signed cast.

    Subtracting in uint16 would wrap around, so the cast comes first.
    """
    return png.astype(np.int32) - HU_OFFSET


@functools.lru_cache(maxsize=4)
def _zip_index(zips: tuple[tuple[str, int, int], ...]) -> dict[str, tuple[int, ...]]:
    """Series folder → indices (into ``zips``) of the archives holding its slices.

    Indexed per series rather than per member: about a million member names would cost far more
    memory, and each ZipFile keeps its own name table anyway.
    """
    index: dict[str, list[int]] = {}
    for k, (path, _, _) in enumerate(zips):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(
                f"{path}: not a readable zip archive ({e}); expected Images_png/<series>/<n>.png"
            ) from None
        for name in names:
            m = _MEMBER_RE.match(name)
            if m:
                lst = index.setdefault(m.group(1), [])
                if not lst or lst[-1] != k:
                    lst.append(k)
    return {s: tuple(v) for s, v in index.items()}


class _ImageSource:
    """Reads ``<series>/<n>.png`` from ``Images_png/`` and/or the ``Images_png_*.zip`` archives.

    Zip handles are opened lazily per process: DataLoader workers fork, and a handle shared with
    the parent would share its file position.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "Images_png"
        self.has_folder = self.folder.is_dir()
        self.zips = sorted(root.glob("Images_png_*.zip"))
        if not self.has_folder and not self.zips:
            raise DataError(
                f"{root}: no images: expected an Images_png/ folder (Images_png/<series>/<n>.png) "
                "or the archives Images_png_01.zip … Images_png_56.zip"
            )
        stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.zips)
        self.series_zips = _zip_index(stats) if self.zips else {}
        self._handles: dict[int, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, k: int) -> zipfile.ZipFile:
        """This process' handle on zip ``k``."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = zipfile.ZipFile(self.zips[k])
        return self._handles[k]

    def warn(self, source: str, why: str) -> None:
        """Warn once per file and process."""
        if source not in self._warned:
            self._warned.add(source)
            log.warning("%s: %s; skipping it", source, why)

    def key_source(self, series: str, n: int) -> str:
        """Where slice ``n`` of ``series`` is read from (a path, or ``zip:member``)."""
        rel = f"{series}/{n:03d}.png"
        path = self.folder / rel
        if self.has_folder and (not self.series_zips or path.is_file()):
            return str(path)
        zips = self.series_zips.get(series, ())
        return f"{self.zips[zips[0]]}:Images_png/{rel}" if zips else str(path)

    def files(self, keys: list[tuple[str, int]]) -> list[str]:
        """Files to fingerprint: the archives when reading zips, else the key slices' PNGs."""
        if self.zips:
            return [str(p) for p in self.zips]
        return [str(self.folder / series / f"{n:03d}.png") for series, n in keys]

    def read(self, series: str, n: int) -> np.ndarray | None:
        """Slice ``n`` of ``series`` in HU (int32 ``(H, W)``), or None (with a warning) if unreadable."""
        rel = f"{series}/{n:03d}.png"
        member = f"Images_png/{rel}"
        zips = self.series_zips.get(series, ())
        broken = None
        if self.has_folder:
            path = self.folder / rel
            png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if png is not None:
                return self._to_hu(png, str(path))
            if path.is_file():
                broken = str(path)  # still try an archive copy, if any
            elif not zips:
                self.warn(str(path), "not found; expected a 16-bit PNG")
                return None
        for k in zips:
            zf = self._handle(k)
            source = f"{self.zips[k]}:{member}"
            try:
                data = zf.read(member)
            except KeyError:
                continue
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                broken = source
                self.warn(source, f"unreadable zip member ({e}); expected a 16-bit PNG")
                continue
            png = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if png is not None:
                return self._to_hu(png, source)
            broken = source
            self.warn(source, "unreadable or truncated; expected a 16-bit PNG")
        if broken is not None:
            self.warn(broken, "unreadable or truncated; expected a 16-bit PNG")
        else:
            where = f"{self.zips[zips[0]]}:{member}" if zips else str(self.folder / rel)
            self.warn(where, "not found; expected a 16-bit PNG")
        return None

    def _to_hu(self, png: np.ndarray, source: str) -> np.ndarray | None:
        """Check the decoded PNG is single-channel 16-bit and convert it to HU."""
        if png.dtype != np.uint16 or png.ndim != 2:
            self.warn(source, f"{png.ndim}-D {png.dtype} image; expected a 16-bit PNG (single channel)")
            return None
        return png_to_hu(png)


# ----------------------------------------------------------------------------- dataset


@dataclass
class _Sample:
    """One key slice and the rows (lesions) kept on it."""

    file_name: str
    series: str
    key: int
    rows: tuple[LesionRecord, ...]


def _scale_xy(vals: tuple[float, ...], scale_yx: tuple[float, float]) -> list[float]:
    """Scale interleaved 0-based ``x, y`` pixel coordinates by (sy, sx) the way cv2.resize maps pixels."""
    sy, sx = scale_yx
    out = []
    for i, v in enumerate(vals):
        s = sx if i % 2 == 0 else sy
        out.append((v + 0.5) * s - 0.5)  # pixel centres: x' + 0.5 = (x + 0.5) · scale
    return out


@DATASETS.register("deeplesion")
class DeepLesionDataset(Dataset):
    """DeepLesion key slices as 2.5-D samples (see :mod:`medseg.data.base` for the sample dict).

    Args:
        cfg: the data config: ``root`` (holding ``DL_info.csv`` and ``Images_png/`` or the zips),
            ``context_slices``, ``slice_offset_mm``, ``window`` (``"dicom"``: each row's DICOM
            window; ``"fixed"``: ``window_range``), ``spacing_mm``, ``recist_mask``
            (``"ellipse"`` | ``"grabcut"``), ``include_noisy``, ``lesion_types``.
        split: ``"train"``, ``"val"``, ``"test"`` (the official ``Train_Val_Test`` split) or ``"all"``.

    Each item is a dict with ``image`` float32 ``(C, H, W)`` in [0, 1], ``label`` int64 and
    ``instance`` int32 ``(1, H, W)``, ``truth`` int32 ``(1, H, W)`` (only when ``Masks_png/``
    exists; None for a slice without a mask file) and ``meta``; or None when the key slice cannot
    be read (after a warning naming the file). GrabCut masks use the key slice in the row's DICOM
    window whatever ``window`` says: a wide fixed window leaves GrabCut too little contrast.

    Raises:
        DataError: no ``DL_info.csv`` or no images under ``root``; a malformed CSV; a bad
            ``window`` / ``recist_mask`` value; a split with no samples.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        self.root = Path(cfg.root)
        if cfg.window not in WINDOWS:
            raise DataError(f"data.window = {cfg.window!r}; expected one of {', '.join(WINDOWS)}")
        if cfg.recist_mask not in RECIST_MODES:
            raise DataError(
                f"data.recist_mask = {cfg.recist_mask!r}; expected one of {', '.join(RECIST_MODES)}"
            )
        if cfg.window == "fixed" and (
            len(cfg.window_range) != 2 or not cfg.window_range[1] > cfg.window_range[0]
        ):
            raise DataError(
                f"data.window_range = {cfg.window_range}; expected [low, high] HU with high > low"
            )
        self.csv_path = self.root / "DL_info.csv"
        if not self.csv_path.is_file():
            raise DataError(
                f"{self.csv_path} not found: a DeepLesion data.root must contain DL_info.csv and "
                "Images_png/ (or the archives Images_png_01.zip … Images_png_56.zip). "
                f"`medseg demo-data {self.root}` generates a DeepLesion-format dataset there."
            )
        st = self.csv_path.stat()
        records = _read_dl_info_cached(str(self.csv_path.resolve()), st.st_mtime_ns, st.st_size)
        self.images = _ImageSource(self.root)
        self.masks_dir = self.root / "Masks_png"
        self.has_masks = self.masks_dir.is_dir()

        keep_types = set(cfg.lesion_types)
        groups: dict[str, list[LesionRecord]] = {}
        for r in records:
            if split != "all" and r.split != split:
                continue
            if r.noisy and not cfg.include_noisy:
                continue
            if keep_types and r.lesion_type not in keep_types:
                continue
            groups.setdefault(r.file_name, []).append(r)
        self.samples = [
            _Sample(fn, rows[0].series, rows[0].key_slice, tuple(rows)) for fn, rows in groups.items()
        ]
        if not self.samples:
            raise DataError(
                f"{self.csv_path}: no samples for split {split!r} with data.include_noisy="
                f"{cfg.include_noisy} and data.lesion_types={list(cfg.lesion_types) or 'all'} "
                f"({len(records)} rows in the file)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_lesions(self) -> int:
        """Lesions (CSV rows) over all samples of this split."""
        return sum(len(s.rows) for s in self.samples)

    def fingerprint(self) -> str:
        """A short hash of the CSV, the key slices' PNGs (or the archives) and the split settings.

        Cheap: a stat per key slice, no directory listing.
        """
        extra = "|".join(
            [
                "deeplesion",
                self.split,
                str(self.cfg.include_noisy),
                ",".join(map(str, sorted(self.cfg.lesion_types))),
                *(s.file_name for s in self.samples),
            ]
        )
        keys = [(s.series, s.key) for s in self.samples]
        return fingerprint_files([str(self.csv_path), *self.images.files(keys)], extra=extra)

    def _read_truth(self, series: str, n: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The true instance map ``(1, H, W)`` int32 from ``Masks_png``, or None when absent."""
        path = self.masks_dir / series / f"{n:03d}.png"
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if m is None:
            if path.is_file():
                self.images.warn(str(path), "unreadable mask; expected a uint8 or uint16 PNG of instance ids")
            return None
        if m.ndim != 2 or m.dtype not in (np.uint8, np.uint16) or m.shape != shape:
            raise DataError(
                f"{path}: {m.dtype} image of shape {m.shape}; expected a single-channel uint8 or "
                f"uint16 PNG of instance ids of shape {shape} (its key slice's)"
            )
        return m.astype(np.int32)[None]

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        s = self.samples[idx]
        rec = s.rows[0]
        key_hu = self.images.read(s.series, s.key)
        if key_hu is None:
            return None
        first, last = rec.slice_range
        first, last = min(first, s.key), max(last, s.key)
        positions = context_indices(
            s.key, self.cfg.context_slices, self.cfg.slice_offset_mm, rec.slice_interval, first, last
        )

        def read(i: int) -> np.ndarray | None:
            if i == s.key:
                return key_hu
            hu = self.images.read(s.series, i)
            if hu is not None and hu.shape != key_hu.shape:
                self.images.warn(
                    self.images.key_source(s.series, i),
                    f"shape {hu.shape} differs from the key slice's {key_hu.shape}; expected a 16-bit PNG of the series' size",
                )
                return None
            return hu

        hu = stack_context(read, positions, available=range(first, last + 1))
        window = list(rec.window) if self.cfg.window == "dicom" else [float(v) for v in self.cfg.window_range]
        image = apply_window(hu, window[0], window[1])

        shape = (int(key_hu.shape[0]), int(key_hu.shape[1]))
        lesions = [{"coords": r.coords, "bbox": r.bbox} for r in s.rows]
        gc_image = apply_window(key_hu, *rec.window) if self.cfg.recist_mask == "grabcut" else None
        label, instance = recist_to_masks(lesions, shape, self.cfg.recist_mask, gc_image)

        source = self.images.key_source(s.series, s.key)
        meta: dict[str, Any] = {
            "id": s.file_name[:-4],
            "dataset": "deeplesion",
            "split": rec.split,
            "spacing": [rec.spacing[1], rec.spacing[0]],
            "slice_interval": rec.slice_interval,
            "source": source,
            "series": s.series,
            "slice": s.key,
            "file_name": s.file_name,
            "window": window,
            "patient_index": rec.patient,
            "study_index": rec.study,
            "series_index": rec.series_id,
            "slice_positions": positions,
        }
        sample: dict[str, Any] = {
            "image": image,
            "label": label[None],
            "instance": instance[None],
            "meta": meta,
        }
        if self.has_masks:
            sample["truth"] = self._read_truth(s.series, s.key, shape)
        sample = resample_sample(sample, self.cfg.spacing_mm)
        scale = tuple(sample["meta"].get("resample_scale", (1.0, 1.0)))
        sample["meta"]["lesions"] = [self._lesion_meta(r, scale) for r in s.rows]
        return sample

    @staticmethod
    def _lesion_meta(r: LesionRecord, scale: tuple[float, float]) -> dict[str, Any]:
        """A lesion's meta entry, coordinates in output pixels."""
        if scale == (1.0, 1.0):
            coords, bbox, diam = list(r.coords), list(r.bbox), list(r.diameters_px)
        else:
            coords, bbox = _scale_xy(r.coords, scale), _scale_xy(r.bbox, scale)
            p = np.asarray(coords).reshape(4, 2)
            diam = [float(np.linalg.norm(p[1] - p[0])), float(np.linalg.norm(p[3] - p[2]))]
        return {
            "coords": coords,
            "bbox": bbox,
            "diameters_px": diam,
            "type": r.lesion_type,
            "noisy": r.noisy,
            "location": list(r.location),
        }


__all__: list[str] = [
    "COLUMNS",
    "DeepLesionDataset",
    "LesionRecord",
    "png_to_hu",
    "read_dl_info",
]
