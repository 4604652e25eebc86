"""Inference: logits for a batch (whole image or sliding window) and post-processing (incl. the dense CRF).

Plain functions — :func:`predict_logits`, :func:`postprocess`, the memory-bounded
:func:`sliding_window` (bands of finished rows from :func:`iter_sliding_window`; same tiles and
Gaussian weights as MONAI's ``sliding_window_inference``) — and thin classes around them:
:class:`SlidingWindow` (settings from ``cfg.inference``) and :class:`Predictor` (a loaded model and its config). Evaluation (:mod:`medseg.evaluation`) and validation call the
same functions, so a metric and a saved prediction always come from the same computation.

Example:
    >>> predictor = Predictor.from_ref("outputs/quickstart/unet-20261130-101500")
    >>> labels = predictor(batch["image"], [m["spacing"] for m in batch["meta"]])   # (B, H, W)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.checkpoint import load_model
from medseg.config import Config, from_dict
from medseg.runtime import TrainingError, amp_dtype, resolve_device, use_amp

__all__ = ["Predictor", "SlidingWindow", "foreground_probability", "iter_sliding_window", "postprocess", "predict_logits", "sliding_window",
           "tile_starts"]

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
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tile, mode=blend, sigma_scale=sigma_scale, device=device,
                                  dtype=torch.float32).float()


def _predict_tiles(predictor: TilePredictor, tiles: torch.Tensor, flips: bool, scales: Sequence[float]
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
        image: ``(B, C, H, W)`` on any device (tiles are moved to ``device`` batch by batch).
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
    hp, wp = src.shape[-2:]
    ys, xs = tile_starts(hp, th, iy), tile_starts(wp, tw, ix)
    weight = _tile_weight((th, tw), blend, sigma_scale, (my, mx), dev)
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

    tiles = [(bi, x) for bi in range(b) for x in xs]
    for y in ys:
        shift = y - origin
        if shift:
            yield from emit(shift)
            if acc is not None:
                keep = max(th - shift, 0)
                acc[:, :, :keep] = acc[:, :, shift: shift + keep].clone()
                acc[:, :, keep:] = 0
            keep = max(th - shift, 0)
            wsum[:keep] = wsum[shift: shift + keep].clone()
            wsum[keep:] = 0
            origin = y
        for x in xs:
            wsum[:, x: x + tw] += weight
        for i in range(0, len(tiles), batch_size):
            chunk = tiles[i: i + batch_size]
            batch = torch.stack([src[bi, :, y: y + th, x: x + tw] for bi, x in chunk]).to(dev)
            out = _predict_tiles(predictor, batch, flips, scales)
            if acc is None:
                acc = torch.zeros(b, out.shape[1], th, wp, device=dev)
            for (bi, x), o in zip(chunk, out):
                acc[bi, :, :, x: x + tw] += o * weight
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
) -> Any:
    """Sliding-window inference over ``(B, C, H, W)`` images (see :func:`iter_sliding_window`).

    Args:
        output: ``"logits"`` → float32 ``(B, K, H, W)`` on ``device`` (the whole map: for slices);
            ``"labels"`` → ``(labels uint8/int64 (B, H, W), probability float32 (B, H, W) or None)``
            on the CPU, built band by band — the winning class and, with ``probabilities``, its
            softmax probability; never the per-class maps of the whole image.

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
            prob = torch.empty(b, h, w, dtype=torch.float32, pin_memory=cuda is not None) if probabilities else None
        if prob is not None:
            p, lab = torch.softmax(band, 1).max(1)
            prob[:, y0:y1].copy_(p, non_blocking=cuda is not None)
        else:
            lab = band.max(1).indices  # torch's CPU argmax over a non-inner dim is ~16× slower
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
                 probabilities: bool = False) -> Any:
        return sliding_window(image, predictor, output=output, probabilities=probabilities, **self.kwargs)



