"""Writers of tiny DICOM series and their labels with pydicom / highdicom, for the DICOM reader's tests.

Every series is 5–6 slices of 32×32 with shuffled file names and InstanceNumbers (so slice order
can only come from ImagePositionPatient) and a different RescaleSlope / RescaleIntercept per
slice. Labels are written as a highdicom SEG, a pydicom RTSTRUCT and NIfTI; the tests read them
back and compare them with the arrays they were written from. :func:`build_hospital` writes the
folder the ``hospital`` fixture (``conftest.py``) shares.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

H = W = 32
PIXEL_SPACING = (0.7, 0.8)  # (sy, sx)
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-0042"


# ----------------------------------------------------------------------------- writers


def write_ct_series(
    folder: Path,
    stored: np.ndarray,
    z_positions: list[float],
    seed: int,
    origin_xy: tuple[float, float] = (-12.0, -20.0),
    study_uid: str | None = None,
    window: tuple[list[float], list[float]] | None = None,
) -> list[Dataset]:
    """Write slice k of ``stored`` (int16 (Z, H, W)) at z_positions[k]; return datasets in k order.

    File names and InstanceNumbers are shuffled; slice k has RescaleSlope 1 + k % 2 and
    RescaleIntercept −1024 + 10·k, so HU = stored × slope + intercept differs per slice.
    ``window`` = (WindowCenter values, WindowWidth values) of every slice (none when None).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, for_uid = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    z = len(z_positions)
    names = rng.permutation(z)
    numbers = rng.permutation(z) + 1
    out = []
    for k in range(z):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = "20240102", "101010"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.Modality = "CT"
        ds.Manufacturer = "medseg-tests"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = int(numbers[k])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [origin_xy[0], origin_xy[1], float(z_positions[k])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = 1 + k % 2
        ds.RescaleIntercept = -1024 + 10 * k
        ds.RescaleType = "HU"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = stored[k].astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def expected_hu(stored: np.ndarray) -> np.ndarray:
    """stored × slope + intercept with the per-slice values of :func:`write_ct_series`."""
    k = np.arange(stored.shape[0])[:, None, None]
    return (stored * (1 + k % 2) + (-1024 + 10 * k)).astype(np.float32)


def write_seg(path: Path, sources: list[Dataset], labels: np.ndarray) -> Dataset:
    """A BINARY highdicom SEG of ``labels`` ((Z, H, W), values = segment numbers), empty frames omitted."""
    algo = hd.AlgorithmIdentificationSequence(
        name="test", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descs = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"lesion {n}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type="AUTOMATIC",
            algorithm_identification=algo,
        )
        for n in range(1, int(labels.max()) + 1)
    ]
    # sources go in shuffled order: the reader must place frames by reference, not by order
    order = np.random.default_rng(7).permutation(len(sources))
    seg = hd.seg.Segmentation(
        source_images=[sources[i] for i in order],
        pixel_array=labels[order].astype(np.uint8),
        segmentation_type="BINARY",
        segment_descriptions=descs,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medseg-tests",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="1",
        omit_empty_frames=True,
    )
    seg.save_as(path)
    return seg


def contours_mm(mask: np.ndarray, ds: Dataset) -> list[np.ndarray]:
    """Outer and hole contours of a 2-D mask as (N, 3) patient-mm points on slice ``ds``."""
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    pos = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    sy, sx = (float(v) for v in ds.PixelSpacing)
    out = []
    for c in found:
        xy = c[:, 0, :].astype(np.float64)  # (col, row)
        out.append(pos + xy[:, :1] * sx * iop[:3] + xy[:, 1:] * sy * iop[3:])
    return out


