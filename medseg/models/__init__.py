"""Segmentation models, registered by name in :data:`medseg.registry.MODELS`.

The model contract: ``factory(in_channels: int, num_classes: int, **params) -> nn.Module`` whose
``forward(x)`` takes ``(B, in_channels, H, W)`` for **any** H, W and returns logits
``(B, num_classes, H, W)`` at the input's resolution. A model with an auxiliary training loss
(e.g. STDC's detail guidance) exposes ``extra_loss(label) -> Tensor`` computed from its last
training forward; the Trainer adds it when present.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# importing the modules registers their models (one line per model file)
from medseg.models import (
    deeplab,  # noqa: E402,F401
    deeplabv1,  # noqa: E402,F401
    fcn,  # noqa: E402,F401
    pspnet,  # noqa: E402,F401
    stdc,  # noqa: E402,F401
    unet,  # noqa: E402,F401
)
from medseg.registry import MODELS


def build_model(name: str, in_channels: int, num_classes: int, params: dict[str, Any] | None = None) -> nn.Module:
    """Build the registered model ``name``; ``params`` are checked against its signature."""
    return MODELS.build(name, params, in_channels=in_channels, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "build_model", "count_parameters"]
