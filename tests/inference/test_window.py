"""The memory-bounded sliding window: equals a whole-image pass, equals MONAI on the same tiles."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.config import Config
from medseg.inference.postprocess import pixel_labels, threshold_labels
from medseg.inference.predictor import predict_logits
from medseg.inference.window import SlidingWindow, iter_sliding_window, sliding_window, tile_starts
from medseg.models import build_model


def _net(in_ch: int = 3, k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return build_model("unet", in_ch, k, {"base_channels": 4, "depth": 2}).eval()


def _pointwise(in_ch: int = 3, k: int = 3) -> nn.Module:
    """A 1×1 convolution: translation- and flip-equivariant, so tiling changes nothing."""
    torch.manual_seed(1)
    return nn.Conv2d(in_ch, k, 1).eval()


def test_tile_starts_cover_and_clamp() -> None:
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 24) == [0]
    assert tile_starts(20, 32, 24) == [0]
    for size, tile, step in [(1024, 256, 192), (97, 16, 8), (300, 64, 1)]:
        s = tile_starts(size, tile, step)
        assert s[0] == 0 and s[-1] == size - tile and all(b > a for a, b in zip(s, s[1:]))


@torch.no_grad()
def test_one_tile_covering_the_image_equals_the_whole_image_forward() -> None:
    net = _net()
    x = torch.rand(2, 3, 48, 40)
    for blend in ("gaussian", "constant"):
        out = sliding_window(x, net, (48, 40), 0.25, blend)
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_equals_monai_on_the_same_tiles(blend: str, overlap: float) -> None:
    net = _net()
    x = torch.rand(2, 3, 75, 101)
    ours = sliding_window(x, net, (32, 48), overlap, blend, batch_size=3)
    ref = sliding_window_inference(x, (32, 48), 3, net, overlap=overlap, mode=blend)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_image_smaller_than_a_tile_is_mirror_padded() -> None:
    from medseg.models.blocks import mirror_pad

    net = _net()
    x = torch.rand(1, 3, 20, 30)
    out = sliding_window(x, net, (32, 32), 0.25)
    ref = net(mirror_pad(x, 6, 6, 1, 1))[..., 6:26, 1:31]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_bands_are_bounded_by_a_tile_and_cover_every_row_once() -> None:
    net = _pointwise()
    x = torch.rand(1, 3, 200, 90)
    bands = list(iter_sliding_window(x, net, (32, 32), 0.25, "gaussian", batch_size=2))
    assert len(bands) > 5
    assert bands[0][0] == 0 and bands[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert max(y1 - y0 for y0, y1, _ in bands) <= 32
    torch.testing.assert_close(torch.cat([b for _, _, b in bands], 2), net(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_overlap_tile_keeps_each_tiles_valid_centre() -> None:
    net = _pointwise()
    x = torch.rand(1, 3, 70, 53)
    out = sliding_window(x, net, (32, 32), 0.5, "overlap_tile")
    torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)

    # a predictor that marks each tile's border: only the valid centres (margin 8 px) may reach the output
    def border_marker(t: torch.Tensor) -> torch.Tensor:
        out = torch.full((t.shape[0], 1, *t.shape[-2:]), 100.0)
        out[..., 8:-8, 8:-8] = 1.0
        return out

    marked = sliding_window(torch.zeros(1, 1, 70, 53), border_marker, (32, 32), 0.5, "overlap_tile", batch_size=1)
    assert marked.shape == (1, 1, 70, 53) and torch.all(marked == 1.0)


@torch.no_grad()
def test_labels_output_matches_argmax_and_softmax() -> None:
    net = _net(k=3)
    x = torch.rand(2, 3, 64, 80)
    logits = sliding_window(x, net, (32, 32), 0.25)
    labels, prob = sliding_window(x, net, (32, 32), 0.25, output="labels", probabilities=True)
    assert labels.dtype == torch.uint8 and prob.dtype == torch.float32
    only, none = sliding_window(x, net, (32, 32), 0.25, output="labels")
    assert none is None and torch.equal(only, labels)
    assert torch.equal(labels.long(), logits.argmax(1))
    torch.testing.assert_close(prob, torch.softmax(logits, 1).max(1).values, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_flip_and_scale_tta() -> None:
    net = _pointwise()
    x = torch.rand(1, 3, 64, 64)
    plain = sliding_window(x, net, (32, 32), 0.25)
    torch.testing.assert_close(sliding_window(x, net, (32, 32), 0.25, flips=True), plain, rtol=1e-5, atol=1e-5)
    scaled = sliding_window(x, net, (32, 32), 0.25, scales=(1.0, 0.5))
    assert scaled.shape == plain.shape and not torch.allclose(scaled, plain)


def test_predict_logits_uses_the_config_and_the_thin_class() -> None:
    net = _net()
    cfg = Config()
    cfg.inference.mode, cfg.inference.tile_size, cfg.inference.overlap = "sliding", [32, 32], 0.5
    cfg.train.amp = "off"
    x = torch.rand(1, 3, 50, 70)
    out = predict_logits(net, x, cfg, torch.device("cpu"))
    ref = SlidingWindow.from_config(cfg.inference)(x, net)
    torch.testing.assert_close(out, ref)
    mon = sliding_window_inference(x, (32, 32), 4, net, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(out, mon, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("quantile", [None, 0.5, 0.9])
def test_band_wise_threshold_equals_the_whole_image_threshold(quantile: float | None) -> None:
    """The operating point's thresholds are per pixel: applied to each band as the window finishes it,
    they give exactly the whole image's class map (and each label's probability)."""
    net = _net(k=3)
    x = torch.rand(2, 3, 150, 90)
    logits = sliding_window(x, net, (32, 32), 0.25)
    probs = torch.softmax(logits, 1)
    # thresholds inside this untrained model's probability range (None = argmax)
    threshold = [float(probs[:, k].quantile(quantile)) for k in (1, 2)] if quantile is not None else []
    whole = threshold_labels(probs, threshold) if threshold else logits.argmax(1)
    labels, prob = sliding_window(x, net, (32, 32), 0.25, output="labels", probabilities=True, threshold=threshold)
    assert torch.equal(labels.long(), whole)
    # softmax of a band and of the whole map may differ in the last bit (vectorised tails): labels do not
    torch.testing.assert_close(prob, probs.gather(1, whole[:, None]).squeeze(1), rtol=0, atol=1e-6)
    ref, _ = pixel_labels(logits, threshold)  # the one per-pixel function, on the whole logits
    assert torch.equal(labels.long(), ref)
    if quantile is not None:  # the thresholds do move this model's boundary, to every class
        assert not torch.equal(whole, logits.argmax(1)) and set(whole.unique().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("tile,sigma", [((256, 256), 0.125), ((96, 160), 0.125), ((33, 64), 0.3), ((1, 7), 0.125)])
def test_importance_map_is_monais_bit_for_bit(blend: str, tile: tuple[int, int], sigma: float) -> None:
    from monai.data.utils import compute_importance_map

    from medseg.inference.window import importance_map

    ours = importance_map(tile, blend, sigma)
    ref = compute_importance_map(tile, mode=blend, sigma_scale=sigma, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == tile
    assert torch.equal(ours, ref)


def test_the_predict_path_does_not_import_monai() -> None:
    """``medseg predict``'s modules and a Gaussian sliding window run without importing MONAI (whose import
    alone adds ~300 MiB of resident memory: matplotlib, pandas, scikit-learn, MLflow)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import medseg.cli, medseg.predict.run, medseg.predict.dicomweb, medseg.predict.chatter\n"
            "from medseg.inference.window import sliding_window\n"
            "net = torch.nn.Conv2d(1, 2, 3, padding=1)\n"
            "lab, prob = sliding_window(torch.rand(1, 1, 40, 50), net, (16, 16), 0.25, 'gaussian', output='labels',\n"
            "                           probabilities=True, prob_dtype=torch.uint16)\n"
            "assert lab.shape == prob.shape == (1, 40, 50) and prob.dtype == torch.uint16\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'matplotlib', 'pandas', 'mlflow'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_uint16_probability_is_the_float_one_quantised() -> None:
    from medseg.inference.postprocess import PROB_SCALE

    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    image = torch.rand(2, 1, 70, 90)
    lab, prob = sliding_window(image, net, (32, 32), 0.25, output="labels", probabilities=True)
    lab16, prob16 = sliding_window(image, net, (32, 32), 0.25, output="labels", probabilities=True,
                                   prob_dtype=torch.uint16)
    assert torch.equal(lab, lab16) and prob16.dtype == torch.uint16
    assert torch.equal(prob16.to(torch.int32), (prob * PROB_SCALE).round().to(torch.int32))
    assert (prob16.double() / PROB_SCALE - prob.double()).abs().max() <= 0.5 / PROB_SCALE + 1e-7
