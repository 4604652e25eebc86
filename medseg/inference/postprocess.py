"""The operating point: per-class probability thresholds and a minimum object size in mm².

Class balancing and the U-Net border term move a network's decision boundary, so argmax is not
always the best place to cut. An operating point is chosen on the validation split
(:mod:`medseg.evaluation.calibrate`, ``medseg calibrate``), stored in the checkpoint and the run's
config (``inference.threshold``, ``inference.min_object_mm2``), and applied in two steps, the same
for every caller (validation, ``medseg evaluate``, calibration, the ``Predictor``, ``medseg predict``):

1. :func:`pixel_labels` — per pixel: argmax, or the thresholds on the softmax probabilities
   (:func:`threshold_labels`). Per pixel, so the sliding window applies it band by band
   (:func:`medseg.inference.window.sliding_window` with ``output="labels"``) and never holds the
   per-class maps of a large image; the result equals the whole-image one pixel for pixel.
2. :func:`object_labels` — on the whole class map: with hysteresis (``inference.low_threshold``)
   step 1 cuts at the low thresholds and only the components that reach ``threshold`` somewhere are
   kept (:func:`keep_seeded`: 3-D within a series — the volume protocol, ``medseg predict`` — 2-D on
   single images); then components smaller than ``min_object_mm2`` become background
   (:func:`remove_small_objects`).

:func:`postprocess` is both steps on whole-image logits (with the dense CRF in place of step 1 when
``inference.crf.enabled``: the CRF needs the probabilities of the whole image).

``None`` in the config means "not set here": the model's stored operating point applies when it
has one (:func:`resolve_operating_point`), else argmax / no size filter. An empty threshold list
(``--set inference.threshold=[]``) forces argmax even for a calibrated model; ``--set
inference.min_object_mm2=0`` keeps every object.

Example:
    >>> labels = threshold_labels(probs, [0.7])              # (B, H, W) from (B, 2, H, W)
    >>> labels = remove_small_objects(labels, 20.0, [[0.8, 0.8]] * len(labels))
    >>> labels = postprocess(logits, image, cfg, spacing)    # both steps at cfg's operating point
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medseg.config import Config, ConfigError

__all__ = ["PROB_SCALE", "check_operating_point", "hysteresis_on", "keep_seeded", "object_labels", "pixel_labels",
           "pixel_step", "pixel_threshold", "postprocess", "quantise_probability", "remove_small_objects",
           "resolve_operating_point", "threshold_labels"]


def check_operating_point(threshold: Sequence[float] | None, min_object_mm2: float | None, num_classes: int,
                          low_threshold: Sequence[float] | None = None) -> None:
    """Raise :class:`ConfigError` for thresholds that are not one per foreground class in [0, 1], or
    hysteresis low thresholds without thresholds or above them."""
    if low_threshold:
        if not threshold:
            raise ConfigError(f"inference.low_threshold = {list(low_threshold)} needs inference.threshold (hysteresis "
                              "keeps a component down to the low threshold where it reaches the threshold); set "
                              "inference.threshold or --set inference.low_threshold=[]")
        if len(low_threshold) != len(threshold) or not all(0.0 <= lo <= t for lo, t in zip(low_threshold, threshold)):
            raise ConfigError(f"inference.low_threshold = {list(low_threshold)} needs one value per foreground class, "
                              f"each between 0 and its inference.threshold {list(threshold)}")
    if threshold:
        if len(threshold) != num_classes - 1:
            raise ConfigError(f"inference.threshold = {list(threshold)} needs one value per foreground class "
                              f"({num_classes - 1} for data.num_classes = {num_classes}), or [] for argmax")
        if not all(0.0 <= t <= 1.0 for t in threshold):
            raise ConfigError(f"inference.threshold = {list(threshold)}: probabilities must be in [0, 1]")
    if min_object_mm2 is not None and min_object_mm2 < 0:
        raise ConfigError(f"inference.min_object_mm2 = {min_object_mm2} must be >= 0")


def threshold_labels(probs: torch.Tensor, threshold: Sequence[float]) -> torch.Tensor:
    """Class map ``(B, H, W)`` from probabilities ``(B, K, H, W)`` and one threshold per foreground class.

    A pixel goes to the most probable foreground class among those whose probability reaches its
    threshold, else to background (class 0). With two classes: lesion where ``p₁ ≥ t₁``.
    """
    fg = probs[:, 1:]
    t = torch.as_tensor(list(threshold), dtype=fg.dtype, device=fg.device).view(1, -1, 1, 1)
    ok = fg >= t
    masked = torch.where(ok, fg, torch.full_like(fg, -1.0))
    best = masked.argmax(1)
    return torch.where(ok.any(1), best + 1, torch.zeros_like(best))


#: a probability stored as uint16 fixed point, ``round(p × PROB_SCALE)``: error ≤ 7.7e-6, 2 bytes a pixel
#: instead of float32's 4 (:func:`quantise_probability`)
PROB_SCALE = 65535


def quantise_probability(prob: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] → uint16 fixed point ``round(p × PROB_SCALE)`` (divide by :data:`PROB_SCALE`
    to read them back)."""
    return prob.float().mul(PROB_SCALE).round_().to(torch.uint16)


