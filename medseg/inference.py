"""Inference: logits for a batch (whole image or sliding window) and post-processing (incl. the dense CRF).

Plain functions — :func:`predict_logits`, :func:`postprocess` — and a thin :class:`Predictor` that
holds a loaded model and its config. Evaluation (:mod:`medseg.evaluation`) and validation call the
same functions, so a metric and a saved prediction always come from the same computation.

Example:
    >>> predictor = Predictor.from_ref("outputs/quickstart/unet-20261130-101500")
    >>> labels = predictor(batch["image"], [m["spacing"] for m in batch["meta"]])   # (B, H, W)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.checkpoint import load_model
from medseg.config import Config, from_dict
from medseg.runtime import TrainingError, amp_dtype, resolve_device, use_amp

__all__ = ["Predictor", "foreground_probability", "postprocess", "predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` (float32) for images ``(B, C, H, W)``: whole-slice or sliding-window.

    ``inference.mode = "sliding"`` tiles the image (``inference.tile_size``, ``overlap``, ``blend``,
    ``batch_size`` tiles at a time) with MONAI's ``sliding_window_inference``; an image smaller than a
    tile is mirror-padded so that every tile sees real context.
    """
    image = image.to(device)
    inf = cfg.inference
    # float16 autocast on CUDA; on the CPU inference stays float32: bfloat16 autocast, which speeds up
    # training steps on small crops, made a whole 299² slice 31x slower than float32 on this CPU
    amp = device.type == "cuda" and use_amp(cfg.train.amp, device)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        if inf.mode == "whole":
            out = model(image)
        elif inf.mode == "sliding":
            from monai.inferers import sliding_window_inference

            from medseg.models.blocks import mirror_pad

            h, w = image.shape[-2:]
            th, tw = inf.tile_size
            # MONAI's reflect padding refuses pads larger than the image: pad to at least one tile here
            ph, pw = max(th - h, 0), max(tw - w, 0)
            padded = mirror_pad(image, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2) if ph or pw else image
            out = sliding_window_inference(
                padded, roi_size=(th, tw), sw_batch_size=inf.batch_size, predictor=model,
                overlap=inf.overlap, mode=inf.blend, padding_mode="reflect",
            )
            out = out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
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
