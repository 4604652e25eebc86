"""The deployment's parts, for real: PostgreSQL + ``mlflow server`` + medseg training/evaluation; the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.mlflow_server import start_server
from tests.servers import postgres_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_and_evaluate_against_mlflow_server_on_postgres(demo_root: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from medseg.config import load_config
    from medseg.training.run import run_training

    with postgres_server() as pg_uri:
        server = start_server(pg_uri, tmp_path / "server")  # the evaluation tests' server, on PostgreSQL
        try:
            url = server.uri
            ov = tiny_overrides(demo_root, tmp_path / "out", **{"tracking.uri": url, "train.evaluate_splits": ["test"]})
            result, evaluations = run_training(load_config(ROOT / "pipelines" / "quickstart.yaml", ov))
            client = MlflowClient(tracking_uri=url)
            run = client.get_run(result.run_id)
            assert run.info.status == "FINISHED"
            assert run.data.params["train.max_steps"] == "2"
            assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [1, 2]
            assert run.data.metrics["test/dice"] == pytest.approx(evaluations["test"]["metrics"]["dice"])
            names = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
            assert "evaluation/lesions_test.csv" in names
            # artifacts went through the server into its store, not into the local output folder
            assert list(server.artifacts.rglob("lesions_test.csv"))
            local = client.download_artifacts(result.run_id, "evaluation/lesions_test.csv", str(tmp_path))
            assert Path(local).read_text() == Path(evaluations["test"]["lesions_csv"]).read_text()
        finally:
            server.stop()
    # the runs live in PostgreSQL: nothing was written to a local SQLite store
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid() -> None:
    env = dict(os.environ, POSTGRES_PASSWORD="test-only")
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    services = cfg["services"]
    assert {"postgres", "mlflow", "train", "predict"} <= set(services)
    assert "postgresql+psycopg2://" in " ".join(services["mlflow"]["entrypoint"])
    for name in ("train", "predict"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
        assert "tracking.uri=http://mlflow:5000" in services[name]["command"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "\nUSER medseg" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "ARG BASE=python:3.11." in dockerfile  # a pinned base
