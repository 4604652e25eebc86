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

samples/s, median of several repeats, sides interleaved. Each row's agreement is computed here, on
the same samples: the accelerator path against the CPU chain (flips off, same seeds: labels within
10 % of the lesion pixels, images within 0.02 mean), the device weight map against the CPU's (rtol 1e-5, atol
2e-7), and finite crops of the right size from every chain; a failed check makes the row not ok
and the script exit 1.

Beside the times it prints what a GPU's time depends on and the CPU can count exactly
(``torch.profiler``): the operators the device part dispatches for one batch at batch 4 and at the
benchmark's batch (equal: nothing per sample) and its host reads (``aten::_local_scalar_dense``,
``nonzero``/``unique``: 0). ``--train`` adds the end-to-end row: ``Trainer.fit`` on this device with the
CPU chain in a DataLoader worker vs ``transforms.accelerator: true``, images/s in the steady state
(from the end of an early step to the end of the last, data loading included). Run:
``python benchmarks/bench_augment.py [--quick] [--device cuda] [--train [--trace DIR]]``. Target on CUDA: accelerator ≥ 5× cpu.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import median, report, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the accelerator path against the CPU chain (tests/transforms/test_accelerated.py checks it too):
#: labels may differ on this fraction of the lesion pixels, images by this mean absolute value (crops
#: drawn with other seeds differ on ~100 % of the lesion pixels and by ~0.27)
LABEL_TOLERANCE, IMAGE_TOLERANCE = 0.1, 0.02
#: the device weight map against the CPU's (which drops terms below ``BORDER_TOLERANCE`` = 1e-7)
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 2e-7


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


#: operators that read a device value back to the host, or whose output size depends on the data
#: (each one a synchronisation on CUDA)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique", "aten::_unique",
              "aten::masked_select")


def op_counts(fn: Any, *args: Any) -> tuple[int, int]:
    """Operators ``fn(*args)`` dispatches (``torch.profiler``, nested included) and how many are host reads."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    names = [e.name for e in prof.events()]
    return len(names), sum(any(n.startswith(h) for h in HOST_READS) for n in names)


def main(quick: bool = False, device: str = "cpu", root: Path | None = None,
         train: bool = False, trace: Path | None = None) -> list[dict[str, Any]]:
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
        train_rows = [train_row(Path(cfg.data.root), Path(tmp), quick, device, trace)] if train else []
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

    def cut(n: int) -> dict[str, Any]:
        parts = []
        for i in range(n):
            acc_t.set_random_state(seed=i)
            parts.append(acc_t(dict(picks[i % len(picks)])))
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in collate(parts).items()}

    ops_4, reads_4 = op_counts(device_aug, cut(4))
    ops_b, reads_b = op_counts(device_aug, cut(batch))
    counts_ok = ops_4 == ops_b and reads_4 == reads_b == 0
    counts = (f"operators per batch: {ops_4} at batch 4, {ops_b} at batch {batch}; host reads {reads_b} "
              f"(torch.profiler)")
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

    def run_wm_cpu() -> list[np.ndarray]:
        inst, lab = inst_d.cpu().numpy(), lab_d.cpu().numpy()
        return [wm({"instance": inst[i][None], "label": lab[i][None]})["weight"][0] for i in range(batch)]

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
    # the agreements each row claims, computed here on the benchmark's own samples
    label_diff, image_diff = chains_agree(picks, crop, dev)
    same_chain = label_diff <= LABEL_TOLERANCE and image_diff < IMAGE_TOLERANCE
    monai_out = [monai_t({k: s[k] for k in keys}) for s in picks]
    monai_ok = all(_finite_crop(o, crop) for o in monai_out)
    device_ok = all(_finite_crop({k: out[k][i] for k in ("image", "weight")}, crop) for i in range(batch))
    wm_device = border_weight_map_torch(inst_d, lab_d, 10.0, 5.0, True).cpu().numpy()
    wm_cpu = np.stack(run_wm_cpu())
    wm_diff = float(np.abs(wm_device - wm_cpu).max())
    wm_ok = bool(np.allclose(wm_device, wm_cpu, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL))
    return [
        report(f"{name}: accelerator vs cpu (elasticdeform)", rate["acc"], rate["cpu"], "samples/s",
               f"flips off, same seeds: labels differ on {100 * label_diff:.2f} % of lesion pixels (≤ "
               f"{100 * LABEL_TOLERANCE:.0f} %), image mean |Δ| {image_diff:.3f} (< {IMAGE_TOLERANCE}: bilinear vs "
               f"cubic B-spline); weight map on the device {1000 * t_wm / batch:.2f} ms/sample = {share:.0f} % of "
               f"the accelerator path", ok=same_chain),
        report(f"{name}: accelerator vs MONAI Rand2DElasticd chain", rate["acc"], rate["monai"], "samples/s",
               f"speed only (MONAI's elastic is another field); MONAI's crops finite, {crop}²: {monai_ok}",
               ok=monai_ok),
        report(f"{name}: device part alone vs cpu chain", rate["acc_device"], rate["cpu"], "samples/s",
               f"warp + flips + intensity + weight map; device crops finite, {crop}²: {device_ok}; {counts}",
               ok=device_ok and counts_ok),
        report(f"border weight map of the warped batch: device vs CPU (scipy EDTs, one sample at a time, {device})",
               batch / median(wm_t["device"]), batch / median(wm_t["cpu"]), "samples/s",
               f"max |Δ| {wm_diff:.1e} (allowed: rtol {WEIGHT_RTOL:g}, atol {WEIGHT_ATOL:g})", ok=wm_ok),
        *train_rows,
    ]


def train_row(data: Path, tmp: Path, quick: bool, device: str, trace: Path | None = None) -> dict[str, Any]:
    """``Trainer.fit`` end to end, the CPU chain (one DataLoader worker) vs ``transforms.accelerator``:
    images/s in the steady state (the time from the end of step ``skip`` to the end of the last step,
    data loading and the device augmentation included); the same pipeline, model, crops and seeds.
    ``trace``: a folder for a ``torch.profiler`` trace (CPU and, on CUDA, device activity) of three
    steps of each side, for ``chrome://tracing`` / Perfetto."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from medseg.config import load_config
    from medseg.training.trainer import Trainer

    batch, steps, skip = (4, 12, 3) if quick else (8, 160, 10)

    class Timed(Trainer):
        """The Trainer, with the time each step ends."""

        ends: list[float] = []
        prof: Any = None

        def _train_step(self, b: dict[str, Any]) -> float:  # noqa: D102
            loss = super()._train_step(b)
            self.ends.append(time.perf_counter())
            if self.prof is not None:
                self.prof.step()
            return loss

    ov = [f"data.root={data}", "data.generate_if_missing=false", "data.spacing_mm=null", "tracking.enabled=false",
          f"train.device={device}", "train.amp=off", "train.epochs=1000", "train.time_limit_min=null",
          f"train.batch_size={batch}", "train.num_workers=1", "train.val_every=1000", "train.evaluate_splits=[]",
          f"train.max_steps={steps}", "calibration.after_training=false", "model.params.base_channels=8",
          "train.propagate.enabled=false"]  # the augmentation paths only: no propagation rounds inside the timing
    rates: dict[bool, list[float]] = {False: [], True: []}
    order = [False, True] if quick or trace is not None else [False, True, True, False]  # drift cancels
    for n, acc in enumerate(order):
        cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", [
            *ov, f"output_dir={tmp / f'runs_{n}'}", f"transforms.accelerator={str(acc).lower()}"])
        trainer = Timed(cfg)
        trainer.ends = []
        if trace is None:
            trainer.fit()
        else:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with profile(activities=acts, schedule=schedule(wait=skip, warmup=1, active=3, repeat=1),
                         on_trace_ready=tensorboard_trace_handler(str(trace), f"{'accelerator' if acc else 'cpu'}")
                         ) as trainer.prof:
                trainer.fit()
        rates[acc].append((len(trainer.ends) - skip) * batch / (trainer.ends[-1] - trainer.ends[skip - 1]))
    each = "; ".join(f"{name} {', '.join(f'{r:.1f}' for r in rates[k])}" for name, k in (("cpu", False),
                                                                                          ("accelerator", True)))
    profiled = "; profiled: the profiler slows these steps" if trace is not None else ""
    return report(f"Trainer.fit end to end, quick-start U-Net (8 base channels), 96² crops, batch {batch}, one "
                  f"DataLoader worker ({device}): accelerator vs cpu chain", median(rates[True]), median(rates[False]),
                  "samples/s", f"steps {skip + 1}–{steps}, median of {len(rates[True])} run(s) per side ({each})"
                  f"{profiled}; speed only — the chains' agreement is the first row's", ok=True)


