"""The window rule (medseg/data/windowing.py): fixed, multi-window channels, the annotation window."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from medseg.config import DataConfig
from medseg.data.base import DataError
from medseg.data.deeplesion import DeepLesionDataset
from medseg.data.windowing import (
    annotation_window_warning,
    apply_windows,
    input_channels,
    model_window_rule,
    window_set,
)

WIDE, SOFT, LUNG = [-1024.0, 3071.0], [-175.0, 275.0], [-1500.0, 500.0]


def _by_hand(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((hu.astype(np.float64) - low) / (high - low), 0, 1)


def test_apply_windows_is_window_major_and_matches_the_formula() -> None:
    hu = np.random.default_rng(0).uniform(-2000, 3500, (3, 5, 6)).astype(np.float32)
    out = apply_windows(hu, [WIDE, SOFT, LUNG])
    assert out.shape == (9, 5, 6) and out.dtype == np.float32
    for w, (lo, hi) in enumerate([WIDE, SOFT, LUNG]):
        np.testing.assert_allclose(out[3 * w: 3 * w + 3], _by_hand(hu, lo, hi), atol=1e-6)
    assert apply_windows(hu, [SOFT]).shape == (3, 5, 6)  # one window: channels = context slices


def test_window_set_per_rule_and_errors() -> None:
    own = (-160.0, 240.0)
    assert window_set(DataConfig(window="fixed", window_range=WIDE), own) == ([(-1024.0, 3071.0)], None)
    assert window_set(DataConfig(window="dicom"), own) == ([own], None)
    wins, note = window_set(DataConfig(window="dicom", window_range=WIDE), None)
    assert wins == [(-1024.0, 3071.0)] and "window_range" in note
    assert window_set(DataConfig(window="multi", windows=[WIDE, SOFT]), own)[0] == [tuple(WIDE), tuple(SOFT)]
    assert input_channels(DataConfig(window="multi", windows=[WIDE, SOFT, LUNG], context_slices=3)) == 9
    assert input_channels(DataConfig(window="fixed", context_slices=3)) == 3
    with pytest.raises(DataError, match="windows"):
        window_set(DataConfig(window="multi", windows=[]), None)
    with pytest.raises(DataError, match="high > low"):
        window_set(DataConfig(window="multi", windows=[[100, 0]]), None)
    with pytest.raises(DataError, match="expected one of"):
        window_set(DataConfig(window="soft"), None)  # type: ignore[arg-type]


def test_annotation_window_warns_only_where_it_reads_the_annotation() -> None:
    assert "data.window: dicom" in annotation_window_warning(DataConfig(name="deeplesion", window="dicom"))
    assert annotation_window_warning(DataConfig(name="dicom", window="dicom")) is not None
    assert annotation_window_warning(DataConfig(name="deeplesion", window="fixed")) is None
    assert annotation_window_warning(DataConfig(name="folder", window="dicom")) is None  # the dtype's range


def test_model_window_rule_takes_the_stored_rule() -> None:
    data = DataConfig(window="dicom")
    out, note = model_window_rule(data, {"data": {"window": "multi", "windows": [WIDE, SOFT]}})
    assert out.window == "multi" and out.windows == [WIDE, SOFT] and "data.window" in note
    assert data.window == "dicom"  # a copy
    same, none = model_window_rule(DataConfig(window="fixed"), {"data": {"window": "fixed"}})
    assert same.window == "fixed" and none is None
    assert model_window_rule(data, None) == (data, None)


def _rows(root: Path) -> dict[str, list[str]]:
    with open(root / "DL_info.csv", newline="") as f:
        return {r["File_name"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("rule", ["fixed", "dicom", "multi"])
def test_deeplesion_key_channel_in_each_rule(demo_root: Path, rule: str) -> None:
    cfg = DataConfig(root=str(demo_root), window=rule, window_range=WIDE, windows=[WIDE, SOFT, LUNG],
                     context_slices=3, spacing_mm=None, recist_mask="ellipse")
    ds = DeepLesionDataset(cfg, "train")
    s = ds[0]
    rows = _rows(demo_root)
    row = rows[s["meta"]["file_name"]]
    png = cv2.imread(str(demo_root / "Images_png" / s["meta"]["series"] / f"{s['meta']['slice']:03d}.png"),
                     cv2.IMREAD_UNCHANGED)
    hu = png.astype(np.float64) - 32768  # DeepLesion's PNG offset
    own = [float(v) for v in row["DICOM_windows"].split(",")]
    expect = {"fixed": [WIDE], "dicom": [own], "multi": [WIDE, SOFT, LUNG]}[rule]
    assert s["image"].shape[0] == 3 * len(expect) == input_channels(cfg)
    for w, (lo, hi) in enumerate(expect):
        np.testing.assert_allclose(s["image"][3 * w + 1], _by_hand(hu, lo, hi), atol=1e-5)  # the key slice
    assert s["meta"]["window"] == list(expect[0])
