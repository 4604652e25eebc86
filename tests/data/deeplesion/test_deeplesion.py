"""The DeepLesion reader: DL_info.csv parsing, PNG → HU, 2.5-D context, zips, masks, errors."""

from __future__ import annotations

import csv
import io
import logging
import pickle
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from medseg.config import DataConfig
from medseg.data import build_dataset
from medseg.data.base import DataError, collate
from medseg.data.deeplesion import COLUMNS, DeepLesionDataset, png_to_hu, read_dl_info
from medseg.data.deeplesion.recist import ellipse_mask

HEADER = ",".join(COLUMNS)

# Real rows of the public DL_info.csv (shared/data/DL_info_sample.csv), copied verbatim.
REAL_CSV = (
    HEADER
    + "\n"
    + """000089_02_01_035.png,89,2,1,35,"142.391, 218.888, 134.817, 186.32, 128, 207.527, 148.45, 199.953","123, 181.32, 153.45, 223.888","33.4371, 21.8072","0.205293, 0.363637, 0.543575",-1,0,"29, 41","0.742188, 0.742188, 5","512, 512","-175, 275",F,72,1
000089_02_01_050.png,89,2,1,50,"132.366, 296.654, 141.834, 269.366, 124.569, 282.732, 145.732, 290.528","119.569, 264.366, 150.732, 301.654","28.8842, 22.5531","0.189612, 0.568582, 0.643251",-1,0,"44, 56","0.742188, 0.742188, 5","512, 512","-175, 275",F,72,1
000090_02_01_056.png,90,2,1,56,"289.186, 191.424, 278.766, 191.238, 285.092, 186.772, 285.092, 195.146","273.766, 181.772, 294.186, 200.146","10.4219, 8.37346","0.567231, 0.433107, 0.626258",2,0,"30, 71","0.804688, 0.804688, 2","512, 512","-175, 275",M,60,3
000090_03_02_073.png,90,3,2,73,"242.885, 250.727, 236.748, 232.657, 236.066, 242.885, 242.203, 240.801","231.066, 227.657, 247.885, 255.727","19.0836, 6.4812","0.474098, 0.469227, 0.401828",3,0,"43, 103","0.9375, 0.9375, 1","512, 512","-175, 275",M,61,3
000092_01_01_324.png,92,1,1,324,"357.287, 317.217, 333.357, 296.626, 338.365, 319.444, 356.174, 293.844","328.357, 288.844, 362.287, 324.444","31.57, 31.1851","0.663028, 0.591324, 0.658889",-1,0,"294, 354","0.742188, 0.742188, 1","512, 512","-175, 275",M,39,1
000094_05_02_143.png,94,5,2,143,"234.71, 317.422, 228.227, 317.422, 231.581, 315.634, 231.581, 318.987","223.227, 310.634, 239.71, 323.987","6.48284, 3.35319","0.451687, 0.626254, 0.473157",-1,0,"113, 173","0.976562, 0.976562, 1","512, 512","-1500, 500",M,68,1
000096_03_02_095.png,96,3,2,95,"179.684, 308.268, 171.496, 314.068, 178.724, 314.636, 173.568, 307.358","166.496, 302.358, 184.684, 319.636","10.0341, 8.91925","0.30854, 0.59457, 0.442255",-1,0,"65, 125","0.82, 0.82, 1","512, 512","-1400, 200",M,72,1
000097_02_01_065.png,97,2,1,65,"104.958, 196.836, 95.9909, 216.881, 92.826, 202.111, 106.541, 210.024","87.826, 191.836, 111.541, 221.881","21.959, 15.8335","0.137978, 0.382616, 0.623998",2,0,"48, 98","0.898438, 0.898438, 5","512, 512","-175, 275",M,43,3
000097_02_01_065.png,97,2,1,65,"171.949, 144.087, 178.807, 191.034, 150.85, 168.879, 191.466, 162.022","145.85, 139.087, 196.466, 196.034","47.4447, 41.1914","0.308358, 0.296445, 0.623998",2,0,"48, 98","0.898438, 0.898438, 5","512, 512","-175, 275",M,43,3
000098_04_01_019.png,98,4,1,19,"266.116, 262.212, 254.758, 261.502, 260.969, 265.939, 261.502, 259.195","249.758, 254.195, 271.116, 270.939","11.3808, 6.76517","0.484822, 0.516922, 0.431508",3,0,"13, 25","0.849609, 0.849609, 5","512, 512","-175, 275",F,63,2
000098_09_01_034.png,98,9,1,34,"164.139, 283.262, 191.396, 253.481, 160.101, 261.557, 181.301, 280.96","155.101, 248.481, 196.396, 288.262","40.3709, 28.7386","0.258039, 0.52124, 0.213223",7,0,"19, 51","0.429, 0.429, 2","512, 512","-175, 275",F,64,2
"""
)


