"""FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on VGG-16.

Registered as ``fcn8s``. VGG-16's fully-connected layers become convolutions (fc6: 7×7, 4096;
fc7: 1×1, 4096, each with ReLU and dropout 0.5) and score the stride-32 map; the scores are
upsampled ×2 by a learned transposed convolution and summed with a 1×1 score of pool4, upsampled
×2 again and summed with a score of pool3, then upsampled ×8 to the image. The transposed
convolutions start as bilinear interpolation and the two skip scorers start at zero, so the
untrained net begins as FCN-32s (the paper's initialisation).

Any input size, without the paper's 100-pixel padding: the input is zero-padded to a multiple of
32 (split evenly between the two sides), fc6 uses "same" padding (3) instead of the paper's
"valid" 7×7, and every transposed convolution is kernel ``2s`` / stride ``s`` / padding ``s/2``,
which maps an ``n``-pixel map to exactly ``s·n`` pixels and places the bilinear kernel on the
half-pixel grid of the pooling (coarse pixel ``j`` centred on fine coordinate ``s·j + (s−1)/2``).
So pool3, pool4 and the upsampled scores line up with no crop offsets, and the final ×8 score map
covers the padded input exactly; the padding is cropped away at the end.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.blocks import init_he
from medseg.models.vgg import VGG16Features
from medseg.registry import MODELS


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """``(channels, channels, k, k)`` weights of a per-channel bilinear upsampler (FCN's ``upsample_filt``)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


def _upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learned ×``factor`` upsampler initialised to bilinear interpolation (no bias, as in FCN)."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


@MODELS.register("fcn8s")
class FCN8s(nn.Module):
    """FCN-8s: VGG-16 scores from pool5 (through fc6/fc7), pool4 and pool3, fused by learned upsampling.

    Args:
        in_channels: image channels.
        num_classes: output classes (background included).
        width: VGG first-block width (64 in the paper).
        fc_channels: channels of fc6 / fc7 (4096 in the paper).
        fc6_kernel: odd kernel size of fc6 (7 in the paper: VGG's fc6 reshaped).
        dropout: dropout after fc6 and fc7 (0.5).
        batch_norm: BN after every conv of the trunk and after fc6 / fc7 (not in the paper).

    Shapes:
        ``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)`` for any H, W.

    Example:
        >>> net = FCN8s(1, 2, width=8, fc_channels=32)
        >>> net(torch.zeros(2, 1, 97, 131)).shape
        torch.Size([2, 2, 97, 131])
    """

    output_stride = 32

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"width": 4, "fc_channels": 16}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        fc_channels: int = 4096,
        fc6_kernel: int = 7,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if fc6_kernel % 2 != 1:
            raise ValueError(f"fc6_kernel must be odd (a 'same' convolution), got {fc6_kernel}")
        self.backbone = VGG16Features(in_channels, width=width, batch_norm=batch_norm)
        c3, c4, c5 = self.backbone.channels[2:]
        layers: list[nn.Module] = [nn.Conv2d(c5, fc_channels, fc6_kernel, padding=fc6_kernel // 2, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(fc_channels)] if batch_norm else []
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        layers += [nn.Conv2d(fc_channels, fc_channels, 1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(fc_channels)] if batch_norm else []
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.fc = nn.Sequential(*layers)
        init_he(self.fc)
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        nn.init.normal_(self.score_fr.weight, std=0.01)
        nn.init.zeros_(self.score_fr.bias)
        # zero skip scorers: training starts from the FCN-32s prediction, as in the paper
        for conv in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.upscore2 = _upsampler(num_classes, 2)
        self.upscore_pool4 = _upsampler(num_classes, 2)
        self.upscore8 = _upsampler(num_classes, 8)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes, H, W)``."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.output_stride, (-w) % self.output_stride
        top, left = ph // 2, pw // 2
        x = F.pad(x, (left, pw - left, top, ph - top))
        _, _, pool3, pool4, pool5 = self.backbone(x)
        score = self.upscore2(self.score_fr(self.fc(pool5)))
        score = self.upscore_pool4(score + self.score_pool4(pool4))
        score = self.upscore8(score + self.score_pool3(pool3))
        return score[..., top : top + h, left : left + w]
