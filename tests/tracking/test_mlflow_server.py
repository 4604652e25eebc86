"""``medseg evaluate`` against a real MLflow tracking server; everything read back through the client."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medseg.cli import main
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_server_answers_and_stores_runs(mlflow_server: Any) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.create_experiment("smoke-server")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5)
    assert client.get_run(run.info.run_id).data.metrics["x"] == 1.5
    assert mlflow_server.process.poll() is None


@pytest.mark.slow
def test_evaluate_logs_metrics_table_and_plots_to_the_server(
    mlflow_server: Any, tiny_runs: dict[str, Any], demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder trained elsewhere, evaluated into the server (artifacts proxied over HTTP)."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.uri
    ov = tiny_overrides(demo_root, tmp_path / "out", **{"tracking.uri": mlflow_server.uri,
                                                        "tracking.experiment": "evaluations",
                                                        "metrics.bootstrap_resamples": 200, "train.amp": "off"})
    capsys.readouterr()
    assert main(["evaluate", str(ROOT / "pipelines" / "quickstart.yaml"), "--model", str(tiny_runs["run_dirs"][0]),
                 "--split", "test", *_sets(ov)]) == 0
    printed = capsys.readouterr().out
    # (a remote store makes MLflow print the run's link first)
    printed_metrics = json.loads(printed[printed.index("{") : printed.index("}") + 1])
    run_id = printed.split("MLflow run:")[1].split()[0]
    assert "roi_dice" in printed and "interval:" in printed  # the readable report follows the JSON

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # every finite metric, under its stable name test/<key>
    logged = run.data.metrics
    for key, value in printed_metrics.items():
        if math.isfinite(value):
            assert logged[f"test/{key}"] == pytest.approx(value), key
    for key in ("test/dice", "test/lesion_dice", "test/roi_dice", "test/roi_iou", "test/froc_max_fp",
                "test/ci_units"):
        assert key in logged, key
    assert run.data.tags["medseg.test.ci_unit"] == "patient"

    # the per-lesion table: registered by log_table, equal to the CSV row by row
    logged_artifacts = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "evaluation/lesions_test.json", "type": "table"} in logged_artifacts
    table = json.loads(Path(client.download_artifacts(run_id, "evaluation/lesions_test.json", str(tmp_path)))
                       .read_text())
    local_csv = Path(client.download_artifacts(run_id, "evaluation/lesions_test.csv", str(tmp_path)))
    with open(local_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    cols = table["columns"]
    assert len(table["data"]) == len(csv_rows) == printed_metrics["lesion_count"] > 0
    for key in ("image_id", "lesion_id", "dice", "roi_dice", "roi_hd95", "unit", "froc_score"):
        assert key in cols, key
    for row, ref in zip(table["data"], csv_rows):
        got = dict(zip(cols, row))
        assert str(got["image_id"]) == ref["image_id"] and str(got["lesion_id"]) == ref["lesion_id"]
        assert got["roi_dice"] == pytest.approx(float(ref["roi_dice"]))
        assert got["unit"] == ref["unit"]
    assert np.mean([dict(zip(cols, r))["roi_dice"] for r in table["data"]]) == pytest.approx(
        printed_metrics["roi_dice"])

    # the plots: PNG files that decode
    plots = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation/plots")}
    assert plots == {"froc_test.png", "dice_by_type_test.png", "long_axis_test.png", "worst_lesions_test.png"}
    for name in plots:
        local = client.download_artifacts(run_id, f"evaluation/plots/{name}", str(tmp_path / "plots"))
        img = cv2.imread(local)
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
