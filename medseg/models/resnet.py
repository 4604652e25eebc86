"""ResNet-18/34/50/101 backbones with atrous convolution (DeepLab v2/v3/v3+).

Hand-written because torchvision is not available here and MONAI's ``ResNet`` has neither
dilation / output stride nor access to the stage outputs. Module and parameter names follow
torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` … ``downsample.0``), so a LOCAL copy
of torchvision's ImageNet weights loads as is (``pretrained`` argument; the ``fc.*`` keys are
ignored). Bottleneck is v1.5: the stride sits in the 3×3 conv.

Output stride: the stem (7×7 stride-2 conv, 3×3 stride-2 max-pool) and ``layer2`` give stride 8;
``layer3`` and ``layer4`` keep stride 2 each for output stride 32, while for 16 ``layer4`` (and
for 8 also ``layer3``) trades its stride for dilation, all its blocks at the stage's rate
(DeepLab v3: block4 at rate 2 for OS 16; block3 at 2 and block4 at 4 for OS 8). Multi-grid
multiplies the rates of ``layer4``'s blocks: rates = stage rate × ``multi_grid[i]``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from medseg.models.blocks import init_he, load_local_weights

#: blocks per stage and block type of the standard depths
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    """Two 3×3 convs with an identity (or 1×1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(
            in_channels, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = _shortcut(in_channels, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, planes, H / stride, W / stride)`` (ceil)."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride, dilation; v1.5) → 1×1 expand ×4, with a shortcut; ResNet-50/101."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, 4·planes, H / stride, W / stride)`` (ceil)."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1×1 projection + BN where the shape changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


def stage_rates(output_stride: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Strides and dilation rates of ``layer2``–``layer4`` for an output stride of 8, 16 or 32."""
    table = {32: ((2, 2, 2), (1, 1, 1)), 16: ((2, 2, 1), (1, 1, 2)), 8: ((2, 1, 1), (1, 2, 4))}
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return table[output_stride]


class ResNetBackbone(nn.Module):
    """Atrous ResNet feature extractor.

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: input channels (any; 3 for RGB or 2.5-D CT).
        output_stride: 8, 16 or 32 (input size / final feature size, rounded up).
        multi_grid: per-block rate multipliers of ``layer4`` (cycled if shorter than the stage),
            applied only where ``layer4`` is dilated (output stride 8 or 16); ``(1,)`` disables.

    Attributes:
        out_channels: channels of ``"out"`` (512 for 18/34, 2048 for 50/101).
        low_channels: channels of ``"low"`` (64 / 256).
        mid_channels: channels of ``"mid"`` (256 / 1024).
        dilations: the 3×3 dilation rate of every block, per stage (``layer1`` … ``layer4``).

    Example:
        >>> net = ResNetBackbone(50, in_channels=3, output_stride=16)
        >>> {k: v.shape for k, v in net(torch.zeros(1, 3, 97, 131)).items()}["out"]
        torch.Size([1, 2048, 7, 9])
    """

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        output_stride: int = 16,
        multi_grid: tuple[int, ...] = (1, 2, 4),
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
        if not multi_grid or min(multi_grid) < 1:
            raise ValueError(f"multi_grid must be positive rates, got {multi_grid}")
        kind, blocks = RESNET_LAYERS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        strides, rates = stage_rates(output_stride)
        self.depth = depth
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        last_rates = [rates[2] * multi_grid[i % len(multi_grid)] for i in range(blocks[3])]
        if rates[2] == 1:
            last_rates = [1] * blocks[3]  # output stride 32: the classic, undilated ResNet
        plan = [
            (64, 1, [1] * blocks[0]),
            (128, strides[0], [rates[0]] * blocks[1]),
            (256, strides[1], [rates[1]] * blocks[2]),
            (512, strides[2], last_rates),
        ]
        self.dilations: list[list[int]] = []
        channels = 64
        for i, (planes, stride, stage_dilations) in enumerate(plan, start=1):
            layers = []
            for j, rate in enumerate(stage_dilations):
                layers.append(block(channels, planes, stride if j == 0 else 1, rate))
                channels = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            self.dilations.append(list(stage_dilations))
        self.low_channels = 64 * block.expansion
        self.mid_channels = 256 * block.expansion
        self.out_channels = 512 * block.expansion
        init_he(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Stage features.

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            ``{"low": (B, low_channels, ⌈H/4⌉, ⌈W/4⌉), "mid": (B, mid_channels, H/s3, W/s3),
            "out": (B, out_channels, ⌈H/OS⌉, ⌈W/OS⌉)}`` with ``s3`` = 16 (8 at output stride 8).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        mid = self.layer3(self.layer2(low))
        return {"low": low, "mid": mid, "out": self.layer4(mid)}

    def load_pretrained(self, path: str | Path) -> None:
        """Load a LOCAL torchvision-style ResNet state dict (the first conv is adapted to ``in_channels``)."""
        load_local_weights(self, path, first_conv="conv1.weight", ignore_prefixes=("fc.",))


def build_resnet(
    depth: int, in_channels: int = 3, output_stride: int = 16, multi_grid: tuple[int, ...] = (1, 2, 4)
) -> ResNetBackbone:
    """An atrous ResNet backbone; see :class:`ResNetBackbone` (``forward`` → ``{"low", "mid", "out"}``)."""
    return ResNetBackbone(depth, in_channels, output_stride, tuple(multi_grid))
