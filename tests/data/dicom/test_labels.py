"""Labels of a series: a DICOM SEG, an RTSTRUCT and a NIfTI mask read back onto the series' grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from medseg.data.base import DataError
from medseg.data.dicom import (
    find_series,
    read_nifti_labels,
    read_rtstruct_labels,
    read_seg_labels,
    read_series,
)
from tests.data.dicom.builders import Z_A, Z_B, H, W, disk, write_rtstruct


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

