"""The training-sample chain: CPU augmentation vs the accelerator path vs MONAI's ``Rand2DElasticd`` chain.

Each side turns the same decoded DeepLesion 2.5-D samples (3 context slices, held in memory as the
sample cache holds them) into training crops with the U-Net weight map:

* **cpu** — medseg's CPU chain: crop with the elastic field of the whole slice (``elasticdeform``'s
  cubic B-spline, evaluated on the crop only), flips, border weight map; one sample at a time.
* **accelerator** — ``transforms.accelerator``: the CPU cuts the crop grown by the warp margin and
  draws the random numbers; the device warps, flips and adds the weight map, a batch at a time.
  Its rows also give the device part alone and the weight map alone (device vs CPU).
* **monai** — ``RandSpatialCropd`` → ``Rand2DElasticd`` (a Gaussian-smoothed random field, MONAI's
  elastic) → flips → the same weight map; one sample at a time.

samples/s, median of several repeats, sides interleaved. Run:
``python benchmarks/bench_augment.py [--quick] [--device cuda]``. Target on CUDA: accelerator ≥ 5× cpu.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import median, report, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _samples(tmp: Path, quick: bool, root: Path | None = None) -> tuple[list[dict[str, Any]], Any]:
    from medseg.config import load_config
    from medseg.data import build_dataset
    from medseg.data.synthetic import generate_demo_data

    if root is None:
        root = generate_demo_data(tmp / "dl", patients=3 if quick else 8, seed=0, progress=False,
                                  image_size=256 if quick else 512)
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", [f"data.root={root}", "data.generate_if_missing=false",
                                                                "data.spacing_mm=null"])
    ds = build_dataset(cfg.data, "train")
    return [s for s in (ds[i] for i in range(len(ds))) if s is not None], cfg


def main(quick: bool = False, device: str = "cpu", root: Path | None = None) -> list[dict[str, Any]]:
    """Rows: accelerator vs cpu, accelerator vs monai (samples/s), and the device part's own cost."""
    from monai.transforms import Compose, Rand2DElasticd, RandFlipd, RandSpatialCropd

    from medseg.config import load_config
    from medseg.data.base import collate
    from medseg.transforms import build_transforms
    from medseg.transforms.accelerated import DeviceAugment, border_weight_map_torch
    from medseg.transforms.dictionary import BorderWeightd, EnsureSampled

    set_threads()
    dev = torch.device(device)
    batch = 8 if quick else 32
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        samples, cfg = _samples(Path(tmp), quick, root)
    crop = 128
    base = [f"transforms.crop_size=[{crop},{crop}]"]
    cpu_t = build_transforms(load_config(None, base).transforms, train=True)
    acc_cfg = load_config(None, [*base, "transforms.accelerator=true"]).transforms
    acc_t = build_transforms(acc_cfg, train=True)
    device_aug = DeviceAugment(acc_cfg)
    wm = BorderWeightd(w0=10.0, sigma=5.0, class_balance=True)
    keys = ["image", "label", "instance", "truth"]
    monai_t = Compose([
        RandSpatialCropd(keys, (crop, crop), random_size=False),
        # σ 10 px displacements over a grid of control points 1/2 a crop apart (MONAI's B-spline-free elastic)
        Rand2DElasticd(keys, spacing=(crop // 2, crop // 2), magnitude_range=(1.0, 2.0), prob=1.0,
                       mode=["bilinear", "nearest", "nearest", "nearest"], padding_mode="reflection"),
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1), wm, EnsureSampled(),
    ]).set_random_state(seed=0)
    picks = [samples[i % len(samples)] for i in range(batch)]
    timings: dict[str, list[float]] = {"cpu": [], "acc": [], "acc_device": [], "monai": []}

    def run_cpu() -> None:
        for i, s in enumerate(picks):
            cpu_t.set_random_state(seed=i)
            cpu_t(dict(s))

    def run_acc() -> float:
        cut = []
        for i, s in enumerate(picks):
            acc_t.set_random_state(seed=i)
            cut.append(acc_t(dict(s)))
        b = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in collate(cut).items()}
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        device_aug(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run_monai() -> None:
        for s in picks:
            monai_t({k: s[k] for k in keys})

    run_cpu(), run_acc(), run_monai()  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_cpu()
        timings["cpu"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        timings["acc_device"].append(run_acc())
        timings["acc"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_monai()
        timings["monai"].append(time.perf_counter() - t0)
    rate = {k: batch / median(v) for k, v in timings.items()}
    # the border weight map alone: on the device (what the accelerator path runs) vs the CPU's EDTs
    b = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in collate(
        [acc_t(dict(s)) for s in picks]).items()}
    out = device_aug(b)
    inst_d, lab_d = out["instance"][:, 0], out["label"][:, 0]

    def run_wm_device() -> None:
        border_weight_map_torch(inst_d, lab_d, 10.0, 5.0, True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_wm_cpu() -> None:
        inst, lab = inst_d.cpu().numpy(), lab_d.cpu().numpy()
        for i in range(batch):
            wm({"instance": inst[i][None], "label": lab[i][None]})

    wm_t: dict[str, list[float]] = {"device": [], "cpu": []}
    run_wm_device()
    for _ in range(repeats):
        for key, fn in (("device", run_wm_device), ("cpu", run_wm_cpu)):
            t0 = time.perf_counter()
            fn()
            wm_t[key].append(time.perf_counter() - t0)
    t_wm = median(wm_t["device"])
    name = f"training sample chain, {crop}² crops of 3-slice DeepLesion samples, batch {batch} ({device})"
    share = 100 * t_wm / median(timings["acc"])
    return [
        report(f"{name}: accelerator vs cpu (elasticdeform)", rate["acc"], rate["cpu"], "samples/s",
               f"same crop window and field (tests/transforms/test_accelerated.py); weight map on the device "
               f"{1000 * t_wm / batch:.2f} ms/sample = {share:.0f} % of the accelerator path"),
        report(f"{name}: accelerator vs MONAI Rand2DElasticd chain", rate["acc"], rate["monai"], "samples/s",
               "speed only (MONAI's elastic is another field)"),
        report(f"{name}: device part alone vs cpu chain", rate["acc_device"], rate["cpu"], "samples/s",
               "warp + flips + intensity + weight map"),
        report(f"border weight map of the warped batch: device vs CPU (scipy EDTs, one sample at a time, {device})",
               batch / median(wm_t["device"]), batch / median(wm_t["cpu"]), "samples/s",
               "equal within 2e-7 (tests/transforms/test_accelerated.py)"),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    main(a.quick, a.device)
