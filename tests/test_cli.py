"""CLI smoke runs on generated data: train → MLflow run with params/metrics/artifacts → evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from medseg.cli import main
from medseg.config import load_config
from medseg.data import build_dataset
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_train_then_evaluate_cli(demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    ov = tiny_overrides(demo_root, out, **{"train.evaluate_splits": ["test"]})
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), *_sets(ov)]) == 0
    printed = capsys.readouterr().out
    run_id = printed.split("MLflow run:")[1].split()[0]
    run_dir = Path(printed.split("run folder:")[1].split()[0])
    assert "mlflow ui --backend-store-uri sqlite:///" in printed

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "quickstart"
    assert run.info.run_name.startswith("unet-")
    params = run.data.params
    assert params["train.max_steps"] == "2" and params["data.root"] == str(demo_root)
    assert params["model.name"] == "unet" and int(params["model.num_parameters"]) > 0
    metrics = run.data.metrics
    for key in ("train/loss", "train/lr", "val/dice", "val/miou", "val/loss", "test/dice", "test/lesion_dice"):
        assert key in metrics, key
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]

    def listing(path: str = "") -> set[str]:
        return {f.path for f in client.list_artifacts(run_id, path)}

    assert {"config/config.yaml", "config/quickstart.yaml"} <= listing("config")
    assert "environment.json" in listing()
    env = json.loads(client.download_artifacts(run_id, "environment.json", str(tmp_path)) and
                     (tmp_path / "environment.json").read_text())
    assert env["packages"]["torch"] and env["dataset_fingerprint"]
    assert any(p.endswith(".png") for p in listing("overlays"))
    assert "checkpoints/best.pt" in listing("checkpoints")
    assert "evaluation/lesions_test.csv" in listing("evaluation")
    assert "model/MLmodel" in listing("model") or any("MLmodel" in p for p in listing("model"))

    # evaluate the run folder, writing prediction PNGs per key slice
    pred_dir = tmp_path / "pred"
    ev_ov = tiny_overrides(demo_root, out)
    assert main(["evaluate", str(ROOT / "pipelines" / "quickstart.yaml"), "--model", str(run_dir),
                 "--split", "test", "--save-predictions", str(pred_dir), *_sets(ev_ov)]) == 0
    printed = capsys.readouterr().out
    metrics_out = json.loads(printed[: printed.index("}") + 1])
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ev_ov)
    test_set = build_dataset(cfg.data, "test")
    written = sorted(pred_dir.glob("*/*.png"))
    assert len(written) == len(test_set)
    inter = pred_area = true_area = 0
    for sample in (test_set[i] for i in range(len(test_set))):
        png = cv2.imread(str(pred_dir / sample["meta"]["series"] / f"{sample['meta']['slice']:03d}.png"),
                         cv2.IMREAD_UNCHANGED)
        assert png.shape == sample["image"].shape[1:] and set(np.unique(png)) <= {0, 1}
        true = sample["truth"][0] > 0  # evaluate scores against the generated true masks
        inter += int((png.astype(bool) & true).sum())
        pred_area, true_area = pred_area + int(png.astype(bool).sum()), true_area + int(true.sum())
    # the printed Dice, recomputed from the written predictions and the true masks (pooled over the split)
    assert true_area > 0
    assert metrics_out["dice"] == pytest.approx(2 * inter / (pred_area + true_area), abs=1e-9)
    # the same model through its MLflow URI gives the same metrics
    assert main(["evaluate", str(ROOT / "pipelines" / "quickstart.yaml"), "--model", f"runs:/{run_id}/model",
                 "--split", "test", *_sets(ev_ov)]) == 0
    again = capsys.readouterr().out
    assert json.loads(again[: again.index("}") + 1])["dice"] == pytest.approx(metrics_out["dice"])


def test_missing_deeplesion_root_explains_how_to_get_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(ROOT / "pipelines" / "deeplesion.yaml"), "--set", f"data.root={tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "Images_png" in err and "pipelines/quickstart.yaml" in err


def test_config_error_names_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--set", "train.epochz=1"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_demo_data_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo-data", str(tmp_path / "dl"), "--patients", "3", "--seed", "1"]) == 0
    assert (tmp_path / "dl" / "DL_info.csv").is_file()
    assert str(tmp_path / "dl") in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_every_pipeline_trains_two_steps(pipeline: Path, demo_root: Path, tmp_path: Path) -> None:
    """Each shipped pipeline, with its own model and loss, trains 2 steps on generated data."""
    from medseg.training.run import run_training

    cfg = load_config(pipeline, tiny_overrides(demo_root, tmp_path, **{"tracking.enabled": False}))
    result, _ = run_training(cfg)
    assert result.steps_done == 2
    assert result.last_checkpoint.is_file()


def test_unknown_monitor_fails_before_preparing_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "demo"  # generate_if_missing: a valid config would generate the demo data here
    code = main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--set", "train.monitor=dcie",
                 "--set", f"data.root={root}", "--set", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.monitor = 'dcie'" in err and "dice" in err and "hd95" in err and "monitor_mode" in err
    assert not root.exists() and not (tmp_path / "out" / "quickstart").exists()


@pytest.mark.parametrize("error,code", [("TrainingError", 2), ("RuntimeError", None)])
def test_failure_in_evaluate_leaves_its_mlflow_run_failed(
    error: str, code: int | None, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    import medseg.evaluation.evaluate
    from medseg.runtime import TrainingError

    exc = {"TrainingError": TrainingError, "RuntimeError": RuntimeError}[error]

    def broken(ref: object, device: object) -> None:
        raise exc("checkpoint unreadable")

    monkeypatch.setattr(medseg.evaluation.evaluate, "load_model", broken)
    out = tmp_path / "out"
    args = ["evaluate", str(ROOT / "pipelines" / "quickstart.yaml"), "--model", str(tmp_path / "x.pt"),
            *_sets(tiny_overrides(demo_root, out))]
    if code is None:
        with pytest.raises(exc, match="checkpoint unreadable"):
            main(args)
    else:
        assert main(args) == code
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.run_name == "evaluate-test" and run.data.params["split"] == "test"
    assert run.info.status == "FAILED"


def test_python_dash_m_medseg() -> None:
    import subprocess
    import sys

    # run from the repository root, so that this checkout's medseg is the one imported
    proc = subprocess.run([sys.executable, "-m", "medseg", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: medseg") and all(c in proc.stdout for c in ("train", "evaluate", "demo-data"))
    proc = subprocess.run([sys.executable, "-m", "medseg", "evaluate"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "required" in proc.stderr
def test_demo_patient_count_lives_in_one_place() -> None:
    """The config default is the only number: the CLI, the generator and the demo fragment defer to it."""
    import inspect

    import yaml

    from medseg.cli import build_parser
    from medseg.config import DataConfig
    from medseg.data.synthetic import generate_demo_data

    assert build_parser().parse_args(["demo-data", "x"]).patients is None  # → DataConfig().demo_patients
    assert inspect.signature(generate_demo_data).parameters["patients"].default is None
    assert "demo_patients" not in yaml.safe_load((ROOT / "configs" / "data" / "demo.yaml").read_text())["data"]
    assert load_config(ROOT / "pipelines" / "quickstart.yaml").data.demo_patients == DataConfig().demo_patients
