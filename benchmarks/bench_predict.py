"""``medseg predict`` benchmarks (outside CI): the sliding window against MONAI, and DICOM batch throughput.

1. **Sliding window** — the quick-start U-Net (``unet``, 3 → 2 channels, 16 base channels, depth 4,
   random weights from a fixed seed) over a ``size²`` three-channel image, 256² tiles, Gaussian
   blending, ``--tile-batch`` tiles per forward pass, float32:

   * ``medseg``: :func:`medseg.inference.sliding_window` with ``output="labels"`` (the class map,
     accumulated one band of tile rows at a time; probabilities off, as MONAI's argmax gives none);
   * ``monai``: MONAI's ``sliding_window_inference`` (whole-image output and count maps), then argmax;
   * ``floor``: the same tiles through the model with no stitching at all (the compute floor).

   Reported: time (the fastest of interleaved repeats in one process), peak memory (CPU: the child process' peak resident set above its state before
   the call, ``VmHWM``; CUDA: ``torch.cuda.max_memory_allocated`` above the input), and time / floor.
   The class maps of medseg and MONAI are compared pixel for pixel.

2. **DICOM throughput** — ``--series`` CT series of ``--slices`` 512² slices (uncompressed, generated
   HU noise with a few disks) through ``run_predict`` with the quick-start pipeline's pre-processing
   (DICOM window, 3 context slices, 1.2 mm resampling), against the model's forward pass alone on the
   same pre-processed slices; once with reading overlapped (``predict.prefetch = 2``) and once
   without (``prefetch = 0``).

3. **End to end** — the ``medseg predict`` command (``python -m medseg predict``, its own process)
   on one ``--e2e-size``² PNG (a 512² generated cell image, :func:`medseg.data.synthetic.cells.render_cells`,
   tiled) against MONAI in its own process: read the PNG,
   ``sliding_window_inference`` + argmax, write the mask PNG. The same checkpoint (a 1-channel
   U-Net, 16 base channels, depth 4, random weights from a fixed seed, its last bias set so that ~70 % of
   the image is foreground in many components), 256² tiles, overlap 0.25,
   Gaussian blending, 4 tiles per forward pass, no TTA, every core on both. medseg predict also writes
   what it always writes (lesion table, overlay, ``series.json``, manifest). Reported: wall time of
   each process (start to exit, imports included), its peak resident set (``ru_maxrss`` of that child
   from ``os.wait4``), the ratios (done-when: RSS ≤ 0.5 × MONAI, time ≤ 1.1 ×) and the agreement of
   the two masks.

Run: ``python benchmarks/bench_predict.py [--device cuda] [--sizes 1024,4096,8192] [--quick]
[--e2e-size 2048] [--skip-e2e]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.inference.window import sliding_window, tile_starts  # noqa: E402
from medseg.models import build_model  # noqa: E402

MODEL = ("unet", 3, 2, {"base_channels": 16, "depth": 4})
TILE = 256
#: (size, overlap) pairs of the issue
CASES = [(1024, 0.25), (1024, 0.5), (4096, 0.25), (4096, 0.5), (8192, 0.25)]


#: "unet" = the quick-start U-Net; "pointwise" = a 1×1 convolution (stitching cost and memory alone)
MODEL_KIND = {"kind": "unet"}


def make_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if MODEL_KIND["kind"] == "pointwise":
        return torch.nn.Conv2d(3, 2, 1).eval().to(device)
    return build_model(*MODEL).eval().to(device)


def make_image(size: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, size, size, generator=g).to(device)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def call_variant(variant: str, model: torch.nn.Module, image: torch.Tensor, overlap: float, tile_batch: int
                 ) -> np.ndarray | None:
    """Run one variant once; the class map (None for the floor)."""
    from monai.inferers import sliding_window_inference

    size = image.shape[-1]
    labels = None
    if variant == "medseg":
        lab, _prob = sliding_window(image, model, (TILE, TILE), overlap, "gaussian", tile_batch, output="labels")
        labels = lab[0].numpy()
    elif variant == "monai":
        out = sliding_window_inference(image, (TILE, TILE), tile_batch, model, overlap=overlap, mode="gaussian")
        labels = out.max(1).indices[0].to(torch.uint8).cpu().numpy()  # (argmax over dim 1 is slow on the CPU)
        del out
    else:  # floor: the same tiles, batched the same way, no stitching
        step = int(TILE * (1 - overlap))
        ys, xs = tile_starts(size, TILE, step), tile_starts(size, TILE, step)
        tiles = [(y, x) for y in ys for x in xs]
        for i in range(0, len(tiles), tile_batch):
            batch = torch.stack([image[0, :, y: y + TILE, x: x + TILE] for y, x in tiles[i: i + tile_batch]])
            model(batch)
    return labels


@torch.no_grad()
def run_variant(variant: str, size: int, overlap: float, device: str, tile_batch: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """One variant in a fresh process: seconds and peak MiB above the state before the call, the labels."""
    model = make_model(device)
    sliding_window(make_image(256, device), model, (TILE, TILE), overlap, batch_size=tile_batch)  # warm-up
    image = make_image(size, device)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    labels = call_variant(variant, model, image, overlap, tile_batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _kib("VmHWM") * 1024 - base
    return {"variant": variant, "size": size, "overlap": overlap, "seconds": seconds, "peak_mib": peak / 2**20}, labels


def sliding_benchmark(cases: list[tuple[int, float]], device: str, tile_batch: int, repeats: int = 3
                      ) -> list[dict[str, Any]]:
    """Peak memory: each variant once in a fresh child process. Time: the fastest of the child's run and
    ``repeats`` interleaved runs in this process (at most one at sizes above 2048)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, overlap in cases:
            res: dict[str, dict[str, Any]] = {}
            labels: dict[str, np.ndarray] = {}
            for variant in ("floor", "medseg", "monai"):
                out = Path(tmp) / f"{variant}.npy"
                cmd = [sys.executable, __file__, "--child", variant, "--size", str(size), "--overlap", str(overlap),
                       "--device", device, "--tile-batch", str(tile_batch), "--out", str(out),
                       "--model", MODEL_KIND["kind"]]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
                if out.is_file():
                    labels[variant] = np.load(out)
            same = float((labels["medseg"] == labels["monai"]).mean())
            # time: interleaved repeats in this process, the fastest of each (robust to other load)
            n_repeats = repeats if size <= 2048 else min(repeats, 1)  # --repeats 0: the child's run only
            if n_repeats:
                model, image = make_model(device), make_image(size, device)
                call_variant("floor", model, image[..., :512, :512], overlap, tile_batch)  # warm-up
                for _ in range(n_repeats):
                    for variant in ("floor", "medseg", "monai"):
                        _sync(device)
                        t0 = time.perf_counter()
                        call_variant(variant, model, image, overlap, tile_batch)
                        _sync(device)
                        res[variant]["seconds"] = min(res[variant]["seconds"], time.perf_counter() - t0)
                del model, image
            m, r, f = res["medseg"], res["monai"], res["floor"]
            rows.append({"size": size, "overlap": overlap, "medseg_s": m["seconds"], "monai_s": r["seconds"],
                         "floor_s": f["seconds"], "medseg_mib": m["peak_mib"], "monai_mib": r["peak_mib"],
                         "medseg_vs_floor": m["seconds"] / f["seconds"], "monai_vs_floor": r["seconds"] / f["seconds"],
                         "time_vs_monai": m["seconds"] / r["seconds"], "memory_vs_monai": m["peak_mib"] / r["peak_mib"],
                         "labels_equal": same})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- DICOM throughput


