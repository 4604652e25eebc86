"""Datasets: DeepLesion as distributed, generated DeepLesion-format data, folders, NIfTI, DICOM.

Every dataset yields the sample dict described in :mod:`medseg.data.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg.data.base import DataError, collate
from medseg.registry import DATASETS

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from medseg.config import DataConfig

# importing the modules registers their datasets
from medseg.data import deeplesion, dicom, folder  # noqa: E402,F401


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """Build the dataset named ``cfg.name`` for ``split`` ("train", "val", "test" or "all")."""
    return DATASETS.get(cfg.name)(cfg, split)


__all__ = ["DataError", "build_dataset", "collate"]
