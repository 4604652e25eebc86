"""Tests of the generated DeepLesion-format release (medseg.data.synthetic)."""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from medseg.data.base import DataError
from medseg.data.deeplesion import format_numbers
from medseg.data.synthetic import generate_demo_data
from medseg.evaluation.plots import render_preview
from medseg.lesion import measure_recist

# The real header, written out here independently of the module's constant.
REAL_HEADER = (
    "File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,"
    "Bounding_boxes,Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,"
    "Possibly_noisy,Slice_range,Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,"
    "Train_Val_Test"
)
#: 11 rows of the public DL_info.csv (NIH DeepLesion, CC BY), verbatim: the real format to check against
SAMPLE = Path(__file__).resolve().parents[2] / "fixtures" / "DL_info_sample.csv"

NUM = r"-?\d+(?:\.\d+)?"


def _multi(n: int) -> str:
    """Regex of ``n`` numbers separated by ", "."""
    return ", ".join([NUM] * n)


CELL_RE = {
    "File_name": r"\d{6}_\d{2}_\d{2}_\d{3,}\.png",
    "Patient_index": r"\d+",
    "Study_index": r"\d+",
    "Series_ID": r"\d+",
    "Key_slice_index": r"\d+",
    "Measurement_coordinates": _multi(8),
    "Bounding_boxes": _multi(4),
    "Lesion_diameters_Pixel_": _multi(2),
    "Normalized_lesion_location": _multi(3),
    "Coarse_lesion_type": r"-1|[1-8]",
    "Possibly_noisy": r"[01]",
    "Slice_range": r"\d+, \d+",
    "Spacing_mm_px_": _multi(3),
    "Image_size": r"\d+, \d+",
    "DICOM_windows": _multi(2),
    "Patient_gender": r"[MF]",
    "Patient_age": r"\d*",
    "Train_Val_Test": r"[123]",
}
NUMERIC_MULTI = ("Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
                 "Normalized_lesion_location", "Spacing_mm_px_", "DICOM_windows")  # fmt: skip


def _floats(cell: str) -> np.ndarray:
    return np.array([float(v) for v in cell.split(", ")])


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "DL_info.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_row_format(row: dict[str, str]) -> None:
    for col, pattern in CELL_RE.items():
        assert re.fullmatch(pattern, row[col]), f"{col}={row[col]!r} does not match {pattern}"
    for col in NUMERIC_MULTI:
        for v in row[col].split(", "):
            # the real file writes numbers with C's %g: 6 significant digits, no trailing zeros
            assert f"{float(v):g}" == v, f"{col}: {v!r} is not %g-formatted"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four patients on 128² slices (fast)."""
    return generate_demo_data(tmp_path_factory.mktemp("small"), patients=4, seed=0, progress=False,
                              image_size=128)  # fmt: skip


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three patients at the real 512² size."""
    return generate_demo_data(tmp_path_factory.mktemp("full"), patients=3, seed=5, progress=False)


def test_same_seed_gives_identical_bytes(small: Path, tmp_path: Path) -> None:
    again = generate_demo_data(tmp_path / "again", patients=4, seed=0, progress=False, image_size=128)
    a, b = _files(small), _files(again)
    assert a.keys() == b.keys()
    assert any(k.startswith("Images_png") for k in a) and any(k.startswith("Masks_png") for k in a)
    different = [k for k in a if a[k] != b[k]]
    assert different == []


def test_different_seed_differs(small: Path, tmp_path: Path) -> None:
    other = generate_demo_data(tmp_path / "other", patients=4, seed=1, progress=False, image_size=128)
    assert (other / "DL_info.csv").read_bytes() != (small / "DL_info.csv").read_bytes()
    a, b = _files(small), _files(other)
    common = [k for k in a.keys() & b.keys() if k.startswith("Images_png")]
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in common)


def test_csv_text_matches_the_real_format(small: Path) -> None:
    text = (small / "DL_info.csv").read_text()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == REAL_HEADER
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == len(lines) >= 2
    for line, cells in zip(lines[1:], rows[1:]):
        _check_row_format(dict(zip(REAL_HEADER.split(","), cells)))
        # quoting: exactly the multi-valued cells are quoted, as csv's minimal quoting writes them
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        assert buf.getvalue() == line + "\n"
        assert line.count('"') == 2 * sum(", " in c for c in cells)


def test_format_checks_accept_the_real_rows() -> None:
    # the same regexes and re-serialisation accept the real file's rows (so they test the real format)
    lines = SAMPLE.read_text().splitlines()
    assert lines[0] == REAL_HEADER and len(lines) == 12
    for line, cells in zip(lines[1:], csv.reader(io.StringIO("\n".join(lines[1:])))):
        _check_row_format(dict(zip(REAL_HEADER.split(","), cells)))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        assert buf.getvalue() == line + "\n"



