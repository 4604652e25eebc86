"""Cells benchmark: the medseg cells pipeline vs border + elastic off vs MONAI BasicUNet + DiceCELoss.

Three arms on the generated EM-like cells (``pipelines/cells.yaml``), each trained for the same
wall-clock budget (``--budget-min``, default 8: the budget-shaped schedule ends every arm's
learning rate at the budget) with ``--seeds`` (default 0, 1, 2), one arm after another:

* ``medseg``          — the cells pipeline as shipped: U-Net, border-weighted cross-entropy
  (w0 = 10, σ = 5 px), 3×3-grid elastic deformation over the whole 512² image (σ = 10 px);
* ``medseg, border + elastic off`` — the same with ``transforms.weight_map.w0=0`` and
  ``transforms.elastic.enabled=false`` (the ablation's ``neither`` arm: one run serves both);
* ``MONAI BasicUNet + DiceCELoss`` — ``monai.networks.nets.BasicUNet`` (its default features,
  2.0 M parameters against the U-Net's 1.9 M) with ``monai.losses.DiceCELoss(to_onehot_y=True,
  softmax=True)``, trained by the same Trainer on the same crops (same crop sampler, flips and
  elastic deformation; DiceCE ignores the weight map), calibrated and evaluated the same way.

Every arm is chosen an operating point on the val split (``calibration.after_training``) and scored
on the test images with pixel error and Rand error (the ISBI 2012 measures; lower is better) and the
split/merge error (the Rand error over the pixels both call cell: fused or cut cells only, blind to
membrane width; ``medseg.em_metrics``). Runs are found again in MLflow by their ``ablation_key`` tag
(see ``ablation.py``), so the command resumes where it stopped, ``--table-only`` rebuilds the table
and ``--refresh`` recalibrates and re-evaluates the finished runs without retraining.

Usage::

    python benchmarks/cells_benchmark.py                      # 3 arms × 3 seeds × 8 min ≈ 1.5 h
    python benchmarks/cells_benchmark.py --budget-min 0.33 --seeds 0    # a smoke run
    python benchmarks/cells_benchmark.py --table-only
    python benchmarks/cells_benchmark.py --refresh      # new measures / grid on the trained runs, ≈ 5 min
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ablation  # noqa: E402  (benchmarks/ on sys.path, as the scripts import each other)

#: arm label → (ablation variant name, overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "medseg cells pipeline": ("full", []),
    "medseg, border + elastic off": ("neither", ablation.VARIANTS["neither"]),
    "MONAI BasicUNet + DiceCELoss": ("monai_basicunet_dicece", [
        "model.name=monai_basicunet", "model.params={}", "loss.name=monai_dicece", "loss.params={}"]),
}


def register_monai() -> None:
    """Register MONAI's BasicUNet and DiceCELoss under medseg's model / loss contracts (this process only)."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    from medseg.registry import LOSSES, MODELS

    if "monai_basicunet" not in MODELS:
        @MODELS.register("monai_basicunet")
        def monai_basicunet(in_channels: int, num_classes: int) -> torch.nn.Module:
            """MONAI BasicUNet, 2-D, its default features."""
            return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)

    if "monai_dicece" not in LOSSES:
        @LOSSES.register("monai_dicece")
        class MonaiDiceCE(torch.nn.Module):
            """MONAI DiceCELoss on softmax outputs and one-hot labels; the weight map is ignored."""

            def __init__(self) -> None:
                super().__init__()
                self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

            def forward(self, logits: torch.Tensor, label: torch.Tensor, weight: Any = None) -> torch.Tensor:
                return self.loss(logits, label)


def arms(seeds: list[int], budget: float | None, extra: list[str]) -> dict[str, list[ablation.Arm]]:
    """Arm label → its runs (one per seed)."""
    return {label: [ablation.Arm("cells", variant, s, tuple(ov), budget, tuple(extra)) for s in seeds]
            for label, (variant, ov) in ARMS.items()}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes per run (all arms alike)")
    p.add_argument("--output-dir", default=str(ablation.ROOT / "outputs" / "ablation"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--refresh", action="store_true",
                   help="recalibrate and re-evaluate every finished arm from its checkpoint (no retraining)")
    p.add_argument("--out", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
    register_monai()
    plan = arms(seeds, args.budget_min, extra)
    if not args.table_only:
        todo = [a for runs in plan.values() for a in runs]
        for i, arm in enumerate(todo, 1):
            print(f"== cells {arm.variant} seed {arm.seed} ({i}/{len(todo)})", flush=True)
            ablation.run_arm(arm, out_dir, refresh=args.refresh)
    found = {label: ablation.collect(out_dir, runs).get(runs[0].variant, []) for label, runs in plan.items()}
    text = (f"### cells: {args.budget_min} min per run, seeds {args.seeds}\n\n"
            + ablation.markdown("cells", found, reference="medseg cells pipeline"))
    print(text)
    if args.out:
        ablation.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
