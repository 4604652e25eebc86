"""The volume protocol end to end: ``evaluate`` on every slice of the generated series, and ``medseg predict``
on the same series exported as CT DICOM (header window set) giving the same class maps and figures.

The model is a tiny fixed network that uses every context channel (the mean of the windowed 2.5-D stack
through a sigmoid), so a different context, window or operating point between the two paths changes its
class maps. On a copy of the generated release whose lesion voxels carry a sentinel HU (everything else
clipped below it, as in ``tests/predict/builders.py``) and whose rows carry windows that tell them apart,
it finds the lesions where its context holds them and misses their ends: figures between 0 and 1.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from torch import nn

from medseg.config import Config, to_dict
from medseg.data.deeplesion import HU_OFFSET, DeepLesionDataset
from medseg.data.deeplesion.volume import volume_blocks
from medseg.data.windowing import input_channels
from medseg.evaluation.evaluate import evaluate, format_report
from medseg.metrics.volume import VolumeMetrics
from medseg.predict import run_predict
from medseg.registry import MODELS
from tests.predict.builders import MAX_OTHER_HU, SENTINEL_HU, write_series

SPLIT = "all"  # every block of the 8 generated patients
#: the stack's mean (windowed, [0, 1]) above which a pixel is lesion, per window rule
LEVEL = {"fixed": 0.8, "dicom": 0.65,
         # three windows × 3 slices: the soft-tissue and lung windows saturate for both the sentinel (2500 HU)
         # and the brightest other pixels (2000 HU), the wide one tells them apart: 0.954 vs ≤ 0.911
         "multi": 0.93}


class ContextMean(nn.Module):
    """Lesion logit ``20 · (mean over the context channels − level)``; background 0."""

    def __init__(self, in_channels: int, num_classes: int, level: float = 0.5, slope: float = 20.0) -> None:
        super().__init__()
        self.register_buffer("level", torch.tensor(float(level)))
        self.slope = slope
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:], dtype=x.dtype)
        out[:, 1] = self.slope * (x.mean(1) - self.level)
        return out


@pytest.fixture(scope="module")
def context_mean():
    MODELS.register("test_context_mean")(ContextMean)
    yield
    MODELS._entries.pop("test_context_mean", None)


@pytest.fixture(scope="module")
def sentinel_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo release: lesion voxels at the sentinel HU, the rest clipped below 2000 HU; each row's
    DICOM window ``[800 + 50·(i mod 5), 3071]`` (lesions ≈ 0.75 inside it, everything else ≤ 0.53)."""
    root = tmp_path_factory.mktemp("sentinel") / "dl"
    shutil.copytree(demo_root / "Masks_png", root / "Masks_png")
    for src in sorted((demo_root / "Images_png").glob("*/*.png")):
        hu = cv2.imread(str(src), cv2.IMREAD_UNCHANGED).astype(np.int32) - HU_OFFSET
        mask = root / "Masks_png" / src.parent.name / src.name
        hu = np.minimum(hu, MAX_OTHER_HU)
        if mask.is_file():
            hu[cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) > 0] = SENTINEL_HU
        dest = root / "Images_png" / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dest), (hu + HU_OFFSET).astype(np.uint16))
    rows = list(csv.reader(io.StringIO((demo_root / "DL_info.csv").read_text())))
    col = rows[0].index("DICOM_windows")
    for i, r in enumerate(rows[1:]):
        r[col] = f"{800 + 50 * (i % 5)}, 3071"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (root / "DL_info.csv").write_text(buf.getvalue())
    return root


def _config(root: Path, out: Path, window: str) -> Config:
    cfg = Config()
    cfg.model.name = "test_context_mean"
    cfg.model.params = {"level": LEVEL[window]}
    cfg.data.name, cfg.data.root, cfg.data.generate_if_missing = "deeplesion", str(root), False
    cfg.data.window, cfg.data.window_range = window, [-1024.0, 3071.0]
    cfg.data.context_slices, cfg.data.slice_offset_mm, cfg.data.spacing_mm = 3, 2.0, None
    cfg.inference.threshold, cfg.inference.min_object_mm2 = [0.6], 4.0  # an operating point both paths must apply
    cfg.inference.tta_flips = False
    cfg.train.threads, cfg.train.device, cfg.train.amp, cfg.train.num_workers = 1, "cpu", "off", 0
    cfg.tracking.enabled = False
    cfg.evaluation.plots, cfg.evaluation.protocol = False, "both"
    cfg.metrics.bootstrap_resamples = 50
    cfg.output_dir = str(out)
    return cfg


