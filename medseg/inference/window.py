"""Sliding-window (overlap-tile) inference: the memory-bounded :func:`sliding_window` (bands of finished
rows from :func:`iter_sliding_window`; same tiles and Gaussian weights as MONAI's
``sliding_window_inference``) and :class:`SlidingWindow`, its settings from ``cfg.inference``.

With ``output="labels"`` each finished band is reduced to labels at once by
:func:`medseg.inference.postprocess.pixel_labels` (argmax, or the operating point's thresholds): the
per-pixel step of the operating point, so the band-wise class map equals the whole-image one.

Test-time augmentation of a batch of tiles (flips, scales) is :func:`predict_tiles`, shared with the
whole-slice path of :mod:`medseg.inference.predictor`.

Example:
    >>> labels, _ = sliding_window(image, model, (256, 256), 0.25, output="labels", threshold=[0.7])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from medseg.inference.postprocess import pixel_labels, quantise_probability
from medseg.runtime import TrainingError

__all__ = ["SlidingWindow", "importance_map", "iter_sliding_window", "predict_tiles", "sliding_window", "tile_starts"]

#: a model (or any callable) mapping tiles ``(N, C, th, tw)`` to logits ``(N, K, th, tw)``
TilePredictor = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- sliding window


def tile_starts(size: int, tile: int, interval: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` every ``interval`` px covering ``size`` (last one clamped).

    The same positions as MONAI's ``dense_patch_slices``: ``i·interval`` until a tile reaches the end,
    the last one moved back to end exactly at ``size``.
    """
    if size <= tile:
        return [0]
    interval = max(int(interval), 1)
    starts = []
    i = 0
    while True:
        s = i * interval
        if s + tile >= size:
            starts.append(size - tile)
            break
        starts.append(s)
        i += 1
    return starts


def _tile_weight(tile: tuple[int, int], blend: str, sigma_scale: float, margin: tuple[int, int],
                 device: torch.device) -> torch.Tensor:
    """``(th, tw)`` float32 blending weights: MONAI's Gaussian importance map, ones, or the valid centre."""
    if blend == "overlap_tile":
        w = torch.zeros(tile, device=device)
        my, mx = margin
        w[my: tile[0] - my, mx: tile[1] - mx] = 1.0
        return w
    if blend not in ("gaussian", "constant"):
        raise TrainingError(f"inference.blend must be gaussian, constant or overlap_tile, got {blend!r}")
    return importance_map(tile, blend, sigma_scale, device)