def write_series(root: Path, n_series: int, n_slices: int, size: int = 512) -> None:
    """Uncompressed CT series: body-like ellipse with noise and a few bright disks (a fixed seed)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.38 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 < 1
    for s in range(n_series):
        series_uid, study_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
        for k in range(n_slices):
            hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (size, size))
            for _ in range(3):
                cy, cx, r = rng.integers(150, size - 150, 2).tolist() + [int(rng.integers(8, 30))]
                hu[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 120.0
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
            ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Mark", "B1"
            ds.ImagePositionPatient = [-200.0, -200.0, 2.5 * k]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 2.5
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.WindowCenter, ds.WindowWidth = 50, 400
            ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
            folder = root / f"s{s:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def quick_start_checkpoint(path: Path, overrides: list[str]) -> Path:
    """A checkpoint at ``path``: the benchmark U-Net (random weights, seed 0) with the quick start's config
    (plus ``overrides``) and that config's input channels (its window rule × context slices)."""
    from medseg.config import load_config, to_dict
    from medseg.data.windowing import input_channels

    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", overrides)
    channels = input_channels(cfg.data)
    torch.manual_seed(0)
    model = build_model(MODEL[0], channels, MODEL[2], MODEL[3]).eval()
    torch.save({"version": 1, "model": model.state_dict(), "config": to_dict(cfg), "in_channels": channels,
                "num_classes": 2}, path)
    return path


