"""Preprocessing and augmentation of the sample dict, built from :class:`~medseg.config.TransformsConfig`.

:func:`build_transforms` returns a MONAI ``Compose``. Training:
lesion-centred crop (``crop_size``) with the elastic deformation of the whole slice evaluated on it
(``transforms.elastic.grid: slice``, the U-Net recipe) → flips / rotation → intensity
augmentation → border weight map (or a weight of ones) → conversion to the sample contract.
Evaluation: weight map + conversion only — no randomness, no crop (whole slices), ``truth``
passed through.

Reproducibility: every random transform is a MONAI ``Randomizable`` drawing only from its own
``self.R``; ``compose.set_random_state(seed=s)`` before a sample makes it byte-identical for the
same ``s``. ``meta`` is never touched and no ``*_meta_dict`` key is added; arrays come out as
NumPy (float32 image / weight, int64 label, int32 instance / truth), each ``(C, H, W)``.

Example:
    >>> from medseg.config import TransformsConfig
    >>> t = build_transforms(TransformsConfig(crop_size=[256, 256]), train=True)
    >>> out = t.set_random_state(seed=1234)(sample)
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Transform,
)

from medseg.config import ConfigError, TransformsConfig
from medseg.transforms.dictionary import (
    SAMPLE_DTYPES,
    BorderWeightd,
    DrawDeviceAugmentd,
    ElasticDeformd,
    EnsureSampled,
    RandCropAroundLesiond,
    RandElasticCropd,
)
from medseg.transforms.functional import (
    border_weight_map,
    class_balance_weights,
    crop_or_pad,
    elastic_deform,
    elastic_displacement,
    elastic_field,
    elastic_warp,
    two_nearest_distances,
)

__all__ = [
    "SAMPLE_DTYPES",
    "BorderWeightd",
    "DrawDeviceAugmentd",
    "ElasticDeformd",
    "EnsureSampled",
    "RandCropAroundLesiond",
    "RandElasticCropd",
    "border_weight_map",
    "build_transforms",
    "class_balance_weights",
    "crop_or_pad",
    "elastic_deform",
    "elastic_displacement",
    "elastic_field",
    "elastic_warp",
    "two_nearest_distances",
]

#: keys moved by geometric augmentation (``truth`` is optional); ``weight`` is computed afterwards
SPATIAL_KEYS = ["image", "label", "instance", "truth"]
#: interpolation per spatial key: images smooth, id maps nearest so no new ids appear
_ROTATE_MODES = ["bilinear", "nearest", "nearest", "nearest"]
_ELASTIC_ORDERS = [3, 0, 0, 0]


def _check(cfg: TransformsConfig) -> None:
    """Reject values no transform could use, naming the config key."""
    for key in ("lesion_crop_prob", "flip_prob", "rotate_prob"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"transforms.{key} = {getattr(cfg, key)} must be in [0, 1]")
    if not 0.0 <= cfg.elastic.prob <= 1.0:
        raise ConfigError(f"transforms.elastic.prob = {cfg.elastic.prob} must be in [0, 1]")
    if cfg.crop_size is not None and (len(cfg.crop_size) != 2 or min(cfg.crop_size) < 1):
        raise ConfigError(f"transforms.crop_size = {cfg.crop_size} must be [h, w] positive pixels or null")
    if cfg.elastic.enabled and (cfg.elastic.points < 2 or cfg.elastic.sigma < 0):
        raise ConfigError("transforms.elastic needs points >= 2 and sigma >= 0")
    if cfg.elastic.grid == "extent" and (len(cfg.elastic.extent) != 2 or min(cfg.elastic.extent) < 2):
        raise ConfigError(f"transforms.elastic.extent = {cfg.elastic.extent} must be [h, w] pixels (>= 2 each)")
    if cfg.accelerator and (cfg.crop_size is None or (cfg.rotate_prob > 0 and cfg.rotate_range_deg > 0)
                            or (cfg.elastic.enabled and cfg.elastic.grid == "crop")):
        raise ConfigError("transforms.accelerator needs transforms.crop_size (a batch of equal crops), no rotation "
                          "(transforms.rotate_prob: 0) and transforms.elastic.grid slice or extent")
    for key in ("intensity_scale", "intensity_shift", "noise_std"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"transforms.{key} = {getattr(cfg, key)} must be >= 0")
    wm = cfg.weight_map
    if wm.enabled and (wm.sigma <= 0 or wm.w0 < 0):
        raise ConfigError("transforms.weight_map needs sigma > 0 and w0 >= 0")


def build_transforms(cfg: TransformsConfig, train: bool) -> Compose:
    """The sample pipeline for training (``train=True``) or evaluation.

    Args:
        cfg: the ``transforms`` section of the config.
        train: augment (random) when True; evaluation is deterministic and never crops.

    Returns:
        A MONAI ``Compose`` mapping a sample dict to a sample dict with ``weight`` added. Call
        ``set_random_state(seed=s)`` before each sample for reproducible augmentation.

    Raises:
        ConfigError: a value out of range, naming the key.
    """
    _check(cfg)
    wm = cfg.weight_map
    # weight map off = w0 0, no class balance: a weight of ones (validation loss still works)
    weight = BorderWeightd(
        w0=wm.w0 if wm.enabled else 0.0,
        sigma=wm.sigma,
        class_balance=wm.class_balance and wm.enabled,
    )
    if not train:
        return Compose([weight, EnsureSampled()])

    ts: list[Transform] = []
    el = cfg.elastic
    elastic = el.enabled and el.prob > 0 and el.sigma > 0
    if cfg.accelerator:
        # the device warps, flips, changes intensity and adds the weight map (transforms.accelerated);
        # here: the crop grown by the warp's margin, and every random draw
        from medseg.transforms.accelerated import device_margin

        ts.append(
            RandElasticCropd(
                SPATIAL_KEYS, cfg.crop_size, cfg.lesion_crop_prob, sigma=el.sigma if elastic else 0.0,
                points=el.points, prob=el.prob if elastic else 0.0, order=_ELASTIC_ORDERS,
                extent=el.extent if el.grid == "extent" else None, allow_missing_keys=True,
                defer_margin=device_margin(cfg),
            )
        )
        ts += [DrawDeviceAugmentd(cfg.flip_prob, cfg.intensity_scale, cfg.intensity_shift), EnsureSampled()]
        return Compose(ts).set_random_state(seed=0)
    if elastic and el.grid != "crop":
        # the paper's scale: the grid spans the slice (or an extent), evaluated on the crop only
        ts.append(
            RandElasticCropd(
                SPATIAL_KEYS, cfg.crop_size, cfg.lesion_crop_prob, sigma=el.sigma, points=el.points,
                prob=el.prob, order=_ELASTIC_ORDERS, extent=el.extent if el.grid == "extent" else None,
                allow_missing_keys=True,
            )
        )
    elif cfg.crop_size is not None:
        ts.append(
            RandCropAroundLesiond(SPATIAL_KEYS, cfg.crop_size, cfg.lesion_crop_prob, allow_missing_keys=True)
        )
    if cfg.flip_prob > 0:
        ts += [
            RandFlipd(SPATIAL_KEYS, prob=cfg.flip_prob, spatial_axis=ax, allow_missing_keys=True)
            for ax in (0, 1)
        ]
    if cfg.rotate_prob > 0 and cfg.rotate_range_deg > 0:
        ts.append(
            RandRotated(
                SPATIAL_KEYS,
                range_x=math.radians(cfg.rotate_range_deg),
                prob=cfg.rotate_prob,
                mode=_ROTATE_MODES,
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    if elastic and el.grid == "crop":  # crop-relative (the grid spans the crop)
        ts.append(
            ElasticDeformd(
                SPATIAL_KEYS, el.sigma, el.points, el.prob, _ELASTIC_ORDERS, allow_missing_keys=True
            )
        )
    if cfg.intensity_scale > 0:
        ts.append(RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=1.0))
    if cfg.intensity_shift > 0:
        ts.append(RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=1.0))
    if cfg.noise_std > 0:
        ts.append(RandGaussianNoised("image", prob=1.0, std=cfg.noise_std))
    ts += [weight, EnsureSampled()]
    # seed every random transform's own generator now, so even an unseeded use is repeatable
    return Compose(ts).set_random_state(seed=0)
