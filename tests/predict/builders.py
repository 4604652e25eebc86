"""Test material for ``medseg predict``: an oracle model and a hospital-like DICOM folder.

* :class:`Oracle` — a registered test model whose prediction is the truth: the series written here
  give every true lesion pixel the sentinel value :data:`SENTINEL_HU` and clip everything else
  below :data:`MAX_OTHER_HU`; the oracle marks the key channel's pixels above a threshold. What
  ``medseg predict`` does with a prediction (geometry, SEG, measurements) is what the tests check.
* :func:`build_hospital` — CT series written from the generated DeepLesion-format demo data with
  realistic headers and correct geometry, in several transfer syntaxes and shapes of trouble.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from torch import nn

from medseg.config import Config, to_dict
from medseg.data.deeplesion import read_dl_info
from medseg.registry import MODELS

SENTINEL_HU = 2500.0
MAX_OTHER_HU = 2000.0
PATIENT_NAME = "Testpatient^Hildegard"
PATIENT_ID = "PID-778899"
BIRTH_DATE = "19510203"
WINDOW = [-1024.0, 3071.0]
THRESHOLD = (MAX_OTHER_HU + 200 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


class Oracle(nn.Module):
    """Class 1 where the key (centre) channel exceeds ``threshold``; optional delay per forward pass."""

    def __init__(self, in_channels: int, num_classes: int, threshold: float = 0.5, delay_s: float = 0.0) -> None:
        super().__init__()
        self.key = (in_channels - 1) - (in_channels - 1) // 2
        self.delay_s = delay_s
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        fg = (x[:, self.key] > self.threshold).float() * 20.0 - 10.0
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:], dtype=x.dtype, device=x.device)
        out[:, 1] = fg
        return out


def register() -> None:
    if "test_oracle" not in MODELS:
        MODELS.register("test_oracle")(Oracle)


def unregister() -> None:
    MODELS._entries.pop("test_oracle", None)


def write_checkpoint(path: Path, delay_s: float = 0.0, **data: Any) -> Path:
    """A medseg checkpoint of the oracle with a config as training would have saved it."""
    cfg = Config()
    cfg.model.name = "test_oracle"
    cfg.model.params = {"threshold": THRESHOLD, "delay_s": delay_s}
    cfg.data.window, cfg.data.window_range = "fixed", list(WINDOW)
    cfg.data.context_slices, cfg.data.spacing_mm = 3, None
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.threads, cfg.train.device, cfg.train.amp = 1, "cpu", "off"
    cfg.tracking.enabled = False
    model = Oracle(cfg.data.context_slices, 2, THRESHOLD, delay_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "model": model.state_dict(), "config": to_dict(cfg),
                "in_channels": cfg.data.context_slices, "num_classes": 2}, path)
    return path


# ----------------------------------------------------------------------------- DICOM series


@dataclass
class Built:
    """A written series and what the tests know about it."""

    name: str
    folder: Path
    series_uid: str
    sop_uids: list[str]  # in slice order (ascending along the normal)
    positions: np.ndarray  # (Z, 3) in slice order
    truth: np.ndarray  # (Z, H, W) bool in slice order
    ids: np.ndarray  # (Z, H, W) true instance ids (Masks_png) in slice order
    spacing: tuple[float, float]  # (sy, sx)
    slices: list[int]  # demo slice numbers in slice order
    demo_series: str
    files: list[Path] = field(default_factory=list)
    regular: bool = True
    multiframe: bool = False
    iop: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _demo_series(root: Path) -> list[tuple[str, list[Any]]]:
    """Demo series with lesions, largest first: (name, DL_info rows)."""
    rows = read_dl_info(root / "DL_info.csv")
    by: dict[str, list[Any]] = {}
    for r in rows:
        by.setdefault(r.series, []).append(r)
    return sorted(by.items(), key=lambda kv: (-len(list((root / "Images_png" / kv[0]).iterdir())), kv[0]))


def _slices(root: Path, series: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Slice numbers, HU (with sentinel lesions) and truth masks of a demo series."""
    nums = sorted(int(p.stem) for p in (root / "Images_png" / series).glob("*.png"))
    runs: list[list[int]] = []
    for n in nums:  # the longest contiguous block (a demo series may hold two blocks with a gap)
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    nums = max(runs, key=len)
    hu, truth = [], []
    for n in nums:
        img = cv2.imread(str(root / "Images_png" / series / f"{n:03d}.png"), cv2.IMREAD_UNCHANGED).astype(np.float32) - 32768
        mp = root / "Masks_png" / series / f"{n:03d}.png"
        ids = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED).astype(np.int32) if mp.is_file() else np.zeros(img.shape, np.int32)
        img = np.clip(img, -1024, MAX_OTHER_HU)
        img[ids > 0] = SENTINEL_HU
        hu.append(img)
        truth.append(ids)
    return nums, np.stack(hu), np.stack(truth)


