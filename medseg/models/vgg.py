"""VGG-16 convolutional trunk (Simonyan & Zisserman 2015), the backbone of FCN-8s and DeepLab v1.

Only the 13 convolutions and 5 poolings are built here; each model adds its own "fc" layers as
convolutions. The pooling geometry and the dilation of the last block are parameters because
DeepLab-LargeFOV changes exactly those (3×3 pooling with padding 1, pool4/pool5 at stride 1,
conv5 dilated by 2) while FCN keeps the classic 2×2 / stride-2 pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from medseg.models.blocks import init_he

#: (convolutions, channel multiplier of ``width``) for VGG-16's five blocks.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))


class VGG16Features(nn.Module):
    """The VGG-16 conv1_1 … pool5 trunk for any number of input channels.

    Args:
        in_channels: image channels.
        width: channels of the first block (64 in the paper); the blocks have
            ``width × (1, 2, 4, 8, 8)`` channels.
        batch_norm: conv → BN → ReLU (as torchvision's ``vgg16_bn``) instead of conv → ReLU.
            The published FCN / DeepLab v1 have no BN; it helps training from scratch.
        pool_kernel: max-pool window (2 in VGG, 3 in DeepLab v1).
        pool_padding: max-pool padding (0 in VGG, 1 in DeepLab v1).
        pool_strides: stride of pool1 … pool5 (DeepLab v1: ``(2, 2, 2, 1, 1)``).
        dilations: dilation of the 3×3 convs of blocks 1 … 5 (DeepLab v1: ``(1, 1, 1, 1, 2)``).

    Shapes:
        ``forward(x)`` takes ``(B, in_channels, H, W)`` and returns the five pooled maps
        ``[pool1, …, pool5]``; ``pool_i`` has ``self.channels[i - 1]`` channels. With 2×2
        pooling ``pool_i`` is ``floor(H / 2**i)`` high; with 3×3 / padding 1 a stride-2 pool
        maps ``h`` to ``ceil(h / 2)``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int = 64,
        batch_norm: bool = False,
        pool_kernel: int = 2,
        pool_padding: int = 0,
        pool_strides: Sequence[int] = (2, 2, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if len(pool_strides) != 5 or len(dilations) != 5:
            raise ValueError("pool_strides and dilations need one value per VGG block (5)")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.channels: list[int] = []
        self.strides: list[int] = []
        blocks: list[nn.Module] = []
        c_in, stride = in_channels, 1
        for (n_conv, mult), p_stride, dil in zip(VGG16_BLOCKS, pool_strides, dilations):
            c_out = width * mult
            layers: list[nn.Module] = []
            for _ in range(n_conv):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=dil, dilation=dil, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            layers.append(nn.MaxPool2d(pool_kernel, stride=p_stride, padding=pool_padding))
            blocks.append(nn.Sequential(*layers))
            stride *= p_stride
            self.channels.append(c_out)
            self.strides.append(stride)
        self.blocks = nn.ModuleList(blocks)
        init_he(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` → ``[pool1, pool2, pool3, pool4, pool5]``."""
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats
