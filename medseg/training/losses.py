"""Segmentation losses, registered by name in :data:`medseg.registry.LOSSES`.

The loss contract: ``loss(logits, label, weight=None) -> scalar Tensor`` with

* ``logits`` float ``(B, K, H, W)`` (raw scores, any float dtype),
* ``label`` int64 ``(B, 1, H, W)`` class ids in ``[0, K)`` (or ``ignore_index``); ``(B, H, W)`` is
  accepted too,
* ``weight`` float ``(B, 1, H, W)`` per-pixel weights (the U-Net border weight map) or ``None``.

Each loss is a plain function with a thin ``nn.Module`` around it; the module's constructor
arguments are the YAML ``loss.params`` (type-hinted, checked by the registry). Every loss computes
in float32 with autocast switched off, so it is safe under mixed precision.

Example:
    >>> from medseg.training.losses import build_loss
    >>> loss_fn = build_loss("weighted_ce_dice", {"dice_weight": 0.5})
    >>> loss = loss_fn(logits, batch["label"], batch.get("weight"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.registry import LOSSES

__all__ = [
    "LOSSES",
    "DiceLoss",
    "WeightedCEDiceLoss",
    "WeightedCELoss",
    "build_loss",
    "check_label_range",
    "dice_loss",
    "labels_checked",
    "weighted_ce",
]


_LABELS_CHECKED: ContextVar[bool] = ContextVar("medseg_labels_checked", default=False)


@contextlib.contextmanager
def labels_checked() -> Iterator[None]:
    """Inside the block the losses skip their label-range check: the caller checked the labels already
    (the Trainer does, on the host batch before it is copied, so the check never waits on the device)."""
    token = _LABELS_CHECKED.set(True)
    try:
        yield
    finally:
        _LABELS_CHECKED.reset(token)


def check_label_range(label: Tensor, k: int, ignore_index: int | None = None) -> None:
    """Raise ``ValueError`` unless every class id of ``label`` is in ``[0, k)`` (or ``ignore_index``).

    One host read of a reduction: on a device tensor it waits for the device.
    """
    bad = (label < 0) | (label >= k)
    if ignore_index is not None:
        bad &= label != ignore_index
    if bool(bad.any()):
        raise ValueError(
            f"label holds class ids outside [0, {k}) (logits have K={k} classes"
            + (f", ignore_index={ignore_index}" if ignore_index is not None else "")
            + f"): found {sorted(label[bad].unique().tolist())[:5]}"
        )


def _prepare(
    logits: Tensor, label: Tensor, weight: Tensor | None, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check shapes and label range; return float32 logits, ``(B, 1, H, W)`` long label, weight."""
    if logits.ndim != 4:
        raise ValueError(f"loss expects logits of shape (B, K, H, W), got {tuple(logits.shape)}")
    b, k, h, w = logits.shape
    if label.ndim == 3:
        label = label.unsqueeze(1)
    if tuple(label.shape) != (b, 1, h, w):
        raise ValueError(
            f"loss expects label of shape (B, 1, H, W) = {(b, 1, h, w)} to match logits "
            f"{tuple(logits.shape)}, got {tuple(label.shape)}"
        )
    if label.is_floating_point():
        raise ValueError(f"loss expects integer class ids in label, got dtype {label.dtype}")
    label = label.long()
    # One check (one device sync) so a bad label gives a clear error instead of a CUDA assert;
    # skipped inside labels_checked() (the caller checked on the host).
    if not _LABELS_CHECKED.get():
        check_label_range(label, k, ignore_index)
    if weight is not None:
        if weight.ndim == 3:
            weight = weight.unsqueeze(1)
        if tuple(weight.shape) != (b, 1, h, w):
            raise ValueError(
                f"loss expects weight of shape (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(weight.shape)}"
            )
        weight = weight.float()
    return logits.float(), label, weight


def weighted_ce(
    logits: Tensor, label: Tensor, weight: Tensor | None = None, ignore_index: int | None = None
) -> Tensor:
    """Border-weighted cross-entropy (Ronneberger et al. 2015): ``mean_x w(x) · (−log p_ℓ(x)(x))``.

    The mean runs over the pixels that are not ``ignore_index`` (the weights are not used as the
    normaliser, so ``w`` scales each pixel's share as in the paper's energy). ``weight=None`` is
    plain cross-entropy.

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        label: ``(B, 1, H, W)`` int64 class ids.
        weight: ``(B, 1, H, W)`` per-pixel weights, or ``None``.
        ignore_index: a label value that contributes nothing (and is not counted in the mean).

    Returns:
        A float32 scalar.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _ce(*_prepare(logits, label, weight, ignore_index), ignore_index)


def _ce(logits: Tensor, label: Tensor, weight: Tensor | None, ignore_index: int | None) -> Tensor:
    """The weighted cross-entropy on already checked float32 inputs."""
    target = label[:, 0]
    ce = F.cross_entropy(
        logits, target, reduction="none", ignore_index=-100 if ignore_index is None else ignore_index
    )
    if weight is not None:
        ce = ce * weight[:, 0]
    if ignore_index is None:
        return ce.mean()
    # Every pixel ignored gives 0 (not NaN), so an all-ignored crop cannot poison training.
    return ce.sum() / (target != ignore_index).sum().clamp_min(1)


def dice_loss(
    logits: Tensor,
    label: Tensor,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch: bool = True,
    ignore_index: int | None = None,
) -> Tensor:
    """Soft Dice loss on softmax probabilities, averaged over classes.

    Per class c: ``1 − (2 Σ p_c g_c + smooth) / (Σ p_c + Σ g_c + smooth)``. With ``batch=True``
    (the default) the sums run over the whole batch, so a slice without any lesion does not get a
    per-sample Dice of ~0 for a few false-positive pixels (per-sample Dice on lesion data is
    dominated by such empty slices and trains unstably); ``batch=False`` averages per-sample
    losses. MONAI's :class:`monai.losses.DiceLoss` does the arithmetic: it fits this contract
    exactly (softmax, one-hot of a ``(B, 1, H, W)`` label, ``include_background``, ``batch``,
    ``ignore_index``).

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        label: ``(B, 1, H, W)`` int64 class ids.
        include_background: also score class 0.
        smooth: added to numerator and denominator (an empty class predicted empty scores 1).
        batch: pool the sums over the batch (else per sample, then averaged).
        ignore_index: a label value whose pixels are left out of all sums.

    Returns:
        A float32 scalar in [0, 1].
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits, label, _ = _prepare(logits, label, None, ignore_index)
        return _dice_module(include_background, smooth, batch, ignore_index)(logits, label)


def _dice_module(include_background: bool, smooth: float, batch: bool, ignore_index: int | None) -> nn.Module:
    """MONAI DiceLoss configured for the medseg contract."""
    from monai.losses import DiceLoss as MonaiDiceLoss  # MONAI takes seconds to import: only when used

    return MonaiDiceLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch,
        ignore_index=ignore_index,
    )


@LOSSES.register("weighted_ce")
class WeightedCELoss(nn.Module):
    """Module form of :func:`weighted_ce`.

    Args:
        ignore_index: a label value that contributes nothing to the loss.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
        """``(B, K, H, W)`` logits, ``(B, 1, H, W)`` label, optional ``(B, 1, H, W)`` weight → scalar."""
        return weighted_ce(logits, label, weight, self.ignore_index)


@LOSSES.register("dice")
class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`; the border weight map is not used by Dice.

    Args:
        include_background: also score class 0.
        smooth: added to numerator and denominator.
        batch: pool the Dice sums over the batch (True) or average per-sample losses (False).
        ignore_index: a label value whose pixels are left out.
    """

    def __init__(
        self,
        include_background: bool = False,
        smooth: float = 1e-5,
        batch: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = _dice_module(include_background, smooth, batch, ignore_index)

    def forward(self, logits: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
        """``(B, K, H, W)`` logits, ``(B, 1, H, W)`` label → scalar; ``weight`` is ignored."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, label, _ = _prepare(logits, label, None, self.ignore_index)
            return self.dice(logits, label)


@LOSSES.register("weighted_ce_dice")
class WeightedCEDiceLoss(nn.Module):
    """``ce_weight · weighted_ce + dice_weight · dice``.

    Args:
        ce_weight: factor of the (border-weighted) cross-entropy term.
        dice_weight: factor of the soft Dice term.
        include_background: Dice also scores class 0.
        smooth: Dice smoothing.
        batch: batch-global Dice (see :func:`dice_loss`).
        ignore_index: a label value left out of both terms.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        smooth: float = 1e-5,
        batch: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ignore_index = ignore_index
        self.dice = _dice_module(include_background, smooth, batch, ignore_index)

    def forward(self, logits: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
        """``(B, K, H, W)`` logits, ``(B, 1, H, W)`` label, optional ``(B, 1, H, W)`` weight → scalar."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, label, weight = _prepare(logits, label, weight, self.ignore_index)
            ce = _ce(logits, label, weight, self.ignore_index)
            return self.ce_weight * ce + self.dice_weight * self.dice(logits, label)


def build_loss(name: str, params: dict[str, Any] | None = None) -> nn.Module:
    """Build the registered loss ``name`` with YAML ``loss.params``.

    Raises:
        medseg.registry.RegistryError: an unknown name (the message lists the valid ones) or a
            parameter the loss does not take / of the wrong type (the message names the key).
    """
    return LOSSES.build(name, params)
