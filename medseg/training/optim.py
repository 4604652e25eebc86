"""The optimizer and the learning-rate schedule, from ``train.*``."""

from __future__ import annotations

import math
from typing import Any

import torch

from medseg.config import TrainConfig
from medseg.runtime import TrainingError

__all__ = ["build_optimizer", "lr_factor"]


def build_optimizer(t: TrainConfig, params: Any, fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD (with ``train.momentum``) at ``train.lr`` and ``train.weight_decay``.

    ``fused=True`` (the Trainer's choice on CUDA) takes torch's fused kernels: one launch for all
    parameters, and a ``GradScaler`` passes them its found-inf flag on the device instead of reading
    it back on every step.
    """
    kw: dict[str, Any] = {"fused": True} if fused else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **kw)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **kw)
    raise TrainingError(f"train.optimizer must be adam or sgd, got {t.optimizer!r}")


def lr_factor(schedule: str, step: int, total: int, power: float = 0.9) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: poly ``(1 − step/total)^power``, cosine or constant."""
    frac = min(step / max(total, 1), 1.0)
    if schedule == "poly":
        return (1.0 - frac) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "constant":
        return 1.0
    raise TrainingError(f"train.schedule must be poly, cosine or constant, got {schedule!r}")
