"""GPU check: exercise medseg's CUDA path end to end and print what it measured.

On a CUDA machine: a short training run with AMP (float16 + loss scaling) and, where enabled, the
accelerator augmentation; the Trainer-overhead ratio; the training-sample chain (CPU vs device);
sliding-window inference vs MONAI; a batch ``medseg predict`` over generated DICOM. Each part
prints images/s (or slices/s), peak GPU memory and its ratio. Without CUDA it says so and exits 0.

Run: ``python benchmarks/gpu_check.py [--steps N] [--out DIR]`` (``benchmarks/gpu_check.sh`` wraps it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS: list[dict[str, Any]] = []
#: further parts ``f(tmp_dir) -> dict`` (sliding window, batch predict) registered below
EXTRA_PARTS: list[Callable[[Path], dict[str, Any]]] = []


def _part(name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one part; a failure is reported and the check goes on with the next part."""
    print(f"\n=== {name}", flush=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        row = fn()
        row.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 — the check reports every failure and carries on
        traceback.print_exc()
        row = {"status": f"FAILED: {e.__class__.__name__}: {e}"}
    row["part"] = name
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(row, default=str), flush=True)
    RESULTS.append(row)


def train_part(data: Path, out: Path, steps: int, accelerator: bool) -> dict[str, Any]:
    """``medseg train`` (quick-start pipeline) on the GPU with AMP for ``steps`` steps."""
    from medseg.config import load_config
    from medseg.training.run import run_training

    ov = [f"data.root={data}", "data.generate_if_missing=false", "tracking.enabled=false", f"output_dir={out}",
          "train.device=cuda", "train.amp=auto", "train.time_limit_min=null", "train.epochs=2",
          f"train.steps_per_epoch={steps // 2}", "train.batch_size=32", "train.num_workers=8", "train.threads=null",
          "train.val_every=1", "train.evaluate_splits=[test]"]
    if accelerator:
        ov.append("transforms.accelerator=true")
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ov)
    t0 = time.perf_counter()
    result, evals = run_training(cfg)
    dt = time.perf_counter() - t0
    return {"steps": result.steps_done, "images_per_s_incl_validation": round(result.steps_done * 32 / dt, 1),
            "test_dice": evals["test"]["metrics"].get("dice"), "checkpoint": str(result.last_checkpoint)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default=None, help="folder for the JSON summary (default: a temp folder)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False) — nothing to check.")
        return 0
    print(f"gpu_check: {torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}")
    from medseg.data.synthetic import generate_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        data = generate_demo_data(tmp_p / "demo", patients=8, seed=0, progress=False)
        _part("train (AMP, CPU augmentation)", lambda: train_part(data, tmp_p / "runs", a.steps, False))
        _part("train (AMP, accelerator augmentation)", lambda: train_part(data, tmp_p / "runs_acc", a.steps, True))
        import bench_augment
        import bench_trainer

        _part("Trainer overhead vs bare loop (CUDA)", lambda: bench_trainer.main(quick=False, device="cuda")[0])
        _part("sample chain: accelerator vs cpu vs MONAI (CUDA)",
              lambda: {"rows": bench_augment.main(quick=False, device="cuda", root=data)})
        for extra in EXTRA_PARTS:
            _part(extra.__doc__.split("\n")[0] if extra.__doc__ else extra.__name__, lambda f=extra: f(tmp_p))
    print("\n=== summary")
    for row in RESULTS:
        print(json.dumps(row, default=str))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return 0 if all(r["status"] == "ok" for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
