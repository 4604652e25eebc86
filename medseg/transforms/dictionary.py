"""MONAI dictionary transforms over the medseg sample dict (see :mod:`medseg.data.base`).

Thin keyed wrappers around :mod:`medseg.transforms.functional`. Every random transform is a
MONAI ``Randomizable`` that draws only from its own ``self.R``, so
``Compose.set_random_state(seed=s)`` makes a sample byte-for-byte reproducible. None of them
reads or writes ``meta``.

Example:
    >>> t = ElasticDeformd(["image", "label"], sigma=10.0, points=3, order=[3, 0])
    >>> out = t.set_random_state(seed=0)(sample)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, RandomizableTransform, Transform
from monai.utils import convert_to_numpy, ensure_tuple_rep

from medseg.transforms import functional as F

#: dtype of every array key of the sample contract (medseg.data.base)
SAMPLE_DTYPES: dict[str, type] = {
    "image": np.float32,
    "label": np.int64,
    "instance": np.int32,
    "truth": np.int32,
    "weight": np.float32,
}


def _as_ids(x: Any) -> np.ndarray:
    """An id map (possibly a float tensor after MONAI resampling) as an int64 NumPy array."""
    a = convert_to_numpy(x)
    return a if np.issubdtype(a.dtype, np.integer) else np.rint(a).astype(np.int64)


def _centre_source(d: dict[Hashable, Any], instance_key: str) -> Any:
    """The map a crop's centre is drawn from: the instance map (or ``label``); on a slice without a lesion
    the sample's ``focus`` map when it has one (hard negatives: where the model saw a lesion, see
    :mod:`medseg.training.hardneg`). ``focus`` is taken out of ``d`` either way (it is not cropped)."""
    src = d[instance_key] if instance_key in d else d["label"]
    focus = d.pop("focus", None)
    return focus if focus is not None and not np.any(convert_to_numpy(src)) else src


class ElasticDeformd(RandomizableTransform, MapTransform):
    """Crop-relative elastic deformation: one random coarse-grid field over the array it is given.

    The grid spans whatever array arrives — after a crop, the crop — so the same ``sigma`` is a
    stronger deformation the smaller the crop. The U-Net recipe (grid over the whole slice) is
    :class:`RandElasticCropd`; this one is ``transforms.elastic.grid: crop``.

    Args:
        keys: keys of ``(C, H, W)`` arrays to deform with the same field.
        sigma: displacement standard deviation in pixels (0 = identity).
        points: control points per axis of the coarse grid.
        prob: probability of deforming a sample.
        order: spline order per key (3 = bicubic for images, 0 = nearest for label / instance).
        mode: border mode (``scipy.ndimage``).
        allow_missing_keys: skip absent keys (e.g. an optional ``truth``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 10.0,
        points: int = 3,
        prob: float = 1.0,
        order: int | Sequence[int] = 3,
        mode: str = "mirror",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma, self.points, self.mode = float(sigma), int(points), mode
        self.order = ensure_tuple_rep(order, len(self.keys))
        self._displacement = np.zeros((2, self.points, self.points))

    def randomize(self, data: Any = None) -> None:
        """Draw whether to deform and, if so, the control-point displacements from ``self.R``."""
        super().randomize(None)
        if self._do_transform:
            self._displacement = F.elastic_displacement(self.R, self.sigma, self.points)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        pairs = list(self.key_iterator(d, self.order))
        out = F.elastic_deform(
            [convert_to_numpy(d[k]) for k, _ in pairs], self._displacement, [o for _, o in pairs], self.mode
        )
        d.update({k: a for (k, _), a in zip(pairs, out)})
        return d


class BorderWeightd(MapTransform):
    """Add ``weight`` (float32 ``(1, H, W)``): the U-Net border weight map of the instance map.

    Run it after the geometric augmentation so the weights match the deformed mask. With
    ``w0 = 0`` and ``class_balance = False`` it writes a weight of ones.

    Args:
        instance_key: ``(1, H, W)`` instance map.
        label_key: ``(1, H, W)`` class map.
        weight_key: the key written.
        w0, sigma, class_balance: see :func:`medseg.transforms.functional.border_weight_map`.
    """

    def __init__(
        self,
        instance_key: str = "instance",
        label_key: str = "label",
        weight_key: str = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        class_balance: bool = True,
    ) -> None:
        super().__init__([instance_key, label_key])
        self.instance_key, self.label_key, self.weight_key = instance_key, label_key, weight_key
        self.w0, self.sigma, self.class_balance = float(w0), float(sigma), class_balance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = _as_ids(d[self.label_key])
        if self.w0 == 0 and not self.class_balance:  # weight map off: uniform weights
            d[self.weight_key] = np.ones(label.shape, np.float32)
            return d
        w = F.border_weight_map(
            _as_ids(d[self.instance_key])[0], label[0], self.w0, self.sigma, self.class_balance
        )
        d[self.weight_key] = w[None]
        return d


class RandCropAroundLesiond(Randomizable, MapTransform):
    """Random ``size`` crop, centred near a lesion with probability ``lesion_prob``.

    With probability ``lesion_prob`` the centre is a random pixel of a randomly chosen instance
    plus a uniform jitter of up to ``jitter · size`` pixels per axis (so lesions are not always in
    the middle, yet stay inside the crop since ``jitter < 0.5``); otherwise (or on a slice without
    lesions) the window is placed uniformly anywhere in the image; a slice without lesions that has a
    ``focus`` map (hard negatives) is treated as if its focus blobs were lesions. A window is moved to lie inside
    the image; an image smaller than ``size`` is padded with 0 (image and labels alike).
    Hand-written because MONAI's ``RandCropByPosNegLabeld`` weights centres by lesion area and has
    no jitter.

    Args:
        keys: keys of ``(C, H, W)`` arrays cropped with the same window.
        size: ``(h, w)`` crop size.
        lesion_prob: probability of a lesion-centred crop.
        jitter: maximum centre offset as a fraction of ``size`` (0 ≤ jitter < 0.5).
        instance_key: instance map the lesions are taken from (falls back to the ``label`` map).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: Sequence[int],
        lesion_prob: float = 0.8,
        jitter: float = 0.25,
        instance_key: str = "instance",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"crop size must be two positive ints (h, w), got {list(size)}")
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"crop jitter must be in [0, 0.5), got {jitter}")
        if not 0.0 <= lesion_prob <= 1.0:
            raise ValueError(f"lesion_prob must be in [0, 1], got {lesion_prob}")
        self.size = (int(size[0]), int(size[1]))
        self.lesion_prob, self.jitter, self.instance_key = float(lesion_prob), float(jitter), instance_key

    def randomize(self, data: np.ndarray) -> None:
        """Draw ``self._start`` from the ``(H, W)`` instance map ``data``."""
        shape = data.shape
        centre: list[int] | None = None
        if self.R.rand() < self.lesion_prob:
            flat = data.ravel()
            fg = np.flatnonzero(flat)
            if fg.size:
                ids = np.unique(flat[fg])
                pix = np.flatnonzero(flat == ids[self.R.randint(len(ids))])
                yx = np.unravel_index(pix[self.R.randint(pix.size)], shape)
                # integer jitter: avoids float rounding that could differ across platforms
                centre = [
                    int(c) + self.R.randint(-int(self.jitter * s), int(self.jitter * s) + 1)
                    for c, s in zip(yx, self.size)
                ]
        if centre is None:  # uniform over every window position (the centre is not drawn from lesions)
            centre = [self.R.randint(max(n - s, 0) + 1) + s // 2 for n, s in zip(shape, self.size)]
        self._start = [F.crop_start(n, s, c) for n, s, c in zip(shape, self.size, centre)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        src = _centre_source(d, self.instance_key)
        self.randomize(_as_ids(src)[0])
        for key in self.key_iterator(d):
            d[key] = F.crop_or_pad(convert_to_numpy(d[key]), self._start, self.size, 0)
        return d


class RandElasticCropd(RandCropAroundLesiond):
    """U-Net elastic deformation at the paper's scale, computed only for a training crop.

    The coarse ``points × points`` grid is laid over the whole slice (``extent=None``; the U-Net
    paper's grid spans its whole 572×572 input tile) or over ``extent`` pixels centred on the
    crop, never over the crop itself: a 128² crop of a 512² slice is deformed by exactly the
    crop's window of the whole slice's field (:func:`~medseg.transforms.functional.elastic_field`),
    and only the crop's pixels are resampled. One field for every key. The window is drawn as
    :class:`RandCropAroundLesiond` draws it, on the undeformed instance map.

    Randomness, in order, from ``self.R``: whether to deform (``prob``), the ``(2, points, points)``
    displacements N(0, sigma²) px (always drawn, so a seed gives the same field whatever the crop
    size), then the window.

    Args:
        keys: keys of ``(C, H, W)`` arrays to crop and deform with one field.
        size: ``(h, w)`` crop; None = the whole slice (no crop).
        lesion_prob, jitter, instance_key: as in :class:`RandCropAroundLesiond`.
        sigma: displacement standard deviation in pixels of the training grid (U-Net: 10).
        points: control points per axis (U-Net: 3).
        prob: probability of deforming (else the window is only cut).
        order: spline order per key (3 for images, 0 for id maps).
        extent: ``(h, w)`` pixels the grid spans, centred on the crop; None = the whole slice.
        mode: border mode (``scipy.ndimage``) for positions the field moves outside the slice.
        allow_missing_keys: skip absent keys (e.g. an optional ``truth``).
        defer_margin: the accelerator path (``transforms.accelerator``): do not warp here; cut the
            window grown by this many pixels on each side (mirrored beyond the slice, as the warp's
            border mode) and add what the device needs to warp it — ``elastic_wy`` ``(h, P)`` and
            ``elastic_wx`` ``(w, Q)`` (:func:`~medseg.transforms.functional.spline_axis_weights`)
            and ``elastic_disp`` ``(2, P, Q)`` (zeros when not deforming).
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: Sequence[int] | None,
        lesion_prob: float = 0.8,
        jitter: float = 0.25,
        sigma: float = 10.0,
        points: int = 3,
        prob: float = 1.0,
        order: int | Sequence[int] = 3,
        extent: Sequence[int] | None = None,
        mode: str = "mirror",
        instance_key: str = "instance",
        allow_missing_keys: bool = False,
        defer_margin: int | None = None,
    ) -> None:
        super().__init__(keys, size if size is not None else (1, 1), lesion_prob, jitter, instance_key,
                         allow_missing_keys)
        self.defer_margin = defer_margin
        self.whole = size is None
        if extent is not None and (len(extent) != 2 or min(extent) < 2):
            raise ValueError(f"elastic grid extent must be two ints >= 2 (h, w), got {list(extent)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"elastic prob must be in [0, 1], got {prob}")
        self.sigma, self.points, self.prob, self.mode = float(sigma), int(points), float(prob), mode
        self.extent = None if extent is None else (int(extent[0]), int(extent[1]))
        self.order = ensure_tuple_rep(order, len(self.keys))
        self._deform = False
        self._displacement = np.zeros((2, self.points, self.points))

    def randomize(self, data: np.ndarray) -> None:
        """Draw whether to deform, the displacements, then the window on the ``(H, W)`` instance map."""
        self._deform = self.R.rand() < self.prob
        self._displacement = F.elastic_displacement(self.R, self.sigma, self.points)
        if self.whole:
            self._start = [0, 0]
        else:
            super().randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pairs = list(self.key_iterator(d, self.order))
        arrays = [convert_to_numpy(d[k]) for k, _ in pairs]
        src = _centre_source(d, self.instance_key)
        ids = _as_ids(src)
        shape = ids.shape[-2:]
        size = shape if self.whole else self.size
        if shape[0] < size[0] or shape[1] < size[1]:  # a slice smaller than the crop: zero-pad it first
            canvas = (max(shape[0], size[0]), max(shape[1], size[1]))
            start = [F.crop_start(n, c, None) for n, c in zip(shape, canvas)]
            arrays = [F.crop_or_pad(a, start, canvas, 0) for a in arrays]
            ids = F.crop_or_pad(ids, start, canvas, 0)
            shape = canvas
        self.randomize(ids[0])
        grid, origin = shape, (0.0, 0.0)
        if self.extent is not None:  # centred on the crop
            grid = self.extent
            origin = tuple(s + (c - 1) / 2.0 - (e - 1) / 2.0 for s, c, e in zip(self._start, size, grid))
        if self.defer_margin is not None:
            m = int(self.defer_margin)
            win = [(s, s + n + 2 * m) for s, n in zip(self._start, size)]  # in the padded slice's pixels
            out = [np.pad(a, [(0, 0)] * (a.ndim - 2) + [(m, m), (m, m)], mode="reflect")[
                ..., win[0][0] : win[0][1], win[1][0] : win[1][1]] for a in arrays]
            d["elastic_wy"], d["elastic_wx"] = (
                F.spline_axis_weights(self.points, grid[ax], self._start[ax], size[ax], origin[ax]).astype(np.float32)
                for ax in range(2))
            d["elastic_disp"] = (self._displacement if self._deform else np.zeros_like(self._displacement)
                                 ).astype(np.float32)
        elif not self._deform:
            out = [F.crop_or_pad(a, self._start, size, 0) for a in arrays]
        else:
            field = F.elastic_field(self._displacement, grid, self._start, size, origin)
            out = F.elastic_warp(arrays, field, self._start, [o for _, o in pairs], self.mode)
        d.update({k: a for (k, _), a in zip(pairs, out)})
        return d


class DrawDeviceAugmentd(RandomizableTransform):
    """Draw the flips and intensity changes that :class:`~medseg.transforms.accelerated.DeviceAugment`
    applies on the device, from this sample's seeded generator (so resume replays them).

    Adds ``device_aug`` float32 ``[flip_y, flip_x, scale, shift]`` (the image becomes
    ``image · (1 + scale) + shift``, as MONAI's ``RandScaleIntensityd`` / ``RandShiftIntensityd``) and
    ``device_noise_seed`` (int64) for the Gaussian noise.

    Args:
        flip_prob: probability of each flip (``transforms.flip_prob``).
        intensity_scale: ``scale`` ~ U(−s, s) (``transforms.intensity_scale``; 0 = none).
        intensity_shift: ``shift`` ~ U(−o, o) (``transforms.intensity_shift``; 0 = none).
    """

    def __init__(self, flip_prob: float, intensity_scale: float = 0.0, intensity_shift: float = 0.0) -> None:
        RandomizableTransform.__init__(self, 1.0)
        self.flip_prob, self.scale, self.shift = float(flip_prob), float(intensity_scale), float(intensity_shift)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        flips = self.R.rand(2) < self.flip_prob
        scale = self.R.uniform(-self.scale, self.scale) if self.scale > 0 else 0.0
        shift = self.R.uniform(-self.shift, self.shift) if self.shift > 0 else 0.0
        d["device_aug"] = np.array([*flips.astype(np.float32), scale, shift], dtype=np.float32)
        d["device_noise_seed"] = np.array([self.R.randint(0, 2**31 - 1)], dtype=np.int64)
        return d


class EnsureSampled(Transform):
    """Final conversion to the sample contract: contiguous NumPy arrays of the contract's dtypes.

    Turns MONAI ``MetaTensor`` / tensors back into plain arrays, rounds id maps (resampled as
    floats by MONAI) to integers, and clips ``image`` to [0, 1] (bicubic overshoot and intensity
    augmentation may leave it). Keys other than the array keys (``meta``) are passed through
    untouched; an array key must be ``(C, H, W)``.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, dtype in SAMPLE_DTYPES.items():
            if key not in d or d[key] is None:
                continue
            a = convert_to_numpy(d[key])
            if a.ndim != 3:
                raise ValueError(f"sample key {key!r} must be (C, H, W), got shape {a.shape}")
            if key == "image":
                a = np.clip(a, 0.0, 1.0)
            elif not np.issubdtype(a.dtype, np.integer) and dtype is not np.float32:
                a = np.rint(a)
            d[key] = np.ascontiguousarray(a, dtype=dtype)
        return d
