"""Every compressed transfer syntax a PACS sends decodes with medseg's declared plugins.

Checked on pydicom's own test corpus (``pydicom.data.get_testdata_file``; the larger files come from
the ``pydicom-data`` package): a compressed file equals its uncompressed twin where the corpus has
one, two independent decoders agree where it has none, and known pixel values hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import medseg.data.dicom  # noqa: F401  (registers medseg's decoder plugin)
from medseg.data.dicom import read_instance_hu
from medseg.data.dicom.decoders import DECODER_TABLE

ROOT = Path(__file__).resolve().parents[3]


def _file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not on disk (install pydicom-data)")
    return str(path)


def _ts(name: str) -> str:
    return pydicom.dcmread(_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID


@pytest.mark.parametrize(
    "compressed, plain, ts",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", RLELossless),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", JPEGLSLossless),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", JPEG2000Lossless),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", JPEGLSLossless),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", JPEG2000Lossless),
        ("emri_small_RLE.dcm", "emri_small.dcm", RLELossless),
        ("693_J2KR.dcm", "693_UNCR.dcm", JPEG2000Lossless),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm", JPEG2000Lossless),
    ],
)
def test_lossless_syntaxes_equal_the_uncompressed_twin(compressed: str, plain: str, ts: str) -> None:
    assert _ts(compressed) == ts
    a = pydicom.dcmread(_file(compressed)).pixel_array
    b = pydicom.dcmread(_file(plain)).pixel_array
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_lossy_jpeg2000_is_close_to_the_uncompressed_twin() -> None:
    assert _ts("693_J2KI.dcm") == JPEG2000
    a = pydicom.dcmread(_file("693_J2KI.dcm")).pixel_array.astype(float)
    b = pydicom.dcmread(_file("693_UNCI.dcm")).pixel_array.astype(float)
    assert np.abs(a - b).mean() < 0.02 * (b.max() - b.min())


def test_jpeg_ls_near_lossless_decodes() -> None:
    assert _ts("JPEGLSNearLossless_16.dcm") == JPEGLSNearLossless
    a = pixel_array(_file("JPEGLSNearLossless_16.dcm"), decoding_plugin="pyjpegls")
    b = pixel_array(_file("JPEGLSNearLossless_16.dcm"), decoding_plugin="gdcm")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_jpeg_lossless_two_independent_decoders_agree(name: str) -> None:
    assert _ts(name) in (JPEGLossless, JPEGLosslessSV1)
    a = pixel_array(_file(name), decoding_plugin="gdcm")
    b = pixel_array(_file(name), decoding_plugin="medseg-imagecodecs")
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0


def test_jpeg_extended_12_bit_decodes() -> None:
    """pydicom's GDCM and Pillow plugins refuse 12-bit JPEG; medseg's imagecodecs plugin does it."""
    assert _ts("JPGExtended.dcm") == JPEGExtended12Bit
    arr = pydicom.dcmread(_file("JPGExtended.dcm")).pixel_array
    assert arr.shape == (1024, 256) and arr.dtype == np.uint16
    assert (int(arr[420, 140]), int(arr[230, 120])) == (244, 95)  # values pydicom's own tests pin
    assert arr.max() < 4096  # 12-bit samples


def test_jpeg_baseline_is_close_to_the_uncompressed_twin() -> None:
    assert _ts("SC_rgb_jpeg_dcmtk.dcm") == JPEGBaseline8Bit
    a = pydicom.dcmread(_file("SC_rgb_jpeg_dcmtk.dcm")).pixel_array.astype(float)
    b = pydicom.dcmread(_file("SC_rgb.dcm")).pixel_array.astype(float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3.0


def test_deflate_decodes() -> None:
    assert _ts("image_dfl.dcm") == DeflatedExplicitVRLittleEndian
    arr = pydicom.dcmread(_file("image_dfl.dcm")).pixel_array
    assert arr.shape == (512, 512) and arr.std() > 0


def test_compressed_ct_slice_reads_as_hu() -> None:
    hu = read_instance_hu(_file("693_J2KR.dcm"))
    ds = pydicom.dcmread(_file("693_UNCR.dcm"))
    ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu, ref)


def test_no_gpl_decoder_is_declared() -> None:
    deps = (ROOT / "pyproject.toml").read_text()
    assert "pylibjpeg-libjpeg" not in deps.replace("pylibjpeg-libjpeg is GPL", "")
    for pkg in ("python-gdcm", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "imagecodecs"):
        assert f'"{pkg}' in deps
    assert {ts for ts, _ in DECODER_TABLE} >= {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                                               JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless,
                                               DeflatedExplicitVRLittleEndian}
