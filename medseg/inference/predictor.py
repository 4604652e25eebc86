"""Predicting with a trained model: logits for a batch (whole slice or sliding window, with test-time
augmentation), class maps at the operating point, the foreground probability map, and
:class:`Predictor` — a loaded model, its config and its stored operating point. Evaluation,
validation, calibration and ``medseg predict`` all call these, so a metric and a saved prediction
always come from the same computation.

Two routes to a class map, one operating point (:mod:`medseg.inference.postprocess`):

* :func:`predict_logits` + :func:`~medseg.inference.postprocess.postprocess` — the whole image's
  logits (evaluation keeps them for the loss and FROC);
* :func:`predict_labels` — what ``medseg predict`` and :class:`Predictor` use: in sliding mode (CRF
  off) the window reduces each band to labels at the thresholds as it finishes, memory bounded by a
  band, then the size filter runs on the class map; else the first route. Both give the same map.

Example:
    >>> predictor = Predictor.from_ref("outputs/quickstart/unet-20261130-101500")
    >>> labels = predictor(batch["image"], [m["spacing"] for m in batch["meta"]])   # (B, H, W)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, from_dict
from medseg.inference.postprocess import (
    hysteresis_on,
    object_labels,
    pixel_step,
    pixel_threshold,
    quantise_probability,
    resolve_operating_point,
)
from medseg.inference.window import SlidingWindow, predict_tiles
from medseg.models.checkpoint import load_model
from medseg.runtime import TrainingError, amp_dtype, resolve_device, use_amp

__all__ = ["Predictor", "foreground_probability", "predict_labels", "predict_logits"]


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """float16 autocast on CUDA; on the CPU inference stays float32: bfloat16 autocast, which speeds up
    training steps on small crops, made a whole 299² slice 31x slower than float32 on this CPU."""
    amp = device.type == "cuda" and use_amp(cfg.train.amp, device)
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp)


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
    with _autocast(cfg, device):
        if inf.mode == "whole":
            out = predict_tiles(model, image, inf.tta_flips, inf.tta_scales)
        elif inf.mode == "sliding":
            out = SlidingWindow.from_config(inf, device)(image, model)
        else:
            raise TrainingError(f"inference.mode must be whole or sliding, got {inf.mode!r}")
    return out.float()


@torch.no_grad()
def predict_labels(model: nn.Module, image: torch.Tensor, cfg: Config, device: torch.device,
                   spacing: Sequence[Sequence[float]] | None = None, probabilities: bool = False,
                   prob_dtype: torch.dtype = torch.float32, objects: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class maps ``(B, H, W)`` (on the CPU) at the operating point for images ``(B, C, H, W)``.

    ``inference.mode = "sliding"`` with the CRF off: the window turns each finished band into labels
    (:func:`~medseg.inference.postprocess.pixel_labels` at
    :func:`~medseg.inference.postprocess.pixel_threshold`) and never holds the per-class maps of the
    whole image. Otherwise (whole-slice mode, or the CRF, which needs the whole image's probabilities):
    :func:`predict_logits` then :func:`~medseg.inference.postprocess.pixel_step`. Then, with
    ``objects``, :func:`~medseg.inference.postprocess.object_labels` on each image (hysteresis in 2-D,
    ``inference.min_object_mm2``). Both give the class map of ``postprocess(predict_logits(...))``.

    Args:
        spacing: per image ``(sy, sx)`` mm/px, for the size filter and the CRF.
        probabilities: also return each pixel's softmax probability of its label before the object
            step (with the CRF: of its final label) — on every lesion pixel, the probability of
            its class — ``(B, H, W)`` on the CPU, float32 or, with ``prob_dtype = torch.uint16``, fixed point
            (:func:`~medseg.inference.postprocess.quantise_probability`); else None.
        objects: False = step 1 only: the caller runs ``object_labels`` itself, e.g. on a whole series
            (``medseg predict``: hysteresis in 3-D), with the probabilities this returns.

    Returns:
        ``(labels, probability or None)``; labels are uint8 (int64 above 256 classes) in sliding
        mode and int64 otherwise.
    """
    inf = cfg.inference
    want_prob = probabilities or (objects and hysteresis_on(inf))
    if inf.mode == "sliding" and not inf.crf.enabled:
        with _autocast(cfg, device):
            labels, prob = SlidingWindow.from_config(inf, device)(image, model, output="labels",
                                                                  probabilities=want_prob,
                                                                  threshold=pixel_threshold(inf),
                                                                  prob_dtype=prob_dtype)
    else:
        labels, prob = pixel_step(predict_logits(model, image, cfg, device), image, cfg, spacing, want_prob)
        labels = labels.cpu()
        if prob is not None:
            prob = (quantise_probability(prob) if prob_dtype == torch.uint16 else prob.float()).cpu()
    if objects:
        labels = object_labels(labels, cfg, spacing, prob)
    return labels, prob if probabilities else None


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
        return cls(model, resolve_operating_point(cfg, info.get("config")), dev)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for ``(B, C, H, W)`` images."""
        return predict_logits(self.model, image, self.cfg, self.device)

    def labels(self, image: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None,
               probabilities: bool = False, prob_dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class maps at the operating point and, with ``probabilities``, each label's probability
        (see :func:`predict_labels`)."""
        return predict_labels(self.model, image, self.cfg, self.device, spacing, probabilities, prob_dtype)

    def __call__(self, image: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
        """Class maps ``(B, H, W)`` (int64, on the CPU) for ``(B, C, H, W)`` images."""
        return self.labels(image, spacing)[0].long()