def _real_csv(tmp_path: Path, edit: dict[tuple[int, str], str] | None = None) -> Path:
    """Write the real rows, optionally with cells replaced: ``{(row, column): value}``."""
    rows = list(csv.reader(io.StringIO(REAL_CSV)))
    for (r, col), value in (edit or {}).items():
        rows[r + 1][COLUMNS.index(col)] = value
    path = tmp_path / "DL_info.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# ----------------------------------------------------------------------------- parser


def test_parser_against_hand_values(tmp_path: Path) -> None:
    recs = read_dl_info(_real_csv(tmp_path))
    assert len(recs) == 11
    r = recs[0]
    assert r.file_name == "000089_02_01_035.png" and r.series == "000089_02_01"
    assert (r.patient, r.study, r.series_id, r.key_slice) == (89, 2, 1, 35)
    # 1-based in the file → 0-based
    assert r.coords == pytest.approx((141.391, 217.888, 133.817, 185.32, 127.0, 206.527, 147.45, 198.953))
    assert r.bbox == pytest.approx((122.0, 180.32, 152.45, 222.888))
    assert r.diameters_px == pytest.approx((33.4371, 21.8072))  # lengths: unchanged
    assert r.location == pytest.approx((0.205293, 0.363637, 0.543575))
    assert (r.lesion_type, r.noisy, r.slice_range) == (-1, False, (29, 41))
    assert r.spacing == pytest.approx((0.742188, 0.742188, 5.0)) and r.slice_interval == 5.0
    assert r.image_size == (512, 512) and r.window == (-175.0, 275.0)
    assert (r.gender, r.age, r.split, r.line) == ("F", 72, "train", 2)
    assert [x.split for x in recs] == ["train"] * 2 + ["test"] * 2 + ["train"] * 3 + ["test"] * 2 + [
        "val"
    ] * 2
    assert recs[5].window == (-1500.0, 500.0)
    assert recs[2].slice_range == (30, 71) and recs[2].spacing[2] == 2.0 and recs[2].lesion_type == 2
    assert recs[7].file_name == recs[8].file_name and recs[8].line == 10
    assert recs[10].spacing == pytest.approx((0.429, 0.429, 2.0)) and recs[10].lesion_type == 7


def test_parser_fractional_window_empty_and_nan_age(tmp_path: Path) -> None:
    path = _real_csv(
        tmp_path,
        {
            (0, "DICOM_windows"): "-177.5, 307.5",
            (0, "Patient_age"): "",
            (1, "Patient_age"): "NaN",
            (2, "Patient_age"): "60.0",
            (3, "Patient_gender"): "",
        },
    )
    recs = read_dl_info(path)
    assert recs[0].window == (-177.5, 307.5)
    assert recs[0].age is None and recs[1].age is None and recs[2].age == 60
    assert recs[3].gender is None