def _checkpoint(cfg: Config, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ContextMean(cfg.data.context_slices, 2, **cfg.model.params)
    torch.save({"version": 1, "model": model.state_dict(), "config": to_dict(cfg),
                "in_channels": input_channels(cfg.data), "num_classes": 2}, path)
    return path


def export_dicom(ds: DeepLesionDataset, out: Path) -> dict[str, dict]:
    """Each block of the split as one CT series: HU from the PNGs, positions ``n · Slice_interval``, the block's
    key-slice row's DICOM window in every header (WindowCenter / WindowWidth)."""
    rng = np.random.default_rng(0)
    blocks = {}
    for b in volume_blocks(ds):
        rec = ds.samples[b.sample].rows[0]
        ns = list(range(b.first, b.last + 1))
        hu = np.stack([ds.images.read(b.series, n) for n in ns]).astype(np.float32)
        assert hu.min() >= -1024 and hu.max() <= 3071  # the exported 12-bit range holds the slices exactly
        pos = np.array([[-100.0, -120.0, n * rec.slice_interval] for n in ns])
        lo, hi = rec.window
        uid = generate_uid()
        write_series(out / b.name, hu, pos, [1, 0, 0, 0, 1, 0], (rec.spacing[1], rec.spacing[0]), rng,
                     series_uid=uid, extra={"WindowCenter": (lo + hi) / 2, "WindowWidth": hi - lo})
        blocks[uid] = {"block": b, "slices": ns}
    return blocks


def _predicted(out: Path) -> dict[str, np.ndarray]:
    """SeriesInstanceUID → predict's class map ``(Z, H, W)`` in slice order (from mask.nii.gz)."""
    found = {}
    for js in out.glob("study-*/series-*/series.json"):
        uid = str(pydicom.dcmread(js.parent / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID)
        found[uid] = np.transpose(np.asanyarray(nib.load(str(js.parent / "mask.nii.gz")).dataobj), (2, 1, 0))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("window", ["fixed", "dicom", "multi", "fixed+hysteresis"])
def test_predict_on_a_dicom_export_equals_the_volume_protocol(sentinel_root: Path, tmp_path: Path, context_mean: None,
                                                              window: str) -> None:
    window, _, hysteresis = window.partition("+")
    cfg = _config(sentinel_root, tmp_path / "eval", window)
    if hysteresis:  # components down to 0.3 where they reach 0.6: 3-D across each series in both paths
        cfg.inference.low_threshold = [0.3]
    ckpt = _checkpoint(cfg, tmp_path / "model" / "best.pt")
    res = evaluate(cfg, ckpt, SPLIT, save_predictions=tmp_path / "pred")
    assert res["protocol"] == ["key", "volume"]
    m = res["metrics"]
    assert m["vol_slice_count_nonkey"] > m["vol_slice_count_key"] > 0 and m["vol_lesion_count"] > 0
    assert "volume protocol" in format_report(m)
    # the model finds most lesion voxels but not all (it misses where its context leaves the lesion)
    assert 0.3 < m["vol_lesion_dice"] < 0.99 and m["vol_slice_dice_nonkey"] < m["vol_slice_dice_key"]

    ds = DeepLesionDataset(cfg.data, SPLIT)
    blocks = export_dicom(ds, tmp_path / "dicom")
    result = run_predict(ckpt, tmp_path / "dicom", tmp_path / "out", progress=False)
    assert not result.failed and len(result.processed) == len(blocks)
    predicted = _predicted(tmp_path / "out")
    for js in (tmp_path / "out").glob("study-*/series-*/series.json"):  # each series says how it was cut
        assert json.loads(js.read_text())["model"]["operating_point"] == {
            "threshold": [0.6], "low_threshold": [0.3] if hysteresis else None, "min_object_mm2": 4.0}
    vm = VolumeMetrics.from_config(cfg.metrics, cfg.predict.connectivity)
    n_fg = 0
    for uid, info in blocks.items():
        b = info["block"]
        ours = np.stack([cv2.imread(str(tmp_path / "pred" / "volumes" / b.series / f"{n:03d}.png"), cv2.IMREAD_UNCHANGED)
                         for n in info["slices"]])
        theirs = predicted[uid]
        assert theirs.shape == ours.shape
        np.testing.assert_array_equal(theirs, ours, err_msg=b.name)  # the same class map, slice by slice
        n_fg += int(ours.sum())
        truth = np.stack([ds.read_truth(b.series, n, ours.shape[1:], empty_if_absent=True)[0] for n in info["slices"]])
        vm.update(theirs, truth, np.array([n in b.keys for n in info["slices"]]), b.name)
    assert n_fg > 0  # the model predicts something
    figures = vm.compute()
    for k in ("vol_lesion_dice", "vol_dice", "vol_slice_dice_key", "vol_slice_dice_nonkey", "vol_fp_per_volume",
              "vol_lesion_sensitivity"):
        assert figures[k] == pytest.approx(m[k], abs=0.01), k
    rows = json.loads(json.dumps(res["volume"]))
    assert Path(rows["lesions_csv"]).is_file() and rows["n_volumes"] == len(blocks)


@pytest.mark.slow
def test_calibrate_chooses_the_operating_point_on_volumes(sentinel_root: Path, tmp_path: Path,
                                                         context_mean: None, caplog: pytest.LogCaptureFixture) -> None:
    from medseg.evaluation.calibrate import calibrate

    cfg = _config(sentinel_root, tmp_path / "eval", "fixed")
    cfg.model.params = {"level": 0.75, "slope": 4.0}  # soft probabilities: the threshold matters
    cfg.inference.threshold, cfg.inference.min_object_mm2 = None, None
    cfg.calibration.metric, cfg.calibration.thresholds, cfg.calibration.min_object_mm2 = "lesion_dice", [0.4, 0.5, 0.6], [0.0, 8.0]
    cfg.calibration.low_thresholds = [0.3]
    cfg.evaluation.protocol = "auto"
    ckpt = _checkpoint(cfg, tmp_path / "model" / "best.pt")
    res = calibrate(cfg, ckpt, write=False)
    assert res["protocol"] == "volume" and res["metric"] == "vol_lesion_dice"
    values = [row["vol_lesion_dice"] for row in res["grid"]]
    assert res["score"] == max(values) and len(set(np.round(values, 6))) > 1  # the grid differs; the best is kept
    # hysteresis rows: the low threshold with each larger threshold, at every size
    assert [(r["threshold"], r["min_object_mm2"]) for r in res["grid"] if r["low_threshold"]] == [
        ([t], m) for t in (0.4, 0.5, 0.6) for m in (0.0, 8.0)]
    hyst = next(r for r in res["grid"] if r["low_threshold"] and r["threshold"] == [0.6] and r["min_object_mm2"] == 0.0)
    plain = {r["threshold"][0]: r for r in res["grid"] if not r["low_threshold"] and r["min_object_mm2"] == 0.0}
    # seeded at 0.6, grown down to 0.3: more of each lesion than cutting at 0.6, no more false positives than at 0.4
    assert hyst["vol_lesion_dice"] > plain[0.6]["vol_lesion_dice"]
    assert hyst["vol_fp_per_volume"] <= plain[0.4]["vol_fp_per_volume"]
    # a false-positive limit: the best point within it, never one above it; none within it: the fewest, said
    fps = [row["vol_fp_per_volume"] for row in res["grid"]]
    cfg.calibration.max_fp = min(fps)
    lim = calibrate(cfg, ckpt, write=False)
    allowed = [row for row in lim["grid"] if row["vol_fp_per_volume"] <= min(fps)]
    assert lim["score"] == max(row["vol_lesion_dice"] for row in allowed) and lim["fp_key"] == "vol_fp_per_volume"
    chosen = [row for row in lim["grid"] if (row["threshold"], row["min_object_mm2"]) == (lim["threshold"], lim["min_object_mm2"])]
    assert chosen and chosen[0]["vol_fp_per_volume"] <= min(fps)
    cfg.calibration.max_fp = -1.0
    with caplog.at_level(logging.WARNING, logger="medseg"):
        none = calibrate(cfg, ckpt, write=False)
    assert "no point of the grid has at most calibration.max_fp" in caplog.text
    assert [r["vol_fp_per_volume"] for r in none["grid"] if r["threshold"] == none["threshold"]
            and r["min_object_mm2"] == none["min_object_mm2"]
            and (r["low_threshold"] or []) == none["low_threshold"]] == [min(fps)]
    cfg.calibration.max_fp = None
    # independent: evaluate at the chosen point (float32 logits) gives the score calibration saw (float16 logits)
    cfg.inference.threshold, cfg.inference.min_object_mm2 = res["threshold"], res["min_object_mm2"]
    cfg.evaluation.protocol = "volume"
    m = evaluate(cfg, ckpt, "val")["metrics"]
    assert m["vol_lesion_dice"] == pytest.approx(res["score"], abs=0.01)
    # the key-slice protocol when asked for
    cfg.evaluation.protocol = "key"
    assert calibrate(cfg, ckpt, write=False)["metric"] == "lesion_dice"
