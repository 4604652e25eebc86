"""A tiny CT series with known lesions for the SR / PACS tests (the oracle model of :mod:`tests.predict.builders`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from tests.predict import builders as B

SHAPE = (6, 48, 48)


def lesion_hu() -> np.ndarray:
    """``(Z, H, W)`` HU: soft tissue with two lesions (the oracle's sentinel value) of different sizes and HU."""
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    hu = np.full(SHAPE, 40.0)
    for k in range(1, 4):  # lesion A: a disc over three slices
        hu[k][(yy - 15) ** 2 + (xx - 14) ** 2 <= 36] = B.SENTINEL_HU
    hu[3][(yy - 34) ** 2 / 16 + (xx - 33) ** 2 / 49 <= 1] = B.SENTINEL_HU + 300  # lesion B: an ellipse, one slice
    return hu


def write_ct(folder: Path, seed: int = 0, study_uid: str | None = None, **extra: object) -> tuple[list, str, str]:
    """The series (datasets in slice order), its StudyInstanceUID and SeriesInstanceUID."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    positions = np.array([[-20.0, -30.0, 100.0 + 2.5 * k] for k in range(SHAPE[0])])
    dss = B.write_series(folder, lesion_hu(), positions, [1, 0, 0, 0, 1, 0], (0.75, 0.75),
                         np.random.default_rng(seed), study_uid=study_uid, series_uid=series_uid, extra=dict(extra))
    return dss, study_uid, series_uid
