"""DeepLab v1 "LargeFOV" (Chen et al., ICLR 2015): VGG-16 with atrous convolution.

Registered as ``deeplabv1``. Differences from VGG-16, as in the published prototxt:

* every max-pool is 3×3 with padding 1; pool4 and pool5 have stride 1, so the output stride is 8;
* conv5_1 … conv5_3 are dilated by 2 (they see the stride-8 grid as if it were stride 16);
* fc6 is a 3×3 convolution with dilation 12 and 1024 channels (the "large field of view"),
  fc7 a 1×1 convolution with 1024 channels, each followed by ReLU and dropout 0.5;
* a 1×1 classifier gives the stride-8 score map, upsampled bilinearly to the input size.

The fully-connected CRF of the paper is post-processing (:mod:`medseg.inference.crf`,
``inference.crf.enabled``), not part of the network.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.blocks import init_he
from medseg.models.vgg import VGG16Features
from medseg.registry import MODELS


@MODELS.register("deeplabv1")
class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV on a VGG-16 trunk.

    Args:
        in_channels: image channels.
        num_classes: output classes (background included).
        width: VGG first-block width (64 in the paper).
        fc_channels: channels of fc6 / fc7 (1024 in LargeFOV).
        fc6_dilation: atrous rate of the 3×3 fc6 (12 in LargeFOV).
        dropout: dropout after fc6 and fc7 (0.5).
        batch_norm: BN after every conv of the trunk and after fc6 / fc7 (not in the paper).

    Shapes:
        ``forward``: ``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``;
        ``score``: the same input → the stride-8 map ``(B, num_classes, ceil(H/8), ceil(W/8))``
        (each 3×3 / padding-1 stride-2 pool maps ``h`` to ``ceil(h / 2)``).

    Example:
        >>> net = DeepLabLargeFOV(3, 2, width=8, fc_channels=32)
        >>> net(torch.zeros(1, 3, 97, 131)).shape
        torch.Size([1, 2, 97, 131])
    """

    output_stride = 8

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"width": 4, "fc_channels": 16}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        fc_channels: int = 1024,
        fc6_dilation: int = 12,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = VGG16Features(
            in_channels,
            width=width,
            batch_norm=batch_norm,
            pool_kernel=3,
            pool_padding=1,
            pool_strides=(2, 2, 2, 1, 1),
            dilations=(1, 1, 1, 1, 2),
        )
        c5 = self.backbone.channels[-1]
        self.fc6 = nn.Conv2d(c5, fc_channels, 3, padding=fc6_dilation, dilation=fc6_dilation, bias=not batch_norm)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1, bias=not batch_norm)
        self.head = nn.Sequential(
            self.fc6,
            nn.BatchNorm2d(fc_channels) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            # Caffe's Dropout drops single activations, hence Dropout and not Dropout2d.
            nn.Dropout(dropout),
            self.fc7,
            nn.BatchNorm2d(fc_channels) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Conv2d(fc_channels, num_classes, 1)
        init_he(self.head)
        # the paper initialises the new classifier with N(0, 0.01²)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def score(self, x: Tensor) -> Tensor:
        """The stride-8 class score map (before upsampling)."""
        return self.classifier(self.head(self.backbone(x)[-1]))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes, H, W)`` (bilinear upsampling of the scores)."""
        return F.interpolate(self.score(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
