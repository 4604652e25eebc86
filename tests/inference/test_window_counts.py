"""Stitching as cheap as MONAI's (issue 22, item 4): operators, copies and host reads per image of
medseg's sliding window and of MONAI's ``sliding_window_inference``, counted side by side with
``torch.profiler`` on the same image, tiles, overlap, Gaussian weights, batch size and model; and the
image moves to the predicting device once, whatever the number of tile batches.
"""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.profiler import ProfilerActivity, profile

from medseg.inference.window import sliding_window

TILE, OVERLAP, BATCH = (64, 64), 0.25, 4


def _counts(fn: object) -> dict[str, int]:
    """Top-level ``aten::`` operators (not those inside another operator), every ``aten::copy_``,
    every host read (``aten::_local_scalar_dense``) and the forward passes, of one call of ``fn``."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    events = list(prof.events())
    top = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return {"operators": len(top), "copies": sum(e.name == "aten::copy_" for e in events),
            "host_reads": sum(e.name == "aten::_local_scalar_dense" for e in events),
            "forwards": sum(e.name == "aten::conv2d" for e in events)}


def test_operators_copies_and_reads_per_image_at_most_monais() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 3, padding=1).eval()
    image = torch.randn(1, 1, 256, 256)  # 5 × 5 tiles of 64² at overlap 0.25: 7 batches of 4

    def ours() -> torch.Tensor:
        return sliding_window(image, net, TILE, OVERLAP, "gaussian", BATCH, output="logits")

    def monai() -> torch.Tensor:
        return sliding_window_inference(image, TILE, BATCH, net, overlap=OVERLAP, mode="gaussian", sigma_scale=0.125)

    with torch.no_grad():
        torch.testing.assert_close(ours(), monai(), rtol=0, atol=1e-5)  # the same logits
        labels, _ = sliding_window(image, net, TILE, OVERLAP, "gaussian", BATCH, output="labels")
        assert torch.equal(labels.long(), monai().argmax(1))
    ours_n, monai_n = _counts(ours), _counts(monai)
    assert ours_n["forwards"] == monai_n["forwards"] == 7, (ours_n, monai_n)
    for key in ("operators", "copies", "host_reads"):
        assert ours_n[key] <= monai_n[key], (key, ours_n, monai_n)

    # the class map, band by band, against MONAI's logits + argmax
    ours_lab = _counts(lambda: sliding_window(image, net, TILE, OVERLAP, "gaussian", BATCH, output="labels"))
    monai_lab = _counts(lambda: monai().argmax(1).to(torch.uint8))
    for key in ("operators", "copies", "host_reads"):
        assert ours_lab[key] <= monai_lab[key], (key, ours_lab, monai_lab)


def test_the_image_moves_to_the_device_once() -> None:
    """A host image predicted on another device (``meta`` here: every tensor op runs, no data) is copied
    once — not once per tile batch: the number of device moves does not grow with the image."""
    net = nn.Conv2d(1, 2, 3, padding=1).to("meta").eval()
    moves = []
    for size in (128, 320):  # 4 and 36 tiles
        image = torch.randn(1, 1, size, size)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = sliding_window(image, net, TILE, OVERLAP, "gaussian", BATCH, device="meta")
        assert out.device.type == "meta" and out.shape == (1, 2, size, size)
        moves.append(sum(e.name == "aten::_to_copy" for e in prof.events()))
    assert moves[0] == moves[1] and moves[0] <= 4, moves
