"""Segmentation models, registered by name in :data:`medseg.registry.MODELS`.

The model contract: ``factory(in_channels: int, num_classes: int, **params) -> nn.Module`` whose
``forward(x)`` takes ``(B, in_channels, H, W)`` for **any** H, W and returns logits
``(B, num_classes, H, W)`` at the input's resolution. A model with an auxiliary training loss
(e.g. STDC's detail guidance) exposes ``extra_loss(label) -> Tensor`` computed from its last
training forward; the Trainer adds it when present.

Every model is built with its 4-D weights in the ``channels_last`` (NHWC) memory layout: oneDNN's
convolutions on the CPU and cuDNN's under mixed precision run fastest in it (the quick-start U-Net:
0.13 instead of 0.17 s per training step on one core, whole-slice inference 1.6× faster on one
core and 1.9× on two; ``benchmarks/bench_layout.py``). Only the layout changes: the values, the
state dict's keys and shapes, and what a checkpoint holds are the same.
"""

from __future__ import annotations

from typing import Any

import torch
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


def build_model(name: str, in_channels: int, num_classes: int, params: dict[str, Any] | None = None,
                channels_last: bool = True) -> nn.Module:
    """Build the registered model ``name``; ``params`` are checked against its signature.

    ``channels_last``: its 4-D weights in the NHWC layout (the module doc); False keeps PyTorch's default.
    """
    net = MODELS.build(name, params, in_channels=in_channels, num_classes=num_classes)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "build_model", "count_parameters"]
