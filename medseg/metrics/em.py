"""The ISBI 2012 (EM segmentation challenge) measures: pixel error and Rand error.

``metrics.segmentation_errors: true`` adds three keys to validation and ``medseg evaluate``:

* ``pixel_error`` — the fraction of pixels whose class is wrong (1 − pixel accuracy, over all
  images' pixels together);
* ``rand_error`` — the adapted Rand error (``skimage.metrics.adapted_rand_error``, 1 − the Rand
  F-score) between the true instances (each cell its own id; true background / membrane pixels
  are ignored, as in the challenge) and the predicted objects, the connected components of the
  predicted foreground (``metrics.connectivity``); one value per image, averaged over images.
  Every predicted-membrane pixel inside a true cell belongs to one segment, the predicted
  background, so membranes drawn a pixel too wide raise it as if cells were merged;
* ``split_merge_error`` — the same adapted Rand error over only the pixels that both the truth and
  the prediction call foreground: it counts merged and split cells and is blind to how wide the
  predicted membranes are (the two measures apart tell "cells fused" from "membranes too thick").
  Not a measure to choose an operating point by alone: less predicted foreground leaves it fewer
  pixels to be wrong on.

All three are errors: lower is better (``train.monitor_mode: min``, ``calibration.mode: min``).

Example:
    >>> errors = SegmentationErrors(connectivity=1)
    >>> errors.update(pred, label, instance)          # (B, H, W) each
    >>> errors.compute()                              # {"pixel_error": ..., "rand_error": ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medseg.runtime import dist_ready, gather_objects

__all__ = ["ERROR_NAMES", "SegmentationErrors", "rand_error", "split_merge_error"]

ERROR_NAMES = ("pixel_error", "rand_error", "split_merge_error")


def _numpy(x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return a[:, 0] if a.ndim == 4 else a


def _objects(pred: np.ndarray, connectivity: int) -> np.ndarray:
    """The predicted objects: connected components of ``pred > 0`` (int64 ids, 0 = background)."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    return ndimage.label(np.asarray(pred) > 0, structure=structure)[0].astype(np.int64)


def _rand(true: np.ndarray, objects: np.ndarray) -> float:
    from skimage.metrics import adapted_rand_error

    if not (true > 0).any():
        return float("nan")
    return float(adapted_rand_error(true, objects, ignore_labels=(0,))[0])


def _split_merge(true: np.ndarray, objects: np.ndarray) -> float:
    from skimage.metrics import adapted_rand_error

    both = (true > 0) & (objects > 0)
    if not both.any():
        return float("nan")
    return float(adapted_rand_error(true[both], objects[both], ignore_labels=())[0])


def rand_error(pred: np.ndarray, true_instance: np.ndarray, connectivity: int = 2) -> float:
    """Adapted Rand error of one image: predicted objects = components of ``pred > 0``; true 0 ignored."""
    return _rand(np.asarray(true_instance).astype(np.int64), _objects(pred, connectivity))


def split_merge_error(pred: np.ndarray, true_instance: np.ndarray, connectivity: int = 2) -> float:
    """Adapted Rand error over the pixels both maps call foreground: merges and splits, not membrane width.

    The predicted objects are the components of ``pred > 0`` as in :func:`rand_error`; pixels the
    prediction calls background are left out as well as those the truth does. NaN when no pixel is
    foreground in both.
    """
    return _split_merge(np.asarray(true_instance).astype(np.int64), _objects(pred, connectivity))


class SegmentationErrors:
    """Accumulates ``pixel_error`` and ``rand_error`` over batches (``update`` / ``compute`` / ``reset``).

    Args:
        connectivity: 2 = 8-connected predicted objects, 1 = 4-connected.
    """

    def __init__(self, connectivity: int = 2) -> None:
        self.connectivity = connectivity
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any) -> SegmentationErrors | None:
        """The accumulator the ``metrics`` config section asks for (None when it asks for none)."""
        return cls(cfg.connectivity) if getattr(cfg, "segmentation_errors", False) else None

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._wrong = 0
        self._pixels = 0
        self._rand: list[float] = []
        self._split_merge: list[float] = []

    def update(self, pred: Any, label: Any, instance: Any | None = None) -> None:
        """Add a batch: ``(B, H, W)`` predicted classes, true classes and (optional) true instances."""
        p, y = _numpy(pred), _numpy(label)
        self._wrong += int((p != y).sum())
        self._pixels += int(y.size)
        inst = _numpy(instance) if instance is not None else None
        for b in range(len(p)):
            true = inst[b] if inst is not None else ndimage.label(y[b] > 0)[0]
            true, objects = np.asarray(true).astype(np.int64), _objects(p[b], self.connectivity)  # labelled once
            for values, value in ((self._rand, _rand(true, objects)), (self._split_merge, _split_merge(true, objects))):
                if np.isfinite(value):
                    values.append(value)

    def reduce_across_ranks(self) -> None:
        """Combine every rank's counts (DDP); a no-op otherwise."""
        if not dist_ready():
            return
        parts = gather_objects((self._wrong, self._pixels, self._rand, self._split_merge))
        self._wrong = sum(p[0] for p in parts)
        self._pixels = sum(p[1] for p in parts)
        self._rand = [v for p in parts for v in p[2]]
        self._split_merge = [v for p in parts for v in p[3]]

    def compute(self) -> dict[str, float]:
        """``pixel_error``, ``rand_error`` and ``split_merge_error`` (keys present only where defined)."""
        out: dict[str, float] = {}
        if self._pixels:
            out["pixel_error"] = self._wrong / self._pixels
        if self._rand:
            out["rand_error"] = float(np.mean(self._rand))
        if self._split_merge:
            out["split_merge_error"] = float(np.mean(self._split_merge))
        return out
