"""Losses: every registered loss against an independent NumPy reference, plus the shared contract.

The references below are plain loops over pixels and classes; they share no code with
``medseg.losses``. Registering a new loss makes ``test_every_loss_has_a_reference`` fail until a
reference is added to ``REFERENCES`` — the rest of the suite then covers it automatically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.registry import RegistryError
from medseg.training.losses import LOSSES, build_loss, weighted_ce

torch.set_num_threads(1)

IGNORE = 255


# ----------------------------------------------------------------------------- references


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of a (B, K, H, W) float64 array, one pixel at a time."""
    b, k, h, w = logits.shape
    out = np.zeros_like(logits)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                z = logits[i, :, y, x] - logits[i, :, y, x].max()
                e = np.exp(z)
                out[i, :, y, x] = e / e.sum()
    return out


def ref_weighted_ce(
    logits: np.ndarray, label: np.ndarray, weight: np.ndarray | None, ignore_index: int | None = None
) -> float:
    """mean over non-ignored pixels of w(x) · (−log p_label(x))."""
    p = _softmax(logits)
    b, _, h, w = logits.shape
    total, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                c = int(label[i, 0, y, x])
                if ignore_index is not None and c == ignore_index:
                    continue
                wx = 1.0 if weight is None else float(weight[i, 0, y, x])
                total += wx * -math.log(p[i, c, y, x])
                n += 1
    return total / max(n, 1)


def ref_dice(
    logits: np.ndarray,
    label: np.ndarray,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch: bool = True,
    ignore_index: int | None = None,
) -> float:
    """1 − (2 Σ p g + s) / (Σ p + Σ g + s) per class (pooled over the batch or per sample), averaged."""
    p = _softmax(logits)
    b, k, h, w = logits.shape
    classes = range(0 if include_background else 1, k)
    groups = [list(range(b))] if batch else [[i] for i in range(b)]
    losses = []
    for group in groups:
        for c in classes:
            inter = psum = gsum = 0.0
            for i in group:
                for y in range(h):
                    for x in range(w):
                        lab = int(label[i, 0, y, x])
                        if ignore_index is not None and lab == ignore_index:
                            continue
                        g = 1.0 if lab == c else 0.0
                        inter += p[i, c, y, x] * g
                        psum += p[i, c, y, x]
                        gsum += g
            losses.append(1 - (2 * inter + smooth) / (psum + gsum + smooth))
    return float(np.mean(losses))


def ref_weighted_ce_dice(
    logits: np.ndarray,
    label: np.ndarray,
    weight: np.ndarray | None,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    ignore_index: int | None = None,
    **dice_kw: Any,
) -> float:
    """ce_weight · CE + dice_weight · Dice."""
    return ce_weight * ref_weighted_ce(logits, label, weight, ignore_index) + dice_weight * ref_dice(
        logits, label, ignore_index=ignore_index, **dice_kw
    )


RefFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]

#: name → list of (YAML params, reference(logits, label, weight)) — one entry per registered loss
REFERENCES: dict[str, list[tuple[dict[str, Any], RefFn]]] = {
    "weighted_ce": [
        ({}, lambda lg, lb, w: ref_weighted_ce(lg, lb, w)),
        ({"ignore_index": IGNORE}, lambda lg, lb, w: ref_weighted_ce(lg, lb, w, IGNORE)),
    ],
    "dice": [
        ({}, lambda lg, lb, w: ref_dice(lg, lb)),
        ({"include_background": True, "smooth": 1.0}, lambda lg, lb, w: ref_dice(lg, lb, True, 1.0)),
        ({"batch": False}, lambda lg, lb, w: ref_dice(lg, lb, batch=False)),
        ({"ignore_index": IGNORE}, lambda lg, lb, w: ref_dice(lg, lb, ignore_index=IGNORE)),
    ],
    "weighted_ce_dice": [
        ({}, lambda lg, lb, w: ref_weighted_ce_dice(lg, lb, w)),
        (
            {"ce_weight": 0.3, "dice_weight": 2.0, "include_background": True, "batch": False},
            lambda lg, lb, w: ref_weighted_ce_dice(lg, lb, w, 0.3, 2.0, include_background=True, batch=False),
        ),
        ({"ignore_index": IGNORE}, lambda lg, lb, w: ref_weighted_ce_dice(lg, lb, w, ignore_index=IGNORE)),
    ],
}


def _case(seed: int, k: int = 3, ignore: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits (2, k, 5, 6), labels (with a few ignored pixels) and a border-like weight map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 5, 6, generator=g) * 3
    label = torch.randint(0, k, (2, 1, 5, 6), generator=g)
    label[1, 0, :2, :] = 0  # the second image has little foreground on top
    if ignore:
        label[0, 0, 0, :3] = IGNORE
        label[1, 0, 4, 4:] = IGNORE
    weight = 1 + 9 * torch.rand(2, 1, 5, 6, generator=g)
    return logits, label, weight


# ----------------------------------------------------------------------------- tests


