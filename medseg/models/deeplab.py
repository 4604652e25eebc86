"""DeepLab v2, v3 and v3+ (Chen et al. 2017, 2017, 2018) on atrous ResNet or aligned Xception-65.

- ``deeplabv2``: four parallel 3×3 atrous convs (rates 6, 12, 18, 24) straight to class scores,
  summed (ASPP-L), on an atrous ResNet at output stride 8; bilinear upsampling to the input.
- ``deeplabv3``: ASPP = 1×1 conv + three 3×3 atrous convs (rates 6, 12, 18 at output stride 16,
  doubled at 8) + image pooling, 256 channels each with BN + ReLU; concatenation → 1×1 conv 256
  → BN → ReLU → dropout 0.1 → 1×1 classifier → bilinear upsampling to the input.
- ``deeplabv3plus``: the v3 encoder plus a decoder — low-level (stride-4) features 1×1 → 48,
  concatenated with the upsampled ASPP output, two 3×3 convs of 256, classifier, upsampling.
  ``separable=True`` makes the ASPP and decoder 3×3 convs depthwise-separable.

Image pooling and batch size 1: the pooled map is 1×1, so a BatchNorm there normalises over the
batch alone — training with one image raises ("Expected more than 1 value per channel") and small
batches give noisy statistics. By default the pooling branch is a 1×1 conv with bias + ReLU (no
norm); the projection's BN after the concatenation normalises over B×H×W, which is well defined
at any batch size. ``image_pool_bn=True`` restores the paper's BN for batches of 2 or more.

Any input size works: strided convs round up (⌈H/OS⌉) and every upsampling targets the exact
size of the map it joins or of the input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medseg.models.blocks import ConvBNReLU, conv3x3_unit, init_he, resize_to
from medseg.models.resnet import RESNET_LAYERS, ResNetBackbone
from medseg.models.xception import XceptionBackbone
from medseg.registry import MODELS

#: backbone names accepted by the DeepLab models
BACKBONES = tuple(f"resnet{d}" for d in RESNET_LAYERS) + ("xception65",)


def build_backbone(
    name: str,
    in_channels: int,
    output_stride: int,
    multi_grid: tuple[int, ...] = (1, 2, 4),
    pretrained: str | None = None,
) -> ResNetBackbone | XceptionBackbone:
    """A DeepLab backbone by name (``resnet18|34|50|101|xception65``), optionally from LOCAL weights.

    ``multi_grid`` applies to the ResNets' last stage; Xception-65 uses rate-doubling only.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (model.params.backbone); valid: {', '.join(BACKBONES)}")
    net: ResNetBackbone | XceptionBackbone
    if name == "xception65":
        net = XceptionBackbone(in_channels, output_stride)
    else:
        net = ResNetBackbone(int(name.removeprefix("resnet")), in_channels, output_stride, tuple(multi_grid))
    if pretrained is not None:
        net.load_pretrained(pretrained)
    return net


