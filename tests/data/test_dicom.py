"""The DICOM series reader and the ``dicom`` dataset, on tiny series written here with pydicom.

Every series is 5–6 slices of 32×32 with shuffled file names and InstanceNumbers (so slice order
can only come from ImagePositionPatient) and a different RescaleSlope / RescaleIntercept per
slice. Labels are written as a highdicom SEG, a pydicom RTSTRUCT and NIfTI, then read back and
compared with the arrays they were written from.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import cv2
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from medseg.config import DataConfig
from medseg.data import build_dataset
from medseg.data.base import DataError, apply_window
from medseg.data.dicom import (
    PLUGIN_HELP,
    find_series,
    read_instance_hu,
    read_nifti_labels,
    read_rtstruct_labels,
    read_seg_labels,
    read_series,
    series_geometry,
    series_key,
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
) -> list[Dataset]:
    """Write slice k of ``stored`` (int16 (Z, H, W)) at z_positions[k]; return datasets in k order.

    File names and InstanceNumbers are shuffled; slice k has RescaleSlope 1 + k % 2 and
    RescaleIntercept −1024 + 10·k, so HU = stored × slope + intercept differs per slice.
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


# ----------------------------------------------------------------------------- fixtures

Z_A = [-40.0 + 2.5 * k for k in range(6)]  # ascending z, 2.5 mm apart
Z_B = [30.0 - 3.0 * k for k in range(5)]  # written with decreasing z


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A hospital-like folder: two CT series with a SEG and an RTSTRUCT, plus files to skip."""
    root = tmp_path_factory.mktemp("hospital")
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


# ----------------------------------------------------------------------------- find_series


def test_find_series_groups_images_and_reports_skipped_files(hospital: dict) -> None:
    series, skipped = find_series(hospital["root"])
    by_uid = {s.series_uid: s for s in series}
    a = by_uid[hospital["src_a"][0].SeriesInstanceUID]
    b = by_uid[hospital["src_b"][0].SeriesInstanceUID]
    assert len(series) == 2 and len(a.instances) == 6 and len(b.instances) == 5
    assert a.folder.name == "ct_a" and a.modality == "CT"
    assert [(lab.kind, lab.path.name) for lab in a.labels] == [("SEG", "seg_a.dcm")]
    assert [(lab.kind, lab.path.name) for lab in b.labels] == [("RTSTRUCT", "rt_b.dcm")]
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"report.dcm", "screenshot.dcm", "notes.txt", "broken.dcm"}
    assert "structured report" in reasons["report.dcm"]
    assert "secondary capture without geometry" in reasons["screenshot.dcm"]
    assert "not a DICOM file" in reasons["notes.txt"] or "unreadable" in reasons["notes.txt"]
    assert "truncated" in reasons["broken.dcm"]


def test_dicomdir_is_skipped(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    src = write_ct_series(tmp_path / "in", np.zeros((2, H, W), np.int16), [0.0, 1.0], seed=12)
    fs = FileSet()
    for ds in src:
        fs.add(ds)
    fs.write(tmp_path / "media")
    series, skipped = find_series(tmp_path / "media")
    assert len(series) == 1 and len(series[0].instances) == 2
    assert [(p.path.name, p.reason.split(" ")[0]) for p in skipped] == [("DICOMDIR", "DICOMDIR")]


def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    stored = np.arange(3 * H * W, dtype=np.int16).reshape(3, H, W)
    src = write_ct_series(tmp_path / "s", stored, [0.0, 1.0, 2.0], seed=3)
    # rewrite slice 1 as a bare dataset: no preamble, no file meta, implicit VR
    target = next(
        p for p in (tmp_path / "s").iterdir() if pydicom.dcmread(p).SOPInstanceUID == src[1].SOPInstanceUID
    )
    ds = pydicom.dcmread(target)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(target, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert target.read_bytes()[128:132] != b"DICM"
    series, skipped = find_series(tmp_path)
    assert not skipped and len(series[0].instances) == 3
    np.testing.assert_array_equal(read_series(series[0]).hu, expected_hu(stored))


# ----------------------------------------------------------------------------- read_series


@pytest.mark.parametrize("which", ["a", "b"])
def test_read_series_orders_by_position_and_rescales(hospital: dict, which: str) -> None:
    series, _ = find_series(hospital["root"])
    src = hospital[f"src_{which}"]
    info = next(s for s in series if s.series_uid == src[0].SeriesInstanceUID)
    vol = read_series(info)
    zs = np.array(Z_A if which == "a" else Z_B)
    order = np.argsort(zs)  # slices ascend along the normal (0, 0, 1) whatever the file order
    hu = expected_hu(hospital[f"stored_{which}"])[order]
    assert vol.hu.dtype == np.float32 and vol.hu.shape == hu.shape
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_allclose(vol.positions[:, 2], zs[order])
    assert vol.sop_instance_uids == [src[i].SOPInstanceUID for i in order]
    np.testing.assert_allclose(vol.spacing, (2.5 if which == "a" else 3.0, *PIXEL_SPACING))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    np.testing.assert_allclose(vol.origin, [-12.0, -20.0, zs.min()])
    assert vol.slice_thickness == 2.5 and vol.warnings == []
    # the LPS affine maps voxel (col, row, slice) to the centre of that pixel
    i, j, k = 5, 7, 2
    want = (
        vol.positions[k] + i * PIXEL_SPACING[1] * vol.direction[0] + j * PIXEL_SPACING[0] * vol.direction[1]
    )
    np.testing.assert_allclose(vol.affine_lps() @ [i, j, k, 1], [*want, 1])


def test_gap_and_uneven_spacing_are_warned_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = np.zeros((5, H, W), np.int16)
    write_ct_series(tmp_path / "gap", stored, [0.0, 2.0, 4.0, 10.0, 12.0], seed=4)
    series, _ = find_series(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        geom = series_geometry(series[0])
    assert geom.spacing[0] == 2.0
    assert any("missing slices" in w and "6.000 mm" in w for w in geom.warnings)
    assert any("non-uniform" in w for w in geom.warnings)
    assert "missing slices" in caplog.text


def test_inconsistent_orientation_is_an_error_naming_the_series(tmp_path: Path) -> None:
    stored = np.zeros((3, H, W), np.int16)
    src = write_ct_series(tmp_path / "s", stored, [0.0, 1.0, 2.0], seed=5)
    p = next(
        p for p in (tmp_path / "s").iterdir() if pydicom.dcmread(p).SOPInstanceUID == src[2].SOPInstanceUID
    )
    ds = pydicom.dcmread(p)
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal
    ds.save_as(p)
    series, _ = find_series(tmp_path)
    # find_series splits the series into one stack per orientation ...
    assert sorted((s.orientation, len(s.instances)) for s in series) == [("axial", 2), ("coronal", 1)]
    assert sorted(s.part for s in series) == ["o1", "o2"]
    assert {s.series_uid for s in series} == {src[0].SeriesInstanceUID} and len({s.key for s in series}) == 2
    # ... and a mixed stack given to series_geometry directly is still an error naming the series
    merged = dataclasses.replace(series[0], instances=[i for s in series for i in s.instances], part="")
    with pytest.raises(
        DataError, match=rf"series {src[0].SeriesInstanceUID}.*ImageOrientationPatient differs"
    ):
        series_geometry(merged)


def test_inconsistent_image_size_is_an_error(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s", np.zeros((2, H, W), np.int16), [0.0, 1.0], seed=6)
    write_ct_series(tmp_path / "t", np.zeros((1, 16, 16), np.int16), [2.0], seed=7)
    # move the 16×16 slice into the first series
    p = next((tmp_path / "t").iterdir())
    ds = pydicom.dcmread(p)
    ds.SeriesInstanceUID = pydicom.dcmread(next((tmp_path / "s").iterdir())).SeriesInstanceUID
    ds.save_as(tmp_path / "s" / "other.dcm")
    p.unlink()
    series, _ = find_series(tmp_path)
    assert sorted(len(s.instances) for s in series) == [1, 2] and {s.part for s in series} == {"o1", "o2"}
    merged = dataclasses.replace(series[0], instances=[i for s in series for i in s.instances], part="")
    with pytest.raises(DataError, match="image size differs.*16×16"):
        series_geometry(merged)


def test_undecodable_compressed_slice_names_the_plugins(tmp_path: Path) -> None:
    src = write_ct_series(tmp_path / "s", np.zeros((1, H, W), np.int16), [0.0], seed=8)[0]
    ds = src.copy()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "j2k.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match="JPEG 2000") as err:
        read_instance_hu(path)
    assert str(path) in str(err.value) and PLUGIN_HELP in str(err.value)


# ----------------------------------------------------------------------------- labels


def _volume(hospital: dict, which: str):
    series, _ = find_series(hospital["root"])
    info = next(s for s in series if s.series_uid == hospital[f"src_{which}"][0].SeriesInstanceUID)
    return info, read_series(info)


def test_seg_labels_match_the_written_array_exactly(hospital: dict) -> None:
    info, vol = _volume(hospital, "a")
    seg = pydicom.dcmread(info.labels[0].path)
    assert int(seg.NumberOfFrames) == 4  # of 6 × 2: slices 1-3 of segment 1, slice 4 of segment 2
    labels = read_seg_labels(info.labels[0].path, vol)
    order = np.argsort(Z_A)
    np.testing.assert_array_equal(labels, hospital["seg_a"][order])


def test_seg_of_another_series_is_an_error(hospital: dict) -> None:
    info_a, _ = _volume(hospital, "a")
    _, vol_b = _volume(hospital, "b")
    with pytest.raises(DataError, match=r"seg_a\.dcm: the SEG references none of the instances"):
        read_seg_labels(info_a.labels[0].path, vol_b)


def test_seg_without_source_references_is_placed_by_position(hospital: dict, tmp_path: Path) -> None:
    info, vol = _volume(hospital, "a")
    seg = pydicom.dcmread(info.labels[0].path)
    for group in seg.PerFrameFunctionalGroupsSequence:
        del group.DerivationImageSequence
    del seg.SourceImageSequence
    path = tmp_path / "noref.dcm"
    seg.save_as(path)
    labels = read_seg_labels(path, vol)
    np.testing.assert_array_equal(labels, hospital["seg_a"][np.argsort(Z_A)])


def test_rtstruct_labels_match_within_one_pixel_border(hospital: dict) -> None:
    info, vol = _volume(hospital, "b")
    labels = read_rtstruct_labels(info.labels[0].path, vol)
    truth = hospital["rt_b"][np.argsort(Z_B)]
    assert labels.shape == truth.shape and set(np.unique(labels)) == {0, 1}
    for k in range(truth.shape[0]):
        border = ndimage.binary_dilation(truth[k]) & ~ndimage.binary_erosion(truth[k])
        wrong = (labels[k] > 0) != truth[k]
        assert not (wrong & ~border).any(), f"slice {k}: mismatch away from the border"
    # the ring's hole (radius 4) stays empty: inner contours are holes
    ring = int(np.flatnonzero(np.argsort(Z_B) == 1)[0])
    assert labels[ring][14:19, 14:19].sum() == 0 and labels[ring].sum() > 100


def test_rtstruct_rois_become_classes_in_order(hospital: dict, tmp_path: Path) -> None:
    _, vol = _volume(hospital, "b")
    first = np.zeros((5, H, W), bool)
    second = np.zeros((5, H, W), bool)
    first[2] = disk((H, W), 8, 8, 4)
    second[2] = disk((H, W), 22, 22, 4)
    path = tmp_path / "rt2.dcm"
    write_rtstruct(path, hospital["src_b"], [first, second])
    k = int(np.flatnonzero(np.argsort(Z_B) == 2)[0])
    labels = read_rtstruct_labels(path, vol)
    assert labels[k][8, 8] == 1 and labels[k][22, 22] == 2 and labels.sum() == labels[k].sum()
    merged = read_rtstruct_labels(path, vol, merge=True)
    np.testing.assert_array_equal(merged, (labels > 0).astype(merged.dtype))


def test_nifti_mask_in_series_geometry(hospital: dict, tmp_path: Path) -> None:
    _, vol = _volume(hospital, "a")
    truth = np.zeros(vol.shape, np.uint8)
    truth[2, 5:9, 20:27] = 1
    ras = nib.Nifti1Image(np.transpose(truth, (2, 1, 0)).copy(), vol.affine_ras())
    nib.save(ras, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_nifti_labels(tmp_path / "m.nii.gz", vol), truth)
    # the same mask stored in another axis order (as (Z, H, W) with its affine permuted) lines up too
    perm = ras.as_reoriented(np.array([[2, 1], [1, -1], [0, 1]]))
    nib.save(perm, tmp_path / "p.nii.gz")
    np.testing.assert_array_equal(read_nifti_labels(tmp_path / "p.nii.gz", vol), truth)
    nib.save(nib.Nifti1Image(np.zeros((W, H, 3), np.uint8), vol.affine_ras()), tmp_path / "bad.nii.gz")
    with pytest.raises(DataError, match=r"bad\.nii\.gz.*\(32, 32, 3\).*32×32×6"):
        read_nifti_labels(tmp_path / "bad.nii.gz", vol)


# ----------------------------------------------------------------------------- dataset


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(
        name="dicom",
        root=str(root),
        context_slices=3,
        slice_offset_mm=2.5,
        window="fixed",
        window_range=[-1000.0, 1000.0],
        num_classes=3,
    )
    base.update(kw)
    return DataConfig(**base)


def test_dicom_dataset_samples_match_series_and_labels(
    hospital: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        ds = build_dataset(_cfg(hospital["root"]), "all")
    assert "broken.dcm" in caplog.text and "truncated" in caplog.text
    samples = [ds[i] for i in range(len(ds))]
    hu_a = expected_hu(hospital["stored_a"])[np.argsort(Z_A)]
    seg_a = hospital["seg_a"][np.argsort(Z_A)]
    rt_b = hospital["rt_b"][np.argsort(Z_B)]
    key_a = series_key(hospital["src_a"][0].SeriesInstanceUID)
    key_b = series_key(hospital["src_b"][0].SeriesInstanceUID)
    a = {s["meta"]["slice"]: s for s in samples if s["meta"]["series"] == key_a}
    b = {s["meta"]["slice"]: s for s in samples if s["meta"]["series"] == key_b}
    assert sorted(a) == [1, 2, 3, 4]  # foreground slices only
    assert sorted(b) == [1, 2, 3]  # written slices 3, 2, 1 (z descending) are sorted slices 1, 2, 3
    for k, s in a.items():
        assert s["image"].shape == (3, H, W) and s["image"].dtype == np.float32
        # slice_offset_mm equals the 2.5 mm interval: neighbours are whole slices, clamped at the ends
        nb = [max(k - 1, 0), k, min(k + 1, 5)]
        np.testing.assert_allclose(s["image"], apply_window(hu_a[nb], -1000, 1000), atol=1e-6)
        np.testing.assert_array_equal(s["label"][0], seg_a[k])
        assert s["label"].dtype == np.int64 and s["instance"].dtype == np.int32
        assert s["meta"]["spacing"] == list(PIXEL_SPACING) and s["meta"]["slice_interval"] == 2.5
        assert s["meta"]["label_source"] == "SEG"
    # two separate blobs on slice 2 → two instances
    assert len(np.unique(a[2]["instance"])) == 3
    for k, s in b.items():
        wrong = (s["label"][0] > 0) != rt_b[k]
        border = ndimage.binary_dilation(rt_b[k]) & ~ndimage.binary_erosion(rt_b[k])
        assert not (wrong & ~border).any()
    # no patient data anywhere in meta
    text = repr([s["meta"] for s in samples])
    for secret in (PATIENT_NAME, PATIENT_ID, "19700101", "20240102", hospital["src_a"][0].SeriesInstanceUID):
        assert secret not in text


def test_dicom_dataset_interpolates_fractional_offsets(hospital: dict) -> None:
    ds = build_dataset(_cfg(hospital["root"], slice_offset_mm=1.25, num_classes=3), "all")
    hu = expected_hu(hospital["stored_a"])[np.argsort(Z_A)]
    key_a = series_key(hospital["src_a"][0].SeriesInstanceUID)
    s = next(
        ds[i] for i in range(len(ds)) if ds[i]["meta"]["series"] == key_a and ds[i]["meta"]["slice"] == 2
    )
    want = np.stack([0.5 * hu[1] + 0.5 * hu[2], hu[2], 0.5 * hu[2] + 0.5 * hu[3]])
    np.testing.assert_allclose(s["image"], apply_window(want, -1000, 1000), atol=1e-5)


def test_dicom_dataset_splits_by_series_and_rejects_bad_classes(hospital: dict) -> None:
    cfg = _cfg(hospital["root"], val_fraction=0.5, test_fraction=0.0)
    parts = {sp: build_dataset(cfg, sp) for sp in ("train", "val")}
    series = [{s.key for s in parts[sp].series} for sp in parts]
    assert series[0].isdisjoint(series[1]) and len(series[0] | series[1]) == 2
    with pytest.raises(DataError, match=r"seg_a\.dcm.*class 2.*num_classes = 2"):
        build_dataset(_cfg(hospital["root"], num_classes=2), "all")


def test_dicom_dataset_skips_unlabelled_series_and_uses_nifti_masks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = np.full((4, H, W), 100, np.int16)
    write_ct_series(tmp_path / "case1", stored, [0.0, 2.0, 4.0, 6.0], seed=9)
    write_ct_series(tmp_path / "case2", stored, [0.0, 2.0, 4.0, 6.0], seed=10)
    info = next(s for s in find_series(tmp_path)[0] if s.folder.name == "case1")
    geom = series_geometry(info)
    mask = np.zeros(geom.shape, np.uint8)
    mask[1, 3:6, 3:6] = 255  # 0/255 is read as 0/1
    (tmp_path / "masks").mkdir()
    nib.save(
        nib.Nifti1Image(np.transpose(mask, (2, 1, 0)).copy(), geom.affine_ras()),
        tmp_path / "masks" / "case1.nii.gz",
    )
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        ds = build_dataset(_cfg(tmp_path, num_classes=2), "all")
    assert "1 series without labels" in caplog.text and "case2" in caplog.text
    assert len(ds) == 1 and ds[0]["meta"]["label_source"] == "NIFTI"
    np.testing.assert_array_equal(ds[0]["label"][0], mask[1] // 255)
    assert "case1.nii.gz" not in caplog.text  # masks/ is not scanned as DICOM


def test_dicom_dataset_without_labels_is_an_error(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "case1", np.zeros((2, H, W), np.int16), [0.0, 1.0], seed=11)
    with pytest.raises(DataError, match="none of the 1 series has labels"):
        build_dataset(_cfg(tmp_path), "all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM image series"):
        build_dataset(_cfg(tmp_path / "empty"), "all")
