"""Registry-driven tests: every registered model honours the model contract.

Nothing here names a model in the generic tests: they loop over ``MODELS.names()``. A model is
built with the reduced-size constructor params of its ``test_params`` attribute (a dict on the
class or factory function; none = its defaults), so adding a model costs its file, its registry
line and its ``configs/model/<name>.yaml`` fragment — no new test code. The U-Net geometry tests
at the end are specific to U-Net's valid / overlap-tile mode.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import from_dict, read_yaml
from medseg.models import MODELS, build_model
from medseg.models.blocks import mirror_pad
from medseg.models.unet import UNet, valid_input_size, valid_output_size
from medseg.registry import RegistryError, check_params

torch.set_num_threads(1)

NUM_CLASSES = 3
MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def small_params(name: str) -> dict[str, Any]:
    """The model's reduced-size params for tests (its ``test_params`` attribute, else defaults)."""
    return dict(getattr(MODELS.get(name), "test_params", None) or {})


def build_small(name: str, in_channels: int, seed: int = 0) -> nn.Module:
    """Build ``name`` at test size with a fixed seed."""
    torch.manual_seed(seed)
    return build_model(name, in_channels, NUM_CLASSES, small_params(name))


def first_conv(model: nn.Module, x: torch.Tensor) -> nn.Conv2d:
    """The first Conv2d that a forward pass executes (the layer that sees the input)."""
    seen: list[nn.Conv2d] = []
    hooks = [
        m.register_forward_hook(lambda mod, *_: seen.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert seen, "the model ran no Conv2d"
    return seen[0]


def test_registered_name_builds_the_model_its_params_describe() -> None:
    """``build_model("unet", ...)`` is the U-Net class built with exactly those params: same layers,
    same weights from the same seed, same logits (params passed through, none dropped or renamed)."""
    params = {"base_channels": 8, "depth": 2, "dropout": 0.0}
    torch.manual_seed(0)
    built = build_model("unet", 3, 2, params).eval()
    torch.manual_seed(0)
    direct = UNet(in_channels=3, num_classes=2, **params).eval()
    assert type(built) is UNet and built.depth == 2 and len(built.down) == 2
    x = torch.randn(1, 3, 40, 44)
    conv = first_conv(built, x)
    assert (conv.in_channels, conv.out_channels) == (3, 8)  # base_channels reached the first layer
    assert (built.head.in_channels, built.head.out_channels) == (8, 2)
    assert built.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(built(x), direct(x))
    torch.manual_seed(0)
    deeper = build_model("unet", 3, 2, {**params, "depth": 3})
    assert len(deeper.down) == 3 and sum(p.numel() for p in deeper.parameters()) > sum(
        p.numel() for p in built.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_channels_last_layout_changes_no_value(name: str) -> None:
    """Every model is built NHWC (4-D weights in channels_last) and computes what the NCHW build does, in
    training (loss and gradients) and inference, up to float rounding; its state dict is the NCHW one's.

    The gradients agree to a relative L2 error of ~1e-3, not ~1e-6: BatchNorm's channels_last CPU kernels
    sum in another order, and the batch statistics' cancellation amplifies that (without BatchNorm the
    U-Net's agree to 3e-7; the tolerance stays far below what would change training)."""
    params = small_params(name)
    if "dropout" in inspect.signature(MODELS.get(name)).parameters:
        params["dropout"] = 0.0  # dropout's random mask is drawn in memory order: it differs between layouts
    torch.manual_seed(0)
    nhwc = build_model(name, 3, NUM_CLASSES, params)
    torch.manual_seed(0)
    nchw = build_model(name, 3, NUM_CLASSES, params, channels_last=False)
    four_d = [p for p in nhwc.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert not all(p.is_contiguous() for p in four_d) and all(p.is_contiguous() for p in nchw.parameters())
    assert all(torch.equal(a, b) for a, b in zip(nhwc.state_dict().values(), nchw.state_dict().values()))
    x = torch.randn(2, 3, 67, 73)
    label = torch.randint(0, NUM_CLASSES, (2, 67, 73))
    losses = [F.cross_entropy(m.train()(x), label) for m in (nhwc, nchw)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for loss in losses:
        loss.backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (nhwc, nchw)]
    assert grads[0].shape == grads[1].shape
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 2e-2
    with torch.no_grad():
        torch.testing.assert_close(nhwc.eval()(x), nchw.eval()(x), rtol=1e-3, atol=1e-3)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(RegistryError) as err:
        build_model("no_such_net", 3, 2)
    msg = str(err.value)
    assert "no_such_net" in msg
    for name in MODELS.names():
        assert name in msg


def test_unknown_param_is_named() -> None:
    name = MODELS.names()[0]
    with pytest.raises(RegistryError, match="no_such_param"):
        build_model(name, 3, 2, {"no_such_param": 1})


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", MODELS.names())
def test_output_matches_input_size(name: str, in_channels: int) -> None:
    model = build_small(name, in_channels)
    model.train()
    out = model(torch.randn(2, in_channels, 97, 131))
    assert out.shape == (2, NUM_CLASSES, 97, 131)
    assert torch.isfinite(out).all()
    # the Trainer's last batch can hold a single slice
    assert model(torch.randn(1, in_channels, 64, 75)).shape == (1, NUM_CLASSES, 64, 75)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 33, 47)).shape == (1, NUM_CLASSES, 33, 47)


@pytest.mark.parametrize("name", MODELS.names())
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build_small(name, 3)
    x = torch.randn(2, 3, 65, 71)
    conv = first_conv(model.eval(), x)
    model.train()
    label = torch.randint(0, NUM_CLASSES, (2, 65, 71))
    loss = F.cross_entropy(model(x), label)
    if hasattr(model, "extra_loss"):
        extra = model.extra_loss(label)
        assert extra.ndim == 0 and torch.isfinite(extra)
        loss = loss + extra
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without a gradient: {unused[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS.names())
def test_state_dict_round_trip(name: str, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 41, 53)
    source = build_small(name, 3, seed=0).eval()
    with torch.no_grad():
        expected = source(x)
    torch.save(source.state_dict(), tmp_path / "weights.pt")

    target = build_small(name, 3, seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(target(x), expected)  # a fresh model differs, so the load matters
    target.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(target(x), expected)


# ----------------------------------------------------------------------------- config fragments


def model_fragments() -> list[Path]:
    return sorted(MODEL_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", model_fragments(), ids=lambda p: p.name)
def test_model_fragment_is_valid(path: Path) -> None:
    cfg = from_dict(read_yaml(path))  # unknown keys / wrong types raise here
    factory = MODELS.get(cfg.model.name)
    check_params(factory, cfg.model.params, "model.params", {"in_channels": 3, "num_classes": 2})


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_has_a_fragment(name: str) -> None:
    path = MODEL_DIR / f"{name}.yaml"
    assert path.is_file(), f"model {name!r} has no config fragment {path}"
    assert read_yaml(path)["model"]["name"] == name


# ----------------------------------------------------------------------------- U-Net geometry


def test_valid_unet_sizes_follow_the_paper() -> None:
    assert valid_output_size(572) == 388
    assert valid_input_size(388) == 572
    assert valid_input_size(380) == 572  # the next valid input covering 380 output pixels
    with pytest.raises(ValueError, match="next valid size is 572"):
        valid_output_size(570)
    # independent: walk the layers of the depth-4 paper network by hand
    size = 572
    for _ in range(4):
        size = (size - 4) // 2
    size -= 4
    for _ in range(4):
        size = size * 2 - 4
    assert size == 388


def test_raw_valid_network_maps_572_to_388() -> None:
    net = UNet(1, 2, base_channels=2, depth=4, padding="valid").eval()
    with torch.no_grad():
        out = net.forward_valid(torch.randn(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)


def test_mirror_pad_matches_numpy_reflect() -> None:
    x = np.random.default_rng(0).random((2, 5, 3))
    for pads in [(0, 0, 0, 0), (1, 2, 0, 2), (7, 11, 13, 2)]:  # also pads far beyond the size
        top, bottom, left, right = pads
        ours = mirror_pad(torch.from_numpy(x), *pads).numpy()
        ref = np.pad(x, ((0, 0), (top, bottom), (left, right)), mode="reflect")
        np.testing.assert_array_equal(ours, ref)


def test_overlap_tile_output_is_aligned_with_the_input() -> None:
    """Interior outputs equal the raw valid network run on a real crop of the image."""
    torch.manual_seed(0)
    net = UNet(2, 2, base_channels=4, depth=2, padding="valid").eval()
    image = torch.randn(1, 2, 100, 90)
    with torch.no_grad():
        full = net(image)
        m = valid_input_size(12, depth=2)  # 52 px in, 12 px out
        margin = (m - valid_output_size(m, depth=2)) // 2
        # the padded image starts at -margin, so this crop shares the pooling grid of the full pass
        a, b = 4, 8
        assert (a + margin) % 4 == 0 and (b + margin) % 4 == 0
        tile = net.forward_valid(image[..., a : a + m, b : b + m])
    assert margin == 20
    torch.testing.assert_close(full[..., a + margin : a + margin + 12, b + margin : b + margin + 12], tile)


def test_same_mode_pads_by_reflection_and_crops_back() -> None:
    torch.manual_seed(0)
    net = UNet(1, 2, base_channels=4, depth=3).eval()
    x = np.random.default_rng(1).random((1, 1, 21, 30)).astype(np.float32)
    # independent padding: 21 → 24 (1 above, 2 below), 30 → 32 (1 left, 1 right)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 1)), mode="reflect")
    with torch.no_grad():
        ours = net(torch.from_numpy(x))
        ref = net.forward_valid(torch.from_numpy(padded))[..., 1:22, 1:31]
    torch.testing.assert_close(ours, ref)
