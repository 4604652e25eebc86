"""Inference: whole-slice and sliding-window logits, post-processing (the CRF sees every channel and
the spacing), the Predictor over a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medseg.inference.crf
from medseg.config import load_config, to_dict
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import Predictor, predict_logits
from medseg.io import atomic_torch_save
from medseg.models import build_model
from medseg.models.checkpoint import CHECKPOINT_VERSION

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"
CPU = torch.device("cpu")


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(QUICK, ["train.amp=off", "train.device=cpu", "data.generate_if_missing=false", *overrides])


def test_sliding_window_equals_whole_slice_for_a_pointwise_model() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 1).eval()  # each pixel's logits depend on that pixel only: tiling cannot change them
    image = torch.rand(2, 3, 70, 90)
    whole = predict_logits(model, image, _cfg(), CPU)
    for tile in ([32, 48], [128, 128]):  # tiles smaller and larger (mirror-padded) than the image
        sliding = predict_logits(model, image, _cfg("inference.mode=sliding", f"inference.tile_size={tile}",
                                                    "inference.overlap=0.5"), CPU)
        assert sliding.shape == whole.shape == (2, 2, 70, 90) and sliding.dtype == torch.float32
        torch.testing.assert_close(sliding, whole, rtol=1e-5, atol=1e-5)


def test_flip_tta_applies_to_whole_slices_and_to_tiles() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1).eval()  # a random 3x3 kernel: not flip-equivariant
    image = torch.rand(1, 3, 40, 52)
    with torch.no_grad():  # the mean over the four flips, computed here independently
        expected = sum(model(image.flip(d) if d else image).flip(d) if d else model(image)
                       for d in ([], [-1], [-2], [-2, -1])) / 4
    plain = predict_logits(model, image, _cfg("inference.tta_flips=false"), CPU)
    whole = predict_logits(model, image, _cfg("inference.tta_flips=true"), CPU)
    sliding = predict_logits(model, image, _cfg("inference.tta_flips=true", "inference.mode=sliding",
                                                "inference.tile_size=[64,64]"), CPU)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the flips do change this model's logits
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    # one tile over the mirror-padded image: only the image's 1-pixel rim sees other neighbours
    torch.testing.assert_close(sliding[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_crf_receives_every_context_channel_and_each_images_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def record(probs: np.ndarray, image: np.ndarray, cfg: object, spacing: object = None) -> np.ndarray:
        seen.append((probs.shape, image.copy(), spacing))
        return 1 - probs.argmax(0)  # unlike argmax everywhere: the answer must come from here

    monkeypatch.setattr(medseg.inference.crf, "crf_labels", record)
    logits = torch.randn(2, 2, 16, 20)
    image = torch.rand(2, 3, 16, 20)
    assert torch.equal(postprocess(logits, image, _cfg()), logits.argmax(1))  # CRF off: argmax
    assert not seen
    out = postprocess(logits, image, _cfg("inference.crf.enabled=true"), [[0.7, 0.7], [1.2, 0.9]])
    assert torch.equal(out, 1 - logits.argmax(1)) and out.dtype == torch.int64  # CRF on: the CRF's labels
    assert [s[0] for s in seen] == [(2, 16, 20)] * 2
    assert all(np.array_equal(s[1], image[b].numpy()) for b, s in enumerate(seen))  # all 3 channels
    assert [s[2] for s in seen] == [[0.7, 0.7], [1.2, 0.9]]


def test_crf_postprocess_runs_the_real_crf() -> None:
    """A bright square (class 1) on a dark background, its probability map sprinkled with isolated
    pixels that mildly favour the wrong class: argmax keeps every speckle, the CRF's smoothness and
    appearance kernels remove them all and give back the clean square."""
    clean = torch.zeros(32, 32, dtype=torch.long)
    clean[8:24, 8:24] = 1
    speckle = torch.zeros(32, 32, dtype=torch.bool)
    speckle[2:30:4, 2:30:4] = True  # 49 isolated pixels, inside and outside the square
    logits = torch.zeros(1, 2, 32, 32)
    logits[0, 1] = torch.where(clean.bool(), 2.0, -2.0)
    logits[0, 1][speckle] = torch.where(clean[speckle].bool(), -0.5, 0.5)  # the wrong class, by a little
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 8:24, 8:24] = 1.0
    argmax = logits.argmax(1)[0]
    assert torch.equal(argmax != clean, speckle)  # plain argmax: every speckle survives
    out = postprocess(logits, image, _cfg("inference.crf.enabled=true"), [[0.8, 0.8]])
    assert out.shape == (1, 32, 32) and out.dtype == torch.int64
    assert torch.equal(out[0], clean)  # the CRF removes them: it changes the answer exactly at the speckles
    assert torch.equal(out[0] != argmax, speckle)


def test_predictor_from_a_checkpoint_uses_the_models_own_config(tmp_path: Path) -> None:
    cfg = _cfg("model.params.base_channels=8")
    torch.manual_seed(0)
    net = build_model(cfg.model.name, 3, 2, cfg.model.params)
    path = tmp_path / "checkpoints" / "best.pt"
    atomic_torch_save({"version": CHECKPOINT_VERSION, "model": net.state_dict(), "config": to_dict(cfg),
                       "in_channels": 3, "num_classes": 2, "epoch": 4}, path)
    predictor = Predictor.from_ref(tmp_path, overrides=["inference.mode=sliding", "inference.tile_size=[32, 32]"],
                                   device="cpu")
    assert predictor.cfg.inference.mode == "sliding" and predictor.cfg.model.params["base_channels"] == 8
    image = torch.rand(2, 3, 40, 48)
    labels = predictor(image)
    assert labels.shape == (2, 40, 48) and labels.dtype == torch.int64
    expected = predict_logits(net.eval(), image, predictor.cfg, CPU).argmax(1)
    assert torch.equal(labels, expected)