def importance_map(tile: tuple[int, int], blend: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``(th, tw)`` float32 blending weights, bit for bit MONAI's ``compute_importance_map`` (same float32
    operations in the same order) without importing MONAI: ``import monai`` pulls in matplotlib, pandas,
    scikit-learn and MLflow, ~300 MiB of resident memory that ``medseg predict`` has no other use for.

    ``gaussian``: the outer product of 1-D Gaussians ``exp(−x² / 2σ²)``, ``σ = sigma_scale × size``,
    ``x`` the distance from the tile's centre; ``constant``: ones. Clamped below at ``max(min, 1e-3)``.
    """
    if blend == "constant":
        weight = torch.ones(tile, device=device, dtype=torch.float)
    else:
        weight = torch.empty(0)
        for i, size in enumerate(tile):
            x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device=device)
            x = torch.exp(x**2 / (-2 * (size * sigma_scale) ** 2))
            weight = weight.unsqueeze(-1) * x[(None,) * i] if i > 0 else x
    floor = max(torch.min(weight).item(), 1e-3)
    return torch.clamp_(weight, min=floor)


def predict_tiles(predictor: TilePredictor, tiles: torch.Tensor, flips: bool, scales: Sequence[float]
                   ) -> torch.Tensor:
    """Logits of a tile batch, averaged over flips (none, H, W, HW) and scales when asked."""
    import torch.nn.functional as F

    outs = []
    for s in scales:
        x = tiles if s == 1.0 else F.interpolate(tiles, scale_factor=s, mode="bilinear", align_corners=False)
        for dims in ([], [-1], [-2], [-2, -1]) if flips else ([],):
            y = predictor(x.flip(dims) if dims else x)
            y = y.flip(dims) if dims else y
            if s != 1.0:
                y = F.interpolate(y, size=tiles.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(y.float())
    return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)


@torch.no_grad()
def iter_sliding_window(
    image: torch.Tensor,
    predictor: TilePredictor,
    tile_size: Sequence[int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    flips: bool = False,
    scales: Sequence[float] = (1.0,),
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Sliding-window logits, streamed as bands of finished rows: ``(y0, y1, logits (B, K, y1 − y0, W))``.

    Memory is bounded by one tile batch and one band of tile rows: logits are accumulated only for
    the rows the current tile row covers, and rows no later tile touches are emitted (blended) and
    dropped. An 8192² image never holds per-class float maps of the whole image.

    * ``blend="gaussian"`` / ``"constant"``: tiles every ``int(tile·(1 − overlap))`` px, weighted by
      MONAI's importance map (``sigma_scale``) — the same tiles and weights as MONAI's
      ``sliding_window_inference``. An image smaller than a tile is mirror-padded to one tile.
    * ``blend="overlap_tile"`` (U-Net paper): the image is mirror-padded by a margin of
      ``overlap·tile/2`` px and each tile keeps only its valid centre (tile − 2·margin).
    * ``flips`` averages the logits of the tile and its H, W and HW flips; ``scales`` averages over
      tiles resized by each factor (DeepLab's multi-scale inputs), logits resized back.

    Args:
        image: ``(B, C, H, W)`` on any device (moved to ``device`` once, pinned from the host to CUDA).
        predictor: tiles ``(N, C, th, tw)`` → logits ``(N, K, th, tw)``.
        tile_size: ``(th, tw)``.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per forward pass.
        device: where tiles are predicted and accumulated (default: the image's device).

    Yields:
        ``(y0, y1, logits)`` for consecutive row ranges covering ``[0, H)``; float32 on ``device``.
    """
    from medseg.models.blocks import mirror_pad

    if not 0.0 <= overlap < 1.0:
        raise TrainingError(f"inference.overlap must be in [0, 1), got {overlap}")
    dev = torch.device(device) if device is not None else image.device
    b, _, h, w = image.shape
    th, tw = (int(t) for t in tile_size)
    if blend == "overlap_tile":
        my, mx = int(round(th * overlap / 2)), int(round(tw * overlap / 2))
        iy, ix = th - 2 * my, tw - 2 * mx
        pads = [my, my + max(th - (h + 2 * my), 0), mx, mx + max(tw - (w + 2 * mx), 0)]
    else:
        my = mx = 0
        iy = th if th == h else int(th * (1 - overlap))
        ix = tw if tw == w else int(tw * (1 - overlap))
        dh, dw = max(th - h, 0), max(tw - w, 0)
        pads = [dh // 2, dh - dh // 2, dw // 2, dw - dw // 2]
    src = mirror_pad(image, *pads) if any(pads) else image
    if src.device != dev:  # the image moves to the device once (pinned from the host to CUDA), never per tile batch
        if dev.type == "cuda" and src.device.type == "cpu":
            src = src.pin_memory()
        src = src.to(dev, non_blocking=True)
    hp, wp = src.shape[-2:]
    ys, xs = tile_starts(hp, th, iy), tile_starts(wp, tw, ix)
    # built on the host (MONAI's map reads a minimum back) and copied once: no device read-back
    weight = _tile_weight((th, tw), blend, sigma_scale, (my, mx), torch.device("cpu")).to(dev)
    top, left = pads[0], pads[2]

    acc: torch.Tensor | None = None  # (B, K, th, wp): rows [origin, origin + th) of the padded image
    wsum = torch.zeros(th, wp, device=dev)
    origin = ys[0]
    emitted = 0  # image rows emitted so far

    def emit(n_rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        nonlocal emitted
        # padded rows [origin, origin + n_rows) are final; keep those inside the image
        lo, hi = max(origin, top + emitted), min(origin + n_rows, top + h)
        if hi > lo and acc is not None:
            band = acc[:, :, lo - origin: hi - origin, left: left + w] / wsum[lo - origin: hi - origin, left: left + w]
            yield lo - top, hi - top, band
            emitted = hi - top

    # tiles in row order, batched across rows (as many forward passes as MONAI); the band moves down
    # when the first tile of a new row is accumulated
    tiles = [(y, bi, x) for y in ys for bi in range(b) for x in xs]
    row = None
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i: i + batch_size]
        batch = torch.cat([src[bi: bi + 1, :, y: y + th, x: x + tw] for y, bi, x in chunk])
        # one weighting per batch, in place: predict_tiles returns a fresh tensor (a forward's output
        # or its float32 copy; at most a view of the fresh ``batch``)
        out = predict_tiles(predictor, batch, flips, scales).mul_(weight)
        if acc is None:
            acc = torch.zeros(b, out.shape[1], th, wp, device=dev)
        for j, (y, bi, x) in enumerate(chunk):
            if y != row:
                shift = y - origin
                if shift:
                    yield from emit(shift)
                    keep = max(th - shift, 0)
                    if keep:  # the rows still open move up (a temporary copy only if source and target overlap)
                        tail_acc, tail_w = acc[:, :, shift: shift + keep], wsum[shift: shift + keep]
                        acc[:, :, :keep].copy_(tail_acc.clone() if shift < keep else tail_acc)
                        wsum[:keep].copy_(tail_w.clone() if shift < keep else tail_w)
                    acc[:, :, keep:].zero_()
                    wsum[keep:].zero_()
                    origin = y
                for xw in xs:  # tile by tile, in MONAI's order (the same float sums)
                    wsum[:, xw: xw + tw].add_(weight)
                row = y
            acc[bi, :, :, x: x + tw].add_(out[j])
    yield from emit(min(th, hp - origin))


@torch.no_grad()
def sliding_window(
    image: torch.Tensor,
    predictor: TilePredictor,
    tile_size: Sequence[int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    flips: bool = False,
    scales: Sequence[float] = (1.0,),
    device: torch.device | str | None = None,
    output: str = "logits",
    probabilities: bool = False,
    threshold: Sequence[float] | None = None,
    prob_dtype: torch.dtype = torch.float32,
) -> Any:
    """Sliding-window inference over ``(B, C, H, W)`` images (see :func:`iter_sliding_window`).

    Args:
        output: ``"logits"`` → float32 ``(B, K, H, W)`` on ``device`` (the whole map: for slices);
            ``"labels"`` → ``(labels uint8/int64 (B, H, W), probability float32 (B, H, W) or None)``
            on the CPU, built band by band by :func:`~medseg.inference.postprocess.pixel_labels` —
            each pixel's class (argmax, or at ``threshold``) and, with ``probabilities``, that class's
            softmax probability; never the per-class maps of the whole image.
        threshold: ``output="labels"`` only: one probability threshold per foreground class
            (``inference.threshold``); None / empty = argmax.
        prob_dtype: the probability map's dtype: float32, or ``torch.uint16`` for fixed point
            (:func:`~medseg.inference.postprocess.quantise_probability`, each band as it is finished:
            half the memory of the whole image's map).

    Example:
        >>> labels, prob = sliding_window(img, model, (256, 256), 0.25, output="labels", probabilities=True)
    """
    bands = iter_sliding_window(image, predictor, tile_size, overlap, blend, batch_size, sigma_scale,
                                flips, scales, device)
    if output == "logits":
        return torch.cat([band for _, _, band in bands], dim=2)
    if output != "labels":
        raise ValueError(f"output must be logits or labels, got {output!r}")
    b, _, h, w = image.shape
    labels: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    cuda: torch.device | None = None
    for y0, y1, band in bands:
        if labels is None:
            # on CUDA: pinned host buffers and asynchronous copies, one synchronisation at the end (a
            # blocking copy per band would make the GPU wait while the next band's tiles are queued)
            cuda = band.device if band.is_cuda else None
            labels = torch.empty(b, h, w, dtype=torch.uint8 if band.shape[1] <= 256 else torch.int64,
                                 pin_memory=cuda is not None)
            prob = torch.empty(b, h, w, dtype=prob_dtype, pin_memory=cuda is not None) if probabilities else None
        lab, p = pixel_labels(band, threshold, probabilities)
        if prob is not None and p is not None:
            p = quantise_probability(p) if prob_dtype == torch.uint16 else p
            prob[:, y0:y1].copy_(p, non_blocking=cuda is not None)
        labels[:, y0:y1].copy_(lab.to(labels.dtype), non_blocking=cuda is not None)
    if cuda is not None:
        torch.cuda.current_stream(cuda).synchronize()
    return labels, prob


class SlidingWindow:
    """Sliding-window settings from ``cfg.inference`` around :func:`sliding_window` (a thin class).

    Example:
        >>> sw = SlidingWindow.from_config(cfg.inference)
        >>> logits = sw(image, model)                       # (B, K, H, W)
    """

    def __init__(self, tile_size: Sequence[int], overlap: float = 0.25, blend: str = "gaussian",
                 batch_size: int = 4, sigma_scale: float = 0.125, flips: bool = False,
                 scales: Sequence[float] = (1.0,), device: torch.device | str | None = None) -> None:
        self.kwargs = dict(tile_size=tuple(tile_size), overlap=overlap, blend=blend, batch_size=batch_size,
                           sigma_scale=sigma_scale, flips=flips, scales=tuple(scales), device=device)

    @classmethod
    def from_config(cls, inf: Any, device: torch.device | str | None = None) -> SlidingWindow:
        """From an :class:`~medseg.config.InferenceConfig`."""
        return cls(inf.tile_size, inf.overlap, inf.blend, inf.batch_size, inf.sigma_scale, inf.tta_flips,
                   inf.tta_scales, device)

    def __call__(self, image: torch.Tensor, predictor: TilePredictor, output: str = "logits",
                 probabilities: bool = False, threshold: Sequence[float] | None = None,
                 prob_dtype: torch.dtype = torch.float32) -> Any:
        """:func:`sliding_window` with these settings (``threshold`` applies to ``output="labels"``)."""
        return sliding_window(image, predictor, output=output, probabilities=probabilities, threshold=threshold,
                              prob_dtype=prob_dtype, **self.kwargs)
