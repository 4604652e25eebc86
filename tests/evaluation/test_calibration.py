"""The operating point: thresholds + minimum object size, chosen on val, applied the same way everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main
from medseg.config import ConfigError, load_config
from medseg.data import build_dataset
from medseg.inference.postprocess import remove_small_objects, resolve_operating_point, threshold_labels
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def test_thresholds_pick_the_most_probable_class_that_reaches_its_threshold() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35], [0.1, 0.3, 0.6], [0.05, 0.5, 0.45]]).T
    probs = probs.reshape(1, 3, 2, 2)
    labels = threshold_labels(probs, [0.4, 0.3])
    # pixel 0: no class reaches its threshold; 1: class 1 and 2 reach, 1 is more probable; 2: class 2
    assert labels.flatten().tolist() == [0, 1, 2, 1]
    assert threshold_labels(probs, [0.9, 0.9]).sum() == 0
    two = torch.stack([1 - probs[:, 1], probs[:, 1]], 1)
    assert threshold_labels(two, [0.35]).flatten().tolist() == [0, 1, 0, 1]


def test_small_objects_are_measured_in_mm2() -> None:
    labels = torch.zeros(2, 20, 20, dtype=torch.long)
    labels[:, 2:4, 2:4] = 1  # 4 px
    labels[:, 10:16, 10:16] = 1  # 36 px
    out = remove_small_objects(labels, 10.0, [[1.0, 1.0], [2.0, 2.0]])
    assert out[0].sum() == 36  # 4 mm² removed, 36 mm² kept
    assert out[1].sum() == 40  # at 4 mm² per pixel both are large enough
    assert torch.equal(remove_small_objects(labels, 0.0), labels)


def test_the_model_point_applies_unless_the_config_sets_one() -> None:
    cfg = load_config(QUICK)
    stored = {"inference": {"threshold": [0.7], "min_object_mm2": 25.0}}
    assert cfg.inference.threshold is None and cfg.inference.min_object_mm2 is None
    got = resolve_operating_point(cfg, stored)
    assert got.inference.threshold == [0.7] and got.inference.min_object_mm2 == 25.0
    forced = load_config(QUICK, ["inference.threshold=[]", "inference.min_object_mm2=0"])
    got = resolve_operating_point(forced, stored)
    assert got.inference.threshold == [] and got.inference.min_object_mm2 == 0.0
    with pytest.raises(ConfigError, match="inference.threshold"):
        resolve_operating_point(load_config(QUICK, ["inference.threshold=[0.5,0.5]"]), None)
    # a stored hysteresis comes with the stored threshold only: a threshold set here (or argmax) runs without it
    hyst = {"inference": {"threshold": [0.9], "min_object_mm2": 0.0, "low_threshold": [0.2]}}
    assert resolve_operating_point(cfg, hyst).inference.low_threshold == [0.2]
    assert not resolve_operating_point(forced, hyst).inference.low_threshold
    assert not resolve_operating_point(load_config(QUICK, ["inference.threshold=[0.1]"]), hyst).inference.low_threshold


@pytest.mark.slow
def test_stored_operating_point_is_applied_identically_by_evaluate_and_predictor(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.evaluation.calibrate import store_operating_point
    from medseg.evaluation.evaluate import evaluate
    from medseg.inference.predictor import Predictor
    from medseg.training.run import run_training
    from medseg.transforms import build_transforms

    # train, then calibrate on val after training (a grid that cannot pick plain argmax)
    ov = tiny_overrides(demo_root, tmp_path / "out", **{
        "tracking.enabled": False, "calibration.after_training": True, "calibration.thresholds": [0.52, 0.6],
        "calibration.min_object_mm2": [5.0, 40.0]})
    import medseg.evaluation.calibrate as calibrate_module
    from medseg.predict.run import predict_threads

    threads: list[int] = []
    calibrate_run = calibrate_module.calibrate_run

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(torch.get_num_threads())
        return calibrate_run(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "calibrate_run", recorded)
    result, _ = run_training(load_config(QUICK, ov))
    # training ran on train.threads (1); calibration after it on every core, as `medseg calibrate` does
    assert threads == [predict_threads(None)]
    op = result.operating_point
    # the quick start's hysteresis lows (0.1, 0.2, 0.3, 0.5) pair with both thresholds: 4 plain + 16 rows
    assert op is not None and op["split"] == "val" and len(op["grid"]) == 4 + 16
    assert op["threshold"] in ([0.52], [0.6]) and op["min_object_mm2"] in (5.0, 40.0)
    assert op["low_threshold"] in ([], [0.1], [0.2], [0.3], [0.5])
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["operating_point"]["threshold"] == op["threshold"]
    assert ckpt["config"]["inference"]["min_object_mm2"] == op["min_object_mm2"]
    run_cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert run_cfg["inference"]["threshold"] == op["threshold"]

    # store a point that surely matters for this barely trained model: the median lesion probability
    eval_ov = tiny_overrides(demo_root, tmp_path / "out", **{"tracking.enabled": False})
    cfg = load_config(QUICK, eval_ov)
    data = build_dataset(cfg.data, "test")
    transform = build_transforms(cfg.transforms, train=False)
    plain = Predictor.from_ref(result.run_dir, overrides=["inference.threshold=[]"], device="cpu")
    p1 = torch.cat([torch.softmax(plain.logits(torch.as_tensor(transform(data[i])["image"])[None]), 1)[:, 1].flatten()
                    for i in range(len(data))])
    point = {**op, "threshold": [round(float(p1.quantile(0.7)), 4)], "min_object_mm2": 3.0,
             "low_threshold": [round(float(p1.quantile(0.4)), 4)]}  # with hysteresis (2-D on key slices)
    store_operating_point(result.best_checkpoint, point)

    # evaluate with the pipeline's own config (no operating point there): the model's applies
    pred_dir = tmp_path / "pred"
    evaluate(cfg, result.run_dir, "test", save_predictions=pred_dir)
    argmax_dir = tmp_path / "argmax"
    evaluate(load_config(QUICK, eval_ov + ["inference.threshold=[]", "inference.min_object_mm2=0"]),
             result.run_dir, "test", save_predictions=argmax_dir)

    predictor = Predictor.from_ref(result.run_dir, device="cpu")
    assert predictor.cfg.inference.threshold == point["threshold"]
    assert predictor.cfg.inference.min_object_mm2 == 3.0 and predictor.cfg.inference.low_threshold == point["low_threshold"]
    differs = 0
    for i in range(len(data)):
        sample = transform(data[i])
        meta = sample["meta"]
        labels = predictor(torch.as_tensor(sample["image"])[None], [meta["spacing"]])[0].numpy()
        name = f"{meta['series']}/{int(meta['slice']):03d}.png"
        saved = cv2.imread(str(pred_dir / name), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(labels, saved)
        differs += int((cv2.imread(str(argmax_dir / name), cv2.IMREAD_UNCHANGED) != saved).any())
    assert differs > 0  # the operating point really changed predictions, and --set overrides it

    # the CLI prints the grid and stores the point
    assert main(["calibrate", str(QUICK), "--model", str(result.run_dir), "--set", "calibration.thresholds=[0.7]",
                 "--set", "calibration.min_object_mm2=[0]", *[a for o in eval_ov for a in ("--set", o)]]) == 0
    assert "operating point (val split): threshold [0.7]" in capsys.readouterr().out
    assert torch.load(result.best_checkpoint, weights_only=False)["operating_point"]["threshold"] == [0.7]


def test_a_best_threshold_at_the_end_of_the_grid_is_flagged() -> None:
    from medseg.evaluation.calibrate import grid_edge

    grid = [0.2, 0.3, 0.4, 0.5]
    assert grid_edge([0.2], grid) == "smallest"
    assert grid_edge([0.5, 0.5], grid) == "largest"
    assert grid_edge([0.3], grid) is None and grid_edge([0.4], grid) is None
    assert grid_edge([], grid) is None  # argmax chosen: nothing to widen
    assert grid_edge([0.5], [0.5, 0.6]) is None  # a grid of two values has no inside to compare with
