"""Building blocks shared by the segmentation models.

Padding and cropping helpers that let every model take any input size, the conv–BN–ReLU units
of U-Net and DeepLab, and the loader for LOCAL pretrained backbone weights (nothing is ever
downloaded).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of a length-``n`` axis mirror-padded by ``before``/``after`` (any amounts)."""
    idx = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Mirror-pad the last two axes of ``x`` by any amounts (also more than the size itself).

    The reflection excludes the edge pixel (NumPy's ``mode="reflect"``) and repeats periodically,
    so a 97-pixel image can be padded by 200. ``F.pad(mode="reflect")`` refuses a pad larger
    than the input, which tiny inputs and the U-Net overlap-tile margin (92 px) need.

    Args:
        x: ``(..., H, W)``.
        top, bottom, left, right: non-negative pad amounts.

    Returns:
        ``(..., H + top + bottom, W + left + right)``.
    """
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pad amounts must be >= 0, got {(top, bottom, left, right)}")
    h, w = x.shape[-2:]
    if top or bottom:
        x = x.index_select(-2, _reflect_index(h, top, bottom, x.device))
    if left or right:
        x = x.index_select(-1, _reflect_index(w, left, right, x.device))
    return x


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """The central ``height × width`` window of ``x`` ``(..., H, W)`` (offsets rounded down)."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"cannot crop {h}x{w} to a larger {height}x{width}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size``.

    ``align_corners=False``: the reference TF DeepLab used True, which lines pixels up only for
    crop sizes of the form OS·k + 1 (513); medseg takes any size.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """``k×k`` conv (no bias, "same" padding for any dilation) → BN → ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size.
        stride: conv stride (a stride-2 conv maps H to ceil(H / 2)).
        dilation: atrous rate.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=dilation * (kernel_size // 2),
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise-separable 3×3 conv as in DeepLab v3+ / MobileNet.

    depthwise 3×3 (stride, dilation) → BN → ReLU → pointwise 1×1 → BN (→ ReLU when ``relu_out``).
    Xception puts a ReLU in front instead (``relu_out=False``) so the residual sum comes first.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: depthwise stride.
        dilation: depthwise atrous rate.
        relu_out: end with a ReLU.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, relu_out: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                in_channels,
                3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu_out:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def conv3x3_unit(
    in_channels: int, out_channels: int, dilation: int = 1, separable: bool = False
) -> nn.Sequential:
    """A 3×3 conv–BN–ReLU, depthwise-separable when ``separable`` (DeepLab ASPP / decoder)."""
    if separable:
        return SeparableConv(in_channels, out_channels, dilation=dilation)
    return ConvBNReLU(in_channels, out_channels, 3, dilation=dilation)


# ----------------------------------------------------------------------------- local weights


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """The tensor mapping inside a weights file (plain state dict or a checkpoint holding one)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "backbone"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(
        f"{path}: expected a state dict (a mapping of parameter names to tensors, possibly under "
        "'state_dict', 'model' or 'backbone'), got something else"
    )


def _strip_prefix(state: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """Drop a common wrapper prefix ('module.', 'backbone.', 'encoder.') when that makes keys match."""
    for prefix in ("module.", "backbone.", "encoder.", "module.backbone."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and len(set(stripped) & wanted) > len(set(state) & wanted):
            return stripped
    return state


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Adapt a pretrained first-conv weight ``(O, C, k, k)`` to ``in_channels`` inputs.

    The RGB filters are averaged and repeated, scaled by ``C / in_channels`` so the response
    to an image whose channels are all equal is unchanged (timm's ``adapt_input_conv`` idea).
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def load_local_weights(
    module: nn.Module, path: str | Path, first_conv: str, ignore_prefixes: tuple[str, ...] = ("fc.",)
) -> None:
    """Load a LOCAL weights file into ``module`` (never downloads).

    Accepts a plain state dict or a checkpoint dict holding one under ``state_dict`` / ``model`` /
    ``backbone``; strips a ``module.`` / ``backbone.`` / ``encoder.`` prefix; adapts the first
    conv (``first_conv``, a state-dict key) to the module's input channels; ignores classifier
    keys (``ignore_prefixes``). Keys are then matched exactly.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict, or its keys or shapes do not match (the
            message names the file and the first offending keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path} (a local file is expected)")
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    own = module.state_dict()
    state = _strip_prefix(state, set(own))
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    if first_conv in state and first_conv in own:
        state[first_conv] = adapt_first_conv(state[first_conv], own[first_conv].shape[1])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]
                )
            )
        raise ValueError(f"{path}: weights do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state)


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for globally pooled ``(B, C, 1, 1)`` features that also trains with a batch of one.

    Batch statistics need more than one value per channel (PyTorch raises otherwise, e.g. on the
    last batch of an epoch holding a single slice); such a batch is normalised with the running
    statistics, which it leaves unchanged, exactly as in eval mode.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` → same shape."""
        if self.training and x.numel() // x.shape[1] <= 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def init_he(module: nn.Module) -> None:
    """The initialisation every medseg model uses for its freshly built layers.

    He-normal (fan-out, ReLU) convolutions with zero biases, unit-γ / zero-β normalisation layers,
    and N(0, 0.001²) linear weights (STDC's classifier) — torchvision's and the reference
    implementations' scheme. Applied to a sub-module, it leaves the rest of the model untouched.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.001)
