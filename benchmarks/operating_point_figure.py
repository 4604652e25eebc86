"""A montage of one series at two operating points: a threshold alone vs the model's hysteresis point.

Each column is a slice of one volume-protocol block (every slice of a generated DeepLesion-format series,
the way ``medseg predict`` runs); the top row is the class map at ``--threshold`` alone, the bottom row at
the model's calibrated operating point (``inference.threshold`` + ``inference.low_threshold``); true
lesions are outlined in green, predicted lesion pixels filled red, false-positive components (touching no
true lesion) filled orange. Both rows come from one forward pass (:func:`medseg.evaluation.volume.class_maps`
at each point). Without ``--block`` the test block whose threshold-only map has the most false-positive
components is shown.

Usage:
    python benchmarks/operating_point_figure.py --model outputs/quickstart/unet-... --out docs/images/hysteresis.png
    python benchmarks/operating_point_figure.py --model RUN --threshold 0.15 --block 000066_03_01_017-026
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.config import load_config  # noqa: E402
from medseg.data.deeplesion import DeepLesionDataset  # noqa: E402
from medseg.data.deeplesion.volume import volume_blocks  # noqa: E402
from medseg.data.windowing import model_window_rule  # noqa: E402
from medseg.evaluation.volume import class_maps, predict_volume  # noqa: E402
from medseg.inference.postprocess import resolve_operating_point  # noqa: E402
from medseg.metrics.volume import label_components_3d, match_3d  # noqa: E402
from medseg.models.checkpoint import load_model  # noqa: E402


def _false_positives(pred: np.ndarray, truth: np.ndarray, cfg) -> tuple[np.ndarray, int]:  # type: ignore[no-untyped-def]
    """Mask of the predicted 3-D components matched to no true lesion (the volume protocol's matching), and
    their count."""
    comps = label_components_3d(pred > 0, cfg.predict.connectivity)
    m = match_3d(comps, truth.astype(np.int32), cfg.metrics.match_rule, cfg.metrics.iou_threshold,
                 cfg.metrics.min_overlap_px)
    return np.isin(comps, m.false_positive_ids), len(m.false_positive_ids)


def _panel(hu: np.ndarray, pred: np.ndarray, fp: np.ndarray, truth: np.ndarray) -> np.ndarray:
    gray = (np.clip((hu + 175.0) / 450.0, 0, 1) * 255).astype(np.uint8)  # soft-tissue window for display
    rgb = np.dstack([gray] * 3).astype(np.float32)
    for mask, colour in ((pred & ~fp, (40, 40, 230)), (fp, (0, 150, 255))):  # BGR: red, orange
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(colour, np.float32)
    out = rgb.astype(np.uint8)
    contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 220, 0), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a medseg train run folder or checkpoint, calibrated with hysteresis")
    ap.add_argument("--config", default=str(ROOT / "pipelines" / "quickstart.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threshold", type=float, default=0.5, help="the threshold-only point of the top row")
    ap.add_argument("--block", default=None, help="a block name (series_first-last); default: the most FP")
    ap.add_argument("--max-slices", type=int, default=5)
    ap.add_argument("--out", default="hysteresis.png")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    model, info = load_model(args.model)
    cfg = load_config(args.config, args.overrides)
    cfg.data, _ = model_window_rule(cfg.data, info.get("config"))
    hyst = resolve_operating_point(cfg, info.get("config"))
    if not hyst.inference.low_threshold:
        raise SystemExit(f"{args.model}: no hysteresis in its operating point (calibrate with calibration.low_thresholds)")
    plain = copy.deepcopy(hyst)
    plain.inference.threshold, plain.inference.low_threshold = [args.threshold], []
    plain.inference.min_object_mm2 = 0.0
    ds = DeepLesionDataset(cfg.data, args.split)
    blocks = volume_blocks(ds)
    if args.block:
        blocks = [b for b in blocks if b.name == args.block] or sys.exit(f"no block {args.block} in {args.split}")
    best = None
    for b in blocks:
        vol = predict_volume(model, ds, b, hyst, torch.device("cpu"))
        p_plain, _ = class_maps(vol, plain)
        n_fp = _false_positives(p_plain, vol.truth, hyst)[1]
        if best is None or n_fp > best[0]:
            best = (n_fp, vol, p_plain)
    assert best is not None
    _, vol, p_plain = best
    p_hyst, _ = class_maps(vol, hyst)
    b = vol.block
    ns = list(range(b.first, b.last + 1))
    keep = np.linspace(0, len(ns) - 1, min(args.max_slices, len(ns))).round().astype(int)
    body = ds.images.read(b.series, b.keys[0]) > -500  # crop every panel to the body of the key slice
    ys, xs = np.nonzero(body)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rows, labels = [], []
    for pred, name, point in ((p_plain, "threshold alone", f"{args.threshold:g}"),
                              (p_hyst, "hysteresis", f"{hyst.inference.threshold[0]:g} / low {hyst.inference.low_threshold[0]:g}")):
        fp, n_fp = _false_positives(pred, vol.truth, hyst)
        tiles = [_panel(ds.images.read(b.series, ns[i]), pred[i] > 0, fp[i], vol.truth[i])[y0:y1, x0:x1] for i in keep]
        rows.append(np.concatenate(tiles, axis=1))
        labels.append(f"{name} ({point}): {n_fp} false-positive components")
    scale = 0.65
    rows = [cv2.resize(r, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for r in rows]
    bars = []
    for r, text in zip(rows, labels):
        bar = np.full((28, r.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        bars += [bar, r]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, np.concatenate(bars, axis=0), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{args.out}: block {b.name}, slices {[ns[i] for i in keep]} (key {list(b.keys)}); "
          f"{labels[0]}; {labels[1]}; {dt.date.today()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