def test_format_numbers_writes_the_real_cells() -> None:
    # the writer's number formatting reproduces the real file's multi-valued cells character for character
    with SAMPLE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11
    for r in rows:
        for col in (*NUMERIC_MULTI, "Slice_range", "Image_size"):
            assert format_numbers([float(v) for v in r[col].split(",")]) == r[col]


def test_row_fields_are_consistent(small: Path) -> None:
    rows = _rows(small)
    for r in rows:
        name = f"{int(r['Patient_index']):06d}_{int(r['Study_index']):02d}_{int(r['Series_ID']):02d}"
        assert r["File_name"] == f"{name}_{int(r['Key_slice_index']):03d}.png"
        first, last = (int(v) for v in r["Slice_range"].split(", "))
        assert first <= int(r["Key_slice_index"]) <= last
        # every slice of the range is on disk, so 2.5-D context can always be read
        for i in range(first, last + 1):
            assert (small / "Images_png" / name / f"{i:03d}.png").is_file()
        pts = _floats(r["Measurement_coordinates"]).reshape(4, 2)
        box = _floats(r["Bounding_boxes"])
        np.testing.assert_allclose(box, [*(pts.min(0) - 5), *(pts.max(0) + 5)], atol=2e-3)
        diam = _floats(r["Lesion_diameters_Pixel_"])
        lengths = [np.linalg.norm(pts[1] - pts[0]), np.linalg.norm(pts[3] - pts[2])]
        np.testing.assert_allclose(diam, lengths, rtol=1e-4, atol=2e-3)
        assert diam[0] >= diam[1] > 0
        loc = _floats(r["Normalized_lesion_location"])
        assert ((loc >= 0) & (loc <= 1)).all()
        sx, sy, dz = _floats(r["Spacing_mm_px_"])
        assert sx == sy and dz in (1.0, 2.0, 2.5, 5.0)
        low, high = _floats(r["DICOM_windows"])
        assert low < high
    noisy = sum(r["Possibly_noisy"] == "1" for r in rows)
    assert 1 <= noisy <= max(1, 0.1 * len(rows))


def test_recist_marks_are_measured_on_the_true_mask(small: Path) -> None:
    rows = _rows(small)
    seen: dict[str, int] = defaultdict(int)
    checked = 0
    for r in rows:
        seen[r["File_name"]] += 1
        k = seen[r["File_name"]]
        series, sl = r["File_name"][:-4].rsplit("_", 1)
        mask = cv2.imread(str(small / "Masks_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED) == k
        if r["Possibly_noisy"] == "1":
            continue  # noisy annotations are deliberately imprecise
        pts = _floats(r["Measurement_coordinates"]).reshape(4, 2) - 1  # 1-based in the CSV
        # independent of measure_recist: every endpoint lies on the lesion's border (x, y order and
        # the 1-based shift both matter here: a one-pixel shift moves one end off the lesion)
        ys, xs = np.nonzero(mask)
        for x, y in pts:
            assert np.hypot(xs - x, ys - y).min() <= 0.8
        # the long axis is the longest chord (pixel centres' diameter plus about one pixel)
        d = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]).max()
        assert d - 0.1 <= np.linalg.norm(pts[1] - pts[0]) <= d + 1.5
        axes = measure_recist(mask)
        assert axes is not None
        np.testing.assert_allclose(pts[:2], axes.long, atol=1.0)
        np.testing.assert_allclose(pts[2:], axes.short, atol=1.0)
        checked += 1
    assert checked >= len(rows) - 2