def test_every_loss_has_a_reference() -> None:
    missing = set(LOSSES.names()) - set(REFERENCES)
    assert not missing, f"add a NumPy reference to REFERENCES for: {sorted(missing)}"
    assert set(REFERENCES) <= set(LOSSES.names())


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("with_weight", [True, False])
def test_loss_matches_reference(name: str, with_weight: bool) -> None:
    for i, (params, ref) in enumerate(REFERENCES[name]):
        logits, label, weight = _case(i, ignore="ignore_index" in params)
        w = weight if with_weight else None
        got = build_loss(name, params)(logits, label, w)
        want = ref(logits.double().numpy(), label.numpy(), None if w is None else w.double().numpy())
        assert got.ndim == 0 and got.dtype == torch.float32
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6), (name, params)


@pytest.mark.parametrize("name", LOSSES.names())
def test_weight_none_equals_unit_weight(name: str) -> None:
    logits, label, _ = _case(7)
    loss = build_loss(name)
    ones = torch.ones(2, 1, 5, 6)
    assert loss(logits, label, None).item() == pytest.approx(loss(logits, label, ones).item(), rel=1e-6)


def test_weight_none_is_plain_cross_entropy() -> None:
    logits, label, _ = _case(3)
    plain = F.cross_entropy(logits, label[:, 0])
    assert weighted_ce(logits, label).item() == pytest.approx(plain.item(), rel=1e-6)
    assert build_loss("weighted_ce")(logits, label).item() == pytest.approx(plain.item(), rel=1e-6)


def test_weighted_ce_hand_numbers() -> None:
    # Zero logits: every pixel has −log p = log 2; weights 1 and 3 → mean 2·log 2.
    logits = torch.zeros(1, 2, 1, 2)
    label = torch.tensor([[[[0, 1]]]])
    weight = torch.tensor([[[[1.0, 3.0]]]])
    assert weighted_ce(logits, label, weight).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    # the ignored pixel is dropped from sum and count: only the weight-1 pixel remains
    label_ign = torch.tensor([[[[0, IGNORE]]]])
    assert weighted_ce(logits, label_ign, weight, IGNORE).item() == pytest.approx(math.log(2), rel=1e-6)


def test_ignored_pixels_do_not_matter() -> None:
    logits, label, weight = _case(5, ignore=True)
    other = logits.clone()
    ign = label[:, 0] == IGNORE
    other.permute(0, 2, 3, 1)[ign] = torch.randn(int(ign.sum()), 3) * 10
    for name in LOSSES.names():
        loss = build_loss(name, {"ignore_index": IGNORE})
        assert loss(logits, label, weight).item() == pytest.approx(loss(other, label, weight).item(), rel=1e-6)


def test_dice_perfect_prediction_is_zero_and_batch_pools() -> None:
    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, 1:3, 1:3] = 1  # the second image has no lesion
    perfect = F.one_hot(label[:, 0], 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert build_loss("dice")(perfect, label).item() == pytest.approx(0.0, abs=1e-6)
    # one false-positive pixel on the empty image: per-sample Dice scores that image ≈ 1,
    # batch Dice only dilutes the pooled overlap a little
    fp = perfect.clone()
    fp[1, :, 0, 0] = torch.tensor([-20.0, 20.0])
    per_sample = build_loss("dice", {"batch": False})(fp, label).item()
    pooled = build_loss("dice")(fp, label).item()
    assert per_sample == pytest.approx(0.5, abs=1e-3)  # mean of ≈0 and ≈1
    assert pooled == pytest.approx(1 - 8 / 9, abs=1e-3)  # 2·4 / (5 + 4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradient_finite(name: str) -> None:
    logits, label, weight = _case(11)
    logits = (logits * 1e3).requires_grad_()  # saturated softmax must not give inf/NaN
    loss = build_loss(name)(logits, label, weight)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_amp_safe(name: str) -> None:
    logits, label, weight = _case(13)
    low = logits.to(torch.bfloat16)
    loss = build_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(low, label, weight)
    want = loss(low.float(), label, weight)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(RegistryError) as err:
        build_loss("focal_tversky")
    for name in LOSSES.names():
        assert name in str(err.value)
    assert "loss.name" in str(err.value)


def test_bad_params_name_the_key() -> None:
    with pytest.raises(RegistryError, match=r"loss\.params\.gamma"):
        build_loss("dice", {"gamma": 2})
    with pytest.raises(RegistryError, match=r"loss\.params\.ce_weight"):
        build_loss("weighted_ce_dice", {"ce_weight": "high"})


def test_bad_inputs_give_clear_errors() -> None:
    logits, label, weight = _case(1)
    loss = build_loss("weighted_ce_dice")
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        loss(logits, torch.full_like(label, 3))
    with pytest.raises(ValueError, match="label of shape"):
        loss(logits, label[:, :, :4])
    with pytest.raises(ValueError, match="weight of shape"):
        loss(logits, label, weight[..., :4])
    with pytest.raises(ValueError, match="integer class ids"):
        loss(logits, label.float())
    # (B, H, W) labels are accepted as well
    assert loss(logits, label[:, 0], weight).item() == pytest.approx(loss(logits, label, weight).item())