def _finite_crop(sample: dict[str, Any], crop: int) -> bool:
    """``image`` and ``weight`` of one sample: ``crop × crop`` and finite."""
    for key in ("image", "weight"):
        v = torch.as_tensor(np.asarray(sample[key]))
        if tuple(v.shape[-2:]) != (crop, crop) or not bool(torch.isfinite(v).all()):
            return False
    return True


def chains_agree(picks: list[dict[str, Any]], crop: int, dev: torch.device) -> tuple[float, float]:
    """The CPU chain and the accelerator path (flips off, sample ``i`` seeded with ``i`` on both sides):
    the fraction of lesion pixels (of either side) whose label differs, and the images' mean absolute
    difference.

    Same seed → same crop window and elastic field; the CPU interpolates images with a cubic B-spline,
    the device bilinearly, so labels agree up to a few boundary pixels and images nearly.
    """
    from medseg.config import load_config
    from medseg.data.base import collate
    from medseg.transforms import build_transforms
    from medseg.transforms.accelerated import DeviceAugment

    ov = [f"transforms.crop_size=[{crop},{crop}]", "transforms.flip_prob=0"]
    cpu_t = build_transforms(load_config(None, ov).transforms, train=True)
    acc_cfg = load_config(None, [*ov, "transforms.accelerator=true"]).transforms
    acc_t = build_transforms(acc_cfg, train=True)
    ref, cut = [], []
    for i, s in enumerate(picks):
        cpu_t.set_random_state(seed=i)
        ref.append(cpu_t(dict(s)))
        acc_t.set_random_state(seed=i)
        cut.append(acc_t(dict(s)))
    b = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in collate(cut).items()}
    out = DeviceAugment(acc_cfg)(b)
    labels = np.stack([np.asarray(r["label"]) for r in ref])
    images = np.stack([np.asarray(r["image"]) for r in ref])
    got = out["label"].cpu().numpy()
    lesion = (got > 0) | (labels > 0)  # a crop is mostly background: count against the lesion pixels
    label_diff = float((got != labels)[lesion].sum() / max(int(lesion.sum()), 1))
    image_diff = float(np.abs(out["image"].cpu().numpy() - images).mean())
    return label_diff, image_diff


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", action="store_true", help="add the Trainer end-to-end row (both paths)")
    p.add_argument("--trace", type=Path, default=None,
                   help="with --train: write a torch.profiler trace of three steps of each path to this folder")
    a = p.parse_args()
    sys.exit(0 if all(r["ok"] for r in main(a.quick, a.device, train=a.train, trace=a.trace)) else 1)
