"""find_series: grouping instances into series, and the reason for every file it skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from medseg.data.dicom import find_series, read_series
from tests.data.dicom.builders import H, W, expected_hu, write_ct_series


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

