"""``medseg evaluate`` applies the model's window rule (as predict does) and warns, once, for a model
trained with the annotation's window (``data.window: dicom``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from medseg.config import load_config
from medseg.evaluation.evaluate import evaluate
from medseg.training.run import run_training
from tests.conftest import tiny_overrides

QUICK = Path(__file__).resolve().parents[2] / "pipelines" / "quickstart.yaml"


@pytest.mark.slow
def test_evaluate_uses_and_warns_about_the_models_dicom_window(demo_root: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{"tracking.enabled": False, "data.window": "dicom",
                                               "train.amp": "off"})
    result, _ = run_training(load_config(QUICK, ov))
    fixed = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"tracking.enabled": False,
                                                                      "data.window": "fixed"}))
    with caplog.at_level(logging.WARNING, logger="medseg.evaluation"):
        out = evaluate(fixed, result.last_checkpoint, split="val")
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.evaluation"]
    assert sum("data.window: dicom" in m for m in lines) == 1  # the annotation-window warning, once
    assert any("data.window: fixed -> dicom" in m for m in lines)  # and the rule taken from the model
    assert out["n"] > 0
