"""``medseg predict``'s model input of an integer image: windowed a tile batch at a time, the same result.

An integer PNG / TIFF the model sees on its own grid keeps its stored values (1–2 bytes a pixel); the
window is given each tile batch through :func:`~medseg.data.base.apply_window` — the function the reader
applied to the whole image — so the class map and probabilities are bit for bit those of the whole
float32 input, with and without flips; configurations where tiles are not cut from the image as it is
(whole-slice mode, padding) window the whole input first, as before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.data.base import apply_window
from medseg.data.images import normalise_2d
from medseg.inference.predictor import Predictor
from medseg.models import build_model
from medseg.predict.case import _model_input, predict_case
from medseg.predict.readers import _file_case, load_case

ROOT = Path(__file__).resolve().parents[2]


def _predictor(overrides: list[str]) -> Predictor:
    cfg = load_config(ROOT / "pipelines" / "cells.yaml", [
        "inference.mode=sliding", "inference.tile_size=[64,64]", "inference.overlap=0.25", "inference.blend=gaussian",
        "inference.batch_size=3", "inference.tta_scales=[1.0]", "inference.threshold=[]", "inference.min_object_mm2=0",
        "model.name=unet", "train.device=cpu", "tracking.enabled=false", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 1, 2, cfg.model.params).eval()
    return Predictor(model, cfg, torch.device("cpu"))


@pytest.mark.parametrize(("dtype", "overrides", "lazy"), [
    (np.uint8, ["inference.tta_flips=false"], True),
    (np.uint8, ["inference.tta_flips=true"], True),
    (np.uint16, ["inference.tta_flips=true"], False),  # torch has no flip of uint16: whole input
    (np.uint8, ["inference.tta_flips=false", "inference.tile_size=[256,256]"], False),  # padded: whole input
    (np.uint8, ["inference.tta_flips=false", "inference.mode=whole"], False),
])
def test_tile_batches_windowed_give_the_whole_inputs_result(tmp_path: Path, dtype: type, overrides: list[str],
                                                           lazy: bool) -> None:
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    arr = (cv2.GaussianBlur(rng.random((150, 131)), (0, 0), 3) * top * 1.6).clip(0, top).astype(dtype)
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), arr)
    predictor = _predictor(overrides)
    loaded = load_case(_file_case("image", path, tmp_path), predictor.cfg)
    assert loaded.input_window is not None and loaded.images.dtype == dtype  # no float32 copy of the image
    x, _model = _model_input(loaded, predictor)
    assert (x.dtype == torch.float32) != lazy
    # the input the reader built before: normalise_2d of the whole image
    whole = normalise_2d(arr, predictor.cfg.data.window, predictor.cfg.data.window_range)[None, None]
    np.testing.assert_array_equal(apply_window(loaded.images, *loaded.input_window), whole)
    before = dataclasses.replace(loaded, images=whole, input_window=None)
    # random weights predict one class: shift the last class-1 bias to split the image about in half
    last = [m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 2][-1]
    with torch.no_grad():
        logits = predictor.model(torch.from_numpy(whole))
        last.bias[1] -= torch.quantile((logits[0, 1] - logits[0, 0]).flatten(), 0.5)
    labels, prob = predict_case(loaded, predictor, 1)
    ref_labels, ref_prob = predict_case(before, predictor, 1)
    assert 0.05 < (labels > 0).mean() < 0.95
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(prob, ref_prob)


def test_the_model_input_is_freed_once_predicted(tmp_path: Path) -> None:
    import gc
    import weakref

    from medseg.predict.case import process_case

    path = tmp_path / "img.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((96, 80)) * 255).astype(np.uint8))
    predictor = _predictor(["inference.tta_flips=false", "predict.overlays=false"])
    loaded = load_case(_file_case("image", path, tmp_path), predictor.cfg)
    loaded.images = apply_window(loaded.images, *loaded.input_window)  # the float32 input, as an eager reader builds
    loaded.input_window = None
    gone = weakref.ref(loaded.images)
    process_case(loaded, predictor, tmp_path / "out", tmp_path / "tmp", "f" * 16)
    gc.collect()
    assert gone() is None and loaded.images.shape == (0, 1, 96, 80)  # not a view of it (images[:0] kept it)
