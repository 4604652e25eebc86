"""Trainer overhead: steps/s of medseg's training loop vs a bare PyTorch loop, same model and batches.

Both sides start from the same weights and optimizer state and take the same pre-loaded batches
(data loading is out of both measurements: it is the same DataLoader either way), so the ratio is
what the Trainer itself costs: the progress bar, metric logging, the loss read-back that guards
against a non-finite loss, the LR schedule and one atomic checkpoint per epoch. The agreement check
is exact: after the same steps both sides hold bit-identical weights.

Run: ``python benchmarks/bench_trainer.py [--quick]`` (``--device cuda`` on a GPU machine).
Target: overhead ≤ 5 % (ratio ≥ 0.95).
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
from common import median, report, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trainer(out: Path, quick: bool, device: str) -> Any:
    from medseg.config import load_config
    from medseg.data.synthetic import generate_demo_data
    from medseg.training.trainer import Trainer

    root = generate_demo_data(out / "demo", patients=4 if quick else 8, seed=0, progress=False,
                              image_size=128 if quick else 256)
    crop = 64 if quick else 128
    ov = [f"data.root={root}", "data.generate_if_missing=false", "data.spacing_mm=null", "tracking.enabled=false",
          f"output_dir={out / 'runs'}", f"transforms.crop_size=[{crop},{crop}]", "train.batch_size=8",
          "train.epochs=1000", "train.max_steps=null", "train.time_limit_min=null", f"train.device={device}",
          "train.num_workers=0", "train.log_every=10", "train.threads=1",
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


def main(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Trainer epochs vs the bare loop on the same batches; one row."""
    set_threads()
    steps = 3 if quick else 30
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(Path(tmp), quick, device)
        trainer.steps_per_epoch = steps
        trainer.sampler.set_epoch(0, steps * trainer.cfg.train.batch_size)
        batches = [b for b in trainer.train_loader if b is not None][:steps]
        trainer.train_loader = batches  # the same pre-loaded batches for both sides
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        model, bare = _bare_loop(trainer, batches)

        def ours() -> None:
            trainer._train_epoch()
            trainer.save_checkpoint()
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
    s_ours, s_bare = steps / median(t_ours[1:]), steps / median(t_bare[1:])
    overhead = 1 - s_ours / s_bare
    check = (f"weights bit-identical after {steps * (repeats + 1)} steps: {same}; "
             f"overhead {100 * overhead:.1f} % (target ≤ 5 %)")
    return [report(f"Trainer ({device}, batch 8, {steps} steps + 1 checkpoint) vs bare PyTorch loop",
                   s_ours, s_bare, "steps/s", check, ok=same and math.isfinite(overhead))]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    rows = main(a.quick, a.device)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