def test_masks_match_rows_and_key_slice_is_largest(small: Path) -> None:
    rows = _rows(small)
    per_key: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        per_key[r["File_name"]].append(r)
    for name, rs in per_key.items():
        series, sl = name[:-4].rsplit("_", 1)
        key = cv2.imread(str(small / "Masks_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED)
        assert key is not None and key.dtype == np.uint8
        assert sorted(np.unique(key)[1:].tolist()) == list(range(1, len(rs) + 1))
        first, last = (int(v) for v in rs[0]["Slice_range"].split(", "))
        key_area = np.bincount(key.ravel(), minlength=len(rs) + 1)
        for i in range(first, last + 1):
            p = small / "Masks_png" / series / f"{i:03d}.png"
            if p.exists():
                m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                assert m.max() <= len(rs)
                assert (np.bincount(m.ravel(), minlength=len(rs) + 1)[1:] <= key_area[1:]).all()
    # every mask file sits beside an image of the same slice
    for p in (small / "Masks_png").rglob("*.png"):
        assert (small / "Images_png" / p.parent.name / p.name).is_file()


def test_splits_are_by_patient_and_all_present(small: Path) -> None:
    rows = _rows(small)
    split_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        split_of[r["Patient_index"]].add(r["Train_Val_Test"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {r["Train_Val_Test"] for r in rows} == {"1", "2", "3"}
    assert all(r["Coarse_lesion_type"] != "-1" for r in rows if r["Train_Val_Test"] != "1")


def test_hu_ranges_and_slices_at_full_size(full_size: Path) -> None:
    rows = _rows(full_size)
    per_key = {r["File_name"]: r for r in rows}
    for name, r in per_key.items():
        assert r["Image_size"] == "512, 512"
        sx = _floats(r["Spacing_mm_px_"])[0]
        assert 0.6 <= sx <= 0.98
        series, sl = name[:-4].rsplit("_", 1)
        img = cv2.imread(str(full_size / "Images_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (512, 512)
        hu = img.astype(np.int32) - 32768
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert hu[0, 0] == -1024 and (hu < -900).mean() > 0.1  # air outside the body and the FOV
        assert ((hu > -160) & (hu < -40)).mean() > 0.01  # fat
        assert ((hu > 0) & (hu < 100)).mean() > 0.02  # soft tissue
        assert (hu > 300).sum() > 100  # bone
        # neighbouring slices are similar (the anatomy varies smoothly along the series)
        first, last = (int(v) for v in r["Slice_range"].split(", "))
        nb = int(sl) + 1 if int(sl) < last else int(sl) - 1
        hu2 = cv2.imread(str(full_size / "Images_png" / series / f"{nb:03d}.png"), cv2.IMREAD_UNCHANGED)
        assert np.corrcoef(hu.ravel(), hu2.astype(np.int32).ravel())[0, 1] > 0.9
    # lesions stand out from their surroundings (so a small network can learn them)
    contrasts = []
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        seen[r["File_name"]] += 1
        series, sl = r["File_name"][:-4].rsplit("_", 1)
        hu = cv2.imread(str(full_size / "Images_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED)
        m = cv2.imread(str(full_size / "Masks_png" / series / f"{sl}.png"), cv2.IMREAD_UNCHANGED)
        les = (m == seen[r["File_name"]]).astype(np.uint8)
        ring = cv2.dilate(les, np.ones((7, 7), np.uint8)).astype(bool) & (m == 0)
        hu = hu.astype(np.int32)
        contrasts.append(abs(np.median(hu[les.astype(bool)]) - np.median(hu[ring])))
    assert np.median(contrasts) > 40


def test_tiny_release_has_all_splits(tmp_path: Path) -> None:
    root = generate_demo_data(tmp_path / "three", patients=3, seed=3, progress=False, image_size=96)
    assert {r["Train_Val_Test"] for r in _rows(root)} == {"1", "2", "3"}


def test_existing_release_is_kept(small: Path) -> None:
    before = (small / "DL_info.csv").read_bytes()
    generate_demo_data(small, patients=5, seed=9, progress=False, image_size=128)
    assert (small / "DL_info.csv").read_bytes() == before


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "interrupted"
    (root / "Images_png" / "999999_01_01").mkdir(parents=True)
    (root / "Images_png" / "999999_01_01" / "001.png").write_bytes(b"partial")
    (root / ".medseg_demo_incomplete").write_text("")
    generate_demo_data(root, patients=3, seed=0, progress=False, image_size=96)
    assert (root / "DL_info.csv").is_file()
    assert not (root / "Images_png" / "999999_01_01").exists()
    assert not (root / ".medseg_demo_incomplete").exists()
    assert not (root / "DL_info.csv.tmp").exists()


def test_foreign_images_without_csv_are_refused(tmp_path: Path) -> None:
    (tmp_path / "Images_png").mkdir()
    with pytest.raises(DataError, match="Images_png"):
        generate_demo_data(tmp_path, patients=3, progress=False, image_size=96)
    assert (tmp_path / "Images_png").is_dir()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="patients"):
        generate_demo_data("unused", patients=2, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        generate_demo_data("unused", patients=3, image_size=32, progress=False)


def test_render_preview(small: Path, tmp_path: Path) -> None:
    out = render_preview(small, tmp_path / "p.png")
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 400
    b, g, r = (img[..., i].astype(int) for i in range(3))
    assert ((r > 200) & (g < 60) & (b < 60)).sum() > 5  # the red long axis
    assert ((r > 200) & (g > 200) & (b < 80)).sum() > 5  # the yellow mask outline
    name = _rows(small)[-1]["File_name"]
    assert render_preview(small, tmp_path / "q.png", name).is_file()
    with pytest.raises(DataError, match="no row with File_name"):
        render_preview(small, tmp_path / "x.png", "999999_01_01_001.png")
