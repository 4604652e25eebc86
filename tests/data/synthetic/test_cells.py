"""Generated EM-like cell images: format, the folder dataset reading them, and the EM error measures."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from medseg.cli import main
from medseg.config import DataConfig
from medseg.data.folder import FolderDataset
from medseg.data.synthetic import generate_cells_data
from medseg.metrics.em import SegmentationErrors, rand_error, split_merge_error


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cells_data(tmp_path_factory.mktemp("cells") / "c", images=3, seed=1, size=192)


def test_cells_are_dense_touching_and_separated_by_thin_membranes(cells_root: Path) -> None:
    names = sorted(p.name for p in (cells_root / "images").iterdir())
    assert names == ["cells_000.png", "cells_001.png", "cells_002.png"]
    assert sorted(p.name for p in (cells_root / "masks").iterdir()) == names
    touching = []
    for name in names:
        image = cv2.imread(str(cells_root / "images" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(cells_root / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (192, 192) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        membrane = mask == 0
        assert 0.1 < membrane.mean() < 0.45  # thin membranes between densely packed cells
        cells, n = ndimage.label(~membrane, structure=np.ones((3, 3)))  # 8-connected: never two cells
        assert n >= 10
        # membranes are thin: almost every membrane pixel is within 3 px of a cell
        assert (ndimage.distance_transform_edt(membrane) <= 3).mean() > 0.9
        # touching: most cells have another cell within a few pixels
        near = [len(set(np.unique(cells[ndimage.binary_dilation(cells == c, iterations=6)])) - {0, c}) > 0
                for c in range(1, n + 1)]
        touching.append(np.mean(near))
        # membranes are dark, cells bright: the image shows the structure (organelles, noise aside)
        assert image[membrane].mean() + 40 < image[~membrane].mean()
    assert np.mean(touching) > 0.7
    again = generate_cells_data(cells_root.parent / "again", images=3, seed=1, size=192)
    for name in names:  # same seed, same files
        assert (again / "images" / name).read_bytes() == (cells_root / "images" / name).read_bytes()


def test_folder_dataset_reads_the_cells(cells_root: Path) -> None:
    ds = FolderDataset(DataConfig(name="folder", root=str(cells_root), context_slices=1, val_fraction=0.34,
                                  test_fraction=0.34), "all")
    s = ds[0]
    assert s["image"].shape == (1, 192, 192) and 0 <= s["image"].min() and s["image"].max() <= 1
    assert set(np.unique(s["label"])) == {0, 1}
    cells, n = ndimage.label(s["label"][0] > 0, structure=np.ones((3, 3)))
    assert s["instance"].max() == n  # one instance per cell


def _two_cells() -> np.ndarray:
    """Two true cells of 16 × 36 = 576 px each, a 4 px membrane between them (40 × 40)."""
    true = np.zeros((40, 40), np.int64)
    true[2:18, 2:38], true[22:38, 2:38] = 1, 2
    return true


def _pair_rand_error(pred: np.ndarray, true: np.ndarray, connectivity: int) -> float:
    """The adapted Rand error counted pair by pair, independently of the implementation under test.

    Over the ordered pairs of distinct pixels the truth calls cell: F = 2·(pairs in one true cell and
    one predicted segment) / (pairs in one true cell + pairs in one predicted segment), error = 1 − F;
    predicted segments are the components of ``pred > 0``, predicted background is one more segment.
    """
    objects = ndimage.label(pred > 0, structure=ndimage.generate_binary_structure(2, connectivity))[0]
    keep = true > 0
    t, o = true[keep], objects[keep]
    same_t, same_o = t[:, None] == t[None, :], o[:, None] == o[None, :]
    n = len(t)
    both = int((same_t & same_o).sum()) - n
    return 1.0 - 2.0 * both / ((int(same_t.sum()) - n) + (int(same_o.sum()) - n))


def _predictions() -> dict[str, np.ndarray]:
    true = _two_cells()
    label = (true > 0).astype(np.int64)
    merged = label.copy()
    merged[18:22, 10:12] = 1  # a gap in the predicted membrane merges the two cells
    thick = label.copy()
    thick[16:18], thick[22:24] = 0, 0  # the predicted membrane 4 px wider, every cell still apart
    split = label.copy()
    split[2:18, 20] = 0  # a false membrane cuts cell 1 in two halves
    noisy = (np.random.default_rng(0).random(true.shape) < 0.7).astype(np.int64)
    return {"perfect": label, "merged": merged, "thick": thick, "split": split, "noisy": noisy}


@pytest.mark.parametrize("case", ["perfect", "merged", "thick", "split", "noisy"])
@pytest.mark.parametrize("connectivity", [1, 2])
def test_rand_error_matches_pair_counting(case: str, connectivity: int) -> None:
    pred, true = _predictions()[case], _two_cells()
    expected = _pair_rand_error(pred, true, connectivity)
    assert rand_error(pred, true, connectivity=connectivity) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_rand_and_pixel_error() -> None:
    true = _two_cells()
    preds = _predictions()
    label, merged = preds["perfect"], preds["merged"]
    assert rand_error(label, true) == pytest.approx(0.0)
    # one predicted object holds both cells (a = 576 px each): of the pairs in one predicted segment,
    # 2a(2a-1), only those within a cell, 2a(a-1), are in one true cell -> 1 - 4a(a-1) / (2a(a-1) + 2a(2a-1))
    a = 16 * 36
    fused = a / (3 * a - 2)
    assert rand_error(merged, true) == pytest.approx(fused, rel=1e-9)
    errors = SegmentationErrors(connectivity=1)
    errors.update(merged[None], label[None], true[None])
    out = errors.compute()
    assert out["pixel_error"] == pytest.approx(8 / 1600) and out["rand_error"] == pytest.approx(fused, rel=1e-9)
    # the same fusion over the pixels both call foreground: precision = 2a(a-1) / 2a(2a-1), recall 1
    precision = 2 * a * (a - 1) / (2 * a * (2 * a - 1))
    assert out["split_merge_error"] == pytest.approx(1 - 2 * precision / (precision + 1))


def test_thick_membranes_raise_the_rand_error_but_not_the_split_merge_error() -> None:
    true = _two_cells()
    preds = _predictions()
    thick, split = preds["thick"], preds["split"]
    # each cell: 504 px in its own predicted object, 72 px in the one predicted-background segment
    same_true = 2 * 576 * 575
    same_pred = 2 * 504 * 503 + 144 * 143
    same_both = 2 * 504 * 503 + 2 * 72 * 71
    expected = 1 - 2 * same_both / (same_true + same_pred)  # ≈ 0.131
    assert rand_error(thick, true, connectivity=1) == pytest.approx(expected, rel=1e-9)
    assert split_merge_error(thick, true, connectivity=1) == pytest.approx(0.0)
    # the split: over the pixels both call foreground, cell 1 is two objects (288 + 272 px)
    split_merge = _pair_rand_error(split, true * (split > 0), 1)
    assert split_merge > 0.1
    assert split_merge_error(split, true, connectivity=1) == pytest.approx(split_merge, rel=1e-9)
    assert np.isnan(split_merge_error(np.zeros_like(true), true))


@pytest.mark.slow
def test_demo_data_cells_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo-data", str(tmp_path / "cells"), "--kind", "cells", "--images", "3"]) == 0
    assert len(list((tmp_path / "cells" / "images").glob("*.png"))) == 3
    assert "pipelines/cells.yaml" in capsys.readouterr().out
