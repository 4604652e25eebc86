"""The sample dict every dataset yields, and helpers shared by all datasets.

A **sample** is a plain dict (what MONAI dictionary transforms work on):

========== ============================ ==================================================
key        type / shape                 meaning
========== ============================ ==================================================
image      float32 ``(C, H, W)``        windowed intensities in [0, 1]; C = context slices
label      int64 ``(1, H, W)``          class mask, 0 = background, 1..K classes
instance   int32 ``(1, H, W)``          instance map, 0 = background, 1..N one id per object
weight     float32 ``(1, H, W)``        U-Net border weight map (added by the transforms)
truth      int32 ``(1, H, W)``          optional: true instance map where the data has one
                                        (generated DeepLesion ``Masks_png``); evaluation
                                        scores against it when present, else against label
meta       dict                         see below (never transformed)
========== ============================ ==================================================

``meta`` always holds ``id`` (unique str), ``dataset``, ``split``, ``spacing`` ([sy, sx] mm/px of
the returned arrays), ``slice_interval`` (mm or None) and ``source`` (path of the key image).
Datasets add their own keys (DeepLesion: ``series``, ``slice``, ``file_name``, ``lesions``,
``window``). Nothing identifying a patient (DICOM names, IDs) goes into ``meta``.

Datasets are ``torch.utils.data.Dataset`` subclasses registered in :data:`medseg.registry.DATASETS`
with the signature ``(cfg: DataConfig, split: str)``; ``split`` is ``"train"``, ``"val"``, ``"test"``
or ``"all"``. ``__getitem__`` returns ``None`` for a sample whose key slice cannot be read (after a
warning naming the file); :func:`collate` drops those, so one broken file never stops an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

log = logging.getLogger("medseg.data")

SPLITS = ("train", "val", "test", "all")


#: 8-connectivity: lesion pixels touching at a corner belong to one object
_CONNECTIVITY = ndimage.generate_binary_structure(2, 2)


class DataError(ValueError):
    """Bad input data; the message names the file (and line/column) and what was expected."""


def check_split(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def apply_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map HU to [0, 1]: ``clip((hu - low) / (high - low), 0, 1)`` as float32."""
    if not high > low:
        raise DataError(f"window [{low}, {high}] is empty: high must exceed low")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def context_indices(
    key: float, n: int, offset_mm: float, interval_mm: float | None, first: int, last: int
) -> list[float]:
    """Fractional slice indices of the ``n`` context slices around ``key``.

    Slices lie ``offset_mm`` apart physically; with a slice interval of ``interval_mm`` the k-th
    neighbour sits at ``key ± k·offset/interval`` (fractional when the interval does not divide
    the offset), clamped to the series' ``[first, last]``. ``n`` is odd-centred: for even ``n``
    the extra slice goes below. ``n == 1`` gives ``[key]``.
    """
    if n < 1:
        raise DataError(f"data.context_slices must be >= 1, got {n}")
    step = 0.0 if not interval_mm else offset_mm / interval_mm
    half = (n - 1) // 2
    ks = range(-(n - 1 - half), half + 1)
    return [float(min(max(key + k * step, first), last)) for k in ks]


def stack_context(
    read_slice: Callable[[int], np.ndarray | None],
    positions: Sequence[float],
    available: Iterable[int] | None = None,
) -> np.ndarray:
    """Build a ``(C, H, W)`` float32 stack by linear interpolation between whole slices.

    Args:
        read_slice: returns slice ``i`` as a 2-D array (HU), or ``None`` when it cannot be read
            (the reader warns). Missing neighbours fall back to the nearest readable slice.
        positions: fractional slice indices (from :func:`context_indices`).
        available: indices that exist (defaults to every integer between the positions).

    Raises:
        DataError: when no slice near a position can be read.
    """
    cache: dict[int, np.ndarray | None] = {}
    avail = sorted(set(available)) if available is not None else None

    def get(i: int) -> np.ndarray | None:
        if i not in cache:
            cache[i] = read_slice(i)
        return cache[i]

    def nearest_readable(i: int) -> np.ndarray:
        cands = avail if avail is not None else list(range(int(min(positions)), int(max(positions)) + 1))
        for j in sorted(cands, key=lambda c: (abs(c - i), c)):
            arr = get(j)
            if arr is not None:
                return arr
        raise DataError(f"no readable slice near index {i}")

    out = []
    for p in positions:
        lo, hi = math.floor(p), math.ceil(p)
        a = get(lo)
        a = nearest_readable(lo) if a is None else a
        if hi == lo:
            out.append(a.astype(np.float32))
            continue
        b = get(hi)
        b = nearest_readable(hi) if b is None else b
        t = np.float32(p - lo)
        out.append(((1 - t) * a.astype(np.float32) + t * b.astype(np.float32)).astype(np.float32))
    return np.stack(out, axis=0)


def resampled_shape(shape: tuple[int, int], spacing: tuple[float, float], target_mm: float) -> tuple[int, int]:
    """``(H, W)`` of an image of ``spacing`` mm/px once :func:`resample_sample` has taken it to ``target_mm``."""
    (h, w), (sy, sx) = shape, spacing
    return max(1, round(h * sy / target_mm)), max(1, round(w * sx / target_mm))


