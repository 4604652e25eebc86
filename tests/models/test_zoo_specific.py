"""Model-specific checks of the baselines (DeepLab v1, FCN-8s, PSPNet, STDC).

The generic contract (any input size, forward/backward, registry params) is tested for every
registered model in ``test_models.py``; this file checks what only the papers define: strides,
dilations, fused score maps, pyramid bins, parameter counts, auxiliary and detail losses.
Standard-size models are built on the ``meta`` device (no memory, no forward) to count parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from medseg.models import build_model, count_parameters
from medseg.models.deeplabv1 import DeepLabLargeFOV
from medseg.models.fcn import FCN8s, _upsampler
from medseg.models.pspnet import PSPNet
from medseg.models.stdc import STDCNet, STDCSeg, detail_target

torch.set_num_threads(1)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- DeepLab v1


def test_deeplabv1_output_stride_8_and_upsampling():
    net = DeepLabLargeFOV(1, 3, width=4, fc_channels=16).eval()
    for h, w in [(64, 80), (97, 131)]:
        x = torch.randn(1, 1, h, w)
        with torch.no_grad():
            score = net.score(x)
            out = net(x)
        # every stride-2 3×3/pad-1 pool maps h to ceil(h/2); pool4/pool5 keep the size
        assert score.shape[-2:] == (-(-h // 8), -(-w // 8))
        torch.testing.assert_close(out, F.interpolate(score, size=(h, w), mode="bilinear", align_corners=False))
    feats = net.backbone(torch.randn(1, 1, 64, 80))
    assert [f.shape[-1] for f in feats] == [40, 20, 10, 10, 10]


def test_deeplabv1_largefov_layers():
    net = DeepLabLargeFOV(3, 21)
    assert net.fc6.kernel_size == (3, 3) and net.fc6.dilation == (12, 12) and net.fc6.padding == (12, 12)
    assert net.fc6.out_channels == 1024 and net.fc7.out_channels == 1024 and net.fc7.kernel_size == (1, 1)
    pools = [m for m in net.backbone.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
    conv5 = [m for m in net.backbone.blocks[4].modules() if isinstance(m, nn.Conv2d)]
    assert len(conv5) == 3 and all(c.dilation == (2, 2) for c in conv5)
    # the paper's Table 2: DeepLab-LargeFOV has 20.5 M parameters (21 classes)
    assert abs(_count(net) - 20.5e6) / 20.5e6 < 0.01


# ----------------------------------------------------------------------------- FCN-8s


def test_fcn8s_parameter_count_matches_paper():
    with torch.device("meta"):
        net = build_model("fcn8s", 3, 21)
    # FCN-8s on VGG-16: 134 M parameters (Long et al. 2015, Table 1)
    assert abs(count_parameters(net) - 134e6) / 134e6 < 0.05


def test_fcn8s_fuses_pool5_pool4_pool3_scores():
    net = FCN8s(1, 2, width=4, fc_channels=16)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("score_fr", "score_pool4", "score_pool3"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    x = torch.randn(2, 1, 97, 131)
    out = net(x)
    assert out.shape == (2, 2, 97, 131)
    # the input is padded to 128 × 160: scores at strides 32, 16 and 8
    assert shapes == {
        "score_fr": (2, 2, 4, 5),
        "score_pool4": (2, 2, 8, 10),
        "score_pool3": (2, 2, 16, 20),
    }
    out.square().mean().backward()
    for name in ("score_fr", "score_pool4", "score_pool3"):
        assert getattr(net, name).weight.grad.abs().sum() > 0, name
    # skip scorers start at zero (FCN-32s initialisation); once set they change the output
    net.eval()
    with torch.no_grad():
        before = net(x)
        nn.init.normal_(net.score_pool3.weight)
        assert (net(x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("factor", [2, 8])
def test_fcn_upsampler_is_bilinear_interpolation(factor):
    up = _upsampler(3, factor)
    z = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        got = up(z)
    want = F.interpolate(z, scale_factor=factor, mode="bilinear", align_corners=False)
    assert got.shape == want.shape == (1, 3, 6 * factor, 7 * factor)
    # identical away from the border, where interpolate clamps and the transposed conv pads zeros
    torch.testing.assert_close(got[..., factor:-factor, factor:-factor], want[..., factor:-factor, factor:-factor])


# ----------------------------------------------------------------------------- PSPNet


def test_pspnet_pyramid_bins_and_output_stride():
    net = PSPNet(1, 2, depth=18).eval()
    sizes = []
    for branch in net.ppm.branches:
        branch[0].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    feat_shape: list[tuple[int, ...]] = []
    net.ppm.register_forward_hook(lambda m, i, o: feat_shape.extend([tuple(i[0].shape), tuple(o.shape)]))
    with torch.no_grad():
        out = net(torch.randn(1, 1, 65, 71))
    assert out.shape == (1, 2, 65, 71)
    assert sizes == [(1, 1), (2, 2), (3, 3), (6, 6)]
    c = net.backbone.out_channels
    # output stride 8, and the pyramid doubles the channels (4 branches of C/4)
    assert feat_shape == [(1, c, 9, 9), (1, 2 * c, 9, 9)]


def test_pspnet_aux_loss_weight_and_batch_of_one():
    torch.manual_seed(0)
    net = PSPNet(1, 3, depth=18).train()
    x = torch.randn(2, 1, 33, 41)
    label = torch.randint(0, 3, (2, 1, 33, 41))
    net(x)
    loss = net.extra_loss(label)
    aux = F.interpolate(net._aux_logits, size=(33, 41), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, 0.4 * F.cross_entropy(aux, label[:, 0]))
    loss.backward()
    assert net.aux_head[-1].weight.grad.abs().sum() > 0
    # a single-image batch trains (the 1×1 pyramid bin's BN falls back to running statistics)
    net(torch.randn(1, 1, 33, 41))
    assert torch.isfinite(net.extra_loss(label[:1]))
    net.eval()
    with torch.no_grad():
        net(x)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        net.extra_loss(label)
    no_aux = PSPNet(1, 3, depth=18, aux_weight=0.0)
    assert no_aux.aux_head is None and float(no_aux.extra_loss(label)) == 0.0


# ----------------------------------------------------------------------------- STDC


@pytest.mark.parametrize("variant,params,stage_modules", [("stdc1", 8.44e6, (2, 2, 2)), ("stdc2", 12.47e6, (4, 5, 3))])
def test_stdc_backbone_matches_paper(variant, params, stage_modules):
    # Fan et al. 2021, ImageNet comparison: STDC1 8.44 M and STDC2 12.47 M parameters, counted
    # with the classification head (1×1 ConvX to 1024, FC 1024, BN, linear to 1000 classes) —
    # the same modules as the authors' STDCNet813 / STDCNet1446
    with torch.device("meta"):
        net = STDCNet(3, variant, classifier_classes=1000)
    assert abs(_count(net) - params) / params < 0.005
    assert tuple(len(s) for s in (net.stage3, net.stage4, net.stage5)) == stage_modules
    small = STDCNet(1, variant, base=8).eval()
    with torch.no_grad():
        feats = small(torch.randn(1, 1, 97, 131))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (4, 49, 66), (8, 25, 33), (32, 13, 17), (64, 7, 9), (128, 4, 5)
    ]


def test_stdc_module_concatenates_four_blocks():
    net = STDCNet(3, "stdc1")
    module = net.stage3[0]
    assert [c[0].out_channels for c in module.convs] == [128, 64, 32, 32]
    assert [c[0].kernel_size for c in module.convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]


def _detail_reference(label: np.ndarray) -> np.ndarray:
    """The detail ground truth computed independently with SciPy (Laplacian at strides 1, 2, 4)."""
    lap = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], float)
    resp = np.clip(ndimage.correlate(label.astype(float), lap, mode="constant"), 0, None)
    h, w = label.shape
    fused = np.zeros((h, w))
    for s, wt in zip((1, 2, 4), (0.6, 0.3, 0.1)):
        coarse = resp[::s, ::s] > 0.1  # a stride-s 3×3 conv with padding 1 samples every s-th pixel
        rows = np.minimum((np.arange(h) * coarse.shape[0]) // h, coarse.shape[0] - 1)
        cols = np.minimum((np.arange(w) * coarse.shape[1]) // w, coarse.shape[1] - 1)
        fused += wt * coarse[np.ix_(rows, cols)]
    return (fused > 0.1).astype(np.float32)


def test_stdc_detail_target_is_laplacian_pyramid():
    label = np.zeros((37, 45), np.int64)
    label[8:25, 10:30] = 1
    label[28:33, 35:41] = 2
    got = detail_target(torch.from_numpy(label)[None, None])
    assert got.shape == (1, 1, 37, 45)
    np.testing.assert_array_equal(got[0, 0].numpy(), _detail_reference(label))
    # the stride-1 level alone marks exactly the inner border of the square
    inner = (label == 1) & ~ndimage.binary_erosion(label == 1, np.ones((3, 3)))
    assert got[0, 0].numpy()[inner].all()
    assert got[0, 0].numpy()[12:20, 15:25].sum() == 0  # deep inside: no detail


def test_stdc_detail_and_aux_losses():
    torch.manual_seed(0)
    label = torch.zeros(2, 1, 64, 72, dtype=torch.long)
    label[:, :, 20:44, 18:50] = 1
    x = torch.randn(2, 1, 64, 72)

    only_detail = STDCSeg(1, 2, base=8, aux_weight=0.0).train()
    only_detail(x)
    loss = only_detail.extra_loss(label)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert only_detail.detail_head[-1].weight.grad.abs().sum() > 0
    assert only_detail.backbone.stage3[0].convs[0][0].weight.grad.abs().sum() > 0

    only_aux = STDCSeg(1, 2, base=8, detail_loss=False, aux_weight=1.0).train()
    only_aux(x)
    expected = sum(
        F.cross_entropy(F.interpolate(only_aux._train_outputs[k], size=(64, 72), mode="bilinear"), label[:, 0])
        for k in ("aux16", "aux32")
    )
    torch.testing.assert_close(only_aux.extra_loss(label), expected)

    neither = STDCSeg(1, 2, base=8, detail_loss=False, aux_weight=0.0)
    assert neither.detail_head is None and neither.aux_heads is None
    assert float(neither.extra_loss(label)) == 0.0
    # training heads never run at inference; a single-image batch trains (pooled BN)
    both = STDCSeg(1, 2, base=8).train()
    both(x[:1])
    assert torch.isfinite(both.extra_loss(label[:1]))
    both.eval()
    with torch.no_grad():
        both(x)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        both.extra_loss(label)
