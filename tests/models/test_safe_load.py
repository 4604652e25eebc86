"""Model files are data, not code (issue 24, part 5): a checkpoint or a logged MLflow model that carries
a pickled object is refused by every command that loads models — in one line, before anything in it
runs — and today's own files load as data.

The planted object is :class:`_Payload`, whose unpickling writes a marker file: a refusal is shown by
the exit code and the one error line, and "nothing ran" by the marker that never appears. The positive
control (``--trust-model`` does run it) shows the payload is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from medseg.cli import main
from medseg.models.checkpoint import SAFE_GLOBALS, load_model, read_checkpoint
from medseg.runtime import TrainingError
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"
LEGACY = ROOT / "tests" / "fixtures" / "legacy"


class _Payload:
    """Unpickling this writes ``marker`` (what a hostile model file would do with a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-step run of today's trainer, logged to a SQLite MLflow store (its model included)."""
    out = tmp_path_factory.mktemp("safe_load")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    ov = tiny_overrides(demo_root, out, **{"tracking.uri": uri, "model.params.base_channels": 8})
    assert main(["train", str(QUICK), *_sets(ov)]) == 0
    run_dir = next(out.glob("quickstart/unet-*"))
    run_id = read_checkpoint(run_dir / "checkpoints" / "last.pt")["run_id"]
    return {"out": out, "uri": uri, "run_dir": run_dir, "run_id": run_id}


def _plant(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` (a checkpoint or a state dict) with a :class:`_Payload` added, saved at ``dst``."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        data = torch.load(src, map_location="cpu", weights_only=True)
    data["extra"] = _Payload(marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, dst)
    return dst


def _planted_run(trained: dict[str, Any], tmp_path: Path, marker: Path) -> Path:
    """A copy of the trained run folder whose best.pt and last.pt carry the payload."""
    run = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run)
    for name in ("best.pt", "last.pt"):
        _plant(run / "checkpoints" / name, run / "checkpoints" / name, marker)
    return run


def _assert_refused(code: int, err: str, command: str, marker: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith(f"medseg {command}: error:")]
    assert code != 0 and len(lines) == 1, err
    assert "refused" in lines[0] and "--trust-model" in lines[0] and "Traceback" not in err
    assert not marker.exists(), "the planted object ran"


# ----------------------------------------------------------------------------- today's files are data


def test_todays_checkpoint_and_logged_model_hold_data_only(trained: dict[str, Any], tmp_path: Path) -> None:
    from torch.serialization import get_unsafe_globals_in_checkpoint

    best = trained["run_dir"] / "checkpoints" / "best.pt"
    for name in ("best.pt", "last.pt"):  # no allow-list needed at all (the RNG state is a tensor now)
        assert get_unsafe_globals_in_checkpoint(str(trained["run_dir"] / "checkpoints" / name)) == []
    model, info = load_model(best, trust=False)
    assert info["config"]["model"]["name"] == "unet"

    mlflow.set_tracking_uri(trained["uri"])
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(f"runs:/{trained['run_id']}/model", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "data/medseg/weights.pt", "data/medseg/medseg_model.json"} <= files
    assert "loader_module: medseg.models.checkpoint" in (local / "MLmodel").read_text()
    assert "pytorch" not in (local / "MLmodel").read_text().split("flavors:")[1].split("mlflow_version")[0]
    assert get_unsafe_globals_in_checkpoint(str(local / "data" / "medseg" / "weights.pt")) == []

    x = torch.randn(1, next(model.parameters()).shape[1], 64, 64)  # the first convolution's input channels
    via_uri, uri_info = load_model(f"runs:/{trained['run_id']}/model", trust=False)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")  # MLflow's own loader, no pickle
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(via_uri(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(pyfunc.predict(x.numpy())), expected, rtol=0, atol=0)
    assert uri_info["config"] == info["config"]


# ----------------------------------------------------------------------------- a planted checkpoint


def test_the_planted_payload_is_real_and_trust_model_runs_it(trained: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = _plant(trained["run_dir"] / "checkpoints" / "best.pt", tmp_path / "best.pt", marker)
    with pytest.raises(TrainingError, match=r"best\.pt: refused: the file needs builtins\.getattr, pathlib\.Path"):
        read_checkpoint(planted)
    assert not marker.exists()
    read_checkpoint(planted, trust=True)  # --trust-model: the file's code runs, as documented
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("command", ["predict", "evaluate", "calibrate", "train"])
def test_every_command_refuses_a_checkpoint_that_carries_code(
    command: str, trained: dict[str, Any], demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    run = _planted_run(trained, tmp_path, marker)
    best = str(run / "checkpoints" / "best.pt")
    sets = _sets(tiny_overrides(demo_root, tmp_path / "out", **{"tracking.enabled": False}))
    argv = {
        "predict": ["predict", "--model", best, str(demo_root), str(tmp_path / "pred")],
        "evaluate": ["evaluate", str(QUICK), "--model", best, "--split", "val", *sets],
        "calibrate": ["calibrate", str(QUICK), "--model", best, *sets],
        "train": ["train", str(QUICK), "--resume", str(run)],
    }[command]
    capsys.readouterr()
    code = main(argv)
    _assert_refused(code, capsys.readouterr().err, command, marker)


# ----------------------------------------------------------------------------- a planted MLflow model


def _planted_mlflow_models(trained: dict[str, Any], tmp_path: Path, marker: Path) -> dict[str, str]:
    """Today's logged model with a payload in its weights, as a ``runs:/`` URI of a new run in the same
    store; and the legacy pickled ``mlflow.pytorch`` model with its module replaced by a payload."""
    mlflow.set_tracking_uri(trained["uri"])
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(f"runs:/{trained['run_id']}/model", dst_path=str(tmp_path / "dl")))
    weights = local / "data" / "medseg" / "weights.pt"
    _plant(weights, weights, marker)
    client = MlflowClient(trained["uri"])
    run = client.create_run(client.get_run(trained["run_id"]).info.experiment_id, run_name="planted")
    client.log_artifacts(run.info.run_id, str(local), "model")
    legacy = tmp_path / "legacy_model"
    shutil.copytree(LEGACY / "mlflow_model", legacy)
    torch.save(_Payload(marker), legacy / "data" / "model.pth")
    return {"logged": f"runs:/{run.info.run_id}/model", "legacy": str(legacy)}


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_every_command_refuses_a_logged_model_that_carries_code(
    command: str, trained: dict[str, Any], demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    models = _planted_mlflow_models(trained, tmp_path, marker)
    sets = _sets(tiny_overrides(demo_root, tmp_path / "out", **{"tracking.enabled": False}))
    for kind, ref in models.items():
        argv = {
            "predict": ["predict", "--model", ref, str(demo_root), str(tmp_path / f"pred-{kind}")],
            "evaluate": ["evaluate", str(QUICK), "--model", ref, "--split", "val", *sets],
        }[command]
        capsys.readouterr()
        code = main(argv)
        _assert_refused(code, capsys.readouterr().err, command, marker)
