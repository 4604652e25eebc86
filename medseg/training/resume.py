"""Run folders and exact resume: a fresh run folder, the config saved in one, what ``--resume`` points
at, and the trainer state a checkpoint carries (weights, optimizer, scheduler, scaler, RNG states,
counters) written and restored.

A run folder holds ``config.yaml`` (the resolved config), ``checkpoints/{last,best}.pt``,
``history.json``, ``overlays/`` and the evaluation outputs; the checkpoint format itself is
:mod:`medseg.models.checkpoint`.

A checkpoint holds data only (it is read with ``torch.load(weights_only=True)``): the RNG states are
stored as tensors, tuples and numbers — NumPy's legacy state ``("MT19937", keys, pos, has_gauss,
cached_gaussian)`` with its 624 keys as an int64 tensor (:func:`plain_rng_state`). Checkpoints written
before that hold the keys as a NumPy array; :func:`restore_trainer` accepts both.

One writer per run folder: a training (fresh or ``--resume``) holds an ``flock`` on
``<run folder>/.medseg.lock`` (:func:`lock_run_dir`, rank 0 under ``torchrun``); a second ``--resume`` of
the folder while it runs refuses in one line naming the holder (:class:`medseg.io.FolderBusy`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.io import exclusive_lock
from medseg.models.checkpoint import CHECKPOINT_VERSION
from medseg.runtime import TrainingError

__all__ = ["config_from_run", "find_resume_point", "lock_run_dir", "new_run_dir", "plain_rng_state", "restore_trainer",
           "rng_state_from_plain", "trainer_state"]


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


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, rank: int = 0) -> Iterator[Path]:
    """Hold the run folder's lock for the ``with`` block (created with the folder; only rank 0 takes it:
    the ranks of one ``torchrun`` share their folder by design).

    Raises:
        medseg.io.FolderBusy: another live training holds it (its host, pid, start time and command).
    """
    run_dir = Path(run_dir)
    if rank != 0:
        yield run_dir
        return
    with exclusive_lock(run_dir / ".medseg.lock", "medseg train"):
        yield run_dir


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


def plain_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`medseg.runtime.rng_state` as data a weights-only load reads: NumPy's key array → an int64
    tensor (Python's state is a tuple of ints already; torch's and CUDA's are tensors)."""
    import torch

    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                               float(cached))}


def rng_state_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`plain_rng_state`; a state with NumPy's keys still an array (an older
    checkpoint) passes unchanged."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, np.ndarray):
        return state
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}


def trainer_state(trainer: Any, counters: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """A checkpoint dict of a :class:`~medseg.training.trainer.Trainer`: version, weights, optimizer, scheduler,
    scaler, RNG states, config, in/out channels, the ``counters`` attributes and ``extra``."""
    from medseg.config import public_dict
    from medseg.runtime import rng_state

    return {
        "version": CHECKPOINT_VERSION,
        "model": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": plain_rng_state(rng_state()),
        **{name: getattr(trainer, name) for name in counters},
        **extra,
        "config": public_dict(trainer.cfg),  # credentials redacted: a checkpoint travels
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
    set_rng_state(rng_state_from_plain(ckpt["rng"]))
    for name in counters:
        setattr(trainer, name, ckpt[name])
    return ckpt


