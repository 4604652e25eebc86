"""The checkpoint format and model loading: a checkpoint file, a run folder or an MLflow model → a model.

A checkpoint (``<run_dir>/checkpoints/{last,best}.pt``) is a dict written by ``torch.save``::

    version           CHECKPOINT_VERSION
    model             the model's state dict
    config            the resolved config (a plain dict)
    in_channels, num_classes
    optimizer, scheduler, scaler, rng, epoch, step, batch_in_epoch, best_metric, stale,
    history, run_id   (what exact resume needs)

Checkpoints are written atomically (:func:`medseg.io.atomic_torch_save`); run folders and the trainer
state that exact resume needs are :mod:`medseg.training.resume`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import from_dict
from medseg.runtime import TrainingError

__all__ = ["CHECKPOINT_VERSION", "load_model", "load_pretrained", "read_checkpoint"]

log = logging.getLogger("medseg.checkpoint")

CHECKPOINT_VERSION = 1

#: a run folder's checkpoint files, in the order a model reference to the folder prefers them
_FOLDER_CHECKPOINTS = ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt")


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
