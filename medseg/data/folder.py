"""Image/mask folders: 2-D PNG / TIFF / NIfTI pairs (``folder``) and 3-D NIfTI volumes (``nifti``).

Both datasets read ``data.root/images/*`` and ``data.root/masks/*``, paired by file stem (the name
without ``.nii.gz``, ``.nii``, ``.png``, ``.tif`` or ``.tiff``)::

    root/
      images/case01.png   case02.png   ...      (folder)   or   case01.nii.gz ...  (nifti)
      masks/ case01.png   case02.png   ...

Masks hold 0 = background and 1..K−1 the classes (``K = data.num_classes``); a binary mask stored
as 0/255 is read as 0/1. ``instance`` is the connected components of each class (8-connected),
numbered uniquely across classes (:func:`~medseg.data.base.label_instances`). Files are read with
:mod:`medseg.data.images`. Neither dataset has an official
split: cases (stems) are assigned by :func:`medseg.data.base.split_cases` with
``data.val_fraction``, ``data.test_fraction`` and ``data.split_seed``.

Example:
    >>> from medseg.config import DataConfig
    >>> ds = FolderDataset(DataConfig(name="folder", root="my_pngs", context_slices=1), "train")
    >>> s = ds[0]; s["image"].shape, s["label"].shape        # (1, H, W), (1, H, W)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
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
from medseg.data.images import (
    SUFFIXES_2D,
    SUFFIXES_3D,
    file_stem,
    image_shape,
    is_nifti,
    load_canonical,
    nifti_2d,
    normalise_2d,
    read_image_2d,
    read_mask_2d,
)
from medseg.data.windowing import WINDOW_RULES, apply_windows, check_window, window_set
from medseg.registry import DATASETS

if TYPE_CHECKING:
    from medseg.config import DataConfig

__all__ = ["WINDOWS", "FolderDataset", "NiftiDataset", "pair_files"]

log = logging.getLogger("medseg.data")

WINDOWS = WINDOW_RULES
#: canonical NIfTI volumes kept in memory per dataset (per DataLoader worker)
_VOLUME_CACHE = 2


# ----------------------------------------------------------------------------- shared helpers


def pair_files(root: str | Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for every ``root/images/X`` with a ``root/masks/X`` (any allowed suffix).

    Hidden files (``.DS_Store``...) are ignored; a mask without an image is ignored with a warning.

    Raises:
        DataError: missing ``images/`` or ``masks/``, no images, a file with another suffix, two
            files with one stem, or images without masks (all listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root = {root} does not exist or is not a folder")
    found: dict[str, dict[str, Path]] = {}
    for sub in ("images", "masks"):
        d = root / sub
        if not d.is_dir():
            raise DataError(
                f"{d} is missing: expected {root}/images/ and {root}/masks/ holding files paired by "
                f"name ({', '.join(suffixes)})"
            )
        files: dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            stem = file_stem(p.name, suffixes)
            if stem is None:
                raise DataError(f"{p}: unsupported file type; expected one of {', '.join(suffixes)}")
            if stem in files:
                raise DataError(f"{files[stem]} and {p} have the same name stem {stem!r}; keep one")
            files[stem] = p
        found[sub] = files
    images, masks = found["images"], found["masks"]
    if not images:
        raise DataError(f"{root / 'images'} holds no images ({', '.join(suffixes)})")
    missing = sorted(set(images) - set(masks))
    if missing:
        shown = ", ".join(str(images[s].name) for s in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"{len(missing)} image(s) in {root / 'images'} have no mask in {root / 'masks'} "
            f"(same name stem expected): {shown}{more}"
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%d mask(s) in %s have no image and are ignored: %s", len(orphans), root / "masks",
                    ", ".join(masks[s].name for s in orphans[:10]))
    return [(s, images[s], masks[s]) for s in sorted(images)]


def _check_window(cfg: DataConfig, multi: bool = True) -> None:
    """Reject an unknown ``data.window`` (and ``multi`` where the dataset cannot use it)."""
    check_window(cfg)
    if cfg.window == "multi" and not multi:
        raise DataError("data.window = multi needs HU volumes (deeplesion, dicom, nifti); 2-D image folders "
                        "take fixed or dicom (the dtype's range)")


# ----------------------------------------------------------------------------- folder dataset


@DATASETS.register("folder")
class FolderDataset(Dataset):
    """2-D image/mask pairs: ``root/images/<stem>.{png,tif,tiff,nii,nii.gz}`` + ``root/masks/<stem>.*``.

    * Images: 8- or 16-bit grayscale PNG / TIFF, or a 2-D NIfTI. A colour PNG/TIFF is converted
      to grayscale (BT.601 luma) with a logged note; grayscale is never expanded to RGB.
    * Intensity: with ``data.window: fixed`` the values are windowed with ``data.window_range``
      (HU-like data); otherwise the image dtype's full range maps to [0, 1] (uint8 ÷ 255, uint16
      ÷ 65535; float images by their own min..max).
    * One channel: 2-D images have no neighbouring slices, so ``data.context_slices`` must be 1
      (and the model's ``in_channels`` is 1); any other value is a :class:`DataError`.
    * Spacing: PNG / TIFF have no reliable physical spacing, so ``meta["spacing"]`` is
      ``[1.0, 1.0]`` (pixels; ``data.spacing_mm`` then resamples in pixel units); a NIfTI uses
      its header zooms.
    * Sizes are checked when the dataset is built (headers only); mask values when a sample is
      read. An image that cannot be decoded gives ``None`` (with a warning), as the
      sample contract says.

    Args:
        cfg: the data config (``root``, ``num_classes``, ``window``, ``window_range``,
            ``spacing_mm``, split fractions and seed).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

    Raises:
        DataError: missing folders, no images, unpaired images, a mask whose size differs from its
            image, an unreadable header, or ``context_slices != 1``.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        _check_window(cfg, multi=False)
        if cfg.context_slices != 1:
            raise DataError(
                f"data.context_slices = {cfg.context_slices}, but data.name: folder holds 2-D images "
                f"without neighbouring slices; set data.context_slices: 1 (the model then has 1 input channel)"
            )
        pairs = pair_files(cfg.root, SUFFIXES_2D)
        assign = split_cases([s for s, _, _ in pairs], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        self.items: list[tuple[str, Path, Path]] = []
        for stem, img, msk in pairs:
            ishape, mshape = image_shape(img), image_shape(msk)
            if ishape != mshape:
                raise DataError(
                    f"mask {msk} has size {mshape[0]}×{mshape[1]} (H×W) but its image {img} is "
                    f"{ishape[0]}×{ishape[1]}; a mask must match its image pixel for pixel"
                )
            if split == "all" or assign[stem] == split:
                self.items.append((stem, img, msk))
        self._all_files = [str(p) for _, i, m in pairs for p in (i, m)]
        self._noted_colour = False

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of every image and mask name and size (split-independent)."""
        return fingerprint_files(self._all_files, extra="folder")

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        stem, img_path, mask_path = self.items[idx]
        try:
            arr, colour = read_image_2d(img_path)
        except DataError as e:
            log.warning("skipping sample %s: %s", stem, e)
            return None
        if colour:
            # a note, not an error: screenshots and exported figures are often saved as RGB
            (log.warning if not self._noted_colour else log.debug)(
                "%s is a colour image; converted to grayscale (BT.601 luma)", img_path)
            self._noted_colour = True
        label = read_mask_2d(mask_path, self.cfg.num_classes)
        if label.shape != arr.shape:
            raise DataError(f"mask {mask_path} has size {label.shape} but its image {img_path} is {arr.shape}")
        spacing = nifti_2d(img_path)[1] if is_nifti(img_path) else [1.0, 1.0]
        sample = {
            "image": normalise_2d(arr, self.cfg.window, self.cfg.window_range)[None],
            "label": label[None].astype(np.int64),
            "instance": label_instances(label)[None],
            "meta": {
                "id": stem,
                "dataset": "folder",
                "split": self.split,
                "spacing": spacing,
                "slice_interval": None,
                "source": str(img_path),
                "mask": str(mask_path),
            },
        }
        return resample_sample(sample, self.cfg.spacing_mm)


# ----------------------------------------------------------------------------- nifti dataset


@dataclass
class _Case:
    """One NIfTI case: files, geometry and the foreground slices' labels."""

    stem: str
    image: Path
    mask: Path
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    labels: dict[int, np.ndarray]


@DATASETS.register("nifti")
class NiftiDataset(Dataset):
    """3-D NIfTI volumes sliced into 2-D / 2.5-D samples: ``root/images/<stem>.nii[.gz]`` + ``root/masks/``.

    * Orientation: both volumes are brought to the closest canonical (RAS+) orientation with
      ``nibabel.as_closest_canonical``; slices are taken along ``data.axis`` of that array
      (2 = axial). A sample's 2-D slice is ``np.take(volume, k, axis)``: its rows run along the
      lower remaining axis, its columns along the higher one (no transposition).
    * Samples: one per slice whose mask holds foreground — like DeepLesion's key slices, and so
      that training is not flooded by empty slices. Validation and test are therefore scored on
      lesion-bearing slices only.
    * 2.5-D: ``data.context_slices`` channels ``data.slice_offset_mm`` apart, placed with
      :func:`~medseg.data.base.context_indices` from the header spacing along the axis and
      interpolated with :func:`~medseg.data.base.stack_context`.
    * Intensity: HU windowed with ``data.window_range``. ``data.window: dicom`` (DeepLesion's
      per-row DICOM window) has no meaning for NIfTI and is treated as ``fixed``.
    * Masks are read (and their values checked) when the dataset is built; images when a sample
      is read, keeping the last two canonical volumes in memory.

    Args:
        cfg: the data config (``root``, ``axis``, ``context_slices``, ``slice_offset_mm``,
            ``window_range``, ``num_classes``, ``spacing_mm``, split fractions and seed).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

    Raises:
        DataError: missing folders, no volumes, unpaired images, unreadable files, a mask whose
            shape differs from its image, bad mask values, or ``axis`` not in 0..2.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = check_split(split)
        _check_window(cfg)
        if cfg.axis not in (0, 1, 2):
            raise DataError(f"data.axis = {cfg.axis}; expected 0, 1 or 2 (the slicing axis of the RAS volume)")
        if cfg.context_slices < 1:
            raise DataError(f"data.context_slices must be >= 1, got {cfg.context_slices}")
        pairs = pair_files(cfg.root, SUFFIXES_3D)
        assign = split_cases([s for s, _, _ in pairs], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        self.cases: list[_Case] = []
        self.items: list[tuple[int, int]] = []
        ax = cfg.axis
        for stem, img_path, mask_path in pairs:
            if split != "all" and assign[stem] != split:
                continue
            img = load_canonical(img_path, "image")
            msk = load_canonical(mask_path, "mask")
            if img.shape != msk.shape:
                raise DataError(
                    f"mask {mask_path} has shape {tuple(msk.shape)} but its image {img_path} has shape "
                    f"{tuple(img.shape)} (both in canonical RAS orientation); a mask must match its image"
                )
            if not np.allclose(img.affine, msk.affine, atol=1e-3):
                log.warning("%s and %s have different affines; the mask is used voxel for voxel", img_path, mask_path)
            labels = mask_to_classes(np.asanyarray(msk.dataobj), cfg.num_classes, mask_path)
            fg = np.flatnonzero(np.moveaxis(labels, ax, 0).reshape(labels.shape[ax], -1).any(axis=1))
            if fg.size == 0:
                log.warning("%s has no foreground; case %s gives no samples", mask_path, stem)
            case = _Case(stem, img_path, mask_path, tuple(int(s) for s in img.shape),
                         tuple(float(z) for z in img.header.get_zooms()[:3]),
                         {int(k): np.take(labels, int(k), axis=ax).copy() for k in fg})
            self.items += [(len(self.cases), int(k)) for k in fg]
            self.cases.append(case)
        self._all_files = [str(p) for _, i, m in pairs for p in (i, m)]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of every volume and mask name and size (split-independent)."""
        return fingerprint_files(self._all_files, extra=f"nifti:axis={self.cfg.axis}")

    def _volume(self, ci: int) -> np.ndarray | None:
        """The canonical float32 image volume of case ``ci`` (cached), or None (warned) if unreadable."""
        if ci in self._cache:
            self._cache.move_to_end(ci)
            return self._cache[ci]
        case = self.cases[ci]
        try:
            vol = load_canonical(case.image, "image").get_fdata(dtype=np.float32)
        except Exception as e:  # zlib, EOF, OS errors...: one broken file must not stop an epoch
            log.warning("cannot read %s: %s", case.image, e)
            return None
        self._cache[ci] = vol
        while len(self._cache) > _VOLUME_CACHE:
            self._cache.popitem(last=False)
        return vol

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        ci, k = self.items[idx]
        case, ax, cfg = self.cases[ci], self.cfg.axis, self.cfg
        vol = self._volume(ci)
        if vol is None:
            return None
        n = vol.shape[ax]
        interval = case.zooms[ax]
        pos = context_indices(k, cfg.context_slices, cfg.slice_offset_mm, interval, 0, n - 1)
        hu = stack_context(lambda i: np.take(vol, i, axis=ax), pos, available=range(n))
        label = case.labels[k]
        inplane = [case.zooms[a] for a in range(3) if a != ax]
        sample = {
            "image": apply_windows(hu, window_set(cfg, None)[0]),
            "label": label[None].astype(np.int64),
            "instance": label_instances(label)[None],
            "meta": {
                "id": f"{case.stem}:{k}",
                "dataset": "nifti",
                "split": self.split,
                "spacing": inplane,
                "slice_interval": interval,
                "source": str(case.image),
                "series": case.stem,
                "slice": k,
                "axis": ax,
                "window": list(cfg.window_range),
            },
        }
        return resample_sample(sample, cfg.spacing_mm)
