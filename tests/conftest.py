"""Shared fixtures: one small generated DeepLesion-format dataset per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from tests.mlflow_server import MlflowServer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated DeepLesion-format release (8 patients, 128×128 slices), shared read-only."""
    from medseg.data.synthetic import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("demo") / "dl", patients=8, seed=3,
                              progress=False, image_size=128)


def tiny_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    """Overrides that make any pipeline train in seconds on ``demo_root``."""
    ov = {
        "data.name": "deeplesion", "data.root": str(root), "data.generate_if_missing": False,
        "data.spacing_mm": None, "data.recist_mask": "ellipse",
        "train.epochs": 1, "train.max_steps": 2, "train.batch_size": 2, "train.threads": 1,
        "train.num_workers": 0, "train.val_every": 1, "train.overlay_count": 2, "train.evaluate_splits": [],
        "train.device": "cpu", "train.amp": "off", "transforms.crop_size": [64, 64], "output_dir": str(out),
        "train.time_limit_min": None, "calibration.after_training": False, "inference.tta_flips": False,
        "train.propagate.start": 0.4,  # no propagation round inside a tiny run (tests/training/test_propagate.py)
        "train.hard_negatives.enabled": False,  # nor a mining round (tests/training/test_hardneg.py)
    }
    ov.update(extra)
    import json

    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on a free 127.0.0.1 port for the session, terminated at teardown.

    The backend store URI is the fixture's parameter (indirect parametrisation, see
    ``tests/mlflow_server.py``); without one it is a SQLite file in a temporary folder.
    """
    from tests.mlflow_server import start_server

    workdir = tmp_path_factory.mktemp("mlflow_server")
    backend = getattr(request, "param", None) or f"sqlite:///{workdir / 'mlflow.db'}"
    server = start_server(backend, workdir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two 2-step quick-start runs (seeds 0 and 1), each evaluated on every slice of ``demo_root``
    (split ``all``: 16 slices of 8 patients), logged to a SQLite MLflow store."""
    from medseg.config import load_config
    from medseg.training.run import run_training

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("tiny_runs")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    runs = []
    for seed in (0, 1):
        ov = tiny_overrides(demo_root, out, **{"train.seed": seed, "train.evaluate_splits": ["all"],
                                               "tracking.uri": uri, "tracking.experiment": "tiny",
                                               "metrics.bootstrap_resamples": 200,
                                               # bfloat16 autocast makes whole-slice inference ~30× slower here
                                               "train.amp": "off"})
        cfg = load_config(root / "pipelines" / "quickstart.yaml", ov)
        result, _ = run_training(cfg, pipeline_path=root / "pipelines" / "quickstart.yaml")
        runs.append(result)
    # under load the run can end before its journal's sender has given the store every record (the run's
    # warning says so, and the sender goes on in this process): wait for it, as the tests read the store
    import time

    from medseg.tracking.journal import read_journal, sync

    for r in runs:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, records, sent = read_journal(r.run_dir)
            if sent >= len(records):
                break
            time.sleep(0.5)
        else:
            sync(r.run_dir, uri)
    return {"uri": uri, "out": out, "run_ids": [r.run_id for r in runs], "run_dirs": [r.run_dir for r in runs],
            "experiment": "tiny"}
