"""The ``dicom`` dataset: samples, 2.5-D interpolation, splits, label sources."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.config import DataConfig
from medseg.data import build_dataset
from medseg.data.base import DataError, apply_window
from medseg.data.dicom import find_series, series_geometry, series_key
from tests.data.dicom.builders import (
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_SPACING,
    Z_A,
    Z_B,
    H,
    W,
    expected_hu,
    write_ct_series,
)


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
