"""``sr.dcm`` (TID 1500) and the per-lesion ``seg.dcm`` of ``medseg predict``, read back with highdicom, pydicom
and dcmqi's ``tid1500reader``; a source without a FrameOfReferenceUID still gets its other outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medseg.predict import run_predict
from medseg.predict.sr import MEASURES, read_sr_measurements
from tests.predict import builders as B
from tests.predict.pacs_builders import write_ct


@pytest.fixture(scope="module")
def oracle():
    B.register()
    yield
    B.unregister()


@pytest.fixture(scope="module")
def predicted(oracle: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sr")
    ckpt = B.write_checkpoint(tmp / "model" / "best.pt")
    write_ct(tmp / "in" / "a")
    write_ct(tmp / "in" / "b", seed=1, FrameOfReferenceUID="")  # an old export without a frame of reference
    res = run_predict(ckpt, tmp / "in", tmp / "out", progress=False)
    return {"res": res, "out": tmp / "out", "in": tmp / "in", "ckpt": ckpt}


def _case(out: Path, with_seg: bool) -> Path:
    found = [j.parent for j in out.glob("study-*/series-*/series.json") if (j.parent / "seg.dcm").exists() == with_seg]
    assert len(found) == 1, found
    return found[0]


def tid1500reader() -> str:
    tool = shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader")
    assert Path(tool).exists(), "dcmqi's tid1500reader is not installed (pip install dcmqi; `make test` installs it)"
    return tool


def test_sr_equals_lesions_csv_and_references_each_lesions_segment(predicted: dict) -> None:
    d = _case(predicted["out"], True)
    rows = list(csv.DictReader((d / "lesions.csv").open()))
    assert len(rows) == 2
    seg = pydicom.dcmread(d / "seg.dcm")
    segs = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segs) == [1, 2] and [segs[k].SegmentLabel for k in (1, 2)] == ["lesion 1", "lesion 2"]
    # each segment's pixels are that lesion: segment 2 (lesion B) on one slice only, with its area
    hseg = hd.seg.segread(d / "seg.dcm")
    srcs = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in (predicted["in"] / "a").iterdir()),
                  key=lambda ds: float(ds.ImagePositionPatient[2]))
    pix = hseg.get_pixels_by_source_instance([str(s.SOPInstanceUID) for s in srcs], combine_segments=True,
                                             assert_missing_frames_are_empty=True)
    for r in rows:
        on = np.flatnonzero((pix == int(r["lesion_id"])).any((1, 2)))
        assert (on.min(), on.max()) == (int(r["first_slice"]), int(r["last_slice"]))
        area = (pix[int(r["largest_slice"])] == int(r["lesion_id"])).sum() * 0.75 * 0.75
        assert abs(area - float(r["largest_area_mm2"])) < 0.01
    back = read_sr_measurements(d / "sr.dcm")
    assert [g["lesion_id"] for g in back] == [1, 2] and [g["segment"] for g in back] == [1, 2]
    assert {g["seg_sop_uid"] for g in back} == {str(seg.SOPInstanceUID)}
    for g, r in zip(back, rows):
        for col in MEASURES:
            assert g[col] == float(r[col]), (col, g[col], r[col])
    assert float(rows[1]["max_hu"]) == pytest.approx(B.SENTINEL_HU + 300, abs=1)
    # pydicom, independent of highdicom: a TID 1500 Comprehensive 3D SR naming medseg and the fingerprint
    raw = pydicom.dcmread(d / "sr.dcm")
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert raw.StudyInstanceUID == seg.StudyInstanceUID
    info = json.loads((d / "series.json").read_text())
    assert info["model"]["fingerprint"] in str(raw)


def test_dcmqi_tid1500reader_reads_the_same_values(predicted: dict, tmp_path: Path) -> None:
    d = _case(predicted["out"], True)
    rows = list(csv.DictReader((d / "lesions.csv").open()))
    subprocess.run([tid1500reader(), "--inputDICOM", str(d / "sr.dcm"), "--outputMetadata", str(tmp_path / "m.json")],
                   check=True, capture_output=True, timeout=120)
    meta = json.loads((tmp_path / "m.json").read_text())
    groups = meta["Measurements"]
    assert len(groups) == len(rows)
    seg_uid = str(pydicom.dcmread(d / "seg.dcm").SOPInstanceUID)
    names = {"103339001": "recist_long_mm", "103340004": "recist_short_mm", "118565006": "volume_mm3"}
    for g, r in zip(groups, rows):
        assert g["TrackingIdentifier"] == f"lesion {r['lesion_id']}"
        assert int(g["ReferencedSegment"]) == int(r["lesion_id"]) and g["segmentationSOPInstanceUID"] == seg_uid
        got = {}
        for m in g["measurementItems"]:
            code = m["quantity"]["CodeValue"]
            col = names.get(code) or {"373098007": "mean_hu", "56851009": "max_hu"}[m["derivationModifier"]["CodeValue"]]
            got[col] = float(m["value"])
        assert got == {c: float(r[c]) for c in MEASURES}


def test_sr_and_seg_are_deterministic(predicted: dict, tmp_path: Path) -> None:
    d = _case(predicted["out"], True)
    again = run_predict(predicted["ckpt"], predicted["in"], tmp_path / "out2", progress=False)
    assert not again.failed
    d2 = _case(tmp_path / "out2", True)
    for name in ("seg.dcm", "sr.dcm"):
        assert hashlib.sha256((d / name).read_bytes()).digest() == hashlib.sha256((d2 / name).read_bytes()).digest()


def test_a_series_without_frame_of_reference_is_predicted_without_seg_and_sr(predicted: dict) -> None:
    assert predicted["res"].failed == {}
    d = _case(predicted["out"], False)
    assert {"mask.nii.gz", "lesions.csv", "series.json", "overlays"} <= {p.name for p in d.iterdir()}
    assert not (d / "sr.dcm").exists()
    with sqlite3.connect(predicted["out"] / "manifest.sqlite") as db:
        got = db.execute("SELECT status, reason FROM series WHERE output = ?",
                         (str(d.relative_to(predicted["out"])),)).fetchone()
    assert got == ("done", "SEG/SR not written: the source series has no FrameOfReferenceUID")
