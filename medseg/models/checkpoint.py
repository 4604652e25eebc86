"""The checkpoint format and model loading: a checkpoint file, a run folder or an MLflow model → a model.

A checkpoint (``<run_dir>/checkpoints/{last,best}.pt``) is a dict written by ``torch.save``::

    version           CHECKPOINT_VERSION
    model             the model's state dict
    config            the resolved config (a plain dict)
    in_channels, num_classes
    optimizer, scheduler, scaler, rng, epoch, step, batch_in_epoch, best_metric, stale,
    history, run_id   (what exact resume needs)

Model files are data, not code: every checkpoint is read with ``torch.load(weights_only=True)``, which
builds tensors, numbers, strings, lists, tuples and dicts and nothing else. The only other types
allowed are NumPy's array, dtype and scalar (:data:`SAFE_GLOBALS`), which the RNG state of checkpoints written
before model files became data holds (newer ones store it as a tensor, :mod:`medseg.training.resume`).
A file that needs any other global is refused in one line naming the file and the global
(:class:`~medseg.runtime.TrainingError`) before anything in it runs; ``--trust-model`` (``trust=True``, or
:func:`trust_model_files` around a command) loads it with the full unpickler, which runs the code the
file carries.

The MLflow model a training run logs (:func:`save_mlflow_model`) is data too: an MLflow
``python_function`` model whose loader is this module (``loader_module: medseg.models.checkpoint``),
holding ``data/medseg/weights.pt`` (the state dict) and ``data/medseg/medseg_model.json`` (format,
model name, in/out channels, config); the network is rebuilt from the model registry. Models logged
by earlier versions (a pickled module, ``mlflow.pytorch`` flavour) load only with ``--trust-model``.

Example:
    >>> model, info = load_model("outputs/quickstart/unet-20250101-120000")   # its checkpoints/best.pt
    >>> model, info = load_model("runs:/0123abcd/model", "cuda")

Checkpoints are written atomically (:func:`medseg.io.atomic_torch_save`); run folders and the trainer
state that exact resume needs are :mod:`medseg.training.resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import from_dict
from medseg.io import atomic_torch_save, atomic_write_text
from medseg.runtime import TrainingError

__all__ = ["CHECKPOINT_VERSION", "MODEL_FORMAT", "SAFE_GLOBALS", "PyfuncModel", "load_model", "load_pretrained",
           "read_checkpoint", "safe_torch_load", "save_mlflow_model", "trust_model_files"]

log = logging.getLogger("medseg.checkpoint")

CHECKPOINT_VERSION = 1

#: the ``format`` of ``medseg_model.json`` in a logged MLflow model (and its version below)
MODEL_FORMAT = "medseg-model"
_MODEL_FORMAT_VERSION = 1

#: a run folder's checkpoint files, in the order a model reference to the folder prefers them
_FOLDER_CHECKPOINTS = ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt")


def _numpy_globals() -> list[Any]:
    """NumPy's array, its numeric dtypes and its scalar constructors, under both of their pickled names
    (NumPy 2 writes ``numpy._core.multiarray``, NumPy 1 ``numpy.core.multiarray``): arrays of numbers."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype, *sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=str)]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        out += [fn, (fn, f"numpy._core.multiarray.{fn.__name__}"), (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return out


#: the globals a medseg checkpoint may need beyond torch's own weights-only set
SAFE_GLOBALS: list[Any] = _numpy_globals()

_TRUST: ContextVar[bool] = ContextVar("medseg_trust_model", default=False)


@contextlib.contextmanager
def trust_model_files(trust: bool = True) -> Iterator[None]:
    """Within the block, model files load with the full unpickler (``--trust-model``): RUNS the code a
    file carries. Loaders given an explicit ``trust=`` ignore it."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _trusted(trust: bool | None) -> bool:
    return _TRUST.get() if trust is None else bool(trust)


def _refused_globals(error: Exception, path: Path) -> str | None:
    """The globals a weights-only load refused: from a scan of the file's pickle opcodes (which runs
    nothing), else from torch's message."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint

        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        names = sorted(n for n in get_unsafe_globals_in_checkpoint(str(path)) if n not in allowed)
    except Exception:  # noqa: BLE001 — the scan is only for the message
        names = []
    if names:
        return ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
    found = re.search(r"GLOBAL ([\w.]+)|unrecognized function ([\w.<>]+)|but got <class '([\w.]+)'>", str(error))
    return next(g for g in found.groups() if g) if found else None


