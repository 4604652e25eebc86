"""series_geometry and the pixel readers: slice order, rescaling, geometry checks, undecodable pixels."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from medseg.data.base import DataError
from medseg.data.dicom import PLUGIN_HELP, find_series, read_instance_hu, read_series, series_geometry
from tests.data.dicom.builders import PIXEL_SPACING, Z_A, Z_B, H, W, expected_hu, write_ct_series


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