class ImagePooling(nn.Module):
    """Global average pool → 1×1 conv → (BN) → ReLU, broadcast back to the map's size."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` → ``(B, out_channels, h, w)`` (constant over space)."""
        pooled = self.proj(x.mean(dim=(2, 3), keepdim=True))
        # bilinear upsampling of a 1×1 map is a broadcast
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab v3.

    Args:
        in_channels: backbone channels.
        out_channels: channels of every branch and of the output (256).
        rates: atrous rates of the three 3×3 branches.
        separable: depthwise-separable 3×3 branches (DeepLab v3+).
        image_pool_bn: BN in the image-pooling branch (needs batches ≥ 2 in training).
        dropout: dropout after the projection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        separable: bool = False,
        image_pool_bn: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, out_channels, 1)]
            + [conv3x3_unit(in_channels, out_channels, r, separable) for r in rates]
        )
        self.pool = ImagePooling(in_channels, out_channels, image_pool_bn)
        self.project = nn.Sequential(
            ConvBNReLU(out_channels * (len(rates) + 2), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` → ``(B, out_channels, h, w)``."""
        feats = [branch(x) for branch in self.branches] + [self.pool(x)]
        return self.project(torch.cat(feats, dim=1))


def _aspp_rates(rates: tuple[int, ...] | None, output_stride: int) -> tuple[int, ...]:
    """The given rates, or DeepLab v3's (6, 12, 18) scaled by 16 / output_stride."""
    if rates is not None:
        return tuple(rates)
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


def _encoder(
    backbone: str, in_channels: int, output_stride: int, multi_grid: tuple[int, ...], pretrained: str | None,
    aspp_channels: int, aspp_rates: tuple[int, ...] | None, separable: bool, image_pool_bn: bool, dropout: float,
) -> tuple[nn.Module, ASPP]:
    """The DeepLab v3 / v3+ encoder: an atrous backbone and the ASPP on its output."""
    net = build_backbone(backbone, in_channels, output_stride, multi_grid, pretrained)
    aspp = ASPP(net.out_channels, aspp_channels, _aspp_rates(aspp_rates, output_stride), separable, image_pool_bn,
                dropout)
    return net, aspp


@MODELS.register("deeplabv3")
class DeepLabV3(nn.Module):
    """DeepLab v3: atrous backbone → ASPP → 1×1 classifier → bilinear upsampling.

    Args:
        in_channels: input channels.
        num_classes: output classes (background included).
        backbone: ``resnet18|resnet34|resnet50|resnet101|xception65``.
        output_stride: 8, 16 or 32.
        multi_grid: rate multipliers of the ResNet's last stage (DeepLab v3: (1, 2, 4)).
        aspp_channels: width of every ASPP branch (256).
        aspp_rates: rates of the 3×3 ASPP branches; None = (6, 12, 18) × 16 / output_stride.
        separable: depthwise-separable 3×3 convs in the ASPP.
        image_pool_bn: BN in the image-pooling branch (see the module docstring).
        dropout: dropout after the ASPP projection.
        pretrained_backbone: a LOCAL backbone weights file (torchvision-style names for ResNets);
            never downloaded.

    Shapes:
        ``(B, in_channels, H, W)`` → ``(B, num_classes, H, W)`` for any H, W.

    Example:
        >>> net = DeepLabV3(3, 2, backbone="resnet18", aspp_channels=32)
        >>> net.eval()(torch.zeros(1, 3, 97, 131)).shape
        torch.Size([1, 2, 97, 131])
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"backbone": "resnet18", "aspp_channels": 16}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "resnet101",
        output_stride: int = 16,
        multi_grid: tuple[int, ...] = (1, 2, 4),
        aspp_channels: int = 256,
        aspp_rates: tuple[int, ...] | None = None,
        separable: bool = False,
        image_pool_bn: bool = False,
        dropout: float = 0.1,
        pretrained_backbone: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.aspp = _encoder(backbone, in_channels, output_stride, multi_grid, pretrained_backbone,
                                            aspp_channels, aspp_rates, separable, image_pool_bn, dropout)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        init_he(self.aspp)
        init_he(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``."""
        out = self.classifier(self.aspp(self.backbone(x)["out"]))
        return resize_to(out, x.shape[-2:])


@MODELS.register("deeplabv3plus")
class DeepLabV3Plus(nn.Module):
    """DeepLab v3+: the v3 encoder with a decoder on stride-4 low-level features.

    Args:
        in_channels: input channels.
        num_classes: output classes (background included).
        backbone: ``resnet18|resnet34|resnet50|resnet101|xception65``.
        output_stride: 8, 16 or 32.
        multi_grid: rate multipliers of the ResNet's last stage.
        aspp_channels: width of the ASPP branches (256).
        aspp_rates: rates of the 3×3 ASPP branches; None = (6, 12, 18) × 16 / output_stride.
        low_level_channels: the low-level 1×1 reduction (48).
        decoder_channels: width of the two decoder 3×3 convs (256).
        separable: depthwise-separable 3×3 convs in the ASPP and the decoder.
        image_pool_bn: BN in the image-pooling branch (see the module docstring).
        dropout: dropout after the ASPP projection.
        pretrained_backbone: a LOCAL backbone weights file; never downloaded.

    Shapes:
        ``(B, in_channels, H, W)`` → ``(B, num_classes, H, W)`` for any H, W.

    Example:
        >>> net = DeepLabV3Plus(1, 2, backbone="resnet18", aspp_channels=32, decoder_channels=32)
        >>> net.eval()(torch.zeros(1, 1, 97, 131)).shape
        torch.Size([1, 2, 97, 131])
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {
        "backbone": "resnet18",
        "aspp_channels": 16,
        "low_level_channels": 8,
        "decoder_channels": 16,
        "separable": True,
    }

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "resnet101",
        output_stride: int = 16,
        multi_grid: tuple[int, ...] = (1, 2, 4),
        aspp_channels: int = 256,
        aspp_rates: tuple[int, ...] | None = None,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        separable: bool = False,
        image_pool_bn: bool = False,
        dropout: float = 0.1,
        pretrained_backbone: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.aspp = _encoder(backbone, in_channels, output_stride, multi_grid, pretrained_backbone,
                                            aspp_channels, aspp_rates, separable, image_pool_bn, dropout)
        self.low_proj = ConvBNReLU(self.backbone.low_channels, low_level_channels, 1)
        self.decoder = nn.Sequential(
            conv3x3_unit(aspp_channels + low_level_channels, decoder_channels, separable=separable),
            conv3x3_unit(decoder_channels, decoder_channels, separable=separable),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for head in (self.aspp, self.low_proj, self.decoder, self.classifier):
            init_he(head)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``."""
        feats = self.backbone(x)
        low = self.low_proj(feats["low"])
        # "×4" upsampling, to the low-level map's exact size so odd inputs line up
        high = resize_to(self.aspp(feats["out"]), low.shape[-2:])
        out = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return resize_to(out, x.shape[-2:])


@MODELS.register("deeplabv2")
class DeepLabV2(nn.Module):
    """DeepLab v2 (ASPP-L): summed class scores of four parallel 3×3 atrous convs on an atrous ResNet.

    Args:
        in_channels: input channels.
        num_classes: output classes (background included).
        backbone: ``resnet18|resnet34|resnet50|resnet101`` (v2 used ResNet-101).
        output_stride: 8 (the paper), 16 or 32.
        rates: atrous rates of the branches ((6, 12, 18, 24) in the paper).
        pretrained_backbone: a LOCAL backbone weights file; never downloaded.

    Shapes:
        ``(B, in_channels, H, W)`` → ``(B, num_classes, H, W)`` for any H, W.
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"backbone": "resnet18"}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "resnet101",
        output_stride: int = 8,
        rates: tuple[int, ...] = (6, 12, 18, 24),
        pretrained_backbone: str | None = None,
    ) -> None:
        super().__init__()
        if not backbone.startswith("resnet"):
            raise ValueError(f"deeplabv2 runs on an atrous ResNet; backbone {backbone!r} is not one")
        # v2 has no multi-grid: every block of a dilated stage uses the stage's rate
        self.backbone = build_backbone(backbone, in_channels, output_stride, (1,), pretrained_backbone)
        self.branches = nn.ModuleList(
            nn.Conv2d(self.backbone.out_channels, num_classes, 3, padding=r, dilation=r) for r in rates
        )
        for conv in self.branches:
            # the reference Caffe model's classifier init (Gaussian, std 0.01)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``."""
        feat = self.backbone(x)["out"]
        out = torch.stack([branch(feat) for branch in self.branches]).sum(dim=0)
        return resize_to(out, x.shape[-2:])
