"""index_headers: find_series' reduce with the instance headers in an SQLite file gives group_headers' result."""

from __future__ import annotations

import pickle
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medseg.data.dicom import find_series, group_headers, list_files, read_header, series_geometry
from medseg.data.dicom.index import IndexedInstances, index_headers
from tests.data.dicom.builders import H, W, write_ct_series


def _rewrite(src: Path, dest: Path, edit: Any) -> None:
    ds = pydicom.dcmread(src)
    edit(ds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)


def _archive(hospital: dict, root: Path) -> Path:
    """The hospital folder plus: a duplicate before and one after its original in path order, an
    RTSTRUCT attached by its SOP references and one by its frame of reference, a SEG attached by its
    SOP references and one that references nothing here, a series with two orientations."""
    shutil.copytree(hospital["root"], root)
    ct_a = sorted((root / "pat1" / "study" / "ct_a").iterdir())
    shutil.copy(ct_a[1], root / "pat1" / "study" / "aa_dup.dcm")  # earlier in path order: it wins
    (root / "pat3").mkdir()
    shutil.copy(ct_a[2], root / "pat3" / "zz_dup.dcm")  # later: skipped as a duplicate
    rt, seg = root / "labels" / "rt_b.dcm", root / "labels" / "seg_a.dcm"

    def rt_by_sop(ds: Any) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]\
            .SeriesInstanceUID = generate_uid()

    def rt_by_for(ds: Any) -> None:
        ds.SOPInstanceUID = generate_uid()
        del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence

    def seg_by_sop(ds: Any) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()

    def seg_nowhere(ds: Any) -> None:
        seg_by_sop(ds)
        for item in [*ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence, *ds.get("SourceImageSequence", [])]:
            item.ReferencedSOPInstanceUID = generate_uid()

    _rewrite(rt, root / "labels" / "rt_sop.dcm", rt_by_sop)
    _rewrite(rt, root / "labels" / "rt_for.dcm", rt_by_for)
    _rewrite(seg, root / "labels" / "seg_sop.dcm", seg_by_sop)
    _rewrite(seg, root / "labels" / "seg_nowhere.dcm", seg_nowhere)
    mixed = root / "pat2" / "mixed"
    write_ct_series(mixed, np.zeros((5, H, W), np.int16), [0.0, 2.0, 4.0, 6.0, 8.0], seed=7)
    for p in sorted(mixed.iterdir())[1::2]:  # two coronal slices among three axial ones
        _rewrite(p, p, lambda ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
    return root


def _view(series: list) -> list[tuple]:
    return [(s.series_uid, s.part, s.key, s.modality, s.study_uid, s.frame_of_reference_uid, s.description, s.folder,
             s.body_part, s.orientation, len(s.instances), list(s.instances), list(s.files), list(s.distinct_files),
             [(lab.path, lab.kind, lab.series_uid) for lab in s.labels]) for s in series]


def test_the_index_backed_reduce_equals_group_headers(hospital: dict, tmp_path: Path) -> None:
    root = _archive(hospital, tmp_path / "archive")
    records = [read_header(p) for p in list_files(root)]
    want, want_skipped = group_headers(root, records)
    index = tmp_path / "out" / "headers.sqlite"
    index.parent.mkdir()
    got, got_skipped = index_headers(root, iter(records), index)

    assert _view(got) == _view(want)
    assert got_skipped == want_skipped
    # what the folder exercises: both duplicate orders, each label rule, the split, the skipped files
    reasons = {s.path.name: s.reason for s in got_skipped}
    first = next(p for p in sorted((root / "pat1" / "study" / "ct_a").iterdir())
                 if pydicom.dcmread(p).SOPInstanceUID == pydicom.dcmread(root / "pat1" / "study" / "aa_dup.dcm").SOPInstanceUID)
    assert reasons[first.name] == f"duplicate of {root / 'pat1' / 'study' / 'aa_dup.dcm'} (same SOPInstanceUID)"
    assert reasons["zz_dup.dcm"].startswith("duplicate of ") and reasons["seg_nowhere.dcm"].startswith("SEG references")
    assert {"report.dcm", "screenshot.dcm", "notes.txt", "broken.dcm"} <= set(reasons)
    labels = {lab.path.name for s in got for lab in s.labels}
    assert labels == {"seg_a.dcm", "seg_sop.dcm", "rt_b.dcm", "rt_sop.dcm", "rt_for.dcm"}
    assert [(s.part, s.orientation, len(s.instances)) for s in got if s.part] == [("o1", "axial", 3), ("o2", "coronal", 2)]

    # the headers live in the file (one plain file, no WAL left), read on each use and after pickling
    assert all(isinstance(s.instances, IndexedInstances) for s in got)
    assert sorted(p.name for p in index.parent.iterdir()) == ["headers.sqlite"]
    with sqlite3.connect(index) as db:
        n_files = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert n_files == sum(len(s.distinct_files) for s in want)
    for s, w in zip(got, want):
        moved = pickle.loads(pickle.dumps(s))
        assert list(moved.instances) == list(w.instances)
        if not s.part:  # (the coronal stack's two slices share a position: not a volume)
            assert series_geometry(moved).sop_instance_uids == series_geometry(w).sop_instance_uids


def test_find_series_with_an_index_equals_find_series(hospital: dict, tmp_path: Path) -> None:
    want = find_series(hospital["root"])
    got = find_series(hospital["root"], index=tmp_path / "i.sqlite")
    assert _view(got[0]) == _view(want[0]) and got[1] == want[1]
