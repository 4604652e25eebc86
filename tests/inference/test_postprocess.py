"""The operating point, applied the same way on every route: per pixel (thresholds, band-wise in the
sliding window) then on the class map (min object size); sliding-window and whole-image routes agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.filters import apply_hysteresis_threshold
from torch import nn

import medseg.inference.crf
from medseg.config import ConfigError, load_config
from medseg.inference.postprocess import (
    check_operating_point,
    keep_seeded,
    object_labels,
    pixel_labels,
    postprocess,
    quantise_probability,
    remove_small_objects,
)
from medseg.inference.predictor import predict_labels, predict_logits
from medseg.models import build_model

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"
CPU = torch.device("cpu")


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(QUICK, ["train.amp=off", "train.device=cpu", "data.generate_if_missing=false", *overrides])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("unet", 3, 2, {"base_channels": 4, "depth": 2}).eval()


def test_pixel_labels_is_argmax_or_the_thresholds() -> None:
    logits = torch.randn(2, 3, 20, 30)
    probs = torch.softmax(logits, 1)
    labels, prob = pixel_labels(logits, None, probabilities=True)
    assert torch.equal(labels, logits.argmax(1)) and torch.equal(pixel_labels(logits, [])[0], labels)
    torch.testing.assert_close(prob, probs.max(1).values)
    labels, prob = pixel_labels(logits, [0.9, 0.2], probabilities=True)
    p1, p2 = probs[:, 1], probs[:, 2]
    expected = torch.where(p2 >= 0.2, torch.where((p1 >= 0.9) & (p1 > p2), 1, 2), torch.where(p1 >= 0.9, 1, 0))
    assert torch.equal(labels, expected)
    torch.testing.assert_close(prob, probs.gather(1, expected[:, None]).squeeze(1))


def test_object_labels_removes_objects_below_min_object_mm2_only_when_set() -> None:
    labels = torch.zeros(1, 30, 30, dtype=torch.int64)
    labels[0, 2:4, 2:4] = 1  # 4 px
    labels[0, 10:20, 10:20] = 1  # 100 px
    assert torch.equal(object_labels(labels, _cfg()), labels)  # unset: unchanged
    kept = object_labels(labels, _cfg("inference.min_object_mm2=10"), [[1.0, 1.0]])
    assert kept.sum() == 100 and kept[0, 2, 2] == 0
    assert torch.equal(kept, remove_small_objects(labels, 10.0, [[1.0, 1.0]]))
    assert object_labels(labels, _cfg("inference.min_object_mm2=10"), [[2.0, 2.0]]).sum() == 104  # 4 px = 16 mm²


def _smooth_prob(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A probability volume with blobs of every strength (smoothed noise through a sigmoid)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return (1.0 / (1.0 + np.exp(-noise / noise.std() * 1.5))).astype(np.float32)


@pytest.mark.parametrize("volume", [True, False])
def test_keep_seeded_is_hysteresis_thresholding(volume: bool) -> None:
    """Against scikit-image's hysteresis (face connectivity): in 3-D across the slices of a series, or
    per slice in 2-D; the uint16 fixed-point probabilities give the same map as float32."""
    p = _smooth_prob((6, 40, 50))
    low, high = 0.5, 0.8
    labels = (p >= low).astype(np.int64)
    ours = keep_seeded(labels, p, [high], volume, connectivity=1)
    ref = (apply_hysteresis_threshold(p, low, high) if volume
           else np.stack([apply_hysteresis_threshold(s, low, high) for s in p]))
    np.testing.assert_array_equal(ours, ref.astype(np.int64))
    assert 0 < ours.sum() < labels.sum() and (ours > (p >= high)).any()  # dropped some, grew others
    fixed = quantise_probability(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(keep_seeded(labels, fixed, [high], volume, 1), ours)
    if volume:  # 26-connectivity joins at least as much as face connectivity
        assert keep_seeded(labels, p, [high], True, 3).sum() >= ours.sum()


def test_hysteresis_in_object_labels_and_postprocess() -> None:
    """``inference.low_threshold``: the pixel step cuts low, the object step keeps seeded components (2-D per
    image by default, 3-D with ``volume``); it needs the probabilities, thresholds, and no CRF."""
    logits = torch.from_numpy(np.log(_smooth_prob((4, 1, 30, 40), seed=1))).repeat(1, 2, 1, 1)
    logits[:, 0] = 0.0
    p = torch.softmax(logits, 1)[:, 1].numpy()
    lo, hi = float(np.quantile(p, 0.5)), float(np.quantile(p, 0.9))
    cfg = _cfg(f"inference.threshold=[{hi}]", f"inference.low_threshold=[{lo}]", "metrics.connectivity=1")
    image = torch.zeros(4, 3, 30, 40)
    per_image = postprocess(logits, image, cfg).numpy()
    np.testing.assert_array_equal(per_image, np.stack([apply_hysteresis_threshold(s, lo, hi) for s in p]
                                                      ).astype(np.int64) * 1)
    in_3d = postprocess(logits, image, cfg, volume=True).numpy()
    np.testing.assert_array_equal(in_3d > 0, keep_seeded((p >= lo).astype(np.int64), p, [hi], True, 3) > 0)
    assert not np.array_equal(per_image, in_3d)  # 3-D joins slices the 2-D step drops
    with pytest.raises(ValueError, match="probability"):
        object_labels(torch.from_numpy((p >= lo).astype(np.int64)), cfg)
    with pytest.raises(ConfigError, match="needs inference.threshold"):
        check_operating_point(None, None, 2, [0.3])
    with pytest.raises(ConfigError, match="between 0 and"):
        check_operating_point([0.5], None, 2, [0.7])
    with pytest.raises(ConfigError, match="dense CRF"):
        postprocess(logits, image, _cfg(f"inference.threshold=[{hi}]", f"inference.low_threshold=[{lo}]",
                                        "inference.crf.enabled=true"))


@pytest.mark.parametrize("blend", ["gaussian", "overlap_tile"])
def test_sliding_predict_labels_equals_postprocess_of_the_logits(blend: str) -> None:
    """``predict_labels`` (band-wise thresholds, then the size filter) gives the class map that
    ``postprocess(predict_logits(...))`` — evaluate's route — gives, at a threshold and min size."""
    net = _net()
    x = torch.rand(2, 3, 150, 110)
    spacing = [[0.8, 0.8], [1.5, 1.0]]
    base = ["inference.mode=sliding", "inference.tile_size=[64,64]", f"inference.blend={blend}"]
    p1 = torch.softmax(predict_logits(net, x, _cfg(*base), CPU), 1)[:, 1]
    t = float(p1.quantile(0.6))  # a threshold inside this untrained model's range
    cfg = _cfg(*base, f"inference.threshold=[{t}]", "inference.min_object_mm2=6")
    logits = predict_logits(net, x, cfg, CPU)
    expected = postprocess(logits, x, cfg, spacing)
    labels, prob = predict_labels(net, x, cfg, CPU, spacing, probabilities=True)
    assert labels.shape == (2, 150, 110) and prob is not None and prob.shape == labels.shape
    assert torch.equal(labels.long(), expected)
    assert not torch.equal(expected, logits.argmax(1))  # the operating point changed the map
    assert not torch.equal(expected, pixel_labels(logits, [t])[0])  # and the size filter did too
    lesion = expected > 0
    torch.testing.assert_close(prob[lesion], torch.softmax(logits, 1)[:, 1][lesion], rtol=0, atol=1e-6)
    whole, whole_prob = predict_labels(net, x, _cfg(f"inference.threshold=[{t}]", "inference.min_object_mm2=6"),
                                       CPU, spacing, probabilities=True)
    assert whole.dtype == torch.int64 and whole_prob is not None  # the whole-slice route: postprocess itself
    # hysteresis: the window cuts at the low threshold, the object step keeps the seeded components
    lo = float(p1.quantile(0.4))
    hyst = _cfg(*base, f"inference.threshold=[{t}]", f"inference.low_threshold=[{lo}]", "inference.min_object_mm2=6")
    expected = postprocess(logits, x, hyst, spacing)
    labels, _ = predict_labels(net, x, hyst, CPU, spacing)
    assert torch.equal(labels.long(), expected) and not torch.equal(expected, postprocess(logits, x, cfg, spacing))


def test_sliding_with_the_crf_uses_the_whole_images_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def record(probs: np.ndarray, image: np.ndarray, cfg: object, spacing: object = None) -> np.ndarray:
        seen.append(probs.shape)
        return probs.argmax(0)

    monkeypatch.setattr(medseg.inference.crf, "crf_labels", record)
    net = _net()
    x = torch.rand(1, 3, 100, 90)
    cfg = _cfg("inference.mode=sliding", "inference.tile_size=[64,64]", "inference.crf.enabled=true")
    labels, _ = predict_labels(net, x, cfg, CPU, [[1.0, 1.0]])
    assert seen == [(2, 100, 90)]  # one call with the whole image's per-class probabilities
    assert torch.equal(labels, predict_logits(net, x, cfg, CPU).argmax(1))