def write_series(folder: Path, hu: np.ndarray, positions: np.ndarray, iop: list[float], spacing: tuple[float, float],
                 rng: np.random.Generator, syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None,
                 series_uid: str | None = None, extra: dict[str, Any] | None = None) -> list[Dataset]:
    """Write one CT slice per position (file names and InstanceNumbers shuffled); datasets in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = generate_uid()
    z = len(hu)
    names = rng.permutation(z)
    out = []
    for k in range(z):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "20250314", "093000", "20250314", "093512"
        ds.ContentDate, ds.ContentTime, ds.AcquisitionDate = "20250314", "093513", "20250314"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC123", "Doctor^Who"
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "medseg-tests", "Synthetic CT"
        ds.BodyPartExamined, ds.SeriesDescription, ds.SeriesNumber = "CHEST", "Thorax 5mm", 2
        ds.InstanceNumber = int(names[k]) + 1
        ds.PositionReferenceIndicator = ""
        ds.KVP, ds.SliceThickness = "120", float(abs(positions[1][2] - positions[0][2])) if z > 1 else 5.0
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
        for kw, v in (extra or {}).items():
            setattr(ds, kw, v)
        stored = np.clip(np.round(hu[k] + 1024), 0, 4095).astype(np.uint16)
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = stored.tobytes()
        elif syntax == JPEGLosslessSV1:
            import imagecodecs  # libjpeg-turbo encodes lossless JPEG; python-gdcm decodes it

            ds.PixelData = pydicom.encaps.encapsulate([imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1,
                                                                                 bitspersample=12)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        else:
            ds.PixelData = stored.tobytes()
            ds.compress(syntax, stored, encoding_plugin="pyjpegls" if syntax == JPEGLSLossless else "")
        ds.save_as(folder / f"IMG{int(names[k]) * 7919 % 100000:05d}", enforce_file_format=True)
        ds.filename = str(folder / f"IMG{int(names[k]) * 7919 % 100000:05d}")
        out.append(ds)
    return out


def build_hospital(demo_root: Path, root: Path) -> dict[str, Any]:
    """A hospital export: CT series in five transfer syntaxes, an enhanced multi-frame, a missing slice,
    a gantry tilt, a hostile header, plus files that must be skipped (SR, RTSTRUCT, truncated, text,
    pydicom's own test files)."""
    from pydicom import config as dcm_config
    from pydicom.data import get_testdata_file

    dcm_config.settings.writing_validation_mode = dcm_config.IGNORE  # the hostile header is invalid on purpose
    rng = np.random.default_rng(7)
    demo = _demo_series(demo_root)
    built: dict[str, Built] = {}
    iop_axial = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def add(name: str, demo_name: str, rows: list[Any], syntax: str = ExplicitVRLittleEndian, drop: int | None = None,
            tilt_deg: float = 0.0, extra: dict[str, Any] | None = None, series_uid: str | None = None,
            study_uid: str | None = None) -> Built:
        nums, hu, truth = _slices(demo_root, demo_name)
        sx, sy, sz = rows[0].spacing
        if drop is not None:
            keep = [i for i in range(len(nums)) if i != drop]
            nums, hu, truth = [nums[i] for i in keep], hu[keep], truth[keep]
        t = np.radians(tilt_deg)
        iop = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))] if tilt_deg else iop_axial
        pos = np.array([[-0.5 * sx * hu.shape[2], -0.5 * sy * hu.shape[1], -100.0 + n * sz] for n in nums])
        folder = root / "export" / f"PAT{len(built):02d}" / name
        dss = write_series(folder, hu, pos, iop, (sy, sx), rng, syntax, extra=extra, series_uid=series_uid,
                           study_uid=study_uid)
        b = Built(name, folder, str(dss[0].SeriesInstanceUID), [str(d.SOPInstanceUID) for d in dss], pos, truth > 0, truth,
                  (sy, sx), nums, demo_name, [Path(d.filename) for d in dss],
                  regular=drop is None and not tilt_deg, iop=iop)
        built[name] = b
        return b

    (d0, r0), (d1, r1), (d2, r2), (d3, r3) = demo[0], demo[1 % len(demo)], demo[2 % len(demo)], demo[3 % len(demo)]
    add("plain", d0, r0)
    add("rle", d1, r1, RLELossless)
    add("jpegls", d2, r2, JPEGLSLossless)
    add("j2k", d3, r3, JPEG2000Lossless)
    add("jpeg_lossless", d1, r1, JPEGLosslessSV1)
    add("missing_slice", d2, r2, drop=3)
    add("tilted", d3, r3, tilt_deg=12.0)
    hostile = "../../../escaped\x00\r\n,\"=cmd|' /C calc'!A0" + "A" * 10000
    add("hostile", d0, r0, extra={"SeriesDescription": hostile, "ImageComments": hostile,
                                  "PatientName": "../../" + PATIENT_NAME, "BodyPartExamined": "../..\r\n",
                                  "StudyID": hostile[:16], "Modality": "CT"},
        study_uid="../../" + "9" * 90)
    # enhanced multi-frame: highdicom's legacy converter of a single-frame series
    import highdicom as hd

    mf_src = root / "tmp_mf"
    b = add("enhanced", d0, r0)
    srcs = [pydicom.dcmread(p) for p in b.files]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(srcs, series_instance_uid=generate_uid(), series_number=5,
                                                  sop_instance_uid=generate_uid(), instance_number=1)
    mf_folder = root / "export" / "PAT99" / "enhanced_ct"
    mf_folder.mkdir(parents=True)
    mf.save_as(mf_folder / "ENHANCED.dcm")
    shutil.rmtree(b.folder)
    b.folder, b.files, b.series_uid, b.multiframe = mf_folder, [mf_folder / "ENHANCED.dcm"], str(mf.SeriesInstanceUID), True
    b.sop_uids = [str(mf.SOPInstanceUID)] * len(b.sop_uids)
    del mf_src
    # files to skip
    misc = root / "export" / "misc"
    misc.mkdir(parents=True)
    (misc / "README.txt").write_text("exported from PACS\n")
    data = built["plain"].files[0].read_bytes()
    (misc / "TRUNCATED").write_bytes(data[: len(data) - 5000])
    _write_sr(misc / "REPORT", built["plain"])
    _write_rtstruct(misc / "RTSTRUCT", built["plain"])
    corpus = {}
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "waveform_ecg.dcm", "JPGExtended.dcm",
                 "no_meta.dcm", "emri_small_jpeg_2k_lossless.dcm", "eCT_Supplemental.dcm"):
        p = get_testdata_file(name)
        if p is not None:
            shutil.copy(p, misc / name)
            corpus[name] = misc / name
    return {"root": root / "export", "built": built, "demo": dict(demo), "corpus": corpus, "misc": misc}


def _write_sr(path: Path, ref: Built) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.PatientName = "SR", generate_uid(), PATIENT_NAME
    ds.save_as(path, enforce_file_format=True)


def _write_rtstruct(path: Path, ref: Built) -> None:
    from pydicom.sequence import Sequence as Seq

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.3", ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.PatientName = "RTSTRUCT", generate_uid(), PATIENT_NAME
    ser = Dataset()
    ser.SeriesInstanceUID = ref.series_uid
    study = Dataset()
    study.RTReferencedSeriesSequence = Seq([ser])
    fr = Dataset()
    fr.RTReferencedStudySequence = Seq([study])
    ds.ReferencedFrameOfReferenceSequence = Seq([fr])
    ds.StructureSetROISequence = Seq([])
    ds.ROIContourSequence = Seq([])
    ds.save_as(path, enforce_file_format=True)
