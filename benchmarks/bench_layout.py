"""The models' memory layout: channels_last (NHWC, how ``build_model`` builds every model) vs PyTorch's default.

oneDNN's CPU convolutions (and cuDNN's under mixed precision) run fastest on NHWC tensors. Both sides
build the quick-start U-Net (``pipelines/quickstart.yaml``: 16 base channels, depth 4, 9 input channels
= three windows × three context slices) from the same weights:

* **ours** — ``build_model(..., channels_last=True)`` and the batch made NHWC, as the Trainer does;
* **reference** — ``channels_last=False``: the contiguous NCHW layout PyTorch builds by default.

Rows: seconds per training step (batch 8 of 96² crops, Adam, the quick start's shapes) and per
whole-slice inference batch (4 slices of 416², eval mode, no gradients), one thread (``common.THREADS``).
The check: the two layouts give the same loss and logits (within float rounding: 1e-4 relative) and
the same gradients after one step (relative L2 error below 1e-2 — BatchNorm's channels_last kernels sum
in another order, ~1e-3 here; checked without dropout, whose random mask is drawn in memory order and
so differs between the layouts). Run: ``python benchmarks/bench_layout.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from common import report, set_threads, time_pair

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.config import load_config  # noqa: E402
from medseg.models import build_model  # noqa: E402


def _pair(in_channels: int, dropout: float | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    m = load_config(ROOT / "pipelines" / "quickstart.yaml", []).model
    params = {**m.params, **({} if dropout is None else {"dropout": dropout})}
    torch.manual_seed(0)
    ours = build_model(m.name, in_channels, 2, params, channels_last=True)
    ref = build_model(m.name, in_channels, 2, params, channels_last=False)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-6))


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Two rows: a training step and an inference batch."""
    set_threads()
    ch, n = 9, (3 if quick else 10)
    ours, ref = _pair(ch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, ch, 96, 96, generator=g)
    y = torch.randint(0, 2, (8, 96, 96), generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    # agreement: one step's loss and gradients from the same weights and batch, without dropout (its
    # random mask is drawn in memory order, so the two layouts drop different elements)
    losses, grads = [], []
    for net, inp in zip(_pair(ch, dropout=0.0), (x_cl, x)):
        net.train()
        loss = torch.nn.functional.cross_entropy(net(inp), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    train_ok = _close(losses[0], losses[1], 1e-4) and float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-2
    opts = [torch.optim.Adam(net.parameters(), 1e-4) for net in (ours, ref)]

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer, inp: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(inp), y).backward()
        opt.step()

    t_ours, t_ref = time_pair(lambda: step(ours, opts[0], x_cl), lambda: step(ref, opts[1], x), n, warmup=2)
    rows = [report("training step, quick-start U-Net, 8×9×96², 1 thread: channels_last vs NCHW", t_ours, t_ref,
                   "s", "same loss and gradients (1e-4 / 1e-2 relative)" if train_ok else "loss or gradients differ",
                   ok=train_ok)]

    size = 256 if quick else 416
    ours.eval()
    ref.eval()
    ref.load_state_dict(ours.state_dict())
    slices = torch.randn(4, ch, size, size, generator=g)
    with torch.no_grad():
        infer_ok = _close(ours(slices), ref(slices), 1e-4)
        t_ours, t_ref = time_pair(lambda: ours(slices), lambda: ref(slices), n, warmup=1)
    rows.append(report(f"whole-slice inference, 4×9×{size}², 1 thread: channels_last vs NCHW", t_ours, t_ref, "s",
                       "same logits (1e-4 relative)" if infer_ok else "logits differ", ok=infer_ok))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, 256² slices")
    args = ap.parse_args()
    rows = main(args.quick)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
