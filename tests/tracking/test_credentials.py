"""A password in a tracking URI never leaves the process: console, logs, run folder (checkpoints
included), the server's params, tags and artifacts — every byte searched."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from medseg.cli import main
from medseg.runtime import redact_uri
from medseg.tracking.connect import connect_uri
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cretpw"


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://user:pw@host:5000", "http://user:***@host:5000"),
    ("https://tok@host/path", "https://***@host/path"),
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("http://host:5000/?token=abc&x=1", "http://host:5000/?token=***&x=1"),
    ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
    (None, None),
])
def test_redact_uri(uri: str | None, shown: str | None) -> None:
    assert redact_uri(uri) == shown


def test_connect_uri_moves_http_credentials_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "unset")
    assert connect_uri("http://alice:p%40ss@h:5000") == "http://h:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")
    # a redacted URI (an earlier run's config.yaml) keeps the environment's credentials
    assert connect_uri("http://alice:***@h:5000") == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    # a database keeps its password in the process; a redacted one is left to PGPASSWORD / ~/.pgpass
    assert connect_uri("postgresql://u:pw@db/x") == "postgresql://u:pw@db/x"
    assert connect_uri("postgresql://u:***@db/x") == "postgresql://u@db/x"


def _files_with_secret(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_found_nowhere(
    mlflow_server: Any, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test
        monkeypatch.setenv(name, "unset")
    uri = mlflow_server.uri.replace("http://", f"http://user:{SECRET}@")  # the server ignores basic auth
    out = tmp_path / "out"
    ov = tiny_overrides(demo_root, out, **{"tracking.uri": uri, "tracking.experiment": "credentials"})
    with caplog.at_level(logging.DEBUG):
        assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"),
                     *[a for o in ov for a in ("--set", o)]]) == 0
    printed = capsys.readouterr()
    assert SECRET not in printed.out and SECRET not in printed.err and SECRET not in caplog.text
    assert "View run" not in printed.out  # MLflow's own link lines are off: medseg prints its own
    assert f"MLflow UI:    {mlflow_server.uri}" in printed.out
    # the client connected with the credentials, from the environment
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET

    (run_dir,) = (out / "quickstart").iterdir()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert _files_with_secret(out) == []  # config.yaml, checkpoints, history, overlays, the MLflow model
    assert "user:***@" in (run_dir / "config.yaml").read_text()

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("credentials")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == mlflow_server.uri.replace("http://", "http://user:***@")
    for key, value in {**run.data.params, **run.data.tags}.items():
        assert SECRET not in value, key
    assert client.list_artifacts(run.info.run_id, "checkpoints")  # the artifacts did reach the server
    assert _files_with_secret(mlflow_server.artifacts) == []
