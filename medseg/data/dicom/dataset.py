"""The ``dicom`` training dataset: labelled DICOM series as 2-D / 2.5-D samples (``data.name: dicom``).

:class:`DicomDataset` finds the series under ``data.root`` (:func:`~medseg.data.dicom.discover.find_series`),
labels each one from a ``masks/`` NIfTI, a SEG or an RTSTRUCT (:mod:`medseg.data.dicom.labels`)
and yields one sample per slice with foreground, in the sample format of :mod:`medseg.data.base`.
Intensities are windowed as ``medseg predict`` windows the same series
(:func:`~medseg.data.dicom.series.dicom_window`).

Example:
    >>> from medseg.config import DataConfig
    >>> ds = DicomDataset(DataConfig(name="dicom", root="/data/hospital_export"), "train")
    >>> s = ds[0]; s["image"].shape, s["meta"]["window"]       # (C, H, W), [low, high] HU
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from medseg.data.base import (
    DataError,
    check_split,
    context_indices,
    fingerprint_files,
    label_instances,
    mask_to_classes,
    resample_sample,
    split_cases,
    stack_context,
)
from medseg.data.dicom.discover import find_series
from medseg.data.dicom.labels import read_nifti_labels, read_rtstruct_labels, read_seg_labels
from medseg.data.dicom.records import SeriesGeometry, SeriesInfo, describe
from medseg.data.dicom.series import dicom_windows, read_instance_hu, series_geometry
from medseg.data.windowing import apply_windows, check_window
from medseg.registry import DATASETS

if TYPE_CHECKING:
    from medseg.config import DataConfig

__all__ = ["DicomDataset"]

log = logging.getLogger("medseg.data")


def _frame(geom: SeriesGeometry, k: int) -> int | None:
    """The frame of slice ``k`` in its multi-frame file (None for a single-frame file)."""
    return geom.frames[k] if geom.frames else None


@dataclass
class _Labelled:
    """A labelled series the dataset samples from."""

    key: str
    geom: SeriesGeometry
    source: str
    label_file: Path
    labels: dict[int, np.ndarray]
    #: ``(low, high)`` HU windows the series is windowed with (:func:`dicom_windows`; several under ``multi``)
    window: list[tuple[float, float]]


@DATASETS.register("dicom")
class DicomDataset(Dataset):
    """Labelled DICOM series as 2-D / 2.5-D samples (like DeepLesion's).

    ``data.root`` is a folder of series (any nesting). A series is labelled by, in this order:
    ``data.root/masks/<SeriesInstanceUID>.nii[.gz]`` or ``masks/<series folder name>.nii[.gz]``
    (:func:`read_nifti_labels`), a SEG (:func:`read_seg_labels`; segment number = class) or an
    RTSTRUCT (:func:`read_rtstruct_labels`; with ``data.num_classes == 2`` all ROIs are class 1,
    else ROI k is class k) referencing it. Series without labels are skipped with a warning
    listing them; so are series whose pixels cannot be decoded (e.g. missing decoder plugins).

    * Samples: one per slice whose labels hold foreground.
    * 2.5-D: ``data.context_slices`` channels ``data.slice_offset_mm`` apart along the slice
      normal, interpolated between the nearest slices (by their real positions, so uneven
      spacing and gaps are honoured) and clamped at the series' ends.
    * Intensity: HU windowed by :func:`~medseg.data.dicom.series.dicom_window`, as ``medseg predict``
      windows the series: ``data.window: dicom`` → the series' first WindowCenter / WindowWidth
      pair (``data.window_range`` with a warning where it has none); ``fixed`` → ``data.window_range``.
    * ``data.spacing_mm`` resamples in-plane; ``instance`` = 8-connected components per class.
    * Split: by series with :func:`~medseg.data.base.split_cases`. Series of one patient can fall
      in different splits.
    * ``meta`` holds no patient data: ``series`` is a hash of the SeriesInstanceUID, ``id`` is
      ``dicom-<series>-<slice>``; ``source`` is the key slice's path relative to ``data.root``.

    Args:
        cfg: the data config.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

    Raises:
        DataError: no series, no labelled series, a label file that does not fit its series or holds
            a class > ``num_classes − 1``, or inconsistent series geometry (names the file / series).
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        check_window(cfg)
        if cfg.context_slices < 1:
            raise DataError(f"data.context_slices must be >= 1, got {cfg.context_slices}")
        self.root = Path(cfg.root)
        masks_dir = self.root / "masks"
        found, skipped = find_series(self.root, exclude=[masks_dir])
        for s in skipped:
            log.warning("skipped %s: %s", s.path, s.reason)
        if not found:
            raise DataError(f"{self.root}: no DICOM image series found ({len(skipped)} files skipped, "
                            f"see the warnings); expected folders of CT/MR slices")
        labelled: list[tuple[SeriesInfo, str, Path]] = []
        unlabelled: list[SeriesInfo] = []
        for info in found:
            src = self._label_source(info, masks_dir, found)
            if src is None:
                unlabelled.append(info)
            else:
                labelled.append((info, *src))
        if unlabelled:
            log.warning("%d series without labels (no SEG, RTSTRUCT or masks/ NIfTI) skipped: %s", len(unlabelled),
                        "; ".join(describe(s) for s in unlabelled))
        if not labelled:
            raise DataError(f"{self.root}: none of the {len(found)} series has labels; expected a SEG or RTSTRUCT "
                            f"referencing each series, or {masks_dir}/<SeriesInstanceUID>.nii.gz")
        assign = split_cases([i.key for i, _, _ in labelled],
                             cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        self.series: list[_Labelled] = []
        self.items: list[tuple[int, int]] = []
        unreadable: list[str] = []
        for info, kind, path in labelled:
            key = info.key
            if split != "all" and assign[key] != split:
                continue
            geom = series_geometry(info)
            labels = self._read_labels(kind, path, geom)
            fg = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
            if fg.size == 0:
                log.warning("%s: no foreground in the labels of %s; it gives no samples", path, describe(info))
                continue
            try:  # one decode up front, so missing decoder plugins show before training starts
                read_instance_hu(geom.files[int(fg[0])], geom.shape[1:], _frame(geom, int(fg[0])))
            except DataError as e:
                unreadable.append(str(e))
                log.warning("%s skipped: %s", describe(info), e)
                continue
            window, note = dicom_windows(cfg, geom.windows)
            if note:
                log.warning("%s: %s", describe(info), note)
            self.items += [(len(self.series), int(k)) for k in fg]
            self.series.append(_Labelled(key, geom, kind, path, {int(k): labels[k].copy() for k in fg}, window))
        if unreadable and not self.series:
            raise DataError(f"no readable labelled series in split {split!r}: " + " | ".join(unreadable[:3]))
        self._files = [str(p) for info, _, lab in labelled for p in [*info.files, lab]]

    @staticmethod
    def _label_source(info: SeriesInfo, masks_dir: Path, found: list[SeriesInfo]) -> tuple[str, Path] | None:
        """``(kind, path)`` of the label to use for ``info``, or None."""
        names = [info.series_uid]
        if sum(s.folder == info.folder for s in found) == 1:  # a folder name is unique to one series
            names.append(info.folder.name)
        for name in names:
            for suf in (".nii.gz", ".nii"):
                p = masks_dir / f"{name}{suf}"
                if p.is_file():
                    return "NIFTI", p
        for kind in ("SEG", "RTSTRUCT"):
            cands = sorted((lab.path for lab in info.labels if lab.kind == kind), key=str)
            if cands:
                if len(cands) > 1:
                    log.warning("%s has %d %s objects; using %s", describe(info), len(cands), kind, cands[0])
                return kind, cands[0]
        return None

    def _read_labels(self, kind: str, path: Path, geom: SeriesGeometry) -> np.ndarray:
        """The class map of one series, values checked against ``num_classes``."""
        if kind == "SEG":
            raw = read_seg_labels(path, geom)
        elif kind == "RTSTRUCT":
            raw = read_rtstruct_labels(path, geom, merge=self.cfg.num_classes == 2)
        else:
            raw = read_nifti_labels(path, geom)
        return mask_to_classes(raw, self.cfg.num_classes, path)

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of every labelled series' file names and sizes (split-independent)."""
        return fingerprint_files(self._files, extra="dicom")

    def _read(self, s: _Labelled, i: int) -> np.ndarray | None:
        """Slice ``i`` in HU, or None (with a warning naming the file) when it cannot be read."""
        try:
            return read_instance_hu(s.geom.files[i], s.geom.shape[1:], _frame(s.geom, i))
        except DataError as e:
            log.warning("%s", e)
            return None

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        si, k = self.items[idx]
        s, cfg = self.series[si], self.cfg
        key = self._read(s, k)
        if key is None:
            return None
        z = s.geom.slice_positions
        # context positions in mm along the normal (an "interval" of 1 mm makes context_indices
        # work in mm), then fractional slice indices from the real positions: uneven spacing and
        # gaps are interpolated correctly
        mm = context_indices(float(z[k]), cfg.context_slices, cfg.slice_offset_mm, 1.0, float(z[0]), float(z[-1]))
        pos = [float(p) for p in np.round(np.interp(mm, z, np.arange(len(z))), 6)]
        hu = stack_context(lambda i: key if i == k else self._read(s, i), pos, available=range(len(z)))
        label = s.labels[k]
        try:
            source = str(s.geom.files[k].relative_to(self.root))
        except ValueError:
            source = s.geom.files[k].name
        sample = {
            "image": apply_windows(hu, s.window),
            "label": label[None].astype(np.int64),
            "instance": label_instances(label)[None],
            "meta": {
                "id": f"dicom-{s.key}-{k:04d}",
                "dataset": "dicom",
                "split": self.split,
                "spacing": [s.geom.spacing[1], s.geom.spacing[2]],
                "slice_interval": s.geom.spacing[0],
                "source": source,
                "series": s.key,
                "slice": k,
                "label_source": s.source,
                "window": list(s.window[0]),
            },
        }
        return resample_sample(sample, cfg.spacing_mm)
