"""The ``deeplesion`` dataset: DeepLesion key slices as 2.5-D samples with RECIST-derived masks.

One sample per key slice (the rows sharing a ``File_name``): the key slice and its neighbours
``data.slice_offset_mm`` apart as channels (linear interpolation between files, clamped at the
series edge), windowed, with RECIST-derived ``label`` / ``instance`` masks
(:func:`medseg.data.deeplesion.recist.recist_to_masks`) built from the rows kept by the filters;
generated releases' true masks (``Masks_png/<series>/<n>.png``) become ``truth``.

Example:
    >>> from medseg.config import DataConfig
    >>> ds = DeepLesionDataset(DataConfig(root="data/demo"), "train")  # doctest: +SKIP
    >>> s = ds[0]; s["image"].shape, s["meta"]["series"]  # doctest: +SKIP
    ((3, 512, 512), '000001_01_01')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from medseg.config import DataConfig
from medseg.data.base import (
    DataError,
    apply_window,
    check_split,
    context_indices,
    fingerprint_files,
    resample_sample,
    stack_context,
)
from medseg.data.deeplesion.archive import ImageSource
from medseg.data.deeplesion.format import LesionRecord, read_dl_info_cached
from medseg.data.deeplesion.negatives import choose_negatives, negative_slices
from medseg.data.deeplesion.recist import RECIST_MODES, recist_to_masks
from medseg.data.windowing import WINDOW_RULES, apply_windows, check_window, window_set
from medseg.registry import DATASETS

__all__ = ["WINDOWS", "DeepLesionDataset"]

#: the window rules (:data:`medseg.data.windowing.WINDOW_RULES`)
WINDOWS = WINDOW_RULES


@dataclass
class _Sample:
    """One key slice and the rows (lesions) kept on it."""

    file_name: str
    series: str
    key: int
    rows: tuple[LesionRecord, ...]


def _scale_xy(vals: tuple[float, ...], scale_yx: tuple[float, float]) -> list[float]:
    """Scale interleaved 0-based ``x, y`` pixel coordinates by (sy, sx) the way cv2.resize maps pixels."""
    sy, sx = scale_yx
    out = []
    for i, v in enumerate(vals):
        s = sx if i % 2 == 0 else sy
        out.append((v + 0.5) * s - 0.5)  # pixel centres: x' + 0.5 = (x + 0.5) · scale
    return out


@DATASETS.register("deeplesion")
class DeepLesionDataset(Dataset):
    """DeepLesion key slices as 2.5-D samples (see :mod:`medseg.data.base` for the sample dict).

    Args:
        cfg: the data config: ``root`` (holding ``DL_info.csv`` and ``Images_png/`` or the zips),
            ``context_slices``, ``slice_offset_mm``, ``window`` (``"dicom"``: each row's DICOM
            window; ``"fixed"``: ``window_range``), ``spacing_mm``, ``recist_mask``
            (``"ellipse"`` | ``"grabcut"``), ``include_noisy``, ``lesion_types``.
        split: ``"train"``, ``"val"``, ``"test"`` (the official ``Train_Val_Test`` split) or ``"all"``.

    Each item is a dict with ``image`` float32 ``(C, H, W)`` in [0, 1], ``label`` int64 and
    ``instance`` int32 ``(1, H, W)``, ``truth`` int32 ``(1, H, W)`` (only when ``Masks_png/``
    exists; None for a slice without a mask file) and ``meta``; or None when the key slice cannot
    be read (after a warning naming the file). GrabCut masks use the key slice in the row's DICOM
    window whatever ``window`` says: a wide fixed window leaves GrabCut too little contrast.

    Raises:
        DataError: no ``DL_info.csv`` or no images under ``root``; a malformed CSV; a bad
            ``window`` / ``recist_mask`` value; a split with no samples.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        self.root = Path(cfg.root)
        check_window(cfg)
        if cfg.recist_mask not in RECIST_MODES:
            raise DataError(
                f"data.recist_mask = {cfg.recist_mask!r}; expected one of {', '.join(RECIST_MODES)}"
            )
        self.csv_path = self.root / "DL_info.csv"
        if not self.csv_path.is_file():
            raise DataError(
                f"{self.csv_path} not found: a DeepLesion data.root must contain DL_info.csv and "
                "Images_png/ (or the archives Images_png_01.zip … Images_png_56.zip). "
                f"`medseg demo-data {self.root}` generates a DeepLesion-format dataset there."
            )
        st = self.csv_path.stat()
        records = read_dl_info_cached(str(self.csv_path.resolve()), st.st_mtime_ns, st.st_size)
        self.images = ImageSource(self.root)
        self.masks_dir = self.root / "Masks_png"
        self.has_masks = self.masks_dir.is_dir()

        keep_types = set(cfg.lesion_types)
        groups: dict[str, list[LesionRecord]] = {}
        for r in records:
            if split != "all" and r.split != split:
                continue
            if r.noisy and not cfg.include_noisy:
                continue
            if keep_types and r.lesion_type not in keep_types:
                continue
            groups.setdefault(r.file_name, []).append(r)
        self.samples = [
            _Sample(fn, rows[0].series, rows[0].key_slice, tuple(rows)) for fn, rows in groups.items()
        ]
        #: lesion-free slices added to the train split (``data.negative_rate`` per key slice)
        self.negatives: list[tuple[str, int, LesionRecord]] = []
        series = {s.series for s in self.samples}
        self._series_rows = [r for r in records if r.series in series]  # every row: a filtered lesion is one too
        self._negative_candidates: list[tuple[str, int, LesionRecord]] | None = None
        if split == "train" and cfg.negative_rate > 0 and self.samples:
            self.negatives = choose_negatives(self.negative_candidates(), round(cfg.negative_rate * len(self.samples)),
                                              cfg.split_seed)
        if not self.samples:
            raise DataError(
                f"{self.csv_path}: no samples for split {split!r} with data.include_noisy="
                f"{cfg.include_noisy} and data.lesion_types={list(cfg.lesion_types) or 'all'} "
                f"({len(records)} rows in the file)"
            )

    def negative_candidates(self) -> list[tuple[str, int, LesionRecord]]:
        """Every lesion-free slice of this split's series (:func:`~medseg.data.deeplesion.negatives.negative_slices`:
        ``(series, slice, row)``), found once (with true masks it reads each slice's mask)."""
        if self._negative_candidates is None:
            self._negative_candidates = negative_slices(self._series_rows, self.masks_dir if self.has_masks else None)
        return self._negative_candidates

    def __len__(self) -> int:
        return len(self.samples) + len(self.negatives)

    @property
    def num_lesions(self) -> int:
        """Lesions (CSV rows) over all samples of this split."""
        return sum(len(s.rows) for s in self.samples)

    def fingerprint(self) -> str:
        """A short hash of the CSV, the key slices' PNGs (or the archives) and the split settings.

        Cheap: a stat per key slice, no directory listing.
        """
        extra = "|".join(
            [
                "deeplesion",
                self.split,
                str(self.cfg.include_noisy),
                ",".join(map(str, sorted(self.cfg.lesion_types))),
                *(s.file_name for s in self.samples),
                *(f"neg:{se}:{n}" for se, n, _ in self.negatives),
            ]
        )
        keys = [(s.series, s.key) for s in self.samples]
        return fingerprint_files([str(self.csv_path), *self.images.files(keys)], extra=extra)

    def read_truth(self, series: str, n: int, shape: tuple[int, int], empty_if_absent: bool = False) -> np.ndarray | None:
        """The true instance map ``(1, H, W)`` int32 of slice ``n`` from ``Masks_png``, or None when absent.

        ``empty_if_absent``: a missing file is an empty map (generated releases write masks only on the
        slices a lesion shows on); an unreadable one is still None.
        """
        path = self.masks_dir / series / f"{n:03d}.png"
        if empty_if_absent and not path.exists():
            return np.zeros((1, *shape), np.int32)
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if m is None:
            if path.is_file():
                self.images.warn(str(path), "unreadable mask; expected a uint8 or uint16 PNG of instance ids")
            return None
        if m.ndim != 2 or m.dtype not in (np.uint8, np.uint16) or m.shape != shape:
            raise DataError(
                f"{path}: {m.dtype} image of shape {m.shape}; expected a single-channel uint8 or "
                f"uint16 PNG of instance ids of shape {shape} (its key slice's)"
            )
        return m.astype(np.int32)[None]

    def context(self, series: str, key: int, rec: LesionRecord
                ) -> tuple[np.ndarray, np.ndarray, list[float], list[tuple[float, float]]] | None:
        """Slice ``key`` of ``series`` as the model sees it: ``(image (C, H, W), key HU, positions,
        windows)``, the context taken within ``rec``'s ``Slice_range`` and windowed by the window
        rule (``rec``'s own window under ``dicom``); None when the slice cannot be read."""
        key_hu = self.images.read(series, key)
        if key_hu is None:
            return None
        first, last = rec.slice_range
        first, last = min(first, key), max(last, key)
        positions = context_indices(
            key, self.cfg.context_slices, self.cfg.slice_offset_mm, rec.slice_interval, first, last
        )

        def read(i: int) -> np.ndarray | None:
            if i == key:
                return key_hu
            hu = self.images.read(series, i)
            if hu is not None and hu.shape != key_hu.shape:
                self.images.warn(
                    self.images.key_source(series, i),
                    f"shape {hu.shape} differs from the key slice's {key_hu.shape}; expected a 16-bit PNG of the series' size",
                )
                return None
            return hu

        hu = stack_context(read, positions, available=range(first, last + 1))
        windows, _ = window_set(self.cfg, rec.window)
        return apply_windows(hu, windows), key_hu, positions, windows

    def block(self, idx: int) -> tuple[int, int]:
        """The ``(first, last)`` slice numbers of sample ``idx``'s block (its ``Slice_range``, holding the key)."""
        s = self.samples[idx]
        first, last = s.rows[0].slice_range
        return min(first, s.key), max(last, s.key)

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        if idx >= len(self.samples):
            return self.unlabelled_slice(*self.negatives[idx - len(self.samples)])
        return self.slice_sample(idx, self.samples[idx].key)

    def slice_sample(self, idx: int, n: int) -> dict[str, Any] | None:
        """The 2.5-D sample of slice ``n`` of sample ``idx``'s block, built exactly as the key slice's.

        Same context rule (clamped to the block), window rule and resampling as ``self[idx]``, which
        is ``slice_sample(idx, key)``. Off the key slice there are no RECIST marks: ``label`` /
        ``instance`` come from the true mask (empty without ``Masks_png``), ``meta["key"]`` is False and
        ``meta["lesions"]`` is empty. None when slice ``n`` cannot be read.
        """
        s = self.samples[idx]
        rec = s.rows[0]
        first, last = self.block(idx)
        if not first <= n <= last:
            raise DataError(f"{s.series}: slice {n} is outside the block {first}-{last} of key slice {s.key}")
        built = self.context(s.series, n, rec)
        if built is None:
            return None
        image, key_hu, positions, windows = built
        window = list(windows[0])

        shape = (int(key_hu.shape[0]), int(key_hu.shape[1]))
        truth = self.read_truth(s.series, n, shape, empty_if_absent=n != s.key) if self.has_masks else None
        if n == s.key:
            lesions = [{"coords": r.coords, "bbox": r.bbox} for r in s.rows]
            gc_image = apply_window(key_hu, *rec.window) if self.cfg.recist_mask == "grabcut" else None
            label, instance = recist_to_masks(lesions, shape, self.cfg.recist_mask, gc_image)
        else:  # no RECIST off the key slice: the true mask where there is one
            instance = truth[0] if truth is not None else np.zeros(shape, np.int32)
            label = (instance > 0).astype(np.int64)

        meta = self._slice_meta(s.series, n, rec, positions, window,
                                id_=s.file_name[:-4] if n == s.key else f"{s.series}_{n:03d}", file_name=s.file_name)
        meta.update(key=n == s.key, key_slice=s.key)
        sample: dict[str, Any] = {
            "image": image,
            "label": label[None],
            "instance": instance[None],
            "meta": meta,
        }
        if self.has_masks:
            sample["truth"] = truth
        sample = resample_sample(sample, self.cfg.spacing_mm)
        scale = tuple(sample["meta"].get("resample_scale", (1.0, 1.0)))
        sample["meta"]["lesions"] = [self._lesion_meta(r, scale) for r in s.rows] if n == s.key else []
        return sample

    def unlabelled_slice(self, series: str, n: int, rec: LesionRecord) -> dict[str, Any] | None:
        """Any slice ``n`` of a series as a sample without labels: empty ``label`` / ``instance``, the
        slice's true mask as ``truth`` where the release has ``Masks_png/``, ``meta["negative"]`` True;
        the context within ``rec``'s ``Slice_range``. The negatives, and the slices training
        propagates masks to (which then set their labels)."""
        built = self.context(series, n, rec)
        if built is None:
            return None
        image, key_hu, positions, windows = built
        empty = np.zeros((1, *key_hu.shape), np.int32)
        meta = self._slice_meta(series, n, rec, positions, list(windows[0]),
                                id_=f"{series}_{n:03d}", file_name=f"{series}_{n:03d}.png")
        meta["negative"] = True
        sample: dict[str, Any] = {"image": image, "label": empty.astype(np.int64), "instance": empty.copy(),
                                  "meta": meta}
        if self.has_masks:  # the slice's true mask (absent file: none on it)
            truth = self.read_truth(series, n, (int(key_hu.shape[0]), int(key_hu.shape[1])), empty_if_absent=True)
            sample["truth"] = truth if truth is not None else empty.copy()
        sample = resample_sample(sample, self.cfg.spacing_mm)
        sample["meta"]["lesions"] = []
        return sample

    def _slice_meta(self, series: str, n: int, rec: LesionRecord, positions: list[float], window: list[float],
                    id_: str, file_name: str) -> dict[str, Any]:
        """The meta entries every slice sample carries (its series, slice, grid, window and context)."""
        return {
            "id": id_, "dataset": "deeplesion", "split": rec.split,
            "spacing": [rec.spacing[1], rec.spacing[0]], "slice_interval": rec.slice_interval,
            "source": self.images.key_source(series, n), "series": series, "slice": n,
            "file_name": file_name, "window": window, "patient_index": rec.patient,
            "study_index": rec.study, "series_index": rec.series_id, "slice_positions": positions,
        }

    @staticmethod
    def _lesion_meta(r: LesionRecord, scale: tuple[float, float]) -> dict[str, Any]:
        """A lesion's meta entry, coordinates in output pixels."""
        if scale == (1.0, 1.0):
            coords, bbox, diam = list(r.coords), list(r.bbox), list(r.diameters_px)
        else:
            coords, bbox = _scale_xy(r.coords, scale), _scale_xy(r.bbox, scale)
            p = np.asarray(coords).reshape(4, 2)
            diam = [float(np.linalg.norm(p[1] - p[0])), float(np.linalg.norm(p[3] - p[2]))]
        return {
            "coords": coords,
            "bbox": bbox,
            "diameters_px": diam,
            "type": r.lesion_type,
            "noisy": r.noisy,
            "location": list(r.location),
        }
