"""Sliding-window vs whole-image inference: peak memory and time, plus the model-only time per slice.

``medseg.inference.predict_logits`` with ``inference.mode = "sliding"`` (256² tiles, overlap 0.25,
Gaussian blending, MONAI's ``sliding_window_inference``) against ``mode = "whole"`` (one forward
pass) on a 2048² three-channel image, with the quick-start U-Net
(``build_model("unet", 3, 2, {"base_channels": 16, "depth": 4})``, random weights from a fixed seed).

Each variant runs in a fresh Python process, so that the peaks do not mix and the allocator of one
does not serve the other: the child warms the model up on a small image, notes its resident set
(``VmRSS``), resets the kernel's peak (``/proc/self/clear_refs``), runs the large image once and
reports ``VmHWM − VmRSS_before`` (torch allocates outside Python's heap, so ``tracemalloc`` would
not see it). Where ``/proc`` is missing it falls back to ``resource.getrusage().ru_maxrss``.

Run: ``python benchmarks/bench_inference.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import THREADS, median, repeat, report, set_threads

from medseg.config import Config
from medseg.inference.predictor import predict_logits
from medseg.models import build_model

MODEL = ("unet", 3, 2, {"base_channels": 16, "depth": 4})
TILE, OVERLAP, BLEND = 256, 0.25, "gaussian"
VARIANTS = ("whole", "sliding")


def make_model() -> torch.nn.Module:
    """The quick-start U-Net with fixed random weights, in eval mode."""
    torch.manual_seed(0)
    return build_model(*MODEL).eval()


def make_config(mode: str) -> Config:
    """A default config with ``inference.mode = mode`` and the benchmark's tiling."""
    cfg = Config()
    cfg.inference.mode = mode
    cfg.inference.tile_size = [TILE, TILE]
    cfg.inference.overlap = OVERLAP
    cfg.inference.blend = BLEND
    cfg.train.amp = "off"
    return cfg


def make_image(size: int) -> torch.Tensor:
    """A ``(1, 3, size, size)`` float32 image in [0, 1] from a fixed seed."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _status_kib(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of ``/proc/self/status`` in KiB, or None without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_child(mode: str, size: int, out_path: Path) -> dict[str, Any]:
    """In a fresh process: one ``predict_logits`` on a ``size²`` image; memory, time, logits to ``out_path``."""
    set_threads()
    model, cfg, device = make_model(), make_config(mode), torch.device("cpu")
    image = make_image(size)
    predict_logits(model, make_image(TILE), cfg, device)  # warm-up: kernels, thread pool, MONAI import
    before = _status_kib("VmRSS")
    exact = before is not None and _reset_peak()
    if not exact:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    logits = predict_logits(model, image, cfg, device)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(out_path, logits[0].numpy())
    return {
        "mode": mode,
        "seconds": seconds,
        "peak_delta_mib": (peak - before) / 1024.0,
        "exact_peak": exact,
        "shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
    }


def _spawn(size: int, out_dir: Path, parallel: bool) -> dict[str, dict[str, Any]]:
    """Run :func:`run_child` for each variant in a fresh interpreter; their parsed JSON lines.

    ``parallel`` starts both at once: each process still has its own peak, but their timings then
    compete for the CPU, so only the quick smoke run uses it (it is bound by the imports).
    """
    script = str(Path(__file__).resolve())
    cmds = {
        m: [sys.executable, script, "--child", m, "--size", str(size), "--out", str(out_dir / f"{m}.npy")]
        for m in VARIANTS
    }
    results = {}
    procs: dict[str, subprocess.Popen[str]] = {}
    for m, cmd in cmds.items():
        procs[m] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not parallel:
            procs[m].wait()
    for m, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmds[m])} failed ({proc.returncode}):\n{stderr[-3000:]}")
        results[m] = json.loads(stdout.strip().splitlines()[-1])
    return results


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Both variants in fresh processes, then the per-slice timings here; returns the report rows."""
    set_threads()
    size, slice_size, n = (384, 192, 2) if quick else (2048, 512, 5)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-inf-") as tmp:
        res = _spawn(size, Path(tmp), parallel=quick)
        logits = {m: np.load(Path(tmp) / f"{m}.npy") for m in VARIANTS}
    w, s = res["whole"], res["sliding"]
    ok = w["shape"] == s["shape"] and w["finite"] and s["finite"]
    # tiles see zero-padded borders instead of their neighbours, so the logits differ a little
    diff = float(np.abs(logits["sliding"] - logits["whole"]).mean())
    check = (
        f"same shape {tuple(s['shape'])}, finite: {ok}; mean abs Δlogit {diff:.2g} "
        f"(whole's logit std {float(logits['whole'].std()):.2g})"
    )
    how = "VmHWM" if w["exact_peak"] and s["exact_peak"] else "ru_maxrss"
    rows = [
        report(
            f"predict_logits {size}²: sliding ({TILE}², overlap {OVERLAP}) vs whole — peak RSS Δ ({how})",
            s["peak_delta_mib"], w["peak_delta_mib"], "MiB", check=check, ok=ok,
        ),
        report(
            f"predict_logits {size}²: sliding ({TILE}², overlap {OVERLAP}) vs whole — time",
            s["seconds"], w["seconds"], "s", check=check, ok=ok,
        ),
    ]

    model, device = make_model(), torch.device("cpu")
    x = make_image(slice_size)
    sliding = make_config("sliding")
    with torch.inference_mode():
        t_model = median(repeat(lambda: model(x), n))
        ref = model(x)
    t_sliding = median(repeat(lambda: predict_logits(model, x, sliding, device), n))
    out = predict_logits(model, x, sliding, device)
    rows.append(
        report(
            f"{slice_size}² slice: predict_logits sliding ({TILE}² tiles) vs model only",
            t_sliding * 1e3, t_model * 1e3, "ms",
            check=f"mean abs Δlogit {(out - ref).abs().mean().item():.2g} (logit std {ref.std().item():.2g})",
            ok=bool(torch.isfinite(out).all()),
        )
    )
    per = (size // slice_size) ** 2
    # "same pixels": ``per`` slices cover the whole image exactly, and both sides ran the same model
    # on the same thread count to finite logits
    covered = per * slice_size**2
    same_pixels = covered == size**2
    timed = all(math.isfinite(t) and t > 0 for t in (t_model, w["seconds"]))
    rows.append(
        report(
            f"model only: one {slice_size}² slice vs 1/{per} of a whole {size}² pass (same pixels)",
            t_model * 1e3, w["seconds"] / per * 1e3, "ms",
            check=f"{per} × {slice_size}² = {covered} px vs {size}² = {size**2} px; logits finite: "
                  f"{bool(torch.isfinite(ref).all()) and w['finite']}; {THREADS} torch thread(s)",
            ok=same_pixels and timed and bool(torch.isfinite(ref).all()) and w["finite"],
        )
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.size, args.out)))
        sys.exit(0)
    rows = main(args.quick)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
