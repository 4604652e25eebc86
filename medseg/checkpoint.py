"""Checkpoints and run folders: atomic writes, the checkpoint format, model loading, resume lookup.

A checkpoint (``<run_dir>/checkpoints/{last,best}.pt``) is a dict written by ``torch.save``::

    version           CHECKPOINT_VERSION
    model             the model's state dict
    config            the resolved config (a plain dict)
    in_channels, num_classes
    optimizer, scheduler, scaler, rng, epoch, step, batch_in_epoch, best_metric, stale,
    history, run_id   (what exact resume needs)

A run folder holds ``config.yaml`` (the resolved config), ``checkpoints/``, ``history.json``,
``overlays/`` and the evaluation outputs. Every file is written to a temp file in the same folder
and renamed over its name, so a run killed at any moment leaves either the old or the new file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, from_dict
from medseg.runtime import TrainingError

__all__ = [
    "CHECKPOINT_VERSION", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "config_from_run",
    "find_resume_point", "load_model", "load_pretrained", "new_run_dir", "write_rows_csv",
]

log = logging.getLogger("medseg.checkpoint")

CHECKPOINT_VERSION = 1

#: a run folder's checkpoint files, in the order a model reference to the folder prefers them
_FOLDER_CHECKPOINTS = ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt")


# ----------------------------------------------------------------------------- atomic writes


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` via a temp file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to ``path`` via a temp file and rename."""
    atomic_write_bytes(path, text.encode())


def write_rows_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of equal keys as a CSV file (header from the first row), written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


# ----------------------------------------------------------------------------- run folders


def new_run_dir(cfg: Config) -> Path:
    """``<output_dir>/<name>/<model>-<YYYYmmdd-HHMMSS>[-n]``: a fresh folder name (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / cfg.name
    run_dir = base / f"{cfg.model.name}-{stamp}"
    n = 1
    while run_dir.exists():  # two runs started in the same second get their own folders
        n += 1
        run_dir = base / f"{cfg.model.name}-{stamp}-{n}"
    return run_dir


def config_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config dict saved in a run folder (for ``--resume``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no config.yaml — not a medseg run folder")
    return yaml.safe_load(path.read_text())


def find_resume_point(ref: str | Path, cfg_uri: str | None = None, output_dir: str = "outputs") -> tuple[Path, Path]:
    """Resolve ``--resume`` (a run folder, a checkpoint file or an MLflow run id) → (run_dir, checkpoint)."""
    p = Path(ref)
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise TrainingError(f"--resume {ref}: no checkpoints/last.pt in this folder")
        return p, ckpt
    if p.is_file():
        return p.parent.parent, p
    from medseg.tracking import resolve_tracking_uri

    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=resolve_tracking_uri(cfg_uri, output_dir)).get_run(str(ref))
        run_dir = Path(run.data.tags["medseg.run_dir"])
    except Exception as e:  # noqa: BLE001 — any lookup failure means the same thing to the user
        raise TrainingError(
            f"--resume {ref}: not a run folder, a checkpoint file or an MLflow run id known to the "
            f"tracking store ({e.__class__.__name__})"
        ) from None
    return find_resume_point(run_dir)


# ----------------------------------------------------------------------------- the format


def trainer_state(trainer: Any, counters: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """A checkpoint dict of a :class:`~medseg.engine.Trainer`: version, weights, optimizer, scheduler,
    scaler, RNG states, config, in/out channels, the ``counters`` attributes and ``extra``."""
    from medseg.config import to_dict
    from medseg.runtime import rng_state

    return {
        "version": CHECKPOINT_VERSION,
        "model": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng_state(),
        **{name: getattr(trainer, name) for name in counters},
        **extra,
        "config": to_dict(trainer.cfg),
        "in_channels": trainer.in_channels,
        "num_classes": trainer.num_classes,
    }


def restore_trainer(trainer: Any, ckpt: dict[str, Any], counters: tuple[str, ...]) -> dict[str, Any]:
    """Load what :func:`trainer_state` wrote back into ``trainer`` (weights, states, RNG, counters); returns ``ckpt``."""
    from medseg.runtime import set_rng_state

    trainer.net.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    for name in counters:
        setattr(trainer, name, ckpt[name])
    return ckpt


# ----------------------------------------------------------------------------- loading


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A medseg checkpoint dict from ``path``.

    Raises:
        TrainingError: the file is not a medseg checkpoint or has an unsupported version.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainingError(f"{path}: not a medseg checkpoint (expected keys 'model' and 'config')")
    if ckpt.get("version", CHECKPOINT_VERSION) != CHECKPOINT_VERSION:
        raise TrainingError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                            f"(this medseg writes version {CHECKPOINT_VERSION})")
    return ckpt


def _mlflow_config(ref: str) -> dict[str, Any] | None:
    """The ``config/config.yaml`` a ``medseg train`` run logged beside its model, when there is one."""
    if not ref.startswith("runs:/"):
        return None
    import tempfile

    import yaml
    from mlflow.artifacts import download_artifacts

    run_id = ref[len("runs:/"):].split("/", 1)[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run_id, artifact_path="config/config.yaml", dst_path=tmp)
            return yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 — a run without a logged config simply has none
        return None


def load_model(ref: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model from a checkpoint file, a ``medseg train`` run folder or an MLflow URI.

    Args:
        ref: ``.../best.pt``, a run folder (its ``checkpoints/best.pt``, else ``last.pt``), or an
            MLflow model URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``).
        device: where the model goes.

    Returns:
        ``(model in eval mode, info)``: info holds ``config`` (the training config as a dict, also
        for ``runs:/`` URIs, read from the run's logged ``config/config.yaml``; None when unknown),
        ``source`` and, for checkpoints, ``epoch``.
    """
    from medseg.models import build_model

    ref_s = str(ref)
    if ref_s.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(ref_s, map_location=torch.device(device))
        return model.eval(), {"config": _mlflow_config(ref_s), "source": ref_s}
    path = Path(ref_s)
    if path.is_dir():
        for cand in _FOLDER_CHECKPOINTS:
            if (path / cand).is_file():
                path = path / cand
                break
        else:
            raise TrainingError(f"{ref}: no checkpoints/best.pt or checkpoints/last.pt in this folder")
    if not path.is_file():
        raise TrainingError(
            f"--model {ref}: not a checkpoint file, a run folder or an MLflow model URI (runs:/<id>/model)"
        )
    ckpt = read_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg.model.name, ckpt["in_channels"], ckpt["num_classes"], cfg.model.params)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), {"config": ckpt["config"], "source": str(path), "epoch": ckpt.get("epoch")}


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Load ``model.pretrained`` weights into ``net`` (non-strict: a new head may differ; never downloads).

    ``path`` holds a state dict, or a dict with one under ``"model"`` (a medseg checkpoint).
    """
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"model.pretrained = {path}: file not found (weights are never downloaded)")
    state = torch.load(p, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = net.load_state_dict(state, strict=False)
    log.info("loaded %s (%d missing, %d unexpected keys)", p, len(missing), len(unexpected))
