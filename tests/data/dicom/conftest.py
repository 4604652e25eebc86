"""The hospital-like DICOM folder shared (read-only) by the DICOM reader's tests."""

from __future__ import annotations

import pytest

from tests.data.dicom.builders import build_hospital


@pytest.fixture(scope="package")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two CT series with a SEG and an RTSTRUCT, plus files to skip (see :func:`build_hospital`)."""
    return build_hospital(tmp_path_factory.mktemp("hospital"))
