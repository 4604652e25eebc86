"""Aligned Xception-65 as modified for DeepLab v3+ (Chen et al. 2018), with atrous exit flow.

Changes to Chollet's Xception made by DeepLab v3+: a deeper middle flow (16 repeats instead of 8:
Xception-65), every max-pool replaced by a strided depthwise-separable conv, and BN + ReLU after
every 3×3 depthwise conv (MobileNet style). The structure follows the DeepLab reference
implementation: each separable conv of the entry/middle/exit-block-1 modules is pre-activated by a
ReLU (so the residual sum comes before it); the last exit module has no shortcut and ReLUs inside
its separable convs. Strides sit in the last unit of a module.

Output stride: entry block 1 → 4, block 2 → 8, block 3 → 16, exit block 1 → 32. For output stride
16 exit block 1 keeps stride 1 and the exit block 2 runs at rate 2; for 8 entry block 3 keeps
stride 1, the middle flow and exit block 1 run at rate 2 and exit block 2 at rate 4 (the rate
doubles after each removed stride, as in DeepLab's ``stack_blocks_dense``).

Hand-written: neither MONAI nor any installed library provides Xception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from medseg.models.blocks import ConvBNReLU, SeparableConv, init_he, load_local_weights


def atrous_plan(strides: list[int], output_stride: int, stem_stride: int = 2) -> list[tuple[int, int]]:
    """``(stride, rate)`` per module, as DeepLab's ``stack_blocks_dense``.

    Once the running stride reaches ``output_stride`` a module keeps stride 1 and every later
    module's rate grows by the stride it dropped.
    """
    current, rate, plan = stem_stride, 1, []
    for stride in strides:
        if current < output_stride:
            plan.append((stride, rate))
            current *= stride
        else:
            plan.append((1, rate))
            rate *= stride
    return plan


class XceptionBlock(nn.Module):
    """Three separable convs (the last one strided) with a shortcut.

    Args:
        in_channels: input channels.
        depths: output channels of the three separable convs.
        stride: stride of the third separable conv.
        dilation: atrous rate of all three.
        skip: ``"conv"`` (1×1 strided conv + BN shortcut), ``"sum"`` (identity) or ``"none"``.
        relu_inside: ReLU after each separable conv instead of before it (exit block 2).
    """

    def __init__(
        self,
        in_channels: int,
        depths: tuple[int, int, int],
        stride: int = 1,
        dilation: int = 1,
        skip: Literal["conv", "sum", "none"] = "conv",
        relu_inside: bool = False,
    ) -> None:
        super().__init__()
        units: list[nn.Module] = []
        c_in = in_channels
        for i, depth in enumerate(depths):
            sep = SeparableConv(c_in, depth, stride if i == 2 else 1, dilation, relu_out=relu_inside)
            # not in-place: the block input also feeds the shortcut
            units.append(sep if relu_inside else nn.Sequential(nn.ReLU(inplace=False), sep))
            c_in = depth
        self.units = nn.ModuleList(units)
        self.skip = skip
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(in_channels, depths[2], 1, stride=stride, bias=False), nn.BatchNorm2d(depths[2])
            )
            if skip == "conv"
            else None
        )

    def forward_tap(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, output of the second unit)``; the second is DeepLab's low-level tap."""
        y = self.units[0](x)
        tap = self.units[1](y)
        y = self.units[2](tap)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        elif self.skip == "sum":
            y = y + x
        return y, tap

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, depths[2], ⌈H/stride⌉, ⌈W/stride⌉)``."""
        return self.forward_tap(x)[0]


class XceptionBackbone(nn.Module):
    """Aligned Xception-65 feature extractor (DeepLab v3+).

    Args:
        in_channels: input channels.
        output_stride: 8, 16 or 32.
        middle_repeats: middle-flow modules (16 for Xception-65).

    Attributes:
        out_channels: 2048. low_channels: 256 (entry block 2, stride 4). mid_channels: 728.
        dilations: the depthwise rate of every module, in order (entry 1–3, middle, exit 1–2).

    Example:
        >>> net = XceptionBackbone(in_channels=3, output_stride=16)
        >>> net(torch.zeros(1, 3, 97, 131))["out"].shape
        torch.Size([1, 2048, 7, 9])
    """

    def __init__(self, in_channels: int = 3, output_stride: int = 16, middle_repeats: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.conv1 = ConvBNReLU(in_channels, 32, 3, stride=2)
        self.conv2 = ConvBNReLU(32, 64, 3)
        plan = atrous_plan([2, 2, 2] + [1] * middle_repeats + [2, 1], output_stride)
        self.dilations = [rate for _, rate in plan]
        self.entry1 = XceptionBlock(64, (128, 128, 128), *plan[0])
        self.entry2 = XceptionBlock(128, (256, 256, 256), *plan[1])
        self.entry3 = XceptionBlock(256, (728, 728, 728), *plan[2])
        self.middle = nn.Sequential(
            *(XceptionBlock(728, (728, 728, 728), *sr, skip="sum") for sr in plan[3:-2])
        )
        self.exit1 = XceptionBlock(728, (728, 1024, 1024), *plan[-2])
        self.exit2 = XceptionBlock(1024, (1536, 1536, 2048), *plan[-1], skip="none", relu_inside=True)
        self.low_channels, self.mid_channels, self.out_channels = 256, 728, 2048
        init_he(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Features.

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            ``{"low": (B, 256, ⌈H/4⌉, ⌈W/4⌉), "mid": (B, 728, H/16, W/16) (H/8 at OS 8),
            "out": (B, 2048, ⌈H/OS⌉, ⌈W/OS⌉)}``.
        """
        x = self.entry1(self.conv2(self.conv1(x)))
        x, low = self.entry2.forward_tap(x)
        mid = self.middle(self.entry3(x))
        return {"low": low, "mid": mid, "out": self.exit2(self.exit1(mid))}

    def load_pretrained(self, path: str | Path) -> None:
        """Load a LOCAL state dict saved from this class (the first conv is adapted to ``in_channels``)."""
        load_local_weights(self, path, first_conv="conv1.0.weight", ignore_prefixes=("fc.",))


def build_xception(in_channels: int = 3, output_stride: int = 16) -> XceptionBackbone:
    """Aligned Xception-65 backbone; see :class:`XceptionBackbone`."""
    return XceptionBackbone(in_channels, output_stride)
