"""Every slice of a generated series with its true mask: ``slice_sample``, ``volume_blocks``, ``volume_slices``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from medseg.config import DataConfig
from medseg.data.base import DataError
from medseg.data.deeplesion import HU_OFFSET, DeepLesionDataset
from medseg.data.deeplesion.volume import has_full_masks, volume_blocks, volume_slices


def _cfg(root: Path, **kw: object) -> DataConfig:
    cfg = DataConfig(root=str(root), spacing_mm=None, recist_mask="ellipse", context_slices=3, slice_offset_mm=2.0,
                     window="fixed", window_range=[-160.0, 240.0])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_slice_sample_of_the_key_is_the_key_sample_and_others_read_their_own_files(demo_root: Path) -> None:
    ds = DeepLesionDataset(_cfg(demo_root), "all")
    s = ds.samples[0]
    first, last = ds.block(0)
    key, same = ds[0], ds.slice_sample(0, s.key)
    np.testing.assert_array_equal(key["image"], same["image"])
    np.testing.assert_array_equal(key["label"], same["label"])
    assert key["meta"]["key"] and key["meta"]["lesions"]
    n = first if first != s.key else last
    other = ds.slice_sample(0, n)
    assert other["meta"]["slice"] == n and not other["meta"]["key"] and other["meta"]["lesions"] == []
    # the centre channel is slice n in the fixed window, computed independently from the PNG
    hu = cv2.imread(str(demo_root / "Images_png" / s.series / f"{n:03d}.png"), cv2.IMREAD_UNCHANGED).astype(np.float32)
    np.testing.assert_allclose(other["image"][1], np.clip((hu - HU_OFFSET + 160) / 400, 0, 1), atol=1e-6)
    mask = demo_root / "Masks_png" / s.series / f"{n:03d}.png"
    want = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) if mask.is_file() else np.zeros(hu.shape, np.uint8)
    np.testing.assert_array_equal(other["truth"][0], want)
    np.testing.assert_array_equal(other["label"][0], want > 0)  # no RECIST off the key slice: the truth
    with pytest.raises(DataError, match="outside the block"):
        ds.slice_sample(0, last + 1)


def test_blocks_cover_every_key_slice_and_yield_each_slice_once(demo_root: Path) -> None:
    ds = DeepLesionDataset(_cfg(demo_root, spacing_mm=2.0), "all")
    assert has_full_masks(ds)
    blocks = volume_blocks(ds)
    assert {(s.series, s.key) for s in ds.samples} == {(b.series, k) for b in blocks for k in b.keys}
    b = max(blocks, key=lambda b: b.last - b.first)
    slices = list(volume_slices(ds, b))
    assert [x["meta"]["slice"] for x in slices] == list(range(b.first, b.last + 1))
    assert [x["meta"]["key"] for x in slices] == [n in b.keys for n in range(b.first, b.last + 1)]
    for x in slices:  # resampled samples, and the truth on the source grid beside them
        n = x["meta"]["slice"]
        mask = demo_root / "Masks_png" / b.series / f"{n:03d}.png"
        src = cv2.imread(str(demo_root / "Images_png" / b.series / f"{n:03d}.png"), cv2.IMREAD_UNCHANGED)
        want = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) if mask.is_file() else np.zeros(src.shape, np.uint8)
        assert x["image"].shape[1:] != src.shape
        np.testing.assert_array_equal(x["source_truth"], want)