def resample_sample(sample: dict[str, Any], target_mm: float | None) -> dict[str, Any]:
    """Resample ``image`` (linear), ``label`` and ``instance`` (nearest) to ``target_mm`` mm/px.

    Updates ``meta["spacing"]``; keeps the original spacing in ``meta["native_spacing"]``, the
    original ``(H, W)`` in ``meta["source_shape"]`` and the scale factors in ``meta["resample_scale"]``
    (new / old pixels). A no-op for ``None``. :func:`to_source_grid` is its inverse for masks.
    """
    if target_mm is None:
        return sample
    import cv2

    sy, sx = (float(s) for s in sample["meta"]["spacing"])
    h, w = sample["image"].shape[-2:]
    nh, nw = resampled_shape((h, w), (sy, sx), target_mm)
    if (nh, nw) == (h, w):
        return sample
    out = dict(sample)
    out["image"] = np.stack(
        [cv2.resize(c, (nw, nh), interpolation=cv2.INTER_LINEAR) for c in sample["image"]]
    ).astype(np.float32)
    for key in ("label", "instance", "truth"):
        if key in sample and sample[key] is not None:
            # centre-aligned like the linearly resampled image (cv2's INTER_NEAREST is not: it moved
            # the masks up to a pixel towards the origin, a boundary the model then learned blurred)
            out[key] = nearest_resize(np.asarray(sample[key]), (nh, nw))
    meta = dict(sample["meta"])
    meta["native_spacing"] = [sy, sx]
    meta["source_shape"] = [int(h), int(w)]
    meta["spacing"] = [sy * h / nh, sx * w / nw]
    meta["resample_scale"] = [nh / h, nw / w]
    out["meta"] = meta
    return out


def to_source_grid(mask: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """A class or instance map on the sample's grid, back on its source slice's grid (nearest neighbour).

    The inverse of :func:`resample_sample`: every writer of a predicted mask calls this, so a saved
    mask has its source slice's shape and overlays it. Each source pixel takes the value of the
    sample pixel under its centre (pixel centres aligned, as the linearly resampled image is;
    OpenCV's ``INTER_NEAREST`` would shift the mask by up to a pixel). Without resampling it
    returns ``mask``.

    Args:
        mask: ``(H, W)`` (or ``(..., H, W)``) integer map on the (resampled) sample grid.
        meta: the sample's meta (``source_shape`` set by :func:`resample_sample`).
    """
    shape = meta.get("source_shape")
    mask = np.asarray(mask)
    if not shape or tuple(mask.shape[-2:]) == tuple(shape):
        return mask
    return nearest_resize(mask, (int(shape[0]), int(shape[1])))


def nearest_resize(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` ``(..., H, W)`` resized to ``shape`` by nearest neighbour with pixel centres aligned.

    Output pixel ``y`` takes the input pixel under its centre, ``(y + 0.5) · H / h`` — the alignment
    of OpenCV's ``INTER_LINEAR`` (and of MONAI / PyTorch with ``align_corners=False``), so a mask
    stays on its linearly resampled image. Keeps the dtype.
    """
    h, w = shape
    mh, mw = mask.shape[-2:]
    ys = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return mask[..., ys[:, None], xs]


def label_instances(label: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of each class of a 2-D class map, numbered 1..N.

    Components of class 1 come first, then class 2, ...; two touching objects of different
    classes are different instances.

    Args:
        label: ``(H, W)`` integer class map, 0 = background.

    Returns:
        int32 ``(H, W)`` instance map, 0 = background.
    """
    label = np.asarray(label)
    out = np.zeros(label.shape, np.int32)
    n = 0
    for cls in np.unique(label):
        if cls == 0:
            continue
        comp, k = ndimage.label(label == cls, structure=_CONNECTIVITY)
        out[comp > 0] = comp[comp > 0] + n
        n += k
    return out


def mask_to_classes(mask: np.ndarray, num_classes: int, path: str | Path) -> np.ndarray:
    """Validate a mask's values and return it as a uint8/uint16 class map (0/255 → 0/1).

    Raises:
        DataError: non-integral, negative or > ``num_classes − 1`` values (the message names the file).
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.round(mask)):
            raise DataError(f"{path}: mask values must be whole class numbers, got non-integer values")
    values = np.unique(mask)
    if values.size and values.min() < 0:
        raise DataError(f"{path}: mask holds negative value {values.min()}; expected 0 = background, 1..K classes")
    if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
        # binary masks are often saved as 0/255 so that they are visible in an image viewer
        mask = mask == 255
        values = np.unique(mask.astype(np.uint8))
    if values.size and values.max() > num_classes - 1:
        raise DataError(
            f"{path}: mask holds class {int(values.max())} but data.num_classes = {num_classes} "
            f"allows 0..{num_classes - 1} (0 = background; a binary mask may use 0/1 or 0/255)"
        )
    return mask.astype(np.uint8 if num_classes <= 256 else np.uint16)


def split_cases(case_ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic case → split assignment for datasets without an official split."""
    ids = sorted(set(case_ids))
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    out = {}
    for i, cid in enumerate(order):
        out[cid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def fingerprint_files(paths: Iterable[str], extra: str = "") -> str:
    """A short stable hash of file names and sizes (a dataset fingerprint for tracking)."""
    import os

    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        try:
            size = os.path.getsize(p)
        except OSError:
            size = -1
        h.update(f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}:{size}\n".encode())
    return h.hexdigest()[:16]


def collate(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack samples into tensors, dropping ``None`` (unreadable) samples; ``meta`` stays a list.

    Returns ``None`` when every sample in the batch was unreadable.
    """
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    out: dict[str, Any] = {"meta": [b.get("meta", {}) for b in batch]}
    for key in batch[0]:
        if key == "meta":
            continue
        vals = [b[key] for b in batch]
        if any(v is None for v in vals):
            continue
        tens = [v if isinstance(v, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(v)) for v in vals]
        if key in ("label", "instance", "truth"):
            tens = [t.long() for t in tens]
        else:
            tens = [t.float() if t.is_floating_point() else t for t in tens]
        out[key] = torch.stack(tens, 0)
    return out
