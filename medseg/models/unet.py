"""U-Net (Ronneberger, Fischer & Brox 2015), with the paper's valid convolutions and overlap-tile.

Hand-written rather than MONAI's ``UNet`` / ``BasicUNet``: those use strided convolutions or
padded convs only, and have neither the paper's unpadded ("valid") mode nor its overlap-tile
mirroring, which medseg reproduces.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from medseg.models.blocks import center_crop, mirror_pad
from medseg.registry import MODELS


def _check_depth(depth: int) -> None:
    """Reject a depth below 1."""
    if depth < 1:
        raise ValueError(f"U-Net depth must be >= 1, got {depth}")


def _valid_output(n: int, depth: int) -> int | None:
    """Valid-mode output size for input ``n``, or None when ``n`` is not a valid input size."""
    size = n
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:  # a 2×2 max-pool needs an even, non-empty map
            return None
        size //= 2
    size -= 4
    for _ in range(depth):
        if size <= 0:
            return None
        size = 2 * size - 4
    return size if size > 0 else None


def valid_output_size(n: int, depth: int = 4) -> int:
    """Output size of the raw valid-convolution U-Net for input size ``n`` (one axis).

    Every unpadded 3×3 conv pair removes 4 pixels, every 2×2 max-pool needs an even size and
    halves it, every 2×2 up-convolution doubles it: 572 → 388 at depth 4.

    Raises:
        ValueError: ``n`` is not a valid input size; the message names the next valid one.
    """
    _check_depth(depth)
    out = _valid_output(n, depth)
    if out is None:
        nxt = valid_input_size(1, depth)
        while nxt < n:
            nxt += 2**depth  # valid input sizes are evenly spaced by 2^depth
        raise ValueError(
            f"{n} is not a valid input size for a valid-convolution U-Net of depth {depth} "
            f"(every pooled map must be even and non-empty); the next valid size is {nxt}"
        )
    return out


def valid_input_size(n: int, depth: int = 4) -> int:
    """Smallest valid input size whose valid output covers at least ``n`` pixels (one axis).

    With ``b`` the bottleneck size, input = 2^d·(b + 4) + 4·(2^d − 1) and
    output = 2^d·(b − 4) + 4 (572 → 388 for d = 4, b = 28), so the overlap-tile margin
    (input − output) / 2 is 6·2^d − 4: 92 px at depth 4.
    """
    _check_depth(depth)
    scale = 2**depth
    b = 1
    # every decoder stage size 2^k·(b − 4) + 4 must stay positive, and the output must cover n
    while not (all(2**k * (b - 4) + 4 > 0 for k in range(1, depth + 1)) and scale * (b - 4) + 4 >= n):
        b += 1
    return scale * (b + 4) + 4 * (scale - 1)


class DoubleConv(nn.Sequential):
    """Two 3×3 convs, each → (BN) → ReLU; ``padding`` 0 in valid mode, 1 in same mode."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            # a bias before BN is redundant (BN's shift absorbs it)
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


@MODELS.register("unet")
class UNet(nn.Module):
    """U-Net for any input size: ``(B, in_channels, H, W)`` → logits ``(B, num_classes, H, W)``.

    Contracting path: ``depth`` levels of a 3×3 conv pair then 2×2 max-pool, channels doubling from
    ``base_channels``; a bottleneck conv pair followed by dropout (the end of the contracting
    path). Expanding path: 2×2 up-convolution halving the channels, concatenation with the
    (centre-cropped) skip, a 3×3 conv pair; a final 1×1 conv to the classes.

    ``padding="same"`` (the common modern variant): padded convs; the input is mirror-padded to a
    multiple of 2^depth and the output cropped back. ``padding="valid"`` (the paper): unpadded
    convs, so the raw network maps 572 → 388 (:meth:`forward_valid`); :meth:`forward` applies the
    overlap-tile strategy — it mirror-pads the input by the valid margin (92 px at depth 4) so the
    valid output covers exactly the input, then crops.

    Args:
        in_channels: input channels (e.g. 3 for 2.5-D CT: the key slice and its neighbours).
        num_classes: output classes (background included).
        base_channels: channels of the first level (64 in the paper; ≈31.0 M parameters).
        depth: number of poolings (4 in the paper).
        dropout: dropout probability at the end of the contracting path (0 disables).
        padding: ``"same"`` or ``"valid"``.
        batch_norm: BN after every 3×3 conv (not in the 2015 paper; helps training from scratch).

    Example:
        >>> net = UNet(in_channels=3, num_classes=2, base_channels=8)
        >>> net(torch.zeros(1, 3, 97, 131)).shape
        torch.Size([1, 2, 97, 131])
    """

    #: reduced-size constructor params for the registry-driven model tests
    test_params: ClassVar[dict[str, Any]] = {"base_channels": 4, "depth": 3}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        depth: int = 4,
        dropout: float = 0.5,
        padding: Literal["same", "valid"] = "same",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_depth(depth)
        if padding not in ("same", "valid"):
            raise ValueError(f"U-Net padding must be 'same' or 'valid', got {padding!r}")
        self.depth = depth
        self.padding = padding
        pad = 1 if padding == "same" else 0
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(c_in, w, pad, batch_norm))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1], pad, batch_norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, kernel_size=2, stride=2))
            self.up_conv.append(DoubleConv(2 * w, w, pad, batch_norm))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def valid_output_size(self, n: int) -> int:
        """Output size of :meth:`forward_valid` for input size ``n`` (valid mode geometry)."""
        return valid_output_size(n, self.depth)

    def valid_input_size(self, n: int) -> int:
        """Smallest valid input size whose valid output covers ``n`` pixels."""
        return valid_input_size(n, self.depth)

    def forward_valid(self, x: Tensor) -> Tensor:
        """The raw network, without padding the input.

        Args:
            x: ``(B, in_channels, H, W)``; in valid mode H and W must be valid sizes
                (:func:`valid_input_size`), in same mode multiples of 2^depth.

        Returns:
            ``(B, num_classes, h, w)`` with ``h = valid_output_size(H)`` in valid mode, ``H`` in
            same mode.
        """
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = up(x)
            x = conv(torch.cat([center_crop(skip, *x.shape[-2:]), x], dim=1))
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the input's resolution.

        Args:
            x: ``(B, in_channels, H, W)``, any H, W.

        Returns:
            ``(B, num_classes, H, W)``.
        """
        h, w = x.shape[-2:]
        if self.padding == "valid":
            # overlap-tile: mirror the border so the valid output covers the whole input
            (top, bottom), (left, right) = (self._valid_pads(n) for n in (h, w))
        else:
            m = 2**self.depth
            ph, pw = -h % m, -w % m
            top, bottom, left, right = ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
        out = self.forward_valid(mirror_pad(x, top, bottom, left, right))
        # the valid output starts at input pixel 0 (its extra pixels, if any, lie after H / W)
        return out[..., :h, :w] if self.padding == "valid" else out[..., top : top + h, left : left + w]

    def _valid_pads(self, n: int) -> tuple[int, int]:
        """Mirror pads (before, after) making the valid output start at pixel 0 and cover ``n``."""
        m = valid_input_size(n, self.depth)
        margin = (m - valid_output_size(m, self.depth)) // 2
        return margin, m - n - margin