def write_rtstruct(path: Path, sources: list[Dataset], masks: list[np.ndarray]) -> None:
    """An RTSTRUCT with one ROI per (Z, H, W) mask in ``masks``, contours from cv2.findContours."""
    ref = sources[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "lesions"
    ds.StructureSetDate, ds.StructureSetTime = "20240102", "101010"
    contour_images = []
    for s in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = s.SOPClassUID
        item.ReferencedSOPInstanceUID = s.SOPInstanceUID
        contour_images.append(item)
    ser = Dataset()
    ser.SeriesInstanceUID = ref.SeriesInstanceUID
    ser.ContourImageSequence = DicomSequence(contour_images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([ser])
    fr = Dataset()
    fr.FrameOfReferenceUID = ref.FrameOfReferenceUID
    fr.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([fr])
    rois, roi_contours = [], []
    for n, mask in enumerate(masks, start=1):
        roi = Dataset()
        roi.ROINumber = n * 10  # ROI numbers need not be 1..K: classes follow the sequence order
        roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
        roi.ROIName = f"lesion{n}"
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        seq = []
        for k, s in enumerate(sources):
            for pts in contours_mm(mask[k], s):
                c = Dataset()
                img = Dataset()
                img.ReferencedSOPClassUID = s.SOPClassUID
                img.ReferencedSOPInstanceUID = s.SOPInstanceUID
                c.ContourImageSequence = DicomSequence([img])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c.ContourData = [round(float(v), 4) for v in pts.ravel()]
                seq.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = n * 10
        rc.ROIDisplayColor = [255, 0, 0]
        rc.ContourSequence = DicomSequence(seq)
        roi_contours.append(rc)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.save_as(path, enforce_file_format=True)


def write_sr(path: Path) -> None:
    """A minimal Comprehensive SR (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


def write_secondary_capture(path: Path) -> None:
    """A secondary capture with pixels but no ImagePositionPatient / ImageOrientationPatient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    """A filled disk mask."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ----------------------------------------------------------------------------- the hospital folder

Z_A = [-40.0 + 2.5 * k for k in range(6)]  # ascending z, 2.5 mm apart
Z_B = [30.0 - 3.0 * k for k in range(5)]  # written with decreasing z


def build_hospital(root: Path) -> dict:
    """A hospital-like folder: two CT series with a SEG and an RTSTRUCT, plus files to skip."""
    rng = np.random.default_rng(0)
    stored_a = rng.integers(-200, 1500, (6, H, W)).astype(np.int16)
    stored_b = rng.integers(-200, 1500, (5, H, W)).astype(np.int16)
    src_a = write_ct_series(root / "pat1" / "study" / "ct_a", stored_a, Z_A, seed=1)
    src_b = write_ct_series(root / "pat1" / "study" / "ct_b", stored_b, Z_B, seed=2)
    # SEG for A: segment 1 on slices 1-3 (two blobs on slice 2), segment 2 on slice 4, 0 and 5 empty
    seg_a = np.zeros((6, H, W), np.uint8)
    seg_a[1][disk((H, W), 10, 12, 4)] = 1
    seg_a[2][disk((H, W), 10, 12, 5)] = 1
    seg_a[2][disk((H, W), 24, 24, 3)] = 1
    seg_a[3][disk((H, W), 11, 13, 3)] = 1
    seg_a[4][disk((H, W), 20, 8, 4)] = 2
    (root / "labels").mkdir()
    write_seg(root / "labels" / "seg_a.dcm", src_a, seg_a)
    # RTSTRUCT for B: a ring (hole) on slice 1 and disks on 2-3, in k (written) order
    rt_b = np.zeros((5, H, W), bool)
    rt_b[1] = disk((H, W), 16, 16, 9) & ~disk((H, W), 16, 16, 4)
    rt_b[2] = disk((H, W), 14, 18, 6)
    rt_b[3] = disk((H, W), 15, 17, 3)
    write_rtstruct(root / "labels" / "rt_b.dcm", src_b, [rt_b])
    # things to skip
    write_sr(root / "pat1" / "report.dcm")
    write_secondary_capture(root / "pat1" / "screenshot.dcm")
    (root / "pat1" / "notes.txt").write_text("scanned on the second floor\n")
    raw = root / "pat1" / "study" / "ct_a" / sorted(p.name for p in (root / "pat1/study/ct_a").iterdir())[0]
    trunc = root / "pat1" / "broken.dcm"
    data = raw.read_bytes()
    trunc.write_bytes(data[: len(data) - 700])
    return {
        "root": root,
        "stored_a": stored_a,
        "stored_b": stored_b,
        "src_a": src_a,
        "src_b": src_b,
        "seg_a": seg_a,
        "rt_b": rt_b,
    }