@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` (float32) for images ``(B, C, H, W)``: whole-slice or sliding-window.

    ``inference.mode = "sliding"`` tiles the image with :func:`sliding_window` (``inference.tile_size``,
    ``overlap``, ``blend``, ``batch_size`` tiles at a time); an image smaller than a tile is
    mirror-padded so that every tile sees real context. The test-time augmentation
    (``inference.tta_flips``, ``inference.tta_scales``) applies in both modes: the whole slice, or each
    tile, is predicted with its flips / at its scales and the logits are averaged.
    """
    image = image.to(device)
    inf = cfg.inference
    # float16 autocast on CUDA; on the CPU inference stays float32: bfloat16 autocast, which speeds up
    # training steps on small crops, made a whole 299² slice 31x slower than float32 on this CPU
    amp = device.type == "cuda" and use_amp(cfg.train.amp, device)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        if inf.mode == "whole":
            out = _predict_tiles(model, image, inf.tta_flips, inf.tta_scales)
        elif inf.mode == "sliding":
            out = SlidingWindow.from_config(inf, device)(image, model)
        else:
            raise TrainingError(f"inference.mode must be whole or sliding, got {inf.mode!r}")
    return out.float()


def postprocess(
    logits: torch.Tensor, image: torch.Tensor, cfg: Config, spacing: Sequence[Sequence[float]] | None = None
) -> torch.Tensor:
    """Class map ``(B, H, W)`` (int64, on the logits' device) from logits, at the configured operating point.

    ``argmax``, the per-class probability thresholds ``inference.threshold`` (see
    :mod:`medseg.operating_point`), or the dense CRF when ``inference.crf.enabled``: it sees every
    context channel of the image (as a multi-channel bilateral feature) and, with ``spacing`` (per
    image ``(sy, sx)`` mm/px), measures its kernels in millimetres. Then components smaller than
    ``inference.min_object_mm2`` (mm² with ``spacing``) become background.
    """
    from medseg.operating_point import remove_small_objects, threshold_labels

    inf = cfg.inference
    if inf.crf.enabled:
        from medseg.crf import crf_labels

        probs = torch.softmax(logits, 1).cpu().numpy()
        img = image.cpu().numpy()
        out = [crf_labels(probs[b], img[b], inf.crf, spacing[b] if spacing is not None else None)
               for b in range(len(probs))]
        labels = torch.as_tensor(np.stack(out)).long().to(logits.device)
    elif inf.threshold:
        labels = threshold_labels(torch.softmax(logits, 1), inf.threshold)
    else:
        labels = logits.argmax(1)
    if inf.min_object_mm2:
        labels = remove_small_objects(labels, inf.min_object_mm2, spacing, cfg.metrics.connectivity)
    return labels


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` float32 probability that a pixel is lesion (any class but 0): 1 − softmax[:, 0].

    The network's own probabilities, before any post-processing: with the dense CRF on, the class
    map of :func:`postprocess` comes from the CRF, while FROC candidates come from this map.
    """
    return 1.0 - torch.softmax(logits.float(), 1)[:, 0]


class Predictor:
    """A loaded model and the config it predicts with (inference and post-processing settings).

    Args:
        model: the network (moved to ``device`` and put in eval mode).
        cfg: the config whose ``inference`` and ``train.amp`` apply.
        device: where it runs (None = ``train.device`` of ``cfg``, ``auto`` picks CUDA when present).
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_ref(cls, ref: str | Path, cfg: Config | None = None, overrides: list[str] | None = None,
                 device: torch.device | str | None = None) -> Predictor:
        """Load a checkpoint, run folder or ``runs:/…`` model; the config is ``cfg`` or the model's own.

        ``overrides`` (``key=value``) apply on top of the model's own config. The model's stored
        operating point applies where ``cfg`` leaves it unset (as in ``medseg evaluate``).
        """
        dev = torch.device(device) if device is not None else resolve_device(cfg.train.device if cfg else "auto")
        model, info = load_model(ref, dev)
        if cfg is None:
            if info.get("config") is None:
                raise TrainingError(f"{ref}: the model carries no config; pass the pipeline YAML")
            data: dict[str, Any] = info["config"]
            from medseg.config import apply_override

            for ov in overrides or []:
                data = apply_override(data, ov)
            cfg = from_dict(data)
        from medseg.operating_point import resolve_operating_point

        return cls(model, resolve_operating_point(cfg, info.get("config")), dev)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for ``(B, C, H, W)`` images."""
        return predict_logits(self.model, image, self.cfg, self.device)

    def __call__(self, image: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
        """Class maps ``(B, H, W)`` (on the CPU) for ``(B, C, H, W)`` images."""
        return postprocess(self.logits(image), image, self.cfg, spacing).cpu()
