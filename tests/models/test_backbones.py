"""Backbone geometry, atrous rates, parameter counts and local-weight loading.

Parameter counts are checked two ways: exactly, against layer-by-layer arithmetic of the published
architecture (or torchvision's published counts), and within 5 % of the round numbers usually
quoted. Big models are only built for counting — forward passes use small widths / inputs.

Reference for DeepLab v3+ ResNet-101 (21 classes): 59.34 M, the count of the most-used PyTorch
reimplementation (jfzhang95/pytorch-deeplab-xception: torchvision-layout ResNet-101 without fc,
ASPP with a BN in the image-pooling branch, decoder 1×1→48 and two 3×3 convs of 256). Its sum is
reproduced below from the layers; VainF/DeepLabV3Plus-Pytorch has one decoder 3×3 conv fewer
(−0.59 M → 58.75 M). ResNet-50: the same head on a 23.51 M backbone gives 40.35 M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from medseg.models import build_model, count_parameters
from medseg.models.deeplab import DeepLabV2, DeepLabV3, DeepLabV3Plus
from medseg.models.resnet import Bottleneck, build_resnet
from medseg.models.unet import UNet
from medseg.models.xception import XceptionBackbone, atrous_plan

torch.set_num_threads(1)

# torchvision's published parameter counts (ResNet*_Weights.IMAGENET1K_V1 meta "num_params")
# minus the 1000-class fc layer (in·1000 + 1000)
TORCHVISION_RESNET = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}
FC = {18: 512 * 1000 + 1000, 34: 512 * 1000 + 1000, 50: 2048 * 1000 + 1000, 101: 2048 * 1000 + 1000}


def conv(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
    """Parameters of a k×k conv."""
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    """Parameters (γ, β) of a BN."""
    return 2 * c


def on_meta(factory: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Build a model on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def within(value: int, reference: float, tol: float = 0.05) -> bool:
    return abs(value - reference) <= tol * reference


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet_feature_sizes(depth: int, output_stride: int) -> None:
    net = build_resnet(depth, in_channels=2, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 2, 67, 45))
    assert feats["low"].shape == (1, net.low_channels, math.ceil(67 / 4), math.ceil(45 / 4))
    s3 = min(16, output_stride)
    assert feats["mid"].shape == (1, net.mid_channels, math.ceil(67 / s3), math.ceil(45 / s3))
    assert feats["out"].shape == (
        1,
        net.out_channels,
        math.ceil(67 / output_stride),
        math.ceil(45 / output_stride),
    )
    expansion = 4 if depth == 50 else 1
    assert (net.low_channels, net.mid_channels, net.out_channels) == (
        64 * expansion,
        256 * expansion,
        512 * expansion,
    )


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_xception_feature_sizes(output_stride: int) -> None:
    # two middle repeats instead of 16: the same geometry, a fraction of the cost
    net = XceptionBackbone(in_channels=1, output_stride=output_stride, middle_repeats=2).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 1, 67, 45))
    assert feats["low"].shape == (1, 256, math.ceil(67 / 4), math.ceil(45 / 4))
    s3 = min(16, output_stride)
    assert feats["mid"].shape == (1, 728, math.ceil(67 / s3), math.ceil(45 / s3))
    assert feats["out"].shape == (1, 2048, math.ceil(67 / output_stride), math.ceil(45 / output_stride))


def _rates(stage: nn.Sequential) -> list[int]:
    """The 3×3 conv's dilation of every block in a ResNet stage, read from the modules."""
    out = []
    for block in stage:
        conv3 = block.conv2
        assert conv3.padding == conv3.dilation  # "same" padding for the rate
        out.append(conv3.dilation[0])
    return out


@pytest.mark.parametrize(
    ("output_stride", "layer3", "layer4", "strides"),
    [
        (32, [1] * 6, [1, 1, 1], (2, 2, 2)),
        (16, [1] * 6, [2, 4, 8], (2, 2, 1)),  # block4 at rate 2 × multi-grid (1, 2, 4)
        (8, [2] * 6, [4, 8, 16], (2, 1, 1)),  # block3 at 2, block4 at 4 × multi-grid
    ],
)
def test_resnet_dilation_rates(
    output_stride: int, layer3: list[int], layer4: list[int], strides: tuple
) -> None:
    net = on_meta(build_resnet, 50, output_stride=output_stride, multi_grid=(1, 2, 4))
    assert _rates(net.layer1) == [1] * 3 and _rates(net.layer2) == [1] * 4
    assert _rates(net.layer3) == layer3
    assert _rates(net.layer4) == layer4
    assert tuple(getattr(net, f"layer{i}")[0].conv2.stride[0] for i in (2, 3, 4)) == strides
    # v1.5: the stride sits in the 3×3 conv, not in the first 1×1
    assert isinstance(net.layer2[0], Bottleneck) and net.layer2[0].conv1.stride == (1, 1)
    assert net.dilations[2:] == [layer3, layer4]