def safe_torch_load(path: str | Path, trust: bool | None = None) -> Any:
    """``torch.load`` of ``path`` onto the CPU as data (``weights_only=True`` + :data:`SAFE_GLOBALS`).

    Args:
        trust: True = the full unpickler (runs the code the file carries); None = as
            :func:`trust_model_files` says (default: no).

    Raises:
        TrainingError: one line — the file needs another global (named, with the ``--trust-model``
            way out), or it is not a file ``torch.load`` reads.
    """
    path = Path(path)
    if _trusted(trust):
        log.warning("%s: loading with --trust-model: any code the file carries runs now", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _refused_globals(e, path)
        if name is None and "weights only load failed" not in str(e).lower():
            raise TrainingError(f"{path}: not a file torch.load reads ({str(e).splitlines()[0][:200]})") from None
        raise TrainingError(
            f"{path}: refused: the file needs {name or 'an object'} to load, which is not data a medseg model "
            f"file holds (tensors, numbers, strings, lists, dicts); nothing in it was run. If you trust the file, "
            f"pass --trust-model, which loads it by running the code it carries"
        ) from None
    except OSError as e:
        raise TrainingError(f"{path}: cannot read ({e.strerror or e})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as e:  # torch's errors for a foreign file
        raise TrainingError(f"{path}: not a file torch.load reads ({e.__class__.__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]})") from None


# ----------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path, trust: bool | None = None) -> dict[str, Any]:
    """A medseg checkpoint dict from ``path``, read as data (:func:`safe_torch_load`).

    Args:
        trust: True = ``--trust-model`` (runs the code the file carries); None = :func:`trust_model_files`.

    Raises:
        TrainingError: the file needs a global other than :data:`SAFE_GLOBALS`, is not a medseg
            checkpoint or has an unsupported version.
    """
    ckpt = safe_torch_load(path, trust)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainingError(f"{path}: not a medseg checkpoint (expected keys 'model' and 'config')")
    if ckpt.get("version", CHECKPOINT_VERSION) != CHECKPOINT_VERSION:
        raise TrainingError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                            f"(this medseg writes version {CHECKPOINT_VERSION})")
    return ckpt


def _build(config: dict[str, Any], in_channels: int, num_classes: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The registry's network of ``config`` (``model.name`` / ``model.params``) with ``state`` loaded."""
    from medseg.models import build_model

    cfg = from_dict(config)
    model = build_model(cfg.model.name, in_channels, num_classes, cfg.model.params)
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- MLflow models


def save_mlflow_model(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write the model of checkpoint dict ``ckpt`` as an MLflow ``python_function`` model folder at
    ``path`` (new): no pickle, the weights as a state dict and the rest as JSON (see the module doc)."""
    import mlflow.pyfunc

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "medseg"
        data.mkdir()
        atomic_torch_save({k: v.detach().cpu() for k, v in ckpt["model"].items()}, data / "weights.pt")
        meta = {"format": MODEL_FORMAT, "version": _MODEL_FORMAT_VERSION, "model": from_dict(ckpt["config"]).model.name,
                "in_channels": int(ckpt["in_channels"]), "num_classes": int(ckpt["num_classes"]),
                "config": ckpt["config"]}
        atomic_write_text(data / "medseg_model.json", json.dumps(meta, indent=2, default=str))
        reqs = [f"torch=={torch.__version__.split('+')[0]}", "medseg"]
        mlflow.pyfunc.save_model(str(path), loader_module=__name__, data_path=str(data), pip_requirements=reqs)
    return path


def _read_model_files(data: Path, trust: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """The network and ``medseg_model.json`` of a :func:`save_mlflow_model` data folder."""
    meta_path = data / "medseg_model.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{meta_path}: unreadable ({e.__class__.__name__})") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != _MODEL_FORMAT_VERSION:
        raise TrainingError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                            f"supported (this medseg writes {MODEL_FORMAT!r} version {_MODEL_FORMAT_VERSION})")
    state = safe_torch_load(data / "weights.pt", trust)
    return _build(meta["config"], meta["in_channels"], meta["num_classes"], state), meta


def _load_mlflow_dir(local: Path, source: str, device: torch.device | str,
                     trust: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a local MLflow model folder (``MLmodel`` inside): medseg's own format, or — with
    ``--trust-model`` only — a pickled ``mlflow.pytorch`` model of an earlier medseg."""
    import yaml

    try:
        flavors = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors") or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"{source}: unreadable MLmodel file ({e.__class__.__name__})") from None
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("loader_module") == __name__ and pyfunc.get("data"):
        model, meta = _read_model_files(local / pyfunc["data"], trust)
        return model.to(device).eval(), {"config": meta["config"], "source": source}
    if "pytorch" not in flavors:
        raise TrainingError(f"{source}: not a medseg model (MLflow flavours: {', '.join(flavors) or 'none'})")
    if not _trusted(trust):
        raise TrainingError(
            f"{source}: refused: a pickled MLflow PyTorch model (as medseg logged them before model files became "
            f"data) runs the code it carries when loaded; nothing was run. If you trust it, pass --trust-model, "
            f"or load its run's checkpoints/best.pt instead"
        )
    import mlflow.pytorch

    log.warning("%s: loading a pickled MLflow model with --trust-model: any code it carries runs now", source)
    model = mlflow.pytorch.load_model(str(local), map_location=torch.device(device))
    return model.eval(), {"config": _mlflow_config(source), "source": source}


def _mlflow_config(ref: str) -> dict[str, Any] | None:
    """The ``config/config.yaml`` a ``medseg train`` run logged beside its model, when there is one."""
    if not ref.startswith("runs:/"):
        return None
    import yaml
    from mlflow.artifacts import download_artifacts

    run_id = ref[len("runs:/"):].split("/", 1)[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run_id, artifact_path="config/config.yaml", dst_path=tmp)
            return yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 — a run without a logged config simply has none
        return None


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` returns for a medseg model: ``predict(images)`` → logits.

    ``images`` is an array ``(B, C, H, W)`` (float32, normalised as in training); the result is the
    network's logits ``(B, K, H, W)`` as a NumPy array.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Logits of ``model_input`` (``params`` is unused)."""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str) -> PyfuncModel:
    """MLflow's ``python_function`` loader hook (``loader_module: medseg.models.checkpoint``)."""
    model, _ = _read_model_files(Path(data_path), trust=False)
    return PyfuncModel(model)


# ----------------------------------------------------------------------------- any model reference


def load_model(ref: str | Path, device: torch.device | str = "cpu",
               trust: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model from a checkpoint file, a ``medseg train`` run folder or an MLflow model.

    Args:
        ref: ``.../best.pt``, a run folder (its ``checkpoints/best.pt``, else ``last.pt``), an MLflow
            model URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``) or a local MLflow model
            folder (``MLmodel`` inside).
        device: where the model goes.
        trust: True = ``--trust-model``: load files that need more than data, RUNNING the code they
            carry; None = as :func:`trust_model_files` says (default: refuse them).

    Returns:
        ``(model in eval mode, info)``: info holds ``config`` (the training config as a dict; None when
        unknown), ``source`` and, for checkpoints, ``epoch``.

    Raises:
        TrainingError: one line — the reference is none of these, or the file needs code to load.
    """
    ref_s = str(ref)
    if ref_s.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(download_artifacts(artifact_uri=ref_s, dst_path=tmp))
            if not (local / "MLmodel").is_file():
                raise TrainingError(f"{ref_s}: no MLmodel file there — not an MLflow model")
            return _load_mlflow_dir(local, ref_s, device, trust)
    path = Path(ref_s)
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return _load_mlflow_dir(path, ref_s, device, trust)
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
    ckpt = read_checkpoint(path, trust)
    model = _build(ckpt["config"], ckpt["in_channels"], ckpt["num_classes"], ckpt["model"])
    return model.to(device).eval(), {"config": ckpt["config"], "source": str(path), "epoch": ckpt.get("epoch")}


def load_pretrained(net: nn.Module, path: str | Path, trust: bool | None = None) -> None:
    """Load ``model.pretrained`` weights into ``net`` (non-strict: a new head may differ; never downloads).

    ``path`` holds a state dict, or a dict with one under ``"model"`` (a medseg checkpoint); it is read
    as data (:func:`safe_torch_load`, ``trust`` as there).
    """
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"model.pretrained = {path}: file not found (weights are never downloaded)")
    state = safe_torch_load(p, trust)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = net.load_state_dict(state, strict=False)
    log.info("loaded %s (%d missing, %d unexpected keys)", p, len(missing), len(unexpected))
