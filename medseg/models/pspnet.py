"""PSPNet (Zhao et al., CVPR 2017): pyramid pooling on an atrous ResNet.

Registered as ``pspnet``. The ResNet (:mod:`medseg.models.resnet`) runs at output stride 8
(layer3 dilated by 2, layer4 by 4; no multi-grid, as in the paper). The pyramid pooling module
average-pools the final features to 1×1, 2×2, 3×3 and 6×6 bins, reduces each to
``C / len(bins)`` channels (1×1 conv, BN, ReLU), upsamples them bilinearly and concatenates
them with the features; a 3×3 conv (``C / 4`` channels, BN, ReLU), dropout 0.1 and a 1×1
classifier give the stride-8 scores, upsampled bilinearly to the input. The paper's deep
supervision is an auxiliary head on layer3 ("mid": 3×3 conv to ``C_mid / 4``, BN, ReLU, dropout
0.1, 1×1 classifier) whose cross-entropy is added with weight 0.4 during training
(``extra_loss``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.blocks import ConvBNReLU, PooledBatchNorm2d, init_he, resize_to
from medseg.models.resnet import build_resnet
from medseg.registry import MODELS


class PyramidPooling(nn.Module):
    """The pyramid pooling module: features ⊕ upsampled 1×1-conv'd adaptive average pools.

    Args:
        in_channels: feature channels ``C``.
        bins: output sizes of the adaptive average pools (the paper: 1, 2, 3, 6).

    Shapes:
        ``(B, C, h, w)`` → ``(B, C + len(bins) · (C // len(bins)), h, w)``.
    """

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if not bins or min(bins) < 1:
            raise ValueError(f"pyramid bins must be positive sizes, got {bins}")
        self.bins = tuple(bins)
        reduced = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, reduced, 1, bias=False),
                # a 1×1 bin holds one value per image: its BN must survive a batch of one
                PooledBatchNorm2d(reduced),
                nn.ReLU(inplace=True),
            )
            for b in self.bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` → ``(B, out_channels, h, w)``."""
        return torch.cat([x] + [resize_to(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


@MODELS.register("pspnet")
class PSPNet(nn.Module):
    """PSPNet: atrous ResNet (output stride 8) → pyramid pooling → 3×3 conv → classifier.

    Args:
        in_channels: image channels.
        num_classes: output classes (background included).
        depth: ResNet depth (18, 34, 50, 101; the paper uses 50 / 101).
        output_stride: 8 (the paper) or 16.
        bins: pyramid pooling bin sizes.
        dropout: dropout before the classifiers (0.1).
        aux_weight: weight of the auxiliary layer3 cross-entropy (0.4); 0 builds no auxiliary head.
        pretrained_backbone: a LOCAL torchvision-style ResNet state dict (never downloaded), or None.

    Shapes:
        ``forward``: ``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``;
        ``extra_loss(label)``: label ``(B, 1, H, W)`` int64 → scalar, from the last training forward.

    Example:
        >>> net = PSPNet(3, 2, depth=18)
        >>> net(torch.zeros(2, 3, 97, 131)).shape
        torch.Size([2, 2, 97, 131])
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"depth": 18}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 50,
        output_stride: int = 8,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        pretrained_backbone: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_resnet(depth, in_channels, output_stride, multi_grid=(1,))
        if pretrained_backbone:
            self.backbone.load_pretrained(pretrained_backbone)
        c = self.backbone.out_channels
        self.ppm = PyramidPooling(c, tuple(bins))
        self.head = nn.Sequential(
            ConvBNReLU(self.ppm.out_channels, c // 4, 3), nn.Dropout2d(dropout), nn.Conv2d(c // 4, num_classes, 1)
        )
        self.aux_weight = aux_weight
        self.aux_head: nn.Module | None = None
        if aux_weight:
            cm = self.backbone.mid_channels
            self.aux_head = nn.Sequential(
                ConvBNReLU(cm, cm // 4, 3), nn.Dropout2d(dropout), nn.Conv2d(cm // 4, num_classes, 1)
            )
        for part in (self.ppm, self.head, self.aux_head):
            if part is not None:
                init_he(part)
        self._aux_logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes, H, W)``."""
        feats = self.backbone(x)
        logits = resize_to(self.head(self.ppm(feats["out"])), x.shape[-2:])
        self._aux_logits = self.aux_head(feats["mid"]) if self.training and self.aux_head is not None else None
        return logits

    def extra_loss(self, label: Tensor) -> Tensor:
        """``aux_weight`` × cross-entropy of the layer3 head from the last training forward.

        Args:
            label: ``(B, 1, H, W)`` (or ``(B, H, W)``) int64 class map at the input size.

        Returns:
            A scalar tensor (0 without an auxiliary head).

        Raises:
            RuntimeError: no training-mode forward preceded the call.
        """
        if self.aux_head is None:
            return next(self.parameters()).new_zeros(())
        if self._aux_logits is None:
            raise RuntimeError("PSPNet.extra_loss needs a training-mode forward first (model.train())")
        if label.dim() == 4:
            label = label[:, 0]
        logits = resize_to(self._aux_logits.float(), label.shape[-2:])
        return self.aux_weight * F.cross_entropy(logits, label)
