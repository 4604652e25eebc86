"""GPU check: exercise medseg's CUDA path end to end and print what it measured, in one call.

On a CUDA machine: both training paths end to end (AMP, CPU augmentation and the accelerator
augmentation); the Trainer vs a bare loop (with the host reads per step); the training-sample chain
(CPU vs device vs MONAI); sliding-window inference vs MONAI at 1024², 4096² and 8192² (time, peak
memory, class maps compared); a batch ``medseg predict`` over generated DICOM vs the forward pass
alone. Each part prints one JSON row; ``--out DIR`` writes them all to ``DIR/gpu_check.json``. Sized
to finish within 8 minutes on an H100. Without CUDA it says so and exits 0 — except with ``--smoke``:
every part at tiny sizes on whatever device there is (the CPU here), to know the script works.

Run: ``python benchmarks/gpu_check.py [--steps N] [--out DIR] [--smoke]`` (``benchmarks/gpu_check.sh``
wraps it).
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
#: the run's settings (set by :func:`main`): ``device`` and ``smoke`` (tiny sizes)
SETTINGS: dict[str, Any] = {"device": "cuda", "smoke": False}


def _part(name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one part; a failure is reported and the check goes on with the next part."""
    print(f"\n=== {name}", flush=True)
    cuda = torch.cuda.is_available()
    if cuda:
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
    row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    print(json.dumps(row, default=str), flush=True)
    RESULTS.append(row)


def train_part(data: Path, out: Path, steps: int, accelerator: bool) -> dict[str, Any]:
    """``medseg train`` (quick-start pipeline) on the device with AMP for ``steps`` steps."""
    from medseg.config import load_config
    from medseg.training.run import run_training

    smoke, device = SETTINGS["smoke"], SETTINGS["device"]
    batch = 4 if smoke else 32
    ov = [f"data.root={data}", "data.generate_if_missing=false", "tracking.enabled=false", f"output_dir={out}",
          f"train.device={device}", "train.amp=auto", "train.time_limit_min=null", "train.epochs=2",
          f"train.steps_per_epoch={max(steps // 2, 1)}", f"train.batch_size={batch}",
          f"train.num_workers={0 if smoke else 8}", "train.threads=null", "train.val_every=1",
          "train.evaluate_splits=[test]", "calibration.after_training=false"]
    if smoke:
        ov += ["transforms.crop_size=[64,64]", "model.params.base_channels=4", "inference.tta_flips=false"]
    if accelerator:
        ov.append("transforms.accelerator=true")
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ov)
    t0 = time.perf_counter()
    result, evals = run_training(cfg)
    dt = time.perf_counter() - t0
    return {"steps": result.steps_done, "images_per_s_incl_validation": round(result.steps_done * batch / dt, 1),
            "test_dice": evals["test"]["metrics"].get("dice"), "checkpoint": str(result.last_checkpoint)}


def sliding_window_part(tmp: Path) -> dict[str, Any]:
    """sliding window vs MONAI at 1024², 4096², 8192² (time, peak memory, class maps compared)"""
    import bench_predict

    smoke, device = SETTINGS["smoke"], SETTINGS["device"]
    cases = [(512, 0.25)] if smoke else [(1024, 0.25), (4096, 0.25), (8192, 0.25)]
    if smoke:
        bench_predict.MODEL_KIND["kind"] = "pointwise"
    try:
        rows = bench_predict.sliding_benchmark(cases, device, tile_batch=4, repeats=1 if smoke else 3)
    finally:
        bench_predict.MODEL_KIND["kind"] = "unet"
    ok = all(r["labels_equal"] > 0.999 for r in rows)
    return {"rows": rows, "status": "ok" if ok else "FAILED: class maps differ from MONAI's"}


def dicom_part(tmp: Path) -> dict[str, Any]:
    """DICOM batch predict vs the forward pass alone (slices/s; target ≥ 0.8 of the forward pass)"""
    import bench_predict

    smoke, device = SETTINGS["smoke"], SETTINGS["device"]
    return bench_predict.dicom_benchmark(device, n_series=1 if smoke else 3, n_slices=4 if smoke else 24,
                                         repeats=1 if smoke else 2)


EXTRA_PARTS.extend([sliding_window_part, dicom_part])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default=None, help="folder for the JSON summary (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes, also without CUDA (CPU)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False) — nothing to check.")
        return 0
    SETTINGS.update(device="cuda" if cuda else "cpu", smoke=a.smoke)
    dev, smoke = SETTINGS["device"], a.smoke
    steps = 4 if smoke else a.steps
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"gpu_check: {name} · torch {torch.__version__} · CUDA {torch.version.cuda}" + (" · smoke" if smoke else ""))
    from medseg.data.synthetic import generate_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        data = generate_demo_data(tmp_p / "demo", patients=4 if smoke else 8, seed=0, progress=False,
                                  image_size=128 if smoke else 512)
        _part("train (AMP, CPU augmentation)", lambda: train_part(data, tmp_p / "runs", steps, False))
        _part("train (AMP, accelerator augmentation)", lambda: train_part(data, tmp_p / "runs_acc", steps, True))
        import bench_augment
        import bench_trainer

        # the quick-start U-Net on 128² crops (as the 2026-11-30 H200 row); --smoke: bench_trainer's tiny default
        sizes = {} if smoke else {"base_channels": 16, "crop": 128}
        _part(f"Trainer overhead vs bare loop ({dev})", lambda: bench_trainer.main(quick=smoke, device=dev, **sizes)[0])
        _part(f"sample chain: accelerator vs cpu vs MONAI ({dev})",
              lambda: {"rows": bench_augment.main(quick=smoke, device=dev, root=data)})
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