def dicom_benchmark(device: str, n_series: int, n_slices: int, repeats: int = 2) -> dict[str, Any]:
    """Slices/s end to end (with and without overlapped reading) vs the model forward pass alone."""
    from medseg.inference.predictor import Predictor
    from medseg.predict import run_predict
    from medseg.predict.readers import discover, load_case

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        write_series(tmp_p / "in", n_series, n_slices)
        ckpt = quick_start_checkpoint(tmp_p / "model.pt", ["train.threads=1", f"train.device={device}", "train.amp=off",
                                                          "tracking.enabled=false"])
        out: dict[str, Any] = {"series": n_series, "slices": n_series * n_slices, "device": device}
        run_predict(ckpt, tmp_p / "in", tmp_p / "warm-up", device=device, progress=False)  # caches, kernels
        predictor = Predictor.from_ref(ckpt, device=device)
        cases, _ = discover(tmp_p / "in", predictor.cfg)
        t_read = time.perf_counter()
        images = [torch.from_numpy(load_case(c, predictor.cfg).images) for c in cases]
        out["read_preprocess_s"] = time.perf_counter() - t_read
        bs = predictor.cfg.predict.batch_size
        times: dict[str, list[float]] = {"forward_s": [], "end_to_end_s_prefetch0": [], "end_to_end_s_prefetch2": []}
        for rep in range(repeats):  # interleaved; the fastest of each (robust to other load on the machine)
            _sync(device)
            t0 = time.perf_counter()
            for im in images:
                for i in range(0, len(im), bs):
                    predictor.logits(im[i: i + bs])
            _sync(device)
            times["forward_s"].append(time.perf_counter() - t0)
            for prefetch in (0, 2):
                t0 = time.perf_counter()
                res = run_predict(ckpt, tmp_p / "in", tmp_p / f"out{prefetch}-{rep}", [f"predict.prefetch={prefetch}"],
                                  device=device, progress=False)
                times[f"end_to_end_s_prefetch{prefetch}"].append(time.perf_counter() - t0)
                assert not res.failed, res.failed
        out.update({k: min(v) for k, v in times.items()})
    n = out["slices"]
    for key in ("end_to_end_s_prefetch2", "end_to_end_s_prefetch0", "forward_s"):
        out[key.replace("_s", "_slices_per_s", 1)] = n / out[key]
    out["ratio_prefetch2"] = out["forward_s"] / out["end_to_end_s_prefetch2"]
    out["ratio_prefetch0"] = out["forward_s"] / out["end_to_end_s_prefetch0"]
    print(json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- end to end

E2E_OVERRIDES = ["inference.mode=sliding", "inference.tile_size=[256,256]", "inference.overlap=0.25",
                 "inference.blend=gaussian", "inference.batch_size=4", "inference.tta_flips=false",
                 "inference.tta_scales=[1.0]", "inference.threshold=[]", "inference.min_object_mm2=0",
                 "model.name=unet", "train.device=cpu", "tracking.enabled=false"]


def write_e2e_inputs(root: Path, size: int) -> tuple[Path, Path]:
    """``root/in/cells.png`` (a 512² cell image tiled to ``size²``) and ``root/model.pt``."""
    import cv2

    from medseg.config import load_config, to_dict
    from medseg.data.synthetic.cells import render_cells

    tile, _ = render_cells(np.random.default_rng(0), 512)
    reps = -(-size // 512)
    (root / "in").mkdir(parents=True)
    cv2.imwrite(str(root / "in" / "cells.png"), np.tile(tile, (reps, reps))[:size, :size])
    cfg = load_config(ROOT / "pipelines" / "cells.yaml", E2E_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 1, 2, cfg.model.params).eval()
    # random weights predict one class everywhere; shift the last layer's class-1 bias so that ~70 % of
    # the cell image is foreground, in many components (a lesion table of thousands of rows, as cells give)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 2][-1]
    with torch.no_grad():
        logits = model(torch.from_numpy(tile)[None, None].float() / 255.0)
        last.bias[1] -= torch.quantile((logits[0, 1] - logits[0, 0]).flatten()[::7], 0.3)
    ckpt = root / "model.pt"
    torch.save({"version": 1, "model": model.state_dict(), "config": to_dict(cfg), "in_channels": 1,
                "num_classes": 2}, ckpt)
    return root / "in" / "cells.png", ckpt


def e2e_monai(image: Path, ckpt: Path, out: Path, tile_batch: int = 4) -> None:
    """The MONAI process: read the PNG, sliding window + argmax, write the mask PNG."""
    import os

    import cv2
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    ck = torch.load(ckpt, weights_only=True)
    model = build_model(ck["config"]["model"]["name"], ck["in_channels"], ck["num_classes"],
                        ck["config"]["model"]["params"]).eval()
    model.load_state_dict(ck["model"])
    img = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    x = torch.from_numpy(img)[None, None].float().div_(255.0)
    del img
    with torch.inference_mode():
        logits = sliding_window_inference(x, (TILE, TILE), tile_batch, model, overlap=0.25, mode="gaussian")
        labels = logits.max(1).indices[0].to(torch.uint8).numpy()  # (argmax over dim 1 is slow on the CPU)
    del logits
    if not cv2.imwrite(str(out), labels):
        raise RuntimeError(f"cannot write {out}")


def _measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` as a child: its wall seconds and peak resident set (MiB, ``ru_maxrss`` of that child)."""
    import os

    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def e2e_benchmark(size: int, repeats: int = 1) -> dict[str, Any]:
    """``medseg predict`` vs MONAI + PNG write, each in its own process (see the module doc)."""
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        image, ckpt = write_e2e_inputs(t, size)
        best: dict[str, list[float]] = {"medseg": [], "monai": []}
        for rep in range(max(repeats, 1)):  # interleaved; the fastest time, the largest peak of each
            out = t / f"medseg-{rep}"
            best["medseg"].append(_measured([sys.executable, "-m", "medseg", "predict", "--model", str(ckpt),
                                             str(image.parent), str(out), "--no-progress"], t / "medseg.log"))
            best["monai"].append(_measured([sys.executable, __file__, "--e2e-child", str(image), "--e2e-ckpt",
                                            str(ckpt), "--out", str(t / f"monai-{rep}.png")], t / "monai.log"))
        (mask,) = list((t / "medseg-0").rglob("cells.png"))
        ours = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        ref = cv2.imread(str(t / "monai-0.png"), cv2.IMREAD_UNCHANGED)
        (table,) = list((t / "medseg-0").rglob("lesions.csv"))
        lesions = len(table.read_text().splitlines()) - 1
    m_s, m_mib = min(s for s, _ in best["medseg"]), max(m for _, m in best["medseg"])
    r_s, r_mib = min(s for s, _ in best["monai"]), max(m for _, m in best["monai"])
    row = {"size": size, "medseg_s": m_s, "monai_s": r_s, "time_vs_monai": m_s / r_s,
           "medseg_peak_rss_mib": m_mib, "monai_peak_rss_mib": r_mib, "rss_vs_monai": m_mib / r_mib,
           "labels_equal": float((ours == ref).mean()), "foreground": float((ours > 0).mean()), "lesions": lesions,
           "targets_met": {"rss<=0.5x": m_mib <= 0.5 * r_mib, "time<=1.1x": m_s <= 1.1 * r_s}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1024,4096,8192", help="image sizes of the sliding-window cases to run")
    ap.add_argument("--tile-batch", type=int, default=4)
    ap.add_argument("--series", type=int, default=3)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--skip-dicom", action="store_true")
    ap.add_argument("--skip-sliding", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one 512² case and one small series")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=["unet", "pointwise"], default="unet",
                    help="sliding window: the quick-start U-Net, or a 1×1 convolution to see stitching alone")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timing repeats (sizes up to 2048; one above, none with 0)")
    ap.add_argument("--e2e-size", type=int, default=2048, help="end to end: the PNG's size (default 2048)")
    ap.add_argument("--e2e-repeats", type=int, default=1, help="end to end: interleaved runs of each process")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-child", help=argparse.SUPPRESS)
    ap.add_argument("--e2e-ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--overlap", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.e2e_child:
        e2e_monai(Path(args.e2e_child), Path(args.e2e_ckpt), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    MODEL_KIND["kind"] = args.model
    if args.child:
        row, labels = run_variant(args.child, args.size, args.overlap, args.device, args.tile_batch)
        if labels is not None:
            np.save(args.out, labels)
        row["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row))
        return
    sizes = {int(s) for s in args.sizes.split(",")}
    cases = [(512, 0.25)] if args.quick else [c for c in CASES if c[0] in sizes] + [
        (s, 0.25) for s in sorted(sizes) if s not in {c[0] for c in CASES}]
    results: dict[str, Any] = {"device": args.device, "threads": args.threads, "tile_batch": args.tile_batch,
                               "model": args.model}
    if not args.skip_sliding:
        results["sliding"] = sliding_benchmark(cases, args.device, args.tile_batch, args.repeats)
    if not args.skip_dicom:
        results["dicom"] = dicom_benchmark(args.device, 1 if args.quick else args.series, 4 if args.quick else args.slices)
    if not args.skip_e2e:
        results["e2e"] = e2e_benchmark(512 if args.quick else args.e2e_size, args.e2e_repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