def test_resnet_multi_grid_cycles_over_short_stages() -> None:
    net = on_meta(build_resnet, 18, output_stride=16, multi_grid=(1, 2, 4))
    assert _rates(net.layer4) == [2, 4]  # ResNet-18's last stage has two blocks
    assert _rates(on_meta(build_resnet, 34, output_stride=16, multi_grid=(1,)).layer4) == [2, 2, 2]


def test_xception_dilation_rates() -> None:
    def depthwise_rates(net: XceptionBackbone) -> list[list[int]]:
        modules = [net.entry1, net.entry2, net.entry3, *net.middle, net.exit1, net.exit2]
        return [
            [m.dilation[0] for m in mod.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
            for mod in modules
        ]

    os16 = depthwise_rates(on_meta(XceptionBackbone, output_stride=16, middle_repeats=2))
    assert os16 == [[1] * 3] * 6 + [[2] * 3]  # entry 1–3, middle ×2, exit 1 at rate 1
    os8 = depthwise_rates(on_meta(XceptionBackbone, output_stride=8, middle_repeats=2))
    assert os8 == [[1] * 3] * 3 + [[2] * 3] * 3 + [[4] * 3]
    assert atrous_plan([2, 2, 2, 1, 2, 1], 8) == [(2, 1), (2, 1), (1, 1), (1, 2), (1, 2), (1, 4)]


def test_xception_has_no_max_pool_and_bn_relu_after_every_depthwise() -> None:
    net = XceptionBackbone(middle_repeats=1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    seqs = [m for m in net.modules() if isinstance(m, nn.Sequential)]
    depthwise = 0
    for seq in seqs:
        layers = list(seq)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                depthwise += 1
                assert isinstance(layers[i + 1], nn.BatchNorm2d) and isinstance(layers[i + 2], nn.ReLU)
    assert depthwise == 3 * (3 + 1 + 2)  # three per module: entry 3, middle 1, exit 2


def test_aspp_rates_double_at_output_stride_8() -> None:
    for output_stride, expected in [(16, [6, 12, 18]), (8, [12, 24, 36])]:
        net = DeepLabV3(3, 2, backbone="resnet18", output_stride=output_stride, aspp_channels=8)
        rates = [b[0].dilation[0] for b in net.aspp.branches[1:]]
        assert rates == expected


def test_separable_decoder_uses_depthwise_convs() -> None:
    dense = DeepLabV3Plus(3, 2, backbone="resnet18", aspp_channels=16, decoder_channels=16)
    sep = DeepLabV3Plus(3, 2, backbone="resnet18", aspp_channels=16, decoder_channels=16, separable=True)

    def n_depthwise(m: nn.Module) -> int:
        return sum(isinstance(c, nn.Conv2d) and c.groups > 1 for c in m.modules())

    assert n_depthwise(dense) == 0
    assert n_depthwise(sep.aspp) == 3 and n_depthwise(sep.decoder) == 2
    assert count_parameters(sep) < count_parameters(dense)


def test_deeplabv2_sums_four_atrous_branches() -> None:
    net = DeepLabV2(1, 3, backbone="resnet18").eval()
    assert [b.dilation[0] for b in net.branches] == [6, 12, 18, 24]
    assert _rates(net.backbone.layer4) == [4, 4]  # output stride 8, no multi-grid
    x = torch.randn(1, 1, 41, 37)
    with torch.no_grad():
        feat = net.backbone(x)["out"]
        expected = sum(b(feat) for b in net.branches)
        expected = nn.functional.interpolate(expected, size=(41, 37), mode="bilinear", align_corners=False)
        torch.testing.assert_close(net(x), expected)


def test_image_pooling_without_bn_trains_at_batch_one() -> None:
    net = DeepLabV3(3, 2, backbone="resnet18", aspp_channels=8).train()
    assert net(torch.randn(1, 3, 65, 65)).shape == (1, 2, 65, 65)
    paper = DeepLabV3(3, 2, backbone="resnet18", aspp_channels=8, image_pool_bn=True).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        paper(torch.randn(1, 3, 65, 65))  # why the default drops that BN
    assert paper(torch.randn(2, 3, 65, 65)).shape == (2, 2, 65, 65)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_resnet_parameter_counts_match_torchvision(depth: int) -> None:
    n = count_parameters(on_meta(build_resnet, depth))
    assert n == TORCHVISION_RESNET[depth] - FC[depth]
    published = {18: 11.2e6, 34: 21.3e6, 50: 23.5e6, 101: 42.5e6}[depth]
    assert within(n, published)


def _v3plus_head(num_classes: int, backbone_out: int = 2048, low: int = 256) -> int:
    """DeepLab v3+ head as published (BN in every ASPP branch, image pooling included)."""
    aspp = conv(1, backbone_out, 256) + bn(256)
    aspp += 3 * (conv(3, backbone_out, 256) + bn(256))
    aspp += conv(1, backbone_out, 256) + bn(256)  # image pooling
    aspp += conv(1, 5 * 256, 256) + bn(256)  # projection
    decoder = conv(1, low, 48) + bn(48) + conv(3, 304, 256) + bn(256) + conv(3, 256, 256) + bn(256)
    return aspp + decoder + conv(1, 256, num_classes, bias=True)


@pytest.mark.parametrize(("depth", "published"), [(101, 59.3e6), (50, 40.3e6)])
def test_deeplabv3plus_parameter_counts(depth: int, published: float) -> None:
    net = on_meta(build_model, "deeplabv3plus", 3, 21, {"backbone": f"resnet{depth}", "image_pool_bn": True})
    n = count_parameters(net)
    assert n == TORCHVISION_RESNET[depth] - FC[depth] + _v3plus_head(21)
    assert within(n, published)
    # the default image-pooling branch trades its BN (2·256) for a conv bias (256)
    default = on_meta(build_model, "deeplabv3plus", 3, 21, {"backbone": f"resnet{depth}"})
    assert count_parameters(default) == n - 256


def test_deeplabv2_parameter_count() -> None:
    n = count_parameters(on_meta(DeepLabV2, 3, 21, backbone="resnet101"))
    assert n == TORCHVISION_RESNET[101] - FC[101] + 4 * conv(3, 2048, 21, bias=True)


def _unet_count(in_channels: int, num_classes: int, base: int = 64, depth: int = 4) -> int:
    """Ronneberger et al.'s U-Net (biased convs, no BN) counted layer by layer."""
    widths = [base * 2**i for i in range(depth + 1)]
    n, c = 0, in_channels
    for w in widths:  # contracting path and bottleneck: two 3×3 convs per level
        n += conv(3, c, w, True) + conv(3, w, w, True)
        c = w
    for w in reversed(widths[:-1]):  # 2×2 up-conv halving channels, then two 3×3 convs on the concat
        n += conv(2, 2 * w, w, True) + conv(3, 2 * w, w, True) + conv(3, w, w, True)
    return n + conv(1, base, num_classes, True)


def test_unet_parameter_count() -> None:
    paper = on_meta(UNet, 1, 2, base_channels=64, depth=4, batch_norm=False)
    assert count_parameters(paper) == _unet_count(1, 2)
    assert within(count_parameters(paper), 31.03e6)
    # with BN: the conv biases go, two BN parameters per channel come
    assert within(count_parameters(on_meta(UNet, 3, 2)), 31.03e6)


# ----------------------------------------------------------------------------- local weights


def test_pretrained_backbone_loads_local_torchvision_style_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_resnet(18, in_channels=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DataParallel-style dump
    state["module.fc.weight"] = torch.zeros(1000, 512)  # the ImageNet classifier is ignored
    torch.save({"state_dict": state}, tmp_path / "r18.pth")

    net = DeepLabV3Plus(
        3, 2, backbone="resnet18", aspp_channels=8, pretrained_backbone=str(tmp_path / "r18.pth")
    )
    for k, v in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k

    gray = DeepLabV3(
        1, 2, backbone="resnet18", aspp_channels=8, pretrained_backbone=str(tmp_path / "r18.pth")
    )
    rgb = source.conv1.weight
    torch.testing.assert_close(gray.backbone.conv1.weight, rgb.sum(dim=1, keepdim=True))
    torch.testing.assert_close(gray.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)

    # a medseg training checkpoint of another DeepLab: its "backbone." weights are taken
    torch.save({"model": gray.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    plus = DeepLabV3Plus(
        1, 4, backbone="resnet18", aspp_channels=8, pretrained_backbone=str(tmp_path / "ckpt.pt")
    )
    for k, v in gray.backbone.state_dict().items():
        assert torch.equal(plus.backbone.state_dict()[k], v), k


def test_pretrained_backbone_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        DeepLabV3(3, 2, backbone="resnet18", pretrained_backbone=str(missing))
    torch.save(build_resnet(34, output_stride=32).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"r34\.pth.*unexpected keys"):
        DeepLabV3(3, 2, backbone="resnet18", aspp_channels=8, pretrained_backbone=str(tmp_path / "r34.pth"))
    torch.save([1, 2, 3], tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"junk\.pth.*state dict"):
        DeepLabV3(3, 2, backbone="resnet18", aspp_channels=8, pretrained_backbone=str(tmp_path / "junk.pth"))


def test_unknown_backbone_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet50.*xception65"):
        DeepLabV3(3, 2, backbone="resnet152")