def pixel_labels(logits: torch.Tensor, threshold: Sequence[float] | None, probabilities: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 1 of the operating point, per pixel: class map ``(B, H, W)`` from logits ``(B, K, H, W)``.

    ``threshold`` (one per foreground class, see :func:`threshold_labels`) or, when None / empty,
    argmax. Each pixel's label depends on that pixel's logits only, so a band of rows gives the
    rows of the whole image's answer.

    Returns:
        ``(labels int64, probability float32 or None)``: with ``probabilities``, the softmax
        probability of each pixel's label, else None.
    """
    if threshold:
        probs = torch.softmax(logits.float(), 1)
        labels = threshold_labels(probs, threshold)
        prob = probs.gather(1, labels[:, None]).squeeze(1) if probabilities else None
        return labels, prob
    if probabilities:
        prob, labels = torch.softmax(logits.float(), 1).max(1)
        return labels, prob
    return logits.max(1).indices, None  # = argmax (first maximum); torch's CPU argmax over dim 1 is ~16× slower


def hysteresis_on(inf: Any) -> bool:
    """Whether the operating point in ``inf`` (an ``inference`` config) uses hysteresis."""
    return bool(inf.threshold) and bool(inf.low_threshold)


def pixel_threshold(inf: Any) -> list[float] | None:
    """The thresholds step 1 cuts at: ``inference.low_threshold`` with hysteresis, else ``inference.threshold``."""
    return list(inf.low_threshold) if hysteresis_on(inf) else inf.threshold


def keep_seeded(labels: np.ndarray, prob: np.ndarray, threshold: Sequence[float], volume: bool,
                connectivity: int) -> np.ndarray:
    """Hysteresis: the connected components of ``labels`` that hold a pixel at their class's ``threshold``.

    Args:
        labels: ``(B, H, W)`` class map cut at the low thresholds.
        prob: ``(B, H, W)`` each pixel's probability of its label, float or uint16 fixed point
            (:data:`PROB_SCALE`); compared in fixed point, so both give the same answer.
        threshold: one per foreground class: a component of class ``c`` is kept when one of its pixels
            has probability ≥ ``threshold[c - 1]``.
        volume: components in 3-D across the ``B`` slices of one series, else per image in 2-D.
        connectivity: 1 … 3 in 3-D, 1 … 2 in 2-D (as :func:`scipy.ndimage.generate_binary_structure`).

    Returns:
        A copy of ``labels`` with every other component set to 0.
    """
    q = prob if prob.dtype == np.uint16 else quantise_probability(torch.from_numpy(np.asarray(prob))).numpy()
    t_q = [round(float(t) * PROB_SCALE) for t in threshold]
    if volume:
        structure = ndimage.generate_binary_structure(3, connectivity)
    else:  # the 2-D neighbourhood in the middle plane only: slices are labelled on their own
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, connectivity)
    out = labels.copy()
    for c in range(1, len(t_q) + 1):
        mask = labels == c
        if not mask.any():
            continue
        comps, n = ndimage.label(mask, structure=structure)
        seeded = np.zeros(n + 1, bool)
        seeded[comps[mask & (q >= t_q[c - 1])]] = True
        seeded[0] = True
        out[~seeded[comps]] = 0
    return out


def object_labels(labels: torch.Tensor, cfg: Config, spacing: Sequence[Sequence[float]] | None = None,
                  prob: torch.Tensor | None = None, volume: bool = False) -> torch.Tensor:
    """Step 2 of the operating point, on whole class maps ``(B, H, W)``: with hysteresis
    (``inference.low_threshold``; needs ``prob``, each pixel's probability of its label) the components
    that never reach ``inference.threshold`` become background (:func:`keep_seeded`; ``volume``: the
    ``B`` images are the slices of one series, components in 3-D with ``predict.connectivity``, else
    2-D with ``metrics.connectivity``); then components smaller than ``inference.min_object_mm2`` (mm²
    with ``spacing``, per image ``(sy, sx)``) become background (``metrics.connectivity``)."""
    inf = cfg.inference
    if hysteresis_on(inf):
        if prob is None:
            raise ValueError("object_labels: hysteresis (inference.low_threshold) needs each pixel's probability")
        conn = cfg.predict.connectivity if volume else cfg.metrics.connectivity
        kept = keep_seeded(labels.cpu().numpy(), prob.cpu().numpy(), inf.threshold, volume, conn)
        labels = torch.as_tensor(kept).to(labels.device)
    if cfg.inference.min_object_mm2:
        return remove_small_objects(labels, cfg.inference.min_object_mm2, spacing, cfg.metrics.connectivity)
    return labels


def remove_small_objects(
    labels: torch.Tensor, min_mm2: float, spacing: Sequence[Sequence[float]] | None = None, connectivity: int = 2
) -> torch.Tensor:
    """Set connected components (per class) smaller than ``min_mm2`` to background.

    Args:
        labels: ``(B, H, W)`` class map.
        min_mm2: the smallest object kept, in mm² (``spacing`` per image ``(sy, sx)`` mm/px; pixels
            count 1 mm² each without it).
        connectivity: 2 = 8-connected components, 1 = 4-connected.
    """
    if min_mm2 <= 0:
        return labels
    arr = labels.cpu().numpy().copy()
    structure = ndimage.generate_binary_structure(2, connectivity)
    for b in range(len(arr)):
        area = float(np.prod(spacing[b])) if spacing is not None else 1.0
        for c in np.unique(arr[b]):
            if c == 0:
                continue
            comps, n = ndimage.label(arr[b] == c, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(comps.ravel(), minlength=n + 1) * area
            small = sizes < min_mm2
            small[0] = False
            arr[b][small[comps]] = 0
    return torch.as_tensor(arr).to(labels.device)


def resolve_operating_point(cfg: Config, model_config: Mapping[str, Any] | None) -> Config:
    """``cfg`` with the model's stored operating point where ``cfg`` leaves it unset (None).

    Args:
        cfg: the config evaluation or prediction runs with (a pipeline YAML + ``--set``).
        model_config: the config stored with the model (checkpoint or run), or None.

    Returns:
        A copy of ``cfg`` whose ``inference.threshold`` / ``min_object_mm2`` / ``low_threshold`` are the
        model's where ``cfg`` had None (the model's ``low_threshold`` only with the model's thresholds: a
        threshold set in ``cfg``, or ``[]`` for argmax, runs without the model's hysteresis) (unchanged when the model has none).
    """
    inf = (model_config or {}).get("inference") or {}
    out = copy.deepcopy(cfg)
    if out.inference.low_threshold is None and out.inference.threshold is None and inf.get("low_threshold") is not None:
        # the model's hysteresis belongs with the model's thresholds: a threshold set here (or [] = argmax) drops it
        out.inference.low_threshold = [float(t) for t in inf["low_threshold"]]
    if out.inference.threshold is None and inf.get("threshold") is not None:
        out.inference.threshold = [float(t) for t in inf["threshold"]]
    if out.inference.min_object_mm2 is None and inf.get("min_object_mm2") is not None:
        out.inference.min_object_mm2 = float(inf["min_object_mm2"])
    check_operating_point(out.inference.threshold, out.inference.min_object_mm2, out.data.num_classes,
                          out.inference.low_threshold)
    return out


def pixel_step(logits: torch.Tensor, image: torch.Tensor, cfg: Config,
               spacing: Sequence[Sequence[float]] | None = None, probabilities: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 1 on whole-image logits: :func:`pixel_labels` at :func:`pixel_threshold`, or the dense CRF's
    labels (``inference.crf.enabled``: it sees every context channel of the image as a multi-channel
    bilateral feature and, with ``spacing``, measures its kernels in millimetres).

    Returns:
        ``(labels int64, each pixel's probability of its label or None)`` as :func:`pixel_labels`.
    """
    inf = cfg.inference
    if not inf.crf.enabled:
        return pixel_labels(logits, pixel_threshold(inf), probabilities)
    if hysteresis_on(inf):
        raise ConfigError("inference.low_threshold (hysteresis) does not apply with the dense CRF, which decides "
                          "the labels itself; --set inference.low_threshold=[] or inference.crf.enabled=false")
    from medseg.inference.crf import crf_labels

    probs = torch.softmax(logits.float(), 1)
    p_np, img = probs.cpu().numpy(), image.cpu().numpy()
    out = [crf_labels(p_np[b], img[b], inf.crf, spacing[b] if spacing is not None else None) for b in range(len(p_np))]
    labels = torch.as_tensor(np.stack(out)).long().to(logits.device)
    prob = probs.gather(1, labels[:, None]).squeeze(1) if probabilities else None
    return labels, prob


def postprocess(
    logits: torch.Tensor, image: torch.Tensor, cfg: Config, spacing: Sequence[Sequence[float]] | None = None,
    volume: bool = False,
) -> torch.Tensor:
    """Class map ``(B, H, W)`` (int64, on the logits' device) from whole-image logits, at the configured
    operating point: :func:`pixel_step` then :func:`object_labels` (``volume``: the ``B`` images are the
    slices of one series, hysteresis in 3-D).
    """
    labels, prob = pixel_step(logits, image, cfg, spacing, probabilities=hysteresis_on(cfg.inference))
    return object_labels(labels, cfg, spacing, prob, volume)
