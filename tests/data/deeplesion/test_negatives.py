"""Lesion-free training slices (``data.negative_rate``): chosen where the truth is empty, or far from every lesion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from medseg.config import DataConfig
from medseg.data.deeplesion import DeepLesionDataset, read_dl_info
from medseg.data.deeplesion.negatives import choose_negatives, negative_slices


def _cfg(root: Path, rate: float) -> DataConfig:
    return DataConfig(root=str(root), window="fixed", context_slices=3, spacing_mm=None, recist_mask="ellipse",
                      negative_rate=rate)


def test_negatives_have_empty_truth_and_empty_labels(demo_root: Path) -> None:
    plain = DeepLesionDataset(_cfg(demo_root, 0.0), "train")
    ds = DeepLesionDataset(_cfg(demo_root, 0.5), "train")
    n = len(plain.samples)
    assert len(plain) == n and len(ds) == n + round(0.5 * n) and len(ds.negatives) == round(0.5 * n)
    assert plain.fingerprint() != ds.fingerprint()
    keys = {(s.series, s.key) for s in ds.samples}
    for i in range(n, len(ds)):
        s = ds[i]
        series, k = s["meta"]["series"], s["meta"]["slice"]
        assert (series, k) not in keys and s["meta"]["negative"] and s["meta"]["lesions"] == []
        truth = cv2.imread(str(demo_root / "Masks_png" / series / f"{k:03d}.png"), cv2.IMREAD_UNCHANGED)
        assert truth is None or not truth.any()  # independent read of the generated truth
        assert not s["label"].any() and not s["instance"].any() and not s["truth"].any()
        assert s["image"].shape == ds[0]["image"].shape
        png = cv2.imread(str(demo_root / "Images_png" / series / f"{k:03d}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_allclose(s["image"][1], np.clip((png - 32768.0 + 1024) / 4095, 0, 1), atol=1e-5)
    assert len(DeepLesionDataset(_cfg(demo_root, 0.5), "val")) == len(DeepLesionDataset(_cfg(demo_root, 0), "val"))


def test_every_truth_free_slice_is_a_candidate(demo_root: Path) -> None:
    rows = read_dl_info(demo_root / "DL_info.csv")
    cands = negative_slices(rows, demo_root / "Masks_png")
    expect = set()
    for r in rows:
        for k in range(r.slice_range[0], r.slice_range[1] + 1):
            m = cv2.imread(str(demo_root / "Masks_png" / r.series / f"{k:03d}.png"), cv2.IMREAD_UNCHANGED)
            if m is None or not m.any():
                expect.add((r.series, k))
    assert {(s, k) for s, k, _ in cands} == expect and expect


def test_without_truth_a_slice_is_negative_beyond_every_lesions_long_axis(demo_root: Path) -> None:
    r = read_dl_info(demo_root / "DL_info.csv")[0]
    # one lesion, long axis 10 mm, 2 mm slices, key slice 20, range 10..30: slices farther than 5 slices
    r = dataclasses.replace(r, key_slice=20, slice_range=(10, 30), diameters_px=(10.0 / r.spacing[0], 5.0),
                            spacing=(r.spacing[0], r.spacing[1], 2.0))
    assert r.slice_interval == 2.0
    got = [k for _, k, _ in negative_slices([r], None)]
    assert got == [*range(10, 15), *range(26, 31)]
    # a second lesion of the series at slice 12 (long axis 2 mm) removes the slices within 1 of it
    r2 = dataclasses.replace(r, key_slice=12, diameters_px=(2.0 / r.spacing[0], 1.0))
    got2 = [k for _, k, _ in negative_slices([r, r2], None)]
    assert got2 == [10, 14, *range(26, 31)]


def test_choose_negatives_is_seeded() -> None:
    cands = [("s", k, None) for k in range(50)]
    a, b = choose_negatives(cands, 7, 0), choose_negatives(cands, 7, 0)
    assert a == b and len(a) == 7 and a == sorted(a)
    assert choose_negatives(cands, 7, 1) != a
    assert choose_negatives(cands, 80, 0) == cands and choose_negatives(cands, 0, 0) == []
