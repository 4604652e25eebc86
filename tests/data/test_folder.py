"""The ``folder`` (2-D image/mask pairs) and ``nifti`` (3-D volumes) datasets on files written here."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import tifffile

from medseg.config import DataConfig
from medseg.data import build_dataset
from medseg.data.base import DataError, apply_window, label_instances, split_cases

# ----------------------------------------------------------------------------- helpers


def folder_cfg(root: Path, **kw) -> DataConfig:
    base = dict(name="folder", root=str(root), context_slices=1, num_classes=2, window="dicom")
    base.update(kw)
    return DataConfig(**base)


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def make_folder(root: Path, n: int = 3, size: tuple[int, int] = (24, 20)) -> dict[str, np.ndarray]:
    """n 8-bit PNG images with 0/255 PNG masks (a square); returns the images by stem."""
    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        img = rng.integers(0, 256, size, dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[3 + i : 9 + i, 4:10] = 255
        write_png(root / "images" / f"case{i}.png", img)
        write_png(root / "masks" / f"case{i}.png", mask)
        images[f"case{i}"] = img
    return images


# ----------------------------------------------------------------------------- instances


def test_label_instances_numbers_components_per_class() -> None:
    label = np.zeros((12, 12), np.int64)
    label[1:3, 1:3] = 1
    label[3:5, 3:5] = 1  # touches the first square at a corner: one object (8-connected)
    label[8:10, 1:3] = 1
    label[8:10, 3:6] = 2  # touches a class-1 object: still its own instance
    inst = label_instances(label)
    assert inst.dtype == np.int32
    assert sorted(np.unique(inst)) == [0, 1, 2, 3]
    assert len(np.unique(inst[1:5, 1:5][label[1:5, 1:5] > 0])) == 1
    assert inst[8, 1] != inst[8, 3] and inst[8, 1] != inst[1, 1]
    assert (inst > 0).sum() == (label > 0).sum()
    # each instance lies in one class
    for i in range(1, 4):
        assert len(np.unique(label[inst == i])) == 1


# ----------------------------------------------------------------------------- folder dataset


def test_folder_pairs_files_and_reads_0_255_masks_as_0_1(tmp_path: Path) -> None:
    images = make_folder(tmp_path)
    ds = build_dataset(folder_cfg(tmp_path), "all")
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        stem = s["meta"]["id"]
        assert s["image"].shape == (1, 24, 20) and s["image"].dtype == np.float32
        np.testing.assert_allclose(s["image"][0], images[stem] / 255.0, atol=1e-6)
        k = int(stem[-1])
        want = np.zeros((24, 20), np.int64)
        want[3 + k : 9 + k, 4:10] = 1
        np.testing.assert_array_equal(s["label"][0], want)
        assert s["label"].dtype == np.int64
        np.testing.assert_array_equal(s["instance"][0], want.astype(np.int32))
        assert s["meta"]["spacing"] == [1.0, 1.0] and s["meta"]["dataset"] == "folder"
        assert s["meta"]["source"].endswith(f"images/{stem}.png")


def test_folder_splits_follow_split_cases(tmp_path: Path) -> None:
    make_folder(tmp_path, n=7)
    cfg = folder_cfg(tmp_path, val_fraction=0.3, test_fraction=0.2, split_seed=3)
    want = split_cases([f"case{i}" for i in range(7)], 0.3, 0.2, 3)
    seen = []
    for split in ("train", "val", "test"):
        ids = [s for s, _, _ in build_dataset(cfg, split).items]
        assert ids and all(want[i] == split for i in ids)
        seen += ids
    assert sorted(seen) == sorted(want)


def test_16_bit_and_colour_and_tiff_and_fixed_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    g16 = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tif = rng.integers(-1000, 1000, (16, 16)).astype(np.int16)
    write_png(tmp_path / "images" / "a16.png", g16)
    write_png(tmp_path / "images" / "brgb.png", rgb[..., ::-1])  # cv2 writes BGR
    tifffile.imwrite(tmp_path / "images" / "ctif.tif", tif)
    for stem in ("a16", "brgb", "ctif"):
        write_png(tmp_path / "masks" / f"{stem}.png", np.zeros((16, 16), np.uint8))
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        ds = build_dataset(folder_cfg(tmp_path), "all")
        s16, srgb, stif = ds[0], ds[1], ds[2]
    np.testing.assert_allclose(s16["image"][0], g16 / 65535.0, atol=1e-6)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert srgb["image"].shape == (1, 16, 16)
    np.testing.assert_allclose(srgb["image"][0] * 255, luma, atol=1.0)
    assert "brgb.png is a colour image" in caplog.text
    np.testing.assert_allclose(stif["image"][0], (tif.astype(np.float64) + 32768) / 65535, atol=1e-6)
    fixed = build_dataset(folder_cfg(tmp_path, window="fixed", window_range=[-500.0, 500.0]), "all")[2]
    np.testing.assert_allclose(fixed["image"][0], apply_window(tif, -500, 500), atol=1e-6)


def test_folder_nifti_2d_uses_header_spacing(tmp_path: Path) -> None:
    img = np.arange(12 * 10, dtype=np.int16).reshape(12, 10)
    mask = np.zeros((12, 10, 1), np.uint8)
    mask[2:4, 2:4, 0] = 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    nib.save(
        nib.Nifti1Image(img[..., None], np.diag([0.5, 0.75, 3.0, 1.0])), tmp_path / "images" / "x.nii.gz"
    )
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "masks" / "x.nii.gz")
    s = build_dataset(folder_cfg(tmp_path, window="fixed", window_range=[0.0, 119.0]), "all")[0]
    np.testing.assert_allclose(s["image"][0], img / 119.0, atol=1e-6)
    np.testing.assert_array_equal(s["label"][0], mask[..., 0])
    assert s["meta"]["spacing"] == [0.5, 0.75]


def test_mask_size_mismatch_names_both_files_and_shapes(tmp_path: Path) -> None:
    make_folder(tmp_path, n=2)
    write_png(tmp_path / "masks" / "case1.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(DataError, match=r"masks/case1\.png has size 10×20.*images/case1\.png is 24×20"):
        build_dataset(folder_cfg(tmp_path), "all")


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images is missing"):
        build_dataset(folder_cfg(tmp_path), "all")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(folder_cfg(tmp_path), "all")
    make_folder(tmp_path, n=3)
    (tmp_path / "masks" / "case1.png").unlink()
    (tmp_path / "masks" / "case2.png").unlink()
    with pytest.raises(DataError, match=r"2 image\(s\).*no mask.*case1\.png, case2\.png"):
        build_dataset(folder_cfg(tmp_path), "all")
    write_png(tmp_path / "masks" / "case1.png", np.zeros((24, 20), np.uint8))
    write_png(tmp_path / "masks" / "case2.png", np.zeros((24, 20), np.uint8))
    (tmp_path / "images" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type"):
        build_dataset(folder_cfg(tmp_path), "all")
    (tmp_path / "images" / "notes.txt").unlink()
    (tmp_path / "images" / "case0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"case0\.png: cannot read the image header"):
        build_dataset(folder_cfg(tmp_path), "all")


def test_mask_values_and_context_slices_are_checked(tmp_path: Path) -> None:
    make_folder(tmp_path, n=1)
    bad = np.zeros((24, 20), np.uint8)
    bad[0, 0] = 3
    write_png(tmp_path / "masks" / "case0.png", bad)
    ds = build_dataset(folder_cfg(tmp_path), "all")
    with pytest.raises(DataError, match=r"case0\.png: mask holds class 3 but data.num_classes = 2"):
        ds[0]
    assert build_dataset(folder_cfg(tmp_path, num_classes=4), "all")[0]["label"].max() == 3
    with pytest.raises(DataError, match="context_slices: 1"):
        build_dataset(folder_cfg(tmp_path, context_slices=3), "all")


def test_unreadable_image_gives_none_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_folder(tmp_path, n=1)
    ds = build_dataset(folder_cfg(tmp_path), "all")
    data = (tmp_path / "images" / "case0.png").read_bytes()
    (tmp_path / "images" / "case0.png").write_bytes(data[:60])  # header intact, pixels cut
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        assert ds[0] is None
    assert "case0.png" in caplog.text


# ----------------------------------------------------------------------------- nifti dataset


def nifti_cfg(root: Path, **kw) -> DataConfig:
    base = dict(
        name="nifti",
        root=str(root),
        context_slices=3,
        slice_offset_mm=5.0,
        window="fixed",
        window_range=[-100.0, 300.0],
        num_classes=2,
        axis=2,
    )
    base.update(kw)
    return DataConfig(**base)


def make_volumes(root: Path, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    vol = rng.uniform(-200, 400, (10, 12, 8)).astype(np.float32)
    mask = np.zeros((10, 12, 8), np.uint8)
    mask[2:5, 3:6, 3] = 1
    mask[6:8, 6:9, 5] = 1
    mask[1:3, 1:3, 2] = 1  # also on x = 1, 2 (axis 0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    nib.save(nib.Nifti1Image(vol, affine), root / "images" / "ct1.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), root / "masks" / "ct1.nii.gz")
    return vol, mask


def test_nifti_slices_along_axis_with_context(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    vol, mask = make_volumes(tmp_path, affine)
    ds = build_dataset(nifti_cfg(tmp_path), "all")
    assert [s for _, s in ds.items] == [2, 3, 5]  # slices with foreground along z
    for i, k in enumerate([2, 3, 5]):
        s = ds[i]
        # 5 mm offset / 2.5 mm spacing = 2 slices, clamped to 0..7
        nb = [max(k - 2, 0), k, min(k + 2, 7)]
        np.testing.assert_allclose(
            s["image"], apply_window(vol[:, :, nb].transpose(2, 0, 1), -100, 300), atol=1e-6
        )
        np.testing.assert_array_equal(s["label"][0], mask[:, :, k])
        np.testing.assert_allclose(s["meta"]["spacing"], [0.8, 0.9], rtol=1e-6)  # header zooms are float32
        assert s["meta"]["slice_interval"] == 2.5
        assert s["meta"]["id"] == f"ct1:{k}" and s["meta"]["series"] == "ct1"
    ax0 = build_dataset(nifti_cfg(tmp_path, axis=0, context_slices=1), "all")
    k0 = [s for _, s in ax0.items]
    assert k0 == sorted(set(np.flatnonzero(mask.any(axis=(1, 2)))))
    s = ax0[0]
    np.testing.assert_allclose(s["image"][0], apply_window(vol[k0[0]], -100, 300), atol=1e-6)
    np.testing.assert_allclose(s["meta"]["spacing"], [0.9, 2.5], rtol=1e-6)


def test_nifti_is_read_in_canonical_orientation(tmp_path: Path) -> None:
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])  # x stored right-to-left (LAS)
    vol, mask = make_volumes(tmp_path, affine)
    ds = build_dataset(nifti_cfg(tmp_path, context_slices=1), "all")
    s = ds[0]
    k = s["meta"]["slice"]
    np.testing.assert_allclose(s["image"][0], apply_window(vol[::-1, :, k], -100, 300), atol=1e-6)
    np.testing.assert_array_equal(s["label"][0], mask[::-1, :, k])


def test_nifti_shape_mismatch_and_bad_axis(tmp_path: Path) -> None:
    make_volumes(tmp_path, np.eye(4))
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 7), np.uint8), np.eye(4)), tmp_path / "masks" / "ct1.nii.gz")
    with pytest.raises(
        DataError,
        match=r"masks/ct1\.nii\.gz has shape \(10, 12, 7\).*images/ct1\.nii\.gz has shape \(10, 12, 8\)",
    ):
        build_dataset(nifti_cfg(tmp_path), "all")
    with pytest.raises(DataError, match="data.axis = 3"):
        build_dataset(nifti_cfg(tmp_path, axis=3), "all")
