"""The window rule: how HU become model inputs — one definition for training, evaluation and predict.

``data.window`` names the rule (the model's config carries it, so ``medseg predict`` and
``medseg evaluate`` apply exactly what training applied):

* ``fixed`` — one window fixed in advance, ``data.window_range`` (default −1024…3071 HU, the
  wide window of 3DCE and MULAN on DeepLesion). Channels: ``context_slices``.
* ``multi`` — several windows fixed in advance, ``data.windows`` (default wide, soft tissue,
  lung), each applied to the whole 2.5-D context stack; channels are window-major:
  ``[w0: slice −k … +k, w1: slice −k … +k, …]``, ``len(windows) · context_slices`` in all.
* ``dicom`` — the window chosen *for the lesion* (DeepLesion's ``DICOM_windows``; a DICOM series'
  first WindowCenter / WindowWidth). It uses annotation information: on an unannotated series
  there is no lesion to choose a window for, so a model trained with it warns at predict and
  evaluate time (:func:`annotation_window_warning`).

Example:
    >>> from medseg.config import DataConfig
    >>> import numpy as np
    >>> wins, note = window_set(DataConfig(window="multi", windows=[[-1024, 3071], [-160, 240]]), None)
    >>> apply_windows(np.zeros((3, 4, 4), np.float32), wins).shape
    (6, 4, 4)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.config import DataConfig
from medseg.data.base import DataError, apply_window

__all__ = ["WINDOW_KEYS", "WINDOW_RULES", "annotation_window_warning", "apply_windows", "check_window",
           "input_channels", "model_window_rule", "window_set"]

#: the ``data`` keys that make up the window rule
WINDOW_KEYS = ("window", "window_range", "windows")

#: the rules ``data.window`` may name
WINDOW_RULES = ("fixed", "multi", "dicom")


def _pair(w: Sequence[float], key: str) -> tuple[float, float]:
    if len(w) != 2 or not float(w[1]) > float(w[0]):
        raise DataError(f"{key} = {list(w)}; expected [low, high] HU with high > low")
    return float(w[0]), float(w[1])


def check_window(data: DataConfig) -> None:
    """Validate ``data.window`` and the ranges it uses.

    Raises:
        DataError: an unknown rule, an empty ``window_range`` or ``windows`` entry, no ``windows``
            for ``multi``.
    """
    if data.window not in WINDOW_RULES:
        raise DataError(f"data.window = {data.window!r}; expected one of {', '.join(WINDOW_RULES)}")
    _pair(data.window_range, "data.window_range")
    if data.window == "multi":
        if not data.windows:
            raise DataError("data.window = multi needs data.windows: a list of [low, high] HU pairs")
        for w in data.windows:
            _pair(w, "data.windows entry")


def window_set(data: DataConfig, own: Sequence[float] | None) -> tuple[list[tuple[float, float]], str | None]:
    """The ``(low, high)`` windows a slice stack is normalised with under ``data.window``.

    Args:
        data: the data config (``window``, ``window_range``, ``windows``).
        own: the annotation's / header's window ``(low, high)`` (DeepLesion ``DICOM_windows``, a
            DICOM series' first WindowCenter / WindowWidth), or None where there is none. Only the
            ``dicom`` rule reads it.

    Returns:
        ``(windows, note)``: ``note`` is None, or why a ``dicom`` window fell back to
        ``data.window_range``.
    """
    check_window(data)
    fixed = _pair(data.window_range, "data.window_range")
    if data.window == "multi":
        return [_pair(w, "data.windows entry") for w in data.windows], None
    if data.window == "fixed":
        return [fixed], None
    if own is None:
        return [fixed], f"no window for the dicom rule: using data.window_range {list(data.window_range)}"
    return [_pair(own, "window")], None


def apply_windows(hu: np.ndarray, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """Window a ``(C, H, W)`` (or ``(H, W)``) HU stack with each window: ``(len(windows)·C, H, W)`` float32.

    Window-major: the stack in the first window, then in the second, … One window returns
    ``apply_window(hu, low, high)`` unchanged in shape.
    """
    if len(windows) == 1:
        return apply_window(hu, float(windows[0][0]), float(windows[0][1]))
    arr = np.asarray(hu)
    parts = [apply_window(arr, float(lo), float(hi)) for lo, hi in windows]
    return np.concatenate([p if p.ndim == 3 else p[None] for p in parts], axis=0)


def input_channels(data: DataConfig) -> int:
    """Model input channels under the window rule: ``context_slices`` × number of windows."""
    return int(data.context_slices) * (len(data.windows) if data.window == "multi" else 1)


def annotation_window_warning(data: DataConfig) -> str | None:
    """The one-line warning for a model trained with the ``dicom`` window rule on DeepLesion or DICOM
    data (where it reads the annotation's / header's window), or None."""
    if data.window != "dicom" or data.name not in ("deeplesion", "dicom"):
        return None
    return ("this model was trained with data.window: dicom (each lesion's annotated window): an unannotated "
            "series has no such window, so inputs use the header's window and scores may differ; retrain with "
            "data.window: fixed or multi")


def model_window_rule(data: DataConfig, model_config: Mapping[str, Any] | None) -> tuple[DataConfig, str | None]:
    """``data`` with the window rule of the model's stored config (``medseg evaluate`` scores with the
    rule the model was trained with, as ``medseg predict`` does).

    Returns:
        ``(data copy, note)``: ``note`` names what changed, or None (no stored config, or the same rule).
    """
    stored = (model_config or {}).get("data") or {}
    out = copy.deepcopy(data)
    changed = []
    for key in WINDOW_KEYS:
        if key in stored and stored[key] != getattr(out, key):
            changed.append(f"data.{key}: {getattr(out, key)} -> {stored[key]}")
            setattr(out, key, copy.deepcopy(stored[key]))
    if changed:
        check_window(out)
    return out, ("the model's window rule applies: " + "; ".join(changed)) if changed else None
