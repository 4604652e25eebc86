"""STDC-Seg (Fan et al., "Rethinking BiSeNet for Real-time Semantic Segmentation", CVPR 2021).

Registered as ``stdc``. Built after the paper and its reference code:

* **Backbone** (STDC1 = "STDCNet813", STDC2 = "STDCNet1446"): two stride-2 3×3 ConvX units
  (conv–BN–ReLU; 1/2 and 1/4), then stages 3, 4, 5 of Short-Term Dense Concatenate modules
  (1/8, 1/16, 1/32; STDC1 has 2, 2, 2 modules, STDC2 4, 5, 3). An STDC module with output ``C``
  runs four ConvX blocks in series, 1×1 → C/2, 3×3 → C/4, 3×3 → C/8, 3×3 → C/8, and concatenates
  all four outputs; a stride-2 module downsamples after the first block with a depthwise 3×3
  stride-2 conv + BN, and average-pools (3×3, stride 2) the first block's output for the concat.
* **Context path**: a global average of the 1/32 features (1×1 ConvX) is added to the 1/32
  features refined by an attention refinement module (ARM: 3×3 ConvX, then a channel attention
  from the global average, 1×1 conv, BN, sigmoid); the sum is upsampled to 1/16, passed through a
  3×3 ConvX, added to the ARM-refined 1/16 features, upsampled to 1/8 and passed through a 3×3
  ConvX. Upsampling is nearest-neighbour, as in the reference code.
* **Feature fusion module** (FFM) with the 1/8 backbone features: concatenation, 1×1 ConvX, and
  a squeeze-and-excitation style attention added back to its input; a segmentation head
  (3×3 ConvX, 1×1 conv) gives the stride-8 scores, upsampled bilinearly to the input size.
* **Training-only heads** (never used at inference): auxiliary segmentation heads on the two
  context-path outputs (``aux_weight``; the paper weights them 1) and the **detail head** on the
  1/8 backbone features, trained against a detail ground truth (``detail_loss``).

Detail ground truth (:func:`detail_target`): the Laplacian kernel
``[[-1,-1,-1],[-1,8,-1],[-1,-1,-1]]`` is applied to the label map at strides 1, 2 and 4, each
response clipped at 0, upsampled (nearest) to full size and binarised at 0.1; the three maps are
fused with the weights (0.6, 0.3, 0.1) and binarised at 0.1 again. The paper calls the fusion a
trainable 1×1 conv, but the hard threshold after it passes no gradient to those weights, so the
reference code's initial values are a fixed buffer here. The detail loss is binary cross-entropy
+ Dice (smooth 1, per sample) on the detail logits upsampled to the label size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.models.blocks import ConvBNReLU, PooledBatchNorm2d, init_he, resize_to
from medseg.registry import MODELS

#: STDC modules in stages 3, 4, 5.
STDC_LAYERS: dict[str, tuple[int, int, int]] = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}


class STDCModule(nn.Module):
    """A Short-Term Dense Concatenate module ("CatBottleneck") with ``blocks`` ConvX blocks.

    Args:
        in_channels: input channels.
        out_channels: output channels (divisible by ``2 ** (blocks - 1)``).
        stride: 1, or 2 to halve the resolution (``h`` → ``ceil(h / 2)``).
        blocks: ConvX blocks (4 in STDC1/2); block i > 0 has ``out / 2**(i+1)`` channels, the
            last one repeats the previous width so the concatenation has ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, blocks: int = 4) -> None:
        super().__init__()
        if blocks < 2 or out_channels % 2 ** (blocks - 1):
            raise ValueError(f"STDC module: need blocks >= 2 and out_channels divisible by {2 ** (blocks - 1)}")
        widths = [out_channels // 2 ** (i + 1) for i in range(blocks - 1)]
        widths.append(widths[-1])
        self.stride = stride
        convs = [ConvBNReLU(in_channels, widths[0], 1)]
        convs += [ConvBNReLU(widths[i - 1], widths[i], 3) for i in range(1, blocks)]
        self.convs = nn.ModuleList(convs)
        if stride == 2:
            half = widths[0]
            self.downsample = nn.Sequential(
                nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False), nn.BatchNorm2d(half)
            )
            self.skip = nn.AvgPool2d(3, stride=2, padding=1)
        elif stride != 1:
            raise ValueError(f"STDC module stride must be 1 or 2, got {stride}")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in, H, W)`` → ``(B, out, H/stride, W/stride)``."""
        first = self.convs[0](x)
        out = self.downsample(first) if self.stride == 2 else first
        outs = []
        for conv in self.convs[1:]:
            out = conv(out)
            outs.append(out)
        outs.insert(0, self.skip(first) if self.stride == 2 else first)
        return torch.cat(outs, dim=1)


class STDCNet(nn.Module):
    """The STDC backbone (STDCNet813 / STDCNet1446), optionally with its ImageNet classifier.

    Args:
        in_channels: image channels.
        variant: ``"stdc1"`` or ``"stdc2"``.
        base: width of the 1/4 stage (64 in the paper); stages 3, 4, 5 have 4, 8, 16 × base.
        blocks: ConvX blocks per STDC module (4).
        classifier_classes: build the ImageNet head of the paper (1×1 ConvX to max(1024, 16·base),
            global pool, FC, BN1d, dropout, linear) for this many classes; None (segmentation)
            builds none. Used to compare parameter counts with the paper.

    Shapes:
        ``forward``: ``(B, in_channels, H, W)`` → ``(feat2, feat4, feat8, feat16, feat32)`` at
        strides 2 … 32 with ``self.channels`` channels; ``classify``: → ``(B, classifier_classes)``.
    """

    def __init__(
        self,
        in_channels: int,
        variant: str = "stdc1",
        base: int = 64,
        blocks: int = 4,
        classifier_classes: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in STDC_LAYERS:
            raise ValueError(f"unknown STDC variant {variant!r}; valid: {', '.join(STDC_LAYERS)}")
        if base % 2 or base < 2:
            raise ValueError(f"STDC base width must be an even number >= 2, got {base}")
        self.channels = [base // 2, base, 4 * base, 8 * base, 16 * base]
        self.stage1 = ConvBNReLU(in_channels, base // 2, 3, stride=2)
        self.stage2 = ConvBNReLU(base // 2, base, 3, stride=2)
        stages = []
        c_in = base
        for c_out, n in zip(self.channels[2:], STDC_LAYERS[variant]):
            mods = [STDCModule(c_in, c_out, 2, blocks)] + [STDCModule(c_out, c_out, 1, blocks) for _ in range(n - 1)]
            stages.append(nn.Sequential(*mods))
            c_in = c_out
        self.stage3, self.stage4, self.stage5 = stages
        self.head: nn.Module | None = None
        if classifier_classes is not None:
            c_last = max(1024, 16 * base)
            self.head = nn.ModuleDict(
                {
                    "conv_last": ConvBNReLU(16 * base, c_last, 1),
                    "fc": nn.Linear(c_last, c_last, bias=False),
                    "bn": nn.BatchNorm1d(c_last),
                    "linear": nn.Linear(c_last, classifier_classes, bias=False),
                }
            )
        init_he(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(B, C, H, W)`` → features at strides 2, 4, 8, 16, 32."""
        f2 = self.stage1(x)
        f4 = self.stage2(f2)
        f8 = self.stage3(f4)
        f16 = self.stage4(f8)
        return f2, f4, f8, f16, self.stage5(f16)

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet-style logits ``(B, classifier_classes)`` (needs ``classifier_classes``)."""
        if self.head is None:
            raise RuntimeError("STDCNet was built without a classifier (classifier_classes=None)")
        h = self.head
        out = h["conv_last"](self.forward(x)[-1]).mean(dim=(2, 3))
        out = F.relu(h["bn"](h["fc"](out)))
        return h["linear"](F.dropout(out, 0.2, self.training))


class AttentionRefinement(nn.Module):
    """ARM: 3×3 ConvX, then channel attention (global average → 1×1 conv → BN → sigmoid)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.attention = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 1, bias=False), PooledBatchNorm2d(out_channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in, h, w)`` → ``(B, out, h, w)``."""
        feat = self.conv(x)
        return feat * self.attention(feat.mean(dim=(2, 3), keepdim=True))


class FeatureFusion(nn.Module):
    """FFM: concat → 1×1 ConvX → squeeze-excitation attention (reduction 4), added to its input."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 1)
        self.attention = nn.Sequential(
            nn.Conv2d(out_channels, out_channels // 4, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels // 4, out_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        """Fuse two ``(B, ·, h, w)`` maps → ``(B, out, h, w)``."""
        feat = self.conv(torch.cat([spatial, context], dim=1))
        return feat + feat * self.attention(feat.mean(dim=(2, 3), keepdim=True))


class SegHead(nn.Sequential):
    """3×3 ConvX to ``mid_channels`` → 1×1 conv (no bias) to ``out_channels`` (BiSeNetOutput)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, mid_channels, 3), nn.Conv2d(mid_channels, out_channels, 1, bias=False))


LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))


def detail_target(label: Tensor, strides: Sequence[int] = (1, 2, 4), weights: Sequence[float] = (0.6, 0.3, 0.1)) -> Tensor:
    """Binary detail ground truth from a class map (STDC's Laplacian pyramid).

    Args:
        label: ``(B, 1, H, W)`` or ``(B, H, W)`` integer class map.
        strides: Laplacian strides (the paper: 1, 2, 4).
        weights: fusion weights of the strides (the reference code: 0.6, 0.3, 0.1).

    Returns:
        ``(B, 1, H, W)`` float tensor of 0 / 1 (1 on class boundaries).
    """
    if label.dim() == 3:
        label = label[:, None]
    lab = label.float()
    kernel = torch.tensor(LAPLACIAN, dtype=lab.dtype, device=lab.device)[None, None]
    fused = torch.zeros_like(lab)
    for stride, w in zip(strides, weights):
        edge = F.conv2d(lab, kernel, stride=stride, padding=1).clamp(min=0)
        if stride > 1:
            edge = F.interpolate(edge, size=lab.shape[-2:], mode="nearest")
        fused = fused + w * (edge > 0.1).float()
    return (fused > 0.1).float()


def detail_loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """BCE-with-logits + Dice loss (smooth 1, averaged over the batch) of a detail map ``(B, 1, H, W)``."""
    logits = resize_to(logits.float(), target.shape[-2:])
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
    return bce + dice.mean()


@MODELS.register("stdc")
class STDCSeg(nn.Module):
    """STDC-Seg: STDC backbone, context path with ARMs, FFM with the 1/8 features, seg head.

    Args:
        in_channels: image channels.
        num_classes: output classes (background included).
        variant: backbone, ``"stdc1"`` or ``"stdc2"``.
        base: backbone width (64 in the paper); the decoder widths scale with it
            (ARM / context 2·base = 128, FFM and head 4·base = 256, auxiliary heads base = 64).
        detail_loss: build the detail head and add the detail loss (BCE + Dice) in ``extra_loss``.
        detail_weight: weight of the detail loss (1 in the paper).
        aux_weight: weight of the cross-entropy of the two auxiliary context heads (1 in the
            paper); 0 builds no auxiliary heads.

    Shapes:
        ``forward``: ``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``;
        ``extra_loss(label)``: label ``(B, 1, H, W)`` int64 → scalar, from the last training
        forward.

    Example:
        >>> net = STDCSeg(1, 2, base=16)
        >>> net(torch.zeros(2, 1, 97, 131)).shape
        torch.Size([2, 2, 97, 131])
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"base": 8}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: Literal["stdc1", "stdc2"] = "stdc1",
        base: int = 64,
        detail_loss: bool = True,
        detail_weight: float = 1.0,
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = STDCNet(in_channels, variant, base)
        _, _, c8, c16, c32 = self.backbone.channels
        ctx = 2 * base
        # global context: 1×1 ConvX on the pooled 1/32 features (its BN sees one value per image)
        self.context_conv = nn.Sequential(
            nn.Conv2d(c32, ctx, 1, bias=False), PooledBatchNorm2d(ctx), nn.ReLU(inplace=True)
        )
        self.arm32 = AttentionRefinement(c32, ctx)
        self.arm16 = AttentionRefinement(c16, ctx)
        self.head32 = ConvBNReLU(ctx, ctx, 3)
        self.head16 = ConvBNReLU(ctx, ctx, 3)
        self.ffm = FeatureFusion(c8 + ctx, 4 * base)
        self.seg_head = SegHead(4 * base, 4 * base, num_classes)
        self.aux_weight = aux_weight
        self.detail_weight = detail_weight
        self.aux_heads = nn.ModuleList([SegHead(ctx, base, num_classes) for _ in range(2)]) if aux_weight else None
        self.detail_head = SegHead(c8, base, 1) if detail_loss else None
        init_he(self)
        self._train_outputs: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes, H, W)``."""
        _, _, f8, f16, f32 = self.backbone(x)
        context = self.context_conv(f32.mean(dim=(2, 3), keepdim=True))
        cp32 = self.head32(F.interpolate(self.arm32(f32) + context, size=f16.shape[-2:], mode="nearest"))
        cp16 = self.head16(F.interpolate(self.arm16(f16) + cp32, size=f8.shape[-2:], mode="nearest"))
        logits = resize_to(self.seg_head(self.ffm(f8, cp16)), x.shape[-2:])
        self._train_outputs = {}
        if self.training:
            if self.aux_heads is not None:
                self._train_outputs["aux16"] = self.aux_heads[0](cp16)
                self._train_outputs["aux32"] = self.aux_heads[1](cp32)
            if self.detail_head is not None:
                self._train_outputs["detail"] = self.detail_head(f8)
        return logits

    def extra_loss(self, label: Tensor) -> Tensor:
        """Auxiliary training loss of the last training forward: aux CE + detail BCE/Dice.

        Args:
            label: ``(B, 1, H, W)`` (or ``(B, H, W)``) int64 class map at the input size.

        Returns:
            A scalar tensor (0 when neither auxiliary heads nor the detail head are enabled).

        Raises:
            RuntimeError: no training-mode forward preceded the call while a head is enabled.
        """
        if self.aux_heads is None and self.detail_head is None:
            return next(self.parameters()).new_zeros(())
        if not self._train_outputs:
            raise RuntimeError("STDCSeg.extra_loss needs a training-mode forward first (model.train())")
        if label.dim() == 4:
            label = label[:, 0]
        loss = label.new_zeros((), dtype=torch.float32)
        if self.aux_heads is not None:
            for key in ("aux16", "aux32"):
                logits = resize_to(self._train_outputs[key].float(), label.shape[-2:])
                loss = loss + self.aux_weight * F.cross_entropy(logits, label)
        if self.detail_head is not None:
            with torch.autocast(label.device.type, enabled=False):
                target = detail_target(label)
                loss = loss + self.detail_weight * detail_loss_fn(self._train_outputs["detail"], target)
        return loss
