"""One window rule for a DICOM series: the ``dicom`` dataset and ``medseg predict`` normalise a slice alike.

``data.window: dicom`` means the series' own first WindowCenter / WindowWidth pair in training as in
prediction; ``fixed`` (or a series without a window) means ``data.window_range`` in both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from medseg.config import Config, DataConfig
from medseg.data import build_dataset
from medseg.data.base import apply_window
from medseg.predict.readers import discover, load_case
from tests.data.dicom.builders import H, W, expected_hu, write_ct_series, write_seg

Z = [0.0, 2.5, 5.0, 7.5]
#: the header's first pair is centre 40, width 400 → [-160, 240] HU; the second pair is ignored
HEADER = ([40.0, -600.0], [400.0, 1500.0])
FIXED = [-1000.0, 1000.0]


def _write(root: Path, window: tuple[list[float], list[float]] | None, seed: int) -> np.ndarray:
    """A 4-slice CT series (z ascending as written) with a SEG on slices 1-2; returns its HU."""
    stored = np.random.default_rng(seed).integers(-300, 600, (4, H, W)).astype(np.int16)
    src = write_ct_series(root / "ct", stored, Z, seed=seed, window=window)
    seg = np.zeros((4, H, W), np.uint8)
    seg[1:3, 10:20, 8:18] = 1
    (root / "labels").mkdir()
    write_seg(root / "labels" / "seg.dcm", src, seg)
    return expected_hu(stored)


def _train_and_predict(root: Path, window: str) -> tuple[list[dict], object]:
    """The dataset's samples and predict's loaded case for the one series under ``root``."""
    data = DataConfig(name="dicom", root=str(root), context_slices=3, slice_offset_mm=2.5, window=window,
                      window_range=list(FIXED), num_classes=2)
    ds = build_dataset(data, "all")
    cfg = Config(data=data)
    cases, _ = discover(root, cfg)
    assert len(cases) == 1 and len(ds) == 2
    return [ds[i] for i in range(len(ds))], load_case(cases[0], cfg)


@pytest.mark.parametrize(("window", "low_high"), [("dicom", [-160.0, 240.0]), ("fixed", FIXED)])
def test_training_and_predict_window_a_series_alike(tmp_path: Path, window: str, low_high: list[float]) -> None:
    hu = _write(tmp_path, HEADER, seed=21)
    samples, loaded = _train_and_predict(tmp_path, window)
    for s in samples:
        k = s["meta"]["slice"]
        assert s["meta"]["window"] == low_high == loaded.info["window"]
        np.testing.assert_allclose(s["image"], loaded.images[k], atol=1e-6)
        # 2.5 mm offset = the slice interval: the neighbours are whole slices
        np.testing.assert_allclose(s["image"], apply_window(hu[[k - 1, k, k + 1]], *low_high), atol=1e-6)


def test_series_without_a_window_falls_back_to_window_range_in_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path, None, seed=22)
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        samples, loaded = _train_and_predict(tmp_path, "dicom")
    assert "no WindowCenter / WindowWidth" in caplog.text
    assert any("no WindowCenter / WindowWidth" in w for w in loaded.warnings)
    for s in samples:
        assert s["meta"]["window"] == FIXED == loaded.info["window"]
        np.testing.assert_allclose(s["image"], loaded.images[s["meta"]["slice"]], atol=1e-6)


def test_dicom_window_rule() -> None:
    from medseg.data.dicom import dicom_window, header_window

    assert header_window([None, (40.0, 400.0), (-600.0, 1500.0)]) == (-160.0, 240.0)
    assert header_window([None, None]) is None
    assert dicom_window(DataConfig(window="dicom"), [(40.0, 400.0)]) == ((-160.0, 240.0), None)
    assert dicom_window(DataConfig(window="fixed", window_range=FIXED), [(40.0, 400.0)]) == ((-1000.0, 1000.0), None)
    (low_high, note) = dicom_window(DataConfig(window="dicom", window_range=FIXED), [None])
    assert low_high == (-1000.0, 1000.0) and "data.window_range" in note
