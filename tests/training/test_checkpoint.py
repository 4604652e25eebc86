"""Checkpoints and run folders: the format and its version, model loading, resume lookup, CSV rows."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medseg.config import load_config, to_dict
from medseg.io import atomic_torch_save, write_rows_csv
from medseg.models import build_model
from medseg.models.checkpoint import CHECKPOINT_VERSION, load_model, read_checkpoint
from medseg.runtime import TrainingError
from medseg.training.resume import find_resume_point

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path, epoch: int, **extra: object) -> dict:
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ["model.params.base_channels=8"])
    torch.manual_seed(epoch)
    net = build_model(cfg.model.name, 3, 2, cfg.model.params)
    ckpt = {"version": CHECKPOINT_VERSION, "model": net.state_dict(), "config": to_dict(cfg), "in_channels": 3,
            "num_classes": 2, "epoch": epoch, **extra}
    atomic_torch_save(ckpt, path)
    return ckpt


def test_load_model_prefers_best_in_a_run_folder(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoints" / "last.pt", epoch=5)
    with pytest.raises(TrainingError, match="not a checkpoint file, a run folder or an MLflow model URI"):
        load_model(tmp_path / "nope")
    model, info = load_model(tmp_path)
    assert info["epoch"] == 5 and info["source"].endswith("checkpoints/last.pt") and not model.training
    best = _save(tmp_path / "checkpoints" / "best.pt", epoch=3)
    model, info = load_model(tmp_path)
    assert info["epoch"] == 3 and info["config"]["model"]["params"]["base_channels"] == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])
    assert load_model(tmp_path / "checkpoints")[1]["epoch"] == 3  # the checkpoints folder itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no checkpoints/best.pt"):
        load_model(tmp_path / "empty")


def test_read_checkpoint_rejects_foreign_files_and_other_versions(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(TrainingError, match="not a medseg checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    _save(tmp_path / "future.pt", epoch=1, version=CHECKPOINT_VERSION + 1)
    with pytest.raises(TrainingError, match=f"version {CHECKPOINT_VERSION + 1} is not supported"):
        read_checkpoint(tmp_path / "future.pt")


def test_find_resume_point(tmp_path: Path) -> None:
    run = tmp_path / "quickstart" / "unet-1"
    with pytest.raises(TrainingError, match="not a run folder, a checkpoint file or an MLflow run id"):
        find_resume_point("0123abcd", output_dir=str(tmp_path))
    run.mkdir(parents=True)
    with pytest.raises(TrainingError, match="no checkpoints/last.pt"):
        find_resume_point(run)
    _save(run / "checkpoints" / "last.pt", epoch=2)
    assert find_resume_point(run) == (run, run / "checkpoints" / "last.pt")
    assert find_resume_point(run / "checkpoints" / "last.pt") == (run, run / "checkpoints" / "last.pt")


def test_write_rows_csv(tmp_path: Path) -> None:
    rows = [{"image_id": "a", "dice": 0.5}, {"image_id": "b", "dice": 1.0}]
    write_rows_csv(rows, tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"image_id": "a", "dice": "0.5"}, {"image_id": "b", "dice": "1.0"}]
    write_rows_csv([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == ""


def test_load_pretrained_takes_a_state_dict_or_a_checkpoint(tmp_path: Path) -> None:
    from medseg.models.checkpoint import load_pretrained

    ckpt = _save(tmp_path / "run.pt", epoch=1)
    torch.save(ckpt["model"], tmp_path / "bare.pt")
    for name in ("run.pt", "bare.pt"):
        cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ["model.params.base_channels=8"])
        net = build_model(cfg.model.name, 3, 2, cfg.model.params)
        load_pretrained(net, tmp_path / name)
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in net.state_dict().items())
    with pytest.raises(TrainingError, match="model.pretrained = .*missing.pt: file not found"):
        load_pretrained(net, tmp_path / "missing.pt")
