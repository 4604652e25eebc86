"""Training learns: ``medseg train`` on a tiny generated task, for a budget of seconds, lowers the
training loss to below half its first value and lifts the validation Dice above the untrained model's.

The task is the cells pipeline (``pipelines/cells.yaml``: the U-Net paper's setting, border-weighted
cross-entropy, elastic deformation) on 8 generated 128² EM-like images, with a U-Net of 8 base
channels and depth 2 on 64² crops. The untrained model is the run's own initial weights (same config,
same seed) scored by the same validation code (:meth:`Trainer.validate`, which ``fit`` calls for the
history's ``val_*`` record). With ``train.lr=0`` the same test fails (loss flat near 1.0, validation
Dice below the untrained one: BatchNorm statistics move, the weights do not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import load_config
from medseg.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CELLS = ROOT / "pipelines" / "cells.yaml"

#: the wall-clock budget (train.time_limit_min): after 10 probe steps it becomes a step count
BUDGET_MIN = 0.25


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 generated 128² cell images (train / val / test split by the folder dataset)."""
    from medseg.data.synthetic import generate_cells_data

    return generate_cells_data(tmp_path_factory.mktemp("cells") / "cells", images=8, seed=0, size=128)


def _overrides(root: Path, out: Path) -> list[str]:
    ov = {
        "data.root": str(root), "data.generate_if_missing": "false", "output_dir": str(out),
        "model.params.base_channels": "8", "model.params.depth": "2", "model.params.dropout": "0.0",
        "transforms.crop_size": "[64,64]", "train.batch_size": "8", "train.lr": "0.005",
        "train.steps_per_epoch": "10", "train.max_steps": "400", "train.val_every": "1000",
        "train.time_limit_min": str(BUDGET_MIN), "train.budget_probe_steps": "10",
        "train.monitor": "dice", "train.device": "cpu", "train.amp": "off", "train.threads": "1",
        "train.num_workers": "0", "train.overlay_count": "0", "train.evaluate_splits": "[]",
        "calibration.after_training": "false", "tracking.enabled": "false",
    }
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.mark.slow
def test_training_learns_the_tiny_task(cells_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ov = _overrides(cells_root, tmp_path / "out")
    # the untrained model: the initial weights of the same config and seed, through the same validation code
    untrained, _ = Trainer(load_config(CELLS, ov), run_dir=tmp_path / "untrained").validate()

    assert main(["train", str(CELLS), *(a for o in ov for a in ("--set", o))]) == 0
    run_dir = Path(capsys.readouterr().out.split("run folder:")[1].split()[0])
    history = json.loads((run_dir / "history.json").read_text())
    losses = [h["train_loss"] for h in history]  # one mean per 10-step epoch
    trained = history[-1]

    assert len(losses) >= 4, f"the budget allowed only {len(losses)} epochs of 10 steps"
    assert losses[-1] < 0.5 * losses[0], losses
    assert trained["val_dice"] > untrained["dice"] + 0.01, (trained["val_dice"], untrained["dice"])
    # the cells' own measure agrees: fewer misclassified pixels, a lower validation loss
    assert trained["val_pixel_error"] < untrained["pixel_error"], (trained, untrained)
    assert trained["val_loss"] < 0.5 * untrained["loss"], (trained["val_loss"], untrained["loss"])
