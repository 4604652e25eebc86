"""NIH DeepLesion, read byte-for-byte as distributed (folder or the 56 zips), as 2.5-D samples.

``data.root`` holds ``DL_info.csv`` and the images, either unpacked (``Images_png/<series>/<n>.png``)
or as the distributed archives ``Images_png_01.zip`` … ``Images_png_56.zip`` (read without
unpacking; both may be present, the folder wins). Generated DeepLesion-format data may also hold
true instance masks in ``Masks_png/<series>/<n>.png``; they become the sample's ``truth``.

The package, by concern:

* :mod:`~medseg.data.deeplesion.format` — the ``DL_info.csv`` format (:data:`COLUMNS`,
  :class:`LesionRecord`, :func:`read_dl_info`, :func:`format_numbers`) and the PNGs' HU encoding
  (:data:`HU_OFFSET`, :func:`png_to_hu`);
* :mod:`~medseg.data.deeplesion.archive` — reading slices from ``Images_png/`` or the zips
  (:class:`ImageSource`);
* :mod:`~medseg.data.deeplesion.recist` — RECIST marks → pixel masks (MULAN ellipse, GrabCut);
* :mod:`~medseg.data.deeplesion.dataset` — :class:`DeepLesionDataset`, registered in
  :data:`medseg.registry.DATASETS` as ``deeplesion`` (importing this package registers it).

Example:
    >>> from medseg.config import DataConfig
    >>> ds = DeepLesionDataset(DataConfig(root="data/demo"), "train")  # doctest: +SKIP
    >>> s = ds[0]; s["image"].shape, s["meta"]["series"]  # doctest: +SKIP
    ((3, 512, 512), '000001_01_01')
"""

from __future__ import annotations

from medseg.data.deeplesion.archive import ImageSource
from medseg.data.deeplesion.dataset import WINDOWS, DeepLesionDataset
from medseg.data.deeplesion.format import (
    COLUMNS,
    HU_OFFSET,
    SPLIT_CODES,
    LesionRecord,
    format_numbers,
    png_to_hu,
    read_dl_info,
)
from medseg.data.deeplesion.recist import RECIST_MODES, ellipse_mask, grabcut_mask, recist_to_masks

__all__ = [
    "COLUMNS",
    "HU_OFFSET",
    "RECIST_MODES",
    "SPLIT_CODES",
    "WINDOWS",
    "DeepLesionDataset",
    "ImageSource",
    "LesionRecord",
    "ellipse_mask",
    "format_numbers",
    "grabcut_mask",
    "png_to_hu",
    "read_dl_info",
    "recist_to_masks",
]