def test_parser_header_errors_name_file_and_expected_header(tmp_path: Path) -> None:
    text = REAL_CSV.replace("Spacing_mm_px_", "Spacing_mm")
    (tmp_path / "DL_info.csv").write_text(text)
    with pytest.raises(DataError) as e:
        read_dl_info(tmp_path / "DL_info.csv")
    msg = str(e.value)
    assert str(tmp_path / "DL_info.csv") in msg and "Spacing_mm_px_" in msg and HEADER in msg
    (tmp_path / "DL_info.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_dl_info(tmp_path / "DL_info.csv")
    with pytest.raises(DataError, match="not found"):
        read_dl_info(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    "column,value,needle",
    [
        ("Measurement_coordinates", "1, 2, 3, 4, 5, 6, 7", "expected 8"),
        ("Patient_age", "sixty", "sixty"),
        ("Train_Val_Test", "4", "expected 1"),
        ("Possibly_noisy", "2", "expected 0 or 1"),
        ("DICOM_windows", "275, -175", "empty"),
        ("File_name", "000089_02_01_035.jpg", "000001_01_01_109.png"),
        ("Key_slice_index", "36", "does not match"),
        ("Spacing_mm_px_", "0.7, nan, 5", "non-finite"),
    ],
)
def test_parser_malformed_cell_names_file_line_and_column(
    tmp_path: Path, column: str, value: str, needle: str
) -> None:
    path = _real_csv(tmp_path, {(2, column): value})  # the third data row: line 4
    with pytest.raises(DataError) as e:
        read_dl_info(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line 4, column {column}:")
    assert needle in msg


def test_parser_short_row(tmp_path: Path) -> None:
    lines = REAL_CSV.splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0]
    (tmp_path / "DL_info.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4: 16 fields, expected 18 \(column Patient_age is missing\)"):
        read_dl_info(tmp_path / "DL_info.csv")


# ----------------------------------------------------------------------------- tiny datasets

SIZE = 64


def _row(
    file_name: str,
    coords: list[float],
    *,
    slice_range: tuple[int, int],
    spacing: tuple[float, float, float] = (0.7, 0.7, 5.0),
    window: str = "-175, 275",
    ltype: int = 2,
    noisy: int = 0,
    split: int = 1,
) -> list[str]:
    """A DL_info.csv row; ``coords`` 1-based like the file."""
    series, key = file_name[:-4].rsplit("_", 1)
    p, s, e = (int(v) for v in series.split("_"))
    xs, ys = coords[0::2], coords[1::2]
    box = [min(xs) - 5, min(ys) - 5, max(xs) + 5, max(ys) + 5]
    diam = [
        np.hypot(coords[2] - coords[0], coords[3] - coords[1]),
        np.hypot(coords[6] - coords[4], coords[7] - coords[5]),
    ]

    def j(vals: list[float] | tuple[float, ...]) -> str:
        return ", ".join(f"{v:g}" for v in vals)

    return [
        file_name,
        str(p),
        str(s),
        str(e),
        str(int(key)),
        j(coords),
        j(box),
        j(diam),
        "0.5, 0.5, 0.5",
        str(ltype),
        str(noisy),
        j(slice_range),
        j(spacing),
        f"{SIZE}, {SIZE}",
        window,
        "F",
        "50",
        str(split),
    ]


def _write_png16(path: Path, hu: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (np.asarray(hu, np.int32) + 32768).astype(np.uint16))


LES_A = [21.3, 33.0, 41.3, 33.0, 31.3, 27.0, 31.3, 39.0]  # long x 21.3..41.3 (1-based), y 33
LES_B = [10.0, 10.0, 16.0, 10.0, 13.0, 8.0, 13.0, 12.0]


def _make(tmp_path: Path, extra_rows: list[list[str]] | None = None) -> Path:
    """Series A (slices 5..15, pixel HU = 10 × index, interval 5 mm) + series B (slices 1..3).

    Key slices: A/010 (two lesions, train), A/005 (at the series edge, val), B/002 (test, noisy
    row and a type-5 row besides a type-2 row).
    """
    root = tmp_path / "dl"
    for i in range(5, 16):
        _write_png16(root / "Images_png/000001_01_01" / f"{i:03d}.png", np.full((SIZE, SIZE), 10 * i))
    rng = np.random.default_rng(0)
    for i in range(1, 4):
        _write_png16(
            root / "Images_png/000002_03_02" / f"{i:03d}.png", rng.integers(-1000, 1000, (SIZE, SIZE))
        )
    rows = [
        _row("000001_01_01_010.png", LES_A, slice_range=(5, 15), spacing=(0.6, 0.8, 5.0)),
        _row("000001_01_01_010.png", LES_B, slice_range=(5, 15), spacing=(0.6, 0.8, 5.0), ltype=5),
        _row("000001_01_01_005.png", LES_A, slice_range=(5, 15), split=2),
        _row("000002_03_02_002.png", LES_A, slice_range=(1, 3), spacing=(0.7, 0.7, 1.0), split=3),
        _row("000002_03_02_002.png", LES_B, slice_range=(1, 3), spacing=(0.7, 0.7, 1.0), split=3, noisy=1),
        _row("000002_03_02_002.png", LES_B, slice_range=(1, 3), spacing=(0.7, 0.7, 1.0), split=3, ltype=5),
        *(extra_rows or []),
    ]
    with open(root / "DL_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return root


def _cfg(root: Path, **kw: object) -> DataConfig:
    base = {"name": "deeplesion", "root": str(root), "context_slices": 3, "slice_offset_mm": 2.0}
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def test_hu_conversion_at_uint16_extremes(tmp_path: Path) -> None:
    png = np.array([[0, 65535, 32768, 1]], np.uint16)
    hu = png_to_hu(png)
    assert hu.dtype == np.int32 and hu.tolist() == [[-32768, 32767, 0, -32767]]
    # and through a real 16-bit PNG file read by the dataset's reader
    root = _make(tmp_path)
    img = np.zeros((SIZE, SIZE), np.uint16)
    img[0, :4] = [0, 65535, 32768, 1]
    cv2.imwrite(str(root / "Images_png/000001_01_01/010.png"), img)
    ds = DeepLesionDataset(_cfg(root), "train")
    hu = ds.images.read("000001_01_01", 10)
    assert hu.dtype == np.int32 and hu[0, :4].tolist() == [-32768, 32767, 0, -32767]


def test_splits_filters_and_grouping(tmp_path: Path) -> None:
    root = _make(tmp_path)
    train = build_dataset(_cfg(root), "train")
    assert isinstance(train, DeepLesionDataset)
    assert len(train) == 1 and train.num_lesions == 2  # two rows, one key slice
    assert len(DeepLesionDataset(_cfg(root), "val")) == 1
    test = DeepLesionDataset(_cfg(root), "test")
    assert test.num_lesions == 2  # the noisy row is dropped
    assert DeepLesionDataset(_cfg(root, include_noisy=True), "test").num_lesions == 3
    assert len(DeepLesionDataset(_cfg(root), "all")) == 3
    only5 = DeepLesionDataset(_cfg(root, lesion_types=[5]), "all")
    assert len(only5) == 2 and only5.num_lesions == 2
    with pytest.raises(DataError) as e:
        DeepLesionDataset(_cfg(root, lesion_types=[8]), "val")
    assert (
        "'val'" in str(e.value)
        and "lesion_types=[8]" in str(e.value)
        and "include_noisy=False" in str(e.value)
    )


def test_sample_contents_window_masks_and_meta(tmp_path: Path) -> None:
    root = _make(tmp_path)
    s = DeepLesionDataset(_cfg(root, context_slices=1), "train")[0]
    assert s["image"].shape == (1, SIZE, SIZE) and s["image"].dtype == np.float32
    # key slice HU 100 in the row's DICOM window (-175, 275)
    assert np.allclose(s["image"], (100 + 175) / 450)
    assert s["label"].shape == (1, SIZE, SIZE) and s["label"].dtype == np.int64
    assert s["instance"].dtype == np.int32 and "truth" not in s
    # masks at the 0-based coordinates: lesion A's long axis covers x 20.3..40.3 on row 32
    assert np.flatnonzero(s["instance"][0, 32] == 1).tolist() == list(range(21, 41))
    a0 = np.array(LES_A) - 1
    assert np.array_equal(s["instance"][0] == 1, ellipse_mask(a0, (SIZE, SIZE)) & (s["instance"][0] != 2))
    assert np.array_equal(s["instance"][0] == 2, ellipse_mask(np.array(LES_B) - 1, (SIZE, SIZE)))
    assert np.array_equal(s["label"][0] > 0, s["instance"][0] > 0)
    m = s["meta"]
    assert m["id"] == "000001_01_01_010" and m["dataset"] == "deeplesion" and m["split"] == "train"
    assert m["spacing"] == pytest.approx([0.8, 0.6]) and m["slice_interval"] == 5.0  # [sy, sx]
    assert m["series"] == "000001_01_01" and m["slice"] == 10 and m["file_name"] == "000001_01_01_010.png"
    assert m["source"] == str(root / "Images_png/000001_01_01/010.png")
    assert m["window"] == [-175.0, 275.0]
    assert (m["patient_index"], m["study_index"], m["series_index"]) == (1, 1, 1)
    assert [le["type"] for le in m["lesions"]] == [2, 5]
    assert m["lesions"][0]["coords"] == pytest.approx(a0.tolist())
    assert m["lesions"][0]["bbox"] == pytest.approx([15.3, 21.0, 45.3, 43.0])
    assert m["lesions"][0]["diameters_px"] == pytest.approx([20.0, 12.0], abs=1e-4)
    # fixed window
    s = DeepLesionDataset(_cfg(root, context_slices=1, window="fixed", window_range=[0.0, 200.0]), "train")[0]
    assert np.allclose(s["image"], 0.5) and s["meta"]["window"] == [0.0, 200.0]
    with pytest.raises(DataError, match="data.window"):
        DeepLesionDataset(_cfg(root, window="lung"), "train")
    with pytest.raises(DataError, match="data.window_range"):
        DeepLesionDataset(_cfg(root, window="fixed", window_range=[100.0, -100.0]), "train")
    with pytest.raises(DataError, match="data.recist_mask"):
        DeepLesionDataset(_cfg(root, recist_mask="box"), "train")


def test_context_interpolation_by_hand(tmp_path: Path) -> None:
    root = _make(tmp_path)
    fixed = {"window": "fixed", "window_range": [0.0, 200.0]}
    # interval 5 mm, offset 2 mm: neighbours 0.4 of the way to slices 9 and 11 (HU 90, 110)
    s = DeepLesionDataset(_cfg(root, **fixed), "train")[0]
    hu = s["image"][:, 0, 0] * 200.0
    assert hu == pytest.approx([0.6 * 100 + 0.4 * 90, 100.0, 0.6 * 100 + 0.4 * 110], abs=1e-3)
    assert s["meta"]["slice_positions"] == pytest.approx([9.6, 10.0, 10.4])
    # five channels: ±0.4 and ±0.8 slices
    s = DeepLesionDataset(_cfg(root, context_slices=5, **fixed), "train")[0]
    assert s["image"][:, 5, 5] * 200.0 == pytest.approx([92.0, 96.0, 100.0, 104.0, 108.0], abs=1e-3)
    # key slice 5 is the series' first: the slice below clamps to it
    s = DeepLesionDataset(_cfg(root, **fixed), "val")[0]
    assert s["image"][:, 0, 0] * 200.0 == pytest.approx([50.0, 50.0, 54.0], abs=1e-3)


def test_broken_neighbour_uses_nearest_readable_slice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _make(tmp_path)
    bad = root / "Images_png/000001_01_01/011.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        s = DeepLesionDataset(_cfg(root, window="fixed", window_range=[0.0, 200.0]), "train")[0]
    # 10.4 interpolates slices 10 and 11; 11 is broken → nearest readable (10, then 12 on a tie)
    assert s["image"][:, 0, 0] * 200.0 == pytest.approx([96.0, 100.0, 100.0], abs=1e-3)
    assert str(bad) in caplog.text and "expected a 16-bit PNG" in caplog.text


@pytest.mark.parametrize("kind", ["8bit", "truncated", "missing"])
def test_unreadable_key_slice_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    root = _make(tmp_path)
    key = root / "Images_png/000001_01_01/010.png"
    if kind == "8bit":
        cv2.imwrite(str(key), np.full((SIZE, SIZE), 7, np.uint8))
    elif kind == "truncated":
        key.write_bytes(key.read_bytes()[:60])
    else:
        key.unlink()
    ds = DeepLesionDataset(_cfg(root), "all")
    idx = [s.file_name for s in ds.samples].index("000001_01_01_010.png")
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        assert ds[idx] is None
    assert str(key) in caplog.text and "expected a 16-bit PNG" in caplog.text
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape[0] == 2  # the broken sample is dropped


def test_missing_csv_or_images(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        DeepLesionDataset(_cfg(tmp_path), "train")
    assert (
        "DL_info.csv" in str(e.value) and "medseg demo-data" in str(e.value) and "Images_png" in str(e.value)
    )
    _real_csv(tmp_path)
    with pytest.raises(DataError) as e:
        DeepLesionDataset(_cfg(tmp_path), "train")
    assert str(tmp_path) in str(e.value) and "no images" in str(e.value)


def _zip_dataset(root: Path, out: Path) -> Path:
    """The same dataset with its images in two archives (series A split across both)."""
    out.mkdir()
    (out / "DL_info.csv").write_bytes((root / "DL_info.csv").read_bytes())
    files = sorted((root / "Images_png").rglob("*.png"))
    halves = [files[: len(files) // 2], files[len(files) // 2 :]]
    for k, part in enumerate(halves, 1):
        with zipfile.ZipFile(out / f"Images_png_{k:02d}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for f in part:
                zf.write(f, f.relative_to(root).as_posix())
    return out


def test_zip_reading_equals_folder_reading(tmp_path: Path) -> None:
    root = _make(tmp_path)
    zroot = _zip_dataset(root, tmp_path / "zipped")
    for split in ("train", "val", "test"):
        a = DeepLesionDataset(_cfg(root, context_slices=5), split)[0]
        b = DeepLesionDataset(_cfg(zroot, context_slices=5), split)[0]
        for key in ("image", "label", "instance"):
            assert np.array_equal(a[key], b[key])
        assert b["meta"]["source"].startswith(str(zroot / "Images_png_0"))
        assert b["meta"]["source"].endswith(f":Images_png/{a['meta']['series']}/{a['meta']['slice']:03d}.png")
    # handles are per process and dropped on pickling (DataLoader workers)
    ds = DeepLesionDataset(_cfg(zroot), "train")
    first = ds[0]
    assert ds.images._handles
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone.images._handles
    assert np.array_equal(clone[0]["image"], first["image"])


def test_zip_dataset_in_forked_dataloader_workers(tmp_path: Path) -> None:
    import multiprocessing

    import torch

    zroot = _zip_dataset(_make(tmp_path), tmp_path / "zipped")
    ds = DeepLesionDataset(_cfg(zroot), "all")
    expected = [ds[i]["image"] for i in range(len(ds))]  # the parent holds open handles now
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=1,
        num_workers=1,
        collate_fn=collate,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    got = [b["image"][0].numpy() for b in loader]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_zip_broken_member_warns_with_its_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _make(tmp_path)
    zroot = _zip_dataset(root, tmp_path / "zipped")
    # rewrite the archive holding the key slice with that member truncated
    key_member = "Images_png/000001_01_01/010.png"
    with zipfile.ZipFile(zroot / "Images_png_01.zip") as zf:
        in_first = key_member in zf.namelist()
    src = zroot / ("Images_png_01.zip" if in_first else "Images_png_02.zip")
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[key_member] = members[key_member][:50]
    with zipfile.ZipFile(src, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    ds = DeepLesionDataset(_cfg(zroot), "train")
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        assert ds[0] is None
    assert f"{src}:{key_member}" in caplog.text and "expected a 16-bit PNG" in caplog.text


def test_truth_masks_from_masks_png(tmp_path: Path) -> None:
    root = _make(tmp_path)
    truth = np.zeros((SIZE, SIZE), np.uint16)
    truth[28:38, 22:40] = 1
    truth[8:12, 9:16] = 300  # uint16 ids survive
    (root / "Masks_png/000001_01_01").mkdir(parents=True)
    cv2.imwrite(str(root / "Masks_png/000001_01_01/010.png"), truth)
    s = DeepLesionDataset(_cfg(root), "train")[0]
    assert s["truth"].dtype == np.int32 and s["truth"].shape == (1, SIZE, SIZE)
    assert np.array_equal(s["truth"][0], truth.astype(np.int32))
    assert DeepLesionDataset(_cfg(root), "val")[0]["truth"] is None  # no mask file for that slice
    cv2.imwrite(str(root / "Masks_png/000001_01_01/010.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(
        DataError, match=r"Masks_png/000001_01_01/010.png.*expected a single-channel uint8 or uint16"
    ):
        DeepLesionDataset(_cfg(root), "train")[0]


def test_resampling_scales_image_masks_and_coordinates(tmp_path: Path) -> None:
    root = _make(tmp_path)
    # spacing [sy, sx] = [0.8, 0.6] → 1.2 mm/px: (64·0.8/1.2, 64·0.6/1.2) = (43, 32) pixels
    s = DeepLesionDataset(_cfg(root, spacing_mm=1.2), "train")[0]
    assert s["image"].shape == (3, 43, 32) and s["label"].shape == (1, 43, 32)
    m = s["meta"]
    assert m["spacing"] == pytest.approx([0.8 * 64 / 43, 0.6 * 64 / 32])
    sy, sx = 43 / 64, 32 / 64
    les = m["lesions"][0]
    x0, y0 = LES_A[0] - 1, LES_A[1] - 1
    assert les["coords"][:2] == pytest.approx([(x0 + 0.5) * sx - 0.5, (y0 + 0.5) * sy - 0.5])
    assert les["diameters_px"][0] == pytest.approx(20.0 * sx, abs=1e-6)  # horizontal long axis
    assert les["diameters_px"][1] == pytest.approx(12.0 * sy, abs=1e-6)  # vertical short axis
    # the resampled lesion mask lies around the scaled RECIST centre
    cy, cx = np.argwhere(s["instance"][0] == 1).mean(0)
    assert cx == pytest.approx((31.3 - 1 + 0.5) * sx - 0.5, abs=1.0)
    assert cy == pytest.approx((33.0 - 1 + 0.5) * sy - 0.5, abs=1.0)


def test_grabcut_mode_runs_on_the_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make(tmp_path)
    # a bright lesion on the key slice whose RECIST is LES_A's: the rhombus its two diameters span
    # (the ellipse drawn through their ends covers ~1.5 × its area, so GrabCut has something to win)
    ends = (np.array(LES_A).reshape(4, 2) - 1)[[0, 2, 1, 3]]  # long-1, short-1, long-2, short-2, 0-based
    hu = np.full((SIZE, SIZE), 0, np.int32)
    cv2.fillPoly(hu, [np.round(ends * 16).astype(np.int32)], 200, shift=4)
    _write_png16(root / "Images_png/000001_01_01/010.png", hu)
    calls = []
    grabcut = cv2.grabCut

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0].shape)
        return grabcut(*args, **kwargs)

    monkeypatch.setattr(cv2, "grabCut", spy)
    s = DeepLesionDataset(_cfg(root, recist_mask="grabcut", context_slices=1), "train")[0]
    lesion = s["instance"][0] == 1
    truth = hu > 0
    ell = DeepLesionDataset(_cfg(root, context_slices=1), "train")[0]["instance"][0] == 1
    # GrabCut ran on the slice and its mask was kept: not the ellipse it falls back to
    assert calls
    assert not np.array_equal(lesion, ell)
    dice = 2 * (lesion & truth).sum() / (lesion.sum() + truth.sum())
    dice_ell = 2 * (ell & truth).sum() / (ell.sum() + truth.sum())
    assert dice > dice_ell


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path) -> None:
    root = _make(tmp_path)
    a = DeepLesionDataset(_cfg(root), "train").fingerprint()
    assert a == DeepLesionDataset(_cfg(root), "train").fingerprint()
    assert a != DeepLesionDataset(_cfg(root), "all").fingerprint()
    key = root / "Images_png/000001_01_01/010.png"
    _write_png16(key, np.random.default_rng(1).integers(-1000, 1000, (SIZE, SIZE)))  # new size
    b = DeepLesionDataset(_cfg(root), "train").fingerprint()
    assert b != a
    with open(root / "DL_info.csv", "a") as f:
        f.write("\n")
    assert b != DeepLesionDataset(_cfg(root), "train").fingerprint()
    zroot = _zip_dataset(root, tmp_path / "zipped")
    z = DeepLesionDataset(_cfg(zroot), "train").fingerprint()
    assert z == DeepLesionDataset(_cfg(zroot), "train").fingerprint()
