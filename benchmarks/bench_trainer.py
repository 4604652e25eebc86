"""Trainer overhead: steps/s of medseg's training loop vs a bare PyTorch loop, same model and batches.

Both sides start from the same weights and optimizer state and take the same pre-loaded batches
(data loading is out of both measurements: it is the same DataLoader either way) and neither writes a
checkpoint, so the ratio is what the Trainer itself costs per step: the progress bar, metric logging,
the label check on the host, the loss read-back once per ``train.log_every`` steps (with the
non-finite guard), the LR schedule. The agreement check is exact: after the same steps both sides hold
bit-identical weights.

Beside the times it prints the host reads (``aten::_local_scalar_dense``: the host waiting for the
device, on a GPU) per step of each side, counted with ``torch.profiler`` over one more epoch — all of
them, and the Trainer's outside its one read per log interval (and Adam's CPU step counter).

Run: ``python benchmarks/bench_trainer.py [--quick] [--base-channels N] [--crop N]`` (``--device cuda`` on a GPU
machine). Target: overhead ≤ 5 % (ratio ≥ 0.95) on a model whose step takes ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import report, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trainer(out: Path, quick: bool, device: str, base_channels: int, crop: int) -> Any:
    from medseg.config import load_config
    from medseg.data.synthetic import generate_demo_data
    from medseg.training.trainer import Trainer

    root = generate_demo_data(out / "demo", patients=4 if quick else 8, seed=0, progress=False,
                              image_size=128 if quick else 256)
    ov = [f"data.root={root}", "data.generate_if_missing=false", "data.spacing_mm=null", "tracking.enabled=false",
          f"output_dir={out / 'runs'}", f"transforms.crop_size=[{crop},{crop}]", "train.batch_size=8",
          "train.epochs=1000", "train.max_steps=null", "train.time_limit_min=null", f"train.device={device}",
          "train.num_workers=0", "train.log_every=10", "train.threads=1", f"model.params.base_channels={base_channels}",
          "model.params.dropout=0.0"]  # dropout would draw from the RNG both sides share: masks would differ
    return Trainer(load_config(ROOT / "pipelines" / "quickstart.yaml", ov))


def _bare_loop(trainer: Any, batches: list[dict[str, Any]]) -> tuple[Any, Any]:
    """A fresh copy of the trainer's model, optimizer, scheduler and scaler, and the plain loop over them."""
    from medseg.runtime import amp_dtype

    model = copy.deepcopy(trainer.net)
    opt = type(trainer.optimizer)(model.parameters(), **trainer.optimizer.defaults)
    opt.load_state_dict(trainer.optimizer.state_dict())
    t = trainer.cfg.train
    from medseg.training.optim import lr_factor

    total = trainer.total_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(t.schedule, s, total, t.poly_power))
    sched.load_state_dict(trainer.scheduler.state_dict())
    scaler = torch.amp.GradScaler(trainer.device.type, enabled=trainer.scaler.is_enabled())
    dev, amp, loss_fn, clip = trainer.device, trainer.amp, trainer.loss_fn, t.grad_clip

    def run() -> None:
        model.train()
        for b in batches:
            image = b["image"].to(dev, non_blocking=True)
            label = b["label"].to(dev, non_blocking=True)
            weight = b["weight"].to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp_dtype(dev), enabled=amp):
                logits = model(image)
            loss = loss_fn(logits.float(), label, weight)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return model, run


def _reads_per_step(fn: Any, steps: int) -> tuple[float, float]:
    """Host reads per step of one call of ``fn`` (``steps`` steps): all, and outside the allowed reads."""
    from torch.profiler import ProfilerActivity, profile

    from medseg.training.losslog import host_reads

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    events = list(prof.events())
    total = sum(e.name == "aten::_local_scalar_dense" for e in events)
    between = len(host_reads(events, skip_prefixes=("Optimizer.step#",)))
    return total / steps, between / steps


def main(quick: bool = False, device: str = "cpu", base_channels: int = 4, crop: int = 32) -> list[dict[str, Any]]:
    """Trainer epochs vs the bare loop on the same batches; one row."""
    set_threads()
    steps = 10 if quick else 30
    repeats = 2 if quick else 9
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(Path(tmp), quick, device, base_channels, crop)
        trainer.steps_per_epoch = steps
        trainer.sampler.set_epoch(0, steps * trainer.cfg.train.batch_size)
        batches = [b for b in trainer.train_loader if b is not None][:steps]
        trainer.train_loader = batches  # the same pre-loaded batches for both sides
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        model, bare = _bare_loop(trainer, batches)

        def ours() -> None:
            trainer._train_epoch()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()

        t_ours: list[float] = []
        t_bare: list[float] = []
        for _ in range(repeats + 1):  # the first round warms up both
            for fn, acc in ((ours, t_ours), (bare, t_bare)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        same = all(torch.equal(a, b) for a, b in zip(trainer.net.state_dict().values(), model.state_dict().values()))
        (ours_all, ours_between), (bare_all, _) = _reads_per_step(ours, steps), _reads_per_step(bare, steps)
    # the fastest round of each (rounds interleaved): on a shared machine load from elsewhere only slows a round
    s_ours, s_bare = steps / min(t_ours[1:]), steps / min(t_bare[1:])
    overhead = 1 - s_ours / s_bare
    check = (f"weights bit-identical after {steps * (repeats + 1)} steps: {same}; "
             f"step {1000 / s_bare:.1f} ms (bare); overhead {100 * overhead:.1f} % (target ≤ 5 %); "
             f"host reads/step: Trainer {ours_all:.2f} ({ours_between:.2f} between log reads, "
             f"optimizer's CPU counter aside), bare {bare_all:.2f}")
    return [report(f"Trainer ({device}, batch 8 of {crop}², base_channels {base_channels}, {steps} steps, log_every 10) "
                   "vs bare PyTorch loop", s_ours, s_bare, "steps/s", check,
                   ok=same and math.isfinite(overhead) and ours_between == 0)]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--base-channels", type=int, default=4, help="U-Net width (4 at 32²: a step of ~10 ms on a CPU)")
    p.add_argument("--crop", type=int, default=32, help="crop size of the batches")
    a = p.parse_args()
    rows = main(a.quick, a.device, a.base_channels, a.crop)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
